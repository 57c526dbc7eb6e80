"""Plain-PyTorch reference of RandAugment's 14 ops on uint8 images, in torchvision's two
semantics: ``"v1"`` (``torchvision.transforms.RandAugment``) and ``"v2"``
(``torchvision.transforms.v2.RandAugment``).

This is the oracle the C++ kernel (``csrc/replay/randaugment.cpp``) and the Triton kernel are
tested against; both semantics are checked byte for byte against outputs of real torchvision
(tests/golden/ra_golden.npz, made by tests/golden/make_ra_golden.py). v1 follows
``RandAugment._augmentation_space`` / ``_apply_op`` and ``_functional_tensor``; v2 follows
``_AUGMENTATION_SPACE`` / ``_apply_image_or_video_transform`` and ``v2.functional``. They
differ on four ops, by a few levels (Solarize: whole pixels flip at one threshold):

- Color (and Contrast): v2 keeps the grey image in float (floored, not truncated from a
  float sum of separately rounded products) and blends as ``x*r + y*(1-r)`` with one fused
  multiply-add; v1 adds two rounded products;
- Sharpness: v2 blends the interior as ``x + (1-r)*(blur - x)``, v1 as ``r*x + (1-r)*blur``
  (v1 also passes the border through the blend, v2 leaves it untouched);
- AutoContrast: v2 divides by ``(max - min) / 255``, v1 multiplies by ``255 / (max - min)``;
- Solarize: v2's threshold is ``255 * linspace(1, 0)`` (v1: ``linspace(255, 0)``), which
  lands on the other side of an integer for some bins.

No torchvision import (it does not install beside every torch). Written for clarity, not speed.

Conventions (the stored record, ``fastload.sample.params``):

- ``ops[i]`` is an index into :data:`~fastload.sample.params.RA_OPS` (``RA_NONE`` = unused slot).
- ``mags[i]`` is a *signed bin index*: the value is ``table[abs(bin)]`` of the op's magnitude
  table for ``num_bins`` bins and the current image size, negated when ``bin < 0`` for the
  signed ops (torchvision draws that sign with ``torch.randint(2)``). Ops without a magnitude
  (Identity, AutoContrast, Equalize) ignore it.

Example::

    >>> import torch
    >>> from fastload.replay.reference_ra import apply_ra
    >>> img = torch.randint(0, 256, (3, 17, 23), dtype=torch.uint8)
    >>> out = apply_ra(img, ops=[5, 11], mags=[-9, 9])   # Rotate by -8.7 deg, Solarize
    >>> out.shape, out.dtype
    (torch.Size([3, 17, 23]), torch.uint8)
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from fastload.sample import schema as _S
from fastload.sample.params import RA_NONE, RA_OPS, RA_SIGNED

__all__ = ["apply_ra", "apply_op", "apply_timm", "timm_op", "magnitude_table", "magnitude_value", "SEMANTICS",
           "TIMM_FILL"]

SEMANTICS = ("v1", "v2", "pil")


def _check_semantics(semantics: str) -> str:
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics: expected one of {SEMANTICS}, got {semantics!r}")
    return semantics

_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma)


def magnitude_table(op: str, num_bins: int, h: int, w: int, semantics: str = "v1") -> torch.Tensor | None:
    """The op's magnitude table as torchvision's RandAugment builds it for an image of
    ``h x w`` (None for ops without a magnitude). v2's Solarize table is ``linspace(1, 0)``
    (a fraction of 255)."""
    if op == "Solarize" and _check_semantics(semantics) == "v2":  # "pil": v1's tables
        return torch.linspace(1.0, 0.0, num_bins)
    if op in ("ShearX", "ShearY"):
        return torch.linspace(0.0, 0.3, num_bins)
    if op == "TranslateX":
        return torch.linspace(0.0, 150.0 / 331.0 * w, num_bins)
    if op == "TranslateY":
        return torch.linspace(0.0, 150.0 / 331.0 * h, num_bins)
    if op == "Rotate":
        return torch.linspace(0.0, 30.0, num_bins)
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        return torch.linspace(0.0, 0.9, num_bins)
    if op == "Posterize":
        return 8 - (torch.arange(num_bins) / ((num_bins - 1) / 4)).round().int()
    if op == "Solarize":
        return torch.linspace(255.0, 0.0, num_bins)
    return None


def magnitude_value(op: str, mag_bin: int, num_bins: int, h: int, w: int, semantics: str = "v1") -> float:
    """Signed bin index -> the float magnitude torchvision passes to the op (v2's Solarize:
    the threshold ``255 * fraction``, in double, as v2 computes it before the op)."""
    table = magnitude_table(op, num_bins, h, w, semantics)
    if table is None:
        return 0.0
    k = abs(int(mag_bin))
    if k >= num_bins:
        raise ValueError(f"mags: bin {mag_bin} of op {op} is outside [-{num_bins - 1}, {num_bins - 1}]")
    value = float(table[k].item())
    if op == "Solarize" and semantics == "v2":
        value = 255.0 * value
    if op in RA_SIGNED and mag_bin < 0:
        value = -value
    return value


# ----------------------------------------------------------------------------- helpers


def _grayscale(img: torch.Tensor) -> torch.Tensor:
    """[3,H,W] uint8 -> [1,H,W] uint8: float32 weighted sum, truncated (torchvision)."""
    r, g, b = img.unbind(0)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).to(torch.uint8).unsqueeze(0)


def _blend(img1: torch.Tensor, img2: torch.Tensor, ratio: float) -> torch.Tensor:
    """ratio*img1 + (1-ratio)*img2 in float32, clamped to [0, 255] and truncated to uint8."""
    ratio = float(ratio)
    return (ratio * img1 + (1.0 - ratio) * img2).clamp(0, 255).to(torch.uint8)


def _inverse_affine(center, angle, translate, shear) -> list[float]:
    """Inverse of T * C * RSS * C^-1 (scale 1), in double, as torchvision's
    ``_get_inverse_affine_matrix``: maps output coordinates (origin at the image centre) to
    input coordinates."""
    rot = math.radians(angle)
    sx, sy = math.radians(shear[0]), math.radians(shear[1])
    cx, cy = center
    tx, ty = translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    m = [d, -b, 0.0, -c, a, 0.0]
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty)
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty)
    m[2] += cx
    m[5] += cy
    return m


def _warp_nearest(img: torch.Tensor, matrix: list[float]) -> torch.Tensor:
    """Resample with the inverse affine ``matrix`` (centre-origin pixel units), nearest
    neighbour, zeros outside: torchvision's tensor affine (grid + grid_sample)."""
    _, h, w = img.shape
    theta = torch.tensor(matrix, dtype=torch.float32).reshape(1, 2, 3)
    base = torch.empty(1, h, w, 3, dtype=torch.float32)
    base[..., 0].copy_(torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, steps=w))
    base[..., 1].copy_(torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, steps=h).unsqueeze(-1))
    base[..., 2].fill_(1.0)
    scaled = theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h], dtype=torch.float32)
    # torchvision computes ``base.view(1, h*w, 3).bmm(scaled)``. That bmm is CPU-dependent:
    # MKL picks another kernel on AVX-512 hosts, whose rounding moves some coordinates across
    # pixel-centre ties (torchvision itself gives different pixels there). The reference
    # spells out the sum in the order MKL's AVX2 kernel produces, fl(fl(fl(x*r0) + fl(y*r1))
    # + r2), with elementwise float32 ops (no contraction, same on every CPU): torchvision's
    # result with MKL pinned to AVX2 (MKL_ENABLE_INSTRUCTIONS=AVX2), which is what fastload
    # replays. See docs/guide/fidelity.md.
    x, y = base[0, :, :, 0], base[0, :, :, 1]
    cols = [x.mul(scaled[0, 0, j]).add(y.mul(scaled[0, 1, j])).add(scaled[0, 2, j]) for j in (0, 1)]
    grid = torch.stack(cols, dim=-1).unsqueeze(0)
    out = F.grid_sample(img.unsqueeze(0).to(torch.float32), grid, mode="nearest",
                        padding_mode="zeros", align_corners=False)
    return out.squeeze(0).round().to(torch.uint8)


