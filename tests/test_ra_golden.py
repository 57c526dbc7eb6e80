"""RandAugment v1 and v2 byte for byte against outputs of real torchvision.

tests/golden/ra_golden.npz was made once by tests/golden/make_ra_golden.py with torch 2.14.1 +
torchvision 0.29.1 (``versions`` in the file); these tests need no torchvision. Each case is a
chain of one or two ops (op ids in RA_OPS order, signed magnitude bins, 31 bins) on a few
small images; the outputs come from torchvision's own v1 and v2 code paths.
"""
import ctypes
import os

import numpy as np
import pytest
import torch

from golden.sweep_input import digest, sweep_image  # noqa: F401 - sweep_image re-exported to other tests

from fastload import _native
from fastload.replay.reference_ra import apply_ra
from fastload.sample.params import RA_SIGNED
from fastload.sample.schema import RA_OPS as _ALL_OPS, family_ops
from fastload.sample.policy import AugmentPolicy

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "ra_golden.npz")
RA_OPS = _ALL_OPS[:len(family_ops("v1"))]  # torchvision's op space (timm's follows)
V2_FLAG = 1 << 8  # kRASemanticsV2 (csrc/replay/randaugment.h)


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as f:
        z = {k: f[k] for k in f.files}  # an NpzFile decompresses on every access
    assert tuple(str(x) for x in z["op_names"]) == RA_OPS
    n_img = sum(1 for k in z if k.startswith("img"))
    return z, n_img


@pytest.fixture(scope="module")
def lib():
    lib = _native.load("replay")
    lib.fl_randaugment_u8.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                      ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.fl_randaugment_u8.restype = ctypes.c_int
    return lib


def run_cpp(lib, img_chw, ops, mags, num_bins):
    hwc = np.ascontiguousarray(np.transpose(img_chw, (1, 2, 0)))
    o = np.ascontiguousarray(ops, dtype=np.uint8)
    m = np.ascontiguousarray(mags, dtype=np.int8)
    st = lib.fl_randaugment_u8(_native.ptr(hwc), hwc.shape[0], hwc.shape[1], _native.ptr(o), _native.ptr(m),
                               len(o), num_bins)
    _native.check(lib, st, "fl_randaugment_u8")
    return np.transpose(hwc, (2, 0, 1))


def _cases(z, n_img):
    for n in range(n_img):
        for i in range(len(z["ops"])):
            yield n, i


def _label(z, i):
    return "+".join(f"{RA_OPS[o]}({m})" for o, m in zip(z["ops"][i], z["mags"][i]) if o != 255)


def test_golden_v1_and_v2_differ_where_the_issue_says(golden):
    # the golden file itself: v2 differs from v1 on Color, Sharpness, AutoContrast (and on
    # Solarize at thresholds that land on an integer), nowhere else
    z, n_img = golden
    ops_differing = set()
    for n, i in _cases(z, n_img):
        if (z[f"v1_{n}"][i] != z[f"v2_{n}"][i]).any():
            ops_differing |= {RA_OPS[o] for o in z["ops"][i] if o != 255}
    assert {"Color", "Sharpness", "AutoContrast", "Solarize"} <= ops_differing
    singles = [i for i in range(len(z["ops"])) if z["ops"][i, 1] == 255]
    single_diff = {RA_OPS[z["ops"][i, 0]] for n in range(n_img) for i in singles
                   if (z[f"v1_{n}"][i] != z[f"v2_{n}"][i]).any()}
    assert single_diff == {"Color", "Sharpness", "AutoContrast", "Solarize"}


@pytest.mark.parametrize("semantics", ["v1", "v2"])
def test_reference_matches_torchvision(golden, semantics):
    z, n_img = golden
    bad = []
    for n, i in _cases(z, n_img):
        img = torch.from_numpy(z[f"img{n}"])
        got = apply_ra(img, z["ops"][i], z["mags"][i], num_bins=int(z["num_bins"]), semantics=semantics).numpy()
        if not np.array_equal(got, z[f"{semantics}_{n}"][i]):
            bad.append((n, _label(z, i)))
    assert not bad, f"{len(bad)} cases differ from torchvision {semantics}: {bad[:10]}"


@pytest.mark.parametrize("semantics", ["v1", "v2"])
def test_native_kernel_matches_torchvision(golden, lib, semantics):
    z, n_img = golden
    bins = int(z["num_bins"]) | (V2_FLAG if semantics == "v2" else 0)
    bad = []
    for n, i in _cases(z, n_img):
        got = run_cpp(lib, z[f"img{n}"], z["ops"][i], z["mags"][i], bins)
        if not np.array_equal(got, z[f"{semantics}_{n}"][i]):
            bad.append((n, _label(z, i), int(np.abs(got.astype(int) - z[f"{semantics}_{n}"][i]).max())))
    assert not bad, f"{len(bad)} cases differ from torchvision {semantics}: {bad[:10]}"


