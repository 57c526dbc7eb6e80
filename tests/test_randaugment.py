"""RandAugment's 14 ops in C++ (csrc/replay/randaugment.cpp) against the PyTorch reference
(fastload/replay/reference_ra.py, torchvision semantics).

Every comparison is exact (byte for byte): the C++ reproduces torch's float32 arithmetic
(linspace's FMA, the grid's rounding order, grid_sample's half-to-even nearest, _blend's
float32 products and truncation), so no tolerance is needed; see the notes at the top of
randaugment.cpp. One known limit is documented, not tested: Contrast's mean uses an exact
integer sum, torch's float32 sum equals it below 2^24 (images up to ~65k pixels at white).
"""
import ctypes
import math

import numpy as np
import pytest
import torch

from fastload import _native
from fastload.replay.reference_ra import apply_op, apply_ra, magnitude_table, magnitude_value
from fastload.sample.params import RA_NONE, RA_OPS, RA_SIGNED


@pytest.fixture(scope="module")
def lib():
    lib = _native.load("replay")
    lib.fl_randaugment_u8.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                      ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.fl_randaugment_u8.restype = ctypes.c_int
    return lib


def run_cpp(lib, img_chw, ops, mags, num_bins=31, semantics="v1"):
    hwc = np.ascontiguousarray(img_chw.permute(1, 2, 0).numpy())
    o = np.ascontiguousarray(ops, dtype=np.uint8)
    m = np.ascontiguousarray(mags, dtype=np.int8)
    st = lib.fl_randaugment_u8(_native.ptr(hwc), hwc.shape[0], hwc.shape[1], _native.ptr(o),
                               _native.ptr(m), len(o), num_bins | SEMANTICS_BITS[semantics])
    _native.check(lib, st, "fl_randaugment_u8")
    return torch.from_numpy(hwc).permute(2, 0, 1).contiguous()


SEMANTICS_BITS = {"v1": 0, "v2": 1 << 8, "pil": 1 << 9}  # kRASemanticsV2 / kRASemanticsPIL


def make_image(h, w, seed, kind="photo"):
    """'photo': smooth gradients + texture + noise in a reduced range (so AutoContrast and
    Equalize have work to do); 'noise': uniform bytes; 'flat': constant channels."""
    g = np.random.default_rng(seed)
    if kind == "noise":
        return torch.from_numpy(g.integers(0, 256, (3, h, w), dtype=np.uint8))
    if kind == "flat":
        return torch.from_numpy(np.broadcast_to(g.integers(0, 256, (3, 1, 1), dtype=np.uint8),
                                                (3, h, w)).copy())
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = []
    for c in range(3):
        a, b, p = g.uniform(0.05, 0.4, 3)
        v = 60 + 50 * np.sin(a * x + p) + 40 * np.cos(b * y) + 0.3 * (x + y) + g.normal(0, 8, (h, w))
        chans.append(np.clip(v + 20 * c, 0, 255))
    return torch.from_numpy(np.stack(chans).astype(np.uint8))


def assert_same(ref, got, what):
    if not torch.equal(ref, got):
        d = (ref.int() - got.int()).abs()
        raise AssertionError(f"{what}: {int((d > 0).any(0).sum())} pixels differ, max {int(d.max())}")


SIZES = [(17, 23), (64, 48), (3, 3), (1, 5)]
BINS_31 = [0, 1, -1, 5, -5, 9, -9, 17, -23, 30, -30]


@pytest.mark.parametrize("semantics", ["v1", "v2", "pil"])
@pytest.mark.parametrize("op", range(len(RA_OPS)), ids=list(RA_OPS))
@pytest.mark.parametrize("h,w", SIZES)
def test_every_op_matches_reference(lib, op, h, w, semantics):
    for kind, seed in (("photo", 1), ("noise", 2)):
        img = make_image(h, w, seed + 10 * op, kind)
        for mag in BINS_31:
            ref = apply_ra(img, [op], [mag], semantics=semantics)
            got = run_cpp(lib, img, [op], [mag], semantics=semantics)
            assert_same(ref, got, f"{RA_OPS[op]} bin {mag} on {h}x{w} {kind} {semantics}")


