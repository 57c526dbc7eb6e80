"""The stored augmentation record (declared in :mod:`fastload.sample.schema`): one layout shared by sampling, the replay kernels (C++
and Triton), the on-disk format and the loader.

Every field is resolution independent, so a replay at any output size (or from an image
re-encoded at a smaller size) is correct:

- ``crop``: top, left, height, width of the RandomResizedCrop box as fractions of the source
  image, quantized to 1/65535. Replay turns them back into integer source pixels with the
  integer rule ``dq(q, H) = (q * H + 32767) // 65535`` (height/width at least 1, box kept
  inside the image), identical in Python, C++ and Triton; it recovers torchvision's integer
  box exactly for sources below 65535 px. Output-relative boxes use the same rule.
- ``flags``: bit 0 horizontal flip; bit 1 partner flip; bit 2 MixUp applied; bit 3 CutMix
  applied.
- ``ra_ops`` / ``ra_mags``: RandAugment ops in the order applied (``RA_NONE`` = unused slot)
  and their signed magnitude bins (sign = direction for signed ops; the value of a bin comes
  from the op's table for the *output* size, as torchvision's ``_augmentation_space``). With
  the timm semantics the ids are the schema's ``Timm*`` family, ``ra_mags`` holds timm's
  draws (sign: negated; 2: BICUBIC, 1: BILINEAR) and the extension's ``ra_vals`` the levels.
- ``erase``: RandomErasing box (top, left, height, width) as fractions of the output, 1/65535
  units; ``width == 0`` means no erasing. Erased pixels become 0 after normalization (the
  mean colour), torchvision's ``RandomErasing(value=0)`` after ``Normalize``.
- ``partner``: dataset index of the MixUp/CutMix partner (-1: none); ``pcrop`` its own crop,
  same encoding as ``crop``. The partner is rendered with crop, flip, resize and normalize
  only (no RandAugment, no erasing).
- ``mixup``: MixUp lambda in 1/65535 units (valid when flag bit 2 is set): out = lam * x +
  (1 - lam) * partner.
- ``cutmix``: CutMix box as fractions of the output (valid when flag bit 3 is set), filled
  with the partner's pixels after MixUp.

Schema v2 adds an optional *extension record* (``AUG_EXT_DTYPE``, one per record, stored in
its own column ``augs_ext``; absent in v1 datasets and in datasets that do not need it, which
then read as :func:`empty_ext`). It holds what imported reinforcements (apple/ml-dr's
ImageNet+) store and the 47-byte record cannot, so an import loses nothing:

- ``ext``: bits. ``EXT_RA_FLOAT``: the RandAugment magnitudes of the image and of the partner
  are the float values ``ra_vals`` / ``pra_vals`` (torchvision's ``_apply_op`` argument,
  signed; translations in pixels of the box grid ``replay.box_grid``, scaled to the output
  width/height), not the bins ``ra_mags`` / ``pra_mags`` (which then hold the nearest bin).
  Importers store the floats only where a value is not a table entry (bins are exact
  otherwise). ``EXT_ERASE_BLACK``: erased pixels are 0 *before* Normalize (ml-dr: black, i.e.
  ``-mean/std`` after it), not the mean colour. ``EXT_CUTMIX_EMPTY``: CutMix was drawn but
  its box has no area (no pixel changes; flag bit 3 stays clear). ``EXT_PARTNER_AUG``: the
  partner has its own RandAugment (``pra_ops``/``pra_mags``/``pra_vals``) and erasing
  (``perase``, same encoding as ``erase``), applied after its crop/flip as for the image.
- ``mixup_f`` / ``cutmix_lam``: the exact MixUp lambda and CutMix Beta draw (``mixup`` keeps
  the 1/65535 quantization the kernels use).
"""
from __future__ import annotations

import numpy as np

from fastload.sample import schema as S
from fastload.sample.schema import MAX_RA, Q, RA_NONE, RA_SIGNED, dq  # noqa: F401 - re-exported

# torchvision's RandAugment op names (ids 0..13, the semantics v1, v2 and pil); the op table
# goes on with other families (timm's: schema.RA_OPS, schema.family_ops("timm"))
RA_OPS = tuple(S.RA_OPS[i] for i in S.family_ops("v1"))
assert RA_OPS == S.RA_OPS[:len(RA_OPS)]

FLAG_FLIP = S.bit(S.AUG, "flags", "flip")
FLAG_PARTNER_FLIP = S.bit(S.AUG, "flags", "partner_flip")
FLAG_MIXUP = S.bit(S.AUG, "flags", "mixup")
FLAG_CUTMIX = S.bit(S.AUG, "flags", "cutmix")

EXT_RA_FLOAT = S.bit(S.AUG_EXT, "ext", "ra_float")
EXT_ERASE_BLACK = S.bit(S.AUG_EXT, "ext", "erase_black")
EXT_CUTMIX_EMPTY = S.bit(S.AUG_EXT, "ext", "cutmix_empty")
EXT_PARTNER_AUG = S.bit(S.AUG_EXT, "ext", "partner_aug")

# packed numpy views of the schema's records (csrc/include/fl_aug.h is generated from the same)
AUG_DTYPE = S.AUG.numpy_dtype()
AUG_EXT_DTYPE = S.AUG_EXT.numpy_dtype()


def empty_ext(shape) -> np.ndarray:
    """Extension records meaning 'nothing beyond the base record' (what v1 datasets read as)."""
    return S.AUG_EXT.empty(shape)


def empty(shape) -> np.ndarray:
    """Records meaning 'full image, nothing else' (no op applied)."""
    return S.AUG.empty(shape)


def box_to_pixels(q: np.ndarray, h: int, w: int) -> tuple[int, int, int, int]:
    """Quantized (top, left, height, width) -> integer pixel box inside an h x w image."""
    bh = min(h, max(1, dq(q[2], h)))
    bw = min(w, max(1, dq(q[3], w)))
    top = min(dq(q[0], h), h - bh)
    left = min(dq(q[1], w), w - bw)
    return top, left, bh, bw


def pixels_to_box(top: int, left: int, bh: int, bw: int, h: int, w: int) -> np.ndarray:
    """Integer pixel box inside an h x w image -> quantized fractions."""
    return np.array([(top * Q + h // 2) // h, (left * Q + w // 2) // w,
                     (bh * Q + h // 2) // h, (bw * Q + w // 2) // w], dtype=np.uint16)
