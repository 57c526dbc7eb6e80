"""``curate``: the transfer set of a target task, retrieved from a large unlabelled pool.

Every query (an embedded target-task image) takes its ``k`` nearest pool rows by cosine
similarity (or inner product / L2 with ``metric=``); the transfer set is the union,
de-duplicated, each pool row with its best similarity and the query that gave it. A
``budget`` keeps at most that many rows, round robin over the queries' neighbour ranks (all
first neighbours, then all second ones, ...; the higher similarity first within a rank), so
every query is represented before any query's far neighbours.

The search is faiss's (``index="exact"``: a flat index, the brute force; ``"ivf"``: an
inverted-file index, ``nlist`` lists (default ``4 sqrt(N)``) of which ``nprobe`` (default
``nlist / 16``, at least 16) are searched; ``"hnsw"``: a
graph index). For an approximate index, the recall@k against the exact search is measured
on ``recall_queries`` of the queries and reported (``TransferSet.recall``).

The result saves as one ``.npz`` (plain arrays and a JSON string; no pickle) beside the
dataset, and gives the loaders a sampler over its rows: ``ReinforcedLoader(ds,
sampler=ts.sampler(seed=...))`` (the sampler's ``global_order`` keeps the loader's elastic,
exact-resume order) or any ``torch.utils.data.DataLoader``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Optional, Sequence

import numpy as np

from fastload.batch.sharding import epoch_permutation

INDEXES = ("exact", "ivf", "hnsw")
METRICS = ("cosine", "ip", "l2")


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - the extra is missing
        raise ImportError("fastload.curate needs faiss-cpu: pip install 'fastload[curate]'") from exc
    return faiss


def pool_embeddings(pool, augmentation="mean") -> np.ndarray:
    """Pool embeddings as float32 [N, D] from an array, a ``.npy`` file, or an image-text
    reinforced dataset (a DataCompDR import: its stored image embeddings, the mean over the
    stored augmentations with ``augmentation="mean"`` or augmentation ``j``)."""
    if isinstance(pool, (str, os.PathLike)) and os.fspath(pool).endswith(".npy"):
        return np.load(os.fspath(pool), allow_pickle=False)
    if isinstance(pool, (str, os.PathLike)):
        from fastload.format.reader import ReinforcedDataset

        pool = ReinforcedDataset(os.fspath(pool))
    if hasattr(pool, "image_embedding"):
        if getattr(pool, "kind", None) != "image_text":
            raise ValueError(f"the pool dataset {getattr(pool, 'path', '')!r} is a {pool.kind} dataset: "
                             "it stores no embeddings (pass an embedding array instead)")
        A = int(pool.num_augmentations)
        augs = range(A) if augmentation == "mean" else [int(augmentation)]
        return np.stack([np.mean([np.asarray(pool.image_embedding(i, j), np.float32) for j in augs], axis=0)
                         for i in range(len(pool))]).astype(np.float32)
    return pool


def _check(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array [rows, width], got shape {x.shape}")
    if x.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be numeric, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValueError(f"{name} has NaN or infinite values in rows {np.flatnonzero(bad)[:8].tolist()}")
    return x


def _normalize(x: np.ndarray, name: str) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    if (n == 0).any():
        raise ValueError(f"{name} has all-zero rows {np.flatnonzero(n[:, 0] == 0)[:8].tolist()} "
                         "(no direction for cosine similarity)")
    return x / n


def _build(kind, X, metric, nlist, hnsw_m, seed):
    faiss = _faiss()
    mt = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    d = X.shape[1]
    if kind == "exact":
        index = faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d)
    elif kind == "ivf":
        quant = faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quant, d, nlist, mt)
        # the k-means training sample: faiss's guideline of ~39-256 points per list
        rng = np.random.default_rng(seed)
        n_train = min(len(X), max(nlist * 64, 10000))
        train = X if n_train == len(X) else X[np.sort(rng.choice(len(X), n_train, replace=False))]
        index.cp.seed = int(seed)
        index.train(train)
    else:
        index = faiss.IndexHNSWFlat(d, hnsw_m, mt)
    index.add(X)
    return index


class TransferSet:
    """indices: pool rows (int64, ascending); scores: each row's best similarity to a query
    (for metric "l2": minus the squared distance); query: the query that gave it; recall:
    recall@k of the approximate index vs exact (None for "exact"); info: the settings."""

    def __init__(self, indices, scores, query, recall=None, info=None):
        self.indices = np.asarray(indices, dtype=np.int64)
        self.scores = np.asarray(scores, dtype=np.float32)
        self.query = np.asarray(query, dtype=np.int64)
        self.recall = recall
        self.info = dict(info or {})

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        r = "" if self.recall is None else f", recall@k={self.recall:.4f}"
        return f"TransferSet({len(self)} rows of {self.info.get('pool_rows')}{r})"

    def save(self, path: str) -> str:
        path = os.fspath(path)
        if not path.endswith(".npz"):
            path += ".npz"
        tmp = path + ".tmp.npz"
        info = dict(self.info, recall=self.recall)
        np.savez(tmp, indices=self.indices, scores=self.scores, query=self.query,
                 info=np.array(json.dumps(info)))
        os.replace(tmp, path)
        return path

    def sampler(self, shuffle: bool = True, seed: int = 0) -> "SubsetSampler":
        return SubsetSampler(self.indices, shuffle=shuffle, seed=seed)


def load_transfer_set(path: str, num_rows: Optional[int] = None) -> TransferSet:
    """A saved transfer set; ``num_rows``: the pool (dataset) size it must fit."""
    path = os.fspath(path)
    with np.load(path, allow_pickle=False) as z:
        missing = {"indices", "scores", "query", "info"} - set(z.files)
        if missing:
            raise ValueError(f"{path}: not a transfer set (missing {sorted(missing)})")
        info = json.loads(str(z["info"]))
        ts = TransferSet(z["indices"], z["scores"], z["query"], info.pop("recall", None), info)
    if not (len(ts.indices) == len(ts.scores) == len(ts.query)) or len(ts) == 0:
        raise ValueError(f"{path}: inconsistent or empty transfer set")
    n = num_rows if num_rows is not None else info.get("pool_rows")
    if n is not None and (ts.indices.min() < 0 or ts.indices.max() >= int(n)):
        raise ValueError(f"{path}: indices outside [0, {n}) (saved for another pool?)")
    return ts


class SubsetSampler:
    """The rows of a transfer set, shuffled per epoch by (seed, epoch): a
    ``torch.utils.data.Sampler`` (``__iter__``/``__len__``/``set_epoch``) and, through
    ``global_order(epoch)``, an order ``ReinforcedLoader`` cuts into elastic global batches."""

    def __init__(self, indices: Sequence[int], shuffle: bool = True, seed: int = 0):
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(self.indices) == 0:
            raise ValueError("SubsetSampler: the subset is empty")
        self.shuffle, self.seed, self.epoch = bool(shuffle), int(seed), 0

    def global_order(self, epoch: int) -> np.ndarray:
        return self.indices[epoch_permutation(len(self.indices), self.seed, epoch, self.shuffle)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        return iter(self.global_order(self.epoch).tolist())

    def __len__(self) -> int:
        return len(self.indices)


def curate(pool, queries, k: int = 50, budget: Optional[int] = None, index: str = "exact",
           metric: str = "cosine", nlist: Optional[int] = None, nprobe: Optional[int] = None, hnsw_m: int = 32,
           ef_search: int = 128, min_score: Optional[float] = None, recall_queries: int = 1000,
           threads: Optional[int] = None, seed: int = 0, out: Optional[str] = None) -> TransferSet:
    """The transfer set of ``queries`` [Q, D] in ``pool`` ([N, D] array, .npy path, or an
    image-text reinforced dataset / its path). See the module docstring; ``out``: save it
    there (``.npz``)."""
    if index not in INDEXES:
        raise ValueError(f"index must be one of {INDEXES}, got {index!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    P = _check(pool_embeddings(pool), "pool embeddings")
    Q = _check(queries if not isinstance(queries, (str, os.PathLike))
               else np.load(os.fspath(queries), allow_pickle=False), "query embeddings")
    if Q.shape[1] != P.shape[1]:
        raise ValueError(f"query embeddings have width {Q.shape[1]}, the pool's have width {P.shape[1]} "
                         "(embed both with the same model)")
    N = len(P)
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= N:
        raise ValueError(f"k must be an int in [1, {N}] (the pool size), got {k!r}")
    if budget is not None and int(budget) < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    faiss = _faiss()
    if threads is not None:
        faiss.omp_set_num_threads(int(threads))
    if metric == "cosine":
        P, Q = _normalize(P, "pool embeddings"), _normalize(Q, "query embeddings")
    nlist = int(nlist) if nlist is not None else max(1, min(int(4 * np.sqrt(N)), N // 39 or 1))
    t0 = time.perf_counter()
    idx = _build(index, P, metric, nlist, hnsw_m, seed)
    build_s = time.perf_counter() - t0
    if index == "ivf":
        # default: a 16th of the lists (at least 16), recall ~0.9+ on clustered embeddings
        idx.nprobe = min(int(nprobe) if nprobe is not None else max(16, nlist // 16), nlist)
    elif index == "hnsw":
        idx.hnsw.efSearch = max(int(ef_search), k)
    t0 = time.perf_counter()
    D, I = idx.search(Q, k)
    search_s = time.perf_counter() - t0
    recall = None
    if index != "exact":
        rq = min(int(recall_queries), len(Q))
        sub = np.random.default_rng(seed).choice(len(Q), rq, replace=False) if rq < len(Q) else np.arange(len(Q))
        ex = _build("exact", P, metric, nlist, hnsw_m, seed)
        _, I_ex = ex.search(Q[sub], k)
        recall = float(np.mean([len(set(a[a >= 0].tolist()) & set(b.tolist())) / k for a, b in zip(I[sub], I_ex)]))
    sims = -D if metric == "l2" else D
    ts = _union(I, sims, budget, min_score)
    if len(ts[0]) == 0:
        raise ValueError(f"the transfer set is empty: no pool row has a similarity >= min_score={min_score}")
    info = dict(index=index, metric=metric, k=int(k), budget=budget, min_score=min_score,
                pool_rows=int(N), width=int(P.shape[1]), queries=int(len(Q)), build_s=round(build_s, 4),
                search_s=round(search_s, 4))
    if index == "ivf":
        info.update(nlist=nlist, nprobe=int(idx.nprobe))
    if index == "hnsw":
        info.update(hnsw_m=int(hnsw_m), ef_search=int(idx.hnsw.efSearch))
    result = TransferSet(*ts, recall=recall, info=info)
    if out is not None:
        result.save(out)
    return result


def _union(I: np.ndarray, sims: np.ndarray, budget: Optional[int], min_score: Optional[float]):
    """De-duplicated union of the neighbour lists (best similarity per pool row), cut to the
    budget by neighbour rank, then similarity."""
    Qn, k = I.shape
    rank = np.broadcast_to(np.arange(k), I.shape).reshape(-1)
    q = np.repeat(np.arange(Qn), k)
    rows, s = I.reshape(-1), sims.reshape(-1).astype(np.float64)
    ok = rows >= 0  # faiss pads with -1 when a list has fewer than k hits
    if min_score is not None:
        ok &= s >= float(min_score)
    rows, s, rank, q = rows[ok], s[ok], rank[ok], q[ok]
    # per pool row: its best (rank, -similarity) occurrence
    order = np.lexsort((q, -s, rank))
    rows, s, rank, q = rows[order], s[order], rank[order], q[order]
    _, first = np.unique(rows, return_index=True)
    first = np.sort(first)  # still in (rank, -similarity) order
    if budget is not None:
        first = first[:int(budget)]
    # the best similarity of each kept row over all its occurrences
    best = {}
    for r, v, qq in zip(rows.tolist(), s.tolist(), q.tolist()):
        if r not in best or v > best[r][0]:
            best[r] = (v, qq)
    keep = np.sort(rows[first])
    return keep, np.array([best[r][0] for r in keep.tolist()]), np.array([best[r][1] for r in keep.tolist()])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastload curate", description=(
        "Retrieve a transfer set: the pool rows nearest to the query embeddings (faiss)."))
    p.add_argument("pool", metavar="POOL", help="pool embeddings (.npy [N, D]) or an image-text reinforced dataset")
    p.add_argument("--queries", required=True, help="query embeddings (.npy [Q, D])")
    p.add_argument("--k", type=int, default=50, help="neighbours per query (default 50)")
    p.add_argument("--budget", type=int, default=None, help="keep at most this many pool rows")
    p.add_argument("--index", choices=INDEXES, default="exact")
    p.add_argument("--metric", choices=METRICS, default="cosine")
    p.add_argument("--nlist", type=int, default=None)
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists searched (default nlist/16, at least 16)")
    p.add_argument("--ef-search", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="output .npz (default: beside the pool, POOL.transfer.npz)")
    a = p.parse_args(argv)
    out = a.out or os.fspath(a.pool).rstrip("/\\").removesuffix(".npy") + ".transfer.npz"
    try:
        ts = curate(a.pool, a.queries, k=a.k, budget=a.budget, index=a.index, metric=a.metric,
                    nlist=a.nlist, nprobe=a.nprobe, ef_search=a.ef_search, threads=a.threads)
    except (ValueError, OSError) as exc:
        from fastload._cli import flag_error

        return flag_error("fastload curate", exc, p, {"pool": "POOL"})
    path = ts.save(out)
    rec = "" if ts.recall is None else f", recall@{a.k} vs exact {ts.recall:.4f}"
    print(f"{len(ts)} pool rows -> {path}{rec}")
    return 0
