"""timm's RandAugment (randaugment_semantics="timm") byte for byte against real timm.

tests/golden/ra_timm.npz was made by ``tests/golden/make_ra_golden.py timm`` with timm 1.0.31
and Pillow 13.0.0 (``versions`` in the file): every timm op x 11 levels x its draws (negation,
BILINEAR/BICUBIC) plus Rotate's 90/180/270-degree transposes and 48 chains, on the 5 sweep
images (odd, non-square, 512x683), through timm's own ``AugmentOp``. Stored as 16-byte digests
of every output, every output of the smallest image and a sample of the next one. These tests
need no timm.
"""
import ctypes
import os

import numpy as np
import pytest

from fastload import _native
from fastload.sample import schema as S

from test_ra_golden import _digest, sweep_image

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "ra_timm.npz")


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as f:
        z = {k: f[k] for k in f.files}
    names = tuple(str(x) for x in z["op_names"])
    ids = np.array([S.RA_OP_ID["Timm" + n] for n in names] + [S.RA_NONE] * (256 - len(names)), np.uint8)
    ops = np.where(z["ops"] == S.RA_NONE, S.RA_NONE, ids[np.minimum(z["ops"], len(names))]).astype(np.uint8)
    imgs = []
    for n, (h, w) in enumerate(z["sizes"]):
        img = sweep_image(int(h), int(w), n)
        assert _digest(img) == z[f"input_digest{n}"].tobytes(), f"sweep image {n} differs from the script's"
        imgs.append(img)
    return z, ops, imgs


@pytest.fixture(scope="module")
def lib():
    lib = _native.load("replay")
    vp = ctypes.c_void_p
    lib.fl_ra_timm_u8.argtypes = [vp, ctypes.c_int, ctypes.c_int, vp, vp, vp, ctypes.c_int, vp]
    lib.fl_ra_timm_u8.restype = ctypes.c_int
    return lib


def run_cpp(lib, img_chw, ops, draws, levels, fill):
    hwc = np.ascontiguousarray(np.transpose(img_chw, (1, 2, 0)))
    o = np.ascontiguousarray(ops, np.uint8)
    m = np.ascontiguousarray(draws, np.int8)
    v = np.ascontiguousarray(levels, np.float32)
    f = np.ascontiguousarray(fill, np.uint8)
    st = lib.fl_ra_timm_u8(_native.ptr(hwc), hwc.shape[0], hwc.shape[1], _native.ptr(o), _native.ptr(m),
                           _native.ptr(v), len(o), _native.ptr(f))
    _native.check(lib, st, "fl_ra_timm_u8")
    return np.transpose(hwc, (2, 0, 1))


def _label(z, i):
    return "+".join(f"{z['op_names'][o]}({lv:g}{'-' if d < 0 else ''}{'C' if abs(d) == 2 else ''})"
                    for o, lv, d in zip(z["ops"][i], z["levels"][i], z["draws"][i]) if o != S.RA_NONE)


def test_golden_covers_every_op_level_draw_and_size(golden):
    z, ops, imgs = golden
    sizes = [tuple(int(v) for v in s) for s in z["sizes"]]
    assert len(sizes) >= 5 and any(h % 2 and w % 2 for h, w in sizes) and any(h != w for h, w in sizes)
    assert max(max(s) for s in sizes) >= 512
    assert {"Timm" + str(n) for n in z["op_names"]} == {n for _, n, _, f in S.RA_OP_TABLE if f == "timm"}
    singles = [i for i in range(len(ops)) if ops[i, 1] == S.RA_NONE]
    per_op = {}
    for i in singles:
        per_op.setdefault(S.RA_OPS[ops[i, 0]], set()).add((float(z["levels"][i, 0]), int(z["draws"][i, 0])))
    for name, cases in per_op.items():
        if name in ("TimmAutoContrast", "TimmEqualize", "TimmInvert"):
            continue
        assert len({lv for lv, _ in cases}) >= 11, name
        if name in S.RA_SIGNED:
            assert {d for _, d in cases} & {-1, -2}, name
        if name[4:] in S.TIMM_GEOMETRIC:
            assert {abs(d) for _, d in cases} == {1, 2}, name
    # the only cases real timm refuses: posterize to 0 bits (Pillow >= 11 raises)
    for n in range(len(imgs)):
        raised = z[f"timm_raised{n}"]
        assert raised.any()
        assert all("Posterize" in _label(z, i) for i in np.flatnonzero(raised))


