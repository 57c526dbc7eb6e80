"""Storage of the extension records (``schema.AUG_EXT``) in the ``augs_ext`` column: one
blob per row holding that row's N extension records, field-tagged.

Blob (version 2): header (version u8, unused u8, field count u16, n u32, body bytes u32),
then one tag per stored field (name length u8, name, type code length u8, numpy type code,
component count u8), then the fields' parts through the shard codec
(``fastload.format.shards``: each part zstandard-compressed where that is smaller, every
decompression bounded by the size the tags and ``n`` imply before anything is allocated).
A part holds one field of every record, its bytes shuffled by position (byte 0 of every
value, then byte 1, ...). Only fields that differ from the schema's default somewhere in the
row are stored; a field the blob does not hold reads as its default. So an extension field
added to the schema is just one more tag: older blobs read it as its default, and a blob
holding a field this fastload does not know is an error naming it, not a silent drop.

A row whose records are all empty (``params.empty_ext``) is stored as an empty blob.
Version 1 blobs (the 65-byte record of schema v2's first release, one zstandard frame of the
whole shuffled record) still read. Every corruption raises ``CorruptDataError``.
"""
from __future__ import annotations

import struct
from typing import Optional

import numpy as np

from fastload.format import shards
from fastload.format.manifest import CorruptDataError
from fastload.sample import schema as S
from fastload.sample.params import AUG_EXT_DTYPE, empty_ext

EXT_BLOB_VERSION = 2
_HDR = struct.Struct("<BBHII")
# The field layout of version 1 blobs (frozen: what the first release wrote).
_V1_FIELDS = (("ext", "u1", 1), ("ra_vals", "<f4", 4), ("pra_ops", "u1", 4), ("pra_mags", "i1", 4),
              ("pra_vals", "<f4", 4), ("perase", "<u2", 4), ("mixup_f", "<f8", 1), ("cutmix_lam", "<f8", 1))
_V1_SIZE = sum(np.dtype(c).itemsize * k for _, c, k in _V1_FIELDS)
_V1_RAW, _V1_ZSTD = 0, 1


def _corrupt(detail: str) -> CorruptDataError:
    return CorruptDataError(None, f"corrupt augs_ext blob: {detail}")


def _tag(f: S.Field) -> bytes:
    name, code = f.name.encode(), f.code.encode()
    return bytes([len(name)]) + name + bytes([len(code)]) + code + bytes([f.count])


def encode_ext(ext: np.ndarray) -> bytes:
    """AUG_EXT_DTYPE[n] -> blob (lossless)."""
    ext = np.ascontiguousarray(ext, dtype=AUG_EXT_DTYPE).reshape(-1)
    n = len(ext)
    empty = empty_ext(n)
    tags, parts = [], []
    for f in S.AUG_EXT.fields:
        col = np.ascontiguousarray(ext[f.name]).reshape(n, f.count)
        if col.tobytes() == np.ascontiguousarray(empty[f.name]).reshape(n, f.count).tobytes():
            continue
        tags.append(_tag(f))
        parts.append(shards._shuffle(col))
    if not tags:
        return b""
    body = b"".join(tags) + shards._pack_parts(parts)
    return _HDR.pack(EXT_BLOB_VERSION, 0, len(tags), n, len(body)) + body


def _read_tags(mv: memoryview, count: int):
    pos, out = 0, []
    known = {f.name: f for f in S.AUG_EXT.fields}
    for _ in range(count):
        try:
            ln = mv[pos]
            name = bytes(mv[pos + 1:pos + 1 + ln]).decode("ascii")
            pos += 1 + ln
            lc = mv[pos]
            code = bytes(mv[pos + 1:pos + 1 + lc]).decode("ascii")
            pos += 1 + lc
            k = mv[pos]
            pos += 1
        except (IndexError, UnicodeDecodeError):
            raise _corrupt("truncated or unreadable field tags") from None
        f = known.get(name)
        if f is None:
            raise _corrupt(f"field {name!r} is unknown to this fastload (a newer writer?): upgrade fastload")
        if (code, k) != (f.code, f.count) or any(name == g.name for g, _ in out):
            raise _corrupt(f"field {name!r} stored as {code}[{k}], the schema declares {f.code}[{f.count}]")
        out.append((f, k))
    return out, pos


def decode_ext(blob, expected_n: Optional[int] = None) -> np.ndarray:
    """Inverse of :func:`encode_ext`; a corrupt blob raises ``CorruptDataError`` (a
    ``ValueError``) before anything is allocated from its announced sizes."""
    mv = memoryview(blob).cast("B")
    if len(mv) == 0:
        if expected_n is None:
            raise ValueError("an empty augs_ext blob needs the expected record count")
        return empty_ext(expected_n)
    if len(mv) < _HDR.size:
        raise _corrupt("truncated header")
    ver, codec, nfields, n, size = _HDR.unpack_from(mv)
    if ver not in (1, EXT_BLOB_VERSION):
        raise _corrupt(f"version {ver} is not supported (this fastload reads 1 and {EXT_BLOB_VERSION})")
    if expected_n is not None and n != expected_n:
        raise _corrupt(f"{n} records (expected {expected_n} records)")
    if n > shards.MAX_AUGMENTATIONS:
        raise _corrupt(f"{n} records (at most {shards.MAX_AUGMENTATIONS})")
    if ver == 1:
        return _decode_v1(mv, codec, n, size)
    if size != len(mv) - _HDR.size:
        raise _corrupt("length mismatch")
    body = mv[_HDR.size:]
    fields, pos = _read_tags(body, nfields)
    raws = shards._unpack_parts(body[pos:], [n * f.size for f, _ in fields], "augs_ext")
    out = empty_ext(n)
    for (f, _), raw in zip(fields, raws):
        out[f.name] = shards._unshuffle(raw, n, f.count, f.dtype).reshape(out[f.name].shape)
    return out


def _decode_v1(mv: memoryview, codec: int, n: int, raw_len: int) -> np.ndarray:
    if raw_len != n * _V1_SIZE:
        raise _corrupt(f"{n} records / {raw_len} bytes (records of {_V1_SIZE} bytes)")
    if codec not in (_V1_RAW, _V1_ZSTD):
        raise _corrupt(f"unknown codec {codec}")
    raw = shards._decompress(shards.CODEC_ZSTD if codec == _V1_ZSTD else shards.CODEC_RAW, mv[_HDR.size:],
                             raw_len, "augs_ext")
    a = np.frombuffer(raw, np.uint8).reshape(_V1_SIZE, n).T
    v1 = np.ascontiguousarray(a).view(np.dtype([(nm, c, (k,)) if k > 1 else (nm, c) for nm, c, k in _V1_FIELDS]))
    out = empty_ext(n)
    for nm, _, _ in _V1_FIELDS:
        out[nm] = v1[nm].reshape(out[nm].shape)
    return out
