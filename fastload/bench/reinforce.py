"""Benchmark of the reinforced format: generation throughput, bytes per augmentation, and
Arrow IPC vs Parquet random access through a memory map.

Run: ``python benchmarks/reinforce.py`` (a few seconds; writes benchmarks/results/reinforce.json).

The small embedded test data (photos from scikit-image, a tiny deterministic teacher) is in
``fastload.datasets``.
"""
from __future__ import annotations

import argparse

from fastload.cli import describe
import os
import shutil
import tempfile
import time
from typing import Dict

import numpy as np

from fastload.datasets import make_images, make_teacher  # noqa: F401 - old import path


def _synthetic_targets(rng, rows: int, n: int, k: int, classes: int = 1000):
    """Teacher-like top-k: each image has its own class affinity, augmentations add noise."""
    base = rng.standard_normal((rows, 1, classes)) * 2.0
    logits = base + rng.standard_normal((rows, n, classes)) * 0.7
    logits *= 2.0
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ids = np.argsort(-p, axis=-1)[..., :k]
    probs = np.take_along_axis(p, ids, -1)
    return ids, probs


def size_figures(rows: int = 64, n: int = 400, seed: int = 0, tmp: str = None) -> Dict[str, Dict]:
    """Bytes per augmentation (params + targets) of the encoding, k=10 and 5, +/- mixing."""
    from fastload.format.shards import encode_augs, encode_targets
    from fastload.sample.params import AUG_DTYPE
    from fastload.sample.policy import AugmentPolicy, sample_params

    rng = np.random.default_rng(seed)
    # ImageNet-like source sizes (short side 300-500, aspect 3:4 .. 4:3)
    short = rng.integers(300, 501, rows)
    aspect = rng.uniform(0.75, 1.34, rows)
    hw = np.stack([short, np.round(short * aspect)], 1).astype(np.int64)
    out = {}
    for mixing in (True, False):
        pol = AugmentPolicy(randaugment=(2, 9), erase=0.25, mixup=1.0 if mixing else 0.0,
                            cutmix=1.0 if mixing else 0.0)
        recs = sample_params(pol, np.random.default_rng(seed + 1), np.arange(rows), hw, n)
        aug_b = sum(len(encode_augs(recs[r], tuple(hw[r]), pol.size, hw)) for r in range(rows))
        for k in (5, 10):  # k=10 last: the reader benchmark below uses it
            ids, probs = _synthetic_targets(rng, rows, n, k)
            tgt_b = sum(len(encode_targets(ids[r], probs[r])) for r in range(rows))
            raw = AUG_DTYPE.itemsize + k * (2 + 2)
            out[f"k{k}_{'mix' if mixing else 'nomix'}"] = {
                "params_bytes_per_aug": aug_b / (rows * n), "targets_bytes_per_aug": tgt_b / (rows * n),
                "bytes_per_aug": (aug_b + tgt_b) / (rows * n), "raw_bytes_per_aug": raw,
                "policy": "RRC+flip+RandAugment(2,9)+erase0.25" + ("+MixUp1+CutMix1 (p=0.5)" if mixing else ""),
                "rows": rows, "N": n}
        if mixing and tmp is not None:
            out["reader_gather"] = _gather_speed(tmp, recs, hw, pol, ids, probs)
    return out


def _gather_speed(tmp: str, recs, hw, pol, ids, probs, batch: int = 256) -> Dict:
    """``ReinforcedDataset.gather`` cost per sample on a dataset with these rows (N as given)."""
    from fastload.format.reader import ReinforcedDataset
    from fastload.format.shards import encode_augs, encode_targets
    from fastload.format.writer import DatasetWriter, write_shard_file

    rows, n = recs.shape
    root = os.path.join(tmp, "gather")
    cols = {"id": list(range(rows)), "key": [str(i) for i in range(rows)], "hash": [b"\0" * 16] * rows,
            "orig_h": hw[:, 0].tolist(), "orig_w": hw[:, 1].tolist(), "src_h": hw[:, 0].tolist(),
            "src_w": hw[:, 1].tolist(), "label": [0] * rows, "image": [b"\xff\xd8"] * rows,
            "augs": [encode_augs(recs[r], tuple(hw[r]), pol.size, hw) for r in range(rows)],
            "targets": [encode_targets(ids[r], probs[r]) for r in range(rows)]}
    header = {"kind": "classification", "num_augmentations": n, "topk": ids.shape[-1], "num_classes": 1000,
              "seeds": [0], "policy": pol.to_dict(), "replay": {"image_size": list(pol.size)}}
    w = DatasetWriter(root, header, {"bench": 1}, 1)
    w.add_shard(write_shard_file(root, 0, cols, "classification"))
    w.finish()
    ds = ReinforcedDataset(root)
    rng = np.random.default_rng(0)
    idx, aug = rng.integers(0, rows, batch), rng.integers(0, n, batch)
    ds.gather(idx, aug)
    t = time.perf_counter()
    reps = 3
    for _ in range(reps):
        _, got, gi, gp = ds.gather(idx, aug)
    dt = (time.perf_counter() - t) / (reps * batch)
    assert got.tobytes() == recs[idx, aug].tobytes()  # the benchmark checks what it reads
    return {"N": n, "k": int(ids.shape[-1]), "batch": batch, "us_per_sample": dt * 1e6}


