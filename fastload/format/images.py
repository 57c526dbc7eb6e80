"""How importers store a source image: losslessly.

The replay decodes JPEG natively and PNG through Pillow (``fastload.replay.native``), so:

- a JPEG in RGB, greyscale or CMYK/YCCK is stored as its own bytes (the native decoder
  converts CMYK exactly as Pillow's ``convert("RGB")`` does, docs/architecture.md);
- a PNG is stored as its own bytes (whatever its mode: the replay converts it as Pillow's
  ``convert("RGB")`` does, which is what torchvision's ``pil_loader`` gives a training loop);
- anything else (BMP, TIFF, WebP, GIF, PPM, a JPEG in another mode, ...) is decoded by
  Pillow, converted with ``convert("RGB")`` (the pixels an upstream loader sees) and stored as
  a lossless PNG of exactly those pixels.

Nothing is re-encoded lossily (these sources used to become JPEG q95: up to 59 levels off).
"""
from __future__ import annotations

import io
from typing import Tuple

__all__ = ["stored_image_bytes"]


def stored_image_bytes(b: bytes, where: str = "image") -> Tuple[bytes, str]:
    """``(bytes to store, how)``: ``how`` is ``"jpeg"`` or ``"png"`` (kept as they are) or
    ``"png-from-<format>-<mode>"`` (Pillow's RGB conversion stored as PNG). A file Pillow cannot
    decode raises ``ValueError`` naming ``where``."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(b)) as im:
            fmt, mode = im.format, im.mode
            if fmt == "JPEG" and mode in ("RGB", "L", "CMYK") and b[:2] == b"\xff\xd8":
                return b, "jpeg"
            im.load()  # decode fully: a truncated file fails here, at import, not in training
            if fmt == "PNG":
                return b, "png"
            rgb = im.convert("RGB")
    except Exception as e:  # any decoder failure: name the file
        raise ValueError(f"{where}: cannot decode: {e}") from e
    buf = io.BytesIO()
    rgb.save(buf, format="PNG", compress_level=6)
    return buf.getvalue(), f"png-from-{str(fmt).lower()}-{mode}"
