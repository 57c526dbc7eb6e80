"""Image batches -> file bytes (ByteFormer input), in the native ``_encode`` library.

``encode_batch(images, "jpeg" | "png" | "tiff")`` encodes a uint8 batch (NHWC, or NCHW as
the loader renders it) in the shared native thread pool (ctypes releases the GIL) into a
caller-sized buffer, and returns the padded token batch ``uint8 [n, max_len]`` (``pad_value``
past each image's end) and the lengths ``int64 [n]``. PNG and TIFF decode back to the exact
pixels; PNG rows use the Sub filter and zlib's deflate at ``level``; TIFF is baseline,
uncompressed, one strip, little-endian.

``bucket_groups`` splits a batch by power-of-two length bucket (bucket ``k`` holds lengths in
``(2^(k-1), 2^k]``, the rule of ``fastload.batch.buckets``), each group padded to its own
longest row, which keeps padding low when lengths vary widely (PNG, JPEG).
"""
from __future__ import annotations

import ctypes
from typing import List, NamedTuple, Tuple

import numpy as np
import torch

from fastload import _native

FORMATS = {"jpeg": 0, "png": 1, "tiff": 2}


def _lib():
    lib = _native.load("encode")
    if not getattr(lib, "_fl_typed", False):
        lib.fl_encode_bound.restype = ctypes.c_int64
        lib.fl_encode_bound.argtypes = [ctypes.c_int] * 4
        lib.fl_encode_available.restype = ctypes.c_int
        lib.fl_encode_available.argtypes = [ctypes.c_int]
        lib.fl_encode_batch.restype = ctypes.c_int
        lib.fl_encode_batch.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
        lib._fl_typed = True
    return lib


def _format(fmt: str) -> int:
    if fmt not in FORMATS:
        raise ValueError(f"encode must be one of {sorted(FORMATS)}, got {fmt!r}")
    return FORMATS[fmt]


def encode_bound(fmt: str, h: int, w: int, c: int = 3) -> int:
    """Bytes per image that always hold the encoding of an h x w x c image."""
    return int(_lib().fl_encode_bound(_format(fmt), int(h), int(w), int(c)))