def test_v1_path_does_not_reproduce_v2(golden):
    # what the replay did before the flag existed (v1 only): not v2 (the benchmark's peer)
    z, n_img = golden
    color = [i for i in range(len(z["ops"])) if z["ops"][i, 1] == 255 and RA_OPS[z["ops"][i, 0]] == "Color"]
    mismatches = sum(not np.array_equal(apply_ra(torch.from_numpy(z[f"img{n}"]), z["ops"][i], z["mags"][i]).numpy(),
                                        z[f"v2_{n}"][i]) for n in range(n_img) for i in color)
    assert mismatches > 0


def test_policy_semantics_field():
    assert AugmentPolicy().randaugment_semantics == "v1"
    p = AugmentPolicy(randaugment=(2, 9), randaugment_semantics="v2")
    assert AugmentPolicy.from_dict(p.to_dict()) == p
    # manifests written before the field existed were generated and replayed with v1 ops
    d = p.to_dict()
    del d["randaugment_semantics"]
    assert AugmentPolicy.from_dict(d).randaugment_semantics == "v1"
    with pytest.raises(ValueError, match="randaugment_semantics"):
        AugmentPolicy(randaugment_semantics="v3")
    assert AugmentPolicy(randaugment=(2, 9), randaugment_semantics="pil").randaugment_semantics == "pil"


def test_bad_semantics_flag_bits(lib):
    img = np.zeros((3, 4, 4), np.uint8)
    with pytest.raises(RuntimeError, match="num_bins"):
        run_cpp(lib, img, [6], [1], 31 | (1 << 10))
    with pytest.raises(RuntimeError, match="both the v2 and the pil"):
        run_cpp(lib, img, [6], [1], 31 | (1 << 8) | (1 << 9))
    with pytest.raises(ValueError, match="semantics"):
        apply_ra(torch.from_numpy(img), [6], [1], semantics="v3")


def test_render_batch_carries_the_semantics():
    # the replay path (what ReinforcedLoader and generation call) applies the chosen ops:
    # render without RandAugment, apply the reference on top, compare with RandAugment rendered
    from fastload.replay.native import render_batch
    from fastload.sample import params as P

    rng = np.random.default_rng(3)
    img = np.clip(rng.normal(128, 40, (40, 52, 3)), 0, 255).astype(np.uint8)
    plain = P.empty(1)
    base = torch.empty(1, 3, 24, 32, dtype=torch.uint8)
    render_batch([img], plain, base, threads=1)
    rec = P.empty(1)
    rec["ra_ops"][0, :2] = (RA_OPS.index("Color"), RA_OPS.index("Sharpness"))
    rec["ra_mags"][0, :2] = (9, -14)
    outs = {}
    for sem in ("v1", "v2", "pil"):
        out = torch.empty(1, 3, 24, 32, dtype=torch.uint8)
        render_batch([img], rec, out, threads=1, ra_semantics=sem)
        want = apply_ra(base[0], rec["ra_ops"][0], rec["ra_mags"][0], semantics=sem)
        assert torch.equal(out[0], want), sem
        outs[sem] = out
    assert not torch.equal(outs["v1"], outs["v2"]) and not torch.equal(outs["v1"], outs["pil"])
    with pytest.raises(ValueError, match="ra_semantics"):
        render_batch([img], rec, torch.empty(1, 3, 24, 32, dtype=torch.uint8), ra_semantics="v3")


# --------------------------------------------------------------------------- the sweep
# tests/golden/ra_sweep.npz (make_ra_golden.py sweep): every op x every bin of 31 (both signs)
# plus 40 chains, on 5 image sizes (odd, non-square, 512x683), for v1 and v2 (torchvision's
# tensor RandAugment) and pil (torchvision's RandAugment on PIL images). Stored as 16-byte
# digests of every output, every output of the smallest image and a sample of the next one.

SWEEP = os.path.join(os.path.dirname(__file__), "golden", "ra_sweep.npz")
SEM_BITS = {"v1": 0, "v2": V2_FLAG, "pil": 1 << 9}


_digest = digest  # the script's digest (sha256, first 16 bytes)



@pytest.fixture(scope="module")
def sweep():
    with np.load(SWEEP) as f:
        z = {k: f[k] for k in f.files}
    assert tuple(str(x) for x in z["op_names"]) == RA_OPS
    imgs = []
    for n, (h, w) in enumerate(z["sizes"]):
        img = sweep_image(int(h), int(w), n)
        assert _digest(img) == z[f"input_digest{n}"].tobytes(), f"sweep image {n} differs from the script's"
        imgs.append(img)
    return z, imgs