def _shear(img: torch.Tensor, mag: float, axis: int) -> torch.Tensor:
    _, h, w = img.shape
    deg = math.degrees(math.atan(mag))
    shear = [deg, 0.0] if axis == 0 else [0.0, deg]
    # torchvision shears about the top-left corner: center=[0, 0] in pixel coordinates,
    # i.e. (-w/2, -h/2) relative to the image centre.
    center = [0.0 - w * 0.5, 0.0 - h * 0.5]
    return _warp_nearest(img, _inverse_affine(center, 0.0, [0.0, 0.0], shear))


def _translate(img: torch.Tensor, tx: int, ty: int) -> torch.Tensor:
    return _warp_nearest(img, _inverse_affine([0.0, 0.0], 0.0, [float(tx), float(ty)], [0.0, 0.0]))


def _rotate(img: torch.Tensor, angle: float) -> torch.Tensor:
    # F.rotate passes -angle to the matrix (counter-clockwise for positive angles).
    return _warp_nearest(img, _inverse_affine([0.0, 0.0], -angle, [0.0, 0.0], [0.0, 0.0]))


def _sharpness(img: torch.Tensor, factor: float) -> torch.Tensor:
    _, h, w = img.shape
    if h <= 2 or w <= 2:
        return img
    kernel = torch.ones((3, 3), dtype=torch.float32)
    kernel[1, 1] = 5.0
    kernel /= kernel.sum()
    kernel = kernel.expand(3, 1, 3, 3)
    blurred = F.conv2d(img.unsqueeze(0).to(torch.float32), kernel, groups=3)
    blurred = blurred.squeeze(0).round().to(torch.uint8)
    degenerate = img.clone()
    degenerate[:, 1:-1, 1:-1] = blurred  # border pixels keep their value
    return _blend(img, degenerate, factor)


