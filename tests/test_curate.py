"""Retrieval-curated transfer sets (fastload.curate) with faiss: exact search against a
brute-force NumPy search, approximate indexes' recall, saving, the sampler and the CLI."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("faiss")  # the `curate` extra (in `test`)

from fastload.curate import SubsetSampler, curate, load_transfer_set, pool_embeddings


def _data(n=3000, q=40, d=32, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((20, d))
    pool = (centers[rng.integers(0, 20, n)] + 0.5 * rng.standard_normal((n, d))).astype(np.float32)
    queries = (centers[rng.integers(0, 20, q)] + 0.5 * rng.standard_normal((q, d))).astype(np.float32)
    return pool, queries


def _brute(pool, queries, k, metric="cosine"):
    if metric == "cosine":
        pool = pool / np.linalg.norm(pool, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    if metric == "l2":
        s = -((queries[:, None, :].astype(np.float64) - pool[None].astype(np.float64)) ** 2).sum(-1)
    else:
        s = queries.astype(np.float64) @ pool.T.astype(np.float64)
    nn = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return nn, s


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_exact_equals_brute_force(metric):
    pool, queries = _data()
    k = 7
    ts = curate(pool, queries, k=k, metric=metric)
    nn, s = _brute(pool, queries, k, metric)
    assert ts.indices.tolist() == sorted(set(nn.reshape(-1).tolist()))
    for r, score, q in zip(ts.indices, ts.scores, ts.query):
        best = max(s[qq, r] for qq in range(len(queries)) if r in nn[qq])
        assert score == pytest.approx(best, rel=1e-4, abs=1e-4)
        assert r in nn[q] and s[q, r] == pytest.approx(best, rel=1e-4, abs=1e-4)
    assert ts.recall is None


def test_budget_round_robin_over_ranks():
    pool, queries = _data()
    ts = curate(pool, queries, k=10, budget=50)
    nn, s = _brute(pool, queries, 10)
    # all first neighbours come before any second one, and so on
    want, seen = [], set()
    for rank in range(10):
        col = sorted(range(len(queries)), key=lambda q: -s[q, nn[q, rank]])
        for q in col:
            r = int(nn[q, rank])
            if r not in seen:
                seen.add(r)
                want.append(r)
    assert ts.indices.tolist() == sorted(want[:50])


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_recall_reported(index):
    pool, queries = _data(n=4000)
    ts = curate(pool, queries, k=10, index=index, nlist=32, nprobe=8)
    ex = curate(pool, queries, k=10)
    assert 0.8 <= ts.recall <= 1.0
    # recall counted like the report: the approximate lists against the exact ones
    assert len(set(ts.indices) & set(ex.indices)) / len(ex) >= 0.8


def test_save_load_and_sampler(tmp_path):
    pool, queries = _data()
    ts = curate(pool, queries, k=5, out=str(tmp_path / "t.npz"))
    back = load_transfer_set(str(tmp_path / "t.npz"))
    assert np.array_equal(back.indices, ts.indices) and np.allclose(back.scores, ts.scores)
    assert back.info["k"] == 5 and back.info["pool_rows"] == len(pool)
    with pytest.raises(ValueError, match="outside"):
        load_transfer_set(str(tmp_path / "t.npz"), num_rows=10)
    s = ts.sampler(seed=3)
    a, b = s.global_order(0), s.global_order(1)
    assert sorted(a.tolist()) == sorted(b.tolist()) == ts.indices.tolist() and not np.array_equal(a, b)
    s.set_epoch(1)
    assert list(s) == b.tolist() and len(s) == len(ts)
    import torch

    dl = torch.utils.data.DataLoader(list(range(len(pool))), sampler=s, batch_size=8)
    assert sorted(torch.cat(list(dl)).tolist()) == ts.indices.tolist()


def test_reinforced_loader_takes_the_subset(tmp_path):
    from fastload.format.reader import ReinforcedDataset
    from fastload.loader.reinforced import ReinforcedLoader
    from _ddp_loader_worker import write_dataset

    ds = ReinforcedDataset(write_dataset(str(tmp_path / "d"), n=12, kind="image_text"))
    emb = pool_embeddings(ds)
    assert emb.shape == (12, 8)
    assert np.allclose(emb[3], np.mean([np.float32(ds.image_embedding(3, j)) for j in range(ds.num_augmentations)], axis=0), atol=1e-6)
    ts = curate(ds, emb[[2, 9]], k=2)
    assert {2, 9} <= set(ts.indices.tolist())
    L = ReinforcedLoader(ds, batch_size=2, sampler=ts.sampler(), image_size=16)
    got = []
    for b in L:
        got += [ds.captions(i)[0][0] for i in ts.sampler().global_order(0)[len(got):len(got) + 2]]
        assert list(b.captions) == got[-len(b.captions):]
    assert len(got) == len(ts)


def test_bad_input():
    pool, queries = _data(n=200)
    with pytest.raises(ValueError, match="width 16, the pool's have width 32"):
        curate(pool, queries[:, :16], k=3)
    bad = pool.copy()
    bad[17, 3] = np.nan
    with pytest.raises(ValueError, match=r"pool embeddings has NaN .* rows \[17\]"):
        curate(bad, queries, k=3)
    q = queries.copy()
    q[2] = np.inf
    with pytest.raises(ValueError, match=r"query embeddings has NaN .* rows \[2\]"):
        curate(pool, q, k=3)
    with pytest.raises(ValueError, match="empty"):
        curate(pool, queries, k=3, min_score=1.5)
    with pytest.raises(ValueError, match="k must be"):
        curate(pool, queries, k=0)
    with pytest.raises(ValueError, match="k must be"):
        curate(pool, queries, k=201)
    with pytest.raises(ValueError, match="index must be"):
        curate(pool, queries, k=3, index="lsh")
    with pytest.raises(ValueError, match="SubsetSampler"):
        SubsetSampler([])


def test_cli(tmp_path, capsys):
    from fastload.cli import main

    pool, queries = _data(n=500)
    np.save(tmp_path / "pool.npy", pool)
    np.save(tmp_path / "q.npy", queries)
    assert main(["curate", str(tmp_path / "pool.npy"), "--queries", str(tmp_path / "q.npy"), "--k", "4"]) == 0
    ts = load_transfer_set(str(tmp_path / "pool.transfer.npz"))
    assert ts.indices.tolist() == curate(pool, queries, k=4).indices.tolist()
    assert main(["curate", str(tmp_path / "pool.npy"), "--queries", str(tmp_path / "q.npy"), "--k", "4",
                 "--index", "hnsw", "--out", str(tmp_path / "s.npz")]) == 0
    assert "recall@4 vs exact" in capsys.readouterr().out
    np.save(tmp_path / "q8.npy", queries[:, :8])
    assert main(["curate", str(tmp_path / "pool.npy"), "--queries", str(tmp_path / "q8.npy")]) == 2
    assert "width 8" in capsys.readouterr().err
