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
With ``restart_markers=True`` a JPEG is stored losslessly transcoded with restart markers
(:func:`with_restart_markers`): the same pixels, and the loader decodes only around a crop.
"""
from __future__ import annotations

import io
from typing import Tuple

__all__ = ["stored_image_bytes", "with_restart_markers"]


def with_restart_markers(b: bytes, where: str = "image") -> bytes:
    """``b`` losslessly transcoded with restart markers (:func:`fastload.replay.native.add_restarts`:
    the same quantized coefficients, so the same pixels for every decoder), which lets the loader
    decode only the restart intervals around a crop instead of everything above and beside it.
    ``b`` itself where libjpeg finds fault with it (Pillow, which checked it, tolerates some
    damage libjpeg warns of): the loader then decodes it as it always did, and reports the
    damage itself. Arithmetic-coded or already marked files come back unchanged."""
    from fastload.replay.native import add_restarts

    try:
        return add_restarts(b, where)
    except ValueError:
        return b


def stored_image_bytes(b: bytes, where: str = "image", *, restart_markers: bool = False) -> Tuple[bytes, str]:
    """``(bytes to store, how)``: ``how`` is ``"jpeg"`` or ``"png"`` (kept as they are) or
    ``"png-from-<format>-<mode>"`` (Pillow's RGB conversion stored as PNG). A file Pillow cannot
    decode raises ``ValueError`` naming ``where``. ``restart_markers``: a JPEG is stored through
    :func:`with_restart_markers` (lossless; PNGs and converted images are unaffected)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(b)) as im:
            fmt, mode = im.format, im.mode
            if fmt == "JPEG" and mode in ("RGB", "L", "CMYK") and b[:2] == b"\xff\xd8":
                return (with_restart_markers(b, where) if restart_markers else b), "jpeg"
            im.load()  # decode fully: a truncated file fails here, at import, not in training
            if fmt == "PNG":
                return b, "png"
            rgb = im.convert("RGB")
    except Exception as e:  # any decoder failure: name the file
        raise ValueError(f"{where}: cannot decode: {e}") from e
    buf = io.BytesIO()
    rgb.save(buf, format="PNG", compress_level=6)
    return buf.getvalue(), f"png-from-{str(fmt).lower()}-{mode}"