def random_access(tmp: str, rows: int = 2000, n: int = 400, reads: int = 2000, seed: int = 0) -> Dict:
    """Read one row's blobs at random: Arrow IPC via a memory map vs Parquet (memory_map=True)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fastload.format.reader import _Shard
    from fastload.format.shards import arrow_schema

    rng = np.random.default_rng(seed)
    blobs = [rng.integers(0, 256, int(rng.integers(n * 20, n * 30)), dtype=np.uint8).tobytes() for _ in range(rows)]
    schema = arrow_schema("classification")
    cols = {"id": list(range(rows)), "key": [str(i) for i in range(rows)], "hash": [b"\0" * 16] * rows,
            "orig_h": [1] * rows, "orig_w": [1] * rows, "src_h": [1] * rows, "src_w": [1] * rows,
            "label": [0] * rows, "image": [None] * rows, "augs": blobs, "targets": blobs}
    batch = pa.record_batch([pa.array(cols[f.name], type=f.type) for f in schema], schema=schema)
    ipc = os.path.join(tmp, "ra.arrow")
    with pa.OSFile(ipc, "wb") as sink, pa.ipc.new_file(sink, schema) as w:
        w.write_batch(batch)
    order = rng.integers(0, rows, reads)
    res = {"rows": rows, "reads": reads, "blob_bytes_mean": float(np.mean([len(b) for b in blobs]))}
    sh = _Shard(ipc, "classification")
    t = time.perf_counter()
    tot = 0
    for r in order:
        tot += len(sh.blob("augs", int(r)))
    res["arrow_ipc_mmap_us_per_read"] = (time.perf_counter() - t) / reads * 1e6
    for rg in (64, 1024):
        pqp = os.path.join(tmp, f"ra_{rg}.parquet")
        pq.write_table(pa.Table.from_batches([batch]), pqp, row_group_size=rg, compression="none")
        f = pq.ParquetFile(pqp, memory_map=True)
        t = time.perf_counter()
        m = min(reads, 200)  # Parquet is far slower: fewer reads keep the run short
        for r in order[:m]:
            g = int(r) // rg
            tab = f.read_row_group(g, columns=["augs"])
            tot += len(tab.column(0)[int(r) - g * rg].as_buffer())
        res[f"parquet_rowgroup{rg}_us_per_read"] = (time.perf_counter() - t) / m * 1e6
    res["parquet_over_arrow_ratio"] = res["parquet_rowgroup64_us_per_read"] / res["arrow_ipc_mmap_us_per_read"]
    return res


def generation(tmp: str, images: int = 24, n: int = 16, image_size: int = 224, batch_size: int = 64) -> Dict:
    """End-to-end ``reinforce`` throughput with the tiny teacher (scan + render + teacher + write)."""
    import torch

    from fastload.tools.inspect import summarize
    from fastload.generate import reinforce
    from fastload.sample.policy import AugmentPolicy

    src = os.path.join(tmp, "imgs")
    make_images(src, images)
    teacher = make_teacher(1000)
    res = {}
    for mixing in (False, True):
        out = os.path.join(tmp, f"gen_{mixing}")
        pol = AugmentPolicy(randaugment=(2, 9), erase=0.25, mixup=1.0 if mixing else 0.0,
                            cutmix=1.0 if mixing else 0.0, size=(image_size, image_size))
        t0 = time.perf_counter()
        reinforce(src, teacher, out, num_augmentations=n, topk=10, policy=pol, batch_size=batch_size,
                  image_size=image_size, progress=False, shard_size=images)
        dt = time.perf_counter() - t0
        s = summarize(out)
        res["mix" if mixing else "nomix"] = {
            "images": images, "N": n, "image_size": image_size, "seconds": dt, "images_per_s": images / dt,
            "augmentations_per_s": images * n / dt, "torch_threads": torch.get_num_threads(),
            "bytes_per_aug_tiny_teacher_k10": s["bytes_per_augmentation"]["params_plus_targets"]}
    return res


def main(argv=None) -> int:
    from fastload.bench._common import write_result

    ap = argparse.ArgumentParser(prog="fastload bench --reinforce", description=describe(__doc__))
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    a = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="fl_bench_rf_")
    try:
        size = size_figures(rows=16 if a.quick else 64, tmp=tmp)
        gather = size.pop("reader_gather")
        ra = random_access(tmp, rows=500 if a.quick else 2000)
        gen = generation(tmp, images=8 if a.quick else 24, n=8 if a.quick else 16)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    payload = {
        "format_size": size, "format_size_target_bytes_per_aug_k10": 40,
        "format_size_reference_ml_dr": "65-104 B per augmentation (derived from the ml-dr format description)",
        "format_size_note": ("params from fastload.sample.policy.sample_params on ImageNet-like source sizes; "
                             "targets from a synthetic 1000-class teacher (per-image class affinity + "
                             "per-augmentation noise); see generation.*.bytes_per_aug_tiny_teacher_k10 for "
                             "a real (tiny, random-weight) teacher at small N, where per-row headers weigh more"),
        "random_access": ra, "reader_gather": gather, "generation": gen,
        "load_average_1_5_15": list(os.getloadavg())}
    path = write_result("reinforce", payload, a.out_dir)
    for key, v in size.items():
        print(f"{key}: {v['bytes_per_aug']:.2f} B/aug (params {v['params_bytes_per_aug']:.2f}, targets "
              f"{v['targets_bytes_per_aug']:.2f}; raw {v['raw_bytes_per_aug']})")
    print(f"random access: arrow ipc {ra['arrow_ipc_mmap_us_per_read']:.2f} us, parquet(rg64) "
          f"{ra['parquet_rowgroup64_us_per_read']:.1f} us, "
          f"parquet(rg1024) {ra['parquet_rowgroup1024_us_per_read']:.1f} us")
    print(f"ReinforcedDataset.gather: {gather['us_per_sample']:.1f} us/sample (N={gather['N']}, k={gather['k']})")
    for key, v in gen.items():
        print(f"generation {key}: {v['images_per_s']:.1f} img/s, {v['augmentations_per_s']:.1f} aug/s")
    print(f"wrote {path}")
    return 0
