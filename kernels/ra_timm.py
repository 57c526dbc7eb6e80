"""timm's RandAugment ops (``ra_semantics="timm"``: timm.data.auto_augment on PIL images) for
the Triton replay (kernels/replay.py launches them; the C++ implementation is
``ra_timm_apply_one`` in csrc/replay/ra_pil.cpp, whose comments give the arithmetic; the
Python reference is fastload.replay.reference_ra's ``apply_timm``, which calls Pillow).

timm's ops are Pillow calls, most of them the ones torchvision's RandAugment makes on PIL
images, so the host turns each record's op, level and draws into the kernel parameters of
kernels/ra_pil.py wherever the arithmetic is the same (:func:`pack`, in double as timm's
``*_level_to_arg``): AutoContrast, Equalize, Color, Contrast, Brightness, Sharpness (the
factor as Image.blend's float32 alpha) and their increasing variants, Posterize (a bit mask;
0 bits clear every bit, as Pillow < 11), Solarize (the integer threshold), Invert (Solarize
at 0). The statistics passes are ra_pil's ``_pil_stats_kernel`` / ``_pil_final_kernel``
unchanged, and :func:`_timm_apply_kernel` applies those ops with ra_pil's
``_pil_pixel_ops``. What is timm's own:

- SolarizeAdd: ``min(255, i + add)`` below 128 (``ip`` = add).
- Geometry (Rotate, ShearX/Y, TranslateXRel/YRel): Image.transform(AFFINE) / Image.rotate
  with BILINEAR or BICUBIC resampling (the record's draw) and timm's fill colour (a launch
  argument: the dataset's ``timm_fill``): Pillow's ImagingGenericTransform, in double: the
  source point ``a0 (x + .5) + a1 (y + .5) + a2`` (no FMA: the launch sets
  ``enable_fp_fusion=False``), outside [0, w) x [0, h) the fill, else shifted by -.5, floored,
  and filtered from clipped neighbours (bilinear_filter32RGB / bicubic_filter32RGB: rows
  below the image repeat the last filtered row, the result truncated, bicubic clipped to
  0..255). The six matrix entries travel as doubles (``rad``, a float64 view of the slot's
  16 float words). Image.rotate by 0 is a copy (Identity), by 180 (or 90/270 on a square
  image) a transpose: an integer index map (``ip`` bit TRANSPOSE, the map's coefficients in
  the same doubles).

Checked against the goldens of real timm in the interpreter
(tests/test_ra_golden_triton_timm.py).
"""
from __future__ import annotations

import math

import numpy as np
import triton
import triton.language as tl

from fastload.sample import schema as _schema

from ._slot import _slot_pixels, _tile

from .ra_pil import _pil_pixel_ops, _rotate_matrix, slot_rows

