"""Row encodings and the Arrow IPC shard layout of the reinforced format (schema v1).

One Arrow IPC file per shard, one record batch per file (so a row is one offset lookup),
one row per source image. The per-row blobs are compact and self-describing:

``augs`` (the N stored augmentation records, AUG_DTYPE): every field is split into its
components and their bytes (a columnar "byte shuffle": all first bytes of ``crop[0]``, then
all second bytes, ...). Boxes are stored losslessly as *integer pixels* whenever the
quantized fractions round-trip through the pixel grid they were sampled on (the source image
for ``crop``, the partner image for ``pcrop``, the render size for ``erase``/``cutmix``):
a 0..500 pixel value has far less entropy than its 16-bit fraction. The planes are
compressed with zstandard only when that makes them smaller.

``targets`` (top-k class ids + fp16 probabilities per augmentation): class ids as indices
into the row's own sorted class vocabulary (the same few classes recur across augmentations
of one image), fp16 probabilities as bit patterns delta-coded along k (sorted descending, so
the deltas are small), byte shuffled, zstandard where it pays.

Every decompression is bounded before it starts: a blob's header must announce the row
shape the caller expects (the manifest's N and k), each part's raw size must be the one that
shape implies, and a zstandard frame must declare exactly that content size in its own header
(zstandard ignores ``max_output_size`` when a frame declares its size, so the declared size
is read and compared first). Without an expected shape, a row holds at most
``MAX_AUGMENTATIONS`` records and ``MAX_TARGET_ENTRIES`` top-k entries. Every corruption a
decoder detects raises :class:`fastload.format.manifest.CorruptDataError` (a ``ValueError``).
"""
from __future__ import annotations

import functools
import struct
import threading
from typing import Optional, Tuple

import numpy as np

from fastload.format.manifest import CorruptDataError
from fastload.sample import schema as S
from fastload.sample.params import AUG_DTYPE, Q

BLOB_VERSION = 1
CODEC_RAW, CODEC_ZSTD = 0, 1
ZSTD_LEVEL = 12

# augs blob header: version, unused, pixel-mode bits, pad, n (u32), body bytes (u32)
_AUG_HDR = struct.Struct("<BBBBII")
# targets blob header: version, unused, vocab idx width, id width, n, k, vocab length, body bytes
_TGT_HDR = struct.Struct("<BBBBIHII")
# dense fp16 array blob: version, codec, pad, pad, raw bytes
_ARR_HDR = struct.Struct("<BBBBQ")

# boxes stored as pixels when lossless; bit i of the blob's pixel-mode byte = box i (schema order)
_BOX_FIELDS = S.box_fields(S.AUG)
_GRID = {name: S.AUG.field(name).box for name in _BOX_FIELDS}  # "source", "output" or "partner"

# Bounds on what a blob may announce when the caller gives no expected shape (the reader
# always does, from the manifest, whose validation enforces the same bounds).
MAX_AUGMENTATIONS = 1 << 16
MAX_TARGET_ENTRIES = 1 << 24  # n * k per row
MAX_ARRAY_BYTES = 1 << 30


def _corrupt(what: str, detail: str) -> CorruptDataError:
    return CorruptDataError(None, f"corrupt {what} blob: {detail}")

# zstandard (de)compressor objects are not thread-safe: the loader gathers in a background
# thread while other threads may read the same dataset, so each thread gets its own pair.
_ztls = threading.local()


def _zstd():
    pair = getattr(_ztls, "pair", None)
    if pair is None:
        import zstandard

        pair = _ztls.pair = (zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True),
                             zstandard.ZstdDecompressor())
    return pair


def _maybe_compress(payload: bytes) -> Tuple[int, bytes]:
    """zstandard only where it pays (smaller output), raw otherwise."""
    zc, _ = _zstd()
    z = zc.compress(payload)
    return (CODEC_ZSTD, z) if len(z) < len(payload) else (CODEC_RAW, payload)


