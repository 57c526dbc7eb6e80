"""Shuffle quality of the shard-aware two-level shuffle beside the global shuffle.

ImageNet-1k shape (1,281,167 rows, 1000 classes, 1,250 rows per shard -> 1,025 shards),
global batch 1024. Two storage orders: sorted by class (as a folder walk writes ImageNet)
and random. Per batch: distinct shards (the working set a cache must hold) and distinct
classes (the mix the model sees). Pure NumPy; seconds.

    python benchmarks/shuffle.py   # writes benchmarks/results/shuffle.json
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastload.batch.shuffle import BlockShuffleSampler, shuffle_quality  # noqa: E402
from fastload.batch.sharding import epoch_permutation  # noqa: E402
from fastload.bench._common import write_result  # noqa: E402

N, C, SHARD, G, BATCHES = 1_281_167, 1000, 1250, 1024, 300


def main():
    t0 = time.time()
    rng = np.random.default_rng(0)
    per_class = np.full(C, N // C)
    per_class[: N - per_class.sum()] += 1
    sorted_labels = np.repeat(np.arange(C), per_class)
    storage = {"class_sorted": sorted_labels, "random_order": sorted_labels[rng.permutation(N)]}
    sizes = [SHARD] * (N // SHARD) + ([N % SHARD] if N % SHARD else [])
    rows = {}
    for name, labels in storage.items():
        s0 = BlockShuffleSampler(sizes, block_shards=1, seed=0)
        shard_of = s0.shard_of(np.arange(N))
        out = {"global": shuffle_quality(epoch_permutation(N, 0, 0)[: BATCHES * G], shard_of, labels, G)}
        for blk in (1, 4, 16, 64, 256):
            s = BlockShuffleSampler(sizes, block_shards=blk, seed=0)
            q = shuffle_quality(s.global_order(0)[: BATCHES * G], shard_of, labels, G)
            q["max_shards_per_batch_bound"] = 2 * blk
            out[f"block_{blk}"] = q
        rows[name] = out
        print(name, {k: {kk: round(vv, 1) for kk, vv in v.items()} for k, v in out.items()})
    path = write_result("shuffle", {
        "setup": {"rows": N, "classes": C, "rows_per_shard": SHARD, "shards": len(sizes),
                  "global_batch": G, "batches_measured": BATCHES},
        "note": "mean distinct shards / classes per global batch over the first batches of epoch 0; "
                "a uniform draw of 1024 from 1000 classes has ~641 distinct classes",
        "load_average": os.getloadavg(), "seconds": time.time() - t0, "results": rows})
    print(path)


if __name__ == "__main__":
    main()