def _autocontrast(img: torch.Tensor) -> torch.Tensor:
    lo = img.amin(dim=(-2, -1), keepdim=True).to(torch.float32)
    hi = img.amax(dim=(-2, -1), keepdim=True).to(torch.float32)
    scale = 255 / (hi - lo)
    flat = ~torch.isfinite(scale)
    lo[flat] = 0
    scale[flat] = 1
    return ((img - lo) * scale).clamp(0, 255).to(torch.uint8)


def _equalize_channel(ch: torch.Tensor) -> torch.Tensor:
    hist = torch.bincount(ch.reshape(-1), minlength=256)
    nonzero = hist[hist != 0]
    step = torch.div(nonzero[:-1].sum(), 255, rounding_mode="floor")
    if step == 0:
        return ch
    lut = torch.div(torch.cumsum(hist, 0) + torch.div(step, 2, rounding_mode="floor"), step,
                    rounding_mode="floor")
    lut = F.pad(lut, [1, 0])[:-1].clamp(0, 255)
    return lut[ch.to(torch.int64)].to(torch.uint8)


# ----------------------------------------------------------------------------- v2 helpers
# The same tensor calls as v2.functional, so that the rounding (including the fused
# multiply-add of ``add_(..., alpha=...)``) is ATen's.


def _grayscale_float_v2(img: torch.Tensor) -> torch.Tensor:
    r, g, b = img.unbind(0)
    return r.mul(_GRAY[0]).add_(g, alpha=_GRAY[1]).add_(b, alpha=_GRAY[2]).unsqueeze(0).floor_()


def _blend_v2(img1: torch.Tensor, img2: torch.Tensor, ratio: float) -> torch.Tensor:
    ratio = float(ratio)
    return img1.mul(ratio).add_(img2, alpha=1.0 - ratio).clamp_(0, 255).to(torch.uint8)


def _sharpness_v2(img: torch.Tensor, factor: float) -> torch.Tensor:
    _, h, w = img.shape
    if h <= 2 or w <= 2:
        return img.clone()
    kernel = torch.full((3, 3), 1.0 / 13.0, dtype=torch.float32)
    kernel[1, 1] = 5.0 / 13.0
    out = img.to(torch.float32)
    blurred = F.conv2d(out.unsqueeze(0), kernel.expand(3, 1, 3, 3), groups=3).squeeze(0).round_()
    inner = out[:, 1:-1, 1:-1]
    inner.add_(blurred.sub_(inner), alpha=1.0 - float(factor))
    return out.clamp_(0, 255).to(torch.uint8)


