"""Baselines: concat-and-chunk rows, cross-document fraction, packed rows and their masks."""
import numpy as np
import pytest

from fastload.batch.packing import (IGNORE_INDEX, block_causal_mask, concat_and_chunk, cross_document_fraction,
                                    pack_documents)

EOT = 99


def docs(rng, n=40):
    lens = rng.integers(0, 30, n)
    lens[:3] = [0, 45, 1]
    offsets = np.concatenate([[0], np.cumsum(lens)])
    return rng.integers(0, 90, offsets[-1]).astype(np.int32), offsets


def stream_and_docid(tokens, offsets):
    s, d = [], []
    for i in range(len(offsets) - 1):
        s += tokens[offsets[i]:offsets[i + 1]].tolist() + [EOT]
        d += [i] * (offsets[i + 1] - offsets[i] + 1)
    return s, d


@pytest.mark.parametrize("L", [1, 4, 16])
def test_concat_and_chunk_and_cross_document_fraction(rng, L):
    tokens, offsets = docs(rng)
    s, d = stream_and_docid(tokens, offsets)
    r = concat_and_chunk(tokens, offsets, L, EOT)
    n = (len(s) - 1) // L
    assert r["rows"].tolist() == [s[i * L:i * L + L + 1] for i in range(n)]
    assert r["dropped_tokens"] == len(s) - (n * L + 1)
    cross = total = 0
    for i in range(n):  # brute force over causal pairs of the inputs
        ids = d[i * L:i * L + L]
        for a in range(L):
            for b in range(a + 1):
                total += 1
                cross += ids[a] != ids[b]
    assert cross_document_fraction(offsets, L) == pytest.approx(cross / total)


@pytest.mark.parametrize("L", [8, 32])
def test_packed_rows_masks_and_no_cross_document_targets(rng, L):
    tokens, offsets = docs(rng)
    p = pack_documents(tokens, offsets, L, EOT, pad_id=0)
    # Every (input, target) pair of every document appears exactly once, nothing else.
    want = []
    for i in range(len(offsets) - 1):
        seq = tokens[offsets[i]:offsets[i + 1]].tolist() + [EOT]
        want += list(zip(seq[:-1], seq[1:]))
    got = [(a, b) for row_x, row_y in zip(p["input_ids"].tolist(), p["targets"].tolist())
           for a, b in zip(row_x, row_y) if b != IGNORE_INDEX]
    assert got == want
    assert p["padding"] == int((p["targets"] == IGNORE_INDEX).sum())
    for r, cu in enumerate(p["cu_seqlens"]):
        # position ids restart at every segment start
        pos = p["position_ids"][r]
        for a, b in zip(cu[:-1], cu[1:]):
            assert pos[a:b].tolist() == list(range(b - a))
        # mask == reference from explicit segment ids
        seg = np.full(L, -1)
        for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
            seg[a:b] = i
        ref = np.array([[(j <= i and seg[i] == seg[j] and seg[i] >= 0) or i == j for j in range(L)]
                        for i in range(L)])
        np.testing.assert_array_equal(block_causal_mask(cu, L), ref)
        assert (p["targets"][r, cu[-1]:] == IGNORE_INDEX).all()
    assert sum(p["segment_lengths"]) == len(want)