_OP = _schema.RA_OP_ID
NF = 16  # float32 words per slot (8 doubles: the geometric ops' matrix)
_NF = tl.constexpr(NF)
BICUBIC = 1  # ip bits of a geometric op: BICUBIC (else BILINEAR) ...
TRANSPOSE = 2  # ... and an integer index map (Image.rotate's transposes) instead of the filter
_BICUBIC, _TRANSPOSE = tl.constexpr(BICUBIC), tl.constexpr(TRANSPOSE)
_T_ROTATE, _T_SHEARX, _T_SHEARY, _T_TX, _T_TY, _T_SOLADD = (tl.constexpr(_OP["Timm" + k]) for k in (
    "Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "SolarizeAdd"))
_LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM
_N_TV = len(_schema.family_ops("pil"))  # the torchvision family's ids come first in the table


def _op_params(name: str, level: float, negate: bool, bicubic: bool, h: int, w: int):
    """(kernel op id, int parameter, float64[8]) of one timm op (timm's name without "Timm")
    at level ``level`` (the record's float32 level, as a double) with its draws, at h x w."""
    d = np.zeros(8, dtype=np.float64)
    sgn = (lambda v: -v if negate else v)
    t = level / _LEVEL_DENOM
    geo_ip = BICUBIC if bicubic else 0
    if name in ("AutoContrast", "Equalize"):
        return _OP[name], 0, d
    if name == "Invert":  # 255 - i everywhere: Solarize with threshold 0
        return _OP["Solarize"], 0, d
    if name in ("Posterize", "PosterizeIncreasing"):
        bits = int(t * 4)
        if name == "PosterizeIncreasing":
            bits = 4 - bits
        if bits >= 8:  # timm returns the image
            return _OP["Identity"], 0, d
        keep = max(bits, 0)  # 0 bits: every bit cleared (Pillow < 11; timm >= 11 raises)
        return _OP["Posterize"], (~((1 << (8 - keep)) - 1)) & 0xFF, d
    if name in ("Solarize", "SolarizeIncreasing"):
        thr = min(256, int(t * 256))
        if name == "SolarizeIncreasing":
            thr = 256 - thr
        return _OP["Solarize"], thr, d  # i < thr kept, the rest inverted
    if name == "SolarizeAdd":
        return _OP["TimmSolarizeAdd"], min(128, int(t * 110)), d
    for kind in ("Color", "Contrast", "Brightness", "Sharpness"):
        if name == kind:
            factor = t * 1.8 + 0.1
        elif name == kind + "Increasing":
            factor = max(0.1, 1.0 + sgn(t * .9))
        else:
            continue
        d.view(np.float32)[0] = np.float32(factor)  # Image.blend's float alpha (word 0)
        return _OP[kind], 0, d
    if name == "Rotate":
        angle = sgn(t * 30.) % 360.0  # Python's float %, as Image.rotate
        if angle == 0.0:  # a copy
            return _OP["Identity"], 0, d
        # transposes: source (xs, ys) = (c0 x + c1 y + c2, c3 x + c4 y + c5)
        if angle == 180.0:
            d[:6] = (-1, 0, w - 1, 0, -1, h - 1)
            return _OP["TimmRotate"], TRANSPOSE, d
        if angle in (90.0, 270.0) and w == h:
            d[:6] = (0, -1, w - 1, 1, 0, 0) if angle == 90.0 else (0, 1, 0, -1, 0, h - 1)
            return _OP["TimmRotate"], TRANSPOSE, d
        d[:6] = _rotate_matrix(angle, h, w)
        return _OP["TimmRotate"], geo_ip, d
    if name in ("ShearX", "ShearY"):
        f = sgn(t * 0.3)
        d[:6] = (1.0, f, 0.0, 0.0, 1.0, 0.0) if name == "ShearX" else (1.0, 0.0, 0.0, f, 1.0, 0.0)
        return _OP["Timm" + name], geo_ip, d
    if name in ("TranslateXRel", "TranslateYRel"):
        pct = sgn(t * 0.45)  # hparams' translate_pct default
        if name == "TranslateXRel":
            d[:6] = (1.0, 0.0, pct * w, 0.0, 1.0, 0.0)
        else:
            d[:6] = (1.0, 0.0, 0.0, 0.0, 1.0, pct * h)
        return _OP["Timm" + name], geo_ip, d
    raise ValueError(f"op: unknown timm RandAugment op {name!r}")


def pack(ops, mags, vals, use_vals, size, label=None):
    """(int32 [S, R, 2] (kernel op id, int parameter), float32 [S, R, NF]) for R rows of timm
    op ids (``ops`` [R, MAX_RA], RA_NONE skipped, used slots first, a row with fewer ops gets
    Identity), their draws (``mags``: sign = negation, |2| = BICUBIC) and float levels
    (``vals``, rows with ``use_vals``; a row with ops but no levels is refused, as the C++
    path refuses it). Validated as ``ra_timm_apply`` validates (timm ids, levels finite in
    [0, 100], draws +-1/+-2); ``label(r)`` names row r in errors."""
    label = label or (lambda r: f"record {r}")
    ops, mags, R, use_vals, used, S = slot_rows(ops, mags, use_vals)
    rai = np.zeros((S, R, 2), dtype=np.int32)
    rad = np.zeros((S, R, NF // 2), dtype=np.float64)
    h, w = (int(v) for v in size)
    n_ops = len(_schema.RA_OPS)
    for r in np.flatnonzero(used.any(axis=1)):
        k = 0
        for j in range(ops.shape[1]):
            o = int(ops[r, j])
            if o == _schema.RA_NONE:
                continue
            if not (_N_TV <= o < n_ops) or not _schema.RA_OPS[o].startswith("Timm"):
                raise ValueError(f"params: {label(r)} has RandAugment op id {o} at slot {j}, not a timm op "
                                 f"(valid: {_N_TV}..{n_ops - 1}, {_schema.RA_NONE})")
            if not use_vals[r]:
                raise ValueError(f"ext: {label(r)}: timm RandAugment records need their levels "
                                 "(extension records with ra_float)")
            lv = float(np.float32(vals[r, j]))
            if not (math.isfinite(lv) and 0.0 <= lv <= 100.0):
                raise ValueError(f"ext: {label(r)}: timm level {lv} at slot {j} outside [0, 100]")
            dr = int(mags[r, j])
            if dr not in (-2, -1, 1, 2):
                raise ValueError(f"params: {label(r)}: timm draw code {dr} at slot {j} is not +-1 or +-2")
            rai[k, r, 0], rai[k, r, 1], rad[k, r] = _op_params(_schema.RA_OPS[o][4:], lv, dr < 0, abs(dr) == 2, h, w)
            k += 1
    return rai, rad.view(np.float32)


@triton.jit
def _cubic(v1, v2, v3, v4, d):
    # Pillow's BICUBIC macro (a = -1) in double, its order of operations (on the integer
    # taps every intermediate is an exact integer, as Pillow's int arithmetic)
    p2 = -v1 + v3
    p3 = 2.0 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


@triton.jit
def _clip(v, n):
    return tl.minimum(tl.maximum(v, 0), n - 1)


@triton.jit
def _bilinear(p, w, r0, r1, has1, c0, c1, dx, dy, mask):
    a0 = tl.load(p + r0 * w + c0, mask=mask, other=0).to(tl.float64)
    a1 = tl.load(p + r0 * w + c1, mask=mask, other=0).to(tl.float64)
    v1 = a0 + (a1 - a0) * dx
    b0 = tl.load(p + r1 * w + c0, mask=mask & has1, other=0).to(tl.float64)
    b1 = tl.load(p + r1 * w + c1, mask=mask & has1, other=0).to(tl.float64)
    v2 = tl.where(has1, b0 + (b1 - b0) * dx, v1)
    v = v1 + (v2 - v1) * dy
    return v.to(tl.int32).to(tl.float32)  # (UINT8)v: truncation (v in [0, 255])


@triton.jit
def _cubic_row(p, w, r, c0, c1, c2, c3, dx, mask):
    return _cubic(tl.load(p + r * w + c0, mask=mask, other=0).to(tl.float64),
                  tl.load(p + r * w + c1, mask=mask, other=0).to(tl.float64),
                  tl.load(p + r * w + c2, mask=mask, other=0).to(tl.float64),
                  tl.load(p + r * w + c3, mask=mask, other=0).to(tl.float64), dx)


@triton.jit
def _bicubic(p, h, w, yi, c0, c1, c2, c3, dx, dy, mask):
    # rows yi-1 .. yi+2 (yi already lowered by one); the first clipped, a later one outside
    # the image repeats the row above it
    v0 = _cubic_row(p, w, _clip(yi, h), c0, c1, c2, c3, dx, mask)
    ok = (yi + 1 >= 0) & (yi + 1 < h)
    v1 = tl.where(ok, _cubic_row(p, w, _clip(yi + 1, h), c0, c1, c2, c3, dx, mask & ok), v0)
    ok = (yi + 2 >= 0) & (yi + 2 < h)
    v2 = tl.where(ok, _cubic_row(p, w, _clip(yi + 2, h), c0, c1, c2, c3, dx, mask & ok), v1)
    ok = (yi + 3 >= 0) & (yi + 3 < h)
    v3 = tl.where(ok, _cubic_row(p, w, _clip(yi + 3, h), c0, c1, c2, c3, dx, mask & ok), v2)
    r = _cubic(v0, v1, v2, v3, dy)
    return tl.where(r <= 0.0, 0.0, tl.where(r >= 255.0, 255.0, r.to(tl.int32).to(tl.float32)))


@triton.jit
def _filtered(base, npix, h, w, oy, ox, mask, dp, ip, fill0, fill1, fill2):
    """Image.transform(AFFINE, a, BILINEAR or BICUBIC, fillcolor) at output pixels (oy, ox):
    the float32 levels of the three channels."""
    a0 = tl.load(dp + 0)
    a1 = tl.load(dp + 1)
    a2 = tl.load(dp + 2)
    a3 = tl.load(dp + 3)
    a4 = tl.load(dp + 4)
    a5 = tl.load(dp + 5)
    xin = ox.to(tl.float64) + 0.5
    yin = oy.to(tl.float64) + 0.5
    xx = a0 * xin + a1 * yin + a2
    yy = a3 * xin + a4 * yin + a5
    inside = (xx >= 0.0) & (xx < w.to(tl.float64)) & (yy >= 0.0) & (yy < h.to(tl.float64))
    # (outside lanes get a harmless point: their value is the fill)
    xx = tl.where(inside, xx, 0.5) - 0.5
    yy = tl.where(inside, yy, 0.5) - 0.5
    xf = tl.floor(xx)
    yf = tl.floor(yy)
    dx = xx - xf
    dy = yy - yf
    xi = xf.to(tl.int32)
    yi = yf.to(tl.int32)
    m = mask & inside
    if (ip & _BICUBIC) != 0:
        c0 = _clip(xi - 1, w)
        c1 = _clip(xi, w)
        c2 = _clip(xi + 1, w)
        c3 = _clip(xi + 2, w)
        y0 = yi - 1
        x0 = _bicubic(base, h, w, y0, c0, c1, c2, c3, dx, dy, m)
        x1 = _bicubic(base + npix, h, w, y0, c0, c1, c2, c3, dx, dy, m)
        x2 = _bicubic(base + 2 * npix, h, w, y0, c0, c1, c2, c3, dx, dy, m)
    else:
        c0 = _clip(xi, w)
        c1 = _clip(xi + 1, w)
        r0 = _clip(yi, h)
        has1 = (yi + 1 >= 0) & (yi + 1 < h)
        r1 = _clip(yi + 1, h)
        x0 = _bilinear(base, w, r0, r1, has1, c0, c1, dx, dy, m)
        x1 = _bilinear(base + npix, w, r0, r1, has1, c0, c1, dx, dy, m)
        x2 = _bilinear(base + 2 * npix, w, r0, r1, has1, c0, c1, dx, dy, m)
    return tl.where(inside, x0, fill0), tl.where(inside, x1, fill1), tl.where(inside, x2, fill2)


@triton.jit(do_not_specialize=["h", "w"])
def _timm_apply_kernel(src_ptr, dst_ptr, rai_ptr, raf_ptr, rad_ptr, st_ptr, lut_ptr, h, w, fill0, fill1, fill2,
                       BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    """One RandAugment slot of timm ops, src -> dst ([R, 3, h, w] uint8): each image applies
    its own op. ``raf``/``rad``: the slot's parameters as float32 [R, NF] and the same
    memory as float64 [R, NF / 2]; ``fill0..2``: timm's fill colour (float levels)."""
    b, npix, offs, mask, oy, ox = _tile(h, w, BLOCK, ALIGN)
    op, ip, base, x0, x1, x2 = _slot_pixels(rai_ptr, src_ptr, b, npix, offs, mask)
    fp = raf_ptr + b * _NF
    dp = rad_ptr + b * (_NF // 2)
    if (op == _T_ROTATE) | (op == _T_SHEARX) | (op == _T_SHEARY) | (op == _T_TX) | (op == _T_TY):
        if (ip & _TRANSPOSE) != 0:  # an exact index map (integer coefficients)
            xs = tl.load(dp + 0).to(tl.int32) * ox + tl.load(dp + 1).to(tl.int32) * oy + tl.load(dp + 2).to(tl.int32)
            ys = tl.load(dp + 3).to(tl.int32) * ox + tl.load(dp + 4).to(tl.int32) * oy + tl.load(dp + 5).to(tl.int32)
            src = tl.where(mask, ys * w + xs, 0)
            x0 = tl.load(base + src, mask=mask, other=0).to(tl.float32)
            x1 = tl.load(base + npix + src, mask=mask, other=0).to(tl.float32)
            x2 = tl.load(base + 2 * npix + src, mask=mask, other=0).to(tl.float32)
        else:
            x0, x1, x2 = _filtered(base, npix, h, w, oy, ox, mask, dp, ip, fill0, fill1, fill2)
    elif op == _T_SOLADD:  # ip: the amount added below 128
        add = ip.to(tl.float32)
        x0 = tl.where(x0 < 128.0, tl.minimum(x0 + add, 255.0), x0)
        x1 = tl.where(x1 < 128.0, tl.minimum(x1 + add, 255.0), x1)
        x2 = tl.where(x2 < 128.0, tl.minimum(x2 + add, 255.0), x2)
    else:  # the ops Pillow computes as for the pil semantics (ids of ra_pil)
        x0, x1, x2 = _pil_pixel_ops(op, ip, fp, st_ptr, lut_ptr, b, base, npix, oy, ox, h, w, mask, x0, x1, x2)
    ob = dst_ptr + b.to(tl.int64) * 3 * npix + offs
    tl.store(ob, x0.to(tl.uint8), mask=mask)
    tl.store(ob + npix, x1.to(tl.uint8), mask=mask)
    tl.store(ob + 2 * npix, x2.to(tl.uint8), mask=mask)