def _autocontrast_v2(img: torch.Tensor) -> torch.Tensor:
    x = img.to(torch.float32)
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    flat = hi == lo
    inv_scale = hi.sub_(lo).mul_(1.0 / 255.0)
    lo[flat] = 0.0
    inv_scale[flat] = 1.0
    return x.sub_(lo).div_(inv_scale).clamp_(0, 255).to(torch.uint8)


def _apply_op_v2(img: torch.Tensor, op: str, mag: float) -> torch.Tensor | None:
    """The ops whose v2 arithmetic differs from v1; None for the others (shared code)."""
    if op == "Color":
        return _blend_v2(img, _grayscale_float_v2(img), 1.0 + mag)
    if op == "Contrast":
        return _blend_v2(img, _grayscale_float_v2(img).mean(dim=(-3, -2, -1), keepdim=True), 1.0 + mag)
    if op == "Brightness":
        return img.mul(1.0 + mag).clamp_(0, 255).to(torch.uint8)
    if op == "Sharpness":
        return _sharpness_v2(img, 1.0 + mag)
    if op == "AutoContrast":
        return _autocontrast_v2(img)
    return None


# ----------------------------------------------------------------------------- pil
# torchvision's RandAugment on a PIL image: _apply_op calls torchvision.transforms.functional,
# whose PIL branch calls Pillow with these arguments (fill None -> fillcolor 0, NEAREST).


def _apply_op_pil(img: torch.Tensor, op: str, mag: float) -> torch.Tensor:
    import numpy as np
    from PIL import Image, ImageEnhance, ImageOps

    pil = Image.fromarray(img.permute(1, 2, 0).contiguous().numpy(), "RGB")
    w, h = pil.size
    fill = {"fillcolor": (0, 0, 0)}
    if op == "Identity":
        out = pil
    elif op in ("ShearX", "ShearY"):
        deg = math.degrees(math.atan(mag))
        m = _inverse_affine([0, 0], 0.0, [0, 0], [deg, 0.0] if op == "ShearX" else [0.0, deg])
        out = pil.transform((w, h), Image.AFFINE, m, Image.NEAREST, **fill)
    elif op in ("TranslateX", "TranslateY"):
        t = [int(mag), 0] if op == "TranslateX" else [0, int(mag)]
        m = _inverse_affine([w * 0.5, h * 0.5], 0.0, t, [0.0, 0.0])
        out = pil.transform((w, h), Image.AFFINE, m, Image.NEAREST, **fill)
    elif op == "Rotate":
        out = pil.rotate(mag, Image.NEAREST, False, None, **fill)
    elif op == "Brightness":
        out = ImageEnhance.Brightness(pil).enhance(1.0 + mag)
    elif op == "Color":
        out = ImageEnhance.Color(pil).enhance(1.0 + mag)
    elif op == "Contrast":
        out = ImageEnhance.Contrast(pil).enhance(1.0 + mag)
    elif op == "Sharpness":
        out = ImageEnhance.Sharpness(pil).enhance(1.0 + mag)
    elif op == "Posterize":
        out = ImageOps.posterize(pil, int(mag))
    elif op == "Solarize":
        out = ImageOps.solarize(pil, mag)
    elif op == "AutoContrast":
        out = ImageOps.autocontrast(pil)
    elif op == "Equalize":
        out = ImageOps.equalize(pil)
    else:
        raise ValueError(f"op: unknown RandAugment op {op!r}")
    return torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------- public


