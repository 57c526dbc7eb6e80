"""Replay of stored augmentation records on the GPU (Triton): crop -> antialiased bilinear
resize -> uint8 rounding -> flip -> /255 -> Normalize -> RandomErasing(0) -> MixUp -> CutMix,
from a batch of decoded uint8 images already on the device to a normalized [B, 3, h, w]
float32/float16 batch, in one launch.

Inputs: ``images`` [B, Hmax, Wmax, 3] uint8 (padded; image b occupies the top-left
``hw[b]`` = (h_b, w_b) corner) and one ``AUG_DTYPE`` record per image
(``fastload.sample.params``). The records' fields travel as one small int32 tensor [B, 18];
boxes are dequantized in the kernel with the library's integer rule
``dq(q, n) = (q * n + 32767) // 65535`` (int64 products), so the kernel crops exactly the
pixels the C++ path and the reference crop.

Semantics are those of ``fastload.replay.reference.render_reference`` (torchvision's uint8
tensor pipeline): ``F.interpolate(mode="bilinear", antialias=True, align_corners=False)``
(PyTorch's separable triangle filter with support ``max(scale, 1)``, weights normalized per
output pixel), rounded and clamped to uint8 before normalization. The two separable passes
are fused into one 2-D weighted sum per output pixel; float summation order differs from
PyTorch's, so a value within float error of a .5 rounding tie can land on the other uint8
level: outputs agree with the reference within 1 uint8 level (1/255/std after
normalization), nearly everywhere exactly. The MixUp partner is another row of ``images``
(``partner_rows[b]``; the caller maps the record's dataset index to a batch row) rendered
with its own crop and flip, no erasing.

Not supported here: RandAugment ops (records that carry any raise ValueError; replay them
with the C++ path), bicubic interpolation.

Grid: (B, cdiv(h*w, BLOCK)); program (b, t) renders BLOCK output pixels of image b, all
three channels, looping over the per-image tap window (2*ceil(support)+1 per axis).

Tested on CPU with ``TRITON_INTERPRET=1`` at small sizes. No GPU timing has been measured
(the session that wrote it had no GPU).

>>> import numpy as np, torch                                        # doctest: +SKIP
>>> from fastload.sample import params as P
>>> imgs = torch.randint(0, 256, (2, 40, 36, 3), dtype=torch.uint8, device="cuda")
>>> hw = torch.tensor([[40, 36], [32, 30]], device="cuda")
>>> out = torch.empty(2, 3, 16, 16, device="cuda")
>>> replay_batch(imgs, hw, P.empty(2), out).shape
torch.Size([2, 3, 16, 16])
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from fastload.sample import params as P

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Columns of the int32 parameter tensor [B, NPARAM].
_CROP, _FLAGS, _ERASE, _PCROP, _CUTMIX, _PROW = 0, 4, 5, 9, 13, 17
NPARAM = 18


@triton.jit
def _dq(q, n):
    # The library's dequantization rule, in int64 (q * n overflows int32).
    return ((q.to(tl.int64) * n.to(tl.int64) + 32767) // 65535).to(tl.int32)


@triton.jit
def _box(prm, col, h, w):
    """Quantized (top, left, height, width) at prm[col:col+4] -> integer box inside h x w."""
    bh = tl.minimum(tl.maximum(_dq(tl.load(prm + col + 2), h), 1), h)
    bw = tl.minimum(tl.maximum(_dq(tl.load(prm + col + 3), w), 1), w)
    top = tl.minimum(_dq(tl.load(prm + col + 0), h), h - bh)
    left = tl.minimum(_dq(tl.load(prm + col + 1), w), w - bw)
    return top, left, bh, bw


@triton.jit
def _axis(o, in_size, out_size):
    """PyTorch's antialiased bilinear index/weight setup for output indices o along one axis:
    returns (center, first tap, tap count, 1/scale or 1, total weight helper inputs)."""
    scale = in_size.to(tl.float32) / out_size.to(tl.float32)
    support = tl.where(scale >= 1.0, scale, 1.0)
    invscale = tl.where(scale >= 1.0, 1.0 / scale, 1.0)
    center = scale * (o.to(tl.float32) + 0.5)
    lo = tl.maximum((center - support + 0.5).to(tl.int32), 0)
    hi = tl.minimum((center + support + 0.5).to(tl.int32), in_size)
    return center, lo, hi - lo, invscale, support


@triton.jit
def _tri(k, lo, center, invscale, size):
    # triangle filter weight of tap k (0 outside the window)
    t = ((k + lo).to(tl.float32) - center + 0.5) * invscale
    wgt = tl.maximum(1.0 - tl.abs(t), 0.0)
    return tl.where(k < size, wgt, 0.0)


@triton.jit
def _taps(support):
    # 2 * ceil(support) + 1 (PyTorch's window bound)
    s_int = support.to(tl.int32)
    s_int = s_int + (s_int.to(tl.float32) < support).to(tl.int32)
    return 2 * s_int + 1


@triton.jit
def _render_u8(img_ptr, row_stride, top, left, bh, bw, oy, ox, out_h, out_w, flip, mask):
    """Crop (top, left, bh, bw) of one image resized to out_h x out_w at output pixels
    (oy, ox), flipped horizontally if flip: three float tensors holding uint8 levels."""
    ox_src = tl.where(flip != 0, out_w - 1 - ox, ox)
    cy, ly, sy, iy, supy = _axis(oy, bh, out_h)
    cx, lx, sx, ix, supx = _axis(ox_src, bw, out_w)
    KY = _taps(supy)  # scalars: one scale per image
    KX = _taps(supx)
    ty = tl.zeros_like(cy)
    for k in range(0, KY):
        ty += _tri(k, ly, cy, iy, sy)
    tx = tl.zeros_like(cx)
    for k in range(0, KX):
        tx += _tri(k, lx, cx, ix, sx)
    ty = tl.where(ty != 0.0, ty, 1.0)
    tx = tl.where(tx != 0.0, tx, 1.0)
    acc0 = tl.zeros_like(cy)
    acc1 = tl.zeros_like(cy)
    acc2 = tl.zeros_like(cy)
    for ky in range(0, KY):
        wy = _tri(ky, ly, cy, iy, sy) / ty
        row = (top + ly + ky).to(tl.int64) * row_stride
        my = mask & (ky < sy)
        for kx in range(0, KX):
            wx = _tri(kx, lx, cx, ix, sx) / tx
            m = my & (kx < sx)
            p = img_ptr + row + (left + lx + kx).to(tl.int64) * 3
            wgt = wy * wx
            acc0 += wgt * tl.load(p + 0, mask=m, other=0).to(tl.float32)
            acc1 += wgt * tl.load(p + 1, mask=m, other=0).to(tl.float32)
            acc2 += wgt * tl.load(p + 2, mask=m, other=0).to(tl.float32)
    # torchvision's uint8 resize: round, clamp
    acc0 = tl.minimum(tl.maximum(tl.floor(acc0 + 0.5), 0.0), 255.0)
    acc1 = tl.minimum(tl.maximum(tl.floor(acc1 + 0.5), 0.0), 255.0)
    acc2 = tl.minimum(tl.maximum(tl.floor(acc2 + 0.5), 0.0), 255.0)
    return acc0, acc1, acc2


@triton.jit
def _replay_kernel(img_ptr, hw_ptr, prm_ptr, lam_ptr, out_ptr,
                   m0, m1, m2, s0, s1, s2,
                   Hmax, Wmax, out_h, out_w,
                   NPARAM_C: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    t = tl.program_id(1)
    npix = out_h * out_w
    offs = t * BLOCK + tl.arange(0, BLOCK)
    mask = offs < npix
    oy = offs // out_w
    ox = offs % out_w
    prm = prm_ptr + b * NPARAM_C
    row_stride = Wmax * 3
    img_stride = Hmax.to(tl.int64) * row_stride

    h = tl.load(hw_ptr + 2 * b)
    w = tl.load(hw_ptr + 2 * b + 1)
    flags = tl.load(prm + 4)
    top, left, bh, bw = _box(prm, 0, h, w)
    base = img_ptr + b.to(tl.int64) * img_stride
    v0, v1, v2 = _render_u8(base, row_stride, top, left, bh, bw, oy, ox, out_h, out_w,
                            flags & 1, mask)
    x0 = (v0 / 255.0 - m0) / s0
    x1 = (v1 / 255.0 - m1) / s1
    x2 = (v2 / 255.0 - m2) / s2

    # RandomErasing(value=0) after Normalize
    if tl.load(prm + 8) != 0:
        et, el, eh, ew = _box(prm, 5, out_h, out_w)
        er = (oy >= et) & (oy < et + eh) & (ox >= el) & (ox < el + ew)
        x0 = tl.where(er, 0.0, x0)
        x1 = tl.where(er, 0.0, x1)
        x2 = tl.where(er, 0.0, x2)

    if (flags & 12) != 0:
        prow = tl.load(prm + 17)
        ph = tl.load(hw_ptr + 2 * prow)
        pw = tl.load(hw_ptr + 2 * prow + 1)
        pt, pl, pbh, pbw = _box(prm, 9, ph, pw)
        pbase = img_ptr + prow.to(tl.int64) * img_stride
        u0, u1, u2 = _render_u8(pbase, row_stride, pt, pl, pbh, pbw, oy, ox, out_h, out_w,
                                (flags >> 1) & 1, mask)
        p0 = (u0 / 255.0 - m0) / s0
        p1 = (u1 / 255.0 - m1) / s1
        p2 = (u2 / 255.0 - m2) / s2
        if (flags & 4) != 0:
            lam = tl.load(lam_ptr + 2 * b)
            oml = tl.load(lam_ptr + 2 * b + 1)
            x0 = lam * x0 + oml * p0
            x1 = lam * x1 + oml * p1
            x2 = lam * x2 + oml * p2
        if (flags & 8) != 0:
            ct, cl, ch, cw = _box(prm, 13, out_h, out_w)
            cm = (oy >= ct) & (oy < ct + ch) & (ox >= cl) & (ox < cl + cw)
            x0 = tl.where(cm, p0, x0)
            x1 = tl.where(cm, p1, x1)
            x2 = tl.where(cm, p2, x2)

    ob = out_ptr + b.to(tl.int64) * 3 * npix + offs
    ty = out_ptr.dtype.element_ty
    tl.store(ob, x0.to(ty), mask=mask)
    tl.store(ob + npix, x1.to(ty), mask=mask)
    tl.store(ob + 2 * npix, x2.to(ty), mask=mask)


def pack_params(params, partner_rows=None, device="cpu"):
    """AUG_DTYPE records [B] -> (int32 [B, 18] tensor, float32 [B, 2] MixUp (lam, 1 - lam)).

    The float pair is computed on the host in double and rounded once, as the reference
    (``lam * x + (1 - lam) * p`` with Python floats) does.
    """
    rec = np.asarray(params)
    if rec.dtype != P.AUG_DTYPE or rec.ndim != 1:
        raise ValueError(f"params: expected a 1-D array of fastload AUG_DTYPE records, got {rec.dtype} "
                         f"with shape {rec.shape}")
    B = rec.shape[0]
    if np.any(rec["ra_ops"] != P.RA_NONE):
        bad = int(np.nonzero(np.any(rec["ra_ops"] != P.RA_NONE, axis=1))[0][0])
        raise ValueError(f"params: record {bad} carries RandAugment ops, which the Triton replay "
                         "kernel does not implement; replay it with the C++ path")
    prm = np.zeros((B, NPARAM), dtype=np.int32)
    prm[:, _CROP:_CROP + 4] = rec["crop"]
    prm[:, _FLAGS] = rec["flags"]
    prm[:, _ERASE:_ERASE + 4] = rec["erase"]
    prm[:, _PCROP:_PCROP + 4] = rec["pcrop"]
    prm[:, _CUTMIX:_CUTMIX + 4] = rec["cutmix"]
    mixes = (rec["flags"] & (P.FLAG_MIXUP | P.FLAG_CUTMIX)) != 0
    if np.any(mixes):
        if partner_rows is None:
            raise ValueError("partner_rows: required when a record applies MixUp/CutMix "
                             "(the batch row of each record's partner image)")
        pr = np.asarray(torch.as_tensor(partner_rows).cpu(), dtype=np.int64).reshape(-1)
        if pr.shape[0] != B:
            raise ValueError(f"partner_rows: expected {B} entries, got {pr.shape[0]}")
        if np.any(mixes & ((pr < 0) | (pr >= B))):
            bad = int(np.nonzero(mixes & ((pr < 0) | (pr >= B)))[0][0])
            raise ValueError(f"partner_rows: record {bad} mixes but its partner row {int(pr[bad])} "
                             f"is outside [0, {B})")
        prm[:, _PROW] = np.where(mixes, pr, 0)
    lam = rec["mixup"].astype(np.float64) / P.Q
    lams = np.stack([lam.astype(np.float32), (1.0 - lam).astype(np.float32)], axis=1)
    return (torch.from_numpy(prm).to(device), torch.from_numpy(np.ascontiguousarray(lams)).to(device))


def replay_batch(images: torch.Tensor, hw: torch.Tensor, params, out: torch.Tensor,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 partner_rows: Optional[torch.Tensor] = None, block: int = 256) -> torch.Tensor:
    """Render ``params`` (AUG_DTYPE records, one per image) from ``images`` [B, Hmax, Wmax, 3]
    uint8 with true sizes ``hw`` [B, 2] into ``out`` [B, 3, h, w] (float32 or float16,
    same device) and return ``out``. See the module docstring for the semantics.

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
    B, Hmax, Wmax, _ = images.shape
    if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[0] != B or out.shape[1] != 3 \
            or out.dtype not in (torch.float32, torch.float16) or out.device != images.device:
        raise ValueError(f"out: expected a float32/float16 tensor [{B}, 3, h, w] on {images.device}")
    if not out.is_contiguous():
        raise ValueError("out: must be contiguous")
    hw_t = torch.as_tensor(hw).to(device=images.device, dtype=torch.int32).contiguous()
    if hw_t.shape != (B, 2):
        raise ValueError(f"hw: expected shape [{B}, 2], got {tuple(hw_t.shape)}")
    hw_cpu = hw_t.cpu()
    if bool(((hw_cpu[:, 0] < 1) | (hw_cpu[:, 0] > Hmax) | (hw_cpu[:, 1] < 1) | (hw_cpu[:, 1] > Wmax)).any()):
        raise ValueError(f"hw: every (h, w) must lie in [1, {Hmax}] x [1, {Wmax}]")
    if len(mean) != 3 or len(std) != 3 or any(float(s) == 0.0 for s in std):
        raise ValueError("mean/std: expected three values each, std non-zero")
    rec = np.asarray(params)
    if rec.shape != (B,):
        raise ValueError(f"params: expected {B} records, got shape {rec.shape}")
    prm, lams = pack_params(rec, partner_rows, images.device)
    out_h, out_w = int(out.shape[2]), int(out.shape[3])
    if out_h < 1 or out_w < 1:
        raise ValueError("out: output size must be positive")
    images = images.contiguous()
    grid = (B, triton.cdiv(out_h * out_w, block))
    _replay_kernel[grid](images, hw_t, prm, lams, out,
                         float(mean[0]), float(mean[1]), float(mean[2]),
                         float(std[0]), float(std[1]), float(std[2]),
                         Hmax, Wmax, out_h, out_w, NPARAM_C=NPARAM, BLOCK=block)
    return out
