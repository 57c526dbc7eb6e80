"""Decomposition kernel vs the plain-Python reference rule (fastload.tokens.decompose)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from fastload.tokens.decompose import (_draw, decompose, load_manifest, main, read_tokens,
                                       reference_decompose, tokenize_folder)

EOT, VOCAB = 256, 257


def reference(tokens, offsets, min_k, max_k, randomize, seed=0, file=0):
    """{k: [rows]} in document order and total dropped tokens, by the reference rule."""
    out = {k: [] for k in range(min_k, max_k + 1)}
    dropped = 0
    for d in range(len(offsets) - 1):
        chunks, drop = reference_decompose(tokens[offsets[d]:offsets[d + 1]].tolist(), EOT, min_k, max_k,
                                           randomize, seed, file, d)
        for k, rows in chunks.items():
            out[k].extend(rows)
        dropped += drop
    return out, dropped


def corpus(rng, n_docs=300, max_len=2000):
    # Long-tailed lengths with empties, one-token docs and docs far above 2^max.
    lens = np.minimum(rng.pareto(1.0, n_docs) * 20, max_len).astype(np.int64)
    lens[:5] = [0, 1, 7, 8, 9]
    lens[5:10] = [max_len * 3, 513, 1024, 1025, 4000]
    offsets = np.concatenate([[0], np.cumsum(lens)])
    tokens = rng.integers(0, 256, offsets[-1]).astype(np.int32)
    return tokens, offsets


def bucket_arrays(path):
    m = load_manifest(path)
    return m, {int(k): np.concatenate([np.load(os.path.join(path, f["path"])) for f in b["files"]])
               for k, b in m["buckets"].items()}


def check_against_reference(path, tokens, offsets, min_k, max_k, randomize, seed):
    m, arrays = bucket_arrays(path)
    ref, dropped = reference(tokens, offsets, min_k, max_k, randomize, seed)
    for k in range(min_k, max_k + 1):
        want = np.array(ref[k], np.int32).reshape(-1, (1 << k) + 1)
        np.testing.assert_array_equal(arrays[k], want, err_msg=f"bucket {k}")
    assert m["dropped_tokens"] == dropped
    # Accounting: every token (EOT included) is in exactly one row or counted as dropped.
    kept = sum(a.size for a in arrays.values())
    assert kept + m["dropped_tokens"] == len(tokens) + len(offsets) - 1
    return m


@pytest.mark.parametrize("randomize", [False, True])
def test_matches_reference_rule(tmp_path, rng, randomize):
    tokens, offsets = corpus(rng)
    m = decompose((tokens, offsets), str(tmp_path / "dd"), min_bucket=3, max_bucket=6, randomize=randomize,
                  seed=7, vocab_size=VOCAB, eot_id=EOT, progress=False)
    check_against_reference(str(tmp_path / "dd"), tokens, offsets, 3, 6, randomize, 7)
    lens = np.diff(offsets)
    assert m["empty_documents"] == int((lens == 0).sum())
    assert m["dropped_documents"] == int((lens < 8).sum())
    assert m["documents"] == len(lens) and m["seed"] == 7 and m["vocab_size"] == VOCAB
    if not randomize:  # without draws, nothing longer than 2^max+1 exists and long docs fill bucket max
        assert m["buckets"]["6"]["rows"] >= (3 * 2000) // 65


def test_chunks_are_contiguous_pieces_of_their_document(rng):
    # No loss, no duplication: the chunks in emission order + the dropped tail == doc + EOT.
    for n in [0, 1, 2, 3, 15, 16, 17, 18, 1000, 70000]:
        doc = rng.integers(0, 256, n).tolist()
        for randomize in (False, True):
            seq, pos, c, order = doc + [EOT], 0, 0, []
            while len(seq) - pos > 1:
                k = (len(seq) - pos - 1).bit_length() - 1
                if k < 4:
                    break
                if k > 9:
                    k = _draw(3, 0, n, c, 4, 9) if randomize else 9
                order.append((k, seq[pos:pos + (1 << k) + 1]))
                pos += (1 << k) + 1
                c += 1
            rebuilt = [t for _, ch in order for t in ch] + seq[pos:]
            assert rebuilt == seq
            assert all(len(ch) == (1 << k) + 1 and 4 <= k <= 9 for k, ch in order)
            chunks, drop = reference_decompose(doc, EOT, 4, 9, randomize, 3, 0, n)
            assert drop == len(seq) - pos
            assert chunks == {k: [ch for kk, ch in order if kk == k] for k in {kk for kk, _ in order}}


def test_random_bucket_distribution_matches_rule():
    # P(k) = 2^(max-k) / (2^n - 1) for the draws; fixed stream -> deterministic, cannot flake.
    min_k, max_k, n = 8, 13, 60000
    ks = np.array([_draw(1234, 0, d, c, min_k, max_k) for d in range(n // 6) for c in range(6)])
    w = 2.0 ** (max_k - np.arange(min_k, max_k + 1))
    expected = n * w / w.sum()
    observed = np.bincount(ks - min_k, minlength=max_k - min_k + 1)
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 20.5, (observed, expected, chi2)  # 99.9% quantile of chi2(5)


def test_random_draws_in_kernel_follow_rule(tmp_path, rng):
    # Many long documents: the bucket counts of the kernel's output follow the draw law.
    lens = np.full(400, 9000)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    tokens = rng.integers(0, 256, offsets[-1]).astype(np.int32)
    decompose((tokens, offsets), str(tmp_path / "dd"), min_bucket=5, max_bucket=8, randomize=True, seed=1,
              vocab_size=VOCAB, eot_id=EOT, progress=False)
    check_against_reference(str(tmp_path / "dd"), tokens, offsets, 5, 8, True, 1)


def test_threads_do_not_change_output(tmp_path, rng):
    tokens, offsets = corpus(rng, n_docs=3000)
    for t in (1, 2):
        decompose((tokens, offsets), str(tmp_path / f"t{t}"), 3, 7, seed=5, vocab_size=VOCAB, eot_id=EOT,
                  num_threads=t, progress=False)
    _, a = bucket_arrays(str(tmp_path / "t1"))
    _, b = bucket_arrays(str(tmp_path / "t2"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_folder_of_parquet_uses_file_index(tmp_path, rng):
    src = tmp_path / "txt"
    src.mkdir()
    texts = ["x" * int(n) for n in rng.integers(0, 700, 12)] + ["héllo wörld " * 100]
    for i, t in enumerate(texts):
        (src / f"doc{i:02d}.txt").write_text(t)
    files = tokenize_folder(str(src), str(tmp_path / "tok"), docs_per_file=5)
    assert len(files) == 3
    m = decompose(str(tmp_path / "tok"), str(tmp_path / "dd"), 4, 7, seed=3, progress=False)
    assert (m["vocab_size"], m["eot_id"]) == (257, 256)
    _, arrays = bucket_arrays(str(tmp_path / "dd"))
    ref = {k: [] for k in range(4, 8)}
    for fi, f in enumerate(files):
        tokens, offsets, _ = read_tokens(f)
        r, _ = reference(tokens, offsets, 4, 7, True, 3, fi)
        for k in ref:
            ref[k].extend(r[k])
    for k in ref:
        np.testing.assert_array_equal(arrays[k], np.array(ref[k], np.int32).reshape(-1, (1 << k) + 1))
    # byte-level: the UTF-8 bytes are the ids
    tok, off, _ = read_tokens(files[-1])
    assert bytes(tok[off[-2]:off[-1]].astype(np.uint8)) == texts[-1].encode()


def test_arrow_and_npz_inputs(tmp_path, rng):
    import pyarrow as pa
    import pyarrow.feather as feather

    tokens, offsets = corpus(rng, n_docs=50)
    col = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(tokens.astype(np.int64)))
    feather.write_feather(pa.table({"ids": col, "other": pa.array(range(50))}), str(tmp_path / "a.arrow"))
    np.savez(tmp_path / "b.npz", tokens=tokens, offsets=offsets)
    for name in ("a.arrow", "b.npz"):
        out = str(tmp_path / ("dd_" + name))
        decompose(str(tmp_path / name), out, 3, 6, seed=2, vocab_size=VOCAB, eot_id=EOT, progress=False)
        check_against_reference(out, tokens, offsets, 3, 6, True, 2)


def test_bad_inputs(tmp_path):
    ok = (np.array([1, 2, 3], np.int32), np.array([0, 3]))
    with pytest.raises(ValueError, match="min_bucket"):
        decompose(ok, str(tmp_path / "a"), 9, 8, eot_id=0)
    with pytest.raises(ValueError, match="document 1, position 2: token id 300"):
        decompose((np.array([1, 2, 3, 4, 5, 300], np.int32), np.array([0, 3, 6])), str(tmp_path / "b"), 1, 2,
                  vocab_size=257, eot_id=256, progress=False)
    with pytest.raises(ValueError, match="-1"):
        decompose((np.array([-1], np.int32), np.array([0, 1])), str(tmp_path / "b2"), 1, 2, vocab_size=257,
                  eot_id=256, progress=False)
    with pytest.raises(ValueError, match="eot_id"):
        decompose(ok, str(tmp_path / "c"), 1, 2, progress=False)
    with pytest.raises(ValueError, match="decrease"):
        decompose((ok[0], np.array([0, 2, 1, 3])), str(tmp_path / "d"), 1, 2, eot_id=0, progress=False)
    (tmp_path / "notdata").mkdir()
    (tmp_path / "notdata" / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a token dataset"):
        decompose(str(tmp_path / "notdata"), str(tmp_path / "e"), eot_id=0)
    with pytest.raises(ValueError, match="not a token dataset"):
        decompose(str(tmp_path / "notdata" / "x.txt"), str(tmp_path / "e"), eot_id=0)
    with pytest.raises(ValueError, match="does not exist"):
        decompose(str(tmp_path / "nope"), str(tmp_path / "e"), eot_id=0)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"t": pa.array([[1, 2], None], pa.list_(pa.int32()))}), str(tmp_path / "n.parquet"))
    with pytest.raises(ValueError, match="document 1 is null"):
        decompose(str(tmp_path / "n.parquet"), str(tmp_path / "f"), 1, 2, eot_id=0, progress=False)
    pq.write_table(pa.table({"t": pa.array([1.0])}), str(tmp_path / "s.parquet"))
    with pytest.raises(ValueError, match="no list<int> column"):
        decompose(str(tmp_path / "s.parquet"), str(tmp_path / "g"), eot_id=0)
    decompose(ok, str(tmp_path / "h"), 1, 1, eot_id=0, progress=False)
    with pytest.raises(ValueError, match="overwrite"):
        decompose(ok, str(tmp_path / "h"), 1, 1, eot_id=0, progress=False)
    decompose(ok, str(tmp_path / "h"), 1, 1, eot_id=0, progress=False, overwrite=True)
    with pytest.raises(ValueError, match="not a decomposed dataset"):
        load_manifest(str(tmp_path / "notdata"))


def test_cli_summary(tmp_path, capsys, rng):
    src = tmp_path / "txt"
    src.mkdir()
    for i in range(5):
        (src / f"{i}.txt").write_text("ab" * int(rng.integers(10, 900)))
    files = tokenize_folder(str(src), str(tmp_path / "tok"))
    assert main([files[0], str(tmp_path / "dd"), "--min-bucket", "4", "--max-bucket", "8"]) == 0
    out = capsys.readouterr().out
    assert "dropped" in out and "documents 5" in out
    assert main([str(tmp_path / "nope"), str(tmp_path / "dd2")]) == 2


def test_local_engine_never_imports_ray(tmp_path):
    code = ("import sys, numpy as np, fastload\n"
            f"fastload.decompose((np.arange(600, dtype=np.int32) % 256, np.array([0, 600])), {str(tmp_path / 'x')!r},"
            " 3, 6, eot_id=256, progress=False)\n"
            "print('ray' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_fsync_writes_the_same_rows(tmp_path, rng):
    tokens, offsets = corpus(rng, n_docs=60)
    a = decompose((tokens, offsets), str(tmp_path / "a"), 4, 7, vocab_size=VOCAB, eot_id=EOT, progress=False)
    b = decompose((tokens, offsets), str(tmp_path / "b"), 4, 7, vocab_size=VOCAB, eot_id=EOT, progress=False,
                  fsync=True)
    (ma, ra), (mb, rb) = bucket_arrays(str(tmp_path / "a")), bucket_arrays(str(tmp_path / "b"))
    assert a["dropped_tokens"] == b["dropped_tokens"] and ra.keys() == rb.keys()
    want, _ = reference(tokens, offsets, 4, 7, True)
    for k in ra:
        assert np.array_equal(ra[k], rb[k])
        assert ra[k].tolist() == want[k]