def apply_op(img: torch.Tensor, op: str, mag: float, semantics: str = "v1") -> torch.Tensor:
    """One RandAugment op with its float magnitude, as torchvision's ``_apply_op`` (v1) or
    ``_apply_image_or_video_transform`` (v2) with NEAREST and zero fill, on a [3, H, W]
    uint8 tensor; returns a new tensor."""
    if _check_semantics(semantics) == "pil":
        return _apply_op_pil(img, op, mag)
    if semantics == "v2":
        out = _apply_op_v2(img, op, mag)
        if out is not None:
            return out
    if op == "Identity":
        return img.clone()
    if op == "ShearX":
        return _shear(img, mag, 0)
    if op == "ShearY":
        return _shear(img, mag, 1)
    if op == "TranslateX":
        return _translate(img, int(mag), 0)
    if op == "TranslateY":
        return _translate(img, 0, int(mag))
    if op == "Rotate":
        return _rotate(img, mag)
    if op == "Brightness":
        return _blend(img, torch.zeros_like(img), 1.0 + mag)
    if op == "Color":
        return _blend(img, _grayscale(img), 1.0 + mag)
    if op == "Contrast":
        mean = torch.mean(_grayscale(img).to(torch.float32), dim=(-3, -2, -1), keepdim=True)
        return _blend(img, mean, 1.0 + mag)
    if op == "Sharpness":
        return _sharpness(img, 1.0 + mag)
    if op == "Posterize":
        bits = int(mag)
        return img & -int(2 ** (8 - bits))
    if op == "Solarize":
        return torch.where(img >= mag, 255 - img, img)
    if op == "AutoContrast":
        return _autocontrast(img)
    if op == "Equalize":
        return torch.stack([_equalize_channel(img[c]) for c in range(img.shape[0])])
    raise ValueError(f"op: unknown RandAugment op {op!r}")


def apply_ra(img_u8_chw: torch.Tensor, ops: Sequence[int], mags: Sequence[int],
             num_bins: int = 31, semantics: str = "v1") -> torch.Tensor:
    """Apply the stored RandAugment ops (ids into ``RA_OPS``, ``RA_NONE`` skipped) with their
    signed magnitude bins, in order, to a [3, H, W] uint8 image; returns a new uint8 tensor.

    Magnitudes come from each op's table for ``num_bins`` bins and the *current* image size,
    exactly as ``torchvision.transforms.RandAugment(num_magnitude_bins=num_bins)`` (``semantics=
    "v1"``) or ``torchvision.transforms.v2.RandAugment`` (``"v2"``).

    >>> import torch
    >>> img = torch.full((3, 4, 5), 100, dtype=torch.uint8)
    >>> apply_ra(img, [6], [30])[0, 0, 0].item()   # Brightness x1.9
    190
    """
    if not isinstance(img_u8_chw, torch.Tensor) or img_u8_chw.dtype != torch.uint8 \
            or img_u8_chw.ndim != 3 or img_u8_chw.shape[0] != 3:
        raise ValueError("img_u8_chw: expected a uint8 tensor of shape [3, H, W]")
    if len(ops) != len(mags):
        raise ValueError(f"ops/mags: lengths differ ({len(ops)} != {len(mags)})")
    if num_bins < 2:
        raise ValueError(f"num_bins: must be >= 2, got {num_bins}")
    _check_semantics(semantics)
    img = img_u8_chw.clone()
    for op_id, mag_bin in zip(ops, mags):
        op_id = int(op_id)
        if op_id == RA_NONE:
            continue
        if not 0 <= op_id < _N_TV:
            raise ValueError(f"ops: op id {op_id} is not one of torchvision's (valid: 0..{_N_TV - 1}, {RA_NONE}; "
                             "timm's ops: apply_timm)")
        name = RA_OPS[op_id]
        _, h, w = img.shape
        img = apply_op(img, name, magnitude_value(name, int(mag_bin), num_bins, h, w, semantics), semantics)
    return img


# ----------------------------------------------------------------------------- timm
# timm.data.auto_augment's RandAugment ops on a PIL image, from the level (timm's magnitude
# after noise and clipping) and the recorded draws, through the same Pillow calls timm makes.

_N_TV = len(RA_OPS)  # params.RA_OPS: torchvision's ops; the timm family follows in the schema's table
TIMM_FILL = (124, 116, 104)  # timm's create_transform: round(255 * ImageNet mean)


def _timm_arg(op: str, level: float, negate: bool):
    """timm's *_level_to_arg for ``op`` (timm's op name) in double arithmetic."""
    sgn = (lambda v: -v if negate else v)
    if op == "Rotate":
        return sgn((level / 10.) * 30.)
    if op in ("ShearX", "ShearY"):
        return sgn((level / 10.) * 0.3)
    if op in ("TranslateXRel", "TranslateYRel"):
        return sgn((level / 10.) * 0.45)
    if op in ("Color", "Contrast", "Brightness", "Sharpness"):
        return (level / 10.) * 1.8 + 0.1
    if op.endswith("Increasing") and op[:-10] in ("Color", "Contrast", "Brightness", "Sharpness"):
        return max(0.1, 1.0 + sgn((level / 10.) * .9))
    if op == "Posterize":
        return int((level / 10.) * 4)
    if op == "PosterizeIncreasing":
        return 4 - int((level / 10.) * 4)
    if op == "Solarize":
        return min(256, int((level / 10.) * 256))
    if op == "SolarizeIncreasing":
        return 256 - min(256, int((level / 10.) * 256))
    if op == "SolarizeAdd":
        return min(128, int((level / 10.) * 110))
    return None


