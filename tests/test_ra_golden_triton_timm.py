"""The Triton replay's timm RandAugment semantics (kernels/ra_timm.py: timm.data.auto_augment's
ops on PIL images), in the Triton interpreter, against the goldens of real timm in
tests/golden/ra_timm.npz (``timm_out0``: every case at 13x17; ``timm_sample1``: every 23rd at
37x64; ``timm_digest*``: every case at every size). Each case becomes a record whose crop is
the whole image at the image's own size (the resize is then the identity: checked), its ops
and draws in the record (``ra_mags``: sign = negation, 2 = BICUBIC) and its levels in the
extension record (``ra_vals``, ``ra_float``), as tests/test_ra_timm.py maps them for the C++
path; rendered by ``render_uint8`` with ``ra_semantics="timm"`` and the file's fill colour.

Tolerance: none (every stored array and digest checked below is equal byte for byte). The
cases real timm raises on (Posterize to 0 bits with Pillow >= 11) are compared with the
reference (every bit cleared, as Pillow < 11 and the C++ path).

Default run (~22 s on 2 busy cores): every op at 13x17 at its lowest, a middle and its top
level (up to 10) with every draw (both signs, both filters), Rotate by 90 degrees (filtered
on this non-square image) and 180 (a transpose), every fourth chain, the raised cases; at
37x64 AutoContrast and Equalize (trivial at 13x17: fewer than 256 pixels) and each geometric
op's top level against the digests. ``slow`` (~3.5 min): every case at 13x17 (463), the
sampled cases at 37x64, and Rotate's 90/180/270-degree transposes on the square 224x224 image
(digests). Checked to fail with the kernel broken on purpose: the bilinear result rounded
instead of truncated (21 geometric cases, 1 level), the fill colour's red channel as 0 (41
cases; and tests/test_device_replay.py's timm test).
"""
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")

from fastload.kernels import ra_timm  # noqa: E402
from fastload.kernels.replay import pack_ra, prepare_replay, render_uint8  # noqa: E402
from fastload.replay.reference_ra import apply_timm  # noqa: E402
from fastload.sample import params as P  # noqa: E402
from fastload.sample import schema as S  # noqa: E402

from test_ra_golden import _digest, sweep_image  # noqa: E402
from test_ra_timm import GOLDEN, _label  # noqa: E402

NONE = S.RA_NONE
GEO = tuple(sorted(S.TIMM_GEOMETRIC))


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as f:
        z = {k: f[k] for k in f.files}
    names = tuple(str(x) for x in z["op_names"])
    ids = np.array([S.RA_OP_ID["Timm" + n] for n in names] + [NONE] * (256 - len(names)), np.uint8)
    ops = np.where(z["ops"] == NONE, NONE, ids[np.minimum(z["ops"], len(names))]).astype(np.uint8)
    return z, ops


def _name(z, i):
    return str(z["op_names"][z["ops"][i, 0]])


def _single(z, i):
    return z["ops"][i, 1] == NONE


def records(z, ops, idx):
    rec = P.empty(len(idx))
    ext = P.empty_ext(len(idx))
    ext["ext"] = P.EXT_RA_FLOAT
    for k, i in enumerate(idx):
        for j in range(ops.shape[1]):
            if ops[i, j] != NONE:
                rec["ra_ops"][k, j], rec["ra_mags"][k, j] = ops[i, j], z["draws"][i, j]
                ext["ra_vals"][k, j] = z["levels"][i, j]
    return rec, ext


def render(img, rec, ext, fill):
    _, h, w = img.shape
    B = len(rec)
    imgs = torch.from_numpy(np.ascontiguousarray(img.transpose(1, 2, 0)))[None].expand(B, h, w, 3).contiguous()
    hw = torch.tensor([[h, w]] * B, dtype=torch.int32)
    return render_uint8(imgs, hw, rec, (h, w), ra_semantics="timm", ext=ext,
                        ra_fill=tuple(int(v) for v in fill)).numpy()