@pytest.mark.parametrize("op", ["Color", "Contrast", "Sharpness", "AutoContrast", "Solarize"])
def test_v2_ops_every_bin_larger_images(lib, op):
    # v2's own arithmetic (FMA blends, floored grey, division) over every bin on images large
    # enough for the kernel's vector paths and their tails
    op_id = RA_OPS.index(op)
    for (h, w), nb in (((224, 224), 10), ((131, 97), 31)):
        img = make_image(h, w, 9 + h, "photo")
        bins = range(-(nb - 1), nb) if op in RA_SIGNED else range(nb)
        for mag in bins:
            assert_same(apply_ra(img, [op_id], [mag], nb, semantics="v2"),
                        run_cpp(lib, img, [op_id], [mag], nb, semantics="v2"), f"{op} v2 bin {mag}/{nb} on {h}x{w}")


@pytest.mark.parametrize("op", ["ShearX", "ShearY", "Rotate", "Color", "Contrast", "Sharpness"])
def test_float_sensitive_ops_every_bin_larger_images(lib, op):
    # Larger images put grid coordinates within float error of pixel-centre ties (where FMA
    # contraction once made the C++ disagree): every bin of 31 and of 10, both signs.
    op_id = RA_OPS.index(op)
    for (h, w), nb in (((224, 224), 10), ((131, 97), 31)):
        img = make_image(h, w, 7 + h, "photo")
        bins = range(-(nb - 1), nb) if op in RA_SIGNED else range(nb)
        for mag in bins:
            assert_same(apply_ra(img, [op_id], [mag], nb), run_cpp(lib, img, [op_id], [mag], nb),
                        f"{op} bin {mag}/{nb} on {h}x{w}")


