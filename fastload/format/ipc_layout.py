"""Where a row's bytes lie inside an Arrow IPC file, read from its footer and batch header.

A remote dataset reads a MixUp/CutMix partner image, which may be any row of the dataset, by
a ranged GET of that row's bytes instead of downloading its whole shard. That needs the file
offsets of the ``image`` column's offsets and data buffers, which pyarrow does not expose:
they are in the footer (where the record batch starts) and in the batch's message header
(the buffer list). Both are flatbuffers; this module reads the few fields it needs.

Every number read is checked against the file size before it is used (a damaged or forged
footer raises ``ValueError``, never reads out of bounds), compressed bodies are refused
(a ranged read of a compressed buffer is useless) and only files with one record batch are
accepted (what fastload writes).
"""
from __future__ import annotations

import struct
from typing import Callable, List, NamedTuple, Tuple

MAGIC = b"ARROW1"
_RECORD_BATCH = 3  # MessageHeader union: NONE, Schema, DictionaryBatch, RecordBatch, ...


class Layout(NamedTuple):
    """File offsets of one record batch's buffers: ``buffers[i] = (file offset, length)``."""
    num_rows: int
    buffers: List[Tuple[int, int]]


class _FB:
    """Bounds-checked reads of a flatbuffer held in ``buf``."""

    def __init__(self, buf: bytes, what: str):
        self.buf, self.what = buf, what

    def _u(self, fmt: str, pos: int):
        if pos < 0 or pos + struct.calcsize(fmt) > len(self.buf):
            raise ValueError(f"{self.what}: flatbuffer offset {pos} outside its {len(self.buf)} bytes")
        return struct.unpack_from(fmt, self.buf, pos)[0]

    def root(self) -> int:
        return self._u("<I", 0)

    def field(self, table: int, i: int):
        """Absolute position of field ``i`` of the table at ``table`` (None: absent)."""
        vt = table - self._u("<i", table)
        vt_len = self._u("<H", vt)
        if 4 + 2 * i >= vt_len:
            return None
        off = self._u("<H", vt + 4 + 2 * i)
        return table + off if off else None

    def ref(self, pos: int) -> int:
        return pos + self._u("<I", pos)

    def vector(self, table: int, i: int, stride: int) -> Tuple[int, int]:
        """(position of element 0, count) of a vector of structs; (0, 0) when absent."""
        p = self.field(table, i)
        if p is None:
            return 0, 0
        v = self.ref(p)
        n = self._u("<I", v)
        if v + 4 + n * stride > len(self.buf):
            raise ValueError(f"{self.what}: a vector of {n} entries runs past the buffer")
        return v + 4, n


def footer_span(tail: bytes, file_size: int) -> Tuple[int, int]:
    """(start, length) of the footer flatbuffer, from the file's last bytes ``tail``."""
    if len(tail) < 10 or tail[-6:] != MAGIC:
        raise ValueError("not an Arrow IPC file (no ARROW1 trailer)")
    n = struct.unpack_from("<i", tail, len(tail) - 10)[0]
    start = file_size - 10 - n
    if n <= 0 or start < 8:
        raise ValueError(f"footer length {n} does not fit a file of {file_size} bytes")
    return start, n


def batch_block(footer: bytes, file_size: int) -> Tuple[int, int, int]:
    """(offset, metadata length, body length) of the file's only record batch."""
    fb = _FB(footer, "Arrow footer")
    root = fb.root()
    pos, n = fb.vector(root, 3, 24)  # recordBatches: [Block {offset i64, metaDataLength i32, pad, bodyLength i64}]
    if n != 1:
        raise ValueError(f"Arrow file holds {n} record batches, expected 1")
    off, meta_len, _, body_len = struct.unpack_from("<qiiq", footer, pos)
    if off < 8 or meta_len <= 8 or body_len < 0 or off + meta_len + body_len > file_size:
        raise ValueError(f"record batch block ({off}, {meta_len}, {body_len}) outside a file of {file_size} bytes")
    return off, meta_len, body_len