def _sweep_label(z, i):
    return "+".join(f"{RA_OPS[o]}({m})" for o, m in zip(z["ops"][i], z["mags"][i]) if o != 255)


def test_sweep_covers_every_op_bin_and_size(sweep):
    z, imgs = sweep
    sizes = [tuple(int(v) for v in s) for s in z["sizes"]]
    assert len(sizes) >= 5 and any(h % 2 and w % 2 for h, w in sizes) and any(h != w for h, w in sizes)
    assert max(max(s) for s in sizes) >= 512
    singles = {(int(o[0]), int(m[0])) for o, m in zip(z["ops"], z["mags"]) if o[1] == 255}
    for k, name in enumerate(RA_OPS):
        if name in ("Identity", "AutoContrast", "Equalize"):
            continue
        want = range(-30, 31) if name in RA_SIGNED else range(31)
        assert {(k, b) for b in want} <= singles, name
    # the semantics differ where they should: pil from v1 on the geometric ops and blends
    differ = {RA_OPS[int(z["ops"][i, 0])] for i in range(len(z["ops"])) if z["ops"][i, 1] == 255
              and (z["pil_digest3"][i] != z["v1_digest3"][i]).any()}
    assert {"Rotate", "Color", "Contrast", "Sharpness", "AutoContrast"} <= differ, differ
    assert not differ & {"Identity", "Posterize", "Solarize", "Equalize"}


@pytest.mark.parametrize("semantics", ["v1", "v2", "pil"])
def test_native_kernel_matches_the_sweep(sweep, lib, semantics):
    z, imgs = sweep
    bins = int(z["num_bins"]) | SEM_BITS[semantics]
    bad = []
    for n, img in enumerate(imgs):
        dig = z[f"{semantics}_digest{n}"]
        for i in range(len(z["ops"])):
            got = run_cpp(lib, img, z["ops"][i], z["mags"][i], bins)
            if _digest(got) != dig[i].tobytes():
                bad.append((img.shape[1:], _sweep_label(z, i)))
    assert not bad, f"{len(bad)} of {len(imgs) * len(z['ops'])} cases differ from torchvision {semantics}: {bad[:10]}"


def _reference_vs_sweep(z, imgs, semantics, sizes):
    bad = []
    for n in sizes:
        img = torch.from_numpy(imgs[n])
        dig = z[f"{semantics}_digest{n}"]
        for i in range(len(z["ops"])):
            got = apply_ra(img, z["ops"][i], z["mags"][i], num_bins=int(z["num_bins"]), semantics=semantics).numpy()
            if _digest(got) != dig[i].tobytes():
                bad.append((imgs[n].shape[1:], _sweep_label(z, i)))
    return bad


@pytest.mark.parametrize("semantics", ["v1", "v2", "pil"])
def test_reference_matches_the_sweep_small_sizes(sweep, semantics):
    z, imgs = sweep
    small = [n for n, img in enumerate(imgs) if img.shape[1] * img.shape[2] <= 64 * 64]
    bad = _reference_vs_sweep(z, imgs, semantics, small)
    assert not bad, f"{len(bad)} cases differ from torchvision {semantics}: {bad[:10]}"


@pytest.mark.slow
@pytest.mark.parametrize("semantics", ["v1", "v2", "pil"])
def test_reference_matches_the_sweep_large_sizes(sweep, semantics):
    z, imgs = sweep
    large = [n for n, img in enumerate(imgs) if img.shape[1] * img.shape[2] > 64 * 64]
    bad = _reference_vs_sweep(z, imgs, semantics, large)
    assert not bad, f"{len(bad)} cases differ from torchvision {semantics}: {bad[:10]}"


def test_sweep_stored_arrays_are_the_digested_outputs(sweep):
    # the stored arrays (every output of image 0, a sample of the others) are what the digests say
    z, imgs = sweep
    every = int(z["sample_every"])
    for sem in ("v1", "v2", "pil"):
        for n in range(len(imgs)):
            arr = z.get(f"{sem}_out{n}")
            idx = list(range(len(z["ops"])))
            if arr is None:
                if f"{sem}_sample{n}" not in z:
                    continue  # digests only (large images)
                arr, idx = z[f"{sem}_sample{n}"], idx[::every]
            assert len(arr) == len(idx)
            for a, i in zip(arr, idx):
                assert _digest(a) == z[f"{sem}_digest{n}"][i].tobytes()
