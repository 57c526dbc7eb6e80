"""Plain-PyTorch reference of the replay of one stored augmentation record.

This is the readable specification the C++ kernel (``fastload/replay/native.py``) and the
Triton kernel are tested against. It follows torchvision's tensor semantics: the crop is an
integer box (``params.box_to_pixels``), the resize is ``F.interpolate(antialias=True,
align_corners=False)`` on float followed by round + clamp to uint8 (torchvision's uint8
resize), then flip, RandAugment, ``/255``, Normalize, RandomErasing(value=0), MixUp, CutMix.
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


def crop_resize_flip(img_u8_hwc, box_q, size, flip: bool, interpolation="bilinear") -> torch.Tensor:
    """Crop (quantized box) -> antialiased resize -> round/clamp uint8 -> optional flip: [3,h,w] u8."""
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


def reference_uint8(img_u8_hwc, aug, size=(224, 224), interpolation="bilinear", ra_num_bins=31,
                    ra_semantics="v1") -> torch.Tensor:
    """The uint8 [3,h,w] image before normalization: crop, resize, flip, RandAugment.

    Example:
        >>> import numpy as np
        >>> from fastload.sample import params as P
        >>> img = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
        >>> reference_uint8(img, P.empty(()), size=(16, 16)).shape
        torch.Size([3, 16, 16])
    """
    flags = int(aug["flags"])
    y = crop_resize_flip(img_u8_hwc, aug["crop"], size, bool(flags & P.FLAG_FLIP), interpolation)
    ops = [int(o) for o in aug["ra_ops"] if int(o) != P.RA_NONE]
    if ops:
        from .reference_ra import apply_ra

        mags = [int(m) for o, m in zip(aug["ra_ops"], aug["ra_mags"]) if int(o) != P.RA_NONE]
        y = apply_ra(y, ops, mags, num_bins=ra_num_bins, semantics=ra_semantics)
    return y


def render_reference(img_u8_hwc, aug, size=(224, 224), partner_img=None, mean=IMAGENET_MEAN,
                     std=IMAGENET_STD, interpolation="bilinear", ra_num_bins=31) -> torch.Tensor:
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
    x = reference_uint8(img_u8_hwc, aug, size, interpolation, ra_num_bins).float() / 255
    x = (x - m) / s
    e = aug["erase"]
    if int(e[3]) != 0:
        t, l, eh, ew = _box_px(e, h, w)
        x[:, t:t + eh, l:l + ew] = 0
    flags = int(aug["flags"])
    if flags & (P.FLAG_MIXUP | P.FLAG_CUTMIX):
        if partner_img is None:
            raise ValueError("the record mixes with a partner but partner_img is None")
        p = crop_resize_flip(partner_img, aug["pcrop"], size, bool(flags & P.FLAG_PARTNER_FLIP),
                             interpolation).float() / 255
        p = (p - m) / s
        if flags & P.FLAG_MIXUP:
            lam = int(aug["mixup"]) / P.Q
            x = lam * x + (1 - lam) * p
        if flags & P.FLAG_CUTMIX:
            t, l, ch, cw = _box_px(aug["cutmix"], h, w)
            x[:, t:t + ch, l:l + cw] = p[:, t:t + ch, l:l + cw]
    return x
