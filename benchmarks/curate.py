"""Transfer-set retrieval (fastload.curate, faiss-cpu): wall time, recall@k of IVF and HNSW
against the exact search, index memory, on a synthetic clustered pool of unit vectors
(a mixture of Gaussians: uniform random vectors have no neighbourhoods and make every
approximate index look bad).

    python benchmarks/curate.py                  # the issue's figure: 1M x 512, 10k queries, k=50
    python benchmarks/curate.py --pool 200000 --queries 2000   # what fits a shared 2-core machine
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def _data(n, q, d, seed=0, clusters=1000):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d)).astype(np.float32)
    pool = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):  # in blocks: bounded temporaries
        e = min(n, s + 100_000)
        pool[s:e] = centers[rng.integers(0, clusters, e - s)] + 0.7 * rng.standard_normal((e - s, d), dtype=np.float32)
    queries = centers[rng.integers(0, clusters, q)] + 0.7 * rng.standard_normal((q, d), dtype=np.float32)
    return pool, queries.astype(np.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recall-queries", type=int, default=1000)
    ap.add_argument("--indexes", default="exact,ivf,hnsw")
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    import faiss

    from fastload.bench._common import write_result
    from fastload.curate import curate

    if a.one:
        import resource

        pool, queries = _data(a.pool, a.queries, a.dim)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.perf_counter()
        ts = curate(pool, queries, k=a.k, index=a.one, threads=a.threads, recall_queries=a.recall_queries)
        row = {"wall_s": time.perf_counter() - t0, "build_s": ts.info["build_s"], "search_s": ts.info["search_s"],
               "recall_at_k_vs_exact": ts.recall, "transfer_set_rows": len(ts),
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "rss_mib_before_search": base}
        row.update({k: ts.info[k] for k in ("nlist", "nprobe", "hnsw_m", "ef_search") if k in ts.info})
        print(json.dumps(row))
        return 0
    res = {"load_average_at_start": list(os.getloadavg()),
           "note": ("2-core machine shared with other jobs while measured: wall times are inflated "
                    "and vary; recall does not depend on the load"),
           "settings": {"pool": a.pool, "queries": a.queries, "dim": a.dim, "k": a.k, "threads": a.threads,
                        "recall_queries": a.recall_queries, "faiss": faiss.__version__,
                        "data": "1000-cluster Gaussian mixture, sigma 0.7, cosine similarity"},
           "pool_bytes": a.pool * a.dim * 4, "indexes": {}}
    from fastload._results import run_stamp

    stamp = run_stamp()  # one per-run file, rewritten as each index finishes
    for kind in a.indexes.split(","):
        # each index in its own process: its peak RSS is that search's memory
        cmd = [sys.executable, os.path.abspath(__file__), "--one", kind] + [
            f"--{n}={getattr(a, n.replace('-', '_'))}" for n in ("pool", "queries", "dim", "k", "threads", "recall-queries")]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        res["indexes"][kind] = row
        res["load_average_at_end"] = list(os.getloadavg())
        # written after every index: a long run (HNSW at 1M on 2 cores) keeps what finished
        print(kind, row, "wrote", write_result("curate", res, a.out_dir, stamp), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
