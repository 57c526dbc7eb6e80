"""RandAugment's 14 ops with Pillow's arithmetic (``ra_semantics="pil"``: torchvision's
RandAugment on PIL images) for the Triton replay (kernels/replay.py launches them; the C++
implementation is csrc/replay/ra_pil.cpp, whose comments say where Pillow uses double, fixed
point and integer rounding; the Python reference is fastload.replay.reference_ra's
``_apply_op_pil``, which calls Pillow).

Per RandAugment slot: ``_pil_stats_kernel`` (Contrast: the sum of Pillow's grey levels;
AutoContrast and Equalize: per-channel histograms; integer atomics, exact), then
``_pil_final_kernel`` (one program per image: Contrast's ``int(mean + 0.5)`` in double,
AutoContrast's and Equalize's ImageOps lookup tables, AutoContrast's in double), then
``_pil_apply_kernel`` (src -> dst, [R, 3, h, w] uint8). The host makes each op's parameters
(:func:`op_params`), in double as Pillow and torchvision do:

- geometry (ShearX/Y, TranslateX/Y, Rotate): Image.transform(AFFINE, NEAREST) with the matrix
  torchvision's F.affine builds, or Image.rotate's (cos/sin rounded to 15 decimals). Pillow
  samples a matrix with cross terms in 16.16 fixed point (the kernel repeats its integer
  sums, in int64: no overflow), one without (translations, shear 0, rotation by 0) through
  its "scale" path, double accumulation with COORD truncation; the host checks that those
  sums are exact (integral offsets, unit steps), so the kernel's ``a2 + 0.5 a0 + x a0`` in
  float64 is Pillow's running sum. Matrices whose corners leave Pillow's fixed-point range
  (images of 32768 px and more) are refused (Pillow accumulates them in double, in order).
  As ra_pil.cpp, a rotation by exactly 90/180/270 degrees (Pillow: a transpose) is sampled
  as any other angle; RandAugment's magnitudes (|angle| <= 30) never reach them.
- blends (Brightness, Color, Contrast, Sharpness): Image.blend in float32,
  ``d + alpha * (x - d)`` (no FMA: compiled with ``enable_fp_fusion=False``), truncated and
  clipped; grey ``(19595 r + 38470 g + 7471 b + 0x8000) >> 16``; Sharpness' degenerate is the
  SMOOTH filter, ``round(S / 13)``, the border kept.
- Posterize: a bit mask; Solarize: inverted at or above the integer ``ceil(threshold)``
  (``not i < threshold`` with an integer i).
"""
from __future__ import annotations

import math

import numpy as np
import triton
import triton.language as tl

from fastload.sample import schema as _schema

from ._slot import _slot_pixels, _stats_tile, _tile

_OP = _schema.RA_OP_ID
(_P_SHEARX, _P_ROTATE, _P_BRIGHTNESS, _P_COLOR, _P_CONTRAST, _P_SHARPNESS, _P_POSTERIZE, _P_SOLARIZE,
 _P_AUTOCONTRAST, _P_EQUALIZE) = (tl.constexpr(_OP[k]) for k in (
    "ShearX", "Rotate", "Brightness", "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast",
    "Equalize"))
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
# (the kernels test the geometric ops as one id range)
assert [_OP[k] for k in GEOMETRIC] == list(range(_OP["ShearX"], _OP["Rotate"] + 1))
SCALE_PATH = 1  # int parameter of a geometric op: Pillow's scale path (else 0: fixed point)
NACC = tl.constexpr(8 + 768)  # int32 accumulators per image: [grey sum, -x7, histograms 3x256]

_DEG2RAD = math.pi / 180.0  # CPython's math.radians factor (Py_MATH_PI / 180)
_RAD2DEG = 180.0 / math.pi


