"""Cost of default shard verification (``verify="lazy"``: sha256 of each shard the first time
a row of it is served) on the images benchmark's data, against ``verify="off"`` in the same
run: ReinforcedLoader (RandomResizedCrop 224 + flip, batch 64, num_workers = cores) over the
default bench dataset (fastload/bench/data.py), a fresh dataset object per run, runs
alternating on/off (on first, then off first, ...), epoch 1 (which pays the hashing) and the
later epochs timed separately. Writes benchmarks/results/verify.json.

    python benchmarks/verify.py              # default: 2000 images, 4 pairs of runs, 3 epochs
    python benchmarks/verify.py --quick      # a smoke run (200 images, 1 pair, 2 epochs)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from fastload.bench import data as bench_data
from fastload.bench._common import write_result


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def one_run(path: str, verify: str, epochs: int, workers: int, batch_size: int, image_size: int) -> dict:
    import fastload

    t0 = time.perf_counter()
    ds = fastload.ReinforcedDataset(path, verify=verify)
    open_s = time.perf_counter() - t0
    loader = fastload.ReinforcedLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       image_size=image_size, drop_last=True, seed=0, p_reinforced=1.0)
    rates, load = [], [_loadavg()]
    for e in range(epochs):
        loader.set_epoch(e)
        n, t = 0, time.perf_counter()
        for images, _, _ in loader:
            n += images.shape[0]
        rates.append(n / (time.perf_counter() - t))
        load.append(_loadavg())
    return {"verify": verify, "open_s": open_s, "epoch_images_per_s": rates, "loadavg": load}


def gather_cost(path: str, reps: int, batches: int, batch_size: int = 64) -> dict:
    """The per-batch work verification adds after the first epoch, isolated: ``gather`` (no
    decode of images, no render) of the same random batches on a verified ``lazy`` dataset
    and an ``off`` one, alternating, many short repetitions (low noise)."""
    import numpy as np

    import fastload

    on = fastload.ReinforcedDataset(path, verify="lazy")
    off = fastload.ReinforcedDataset(path, verify="off")
    rng = np.random.default_rng(0)
    idx = [rng.integers(0, len(on), batch_size) for _ in range(batches)]
    aug = [rng.integers(0, on.num_augmentations, batch_size) for _ in range(batches)]
    for ds in (on, off):  # hash (lazy) and warm both
        for i, j in zip(idx, aug):
            ds.gather(i, j)
    times = {"lazy": [], "off": []}
    for r in range(reps):
        for mode in (("lazy", "off") if r % 2 == 0 else ("off", "lazy")):
            ds = on if mode == "lazy" else off
            t = time.perf_counter()
            for i, j in zip(idx, aug):
                ds.gather(i, j)
            times[mode].append((time.perf_counter() - t) / batches * 1e6)
    return {"us_per_batch": times, "median_us_per_batch": {k: statistics.median(v) for k, v in times.items()},
            "batch_size": batch_size, "batches": batches, "reps": reps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--pairs", type=int, default=4, help="on/off pairs of runs (alternating order)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out-dir", default="benchmarks/results")
    a = ap.parse_args(argv)
    if a.quick:
        a.images, a.pairs, a.epochs = 200, 1, 2
    paths = bench_data.build_all(n=a.images, kinds=("crop",))
    path = paths["crop"]
    shard_bytes = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".arrow"))

    import fastload

    # the hash itself, on warm pages: what epoch 1 pays (the loader's path: the shards a batch
    # needs, hashed in parallel), and one thread reading the files (ReinforcedDataset.verify)
    ds = fastload.ReinforcedDataset(path, verify="off")
    t = time.perf_counter()
    assert ds.verify() == []
    hash_1thread_s = time.perf_counter() - t
    lazy = fastload.ReinforcedDataset(path, verify="lazy")
    t = time.perf_counter()
    lazy._check_many(range(len(lazy._shards_meta)))
    hash_s = time.perf_counter() - t
    # Arrow's full validation, which every open runs (offsets, UTF-8 keys), alone
    t = time.perf_counter()
    for pos in range(len(ds._shards_meta)):
        ds._shard(pos).batch.validate(full=True)
    validate_s = time.perf_counter() - t
    t = time.perf_counter()
    fastload.ReinforcedDataset(path, verify="off")
    open_s = time.perf_counter() - t
    one_run(path, "off", 1, a.workers, 64, 224)  # warm-up: page cache, thread pools, allocator

    runs = []
    for p in range(a.pairs):
        order = ("lazy", "off") if p % 2 == 0 else ("off", "lazy")
        for mode in order:
            r = one_run(path, mode, a.epochs, a.workers, 64, 224)
            runs.append(r)
            print(f"pair {p} {mode:>4}: epoch 1 {r['epoch_images_per_s'][0]:,.0f} img/s, later "
                  f"{statistics.mean(r['epoch_images_per_s'][1:]):,.0f} img/s (load {r['loadavg'][-1]:.1f})",
                  flush=True)

    g = gather_cost(path, 10 if not a.quick else 2, 200)
    extra_us = g["median_us_per_batch"]["lazy"] - g["median_us_per_batch"]["off"]
    print(f"gather only: lazy {g['median_us_per_batch']['lazy']:.0f} us/batch, off "
          f"{g['median_us_per_batch']['off']:.0f} us/batch", flush=True)

    def rates(mode, first):
        out = []
        for r in runs:
            if r["verify"] == mode:
                v = r["epoch_images_per_s"]
                out.append(v[0] if first else statistics.mean(v[1:]))
        return out

    summary = {}
    for name, first in (("epoch_1", True), ("later_epochs", False)):
        on, off = rates("lazy", first), rates("off", first)
        # per pair: the two runs sit next to each other in time (the machine is shared)
        costs = [1 - x / y for x, y in zip(on, off)]
        summary[name] = {
            "verify_on_images_per_s": on, "verify_off_images_per_s": off,
            "cost_per_pair": costs, "cost_median": statistics.median(costs),
            "cost_min": min(costs), "cost_max": max(costs),
        }
        print(f"{name}: verification cost median {100 * summary[name]['cost_median']:+.1f}% "
              f"(pairs: {', '.join(f'{100 * c:+.1f}%' for c in costs)})")
    later = summary["later_epochs"]["cost_median"]
    off_rate = statistics.median(rates("off", False))
    batch_us = 64 / off_rate * 1e6
    epoch_s = a.images / statistics.median(rates("off", True))
    bounds = {
        # the hashing epoch 1 adds at most (if nothing overlapped it), over a verify-off epoch 1
        "epoch_1_hash_over_epoch": hash_s / epoch_s,
        # what verification adds to a batch after epoch 1, over a verify-off batch of the loader
        "later_gather_extra_over_batch": extra_us / batch_us,
    }
    print(f"bounds: epoch 1 hashing {100 * bounds['epoch_1_hash_over_epoch']:.2f}% of an epoch; later epochs "
          f"{extra_us:+.1f} us per {batch_us / 1000:.0f} ms batch ({100 * bounds['later_gather_extra_over_batch']:+.3f}%)")
    write_result("verify", {
        "settings": {"images": a.images, "pairs": a.pairs, "epochs": a.epochs, "workers": a.workers,
                     "batch_size": 64, "image_size": 224, "policy": "crop (RandomResizedCrop + flip)"},
        "dataset": {"path": path, "shards": len(ds._shards_meta), "shard_bytes": shard_bytes},
        "sha256_all_shards_s": hash_s, "sha256_all_shards_one_thread_s": hash_1thread_s,
        "arrow_validate_full_all_shards_s": validate_s,
        "open_dataset_s": open_s, "sha256_mib_per_s": shard_bytes / 2**20 / hash_s,
        "sha256_one_thread_mib_per_s": shard_bytes / 2**20 / hash_1thread_s,
        "summary": summary, "runs": runs, "gather_only": g, "cost_bounds": bounds,
        "target": "verification cost < 3% of loader throughput after the first epoch",
        "target_met": bool(later < 0.03 and bounds["later_gather_extra_over_batch"] < 0.03),
        "max_loadavg": max(x for r in runs for x in r["loadavg"]),
        "notes": "cost = 1 - on/off per adjacent pair of runs; negative = the verified run was faster (noise). "
                 "The machine is shared by other jobs: see loadavg per run. cost_bounds isolate what "
                 "verification adds: the sha256 time of all shards over a verify-off epoch 1, and the extra "
                 "gather time per batch (same batches, alternating, verified dataset) over a loader batch.",
    }, a.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