def check(golden, n, select=None, digests=False):
    """The selected cases at sweep size n (not raised there) against the stored arrays (or,
    with ``digests``, the digests); returns the case indices checked."""
    z, ops = golden
    h, w = (int(v) for v in z["sizes"][n])
    img = sweep_image(h, w, n)
    assert _digest(img) == z[f"input_digest{n}"].tobytes()
    if digests:
        idx = list(range(len(ops)))
        want = None
    elif f"timm_out{n}" in z:
        idx, want = list(range(len(ops))), z[f"timm_out{n}"]
    else:
        idx, want = list(range(len(ops)))[::int(z["sample_every"])], z[f"timm_sample{n}"]
    keep = [k for k, i in enumerate(idx) if not z[f"timm_raised{n}"][i] and (select is None or select(i))]
    idx = [idx[k] for k in keep]
    rec, ext = records(z, ops, idx)
    got = render(img, rec, ext, z["fill"])
    bad = []
    for k, i in enumerate(idx):
        if digests:
            if _digest(got[k]) != z[f"timm_digest{n}"][i].tobytes():
                bad.append(_label(z, i))
        else:
            d = got[k] != want[keep[k]]
            if d.any():
                lv = int(np.abs(got[k].astype(int) - want[keep[k]].astype(int)).max())
                bad.append(f"{_label(z, i)}: {int(d.sum())}/{d.size} px, max {lv} levels")
    assert not bad, f"size {(h, w)}: Triton replay differs from timm in {len(bad)} of {len(idx)} cases: {bad[:12]}"
    return idx