@pytest.mark.parametrize("num_bins", [2, 3, 10, 11, 31, 100])
def test_other_bin_counts(lib, num_bins):
    img = make_image(29, 31, num_bins, "photo")
    for op in range(len(RA_OPS)):
        for mag in sorted({0, num_bins - 1, -(num_bins - 1), num_bins // 2, -(num_bins // 3)}):
            assert_same(apply_ra(img, [op], [mag], num_bins),
                        run_cpp(lib, img, [op], [mag], num_bins),
                        f"{RA_OPS[op]} bin {mag}/{num_bins}")


@pytest.mark.parametrize("semantics", ["v1", "v2"])
def test_flat_channels(lib, semantics):
    # AutoContrast keeps a constant channel (255/0 is not finite); Equalize's step is 0.
    img = make_image(16, 20, 3, "flat")
    for op in ("AutoContrast", "Equalize", "Contrast", "Sharpness", "Color"):
        op_id = RA_OPS.index(op)
        assert_same(apply_ra(img, [op_id], [12], semantics=semantics),
                    run_cpp(lib, img, [op_id], [12], semantics=semantics), op)
    assert torch.equal(apply_ra(img, [RA_OPS.index("AutoContrast")], [0], semantics=semantics), img)


@pytest.mark.parametrize("semantics", ["v1", "v2", "pil"])
def test_chains_of_ops(lib, semantics):
    g = np.random.default_rng(5)
    for t in range(60):
        h, w = int(g.integers(5, 70)), int(g.integers(5, 70))
        img = make_image(h, w, 100 + t, "photo" if t % 3 else "noise")
        n = int(g.integers(2, 5))
        ops = [int(x) for x in g.integers(0, len(RA_OPS), n)]
        mags = [int(x) for x in g.integers(-30, 31, n)]
        if t % 4 == 0:
            ops[1] = RA_NONE  # unused slots are skipped
        assert_same(apply_ra(img, ops, mags, semantics=semantics), run_cpp(lib, img, ops, mags, semantics=semantics),
                    f"chain {list(zip(ops, mags))} on {h}x{w} {semantics}")


def test_reference_semantics_by_hand():
    """The reference itself against values worked out from torchvision's definitions."""
    img = make_image(12, 10, 0, "photo")
    # magnitude tables: as RandAugment._augmentation_space (TranslateX uses the width)
    assert magnitude_value("TranslateX", -30, 31, 12, 10) == pytest.approx(-150 / 331 * 10, rel=1e-6)
    assert magnitude_value("TranslateY", 30, 31, 12, 10) == pytest.approx(150 / 331 * 12, rel=1e-6)
    assert magnitude_value("Rotate", -15, 31, 12, 10) == pytest.approx(-15.0)
    assert magnitude_table("Posterize", 31, 1, 1).tolist()[::10] == [8, 7, 5, 4]
    assert magnitude_value("Solarize", -3, 31, 1, 1) == magnitude_value("Solarize", 3, 31, 1, 1) == 229.5
    with pytest.raises(ValueError, match="mags"):
        magnitude_value("Rotate", 31, 31, 4, 4)
    # Identity, integer translation (fill 0), posterize mask, solarize threshold
    assert torch.equal(apply_op(img, "Identity", 0.0), img)
    t = apply_op(img, "TranslateX", 3.9)  # int() truncates to 3 pixels
    assert torch.equal(t[:, :, 3:], img[:, :, :-3]) and int(t[:, :, :3].max()) == 0
    t = apply_op(img, "TranslateY", -2.0)
    assert torch.equal(t[:, :-2], img[:, 2:]) and int(t[:, -2:].max()) == 0
    assert torch.equal(apply_op(img, "Posterize", 5.0), img & 0xF8)
    s = apply_op(img, "Solarize", 100.0)
    assert torch.equal(s, torch.where(img >= 100, 255 - img, img))
    # Rotating a square by 90 degrees is a transpose-flip (counter-clockwise).
    sq = make_image(9, 9, 4, "noise")
    assert torch.equal(apply_op(sq, "Rotate", 90.0), torch.rot90(sq, 1, dims=(1, 2)))
    # Brightness truncates: 100 * 1.9 = 190, 101 * 0.55 = 55.55 -> 55
    assert int(apply_op(torch.full((3, 2, 2), 101, dtype=torch.uint8), "Brightness", -0.45)[0, 0, 0]) == 55
    # Equalize, two levels of 300 pixels: step = 300 // 255 = 1, lut[10] = 0, lut[50] = 255;
    # with 8 + 8 pixels step is 0 and the channel is kept.
    two = torch.full((3, 20, 30), 10, dtype=torch.uint8)
    two[:, 10:] = 50
    assert apply_op(two, "Equalize", 0.0).unique().tolist() == [0, 255]
    small = two[:, 8:12, :4].contiguous()
    assert torch.equal(apply_op(small, "Equalize", 0.0), small)
    # shear about the top-left corner: row 0 does not move
    sh = apply_op(sq, "ShearX", 0.3)
    assert torch.equal(sh[:, 0], sq[:, 0])
    # grayscale weights and truncation
    px = torch.tensor([[[200]], [[100]], [[50]]], dtype=torch.uint8)
    g = int(math.floor(0.2989 * 200 + 0.587 * 100 + 0.114 * 50))
    out = apply_op(px, "Color", -1.0)  # factor 0: pure grayscale
    assert out.flatten().tolist() == [g, g, g]


def test_bad_input(lib):
    img = make_image(8, 8, 0, "noise")
    with pytest.raises(RuntimeError, match="unknown op id 14"):
        run_cpp(lib, img, [14], [0])
    with pytest.raises(RuntimeError, match="magnitude bin"):
        run_cpp(lib, img, [5], [31])
    with pytest.raises(RuntimeError, match="magnitude bin"):
        run_cpp(lib, img, [0, 6], [0, -40], num_bins=31)
    with pytest.raises(RuntimeError, match="num_bins"):
        run_cpp(lib, img, [5], [0], num_bins=1)
    # a rejected record leaves the image untouched (validation before any op)
    hwc = np.ascontiguousarray(img.permute(1, 2, 0).numpy())
    before = hwc.copy()
    o, m = np.array([6, 99], np.uint8), np.array([5, 0], np.int8)
    assert lib.fl_randaugment_u8(_native.ptr(hwc), 8, 8, _native.ptr(o), _native.ptr(m), 2, 31) != 0
    assert np.array_equal(hwc, before)
    with pytest.raises(ValueError, match="ops"):
        apply_ra(img, [99], [0])
    with pytest.raises(ValueError, match="img_u8_chw"):
        apply_ra(img.float(), [0], [0])
    with pytest.raises(ValueError, match="num_bins"):
        apply_ra(img, [0], [0], num_bins=1)


_GRID_VS_BMM = r"""
import math, sys, torch
from fastload.replay import reference_ra as R
bad = 0
for h, w in ((17, 23), (224, 224), (131, 97), (513, 640)):
    for ang in (0.3, -8.7, 13.0, 30.0):
        for m in (R._inverse_affine([0.0, 0.0], -ang, [0.0, 0.0], [0.0, 0.0]),
                  R._inverse_affine([-w * 0.5, -h * 0.5], 0.0, [0.0, 0.0], [ang, 0.0]),
                  R._inverse_affine([-w * 0.5, -h * 0.5], 0.0, [0.0, 0.0], [0.0, ang])):
            theta = torch.tensor(m, dtype=torch.float32).reshape(1, 2, 3)
            base = torch.empty(1, h, w, 3)
            base[..., 0].copy_(torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, steps=w))
            base[..., 1].copy_(torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, steps=h).unsqueeze(-1))
            base[..., 2].fill_(1.0)
            sc = theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h])
            tv = base.view(1, h * w, 3).bmm(sc).view(1, h, w, 2)
            x, y = base[0, :, :, 0], base[0, :, :, 1]
            ours = torch.stack([x.mul(sc[0, 0, j]).add(y.mul(sc[0, 1, j])).add(sc[0, 2, j]) for j in (0, 1)], -1)
            bad += int((tv[0] != ours).sum())
print(bad)
"""


def test_reference_grid_is_torchvisions_bmm_with_mkl_pinned():
    # reference_ra spells out the affine grid instead of calling bmm (MKL's bmm is
    # CPU-dependent). With MKL pinned to AVX2 before torch starts (a fresh process, so the pin
    # surely applies), torchvision's own bmm gives the same coordinates bit for bit.
    import os
    import subprocess
    import sys

    env = dict(os.environ, MKL_ENABLE_INSTRUCTIONS="AVX2")
    out = subprocess.run([sys.executable, "-c", _GRID_VS_BMM], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "0"


@pytest.mark.parametrize("op", range(len(RA_OPS)), ids=list(RA_OPS))
def test_pil_every_bin_larger_images(lib, op):
    # Pillow's own ops (the reference calls Pillow as torchvision's PIL path does) on images
    # large enough for the fixed-point affine's accumulated steps: every bin of 31, both signs
    for (h, w) in ((224, 224), (131, 97)):
        img = make_image(h, w, 3 + h + op, "photo")
        bins = range(-30, 31) if RA_OPS[op] in RA_SIGNED else range(31)
        for mag in bins:
            assert_same(apply_ra(img, [op], [mag], semantics="pil"),
                        run_cpp(lib, img, [op], [mag], semantics="pil"), f"{RA_OPS[op]} pil bin {mag} on {h}x{w}")


def test_pil_differs_from_the_tensor_ops(lib):
    # the point of the semantics: Pillow's resampling and blends are not torchvision's tensor ops
    img = make_image(131, 97, 1, "photo")
    differ = {RA_OPS[op] for op in range(len(RA_OPS)) for b in (-30, -17, -5, 9, 23)
              if not torch.equal(run_cpp(lib, img, [op], [b], semantics="pil"), run_cpp(lib, img, [op], [b]))}
    assert {"Rotate", "Color", "Contrast", "Sharpness", "AutoContrast"} <= differ, differ
    assert not differ & {"Identity", "Posterize", "Solarize", "Equalize"}
