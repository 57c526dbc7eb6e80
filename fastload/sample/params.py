"""The stored augmentation record: one layout shared by sampling, the replay kernels (C++
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
  from the op's table for the *output* size, as torchvision's ``_augmentation_space``).
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

Q = 65535  # quantization of every fraction
MAX_RA = 4
RA_NONE = 255

FLAG_FLIP = 1
FLAG_PARTNER_FLIP = 2
FLAG_MIXUP = 4
FLAG_CUTMIX = 8

# torchvision.transforms.RandAugment's op space, in its order. Op ids are stored on disk:
# never reorder; the manifest records this table.
RA_OPS = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
    "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
)
RA_SIGNED = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
                       "Brightness", "Color", "Contrast", "Sharpness"})

AUG_DTYPE = np.dtype([
    ("crop", "<u2", (4,)),
    ("flags", "u1"),
    ("ra_ops", "u1", (MAX_RA,)),
    ("ra_mags", "i1", (MAX_RA,)),
    ("erase", "<u2", (4,)),
    ("partner", "<i4"),
    ("pcrop", "<u2", (4,)),
    ("mixup", "<u2"),
    ("cutmix", "<u2", (4,)),
])  # packed: 47 bytes, the C++ struct `fl_aug` in csrc/include/fl_aug.h mirrors it


EXT_RA_FLOAT = 1
EXT_ERASE_BLACK = 2
EXT_CUTMIX_EMPTY = 4
EXT_PARTNER_AUG = 8

AUG_EXT_DTYPE = np.dtype([
    ("ext", "u1"),
    ("ra_vals", "<f4", (MAX_RA,)),
    ("pra_ops", "u1", (MAX_RA,)),
    ("pra_mags", "i1", (MAX_RA,)),
    ("pra_vals", "<f4", (MAX_RA,)),
    ("perase", "<u2", (4,)),
    ("mixup_f", "<f8"),
    ("cutmix_lam", "<f8"),
])  # packed: 65 bytes; csrc/include/fl_aug.h `AugExt` mirrors it


def empty_ext(shape) -> np.ndarray:
    """Extension records meaning 'nothing beyond the base record' (what v1 datasets read as)."""
    a = np.zeros(shape, dtype=AUG_EXT_DTYPE)
    a["pra_ops"] = RA_NONE
    return a


def empty(shape) -> np.ndarray:
    """Records meaning 'full image, nothing else' (no op applied)."""
    a = np.zeros(shape, dtype=AUG_DTYPE)
    a["crop"] = (0, 0, Q, Q)
    a["ra_ops"] = RA_NONE
    a["partner"] = -1
    return a


def dq(q: int, n: int) -> int:
    """The one dequantization rule (integer arithmetic: no tie-rounding differences)."""
    return (int(q) * int(n) + Q // 2) // Q


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