def default_case(z, i):
    """Every op at its lowest, a middle and its highest stored level up to 10 with every draw
    (sign, filter), Rotate by 90 (filtered) and 180 degrees (a transpose); every 4th chain."""
    if not _single(z, i):
        return i % 4 == 0
    name = _name(z, i)
    lv = float(z["levels"][i, 0])
    same = sorted({float(z["levels"][k, 0]) for k in range(len(z["ops"])) if _single(z, k) and _name(z, k) == name
                   and (name != "Rotate" or float(z["levels"][k, 0]) <= 10.0)})
    # (Rotate at levels 30 and 60: 90 degrees on a non-square image, filtered; 180, a transpose)
    return lv in (same[0], same[len(same) // 2], same[-1]) or (name == "Rotate" and lv in (30.0, 60.0))


def identity_resize(z, n):
    h, w = (int(v) for v in z["sizes"][n])
    img = sweep_image(h, w, n)
    imgs = torch.from_numpy(np.ascontiguousarray(img.transpose(1, 2, 0)))[None]
    got = render_uint8(imgs, torch.tensor([[h, w]]), P.empty(1), (h, w), ra_semantics="timm")
    assert np.array_equal(got[0].numpy(), img)


def test_timm_matches_the_goldens_small(golden):
    z, ops = golden
    identity_resize(z, 0)
    idx = check(golden, 0, lambda i: default_case(z, i))
    singles = {(_name(z, i), int(z["draws"][i, 0])) for i in idx if _single(z, i)}
    names = {n for n, _ in singles}
    assert names == {str(n) for n in z["op_names"]}
    # both signs and both filters of every geometric op, and the transpose
    for g in GEO:
        assert {d for n, d in singles if n == g} == {-2, -1, 1, 2}, g
    assert any(_name(z, i) == "Rotate" and float(z["levels"][i, 0]) == 60.0 for i in idx)
    assert sum(not _single(z, i) for i in idx) >= 10


def test_timm_matches_the_digests_at_37x64(golden):
    # the statistics ops (at 13x17 Equalize is the identity) and the geometric ops' ends
    z, ops = golden
    lv_max = {g: max(float(z["levels"][i, 0]) for i in range(len(ops)) if _single(z, i) and _name(z, i) == g
                     and float(z["levels"][i, 0]) <= 10.0) for g in GEO}

    def pick(i):  # (one draw per geometric op: BICUBIC negated or BILINEAR, alternating)
        if not _single(z, i):
            return False
        name = _name(z, i)
        return name in ("AutoContrast", "Equalize") or (
            name in GEO and float(z["levels"][i, 0]) == lv_max[name]
            and int(z["draws"][i, 0]) == (-2 if GEO.index(name) % 2 == 0 else 1))
    idx = check(golden, 1, pick, digests=True)
    assert len(idx) == 2 + len(GEO)


def test_timm_raised_cases_clear_as_the_reference(golden):
    # timm (Pillow >= 11) refuses Posterize to 0 bits; the replay clears every bit, as
    # Pillow < 11, the reference and the C++ path
    z, ops = golden
    img = z["img0"]
    idx = [int(i) for i in np.flatnonzero(z["timm_raised0"])]
    assert idx
    rec, ext = records(z, ops, idx)
    got = render(img, rec, ext, z["fill"])
    for k, i in enumerate(idx):
        want = apply_timm(torch.from_numpy(img), ops[i], z["draws"][i], z["levels"][i], tuple(z["fill"])).numpy()
        assert np.array_equal(got[k], want), _label(z, i)


@pytest.mark.slow
def test_timm_matches_the_goldens_every_case(golden):
    z, ops = golden
    idx = check(golden, 0)
    assert len(idx) == len(ops) - int(z["timm_raised0"].sum())


@pytest.mark.slow
def test_timm_matches_the_goldens_sampled_size(golden):
    z, ops = golden
    idx = check(golden, 1)
    assert len(idx) >= len(z["timm_sample1"]) - int(z["timm_raised1"].sum())


@pytest.mark.slow
def test_timm_rotate_transposes_on_a_square_image(golden):
    # Image.rotate by 90/180/270 on a square image is a transpose (ImagingTranspose)
    z, ops = golden
    n = next(k for k, (h, w) in enumerate(z["sizes"]) if h == w)
    idx = check(golden, n, lambda i: _single(z, i) and _name(z, i) == "Rotate"
                and float(z["levels"][i, 0]) in (30.0, 60.0, 90.0), digests=True)
    assert len(idx) >= 3


def test_timm_parameters():
    # Posterize to 0 bits clears every bit; >= 8 bits is the identity; Invert is Solarize at 0
    op, ip, _ = ra_timm._op_params("PosterizeIncreasing", 0.0, False, False, 8, 8)  # 4 - 0 = 4 bits
    assert op == S.RA_OP_ID["Posterize"] and ip == 0xF0
    assert ra_timm._op_params("Posterize", 0.0, False, False, 8, 8)[:2] == (S.RA_OP_ID["Posterize"], 0)
    assert ra_timm._op_params("Posterize", 20.0, False, False, 8, 8)[:2] == (S.RA_OP_ID["Identity"], 0)
    assert ra_timm._op_params("Invert", 5.0, False, False, 8, 8)[:2] == (S.RA_OP_ID["Solarize"], 0)
    # the increasing enhancements: max(0.1, 1 + sign * level / 10 * 0.9), as Image.blend's float32 alpha
    op, _, d = ra_timm._op_params("ColorIncreasing", 10.0, True, False, 8, 8)
    assert op == S.RA_OP_ID["Color"] and d.view(np.float32)[0] == np.float32(0.1)
    # geometry: the matrix in double, the filter and the transposes in the int parameter
    op, ip, d = ra_timm._op_params("ShearX", 5.0, True, True, 8, 8)
    assert op == S.RA_OP_ID["TimmShearX"] and ip == ra_timm.BICUBIC and d[:6].tolist() == [1, -0.15, 0, 0, 1, 0]
    assert ra_timm._op_params("Rotate", 60.0, False, False, 8, 10)[1] == ra_timm.TRANSPOSE  # 180 degrees
    assert ra_timm._op_params("Rotate", 30.0, False, False, 8, 10)[1] == 0  # 90 degrees, not square: filtered
    assert ra_timm._op_params("Rotate", 0.0, False, True, 8, 10)[0] == S.RA_OP_ID["Identity"]


def test_timm_records_are_validated():
    rec = P.empty(1)
    ext = P.empty_ext(1)
    rec["ra_ops"][0, 0], rec["ra_mags"][0, 0] = S.RA_OP_ID["TimmRotate"], 2
    with pytest.raises(ValueError, match="need their levels"):  # no ra_float
        prepare_replay(rec, torch.tensor([[8, 8]]), (8, 8), ra_semantics="timm", ext=ext)
    ext["ext"], ext["ra_vals"][0, 0] = P.EXT_RA_FLOAT, 5.0
    plan = prepare_replay(rec, torch.tensor([[8, 8]]), (8, 8), ra_semantics="timm", ext=ext, ra_fill=(1, 2, 3))
    assert plan.fill == (1.0, 2.0, 3.0) and plan.rad[0, 0, 0].item() == ra_timm._op_params(
        "Rotate", 5.0, False, True, 8, 8)[2][0]
    for field, val, msg in (("lv", float("nan"), "outside"), ("lv", 101.0, "outside"), ("dr", 0, "draw code"),
                            ("dr", 3, "draw code"), ("op", S.RA_OP_ID["Rotate"], "not a timm op")):
        r, e = rec.copy(), ext.copy()
        if field == "lv":
            e["ra_vals"][0, 0] = val
        elif field == "dr":
            r["ra_mags"][0, 0] = val
        else:
            r["ra_ops"][0, 0] = val
        with pytest.raises(ValueError, match=msg):
            prepare_replay(r, torch.tensor([[8, 8]]), (8, 8), ra_semantics="timm", ext=e)
    with pytest.raises(ValueError, match="ra_fill"):
        prepare_replay(rec, torch.tensor([[8, 8]]), (8, 8), ra_semantics="timm", ext=ext, ra_fill=(0, 0, 256))
    # torchvision's semantics refuse timm ids; timm has no bins to pack
    with pytest.raises(ValueError, match="not one of torchvision's"):
        pack_ra(rec, (8, 8), ra_semantics="pil")