def slot_rows(ops, mags, use_vals):
    """The records' RandAugment columns as the packers read them: (ops int64 [R, MAX_RA], mags
    int64, R, use_vals bool [R], used = ops != RA_NONE, S = the most ops any row uses)."""
    ops = np.asarray(ops).astype(np.int64)
    mags = np.asarray(mags).astype(np.int64)
    R = ops.shape[0]
    use_vals = np.zeros(R, bool) if use_vals is None else np.asarray(use_vals, bool)
    used = ops != _schema.RA_NONE
    return ops, mags, R, use_vals, used, (int(used.sum(axis=1).max()) if R else 0)


def _tv_inverse_affine(cx, cy, angle, tx, ty, shx, shy):
    """torchvision's _get_inverse_affine_matrix(center, angle, translate, 1, shear) in
    double, the operations in ra_pil.cpp's (and torchvision's) order: the reference's."""
    from fastload.replay.reference_ra import _inverse_affine

    return _inverse_affine((cx, cy), angle, (tx, ty), (shx, shy))


def _rotate_matrix(angle, h, w):
    """Image.rotate's inverse matrix about the centre (cos/sin rounded as Python's round(, 15))."""
    cx, cy = w / 2.0, h / 2.0
    r = -(angle * _DEG2RAD)
    m = [round(math.cos(r), 15), round(math.sin(r), 15), 0.0, round(-math.sin(r), 15), round(math.cos(r), 15), 0.0]
    x, y = -cx, -cy
    m2 = m[0] * x + m[1] * y + m[2]
    m5 = m[3] * x + m[4] * y + m[5]
    m[2], m[5] = m2 + cx, m5 + cy
    return m


def _fix16(v: float) -> int:  # Pillow's FIX: (int)(v * 65536 + 0.5), floored below zero
    return math.floor(v * 65536.0 + 0.5)


def _affine_params(name, a, h, w):
    """(int parameter, float32[8]) of Image.transform(AFFINE, a, NEAREST) at h x w."""
    f = np.zeros(8, dtype=np.float32)
    if a[1] == 0 and a[3] == 0:  # ImagingScaleAffine: double running sums from a2 + 0.5 a0
        exact = a[0] == 1.0 and a[4] == 1.0 and float(a[2]).is_integer() and float(a[5]).is_integer() \
            and abs(a[2]) < 2 ** 24 and abs(a[5]) < 2 ** 24
        if not exact:  # (the kernel's closed form equals Pillow's running sum only then)
            raise ValueError(f"{name}: Pillow's scale-path matrix {a} is not a whole-pixel shift; "
                             "the Triton pil replay cannot repeat its running sum")
        f[:4] = (a[0], a[2], a[4], a[5])
        return SCALE_PATH, f
    for x, y in ((0, 0), (w, h), (0, h), (w, 0)):
        if not (abs(x * a[0] + y * a[1] + a[2]) < 32768.0 and abs(x * a[3] + y * a[4] + a[5]) < 32768.0):
            raise ValueError(f"{name}: output size {h}x{w} leaves Pillow's 16.16 fixed-point range; "
                             "render pil records this large on the CPU path")
    q = np.array([_fix16(a[0]), _fix16(a[1]), _fix16(a[2] + a[0] * 0.5 + a[1] * 0.5),
                  _fix16(a[3]), _fix16(a[4]), _fix16(a[5] + a[3] * 0.5 + a[4] * 0.5)], dtype=np.int32)
    f[:6] = q.view(np.float32)  # int32 bits; the kernel bitcasts them back
    return 0, f