def batch_layout(meta: bytes, block: Tuple[int, int, int]) -> Layout:
    """The buffer list of the record batch whose encapsulated message header is ``meta``."""
    off, meta_len, body_len = block
    start = 8 if meta[:4] == b"\xff\xff\xff\xff" else 4  # continuation marker, then the length
    size = struct.unpack_from("<i", meta, start - 4)[0]
    if size <= 0 or start + size > len(meta):
        raise ValueError(f"message header length {size} outside its {len(meta)}-byte block")
    fb = _FB(meta[start:start + size], "Arrow record batch header")
    msg = fb.root()
    kind = fb.field(msg, 1)
    if kind is None or fb._u("<B", kind) != _RECORD_BATCH:
        raise ValueError("the block's message is not a record batch")
    hdr = fb.field(msg, 2)
    if hdr is None:
        raise ValueError("record batch message without a header")
    rb = fb.ref(hdr)
    if fb.field(rb, 3) is not None:
        raise ValueError("compressed record batch: its buffers cannot be read by range")
    length = fb.field(rb, 0)
    num_rows = fb._u("<q", length) if length is not None else 0
    pos, n = fb.vector(rb, 2, 16)  # buffers: [Buffer {offset i64, length i64}] relative to the body
    body = off + meta_len
    bufs = []
    for k in range(n):
        b_off, b_len = struct.unpack_from("<qq", fb.buf, pos + 16 * k)
        if b_off < 0 or b_len < 0 or b_off + b_len > body_len:
            raise ValueError(f"buffer {k} ({b_off}, {b_len}) outside the {body_len}-byte body")
        bufs.append((body + b_off, b_len))
    return Layout(int(num_rows), bufs)


def buffer_index(schema, column: str) -> int:
    """Index in the buffer list of ``column``'s first buffer (its validity bitmap): buffers
    come field by field, depth first."""
    import pyarrow as pa

    def count(t) -> int:
        if pa.types.is_binary(t) or pa.types.is_string(t) or pa.types.is_large_binary(t) \
                or pa.types.is_large_string(t):
            return 3
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            return 2 + count(t.value_type)
        if pa.types.is_struct(t):
            return 1 + sum(count(t.field(i).type) for i in range(t.num_fields))
        if pa.types.is_fixed_size_binary(t) or pa.types.is_primitive(t):
            return 2
        raise ValueError(f"no buffer count for Arrow type {t}")

    k = 0
    for f in schema:
        if f.name == column:
            return k
        k += count(f.type)
    raise KeyError(column)


def row_locator(read: Callable[[int, int], bytes], file_size: int, schema, column: str) -> "RowLocator":
    """A :class:`RowLocator` of ``column`` (a large_binary column) in the file that
    ``read(start, end)`` reads by range: 3 reads (tail, header, offsets), then one per row.
    A damaged file raises ValueError; every span it returns lies inside the file."""
    try:
        return _row_locator(read, file_size, schema, column)
    except (struct.error, IndexError, OverflowError) as e:
        raise ValueError(f"damaged Arrow footer or header ({e})") from e


def _row_locator(read, file_size, schema, column):
    import pyarrow as pa

    if not pa.types.is_large_binary(schema.field(column).type):
        raise ValueError(f"column {column!r} is {schema.field(column).type}, expected large_binary")
    tail = read(max(0, file_size - 65536), file_size)
    start, n = footer_span(tail, file_size)
    t0 = file_size - len(tail)
    footer = tail[start - t0:start - t0 + n] if start >= t0 else read(start, start + n)
    block = batch_block(footer, file_size)
    layout = batch_layout(read(block[0], block[0] + block[1]), block)
    k = buffer_index(schema, column)
    if k + 2 >= len(layout.buffers):
        raise ValueError(f"the record batch lists {len(layout.buffers)} buffers; column {column!r} needs {k + 3}")
    (o_pos, o_len), (d_pos, d_len) = layout.buffers[k + 1], layout.buffers[k + 2]
    rows = layout.num_rows
    if o_len < 8 * (rows + 1):
        raise ValueError(f"column {column!r}: offsets buffer of {o_len} bytes for {rows} rows")
    import numpy as np

    offs = np.frombuffer(read(o_pos, o_pos + 8 * (rows + 1)), np.int64)
    if len(offs) != rows + 1 or offs[0] < 0 or (np.diff(offs) < 0).any() or offs[-1] > d_len:
        raise ValueError(f"column {column!r}: offsets not monotonic inside the {d_len}-byte data buffer")
    return RowLocator(rows, d_pos, offs)


class RowLocator(NamedTuple):
    num_rows: int
    data_pos: int
    offsets: "object"  # int64[num_rows + 1], checked

    def span(self, row: int) -> Tuple[int, int]:
        """File byte range [start, end) of ``row``'s value."""
        if not 0 <= row < self.num_rows:
            raise IndexError(f"row {row} outside [0, {self.num_rows})")
        return self.data_pos + int(self.offsets[row]), self.data_pos + int(self.offsets[row + 1])


__all__ = ["Layout", "RowLocator", "row_locator", "buffer_index", "batch_layout", "batch_block", "footer_span"]