def encode_raw(images, fmt: str = "png", quality: int = 90, level: int = 6, layout: str = "nhwc",
               threads: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """(buffer uint8 [n, cap], lengths int64 [n]): image i's bytes are ``buffer[i, :lengths[i]]``."""
    code = _format(fmt)
    if layout not in ("nhwc", "nchw"):
        raise ValueError(f"layout must be 'nhwc' or 'nchw', got {layout!r}")
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (pass dtype=torch.uint8 to the loader), got {arr.dtype}")
    if arr.ndim != 4:
        raise ValueError(f"images must be a 4-D {layout.upper()} batch, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr)
    n = arr.shape[0]
    if layout == "nhwc":
        h, w, c = arr.shape[1:]
    else:
        c, h, w = arr.shape[1:]
    if c not in (1, 3) or h == 0 or w == 0:
        raise ValueError(f"images must have 1 or 3 channels and non-zero size, got {layout.upper()} shape {arr.shape}")
    if not isinstance(quality, (int, np.integer)) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an int in [1, 100], got {quality!r}")
    if not isinstance(level, (int, np.integer)) or not 0 <= level <= 9:
        raise ValueError(f"level must be an int in [0, 9], got {level!r}")
    lib = _lib()
    if not lib.fl_encode_available(code):
        raise RuntimeError(f"fastload was built without the library for {fmt} (libjpeg)")
    cap = int(lib.fl_encode_bound(code, h, w, c))
    out = np.empty((n, cap), dtype=np.uint8)
    lengths = np.zeros(n, dtype=np.int64)
    st = lib.fl_encode_batch(_native.ptr(arr), n, h, w, c, int(layout == "nchw"), code, int(quality), int(level),
                             _native.ptr(out), cap, _native.ptr(lengths), max(1, int(threads)))
    _native.check(lib, st, f"encoding {n} images as {fmt}")
    return out, lengths


def pad(buf: np.ndarray, lengths: np.ndarray, pad_value: int = 0) -> torch.Tensor:
    """The rows of ``buf`` cut to the longest length, ``pad_value`` past each row's end."""
    L = int(lengths.max()) if len(lengths) else 0
    tok = buf[:, :L].copy()
    tok[np.arange(L)[None, :] >= lengths[:, None]] = pad_value
    return torch.from_numpy(tok)


def encode_batch(images, fmt: str = "png", quality: int = 90, level: int = 6, layout: str = "nhwc",
                 threads: int = 1, pad_value: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(tokens uint8 [n, max_len], lengths int64 [n])."""
    if not 0 <= int(pad_value) <= 255:
        raise ValueError(f"pad_value must be in [0, 255], got {pad_value}")
    buf, lengths = encode_raw(images, fmt, quality, level, layout, threads)
    return pad(buf, lengths, pad_value), torch.from_numpy(lengths)


def encode_list(images, fmt: str = "png", quality: int = 90, level: int = 6, layout: str = "nhwc",
                threads: int = 1) -> List[bytes]:
    buf, lengths = encode_raw(images, fmt, quality, level, layout, threads)
    return [buf[i, :int(n)].tobytes() for i, n in enumerate(lengths)]


class BytesConfig(NamedTuple):
    """How a loader's rows become file bytes: ``fmt`` "jpeg" | "png" | "tiff" (the rendered
    pixels, encoded) or "stored" (the dataset's stored source bytes, served as they are);
    ``quality`` (JPEG), ``level`` (PNG deflate), ``bucket`` (deliver power-of-two length
    groups), ``pad_value`` (the token past each row's end)."""
    fmt: str
    quality: int = 90
    level: int = 6
    bucket: bool = False
    pad_value: int = 0


def bytes_config(encode, quality=90, level=6, bucket=False, pad_value=0) -> BytesConfig:
    """A checked :class:`BytesConfig`; bad arguments raise ``ValueError`` naming them."""
    if encode != "stored" and encode not in FORMATS:
        raise ValueError(f"encode must be one of {sorted(FORMATS) + ['stored']}, got {encode!r}")
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an int in [1, 100], got {quality!r}")
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 0 <= level <= 9:
        raise ValueError(f"level must be an int in [0, 9], got {level!r}")
    if isinstance(pad_value, bool) or not isinstance(pad_value, (int, np.integer)) or not 0 <= pad_value <= 255:
        raise ValueError(f"pad_value must be an int in [0, 255], got {pad_value!r}")
    if bucket not in (True, False):
        raise ValueError(f"bucket must be True or False, got {bucket!r}")
    return BytesConfig(encode, int(quality), int(level), bool(bucket), int(pad_value))


def encode_rows(images, cfg: BytesConfig, threads: int = 1, sources=None) -> Tuple[np.ndarray, np.ndarray]:
    """(buffer uint8 [n, cap], lengths int64 [n]) of one batch: the rendered uint8 NCHW
    ``images`` encoded as ``cfg.fmt``, or with "stored" the ``sources`` bytes as they are."""
    if cfg.fmt != "stored":
        return encode_raw(images, cfg.fmt, cfg.quality, cfg.level, "nchw", threads)
    blobs = [np.frombuffer(s, dtype=np.uint8) for s in sources]
    lengths = np.array([len(b) for b in blobs], dtype=np.int64)
    buf = np.zeros((len(blobs), int(lengths.max()) if len(blobs) else 0), dtype=np.uint8)
    for i, b in enumerate(blobs):
        buf[i, :len(b)] = b
    return buf, lengths


class BytesBatch(NamedTuple):
    """tokens: uint8 [B, max_len], ``pad_value`` past each row's end (None with bucket=True);
    lengths: int64 [B]; batch: the loader's batch (images, labels, targets, or an
    ``ImageTextBatch``; images None for encode="stored"); groups: the ``BucketGroup`` list
    with bucket=True, else None."""
    tokens: "torch.Tensor | None"
    lengths: torch.Tensor
    batch: object
    groups: "List[BucketGroup] | None"


def bytes_batch(buf: np.ndarray, lengths: np.ndarray, batch, cfg: BytesConfig) -> BytesBatch:
    """The delivered form of one encoded batch (padded, or grouped by length bucket)."""
    if cfg.bucket:
        return BytesBatch(None, torch.from_numpy(lengths), batch, bucket_groups(buf, lengths, cfg.pad_value))
    return BytesBatch(pad(buf, lengths, cfg.pad_value), torch.from_numpy(lengths), batch, None)


class BucketGroup(NamedTuple):
    """Rows ``positions`` of a batch (int64), their tokens padded to the group's longest row,
    their lengths, and the bucket ``k`` (lengths in ``(2^(k-1), 2^k]``)."""
    positions: torch.Tensor
    tokens: torch.Tensor
    lengths: torch.Tensor
    bucket: int


def length_bucket(lengths: np.ndarray) -> np.ndarray:
    return np.ceil(np.log2(np.maximum(np.asarray(lengths, dtype=np.float64), 1))).astype(np.int64)


def bucket_groups(buf: np.ndarray, lengths: np.ndarray, pad_value: int = 0) -> List[BucketGroup]:
    k = length_bucket(lengths)
    out = []
    for b in np.unique(k):
        pos = np.flatnonzero(k == b)
        out.append(BucketGroup(torch.from_numpy(pos), pad(buf[pos], lengths[pos], pad_value),
                               torch.from_numpy(lengths[pos].copy()), int(b)))
    return out
