"""Plain-PyTorch reference of the replay of one stored augmentation record.

This is the readable specification the C++ kernel (``fastload/replay/native.py``) and the
Triton kernel are tested against. It follows torchvision's tensor semantics: the crop is an
integer box (``params.box_to_pixels``), the resize is ``F.interpolate(antialias=True,
align_corners=False)`` on float followed by round + clamp to uint8 (torchvision's uint8
resize), then flip, RandAugment, ``/255``, Normalize, RandomErasing(value=0), MixUp, CutMix.

With a schema-v2 extension record (``ext``, ``params.AUG_EXT_DTYPE``) it also replays what
imported ml-dr records hold: float magnitudes, black erasing before Normalize, and the
partner's own RandAugment and erasing (applied to the partner in the same order as to the
image, as ml-dr's ``Compose.reapply`` does).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..sample import params as P

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _as_chw_u8(img) -> torch.Tensor:
    if isinstance(img, np.ndarray):
        img = torch.from_numpy(np.ascontiguousarray(img))
    if img.dtype != torch.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be uint8 HWC with 3 channels, got {tuple(img.shape)} {img.dtype}")
    return img.permute(2, 0, 1)


def crop_resize_flip(img_u8_hwc, box_q, size, flip: bool, interpolation="bilinear", resize="torch") -> torch.Tensor:
    """Crop (quantized box) -> antialiased resize -> round/clamp uint8 -> optional flip: [3,h,w] u8.
    ``resize="pil"``/``"pil12"``: Pillow's resize instead (``reference_pil``)."""
    if resize != "torch":
        from .reference_pil import crop_resize_flip_pil

        if resize not in ("pil", "pil12"):
            raise ValueError(f"resize must be 'torch', 'pil' or 'pil12', got {resize!r}")
        _as_chw_u8(img_u8_hwc)  # the same input check
        return torch.from_numpy(crop_resize_flip_pil(np.asarray(img_u8_hwc), box_q, size, flip, interpolation,
                                                     pillow13=resize == "pil"))
    chw = _as_chw_u8(img_u8_hwc)
    H, W = chw.shape[1:]
    t, l, bh, bw = P.box_to_pixels(np.asarray(box_q), H, W)
    x = chw[:, t:t + bh, l:l + bw].float()[None]
    y = F.interpolate(x, size=tuple(size), mode=interpolation, antialias=True, align_corners=False)[0]
    y = y.round().clamp(0, 255).to(torch.uint8)
    if flip:
        y = y.flip(-1)
    return y


def _box_px(q, h, w):
    t, l, bh, bw = P.box_to_pixels(np.asarray(q), h, w)
    return t, l, bh, bw


def _ra_float(y: torch.Tensor, ops, vals, box_grid, semantics: str = "v1") -> torch.Tensor:
    """RandAugment with stored float magnitudes (translations scaled from the box grid)."""
    from .reference_ra import apply_op

    h, w = y.shape[1:]
    gh, gw = box_grid if box_grid is not None else (h, w)
    for o, v in zip(ops, vals):
        o = int(o)
        if o == P.RA_NONE:
            continue
        name = P.RA_OPS[o]
        v = float(v)
        if name == "TranslateX":
            v = v * w / gw
        elif name == "TranslateY":
            v = v * h / gh
        y = apply_op(y, name, v, semantics=semantics)
    return y


def _apply_ra_any(y, ops, mags, vals, use_float: bool, ra_num_bins, box_grid, semantics: str = "v1",
                  ra_fill=None):
    if not any(int(o) != P.RA_NONE for o in ops):
        return y
    if semantics == "timm":
        from .reference_ra import TIMM_FILL, apply_timm

        if not use_float:
            raise ValueError("timm RandAugment records need their levels (extension records with ra_float)")
        return apply_timm(y, ops, mags, vals, TIMM_FILL if ra_fill is None else ra_fill)
    if use_float:
        return _ra_float(y, ops, vals, box_grid, semantics)
    from .reference_ra import apply_ra

    keep = [i for i, o in enumerate(ops) if int(o) != P.RA_NONE]
    return apply_ra(y, [int(ops[i]) for i in keep], [int(mags[i]) for i in keep], num_bins=ra_num_bins,
                    semantics=semantics)