def _decompress(codec: int, data, expected: int, what: str, zd=None) -> bytes:
    """One stored part back to ``expected`` bytes (bounded); ``zd``: a decompressor the
    caller already holds (batched decoders fetch it once)."""
    if codec == CODEC_RAW:
        out = data  # a view: no copy
    elif codec == CODEC_ZSTD:
        zd = zd or _zstd()[1]
        # zstandard allocates the size a frame declares (ignoring max_output_size): compare
        # it with the size the format announces before anything is allocated.
        declared = _frame_size(data)
        if declared != expected:
            raise _corrupt(what, f"zstd frame declares {'no size' if declared < 0 else f'{declared} bytes'}, "
                                 f"expected {expected}")
        try:
            out = zd.decompress(data, max_output_size=expected)
        except Exception as e:  # zstandard.ZstdError, bounded output exceeded, ...
            raise _corrupt(what, str(e)) from e
    else:
        raise _corrupt(what, f"unknown codec {codec}")
    if len(out) != expected:
        raise _corrupt(what, f"{len(out)} bytes, expected {expected}")
    return out


def _frame_size(data) -> int:
    """The content size a zstd frame declares in its header (-1: none declared or no frame)."""
    import zstandard

    try:
        return int(zstandard.frame_content_size(data))
    except zstandard.ZstdError:
        return -1


def _shuffle(arr: np.ndarray) -> bytes:
    """[n, c] array -> bytes ordered (byte, component, n)."""
    n, c = arr.shape
    b = np.ascontiguousarray(arr.T).view(np.uint8).reshape(c, n, arr.dtype.itemsize)
    return np.ascontiguousarray(b.transpose(2, 0, 1)).tobytes()


