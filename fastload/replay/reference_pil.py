"""Plain-NumPy reference of Pillow's ``Image.resize`` for uint8 RGB (libImaging Resample.c):
the readable specification the C++ ``resize="pil"`` path (csrc/replay/resize_pil.cpp) is
tested against, and the crop -> resize -> flip of ``AugmentPolicy(resize="pil")`` records.

Per axis, Pillow computes in double: ``scale = in / out``, ``filterscale = max(scale, 1)``,
``support = filter support * filterscale`` (bilinear 1, bicubic 2 with a = -0.5), and for
output ``i`` the centre ``(i + 0.5) * scale``, the taps ``[xmin, xmax)`` with ``xmin =
int(centre - support + 0.5)`` (truncation) clamped at 0 and ``xmax = int(centre + support +
0.5)`` clamped at ``in``, weights ``filter((x - centre + 0.5) / filterscale)`` divided by their
sum, then fixed point with 22 fractional bits, rounded half away from zero. A pass sums
``pixel * weight`` from ``2**21`` in integers and keeps ``sum >> 22`` clamped to 0..255: each
pass rounds to uint8. A pass runs only when its axis changes size; the horizontal pass runs
first, except (Pillow >= 13) when the height shrinks by more than twice as many pixels as the
width. NumPy's float64 arithmetic is IEEE double without fused multiply-adds, as Pillow's
baseline x86-64 build; every sum over taps runs tap by tap, in Pillow's order.
"""
from __future__ import annotations

import numpy as np

from ..sample import params as P

PRECISION_BITS = 22
_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}


def _filter(x: np.ndarray, interpolation: str) -> np.ndarray:
    x = np.abs(x)
    if interpolation == "bilinear":
        return np.where(x < 1.0, 1.0 - x, 0.0)
    a = -0.5  # Pillow's expressions, in its order: ((a + 2) x - (a + 3)) x x + 1 ...
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def pil_coeffs(in_size: int, out_size: int, interpolation: str = "bilinear"):
    """One axis: ``(start [out], count [out], k [out, ksize] int32)`` (Pillow's bounds and
    its normalized fixed-point coefficients for the box (0, in_size))."""
    if interpolation not in _SUPPORT:
        raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', got {interpolation!r}")
    in_size, out_size = int(in_size), int(out_size)
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"sizes must be positive, got in {in_size}, out {out_size}")
    scale = float(np.float32(in_size)) / out_size
    filterscale = max(scale, 1.0)
    support = _SUPPORT[interpolation] * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    inv = 1.0 / filterscale
    center = (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    w = np.zeros((out_size, ksize))
    ww = np.zeros(out_size)
    for j in range(ksize):  # tap by tap: Pillow's summation order
        live = j < xmax
        wj = _filter(((j + xmin) - center + 0.5) * inv, interpolation)
        w[:, j] = np.where(live, wj, 0.0)
        ww = np.where(live, ww + w[:, j], ww)
    w = np.where(ww[:, None] != 0.0, w / np.where(ww == 0.0, 1.0, ww)[:, None], w)
    one = float(1 << PRECISION_BITS)
    k = np.where(w < 0, np.trunc(-0.5 + w * one), np.trunc(0.5 + w * one)).astype(np.int32)
    k[np.arange(ksize)[None, :] >= xmax[:, None]] = 0
    return xmin, xmax, k


def _pass(img: np.ndarray, out_size: int, axis: int, interpolation: str) -> np.ndarray:
    """One of Pillow's passes along ``axis`` (0: vertical, 1: horizontal) of an [h, w, 3] uint8."""
    start, count, k = pil_coeffs(img.shape[axis], out_size, interpolation)
    x = np.moveaxis(img, axis, 0).astype(np.int64)
    acc = np.full((out_size,) + x.shape[1:], 1 << (PRECISION_BITS - 1), np.int64)
    for j in range(k.shape[1]):
        idx = np.minimum(start + j, x.shape[0] - 1)  # taps past count have weight 0
        acc += x[idx] * k[:, j].astype(np.int64).reshape((-1,) + (1,) * (x.ndim - 1))
    y = np.clip(acc >> PRECISION_BITS, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(y, 0, axis))


def pil_resize(img_hwc: np.ndarray, size, interpolation: str = "bilinear", pillow13: bool = True) -> np.ndarray:
    """``Image.fromarray(img).resize((w, h), BILINEAR | BICUBIC)`` as [h, w, 3] uint8
    (``pillow13=False``: Pillow <= 12's pass order)."""
    img = np.asarray(img_hwc)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be uint8 HWC with 3 channels, got {img.shape} {img.dtype}")
    oh, ow = (int(v) for v in size)
    H, W = img.shape[:2]
    need_h, need_v = ow != W, oh != H
    hfirst = not pillow13 or not (H - oh > 0 and H - oh > (W - ow) * 2)
    y = img
    if hfirst:
        if need_h:
            y = _pass(y, ow, 1, interpolation)
        if need_v:
            y = _pass(y, oh, 0, interpolation)
    else:
        if need_v:
            y = _pass(y, oh, 0, interpolation)
        if need_h:
            y = _pass(y, ow, 1, interpolation)
    return np.array(y, copy=True)


def crop_resize_flip_pil(img_u8_hwc, box_q, size, flip: bool, interpolation="bilinear",
                         pillow13: bool = True) -> np.ndarray:
    """Crop (quantized box, ``params.box_to_pixels``) -> Pillow resize -> optional horizontal
    flip, as torchvision's ``RandomResizedCrop`` + ``RandomHorizontalFlip`` on a PIL image:
    [3, h, w] uint8."""
    img = np.asarray(img_u8_hwc)
    t, l, bh, bw = P.box_to_pixels(np.asarray(box_q), img.shape[0], img.shape[1])
    y = pil_resize(img[t:t + bh, l:l + bw], size, interpolation, pillow13)
    if flip:
        y = y[:, ::-1]
    return np.ascontiguousarray(y.transpose(2, 0, 1))
