"""Replay of stored augmentation records on the GPU (Triton): crop -> antialiased bilinear
or bicubic resize -> uint8 rounding -> flip -> RandAugment ops -> /255 -> Normalize ->
RandomErasing(0) -> MixUp -> CutMix, from a batch of decoded uint8 images already on the
device to a normalized [B, 3, h, w] float32/float16 batch.

Inputs: ``images`` [B, Hmax, Wmax, 3] uint8 (padded; image b occupies the top-left
``hw[b]`` = (h_b, w_b) corner) and one ``AUG_DTYPE`` record per image
(``fastload.sample.params``), optionally with its schema-v2 extension record
(``AUG_EXT_DTYPE``, below). The records' fields travel as one small int32 tensor
[R, NPARAM] (the columns the schema lays out for the base and extension fields the kernels
read per pixel, then the partner's image row, its RandAugment row and the source row);
boxes are dequantized in the kernel with the library's integer rule
``schema.dq`` (``(q * n + DQ_ROUND) // Q``, int64 products), so the kernel crops exactly the
pixels the C++ path and the reference crop.

Semantics are those of ``fastload.replay.reference.render_reference`` (torchvision's uint8
tensor pipeline): ``F.interpolate(mode="bilinear"|"bicubic", antialias=True,
align_corners=False)`` (PyTorch's separable aa filters: triangle with support
``max(scale, 1)``, or Keys cubic, a = -0.5, with support ``2 max(scale, 1)``; weights
normalized per output pixel), rounded and clamped to uint8. The kernel sums the separable
passes per output pixel in its own float order, so a value within float error of a .5
rounding tie can land on the other uint8 level: outputs agree with the reference within 1
uint8 level (1/255/std after normalization), nearly everywhere exactly. The MixUp partner is
another row of ``images`` (``partner_rows[b]``; the caller maps the record's dataset index
to a batch row) rendered with its own crop and flip, no RandAugment and no erasing unless
its extension record gives it its own.

RandAugment (``fastload.replay.reference_ra``, torchvision's ops): all 14 ops in the
semantics ``ra_semantics`` = "v1" (``transforms.RandAugment``) or "v2"
(``transforms.v2.RandAugment``: grey level and blends with one FMA per ``add_(x, alpha)``
(explicit ``tl.fma``), Sharpness as ``x + (1-r)(blur - x)`` with the border untouched,
AutoContrast dividing by ``(max - min) * fl(1/255)``, Solarize's threshold
``255 * linspace(1, 0)``), or "pil" (torchvision's RandAugment on PIL images, Pillow's
arithmetic: the kernels of ``kernels/ra_pil.py``, launched per slot in place of the three
below; fixed-point and double geometry, float32 ``Image.blend``, ImageOps tables in double;
equal to the pil goldens of real Pillow in the interpreter, tests/test_ra_golden_triton_pil.py),
or "timm" (timm's RandAugment ops: ``kernels/ra_timm.py``'s apply kernel after ra_pil's
statistics passes; the levels and draws of the extension records, the geometric ops' fill
colour ``ra_fill``; Pillow's filtered affine transforms in double; equal to the goldens of
real timm in the interpreter, tests/test_ra_golden_triton_timm.py). Magnitudes come from
each op's table for ``ra_num_bins`` bins at the output size (computed on the host from the
records), or from the extension record's float magnitudes (timm: its levels). Photometric ops repeat torchvision's float32 arithmetic in the
same order (scalars rounded to float32 where torch rounds them) and integer reductions, so
they match the goldens of real torchvision exactly in the interpreter (both semantics,
tests/test_ra_golden_triton.py); for the GPU the RandAugment passes are compiled without
FMA contraction (``enable_fp_fusion=False``) and with IEEE division (``tl.div_rn``),
checked in the PTX compiled here for sm_90, but never run on a GPU.
Geometric ops (ShearX/Y, TranslateX/Y, Rotate; v1/v2) use the reference's inverse affine matrix,
nearest sampling (round half to even, as grid_sample) and fill 0; a source coordinate within
float error of a .5 tie may pick the neighbouring pixel.

Extension records (``ext``, schema v2, from imports): ``ra_float`` - the ops' magnitudes
are the stored floats (the value torchvision's _apply_op receives; translations in pixels of
``box_grid``, scaled to the output as the C++ path does); ``partner_aug`` - the partner gets
its own RandAugment (``pra_ops`` with bins or floats) and erase box (``perase``): such
partners become extra RandAugment rows after the B records (R = B + their count), rendered
from the partner's image and read back by the final pass; ``erase_black`` - erased pixels
take the normalized value of black instead of 0. ``cutmix_empty`` is informational.

Launches per batch (no host sync; every decision comes from the host-side records):

- no record has RandAugment ops: one fused launch (``_replay_kernel``);
- otherwise: ``_resize_u8_kernel`` renders the R RandAugment rows into a uint8 buffer; then per op
  slot (up to 4; each image applies its own op) an optional reduction launch
  ``_ra_stats_kernel`` (one program per image: grayscale mean for Contrast, per-channel
  min/max for AutoContrast, histogram -> LUT for Equalize; only when an image's op in that
  slot needs it) and an apply launch ``_ra_apply_kernel`` (src -> dst, ping-pong buffers);
  finally ``_replay_kernel`` reads the uint8 buffer, renders the partners and normalizes,
  erases and mixes.

Grid: (B, cdiv(h*w, BLOCK)); program (b, t) handles BLOCK output pixels of image b, all
three channels (the resize loops over the per-image tap window, 2*ceil(support)+1 per axis).

Tested on CPU with ``TRITON_INTERPRET=1`` at small sizes (tests/test_triton_replay.py: against the
reference and, for extension records, the C++ path; tests/test_ra_golden_triton.py). No
GPU timing has been measured; ``python benchmarks/triton_replay.py`` measures it on a GPU.

>>> import numpy as np, torch                                        # doctest: +SKIP
>>> from fastload.sample import params as P
>>> imgs = torch.randint(0, 256, (2, 40, 36, 3), dtype=torch.uint8, device="cuda")
>>> hw = torch.tensor([[40, 36], [32, 30]], device="cuda")
>>> out = torch.empty(2, 3, 16, 16, device="cuda")
>>> replay_batch(imgs, hw, P.empty(2), out).shape
torch.Size([2, 3, 16, 16])
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from fastload.sample import params as P
from fastload.sample import schema as _schema

from ._slot import _slot_pixels, _stats_tile, _tile
from . import ra_pil as _pil
from . import ra_timm as _timm
from .ra_pil import _pil_apply_kernel, _pil_final_kernel, _pil_stats_kernel  # (launched from here)
# torchvision's sharpness "degenerate" (3x3 kernel [[1,1,1],[1,5,1],[1,1,1]]/13, rounded, interior
# only) is Pillow's SMOOTH filter: one implementation
from .ra_pil import _smooth as _sharp_deg
from .ra_pil import _equalize_luts  # torchvision's uint8 equalize is ImageOps' rule
from .ra_timm import _timm_apply_kernel  # (launched from here)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Columns of the int32 parameter tensor [B, NPARAM]: the record fields the kernels read per
# pixel, laid out by the schema, then the partner's batch row. (Integer sizes are not
# specialized: a size of 1 would otherwise become a constexpr without .to().)
_COLS = _schema.device_columns(_schema.AUG)
_CROP, _FLAGS, _ERASE, _PCROP, _CUTMIX = (_COLS[k] for k in ("crop", "flags", "erase", "pcrop", "cutmix"))
_NAUG = max(_COLS.values()) + _schema.AUG.field(max(_COLS, key=_COLS.get)).count
# then the extension record's per-pixel fields (ext bits, the partner's erase box; zeros
# without extension records), laid out by the schema too
_XCOLS = {k: _NAUG + v for k, v in _schema.device_columns(
    _schema.AUG_EXT, skip=tuple(f.name for f in _schema.AUG_EXT.fields if f.name not in ("ext", "perase"))).items()}
_EXT, _PERASE = _XCOLS["ext"], _XCOLS["perase"]
# then three host-made columns: the partner's image row; the row of the RandAugment buffer
# holding the partner's own RandAugment'ed render (-1: none, render the partner here); the
# image row a RandAugment row is rendered from (its own row, or a partner's image)
_PROW = _PERASE + _schema.AUG_EXT.field("perase").count
_PMID, _SROW = _PROW + 1, _PROW + 2
NPARAM = _SROW + 1
# ... and as constexprs for the jitted code (which reads only constexpr globals)
_C_CROP, _C_FLAGS, _C_ERASE, _C_PCROP, _C_CUTMIX, _C_EXT, _C_PERASE, _C_PROW, _C_PMID, _C_SROW = (
    tl.constexpr(v) for v in (_CROP, _FLAGS, _ERASE, _PCROP, _CUTMIX, _EXT, _PERASE, _PROW, _PMID, _SROW))
_F_FLIP, _F_PFLIP, _F_MIXUP, _F_CUTMIX = (
    tl.constexpr(v) for v in (P.FLAG_FLIP, P.FLAG_PARTNER_FLIP, P.FLAG_MIXUP, P.FLAG_CUTMIX))
_X_BLACK = tl.constexpr(P.EXT_ERASE_BLACK)
# RandAugment arithmetic the kernels implement (ids of the schema's RA_SEMANTICS; passed to
# the kernels as the constexpr V2; pil: the kernels of kernels/ra_pil.py; timm: those of
# kernels/ra_timm.py with ra_pil's statistics passes)
SEMANTICS = ("v1", "v2", "pil", "timm")
_Q, _DQ_ROUND = tl.constexpr(_schema.Q), tl.constexpr(_schema.DQ_ROUND)
# RandAugment op ids from the schema's table (stored on disk)
_OP = _schema.RA_OP_ID
(_OP_SHEARX, _OP_ROTATE, _OP_BRIGHTNESS, _OP_COLOR, _OP_CONTRAST, _OP_SHARPNESS, _OP_POSTERIZE, _OP_SOLARIZE,
 _OP_AUTOCONTRAST, _OP_EQUALIZE) = (tl.constexpr(_OP[k]) for k in (
    "ShearX", "Rotate", "Brightness", "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast",
    "Equalize"))
# the geometric ops are tested as one id range
assert [_OP[k] for k in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")] == \
    list(range(_OP["ShearX"], _OP["Rotate"] + 1))


@triton.jit
def _dq(q, n):
    # The library's dequantization rule (schema.dq), in int64 (q * n overflows int32).
    return ((q.to(tl.int64) * n.to(tl.int64) + _DQ_ROUND) // _Q).to(tl.int32)


@triton.jit
def _box(prm, col, h, w):
    """Quantized (top, left, height, width) at prm[col:col+4] -> integer box inside h x w."""
    bh = tl.minimum(tl.maximum(_dq(tl.load(prm + col + 2), h), 1), h)
    bw = tl.minimum(tl.maximum(_dq(tl.load(prm + col + 3), w), 1), w)
    top = tl.minimum(_dq(tl.load(prm + col + 0), h), h - bh)
    left = tl.minimum(_dq(tl.load(prm + col + 1), w), w - bw)
    return top, left, bh, bw


@triton.jit
def _axis(o, off, flen, n_in, out_size, CUBIC: tl.constexpr):
    """PyTorch's antialiased index/weight setup (``_compute_indices_min_size_weights_aa``)
    for output indices o along one axis of a crop of (float) length ``flen`` starting at
    ``off`` inside a window of ``n_in`` pixels (an integer crop: off 0, flen = n_in; a crop
    of a DCT-downscaled decode: fractional, as the C++ path's ``compute_axis_weights``):
    returns (center, first tap, tap count, 1/scale or 1, support). The support is
    interp_size/2 * max(scale, 1): interp_size 2 (bilinear) or 4 (bicubic). Divisions are
    IEEE (``div_rn``), as on the CPU."""
    scale = tl.div_rn(flen, out_size.to(tl.float32))
    support = tl.where(scale >= 1.0, scale, 1.0)
    if CUBIC:
        support = support * 2.0
    invscale = tl.where(scale >= 1.0, tl.div_rn(1.0, scale), 1.0)
    center = off + scale * (o.to(tl.float32) + 0.5)
    lo = tl.maximum((center - support + 0.5).to(tl.int32), 0)
    hi = tl.minimum((center + support + 0.5).to(tl.int32), n_in)
    return center, lo, hi - lo, invscale, support


@triton.jit
def _filt(t, CUBIC: tl.constexpr):
    # PyTorch's aa filters: triangle, or Keys cubic convolution with a = -0.5
    x = tl.abs(t)
    if CUBIC:
        w1 = (1.5 * x - 2.5) * x * x + 1.0                      # ((a+2)x - (a+3)) x^2 + 1
        w2 = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0             # ((a x - 5a) x + 8a) x - 4a
        wgt = tl.where(x < 1.0, w1, tl.where(x < 2.0, w2, 0.0))
    else:
        wgt = tl.maximum(1.0 - x, 0.0)
    return wgt


@triton.jit
def _taps(support):
    # 2 * ceil(support) + 1 (PyTorch's window bound)
    s_int = support.to(tl.int32)
    s_int = s_int + (s_int.to(tl.float32) < support).to(tl.int32)
    return 2 * s_int + 1


@triton.jit
def _render_u8(img_ptr, row_stride, top, left, bh, bw, offy, fh, offx, fw, oy, ox, out_h, out_w,
               flip, mask, CUBIC: tl.constexpr, KXC: tl.constexpr):
    """Crop of one image resized to out_h x out_w at output pixels (oy, ox), flipped
    horizontally if flip: three float tensors holding uint8 levels. Taps lie in the window
    (top, left, bh, bw); the crop is (offy, offx) + (fh, fw) inside it (see _axis).

    Tap k of an axis has weight filt((k + lo - center + 0.5) * invscale) (PyTorch's
    ``_compute_indices_min_size_weights_aa``), normalized by the window's total. The sum is
    separable like PyTorch's two passes (a row sum over x, then weighted over y), with the x
    normalization applied once at the end. The x taps are a [pixels, KXC] tile: their
    weights are computed once per pixel (not once per y tap) and each y tap loads its row
    segment as one 2-D gather; windows wider than KXC taps (strong downscales) loop over
    further chunks of KXC, recomputing only those chunks' weights."""
    ox_src = tl.where(flip != 0, out_w - 1 - ox, ox)
    cy, ly, sy, iy, supy = _axis(oy, offy, fh, bh, out_h, CUBIC)
    cx, lx, sx, ix, supx = _axis(ox_src, offx, fw, bw, out_w, CUBIC)
    KY = _taps(supy)  # scalars: one scale per image
    KX = _taps(supx)
    oyf = ly.to(tl.float32) - cy + 0.5  # tap k sits at (k + oyf) * iy
    oxf = lx.to(tl.float32) - cx + 0.5
    ty = tl.zeros_like(cy)
    for k in range(0, KY):
        ty += tl.where(k < sy, _filt((k + oyf) * iy, CUBIC), 0.0)
    kk = tl.arange(0, KXC)
    xin = kk[None, :] < sx[:, None]
    wx0 = tl.where(xin, _filt((kk[None, :] + oxf[:, None]) * ix, CUBIC), 0.0)
    tx = tl.sum(wx0, axis=1)
    for k0 in range(KXC, KX, KXC):
        tx += tl.sum(tl.where((k0 + kk)[None, :] < sx[:, None],
                              _filt(((k0 + kk)[None, :] + oxf[:, None]) * ix, CUBIC), 0.0), axis=1)
    ty = tl.where(ty != 0.0, ty, 1.0)
    tx = tl.where(tx != 0.0, tx, 1.0)
    acc0 = tl.zeros_like(cy)
    acc1 = tl.zeros_like(cy)
    acc2 = tl.zeros_like(cy)
    col = img_ptr + (left + lx).to(tl.int64) * 3
    for ky in range(0, KY):
        wy = tl.div_rn(_filt((ky + oyf) * iy, CUBIC), ty)
        rp = col + (top + ly + ky).to(tl.int64) * row_stride
        my = mask & (ky < sy)
        # (taps outside the window load 0 and weigh 0)
        m = my[:, None] & xin
        p = rp[:, None] + kk[None, :] * 3
        r0 = tl.sum(wx0 * tl.load(p, mask=m, other=0).to(tl.float32), axis=1)
        r1 = tl.sum(wx0 * tl.load(p + 1, mask=m, other=0).to(tl.float32), axis=1)
        r2 = tl.sum(wx0 * tl.load(p + 2, mask=m, other=0).to(tl.float32), axis=1)
        for k0 in range(KXC, KX, KXC):
            xk = (k0 + kk)[None, :] < sx[:, None]
            wx = tl.where(xk, _filt(((k0 + kk)[None, :] + oxf[:, None]) * ix, CUBIC), 0.0)
            m = my[:, None] & xk
            p = rp[:, None] + (k0 + kk)[None, :] * 3
            r0 += tl.sum(wx * tl.load(p, mask=m, other=0).to(tl.float32), axis=1)
            r1 += tl.sum(wx * tl.load(p + 1, mask=m, other=0).to(tl.float32), axis=1)
            r2 += tl.sum(wx * tl.load(p + 2, mask=m, other=0).to(tl.float32), axis=1)
        acc0 += wy * r0
        acc1 += wy * r1
        acc2 += wy * r2
    # torchvision's uint8 resize: round, clamp
    acc0 = tl.minimum(tl.maximum(tl.floor(tl.div_rn(acc0, tx) + 0.5), 0.0), 255.0)
    acc1 = tl.minimum(tl.maximum(tl.floor(tl.div_rn(acc1, tx) + 0.5), 0.0), 255.0)
    acc2 = tl.minimum(tl.maximum(tl.floor(tl.div_rn(acc2, tx) + 0.5), 0.0), 255.0)
    return acc0, acc1, acc2


@triton.jit
def _crop_geom(prm, hw_ptr, frac_ptr, row, col, fcol, FRAC: tl.constexpr):
    """Tap window (top, left, h, w) and fractional crop (offy, fh, offx, fw) of image row
    ``row`` for the record box at prm[col:col+4]: the integer box of the record, or, with
    FRAC (regions of DCT-downscaled decodes), the whole stored region and the record's
    fractional crop inside it at frac[fcol:fcol+4]."""
    h = tl.load(hw_ptr + 2 * row)
    w = tl.load(hw_ptr + 2 * row + 1)
    if FRAC:
        top = h * 0
        left = h * 0
        bh = h
        bw = w
        offy = tl.load(frac_ptr + fcol)
        fh = tl.load(frac_ptr + fcol + 1)
        offx = tl.load(frac_ptr + fcol + 2)
        fw = tl.load(frac_ptr + fcol + 3)
    else:
        top, left, bh, bw = _box(prm, col, h, w)
        offy = 0.0
        offx = 0.0
        fh = bh.to(tl.float32)
        fw = bw.to(tl.float32)
    return top, left, bh, bw, offy, fh, offx, fw


@triton.jit
def _partner_u8(img_ptr, hw_ptr, prm, frac_ptr, row_stride, img_stride, oy, ox, out_h, out_w, flags, mask,
                CUBIC: tl.constexpr, FRAC: tl.constexpr, KXC: tl.constexpr):
    # the MixUp/CutMix partner (image row prm[PROW]) with its own crop and flip, no RandAugment
    prow = tl.load(prm + _C_PROW)
    pt, pl, pbh, pbw, poy, pfh, pox, pfw = _crop_geom(prm, hw_ptr, frac_ptr, prow, _C_PCROP, 4, FRAC)
    pbase = img_ptr + prow.to(tl.int64) * img_stride
    return _render_u8(pbase, row_stride, pt, pl, pbh, pbw, poy, pfh, pox, pfw, oy, ox,
                      out_h, out_w, (flags // _F_PFLIP) & 1, mask, CUBIC, KXC)


@triton.jit(do_not_specialize=["Hmax", "Wmax", "out_h", "out_w"])
def _replay_kernel(img_ptr, hw_ptr, prm_ptr, lam_ptr, frac_ptr, out_ptr, mid_ptr,
                   m0, m1, m2, s0, s1, s2,
                   Hmax, Wmax, out_h, out_w,
                   NPARAM_C: tl.constexpr, BLOCK: tl.constexpr, CUBIC: tl.constexpr,
                   FROM_U8: tl.constexpr, FRAC: tl.constexpr, KXC: tl.constexpr):
    b, npix, offs, mask, oy, ox = _tile(out_h, out_w, BLOCK)
    prm = prm_ptr + b * NPARAM_C
    row_stride = Wmax * 3
    img_stride = Hmax.to(tl.int64) * row_stride

    flags = tl.load(prm + _C_FLAGS)
    if FROM_U8:
        # the main image was rendered (and RandAugment'ed) into mid [B, 3, h, w] uint8
        mb = mid_ptr + b.to(tl.int64) * 3 * npix + offs
        v0 = tl.load(mb, mask=mask, other=0).to(tl.float32)
        v1 = tl.load(mb + npix, mask=mask, other=0).to(tl.float32)
        v2 = tl.load(mb + 2 * npix, mask=mask, other=0).to(tl.float32)
    else:
        top, left, bh, bw, offy, fh, offx, fw = _crop_geom(prm, hw_ptr, frac_ptr + b * 8, b, _C_CROP, 0,
                                                           FRAC)
        base = img_ptr + b.to(tl.int64) * img_stride
        v0, v1, v2 = _render_u8(base, row_stride, top, left, bh, bw, offy, fh, offx, fw, oy, ox,
                                out_h, out_w, flags & _F_FLIP, mask, CUBIC, KXC)
    x0 = tl.div_rn(tl.div_rn(v0, 255.0) - m0, s0)
    x1 = tl.div_rn(tl.div_rn(v1, 255.0) - m1, s1)
    x2 = tl.div_rn(tl.div_rn(v2, 255.0) - m2, s2)

    # RandomErasing after Normalize: value 0, or black (ext bit erase_black: the normalized
    # value of a 0 pixel, as the C++ path's erase_fill)
    black = (tl.load(prm + _C_EXT) & _X_BLACK) != 0
    if tl.load(prm + _C_ERASE + 3) != 0:  # width 0 = no erasing
        et, el, eh, ew = _box(prm, _C_ERASE, out_h, out_w)
        er = (oy >= et) & (oy < et + eh) & (ox >= el) & (ox < el + ew)
        x0 = tl.where(er, tl.where(black, tl.div_rn(x0 * 0.0 - m0, s0), 0.0), x0)
        x1 = tl.where(er, tl.where(black, tl.div_rn(x1 * 0.0 - m1, s1), 0.0), x1)
        x2 = tl.where(er, tl.where(black, tl.div_rn(x2 * 0.0 - m2, s2), 0.0), x2)

    if (flags & (_F_MIXUP | _F_CUTMIX)) != 0:
        if FROM_U8:
            pmid = tl.load(prm + _C_PMID)
            if pmid >= 0:  # the partner's own RandAugment (extension records) ran on row pmid
                pb = mid_ptr + pmid.to(tl.int64) * 3 * npix + offs
                u0 = tl.load(pb, mask=mask, other=0).to(tl.float32)
                u1 = tl.load(pb + npix, mask=mask, other=0).to(tl.float32)
                u2 = tl.load(pb + 2 * npix, mask=mask, other=0).to(tl.float32)
            else:
                u0, u1, u2 = _partner_u8(img_ptr, hw_ptr, prm, frac_ptr + b * 8, row_stride, img_stride, oy, ox,
                                         out_h, out_w, flags, mask, CUBIC, FRAC, KXC)
        else:
            u0, u1, u2 = _partner_u8(img_ptr, hw_ptr, prm, frac_ptr + b * 8, row_stride, img_stride, oy, ox,
                                     out_h, out_w, flags, mask, CUBIC, FRAC, KXC)
        p0 = tl.div_rn(tl.div_rn(u0, 255.0) - m0, s0)
        p1 = tl.div_rn(tl.div_rn(u1, 255.0) - m1, s1)
        p2 = tl.div_rn(tl.div_rn(u2, 255.0) - m2, s2)
        if tl.load(prm + _C_PERASE + 3) != 0:  # the partner's own erasing (the host zeroes it
            # unless the extension record's partner_aug bit is set)
            qt, ql, qh, qw = _box(prm, _C_PERASE, out_h, out_w)
            pr = (oy >= qt) & (oy < qt + qh) & (ox >= ql) & (ox < ql + qw)
            p0 = tl.where(pr, tl.where(black, tl.div_rn(p0 * 0.0 - m0, s0), 0.0), p0)
            p1 = tl.where(pr, tl.where(black, tl.div_rn(p1 * 0.0 - m1, s1), 0.0), p1)
            p2 = tl.where(pr, tl.where(black, tl.div_rn(p2 * 0.0 - m2, s2), 0.0), p2)
        if (flags & _F_MIXUP) != 0:
            lam = tl.load(lam_ptr + 2 * b)
            oml = tl.load(lam_ptr + 2 * b + 1)
            x0 = lam * x0 + oml * p0
            x1 = lam * x1 + oml * p1
            x2 = lam * x2 + oml * p2
        if (flags & _F_CUTMIX) != 0:
            ct, cl, ch, cw = _box(prm, _C_CUTMIX, out_h, out_w)
            cm = (oy >= ct) & (oy < ct + ch) & (ox >= cl) & (ox < cl + cw)
            x0 = tl.where(cm, p0, x0)
            x1 = tl.where(cm, p1, x1)
            x2 = tl.where(cm, p2, x2)

    ob = out_ptr + b.to(tl.int64) * 3 * npix + offs
    ty = out_ptr.dtype.element_ty
    tl.store(ob, x0.to(ty), mask=mask)
    tl.store(ob + npix, x1.to(ty), mask=mask)
    tl.store(ob + 2 * npix, x2.to(ty), mask=mask)


@triton.jit(do_not_specialize=["Hmax", "Wmax", "out_h", "out_w"])
def _resize_u8_kernel(img_ptr, hw_ptr, prm_ptr, frac_ptr, mid_ptr, Hmax, Wmax, out_h, out_w,
                      NPARAM_C: tl.constexpr, BLOCK: tl.constexpr, CUBIC: tl.constexpr,
                      FRAC: tl.constexpr, KXC: tl.constexpr, GATHER: tl.constexpr = False):
    """Pass 1 when RandAugment ops follow: crop -> resize -> round -> flip into mid
    [R, 3, h, w] uint8 (the images RandAugment sees): row b renders image row b, or with
    GATHER image row prm[b, SROW] (rows past the records: partners with their own
    RandAugment, whose crop and flip the host put in the row's crop and flags). (GATHER is a
    variant: a loaded row, unlike the program id, stays live in a register; the bicubic
    kernel then spills at the default block, so GATHER launches use half of it.)"""
    b, npix, offs, mask, oy, ox = _tile(out_h, out_w, BLOCK)
    prm = prm_ptr + b * NPARAM_C
    row_stride = Wmax * 3
    if GATHER:
        srow = tl.load(prm + _C_SROW)
    else:
        srow = b
    top, left, bh, bw, offy, fh, offx, fw = _crop_geom(prm, hw_ptr, frac_ptr + b * 8, srow, _C_CROP, 0, FRAC)
    base = img_ptr + srow.to(tl.int64) * (Hmax.to(tl.int64) * row_stride)
    v0, v1, v2 = _render_u8(base, row_stride, top, left, bh, bw, offy, fh, offx, fw, oy, ox,
                            out_h, out_w, tl.load(prm + _C_FLAGS) & _F_FLIP, mask, CUBIC, KXC)
    mb = mid_ptr + b.to(tl.int64) * 3 * npix + offs
    tl.store(mb, v0.to(tl.uint8), mask=mask)
    tl.store(mb + npix, v1.to(tl.uint8), mask=mask)
    tl.store(mb + 2 * npix, v2.to(tl.uint8), mask=mask)


# the ops that need the stats pass
_RA_CONTRAST, _RA_AUTOC, _RA_EQUAL = _OP["Contrast"], _OP["AutoContrast"], _OP["Equalize"]
_NSTAT = 8  # float32 stats per image: [gray mean, lo0, lo1, lo2, scale0, scale1, scale2, -]


@triton.jit
def _gray_u8(r, g, b):
    # torchvision's rgb_to_grayscale on uint8: float32 weighted sum, truncated
    return (0.2989 * r + 0.587 * g + 0.114 * b).to(tl.int32).to(tl.float32)


@triton.jit
def _gray_v2(r, g, b):
    # transforms.v2's grayscale: r * 0.2989, then two add_(x, alpha=w): one FMA each on the
    # CPU (measured, see randaugment.cpp), floored and kept in float
    return tl.floor(tl.fma(b, 0.114, tl.fma(g, 0.587, r * 0.2989)))


_NACC = 8 + 768  # int32 accumulators per image: [gray sum, 255-min x3, max x3, -, hist 3x256]
assert _pil.NACC == _NACC  # (the pil kernels share the buffer)


@triton.jit(do_not_specialize=["npix"])
def _ra_stats_kernel(src_ptr, rai_ptr, acc_ptr, npix, BLOCK: tl.constexpr, ALIGN: tl.constexpr,
                     V2: tl.constexpr):
    """Reduction pass of one RandAugment slot, one program per (image, tile of pixels):
    partial statistics of what that image's op needs, combined with integer atomics
    (order-independent: exact and deterministic) into zeroed accumulators. Contrast:
    grayscale sum; AutoContrast: per-channel max of 255 - x (the minimum) and max;
    Equalize: per-channel histograms."""
    b, op, npix, base, offs, m = _stats_tile(src_ptr, rai_ptr, npix, BLOCK, ALIGN)
    acc = acc_ptr + b * 776
    if op == _OP_CONTRAST:  # Contrast: torch.mean of the float32 grayscale (integer sum: exact)
        r = tl.load(base + offs, mask=m, other=0).to(tl.float32)
        g = tl.load(base + npix + offs, mask=m, other=0).to(tl.float32)
        bl = tl.load(base + 2 * npix + offs, mask=m, other=0).to(tl.float32)
        if V2:  # v2: the mean of the floored float grey levels (integers: the sum is exact)
            gr = _gray_v2(r, g, bl)
        else:
            gr = _gray_u8(r, g, bl)
        tl.atomic_add(acc, tl.sum(tl.where(m, gr.to(tl.int32), 0), axis=0))
    if op == _OP_AUTOCONTRAST:  # AutoContrast: per-channel min/max
        for c in tl.static_range(3):
            x = tl.load(base + c * npix + offs, mask=m, other=0).to(tl.int32)
            tl.atomic_max(acc + 1 + c, tl.max(tl.where(m, 255 - x, 0), axis=0))
            tl.atomic_max(acc + 4 + c, tl.max(tl.where(m, x, 0), axis=0))
    if op == _OP_EQUALIZE:  # Equalize: per-channel histograms (non-zero bins only)
        bins = tl.arange(0, 256)
        for c in tl.static_range(3):
            x = tl.load(base + c * npix + offs, mask=m, other=0).to(tl.int32)
            h = tl.histogram(x, 256, mask=m)
            tl.atomic_add(acc + 8 + c * 256 + bins, h, mask=h != 0)


@triton.jit(do_not_specialize=["npix"])
def _ra_final_kernel(rai_ptr, acc_ptr, st_ptr, lut_ptr, npix, V2: tl.constexpr):
    """Statistics -> what the apply pass reads, one program per image: Contrast's mean,
    AutoContrast's offset and scale (v2: divisor), Equalize's LUT (torchvision's
    _scale_channel)."""
    b = tl.program_id(0)
    op = tl.load(rai_ptr + 2 * b)
    acc = acc_ptr + b * 776
    if op == _OP_CONTRAST:
        tl.store(st_ptr + b * 8, tl.div_rn(tl.load(acc).to(tl.float32), npix * 1.0))
    if op == _OP_AUTOCONTRAST:
        for c in tl.static_range(3):
            lo_s = (255 - tl.load(acc + 1 + c)).to(tl.float32)
            d = tl.load(acc + 4 + c).to(tl.float32) - lo_s
            flat = d == 0.0
            # torch: 255 / t is t.reciprocal() * 255 (two float32 roundings); div_rn: IEEE
            # division on a GPU too (plain / compiles to the approximate div.full.f32)
            if V2:  # v2 divides by (max - min) * fl(1/255) (one float32 product)
                scale = d * 0.00392156862745098
            else:
                scale = tl.div_rn(1.0, tl.where(flat, 1.0, d)) * 255.0
            tl.store(st_ptr + b * 8 + 1 + c, tl.where(flat, 0.0, lo_s))
            tl.store(st_ptr + b * 8 + 4 + c, tl.where(flat, 1.0, scale))
    if op == _OP_EQUALIZE:
        _equalize_luts(acc + 8, lut_ptr + b * 768, npix)


@triton.jit
def _clamp_trunc(v):
    # .clamp(0, 255).to(uint8): truncation of a value in [0, 255]
    return tl.floor(tl.minimum(tl.maximum(v, 0.0), 255.0))


@triton.jit
def _blend(x, d, r, r1):
    # torchvision _blend: (ratio * img1 + (1 - ratio) * img2).clamp(0, 255) -> uint8 (trunc)
    return _clamp_trunc(r * x + r1 * d)


@triton.jit
def _blend_v2(x, d, r, r1):
    # transforms.v2's blend: x.mul(r).add_(d, alpha=1 - r): the product rounded, then one FMA
    return _clamp_trunc(tl.fma(d, r1, r * x))


@triton.jit
def _rint(v):
    # round half to even (std::nearbyint / Vec::round in grid_sample's nearest mode)
    f = tl.floor(v + 0.5)
    tie = (f - v) == 0.5
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where(tie & odd, f - 1.0, f)


@triton.jit(do_not_specialize=["h", "w"])
def _ra_apply_kernel(src_ptr, dst_ptr, rai_ptr, raf_ptr, st_ptr, lut_ptr, h, w,
                     BLOCK: tl.constexpr, ALIGN: tl.constexpr, V2: tl.constexpr):
    """Pointwise/gather pass of one RandAugment slot, src -> dst ([R, 3, h, w] uint8): each
    image applies its own op (id, int and float parameters per image). V2: the arithmetic
    of transforms.v2 where it differs from v1 (Color, Contrast, Sharpness, AutoContrast;
    Solarize differs only in its threshold table, made on the host)."""
    b, npix, offs, mask, oy, ox = _tile(h, w, BLOCK, ALIGN)
    op, ip, base, x0, x1, x2 = _slot_pixels(rai_ptr, src_ptr, b, npix, offs, mask)
    fp = raf_ptr + b * 8
    if (op >= _OP_SHEARX) & (op <= _OP_ROTATE):
        # geometric: torchvision's affine grid (centre-origin pixel coordinates times the
        # inverse matrix pre-divided by (w/2, h/2)), grid_sample nearest, zeros outside
        bx = ox.to(tl.float32) - (w * 0.5 - 0.5)
        by = oy.to(tl.float32) - (h * 0.5 - 0.5)
        gx = bx * tl.load(fp + 0) + by * tl.load(fp + 1) + tl.load(fp + 2)
        gy = bx * tl.load(fp + 3) + by * tl.load(fp + 4) + tl.load(fp + 5)
        ix = _rint((gx + 1.0) * (w * 0.5) - 0.5)
        iy = _rint((gy + 1.0) * (h * 0.5) - 0.5)
        valid = mask & (ix >= 0.0) & (ix <= w - 1.0) & (iy >= 0.0) & (iy <= h - 1.0)
        sx = tl.where(valid, ix, 0.0).to(tl.int32)
        sy = tl.where(valid, iy, 0.0).to(tl.int32)
        src = sy * w + sx
        x0 = tl.load(base + src, mask=valid, other=0).to(tl.float32)
        x1 = tl.load(base + npix + src, mask=valid, other=0).to(tl.float32)
        x2 = tl.load(base + 2 * npix + src, mask=valid, other=0).to(tl.float32)
    r = tl.load(fp + 0)
    r1 = tl.load(fp + 1)
    if op == _OP_BRIGHTNESS:  # Brightness: blend with black
        x0 = _blend(x0, 0.0, r, r1)
        x1 = _blend(x1, 0.0, r, r1)
        x2 = _blend(x2, 0.0, r, r1)
    if op == _OP_COLOR:  # Color: blend with the grayscale (v1: uint8; v2: floored float)
        if V2:
            g = _gray_v2(x0, x1, x2)
            x0 = _blend_v2(x0, g, r, r1)
            x1 = _blend_v2(x1, g, r, r1)
            x2 = _blend_v2(x2, g, r, r1)
        else:
            g = _gray_u8(x0, x1, x2)
            x0 = _blend(x0, g, r, r1)
            x1 = _blend(x1, g, r, r1)
            x2 = _blend(x2, g, r, r1)
    if op == _OP_CONTRAST:  # Contrast: blend with the grayscale mean (stats pass)
        mean = tl.load(st_ptr + b * 8)
        if V2:
            x0 = _blend_v2(x0, mean, r, r1)
            x1 = _blend_v2(x1, mean, r, r1)
            x2 = _blend_v2(x2, mean, r, r1)
        else:
            x0 = _blend(x0, mean, r, r1)
            x1 = _blend(x1, mean, r, r1)
            x2 = _blend(x2, mean, r, r1)
    if (op == _OP_SHARPNESS) & (h > 2) & (w > 2):  # Sharpness: blend with the 3x3-smoothed image
        if V2:  # x + (1 - r) * (blur - x), one FMA; the border (blur = x) stays as it is
            x0 = _clamp_trunc(tl.fma(_sharp_deg(base, oy, ox, h, w, mask, x0) - x0, r1, x0))
            x1 = _clamp_trunc(tl.fma(_sharp_deg(base + npix, oy, ox, h, w, mask, x1) - x1, r1, x1))
            x2 = _clamp_trunc(tl.fma(_sharp_deg(base + 2 * npix, oy, ox, h, w, mask, x2) - x2, r1, x2))
        else:
            x0 = _blend(x0, _sharp_deg(base, oy, ox, h, w, mask, x0), r, r1)
            x1 = _blend(x1, _sharp_deg(base + npix, oy, ox, h, w, mask, x1), r, r1)
            x2 = _blend(x2, _sharp_deg(base + 2 * npix, oy, ox, h, w, mask, x2), r, r1)
    if op == _OP_POSTERIZE:  # Posterize: keep the top bits (ip is the uint8 mask)
        x0 = (x0.to(tl.int32) & ip).to(tl.float32)
        x1 = (x1.to(tl.int32) & ip).to(tl.float32)
        x2 = (x2.to(tl.int32) & ip).to(tl.float32)
    if op == _OP_SOLARIZE:  # Solarize: invert at or above the float32 threshold
        x0 = tl.where(x0 >= r, 255.0 - x0, x0)
        x1 = tl.where(x1 >= r, 255.0 - x1, x1)
        x2 = tl.where(x2 >= r, 255.0 - x2, x2)
    if op == _OP_AUTOCONTRAST:  # AutoContrast: (x - lo) * scale per channel (stats pass)
        st = st_ptr + b * 8
        if V2:  # v2: (x - lo) / ((hi - lo) / 255), IEEE division
            x0 = _clamp_trunc(tl.div_rn(x0 - tl.load(st + 1), tl.load(st + 4)))
            x1 = _clamp_trunc(tl.div_rn(x1 - tl.load(st + 2), tl.load(st + 5)))
            x2 = _clamp_trunc(tl.div_rn(x2 - tl.load(st + 3), tl.load(st + 6)))
        else:
            x0 = _clamp_trunc((x0 - tl.load(st + 1)) * tl.load(st + 4))
            x1 = _clamp_trunc((x1 - tl.load(st + 2)) * tl.load(st + 5))
            x2 = _clamp_trunc((x2 - tl.load(st + 3)) * tl.load(st + 6))
    if op == _OP_EQUALIZE:  # Equalize: per-channel LUT (stats pass)
        lb = lut_ptr + b * 768
        x0 = tl.load(lb + x0.to(tl.int32), mask=mask, other=0).to(tl.float32)
        x1 = tl.load(lb + 256 + x1.to(tl.int32), mask=mask, other=0).to(tl.float32)
        x2 = tl.load(lb + 512 + x2.to(tl.int32), mask=mask, other=0).to(tl.float32)
    ob = dst_ptr + b.to(tl.int64) * 3 * npix + offs
    tl.store(ob, x0.to(tl.uint8), mask=mask)
    tl.store(ob + npix, x1.to(tl.uint8), mask=mask)
    tl.store(ob + 2 * npix, x2.to(tl.uint8), mask=mask)


def _as_records(params, B=None) -> np.ndarray:
    rec = np.asarray(params)
    if rec.dtype != P.AUG_DTYPE or rec.ndim != 1 or (B is not None and rec.shape[0] != B):
        want = "a 1-D array" if B is None else f"{B}"
        raise ValueError(f"params: expected {want} fastload AUG_DTYPE records, got {rec.dtype} "
                         f"with shape {rec.shape}")
    return rec


def _partner_rows(rec, partner_rows, n_rows=None) -> np.ndarray:
    B = rec.shape[0]
    n_rows = B if n_rows is None else n_rows
    mixes = (rec["flags"] & (P.FLAG_MIXUP | P.FLAG_CUTMIX)) != 0
    if not np.any(mixes):
        return np.zeros(B, dtype=np.int32)
    if partner_rows is None:
        raise ValueError("partner_rows: required when a record applies MixUp/CutMix "
                         "(the batch row of each record's partner image)")
    pr = np.asarray(torch.as_tensor(partner_rows).cpu(), dtype=np.int64).reshape(-1)
    if pr.shape[0] != B:
        raise ValueError(f"partner_rows: expected {B} entries, got {pr.shape[0]}")
    bad = mixes & ((pr < 0) | (pr >= n_rows))
    if np.any(bad):
        i = int(np.nonzero(bad)[0][0])
        raise ValueError(f"partner_rows: record {i} mixes but its partner row {int(pr[i])} "
                         f"is outside [0, {n_rows})")
    return np.where(mixes, pr, 0).astype(np.int32)


def _as_ext(ext, B):
    if ext is None:
        return None
    e = np.asarray(ext)
    if e.dtype != P.AUG_EXT_DTYPE or e.ndim != 1 or e.shape[0] != B:
        raise ValueError(f"ext: expected {B} fastload AUG_EXT_DTYPE extension records, got {e.dtype} "
                         f"with shape {e.shape}")
    return e


def _check_semantics(semantics: str) -> str:
    if semantics not in SEMANTICS:
        raise ValueError(f"ra_semantics: the Triton replay implements {SEMANTICS}, got {semantics!r}")
    return semantics


def _params_np(rec, partner_rows, n_rows=None, ext=None):
    B = rec.shape[0]
    prm = np.zeros((B, NPARAM), dtype=np.int32)
    prm[:, _CROP:_CROP + 4] = rec["crop"]
    prm[:, _FLAGS] = rec["flags"]
    prm[:, _ERASE:_ERASE + 4] = rec["erase"]
    prm[:, _PCROP:_PCROP + 4] = rec["pcrop"]
    prm[:, _CUTMIX:_CUTMIX + 4] = rec["cutmix"]
    prm[:, _PROW] = _partner_rows(rec, partner_rows, n_rows)
    prm[:, _PMID] = -1
    prm[:, _SROW] = np.arange(B)
    if ext is not None:
        prm[:, _EXT] = ext["ext"]
        # the partner's erase box counts only with the partner_aug bit (as the C++ path)
        paug = (ext["ext"] & P.EXT_PARTNER_AUG) != 0
        prm[:, _PERASE:_PERASE + 4] = np.where(paug[:, None], ext["perase"], 0)
    # (lam, 1 - lam) in double, rounded once, as the reference's Python floats
    lam = rec["mixup"].astype(np.float64) / P.Q
    lams = np.stack([lam.astype(np.float32), (1.0 - lam).astype(np.float32)], axis=1)
    return prm, lams


def _ra_rows(rec, ext, prm):
    """The RandAugment rows: the B records, then one row per mixing record whose extension
    record carries the partner's own RandAugment (partner_aug), rendered from the partner's
    image with the partner's crop and flip. Returns (prm [R, NPARAM] with the records' PMID
    set, ops, mags [R, MAX_RA], values [R, MAX_RA] float32 or None, use_values [R], the
    record behind each partner row)."""
    B = rec.shape[0]
    ops, mags = rec["ra_ops"], rec["ra_mags"]
    if ext is None:
        return prm, ops, mags, None, np.zeros(B, bool), np.zeros(0, np.int64)
    mixes = (rec["flags"] & (P.FLAG_MIXUP | P.FLAG_CUTMIX)) != 0
    paug = mixes & ((ext["ext"] & P.EXT_PARTNER_AUG) != 0) & (ext["pra_ops"] != P.RA_NONE).any(axis=1)
    pidx = np.flatnonzero(paug)
    extra = np.zeros((pidx.size, NPARAM), dtype=np.int32)
    extra[:, _CROP:_CROP + 4] = rec["pcrop"][pidx]
    extra[:, _FLAGS] = np.where((rec["flags"][pidx] & P.FLAG_PARTNER_FLIP) != 0, P.FLAG_FLIP, 0)
    extra[:, _PMID] = -1
    extra[:, _SROW] = prm[pidx, _PROW]
    prm = prm.copy()
    prm[pidx, _PMID] = B + np.arange(pidx.size)
    vals = (ext["ext"] & P.EXT_RA_FLOAT) != 0  # (both the record's and the partner's ops)
    return (np.concatenate([prm, extra]), np.concatenate([ops, ext["pra_ops"][pidx]]),
            np.concatenate([mags, ext["pra_mags"][pidx]]),
            np.concatenate([ext["ra_vals"], ext["pra_vals"][pidx]]).astype(np.float32),
            np.concatenate([vals, vals[pidx]]), pidx)


def pack_params(params, partner_rows=None, device="cpu"):
    """AUG_DTYPE records [B] -> (int32 [B, 18] tensor, float32 [B, 2] MixUp (lam, 1 - lam)).

    The float pair is computed on the host in double and rounded once, as the reference
    (``lam * x + (1 - lam) * p`` with Python floats) does. RandAugment ops are packed
    separately by :func:`pack_ra`; :func:`prepare_replay` packs everything in one upload.
    """
    prm, lams = _params_np(_as_records(params), partner_rows)
    return torch.from_numpy(prm).to(device), torch.from_numpy(lams).to(device)


def _op_params(name: str, mag: float, h: int, w: int):
    """One op's (int, float[8]) kernel parameters from its float magnitude, on the host in
    double then rounded to float32 where torch rounds (scalars meet float32 tensors)."""
    from fastload.replay.reference_ra import _inverse_affine

    f = np.zeros(8, dtype=np.float64)
    ip = 0
    if name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
        if name in ("ShearX", "ShearY"):
            deg = math.degrees(math.atan(mag))
            shear = [deg, 0.0] if name == "ShearX" else [0.0, deg]
            m = _inverse_affine([-w * 0.5, -h * 0.5], 0.0, [0.0, 0.0], shear)
        elif name == "Rotate":
            m = _inverse_affine([0.0, 0.0], -mag, [0.0, 0.0], [0.0, 0.0])
        else:
            t = [float(int(mag)), 0.0] if name == "TranslateX" else [0.0, float(int(mag))]
            m = _inverse_affine([0.0, 0.0], 0.0, t, [0.0, 0.0])
        # the reference's theta (float32) transposed and divided by (w/2, h/2) in float32
        th = np.asarray(m, dtype=np.float32).reshape(2, 3)
        sx, sy = np.float32(0.5 * w), np.float32(0.5 * h)
        f[:6] = [th[0, 0] / sx, th[0, 1] / sx, th[0, 2] / sx, th[1, 0] / sy, th[1, 1] / sy, th[1, 2] / sy]
        return ip, f.astype(np.float32)
    if name in ("Brightness", "Color", "Contrast", "Sharpness"):
        ratio = 1.0 + mag
        f[0], f[1] = np.float32(ratio), np.float32(1.0 - ratio)
    elif name == "Posterize":
        ip = (-int(2 ** (8 - int(mag)))) & 0xFF
    elif name == "Solarize":
        f[0] = np.float32(mag)
    return ip, f.astype(np.float32)


def _params_of(semantics: str):
    return _pil.op_params if semantics == "pil" else _op_params


@functools.lru_cache(maxsize=64)
def _ra_tables(num_bins: int, h: int, w: int, semantics: str = "v1"):
    """Every (op, signed bin) -> kernel parameters, once per (bins, output size, semantics):
    int32 [ops, 256], float32 [ops, 256, 8] and an invalid-bin mask, indexed by bin + 128
    (the records store bins as int8). Per batch, packing is then a table lookup. v2 differs
    from v1 only in Solarize's table: the threshold 255 * linspace(1, 0)[k] in double."""
    from fastload.replay.reference_ra import RA_SIGNED, magnitude_table

    n = len(_schema.family_ops(semantics))  # torchvision's ops (the kernel has no timm ops)
    ip = np.zeros((n, 256), dtype=np.int32)
    fp = np.zeros((n, 256, 8), dtype=np.float32)
    bad = np.zeros((n, 256), dtype=bool)
    for op, name in enumerate(P.RA_OPS[:n]):
        table = magnitude_table(name, num_bins, h, w, semantics)
        vals = None if table is None else [float(v) for v in table.tolist()]
        if vals is not None and name == "Solarize" and semantics == "v2":
            vals = [255.0 * v for v in vals]
        for b in range(-128, 128):
            if vals is None:
                mag = 0.0
            elif abs(b) >= num_bins:
                bad[op, b + 128] = True
                continue
            else:
                mag = -vals[abs(b)] if (name in RA_SIGNED and b < 0) else vals[abs(b)]
            ip[op, b + 128], fp[op, b + 128] = _params_of(semantics)(name, mag, h, w)
    return ip, fp, bad


def _ra_np(ops, mags, size, num_bins, semantics="v1", vals=None, use_vals=None, grid=None, label=None):
    """(int32 [S, R, 2] (op id, int parameter), float32 [S, R, 8]) for R rows of op ids and
    signed bins (``ops``, ``mags`` [R, MAX_RA]); RA_NONE slots skipped (as ``apply_ra``
    does); a row with fewer ops gets Identity (op 0) in the last slots. Rows with
    ``use_vals`` take their magnitudes from ``vals`` (the extension's float magnitudes, the
    value torchvision's _apply_op receives; translations in pixels of the box ``grid``,
    scaled to the output as the C++ path's ``randaugment_apply_values``) instead of bins.
    ``label(r)`` names row r in errors."""
    if int(num_bins) < 2:
        raise ValueError(f"ra_num_bins: must be >= 2, got {num_bins}")
    label = label or (lambda r: f"record {r}")
    if semantics == "timm":  # levels and draws, no bins (kernels/ra_timm.py)
        return _timm.pack(ops, mags, vals, use_vals, size, label)
    ops, mags, R, use_vals, used, S = _pil.slot_rows(ops, mags, use_vals)
    rai = np.zeros((S, R, 2), dtype=np.int32)
    raf = np.zeros((S, R, 8), dtype=np.float32)
    if S == 0:
        return rai, raf
    n_tv = len(_schema.family_ops(semantics))
    unknown = used & (ops >= n_tv)
    if unknown.any():
        b, k = (int(v[0]) for v in np.nonzero(unknown))
        raise ValueError(f"params: {label(b)} has RandAugment op id {int(ops[b, k])}, not one of torchvision's "
                         f"(valid: 0..{n_tv - 1}, {P.RA_NONE}; timm ops replay on the CPU path)")
    order = np.argsort(~used, axis=1, kind="stable")[:, :S]  # used slots first, in order
    o = np.take_along_axis(ops, order, 1)
    m = np.take_along_axis(mags, order, 1) + 128
    u = np.take_along_axis(used, order, 1)
    o = np.where(u, o, 0)
    m = np.where(u, m, 128)
    h, w = int(size[0]), int(size[1])
    ip_t, fp_t, bad_t = _ra_tables(int(num_bins), h, w, semantics)
    bad = bad_t[o, m] & ~use_vals[:, None]  # (float magnitudes have no bins)
    if bad.any():
        b, k = (int(v[0]) for v in np.nonzero(bad))
        raise ValueError(f"params: {label(b)}: mags: bin {int(m[b, k]) - 128} of op "
                         f"{P.RA_OPS[int(o[b, k])]} is outside [-{num_bins - 1}, {num_bins - 1}]")
    rai[:, :, 0] = o.T
    rai[:, :, 1] = ip_t[o, m].T
    raf[:] = fp_t[o, m].transpose(1, 0, 2)
    if use_vals.any():
        gh, gw = (h, w) if grid is None else (int(grid[0]) or h, int(grid[1]) or w)
        v = np.take_along_axis(np.asarray(vals, np.float32), order, 1)
        for b in np.flatnonzero(use_vals):
            for k in range(S):
                if not u[b, k]:
                    continue
                name = P.RA_OPS[int(o[b, k])]
                mag = float(v[b, k])
                if not math.isfinite(mag):
                    raise ValueError(f"ext: {label(b)}: non-finite RandAugment magnitude {mag} of op {name}")
                if name == "TranslateX":
                    mag = mag * w / gw
                elif name == "TranslateY":
                    mag = mag * h / gh
                elif name == "Posterize" and not 0 <= int(mag) <= 8:
                    raise ValueError(f"ext: {label(b)}: Posterize bits {int(mag)} outside [0, 8]")
                rai[k, b, 1], raf[k, b] = _params_of(semantics)(name, mag, h, w)
    return rai, raf


def pack_ra(params, size, num_bins: int = 31, device="cpu", ra_semantics: str = "v1"):
    """The records' RandAugment ops as per-slot kernel parameters: (int32 [S, B, 2] (op id,
    int parameter), float32 [S, B, 8]), S = the most ops any record carries (RA_NONE slots
    skipped, as ``apply_ra`` does; an image with fewer ops gets Identity). Magnitudes come
    from each op's table for ``num_bins`` bins at the output ``size`` (reference_ra) and
    ``ra_semantics``, tabulated once per (bins, size, semantics)."""
    rec = _as_records(params)
    rai, raf = _ra_np(rec["ra_ops"], rec["ra_mags"], size, num_bins, _check_semantics(ra_semantics))
    return torch.from_numpy(rai).to(device), torch.from_numpy(raf).to(device)


class _PinnedRing:
    """A few pinned host staging buffers per device; a slot is reused once the copy that
    read it has completed (its event), so one upload per batch never waits in practice."""

    def __init__(self, slots: int = 4):
        self.slots = [None] * slots
        self.next = 0

    def get(self, n: int, pin: bool):
        i = self.next
        self.next = (i + 1) % len(self.slots)
        slot = self.slots[i]
        if slot is not None and slot[1] is not None:
            slot[1].synchronize()  # long done in practice: 4 batches ago
        if slot is None or slot[0].numel() < n:
            slot = [torch.empty(max(n, 1 << 14), dtype=torch.int32, pin_memory=pin), None]
            self.slots[i] = slot
        return slot


_RINGS: dict = {}


def _upload(host_np: np.ndarray, device) -> torch.Tensor:
    """One host -> device copy of the packed int32 words (pinned and asynchronous on CUDA)."""
    device = torch.device(device)
    n = host_np.size
    if device.type != "cuda":
        return torch.from_numpy(host_np).to(device)
    ring = _RINGS.setdefault(str(device), _PinnedRing())
    slot = ring.get(n, pin=True)
    slot[0][:n].numpy()[:] = host_np
    dev = slot[0][:n].to(device, non_blocking=True)
    ev = torch.cuda.Event()
    ev.record()
    slot[1] = ev
    return dev


def _nfloat(semantics: str) -> int:
    """float32 words per RandAugment slot: timm's geometry needs six doubles."""
    return _timm.NF if semantics == "timm" else 8


def _pad4(n: int) -> int:
    return (n + 3) & ~3  # sections start on 16 bytes (the JIT specializes on alignment)


class ReplayPlan:
    """A batch's records packed for the kernels (:func:`prepare_replay`): one int32 device
    buffer holding hw, the per-row parameters, the MixUp pair and the RandAugment slots
    (float sections reinterpreted), plus the host-side launch decisions. B records; R >= B
    RandAugment rows (the records, then the partners with their own RandAugment)."""

    def __init__(self, B, size, cubic, num_bins, hw_np, rai_np, buf, frac: bool = False, R=None,
                 semantics: str = "v1", fill=None):
        S = rai_np.shape[0]
        R = B if R is None else R
        self.frac = bool(frac)
        self.B, self.R, self.size, self.cubic, self.num_bins, self.S = B, R, size, cubic, num_bins, S
        self.semantics = semantics
        self.fill = fill  # timm's fill colour (float levels), else None
        nf = _nfloat(semantics)
        self.hw_np = hw_np
        self.has_ra = S > 0
        self.needs_stats = tuple(bool(v) for v in
                                 np.isin(rai_np[:, :, 0], (_RA_CONTRAST, _RA_AUTOC, _RA_EQUAL)).any(axis=1))
        o = 0
        sec = {}
        N = hw_np.shape[0]
        for name, n in zip(("hw", "prm", "lams", "rai", "raf", "frac"), self.sections(N, B, R, S, frac, nf)):
            sec[name] = (o, n)
            o += _pad4(n)
        self.words = o
        self.buf = buf

        def view(name, shape, f32=False):
            a, n = sec[name]
            v = buf[a:a + n]
            return (v.view(torch.float32) if f32 else v).view(shape)

        self.hw = view("hw", (N, 2))
        self.frac_t = view("frac", (-1,), f32=True)
        self.prm = view("prm", (R, NPARAM))
        self.lams = view("lams", (B, 2), f32=True)
        self.rai = view("rai", (S, R, 2))
        self.raf = view("raf", (S, R, nf), f32=True)
        # timm: the same words as doubles (the section starts on 16 bytes: _pad4)
        self.rad = self.raf.view(torch.float64) if semantics == "timm" else None

    @staticmethod
    def sections(N, B, R, S, frac, nf=8):
        return (2 * N, NPARAM * R, 2 * B, 2 * S * R, nf * S * R, 8 * R if frac else 4)

    @staticmethod
    def layout(N, B, S, frac, R=None, nf=8):
        return sum(_pad4(n) for n in ReplayPlan.sections(N, B, B if R is None else R, S, frac, nf))


def prepare_replay(params, hw, size, partner_rows=None, device="cpu", interpolation: str = "bilinear",
                   ra_num_bins: int = 31, frac=None, ra_semantics: str = "v1", ext=None,
                   box_grid=None, ra_fill=None) -> ReplayPlan:
    """Host side of :func:`replay_batch`: validate and pack the records for output ``size``
    into one int32 buffer, uploaded once (from pinned memory, asynchronously, on CUDA).
    RandAugment magnitudes come from tables made once per (bins, size, semantics). Typically
    well under a millisecond for 256 records (``fastload bench --gpu`` measures it).

    ``hw`` has one row per image row of the batch (>= the records: partner images may
    follow the records' own). ``frac`` (float [B, 8], optional): each record's image and
    partner are stored regions of DCT-downscaled decodes and the crops are fractional
    inside them: (offy, fh, offx, fw) of the main crop, then of the partner crop, in
    region pixels (the C++ path's geometry); the records' integer boxes are then unused.
    ``ra_semantics``: "v1" or "v2" (torchvision's tensor RandAugment, transforms or
    transforms.v2), "pil" (its RandAugment on PIL images: Pillow's arithmetic) or "timm"
    (timm's RandAugment: the records' levels and draws in ``ext``, the geometric ops' fill
    colour ``ra_fill``, default ``reference_ra.TIMM_FILL``). ``ext``: schema-v2 extension records (``params.AUG_EXT_DTYPE``, one per
    record): float magnitudes (ext ``ra_float``; translations in pixels of ``box_grid``
    (h, w), default the output), black erasing, the partner's own RandAugment and erase box
    (``partner_aug``)."""
    rec = _as_records(params)
    B = rec.shape[0]
    ext = _as_ext(ext, B)
    semantics = _check_semantics(ra_semantics)
    fill = None
    if semantics == "timm":
        from fastload.replay.reference_ra import TIMM_FILL

        fill = tuple(TIMM_FILL if ra_fill is None else ra_fill)
        if len(fill) != 3 or not all(float(v).is_integer() and 0 <= v <= 255 for v in fill):
            raise ValueError(f"ra_fill must be 3 values in 0..255, got {ra_fill!r}")
        fill = tuple(float(v) for v in fill)
    h, w = (int(v) for v in size)
    if h < 1 or w < 1:
        raise ValueError(f"size: output size must be positive, got {tuple(size)}")
    if box_grid is not None and (len(box_grid) != 2 or min(int(v) for v in box_grid) < 0):
        raise ValueError(f"box_grid: expected (h, w) >= 0, got {box_grid!r}")
    cubic = _cubic(interpolation)
    hw_np = np.ascontiguousarray(np.asarray(torch.as_tensor(hw).cpu(), dtype=np.int32))
    if hw_np.ndim != 2 or hw_np.shape[1] != 2 or hw_np.shape[0] < B:
        raise ValueError(f"hw: expected shape [{B}, 2], got {tuple(hw_np.shape)}")
    prm, lams = _params_np(rec, partner_rows, hw_np.shape[0], ext)
    prm, ops, mags, vals, use_vals, pidx = _ra_rows(rec, ext, prm)
    R = prm.shape[0]

    def label(r):
        return f"record {r}" if r < B else f"record {int(pidx[r - B])} (its partner's RandAugment)"
    rai, raf = _ra_np(ops, mags, (h, w), ra_num_bins, semantics, vals, use_vals, box_grid, label)
    S = rai.shape[0]
    parts = [hw_np, prm, lams.view(np.int32), rai, raf.view(np.int32)]
    if frac is not None:
        fr = np.ascontiguousarray(np.asarray(frac, dtype=np.float32))
        if fr.shape != (B, 8):
            raise ValueError(f"frac: expected shape [{B}, 8], got {fr.shape}")
        if R > B:  # partner rows: the partner's fractional crop is their own crop
            extra = np.zeros((R - B, 8), np.float32)
            extra[:, :4] = fr[pidx, 4:]
            fr = np.concatenate([fr, extra])
        parts.append(fr.view(np.int32))
    host = np.zeros(ReplayPlan.layout(hw_np.shape[0], B, S, frac is not None, R, _nfloat(semantics)), dtype=np.int32)
    o = 0
    for arr in parts:
        host[o:o + arr.size] = arr.reshape(-1)
        o += _pad4(arr.size)
    return ReplayPlan(B, (h, w), cubic, int(ra_num_bins), hw_np, rai, _upload(host, device),
                      frac=frac is not None, R=R, semantics=semantics, fill=fill)


def _check_images(images, plan: ReplayPlan, block: int):
    if block < 16 or block & (block - 1):
        raise ValueError(f"block: must be a power of two >= 16, got {block}")
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 \
            or images.shape[3] != 3:
        raise ValueError("images: expected a uint8 tensor [B, Hmax, Wmax, 3]")
    B, Hmax, Wmax, _ = images.shape
    if B != plan.hw_np.shape[0]:
        raise ValueError(f"images: {B} images for {plan.hw_np.shape[0]} rows of hw")
    hw = plan.hw_np
    if B and ((hw[:, 0] < 1) | (hw[:, 0] > Hmax) | (hw[:, 1] < 1) | (hw[:, 1] > Wmax)).any():
        raise ValueError(f"hw: every (h, w) must lie in [1, {Hmax}] x [1, {Wmax}]")
    if images.device != plan.buf.device:
        raise ValueError(f"images: on {images.device}, records packed for {plan.buf.device}")
    return images.contiguous()


def _cubic(interpolation: str) -> bool:
    if interpolation not in ("bilinear", "bicubic"):
        raise ValueError(f"interpolation: expected 'bilinear' or 'bicubic', got {interpolation!r}")
    return interpolation == "bicubic"


_STATS_BLOCK = 1024


def _resize_block(block: int, kxc: int) -> int:
    """Output pixels per program of the resizing kernels: the [pixels, KXC] tap tile stays
    at <= 512 values (4 per thread at 4 warps) so that nothing spills (compile check)."""
    return max(16, min(block, 512 // kxc))


def _kx_chunk(wmax: int, out_w: int, cubic: bool) -> int:
    """x taps per chunk: enough for every crop of this batch's images (no crop is wider than
    the widest image) up to 16; wider windows loop over chunks."""
    support = max(wmax / max(out_w, 1), 1.0) * (2.0 if cubic else 1.0)
    return min(16, triton.next_power_of_2(2 * math.ceil(support) + 1))


def _launch_ra(images, plan: ReplayPlan, block: int):
    """Passes 1..: resize into a uint8 buffer, then per RandAugment slot (only when some
    image's op in that slot needs whole-image statistics) a parallel statistics launch over
    (image, pixel tile) and a per-image finalize launch, then the apply launch, ping-ponging
    two buffers. No host sync: every decision is made from the host-side records. Runs on
    the plan's R rows (the records, then partners with their own RandAugment)."""
    _, Hmax, Wmax, _ = images.shape
    B = plan.R
    h, w = plan.size
    dev = images.device
    v2 = plan.semantics == "v2"
    mid = torch.empty(B, 3, h, w, dtype=torch.uint8, device=dev)
    kxc = _kx_chunk(Wmax, w, plan.cubic)
    gather = plan.R > plan.B  # partner rows: their image row from the parameters
    rblock = max(16, _resize_block(block, kxc) // (2 if gather else 1))
    _resize_u8_kernel[(B, triton.cdiv(h * w, rblock))](
        images, plan.hw, plan.prm, plan.frac_t, mid, Hmax, Wmax, h, w, NPARAM_C=NPARAM,
        BLOCK=rblock, CUBIC=plan.cubic, FRAC=plan.frac, KXC=kxc, GATHER=gather, enable_fp_fusion=True)
    grid = (B, triton.cdiv(h * w, block))
    if plan.S == 0:
        return mid
    other = torch.empty_like(mid)
    st = torch.empty(B, _NSTAT, dtype=torch.float32, device=dev)
    lut = torch.empty(B, 3, 256, dtype=torch.int32, device=dev)
    acc = torch.empty(B, _NACC, dtype=torch.int32, device=dev) if any(plan.needs_stats) else None
    for s in range(plan.S):
        r_i, r_f = plan.rai[s], plan.raf[s]
        if plan.semantics in ("pil", "timm"):  # Pillow's arithmetic: kernels/ra_pil.py, ra_timm.py
            align = (h * w) % 16 == 0
            if plan.needs_stats[s]:
                acc.zero_()
                _pil_stats_kernel[(B, triton.cdiv(h * w, _STATS_BLOCK))](
                    mid, r_i, acc, h * w, BLOCK=_STATS_BLOCK, ALIGN=align, enable_fp_fusion=False)
                _pil_final_kernel[(B,)](r_i, acc, st, lut, h * w, enable_fp_fusion=False)
            # no FMA contraction: Image.blend rounds alpha * (x - d) before adding d (and
            # Pillow's filtered transforms round each double product)
            if plan.semantics == "timm":
                _timm_apply_kernel[grid](mid, other, r_i, r_f, plan.rad[s], st, lut, h, w, *plan.fill, BLOCK=block,
                                         ALIGN=align, enable_fp_fusion=False)
            else:
                _pil_apply_kernel[grid](mid, other, r_i, r_f, st, lut, h, w, BLOCK=block, ALIGN=align,
                                        enable_fp_fusion=False)
            mid, other = other, mid
            continue
        if plan.needs_stats[s]:
            acc.zero_()
            _ra_stats_kernel[(B, triton.cdiv(h * w, _STATS_BLOCK))](
                mid, r_i, acc, h * w, BLOCK=_STATS_BLOCK, ALIGN=(h * w) % 16 == 0, V2=v2,
                enable_fp_fusion=False)
            _ra_final_kernel[(B,)](r_i, acc, st, lut, h * w, V2=v2, enable_fp_fusion=False)
        # no FMA contraction: torchvision rounds ratio * x and (1 - ratio) * d separately,
        # and the result is truncated, so one fused rounding could move it by a level
        # (v2's own FMAs are explicit tl.fma calls)
        _ra_apply_kernel[grid](mid, other, r_i, r_f, st, lut, h, w, BLOCK=block,
                               ALIGN=(h * w) % 16 == 0, V2=v2, enable_fp_fusion=False)
        mid, other = other, mid
    return mid


def launch_replay(images: torch.Tensor, plan: ReplayPlan, out: torch.Tensor,
                  mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                  block: int = 256) -> torch.Tensor:
    """Device side of :func:`replay_batch`: the launches for a prepared plan (no host work
    but argument checks, no sync). Capturable in a CUDA graph with the plan's buffers."""
    images = _check_images(images, plan, block)
    _, Hmax, Wmax, _ = images.shape
    B = plan.B
    if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[0] != B or out.shape[1] != 3 \
            or out.dtype not in (torch.float32, torch.float16) or out.device != images.device:
        raise ValueError(f"out: expected a float32/float16 tensor [{B}, 3, h, w] on {images.device}")
    if not out.is_contiguous():
        raise ValueError("out: must be contiguous")
    if tuple(out.shape[2:]) != plan.size:
        raise ValueError(f"out: size {tuple(out.shape[2:])} but the records were packed for {plan.size}")
    if len(mean) != 3 or len(std) != 3 or any(float(s) == 0.0 for s in std):
        raise ValueError("mean/std: expected three values each, std non-zero")
    out_h, out_w = plan.size
    mid = _launch_ra(images, plan, block) if plan.has_ra else out
    kxc = _kx_chunk(Wmax, out_w, plan.cubic)
    rblock = _resize_block(block, kxc)
    grid = (B, triton.cdiv(out_h * out_w, rblock))
    _replay_kernel[grid](images, plan.hw, plan.prm, plan.lams, plan.frac_t, out, mid,
                         float(mean[0]), float(mean[1]), float(mean[2]),
                         float(std[0]), float(std[1]), float(std[2]),
                         Hmax, Wmax, out_h, out_w, NPARAM_C=NPARAM, BLOCK=rblock, CUBIC=plan.cubic,
                         FROM_U8=plan.has_ra, FRAC=plan.frac, KXC=kxc, enable_fp_fusion=True)
    return out


def render_uint8(images: torch.Tensor, hw: torch.Tensor, params, size, interpolation: str = "bilinear",
                 ra_num_bins: int = 31, block: int = 256, ra_semantics: str = "v1", ext=None,
                 box_grid=None, ra_fill=None) -> torch.Tensor:
    """The uint8 [B, 3, h, w] images before normalization: crop -> antialiased resize ->
    round -> flip -> RandAugment ops, as ``fastload.replay.reference.reference_uint8`` (for
    GPU-side normalization, or to inspect what the kernel renders). ``ext`` (extension
    records): their float magnitudes count; their partner fields do not (no mixing here).

    >>> import torch                                                  # doctest: +SKIP
    >>> from fastload.sample import params as P
    >>> imgs = torch.zeros(1, 8, 8, 3, dtype=torch.uint8, device="cuda")
    >>> render_uint8(imgs, torch.tensor([[8, 8]]), P.empty(1), (4, 4)).shape
    torch.Size([1, 3, 4, 4])
    """
    if not isinstance(images, torch.Tensor):
        raise ValueError("images: expected a uint8 tensor [B, Hmax, Wmax, 3]")
    if _mixes(params):  # the partners play no part in the uint8 render
        params = np.asarray(params).copy()
        params["flags"] &= np.uint8(~(P.FLAG_MIXUP | P.FLAG_CUTMIX) & 0xFF)
    plan = prepare_replay(params, hw, size, None, images.device, interpolation, ra_num_bins,
                          ra_semantics=ra_semantics, ext=ext, box_grid=box_grid, ra_fill=ra_fill)
    images = _check_images(images, plan, block)
    return _launch_ra(images, plan, block)


def _mixes(params) -> bool:
    rec = np.asarray(params)
    return rec.dtype == P.AUG_DTYPE and bool(np.any(rec["flags"] & (P.FLAG_MIXUP | P.FLAG_CUTMIX)))


def replay_batch(images: torch.Tensor, hw: torch.Tensor, params, out: torch.Tensor,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 partner_rows: Optional[torch.Tensor] = None, block: int = 256,
                 interpolation: str = "bilinear", ra_num_bins: int = 31, ra_semantics: str = "v1",
                 ext=None, box_grid=None, ra_fill=None) -> torch.Tensor:
    """Render ``params`` (AUG_DTYPE records, one per image) from ``images`` [B, Hmax, Wmax, 3]
    uint8 with true sizes ``hw`` [B, 2] into ``out`` [B, 3, h, w] (float32 or float16,
    same device) and return ``out``. See the module docstring for the semantics;
    :func:`prepare_replay` + :func:`launch_replay` split the host and device sides.

    ``interpolation``: "bilinear" or "bicubic" (both antialiased, as the reference);
    ``ra_num_bins``: RandAugment's ``num_magnitude_bins`` the records' bins refer to;
    ``ra_semantics``: "v1", "v2" (torchvision's transforms / transforms.v2 tensor ops), "pil"
    (Pillow's ops, kernels/ra_pil.py) or "timm" (timm's ops, kernels/ra_timm.py; ``ra_fill``
    their fill colour);
    ``ext``/``box_grid``: schema-v2 extension records and their grid (:func:`prepare_replay`);
    ``partner_rows``: batch row of each mixing record's partner; ``block``: output pixels
    per program (a power of two). ``hw`` and ``partner_rows`` are validated on the host:
    pass them as host tensors/arrays to keep the call free of device syncs.

    >>> import torch                                                  # doctest: +SKIP
    >>> from fastload.sample import params as P
    >>> imgs = torch.zeros(1, 8, 8, 3, dtype=torch.uint8, device="cuda")
    >>> out = torch.empty(1, 3, 4, 4, device="cuda")
    >>> replay_batch(imgs, torch.tensor([[8, 8]]), P.empty(1), out)[0, 0, 0, 0].item()
    -2.1179039478302
    """
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 \
            or images.shape[3] != 3:
        raise ValueError("images: expected a uint8 tensor [B, Hmax, Wmax, 3]")
    if not isinstance(out, torch.Tensor) or out.ndim != 4:
        raise ValueError(f"out: expected a float32/float16 tensor [B, 3, h, w] on {images.device}")
    if out.shape[2] < 1 or out.shape[3] < 1:
        raise ValueError("out: output size must be positive")
    plan = prepare_replay(params, hw, tuple(out.shape[2:]), partner_rows, images.device,
                          interpolation, ra_num_bins, ra_semantics=ra_semantics, ext=ext, box_grid=box_grid,
                          ra_fill=ra_fill)
    return launch_replay(images, plan, out, mean, std, block)