def op_params(name: str, mag: float, h: int, w: int):
    """One op's (int, float32[8]) kernel parameters from its float magnitude (the value
    torchvision's _apply_op receives), at output size h x w."""
    f = np.zeros(8, dtype=np.float32)
    if name in ("ShearX", "ShearY"):
        deg = math.atan(mag) * _RAD2DEG
        a = _tv_inverse_affine(0.0, 0.0, 0.0, 0.0, 0.0, deg if name == "ShearX" else 0.0,
                               deg if name == "ShearY" else 0.0)
        return _affine_params(name, a, h, w)
    if name in ("TranslateX", "TranslateY"):
        t = float(int(mag))
        a = _tv_inverse_affine(w * 0.5, h * 0.5, 0.0, t if name == "TranslateX" else 0.0,
                               t if name == "TranslateY" else 0.0, 0.0, 0.0)
        return _affine_params(name, a, h, w)
    if name == "Rotate":
        angle = mag % 360.0  # Python's float %, as Pillow's rotate
        if angle == 0.0:  # Pillow returns a copy: the identity shift
            return _affine_params(name, [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], h, w)
        return _affine_params(name, _rotate_matrix(angle, h, w), h, w)
    ip = 0
    if name in ("Brightness", "Color", "Contrast", "Sharpness"):
        f[0] = np.float32(1.0 + mag)  # ImageEnhance's factor, Image.blend's float alpha
    elif name == "Posterize":
        bits = min(max(int(mag), 0), 8)
        ip = (~((1 << (8 - bits)) - 1)) & 0xFF
    elif name == "Solarize":  # invert unless i < threshold: i >= ceil(threshold)
        ip = int(min(max(math.ceil(mag), 0), 256))
    return ip, f


@triton.jit
def _grey(r, g, b):
    # Pillow's L conversion of RGB (int32 in, int32 out)
    return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16


