"""Storage of the schema-v2 extension records (``params.AUG_EXT_DTYPE``) in the ``augs_ext``
column: one blob per row holding that row's N extension records.

Blob: header (version u8, codec u8, pad u16, n u32, raw bytes u32) then the records' bytes
shuffled by byte position (record byte 0 of every record, then byte 1, ...: most fields are
zero or repeat along a row) and zstandard-compressed where that is smaller. Decompression is
bounded by ``n * itemsize``, which the header announces and the manifest's
``num_augmentations`` confirms. A row whose records are all empty (``params.empty_ext``:
nothing beyond the base record) is stored as an empty blob.
"""
from __future__ import annotations

import struct
from typing import Optional

import numpy as np

from fastload.sample.params import AUG_EXT_DTYPE, empty_ext

EXT_BLOB_VERSION = 1
_HDR = struct.Struct("<BBHII")
_RAW, _ZSTD = 0, 1


def encode_ext(ext: np.ndarray) -> bytes:
    """AUG_EXT_DTYPE[n] -> blob (lossless)."""
    import zstandard

    ext = np.ascontiguousarray(ext, dtype=AUG_EXT_DTYPE).reshape(-1)
    n, size = len(ext), AUG_EXT_DTYPE.itemsize
    if ext.tobytes() == empty_ext(n).tobytes():
        return b""
    raw = np.ascontiguousarray(ext.view(np.uint8).reshape(n, size).T).tobytes()
    z = zstandard.ZstdCompressor(level=12, write_content_size=True).compress(raw)
    codec, body = (_ZSTD, z) if len(z) < len(raw) else (_RAW, raw)
    return _HDR.pack(EXT_BLOB_VERSION, codec, 0, n, len(raw)) + body


def decode_ext(blob, expected_n: Optional[int] = None) -> np.ndarray:
    """Inverse of :func:`encode_ext`; a corrupt blob raises ValueError (never over-allocates)."""
    mv = memoryview(blob)
    if len(mv) == 0:
        if expected_n is None:
            raise ValueError("an empty augs_ext blob needs the expected record count")
        return empty_ext(expected_n)
    if len(mv) < _HDR.size:
        raise ValueError("corrupt augs_ext blob: truncated header")
    ver, codec, _, n, raw_len = _HDR.unpack_from(mv)
    if ver != EXT_BLOB_VERSION:
        raise ValueError(f"augs_ext blob version {ver} is not supported (this fastload reads {EXT_BLOB_VERSION})")
    size = AUG_EXT_DTYPE.itemsize
    if raw_len != n * size or (expected_n is not None and n != expected_n):
        raise ValueError(f"corrupt augs_ext blob: {n} records / {raw_len} bytes "
                         f"(expected {expected_n} records of {size} bytes)")
    body = mv[_HDR.size:]
    if codec == _RAW:
        raw = bytes(body)
    elif codec == _ZSTD:
        import zstandard

        try:
            raw = zstandard.ZstdDecompressor().decompress(bytes(body), max_output_size=raw_len)
        except Exception as e:  # zstandard.ZstdError or output over the announced size
            raise ValueError(f"corrupt augs_ext blob: {e}") from e
    else:
        raise ValueError(f"corrupt augs_ext blob: unknown codec {codec}")
    if len(raw) != raw_len:
        raise ValueError(f"corrupt augs_ext blob: {len(raw)} bytes, header says {raw_len}")
    a = np.frombuffer(raw, np.uint8).reshape(size, n).T
    return np.ascontiguousarray(a).view(AUG_EXT_DTYPE).reshape(n).copy()