def test_native_kernel_matches_timm(golden, lib):
    z, ops, imgs = golden
    bad, n_cases = [], 0
    for n, img in enumerate(imgs):
        dig, raised = z[f"timm_digest{n}"], z[f"timm_raised{n}"]
        for i in range(len(ops)):
            if raised[i]:
                continue
            n_cases += 1
            got = run_cpp(lib, img, ops[i], z["draws"][i], z["levels"][i], z["fill"])
            if _digest(got) != dig[i].tobytes():
                bad.append((img.shape[1:], _label(z, i)))
    assert n_cases > 2000
    assert not bad, f"{len(bad)} of {n_cases} cases differ from timm: {bad[:10]}"


def _reference_vs_golden(z, ops, imgs, sizes):
    import torch

    from fastload.replay.reference_ra import apply_timm

    bad, n_cases = [], 0
    for n in sizes:
        img = torch.from_numpy(imgs[n])
        dig, raised = z[f"timm_digest{n}"], z[f"timm_raised{n}"]
        for i in range(len(ops)):
            if raised[i]:
                continue
            n_cases += 1
            got = apply_timm(img, ops[i], z["draws"][i], z["levels"][i], tuple(z["fill"])).numpy()
            if _digest(got) != dig[i].tobytes():
                bad.append((imgs[n].shape[1:], _label(z, i)))
    return bad, n_cases


def test_reference_matches_timm_small_sizes(golden):
    z, ops, imgs = golden
    small = [n for n, img in enumerate(imgs) if img.shape[1] * img.shape[2] <= 64 * 64]
    bad, n_cases = _reference_vs_golden(z, ops, imgs, small)
    assert n_cases > 800
    assert not bad, f"{len(bad)} of {n_cases} cases differ from timm: {bad[:10]}"


@pytest.mark.slow
def test_reference_matches_timm_large_sizes(golden):
    z, ops, imgs = golden
    large = [n for n, img in enumerate(imgs) if img.shape[1] * img.shape[2] > 64 * 64]
    bad, n_cases = _reference_vs_golden(z, ops, imgs, large)
    assert not bad, f"{len(bad)} of {n_cases} cases differ from timm: {bad[:10]}"


def test_posterize_to_zero_bits_clears_as_older_pillow(golden, lib):
    # the one case real timm (Pillow >= 11) refuses, replayed as Pillow < 11 computed it
    z, ops, imgs = golden
    i = next(i for i in range(len(ops)) if z["timm_raised0"][i])
    got = run_cpp(lib, imgs[0], ops[i], z["draws"][i], z["levels"][i], z["fill"])
    assert not got.any()


def test_stored_arrays_are_the_digested_outputs(golden):
    z, ops, imgs = golden
    every = int(z["sample_every"])
    seen = 0
    for n in range(len(imgs)):
        arr, idx = z.get(f"timm_out{n}"), list(range(len(ops)))
        if arr is None:
            if f"timm_sample{n}" not in z:
                continue
            arr, idx = z[f"timm_sample{n}"], idx[::every]
        assert len(arr) == len(idx)
        for a, i in zip(arr, idx):
            assert _digest(a) == z[f"timm_digest{n}"][i].tobytes()
            seen += 1
    assert seen > len(ops)


def test_bad_timm_records_are_refused(lib):
    img = np.zeros((3, 8, 8), np.uint8)
    fill = np.array([1, 2, 3], np.uint8)
    tv_shear = S.RA_OP_ID["ShearX"]
    with pytest.raises(RuntimeError, match="not a timm op"):
        run_cpp(lib, img, [tv_shear], [1], [5.0], fill)
    with pytest.raises(RuntimeError, match="outside"):
        run_cpp(lib, img, [S.RA_OP_ID["TimmRotate"]], [1], [float("nan")], fill)
    with pytest.raises(RuntimeError, match="draw code"):
        run_cpp(lib, img, [S.RA_OP_ID["TimmRotate"]], [0], [5.0], fill)