def _unshuffle(buf: np.ndarray, n: int, c: int, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    b = buf.reshape(dtype.itemsize, c, n).transpose(1, 2, 0)
    return np.ascontiguousarray(b).view(dtype).reshape(c, n).T


_dq = S.dq_array


def _rq(p: np.ndarray, n: np.ndarray) -> np.ndarray:
    return (p.astype(np.int64) * Q + n // 2) // n


def _box_dims(field: str, augs: np.ndarray, hw: Tuple[int, int], render_hw: Tuple[int, int],
              all_hw: Optional[np.ndarray]) -> np.ndarray:
    """[n, 4] pixel extents (h, w, h, w) of the grid each box of ``field`` was sampled on."""
    n = len(augs)
    if _GRID[field] == "source":
        h, w = hw
        d = np.broadcast_to(np.array([h, w, h, w], np.int64), (n, 4))
    elif _GRID[field] == "output":
        h, w = render_hw
        d = np.broadcast_to(np.array([h, w, h, w], np.int64), (n, 4))
    else:  # pcrop: the partner's own image (identity grid Q when there is no partner)
        d = np.full((n, 4), Q, np.int64)
        p = augs["partner"].astype(np.int64)
        has = p >= 0
        if all_hw is not None and has.any():
            if p[has].max() >= len(all_hw):
                return None  # partner outside the known table: keep raw
            phw = all_hw[p[has]].astype(np.int64)
            d[has] = np.concatenate([phw, phw], axis=1)
        elif has.any():
            return None
    return d


_PART = struct.Struct("<BII")  # codec, raw bytes, stored bytes


def _pack_parts(parts) -> bytes:
    """Each part compressed on its own (zstd only where it pays): fields differ in entropy."""
    out = []
    for p in parts:
        codec, data = _maybe_compress(p)
        out.append(_PART.pack(codec, len(p), len(data)) + data)
    return b"".join(out)


def _unpack_parts(buf: memoryview, raw_sizes, what: str, zd=None):
    """Inverse of :func:`_pack_parts`; every part is bounded by its expected raw size.
    (Inlined decompression: this runs for every row of every batch.)"""
    pos, out, n = 0, [], len(buf)
    psize, unpack = _PART.size, _PART.unpack_from
    for expected in raw_sizes:
        if pos + psize > n:
            raise _corrupt(what, "truncated")
        codec, raw, stored = unpack(buf, pos)
        pos += psize
        if raw != expected or pos + stored > n:
            raise _corrupt(what, f"part of {raw} bytes, expected {expected}")
        if codec == CODEC_RAW and stored != expected:
            raise _corrupt(what, f"raw part of {stored} bytes, expected {expected}")
        if codec == CODEC_ZSTD and zd is None:
            zd = _zstd()[1]
        got = _decompress(codec, buf[pos:pos + stored], expected, what, zd)
        out.append(np.frombuffer(got, np.uint8))
        pos += stored
    if pos != n:
        raise _corrupt(what, f"{n - pos} trailing bytes")
    return out


# Planes are compressed in groups of similar statistics (measured: smaller than one frame
# per field or one frame for all, and only three frames to decode).
_GROUPS = S.codec_groups(S.AUG)
_ORDER = tuple(f for g in _GROUPS for f in g)
assert sorted(_ORDER) == sorted(AUG_DTYPE.names)


def _field_shape_uncached(name: str):
    sub = AUG_DTYPE.fields[name][0]
    base = sub.base if sub.shape else sub
    return base, (int(np.prod(sub.shape)) if sub.shape else 1)


_FIELD_SHAPES = {name: _field_shape_uncached(name) for name in AUG_DTYPE.names}
_field_shape = _FIELD_SHAPES.__getitem__


def encode_augs(augs: np.ndarray, hw: Tuple[int, int], render_hw: Tuple[int, int],
                all_hw: Optional[np.ndarray] = None) -> bytes:
    """AUG_DTYPE[n] -> compact blob (lossless; see the module docstring).

    ``hw``: the pixel size the crops were sampled on; ``render_hw``: the grid of the erase
    and CutMix boxes; ``all_hw``: every row's size (partner crops).
    """
    augs = np.ascontiguousarray(augs, dtype=AUG_DTYPE)
    n = len(augs)
    planes, mode = {}, 0
    for name in AUG_DTYPE.names:
        col = augs[name].reshape(n, -1)
        if name in _BOX_FIELDS:
            dims = _box_dims(name, augs, hw, render_hw, all_hw)
            if dims is not None and np.all(dims > 0):
                p = _dq(col, dims)
                if np.array_equal(_rq(p, dims), col.astype(np.int64)) and p.max(initial=0) < 65536:
                    col = p.astype(np.uint16)
                    mode |= 1 << _BOX_FIELDS.index(name)
        planes[name] = _shuffle(col)
    body = _pack_parts([b"".join(planes[f] for f in g) for g in _GROUPS])
    return _AUG_HDR.pack(BLOB_VERSION, 0, mode, 0, n, len(body)) + body


def _raw_parts(blob, hdr: struct.Struct, what: str, sizes_fn, zd=None, check=None):
    """Header + decompressed parts; ``check(head)`` vets the announced shape before any
    part is decompressed (so a forged header cannot size an allocation)."""
    if not isinstance(blob, memoryview):
        blob = memoryview(blob)
    if len(blob) < hdr.size:
        raise _corrupt(what, "truncated header")
    head = hdr.unpack_from(blob)
    if head[0] != BLOB_VERSION:
        raise _corrupt(what, f"version {head[0]} (this fastload reads {BLOB_VERSION})")
    if head[-1] != len(blob) - hdr.size:
        raise _corrupt(what, "length mismatch")
    if check is not None:
        check(head)
    return head, _unpack_parts(blob[hdr.size:], sizes_fn(head), what, zd)


def _aug_check(expected_n):
    def check(head):
        n = head[4]
        if expected_n is not None and n != expected_n:
            raise _corrupt("augs", f"{n} records, manifest says {expected_n}")
        if n > MAX_AUGMENTATIONS:
            raise _corrupt("augs", f"{n} records (at most {MAX_AUGMENTATIONS})")
        if head[2] >> len(_BOX_FIELDS):
            raise _corrupt("augs", f"unknown pixel-mode bits {head[2]:#x}")
    return check


def _tgt_check(expected):
    def check(head):
        _, _, idx_w, id_w, n, k, nv, _ = head
        if expected is not None and (n, k) != tuple(expected):
            raise _corrupt("targets", f"shape {(n, k)}, manifest says {tuple(expected)}")
        if n * k > MAX_TARGET_ENTRIES or nv > n * k:
            raise _corrupt("targets", f"shape {(n, k)} with a vocabulary of {nv} is out of bounds")
    return check


@functools.lru_cache(maxsize=16)
def _aug_gather_index(n: int) -> np.ndarray:
    """[n, record bytes] positions in the concatenated shuffled planes of every record byte."""
    start, pos = {}, 0
    for name in _ORDER:
        dt, c = _field_shape(name)
        start[name] = pos
        pos += n * c * dt.itemsize
    base = []
    for name in AUG_DTYPE.names:  # record layout order
        dt, c = _field_shape(name)
        for comp in range(c):  # component, then little-endian byte
            for b in range(dt.itemsize):
                base.append(start[name] + (b * c + comp) * n)
    return np.asarray(base, np.int64)[None, :] + np.arange(n, dtype=np.int64)[:, None]


def _aug_sizes(head):
    return _aug_sizes_n(head[4])


@functools.lru_cache(maxsize=16)
def _aug_sizes_n(n: int):
    return [sum(n * c * dt.itemsize for dt, c in (_field_shape(f) for f in g)) for g in _GROUPS]


def _unpixel(out: np.ndarray, mode: int, hw, render_hw, all_hw) -> np.ndarray:
    for name in _BOX_FIELDS:  # undo the pixel transform (pcrop needs ``partner`` decoded)
        if mode >> _BOX_FIELDS.index(name) & 1:
            dims = _box_dims(name, out, hw, render_hw, all_hw)
            if dims is None or (dims < 1).any():
                raise _corrupt("augs", "partner outside the dataset or of zero size")
            v = out[name].astype(np.int64)
            if (v > dims).any():  # a stored pixel beyond its grid (would wrap around in uint16)
                raise _corrupt("augs", f"{name} pixel outside its image")
            out[name] = _rq(v, dims).astype(np.uint16)
    return out


def _check_grid(*grids) -> None:
    for g in grids:
        if min(int(g[0]), int(g[1])) < 1:
            raise ValueError(f"image sizes must be positive, got {tuple(int(v) for v in g)}")


def _check_partners(out: np.ndarray, all_hw) -> None:
    p = out["partner"]
    if p.size and (p.min() < -1 or (all_hw is not None and p.max() >= len(all_hw))):
        raise _corrupt("augs", "partner outside the dataset")


def decode_augs(blob, hw: Tuple[int, int], render_hw: Tuple[int, int],
                all_hw: Optional[np.ndarray] = None, expected_n: Optional[int] = None) -> np.ndarray:
    """Inverse of :func:`encode_augs`: all N records of a row."""
    _check_grid(hw, render_hw)
    head, raws = _raw_parts(blob, _AUG_HDR, "augs", _aug_sizes, check=_aug_check(expected_n))
    n, mode = head[4], head[2]
    raw = np.concatenate(raws) if raws else np.zeros(0, np.uint8)
    out = raw[_aug_gather_index(n)].view(AUG_DTYPE).reshape(n).copy()
    _check_partners(out, all_hw)
    return _unpixel(out, mode, hw, render_hw, all_hw)


def decode_aug_at(blob, j: int, hw: Tuple[int, int], render_hw: Tuple[int, int],
                  all_hw: Optional[np.ndarray] = None, expected_n: Optional[int] = None) -> np.ndarray:
    """Record ``j`` only (AUG_DTYPE[1]): the row is decompressed, only one record assembled."""
    _check_grid(hw, render_hw)
    head, raws = _raw_parts(blob, _AUG_HDR, "augs", _aug_sizes, check=_aug_check(expected_n))
    n, mode = head[4], head[2]
    if not 0 <= j < n:
        raise IndexError(f"augmentation {j} out of range [0, {n})")
    raw = np.concatenate(raws)
    out = raw[_aug_gather_index(n)[j]].view(AUG_DTYPE).copy()
    _check_partners(out, all_hw)
    if mode:  # undo the pixel transform on one record with plain integers (no array overhead)
        r = out[0]
        for bit, name in enumerate(_BOX_FIELDS):
            if not mode >> bit & 1:
                continue
            if _GRID[name] == "source":
                h, w = hw
            elif _GRID[name] == "output":
                h, w = render_hw
            elif r["partner"] >= 0:
                if all_hw is None or r["partner"] >= len(all_hw):
                    raise _corrupt("augs", "partner outside the dataset")
                h, w = (int(v) for v in all_hw[r["partner"]])
                if min(h, w) < 1:
                    raise _corrupt("augs", "partner of zero size")
            else:
                h = w = Q
            v = [int(x) for x in r[name]]
            if max(v[0], v[2]) > h or max(v[1], v[3]) > w:
                raise _corrupt("augs", f"{name} pixel outside its image")
            r[name] = [(v[0] * Q + h // 2) // h, (v[1] * Q + w // 2) // w,
                       (v[2] * Q + h // 2) // h, (v[3] * Q + w // 2) // w]
    return out


_IDX_DT = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def encode_targets(ids: np.ndarray, probs: np.ndarray) -> bytes:
    """Top-k ids [n, k] (int) and probabilities [n, k] (stored as fp16) -> compact blob."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or np.shape(probs) != ids.shape:
        raise ValueError(f"ids and probs must be [n, k] of one shape, got {ids.shape} and {np.shape(probs)}")
    n, k = ids.shape
    if ids.size and (ids.min() < 0 or ids.max() >= 2**32):
        raise ValueError("class ids must be in [0, 2**32)")
    vocab = np.unique(ids).astype(np.int64)
    id_w = 2 if (vocab.size == 0 or vocab[-1] < 65536) else 4
    idx_w = 1 if len(vocab) <= 256 else (2 if len(vocab) <= 65536 else 4)
    idx = np.searchsorted(vocab, ids).astype(_IDX_DT[idx_w])
    vdelta = np.diff(vocab, prepend=0).astype(np.uint16 if id_w == 2 else np.uint32)
    bits = np.asarray(probs, dtype=np.float16).view(np.uint16).reshape(n, k).astype(np.int32)
    d = bits.copy()
    d[:, 1:] = bits[:, :-1] - bits[:, 1:]  # sorted descending: small non-negative deltas
    d = (d & 0xFFFF).astype(np.uint16)
    # two frames: the class part (vocabulary + indices) and the probabilities (measured:
    # as small as three frames, one fewer to decode)
    body = _pack_parts([vdelta.tobytes() + _shuffle(idx.reshape(n, k)), _shuffle(d)])
    return _TGT_HDR.pack(BLOB_VERSION, 0, idx_w, id_w, n, k, len(vocab), len(body)) + body


def _tgt_sizes(head):
    _, _, idx_w, id_w, n, k, nv, _ = head
    if idx_w not in _IDX_DT or id_w not in (2, 4):
        raise _corrupt("targets", "inconsistent header")
    return [nv * id_w + n * k * idx_w, n * k * 2]


def _targets_common(blob, expected):
    head, (rvi, rp) = _raw_parts(blob, _TGT_HDR, "targets", _tgt_sizes, check=_tgt_check(expected))
    _, _, idx_w, id_w, n, k, nv, _ = head
    rv, ri = rvi[:nv * id_w], rvi[nv * id_w:]
    vocab = np.cumsum(rv.view(np.uint16 if id_w == 2 else np.uint32).astype(np.int64))
    return n, k, nv, idx_w, vocab, ri, rp


def _finish_targets(idx, d, vocab, nv):
    bits = np.empty_like(d)
    bits[:, 0] = d[:, 0]
    bits[:, 1:] = d[:, :1] - np.cumsum(d[:, 1:], axis=1)
    if idx.size and idx.max() >= max(nv, 1):
        raise _corrupt("targets", "class index outside the vocabulary")
    ids = vocab[idx] if nv else np.zeros(idx.shape, np.int64)
    return ids, (bits & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float32)


def decode_targets(blob, expected: Optional[Tuple[int, int]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`encode_targets`: (ids int64[n, k], probs float32[n, k])."""
    n, k, nv, idx_w, vocab, ri, rp = _targets_common(blob, expected)
    idx = _unshuffle(ri, n, k, _IDX_DT[idx_w]).astype(np.int64)
    d = _unshuffle(rp, n, k, np.uint16).astype(np.int64)
    return _finish_targets(idx, d, vocab, nv)


def decode_target_at(blob, j: int, expected: Optional[Tuple[int, int]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Augmentation ``j`` only: (ids int64[k], probs float32[k])."""
    n, k, nv, idx_w, vocab, ri, rp = _targets_common(blob, expected)
    if not 0 <= j < n:
        raise IndexError(f"augmentation {j} out of range [0, {n})")
    planes = np.arange(k, dtype=np.int64)[:, None] * n + j  # [k, 1]: (component, n) position
    pos_i = (np.arange(idx_w)[None, :] * k * n + planes).reshape(-1)  # comp-major, byte little-endian
    pos_p = (np.arange(2)[None, :] * k * n + planes).reshape(-1)
    idx = ri[pos_i].view(_IDX_DT[idx_w]).astype(np.int64)[None]
    d = rp[pos_p].view(np.uint16).astype(np.int64)[None]
    ids, probs = _finish_targets(idx, d, vocab, nv)
    return ids[0], probs[0]


def encode_array(arr: np.ndarray) -> bytes:
    """A dense fp16 array (embeddings) -> blob, byte-shuffled + zstd only where it pays."""
    a = np.ascontiguousarray(arr, dtype=np.float16)
    flat = a.reshape(-1, a.shape[-1]) if a.ndim > 1 else a.reshape(-1, 1)
    payload = _shuffle(flat.reshape(-1, 1))
    codec, data = _maybe_compress(payload)
    if codec == CODEC_RAW:  # not worth it: keep the plain layout (zero-copy readable)
        payload = a.tobytes()
    return _ARR_HDR.pack(BLOB_VERSION, codec, 0, 0, len(payload)) + (data if codec else payload)


def decode_array(blob, shape: Tuple[int, ...]) -> np.ndarray:
    blob = memoryview(blob)
    expected = int(np.prod(shape)) * 2
    if expected > MAX_ARRAY_BYTES:
        raise ValueError(f"embedding shape {tuple(shape)} exceeds {MAX_ARRAY_BYTES} bytes")
    if len(blob) < _ARR_HDR.size:
        raise _corrupt("embedding", "truncated header")
    ver, codec, _, _, size = _ARR_HDR.unpack_from(blob)
    if ver != BLOB_VERSION or size != expected:
        raise _corrupt("embedding", f"{size} bytes for shape {tuple(shape)}")
    body = blob[_ARR_HDR.size:]
    if codec == CODEC_RAW:
        if len(body) != expected:
            raise _corrupt("embedding", "truncated")
        return np.frombuffer(body, np.float16).reshape(shape)
    raw = np.frombuffer(_decompress(codec, body, expected, "embedding"), np.uint8)
    return _unshuffle(raw, expected // 2, 1, np.float16).reshape(shape)


# ---------------------------------------------------------------------------------------
# Arrow schema


def arrow_schema(kind: str, ext: bool = False):
    """``ext``: schema v2's optional ``augs_ext`` column (fastload.format.record_ext)."""
    import pyarrow as pa

    fields = [
        pa.field("id", pa.int64()),
        pa.field("key", pa.large_string()),
        pa.field("hash", pa.binary(16)),
        pa.field("orig_h", pa.int32()),
        pa.field("orig_w", pa.int32()),
        pa.field("src_h", pa.int32()),  # the pixels stored/rendered (== orig unless re-encoded)
        pa.field("src_w", pa.int32()),
        pa.field("label", pa.int64()),
        pa.field("image", pa.large_binary()),
        pa.field("augs", pa.large_binary()),
    ]
    if kind == "classification":
        fields.append(pa.field("targets", pa.large_binary()))
    else:
        fields += [pa.field("image_emb", pa.large_binary()), pa.field("text_emb", pa.large_binary()),
                   pa.field("captions", pa.list_(pa.large_string())),
                   pa.field("syn_captions", pa.list_(pa.large_string()))]
    if ext:
        fields.append(pa.field("augs_ext", pa.large_binary()))
    return pa.schema(fields)


# ---------------------------------------------------------------------------------------
# batched access (the loader's hot path): one record per row, few numpy calls per batch


def decode_augs_batch(blobs, js, hws: np.ndarray, render_hw: Tuple[int, int], all_hw: Optional[np.ndarray],
                      n: int) -> np.ndarray:
    """Record ``js[b]`` of row blob ``blobs[b]`` for a batch -> AUG_DTYPE[B] (rows hold ``n`` each)."""
    B = len(blobs)
    js = np.asarray(js, np.int64)
    if B == 0:
        return np.empty(0, AUG_DTYPE)
    if js.min() < 0 or js.max() >= n:
        raise IndexError(f"augmentation index out of range [0, {n})")
    parts, modes = [], np.empty(B, np.int64)
    zd = _zstd()[1]
    check = _aug_check(n)
    for b, blob in enumerate(blobs):
        try:
            head, raws = _raw_parts(blob, _AUG_HDR, "augs", _aug_sizes, zd, check)
        except CorruptDataError as e:
            e.batch_index = b  # the reader names the shard and row
            raise
        modes[b] = head[2]
        parts += raws
    raw = np.concatenate(parts).reshape(B, -1)
    rec = raw[np.arange(B)[:, None], _aug_gather_index(n)[js]]
    out = np.ascontiguousarray(rec).view(AUG_DTYPE).reshape(B).copy()
    hws = np.asarray(hws, np.int64).reshape(B, 2)
    if hws.size and hws.min() < 1 or min(render_hw) < 1:
        raise ValueError("image sizes must be positive")
    p = out["partner"]
    if p.min() < -1 or (all_hw is not None and p.max() >= len(all_hw)):
        e = _corrupt("augs", "partner outside the dataset")
        e.batch_index = int(np.flatnonzero((p < -1) | (p >= (len(all_hw) if all_hw is not None else 2**31)))[0])
        raise e
    for bit, name in enumerate(_BOX_FIELDS):
        sel = (modes >> bit & 1).astype(bool)
        if not sel.any():
            continue
        if _GRID[name] == "source":
            d = np.concatenate([hws, hws], 1)
        elif _GRID[name] == "output":
            d = np.broadcast_to(np.array(list(render_hw) * 2, np.int64), (B, 4))
        else:
            p = out["partner"].astype(np.int64)
            d = np.full((B, 4), Q, np.int64)
            has = p >= 0
            if has.any():
                if all_hw is None or p[has].max() >= len(all_hw):
                    raise _corrupt("augs", "partner outside the dataset")
                phw = np.asarray(all_hw, np.int64)[p[has]]
                if phw.min() < 1:
                    raise _corrupt("augs", "partner of zero size")
                d[has] = np.concatenate([phw, phw], 1)
        v = out[name].astype(np.int64)
        over = sel & (v > d).any(1)
        if over.any():
            e = _corrupt("augs", f"{name} pixel outside its image")
            e.batch_index = int(np.flatnonzero(over)[0])
            raise e
        out[name] = np.where(sel[:, None], _rq(v, d), v).astype(np.uint16)
    return out


def decode_targets_batch(blobs, js, n: int, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Targets of augmentation ``js[b]`` of row blob ``blobs[b]``: (ids int64[B, k], probs float32[B, k])."""
    B = len(blobs)
    js = np.asarray(js, np.int64)
    ids = np.zeros((B, k), np.int64)
    probs = np.zeros((B, k), np.float32)
    if B == 0:
        return ids, probs
    if js.min() < 0 or js.max() >= n:
        raise IndexError(f"augmentation index out of range [0, {n})")
    vparts, iparts, pparts, nvs, slow = [], [], [], np.zeros(B, np.int64), []
    zd = _zstd()[1]
    check = _tgt_check((n, k))
    for b, blob in enumerate(blobs):
        try:
            head, (rvi, rp) = _raw_parts(blob, _TGT_HDR, "targets", _tgt_sizes, zd, check)
        except CorruptDataError as e:
            e.batch_index = b
            raise
        _, _, idx_w, id_w, hn, hk, nv, _ = head
        if idx_w != 1 or id_w != 2:  # rare layouts (vocabulary > 256 classes): per-row path
            slow.append(b)
            rv, ri = np.zeros(0, np.uint8), np.zeros(n * k, np.uint8)
        else:
            rv, ri = rvi[:nv * 2], rvi[nv * 2:]
        vparts.append(rv)
        iparts.append(ri)
        pparts.append(rp)
        nvs[b] = nv if b not in slow else 0
    rows = np.arange(B)[:, None]
    planes = np.arange(k, dtype=np.int64)[None, :] * n + js[:, None]  # [B, k]
    idx = np.concatenate(iparts).reshape(B, n * k)[rows, planes].astype(np.int64)
    rp = np.concatenate(pparts).reshape(B, 2 * n * k)
    d = (rp[rows, planes].astype(np.int64) | (rp[rows, planes + n * k].astype(np.int64) << 8))
    vocab_all = np.cumsum(np.concatenate(vparts).view(np.uint16).astype(np.int64))
    vstart = np.concatenate([[0], np.cumsum(nvs)[:-1]])
    base = np.where(vstart > 0, vocab_all[np.maximum(vstart - 1, 0)] if len(vocab_all) else 0, 0)
    fast = np.ones(B, bool)
    fast[slow] = False
    if fast.any():
        bad = (idx >= nvs[:, None]).any(1) & fast
        if bad.any():
            e = _corrupt("targets", "class index outside the vocabulary")
            e.batch_index = int(np.flatnonzero(bad)[0])
            raise e
        ids[fast] = vocab_all[vstart[fast, None] + idx[fast]] - base[fast, None]
    bits = np.empty_like(d)
    bits[:, 0] = d[:, 0]
    bits[:, 1:] = d[:, :1] - np.cumsum(d[:, 1:], axis=1)
    probs[:] = (bits & 0xFFFF).astype(np.uint16).view(np.float16)
    for b in slow:
        try:
            ids[b], probs[b] = decode_target_at(blobs[b], int(js[b]), (n, k))
        except CorruptDataError as e:
            e.batch_index = b
            raise
    return ids, probs