def reference_uint8(img_u8_hwc, aug, size=(224, 224), interpolation="bilinear", ra_num_bins=31,
                    ext=None, box_grid=None, ra_semantics="v1", ra_fill=None, resize="torch") -> torch.Tensor:
    """The uint8 [3,h,w] image before normalization: crop, resize, flip, RandAugment
    (``ra_fill``: the timm semantics' fill colour, default ``reference_ra.TIMM_FILL``;
    ``resize``: the policy's resize arithmetic).

    Example:
        >>> import numpy as np
        >>> from fastload.sample import params as P
        >>> img = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
        >>> reference_uint8(img, P.empty(()), size=(16, 16)).shape
        torch.Size([3, 16, 16])
    """
    flags = int(aug["flags"])
    y = crop_resize_flip(img_u8_hwc, aug["crop"], size, bool(flags & P.FLAG_FLIP), interpolation, resize)
    use_float = ext is not None and bool(int(ext["ext"]) & P.EXT_RA_FLOAT)
    vals = ext["ra_vals"] if ext is not None else None
    return _apply_ra_any(y, aug["ra_ops"], aug["ra_mags"], vals, use_float, ra_num_bins, box_grid, ra_semantics,
                         ra_fill)


def _erase(x: torch.Tensor, box, h: int, w: int, fill: torch.Tensor) -> None:
    if int(box[3]) != 0:
        t, l, eh, ew = _box_px(box, h, w)
        x[:, t:t + eh, l:l + ew] = fill


def render_reference(img_u8_hwc, aug, size=(224, 224), partner_img=None, mean=IMAGENET_MEAN,
                     std=IMAGENET_STD, interpolation="bilinear", ra_num_bins=31, ext=None,
                     box_grid=None, ra_semantics="v1", ra_fill=None, resize="torch") -> torch.Tensor:
    """Replay one record on one image: float32 [3, h, w], normalized, erased and mixed.

    Example:
        >>> import numpy as np
        >>> from fastload.sample import params as P
        >>> img = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
        >>> render_reference(img, P.empty(()), size=(16, 16)).dtype
        torch.float32
    """
    h, w = size
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    x = reference_uint8(img_u8_hwc, aug, size, interpolation, ra_num_bins, ext, box_grid,
                        ra_semantics, ra_fill, resize).float() / 255
    x = (x - m) / s
    xb = int(ext["ext"]) if ext is not None else 0
    # ml-dr erases with 0 before Normalize: the pixel becomes -mean/std; fastload's own
    # records fill the mean colour (0 after Normalize), torchvision's RandomErasing(value=0)
    fill = -m / s if xb & P.EXT_ERASE_BLACK else torch.zeros_like(m)
    _erase(x, aug["erase"], h, w, fill)
    flags = int(aug["flags"])
    if flags & (P.FLAG_MIXUP | P.FLAG_CUTMIX):
        if partner_img is None:
            raise ValueError("the record mixes with a partner but partner_img is None")
        p = crop_resize_flip(partner_img, aug["pcrop"], size, bool(flags & P.FLAG_PARTNER_FLIP), interpolation,
                             resize)
        if xb & P.EXT_PARTNER_AUG:
            p = _apply_ra_any(p, ext["pra_ops"], ext["pra_mags"], ext["pra_vals"], bool(xb & P.EXT_RA_FLOAT),
                              ra_num_bins, box_grid, ra_semantics, ra_fill)
        p = (p.float() / 255 - m) / s
        if xb & P.EXT_PARTNER_AUG:
            _erase(p, ext["perase"], h, w, fill)
        if flags & P.FLAG_MIXUP:
            lam = int(aug["mixup"]) / P.Q
            x = lam * x + (1 - lam) * p
        if flags & P.FLAG_CUTMIX:
            t, l, ch, cw = _box_px(aug["cutmix"], h, w)
            x[:, t:t + ch, l:l + cw] = p[:, t:t + ch, l:l + cw]
    return x