def timm_op(pil, op: str, level: float, negate: bool = False, bicubic: bool = False, fill=TIMM_FILL):
    """One timm RandAugment op (timm's name, e.g. ``"ShearX"``) on an RGB PIL image."""
    from PIL import Image, ImageEnhance, ImageOps

    arg = _timm_arg(op, float(level), bool(negate))
    kw = {"resample": Image.BICUBIC if bicubic else Image.BILINEAR, "fillcolor": tuple(int(v) for v in fill)}
    w, h = pil.size
    if op == "AutoContrast":
        return ImageOps.autocontrast(pil)
    if op == "Equalize":
        return ImageOps.equalize(pil)
    if op == "Invert":
        return ImageOps.invert(pil)
    if op == "Rotate":
        return pil.rotate(arg, **kw)
    if op in ("ShearX", "ShearY"):
        m = (1, arg, 0, 0, 1, 0) if op == "ShearX" else (1, 0, 0, arg, 1, 0)
        return pil.transform(pil.size, Image.AFFINE, m, **kw)
    if op in ("TranslateXRel", "TranslateYRel"):
        m = (1, 0, arg * w, 0, 1, 0) if op == "TranslateXRel" else (1, 0, 0, 0, 1, arg * h)
        return pil.transform(pil.size, Image.AFFINE, m, **kw)
    if op.startswith("Posterize"):
        if arg >= 8:
            return pil
        mask = ~(2 ** (8 - max(arg, 0)) - 1) & 255  # 0 bits: black (Pillow >= 11 refuses bits 0)
        return pil.point([i & mask for i in range(256)] * 3)
    if op.startswith("Solarize") and op != "SolarizeAdd":
        return pil.point([i if i < arg else 255 - i for i in range(256)] * 3)
    if op == "SolarizeAdd":
        return pil.point([min(255, i + arg) if i < 128 else i for i in range(256)] * 3)
    for kind in ("Color", "Contrast", "Brightness", "Sharpness"):
        if op.startswith(kind):
            return getattr(ImageEnhance, kind)(pil).enhance(arg)
    raise ValueError(f"op: unknown timm RandAugment op {op!r}")


def apply_timm(img_u8_chw: torch.Tensor, ops: Sequence[int], draws: Sequence[int], levels: Sequence[float],
               fill=TIMM_FILL) -> torch.Tensor:
    """timm's RandAugment as fastload stores it: op ids of the timm family (``RA_NONE``
    skipped), ``draws`` the records' ra_mags (sign: negation, 2: BICUBIC), ``levels`` the
    float32 levels; on a [3, H, W] uint8 image, returns a new one."""
    import numpy as np
    from PIL import Image

    if not isinstance(img_u8_chw, torch.Tensor) or img_u8_chw.dtype != torch.uint8 \
            or img_u8_chw.ndim != 3 or img_u8_chw.shape[0] != 3:
        raise ValueError("img_u8_chw: expected a uint8 tensor of shape [3, H, W]")
    pil = Image.fromarray(img_u8_chw.permute(1, 2, 0).contiguous().numpy(), "RGB")
    for o, d, lv in zip(ops, draws, levels):
        o = int(o)
        if o == RA_NONE:
            continue
        if not (_N_TV <= o < len(_S.RA_OPS)) or not _S.RA_OPS[o].startswith("Timm"):
            raise ValueError(f"ops: op id {o} is not a timm op (valid: {_N_TV}..{len(_S.RA_OPS) - 1}, {RA_NONE})")
        d = int(d)
        if d not in (-2, -1, 1, 2):
            raise ValueError(f"draws: {d} is not +-1 or +-2")
        pil = timm_op(pil, _S.RA_OPS[o][4:], float(np.float32(lv)), d < 0, abs(d) == 2, fill)
    return torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1).contiguous()