@triton.jit(do_not_specialize=["npix"])
def _pil_stats_kernel(src_ptr, rai_ptr, acc_ptr, npix, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    """Partial statistics of one slot, per (image, pixel tile), into zeroed int32
    accumulators: Contrast the grey sum, AutoContrast and Equalize per-channel histograms."""
    b, op, npix, base, offs, m = _stats_tile(src_ptr, rai_ptr, npix, BLOCK, ALIGN)
    acc = acc_ptr + b * NACC
    if op == _P_CONTRAST:
        r = tl.load(base + offs, mask=m, other=0).to(tl.int32)
        g = tl.load(base + npix + offs, mask=m, other=0).to(tl.int32)
        bl = tl.load(base + 2 * npix + offs, mask=m, other=0).to(tl.int32)
        tl.atomic_add(acc, tl.sum(tl.where(m, _grey(r, g, bl), 0), axis=0))
    if (op == _P_AUTOCONTRAST) | (op == _P_EQUALIZE):
        bins = tl.arange(0, 256)
        for c in tl.static_range(3):
            x = tl.load(base + c * npix + offs, mask=m, other=0).to(tl.int32)
            hst = tl.histogram(x, 256, mask=m)
            tl.atomic_add(acc + 8 + c * 256 + bins, hst, mask=hst != 0)


@triton.jit
def _equalize_luts(hist_ptr, lut_ptr, npix):
    """Equalize's table per channel from its 256-bin histograms (ImageOps.equalize; torchvision's
    uint8 equalize is the same rule): step = (n - count of the top value) // 255, table
    (cumulative count before the bin + step // 2) // step clipped to 255 (Image.point clips
    it), identity where step is 0."""
    bins = tl.arange(0, 256)
    for c in tl.static_range(3):
        hist = tl.load(hist_ptr + c * 256 + bins)
        top = tl.max(tl.where(hist != 0, bins, 0), axis=0)
        step = (npix - tl.sum(tl.where(bins == top, hist, 0), axis=0)) // 255
        excl = tl.cumsum(hist, axis=0) - hist
        safe = tl.maximum(step, 1)
        lut = tl.minimum((excl + safe // 2) // safe, 255)
        tl.store(lut_ptr + c * 256 + bins, tl.where(step == 0, bins, lut))


@triton.jit(do_not_specialize=["npix"])
def _pil_final_kernel(rai_ptr, acc_ptr, st_ptr, lut_ptr, npix):
    """Statistics -> Contrast's grey mean int(sum / n + 0.5) (double), AutoContrast's table
    int(i * scale + offset) (double, scale = 255 / (hi - lo), clipped) and Equalize's
    (ImageOps': n // step from step // 2), one program per image."""
    b = tl.program_id(0)
    op = tl.load(rai_ptr + 2 * b)
    acc = acc_ptr + b * NACC
    if op == _P_CONTRAST:
        mean = (tl.load(acc).to(tl.float64) / npix.to(tl.float64) + 0.5).to(tl.int32)
        tl.store(st_ptr + b * 8, mean.to(tl.float32))
    if op == _P_AUTOCONTRAST:
        bins = tl.arange(0, 256)
        for c in tl.static_range(3):
            hist = tl.load(acc + 8 + c * 256 + bins)
            lo = tl.min(tl.where(hist != 0, bins, 256), axis=0)
            hi = tl.max(tl.where(hist != 0, bins, -1), axis=0)
            scale = 255.0 / tl.maximum(hi - lo, 1).to(tl.float64)
            offset = (-lo).to(tl.float64) * scale
            v = (bins.to(tl.float64) * scale + offset).to(tl.int32)  # int(): toward zero
            lut = tl.where(hi <= lo, bins, tl.minimum(tl.maximum(v, 0), 255))
            tl.store(lut_ptr + b * 768 + c * 256 + bins, lut)
    if op == _P_EQUALIZE:
        _equalize_luts(acc + 8, lut_ptr + b * 768, npix)


@triton.jit
def _pblend(x, d, alpha):
    # Image.blend(degenerate, image, alpha) in float32: d + alpha * (x - d), truncated, clipped
    return tl.floor(tl.minimum(tl.maximum(d + alpha * (x - d), 0.0), 255.0))


@triton.jit
def _smooth(ptr, oy, ox, h, w, m, x):
    # Pillow's SMOOTH (3x3, centre 5, / 13, rounded: S / 13 is never within 1/26 of a .5
    # tie); the border keeps its value
    inner = m & (oy >= 1) & (oy < h - 1) & (ox >= 1) & (ox < w - 1)
    s = tl.zeros_like(oy)
    for dy in tl.static_range(3):
        for dx in tl.static_range(3):
            s += tl.load(ptr + (oy + dy - 1) * w + (ox + dx - 1), mask=inner, other=0).to(tl.int32)
    s += 4 * x.to(tl.int32)
    return tl.where(inner, ((2 * s + 13) // 26).to(tl.float32), x)


@triton.jit
def _pil_pixel_ops(op, ip, fp, st_ptr, lut_ptr, b, base, npix, oy, ox, h, w, mask, x0, x1, x2):
    """The photometric ops on one tile of image b (float32 levels x0..x2 in, out): op id, int
    parameter ip, float parameters at fp (alpha first), the statistics and tables of the
    final pass; ``base`` the image (Sharpness reads the neighbours). Shared with the timm
    kernel (kernels/ra_timm.py), whose photometric ops are Pillow's same calls."""
    alpha = tl.load(fp + 0)
    if op == _P_BRIGHTNESS:  # blend with black
        x0 = _pblend(x0, 0.0, alpha)
        x1 = _pblend(x1, 0.0, alpha)
        x2 = _pblend(x2, 0.0, alpha)
    if op == _P_COLOR:  # blend with the L image
        g = _grey(x0.to(tl.int32), x1.to(tl.int32), x2.to(tl.int32)).to(tl.float32)
        x0 = _pblend(x0, g, alpha)
        x1 = _pblend(x1, g, alpha)
        x2 = _pblend(x2, g, alpha)
    if op == _P_CONTRAST:  # blend with the grey mean (stats pass)
        mean = tl.load(st_ptr + b * 8)
        x0 = _pblend(x0, mean, alpha)
        x1 = _pblend(x1, mean, alpha)
        x2 = _pblend(x2, mean, alpha)
    if op == _P_SHARPNESS:  # blend with the SMOOTH-filtered image
        x0 = _pblend(x0, _smooth(base, oy, ox, h, w, mask, x0), alpha)
        x1 = _pblend(x1, _smooth(base + npix, oy, ox, h, w, mask, x1), alpha)
        x2 = _pblend(x2, _smooth(base + 2 * npix, oy, ox, h, w, mask, x2), alpha)
    if op == _P_POSTERIZE:  # ip: the bit mask
        x0 = (x0.to(tl.int32) & ip).to(tl.float32)
        x1 = (x1.to(tl.int32) & ip).to(tl.float32)
        x2 = (x2.to(tl.int32) & ip).to(tl.float32)
    if op == _P_SOLARIZE:  # ip: the integer threshold
        thr = ip.to(tl.float32)
        x0 = tl.where(x0 >= thr, 255.0 - x0, x0)
        x1 = tl.where(x1 >= thr, 255.0 - x1, x1)
        x2 = tl.where(x2 >= thr, 255.0 - x2, x2)
    if (op == _P_AUTOCONTRAST) | (op == _P_EQUALIZE):  # per-channel tables (final pass)
        lb = lut_ptr + b * 768
        x0 = tl.load(lb + x0.to(tl.int32), mask=mask, other=0).to(tl.float32)
        x1 = tl.load(lb + 256 + x1.to(tl.int32), mask=mask, other=0).to(tl.float32)
        x2 = tl.load(lb + 512 + x2.to(tl.int32), mask=mask, other=0).to(tl.float32)
    return x0, x1, x2


@triton.jit(do_not_specialize=["h", "w"])
def _pil_apply_kernel(src_ptr, dst_ptr, rai_ptr, raf_ptr, st_ptr, lut_ptr, h, w,
                      BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    """One RandAugment slot with Pillow's arithmetic, src -> dst ([R, 3, h, w] uint8): each
    image applies its own op (id, int and float parameters per image)."""
    b, npix, offs, mask, oy, ox = _tile(h, w, BLOCK, ALIGN)
    op, ip, base, x0, x1, x2 = _slot_pixels(rai_ptr, src_ptr, b, npix, offs, mask)
    fp = raf_ptr + b * 8
    if (op >= _P_SHEARX) & (op <= _P_ROTATE):
        if ip == 1:  # scale path (SCALE_PATH): COORD(a2 + 0.5 a0 + x a0) in double (exact)
            a0 = tl.load(fp + 0).to(tl.float64)
            a4 = tl.load(fp + 2).to(tl.float64)
            xs = tl.load(fp + 1).to(tl.float64) + a0 * 0.5 + ox.to(tl.float64) * a0
            ys = tl.load(fp + 3).to(tl.float64) + a4 * 0.5 + oy.to(tl.float64) * a4
            xi = tl.where(xs < 0.0, -1, xs.to(tl.int64))
            yi = tl.where(ys < 0.0, -1, ys.to(tl.int64))
        else:  # 16.16 fixed point: (a2 + y a1 + x a0) >> 16, arithmetic shift (floor)
            q0 = tl.load(fp + 0).to(tl.int32, bitcast=True).to(tl.int64)
            q1 = tl.load(fp + 1).to(tl.int32, bitcast=True).to(tl.int64)
            q2 = tl.load(fp + 2).to(tl.int32, bitcast=True).to(tl.int64)
            q3 = tl.load(fp + 3).to(tl.int32, bitcast=True).to(tl.int64)
            q4 = tl.load(fp + 4).to(tl.int32, bitcast=True).to(tl.int64)
            q5 = tl.load(fp + 5).to(tl.int32, bitcast=True).to(tl.int64)
            xx = q2 + oy.to(tl.int64) * q1 + ox.to(tl.int64) * q0
            yy = q5 + oy.to(tl.int64) * q4 + ox.to(tl.int64) * q3
            xi = xx >> 16
            yi = yy >> 16
        valid = mask & (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        src = tl.where(valid, yi * w + xi, 0)
        x0 = tl.load(base + src, mask=valid, other=0).to(tl.float32)
        x1 = tl.load(base + npix + src, mask=valid, other=0).to(tl.float32)
        x2 = tl.load(base + 2 * npix + src, mask=valid, other=0).to(tl.float32)
    x0, x1, x2 = _pil_pixel_ops(op, ip, fp, st_ptr, lut_ptr, b, base, npix, oy, ox, h, w, mask, x0, x1, x2)
    ob = dst_ptr + b.to(tl.int64) * 3 * npix + offs
    tl.store(ob, x0.to(tl.uint8), mask=mask)
    tl.store(ob + npix, x1.to(tl.uint8), mask=mask)
    tl.store(ob + 2 * npix, x2.to(tl.uint8), mask=mask)

