"""Fixed-length baselines for Dataset Decomposition, on the same tokenized documents.

* :func:`concat_and_chunk`: documents (each with EOT appended) concatenated into one stream
  and cut into rows of ``seq_len + 1`` tokens at stride ``seq_len`` (row r covers
  ``stream[r*L : r*L + L + 1]``, so its last token is the next row's first input; the usual
  GPT/Megatron layout). No padding, but attention crosses document boundaries:
  :func:`cross_document_fraction` measures the share of causal attention pairs that do.
* :func:`pack_documents`: documents packed whole (split only when longer than ``seq_len``)
  into rows of ``seq_len``, next-fit in document order, padded at the end of a row, with
  ``cu_seqlens`` and restarting ``position_ids`` for varlen attention: no cross-document
  attention, some padding. :func:`block_causal_mask` turns ``cu_seqlens`` into the dense
  mask it stands for.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

IGNORE_INDEX = -100

__all__ = ["concat_and_chunk", "cross_document_fraction", "pack_documents", "block_causal_mask",
           "IGNORE_INDEX"]


def _stream(tokens: np.ndarray, offsets: np.ndarray, eot_id: int) -> np.ndarray:
    """Concatenate the documents with EOT appended to each."""
    offsets = np.asarray(offsets, np.int64)
    body = np.asarray(tokens, np.int32)[offsets[0]:offsets[-1]]
    return np.insert(body, offsets[1:] - offsets[0], np.int32(eot_id))


def concat_and_chunk(tokens: np.ndarray, offsets: np.ndarray, seq_len: int, eot_id: int) -> Dict:
    """Rows ``[n, seq_len + 1]`` of the concatenated stream; ``input_ids = rows[:, :-1]``.

    Returns ``{"rows", "dropped_tokens"}``: the stream tail that does not fill a row is dropped.

    >>> r = concat_and_chunk(np.arange(7, dtype=np.int32), np.array([0, 3, 7]), 4, eot_id=99)
    >>> r["rows"].tolist(), r["dropped_tokens"]
    ([[0, 1, 2, 99, 3], [3, 4, 5, 6, 99]], 0)
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    s = _stream(tokens, offsets, eot_id)
    n = max(0, (s.size - 1) // seq_len)
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    rows = s[idx] if n else np.zeros((0, seq_len + 1), np.int32)
    return {"rows": rows, "dropped_tokens": int(s.size - (n * seq_len + 1)) if n else int(s.size)}


def cross_document_fraction(offsets: np.ndarray, seq_len: int) -> float:
    """Share of causal attention pairs (i attends j <= i, same row) of concat-and-chunk inputs
    whose two tokens come from different documents (EOT counted with its document)."""
    lens = np.diff(np.asarray(offsets, np.int64)) + 1
    total = int(lens.sum())
    n = max(0, (total - 1) // seq_len)
    if n == 0:
        return 0.0
    span = n * seq_len
    doc_starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    cuts = np.union1d(doc_starts[doc_starts < span], np.arange(0, span, seq_len))
    seg = np.diff(np.concatenate([cuts, [span]])).astype(np.float64)
    within = float((seg * (seg + 1) / 2).sum())
    return 1.0 - within / (n * seq_len * (seq_len + 1) / 2)


def pack_documents(tokens: np.ndarray, offsets: np.ndarray, seq_len: int, eot_id: int, pad_id: int = 0) -> Dict:
    """Pack documents into rows of ``seq_len`` (inputs and shifted targets per document).

    A document with EOT, ``d`` of length n, gives n - 1 (input, target) pairs
    ``(d[t], d[t + 1])``; longer than ``seq_len`` pairs, it is split into pieces of
    ``seq_len``. Pieces go into the current row if they fit, else into a new one (next-fit).
    Returns ``input_ids``/``targets``/``position_ids`` ``[rows, seq_len]`` int64 (targets
    ``IGNORE_INDEX`` on padding), ``cu_seqlens`` (a list of int32 arrays, one per row, from
    0 to the row's used length), ``padding`` (padded positions) and ``segment_lengths``.

    >>> p = pack_documents(np.arange(5, dtype=np.int32), np.array([0, 2, 5]), 4, eot_id=9)
    >>> p["input_ids"].tolist(), [c.tolist() for c in p["cu_seqlens"]]
    ([[0, 1, 0, 0], [2, 3, 4, 0]], [[0, 2], [0, 3]])
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    offsets = np.asarray(offsets, np.int64)
    s = _stream(tokens, offsets, eot_id)
    lens = np.diff(offsets) + 1
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    rows: List[List[tuple]] = []
    used = seq_len  # forces a first row
    for st, n in zip(starts.tolist(), lens.tolist()):
        pairs = n - 1
        p = 0
        while p < pairs:
            w = min(seq_len, pairs - p)
            if used + w > seq_len:
                rows.append([])
                used = 0
            rows[-1].append((st + p, w))
            used += w
            p += w
    R = len(rows)
    inp = np.full((R, seq_len), pad_id, np.int64)
    tgt = np.full((R, seq_len), IGNORE_INDEX, np.int64)
    pos = np.zeros((R, seq_len), np.int64)
    cu, seglens, padding = [], [], 0
    for r, pieces in enumerate(rows):
        c = 0
        bounds = [0]
        for a, w in pieces:
            inp[r, c:c + w] = s[a:a + w]
            tgt[r, c:c + w] = s[a + 1:a + w + 1]
            pos[r, c:c + w] = np.arange(w)
            c += w
            bounds.append(c)
            seglens.append(w)
        pos[r, c:] = np.arange(seq_len - c)
        padding += seq_len - c
        cu.append(np.array(bounds, np.int32))
    return {"input_ids": inp, "targets": tgt, "position_ids": pos, "cu_seqlens": cu, "padding": padding,
            "segment_lengths": np.array(seglens, np.int64)}


def block_causal_mask(cu_seqlens: np.ndarray, seq_len: int) -> np.ndarray:
    """Dense ``[seq_len, seq_len]`` bool mask (True = may attend) for one packed row:
    causal inside each segment ``[cu[i], cu[i+1])``, nothing across segments; padding
    positions (after ``cu[-1]``) attend only to themselves.

    >>> block_causal_mask(np.array([0, 2, 3]), 4).astype(int).tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    """
    cu = np.asarray(cu_seqlens, np.int64)
    seg = np.full(seq_len, -1, np.int64)
    for i in range(cu.size - 1):
        seg[cu[i]:cu[i + 1]] = i
    i = np.arange(seq_len)
    causal = i[None, :] <= i[:, None]
    same = (seg[:, None] == seg[None, :]) & (seg[:, None] >= 0)
    return (causal & same) | np.eye(seq_len, dtype=bool)
