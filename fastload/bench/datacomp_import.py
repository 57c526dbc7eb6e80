"""``python -m fastload.bench.datacomp_import``: import throughput of DataCompDR-layout
shards with each engine (local; Ray with N CPUs), on shards written here in DataCompDR-12M's
layout (per sample ``syn.json`` with 5 synthetic captions, ``paug.json`` as ``{"param_aug":
[...]}`` with 30 augmentations of crop + 2 RandAugment ops with float magnitudes, ``npz`` with
bf16 image/text embeddings of 2 teachers x 768) and an image tar of JPEGs with real captions.
Writes benchmarks/results/datacomp_import.json."""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time

import numpy as np

from fastload.bench._common import write_result
from fastload.cli import describe


def _add(tf, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shards(workdir: str, n: int, num_aug: int = 30, dim: int = 1536, seed: int = 0):
    """(reinforcement tar, image tar) of ``n`` samples in DataCompDR-12M's layout."""
    from PIL import Image

    from fastload.sample import params as P

    rng = np.random.default_rng(seed)
    sizes = ((375, 500), (500, 333), (333, 500), (500, 375), (400, 600))
    dr, im = os.path.join(workdir, "dr-00000000.tar"), os.path.join(workdir, "img-00000000.tar")
    with tarfile.open(dr, "w") as tdr, tarfile.open(im, "w") as tim:
        for s in range(n):
            key = f"{s:08d}"
            h, w = sizes[s % len(sizes)]
            yy, xx = np.mgrid[0:h, 0:w]
            img = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), rng.integers(0, 256, (h, w))], -1)
            buf = io.BytesIO()
            Image.fromarray(img.astype(np.uint8)).save(buf, format="JPEG", quality=90)
            paug = []
            for _ in range(num_aug):
                bh, bw = int(rng.integers(h // 3, h + 1)), int(rng.integers(w // 3, w + 1))
                i, j = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
                ops = [[P.RA_OPS[int(rng.integers(0, 14))], float(rng.integers(0, 31)) / 30.0 * 0.9]
                       for _ in range(2)]
                paug.append([[i, j, bh, bw], ops])
            ie = rng.standard_normal((num_aug, dim)).astype(np.float32)
            te = rng.standard_normal((6, dim)).astype(np.float32)
            z = io.BytesIO()
            np.savez(z, image_emb=(ie.view(np.uint32) >> 16).astype(np.uint16),
                     text_emb=(te.view(np.uint32) >> 16).astype(np.uint16))
            _add(tdr, f"{key}.syn.json", json.dumps({"syn_text": [f"synthetic {s}.{c}" for c in range(5)]}).encode())
            _add(tdr, f"{key}.paug.json", json.dumps({"param_aug": paug}).encode())
            _add(tdr, f"{key}.npz", z.getvalue())
            _add(tim, f"{key}.jpg", buf.getvalue())
            _add(tim, f"{key}.txt", f"real caption {s}".encode())
    return dr, im


def _timed_import(dr, im, out, engine, workers, shard_size):
    """(wall seconds, CPU seconds of this process tree: the Ray workers are its descendants)."""
    from fastload.bench.peers import tree_cpu_seconds
    from fastload.importers.datacomp import import_datacomp

    if engine == "ray":
        import ray

        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        c0, t0 = tree_cpu_seconds(os.getpid()), time.perf_counter()
        m = import_datacomp([dr], out, [im], shard_size=shard_size, progress=False, engine=engine, workers=workers)
        return time.perf_counter() - t0, tree_cpu_seconds(os.getpid()) - c0, m
    finally:
        if engine == "ray":
            ray.shutdown()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastload.bench.datacomp_import", description=describe(__doc__))
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--num-aug", type=int, default=30, help="augmentations per sample (DataCompDR-12M: 30)")
    ap.add_argument("--shard-size", type=int, default=100, help="samples per shard (Ray: one task per shard)")
    ap.add_argument("--engines", nargs="+", default=["local", "ray-1", "ray-2"],
                    help="local, or ray-N (Ray with N CPUs)")
    ap.add_argument("--out-dir", default="benchmarks/results")
    a = ap.parse_args(argv)
    engines = [("local", None) if e == "local" else ("ray", int(e.split("-", 1)[1])) for e in a.engines]
    load0 = os.getloadavg()
    runs, digests = {}, {}
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        dr, im = write_shards(d, a.samples, a.num_aug)
        t_write = time.perf_counter() - t0
        n_rec = a.samples * a.num_aug
        for engine, workers in engines:
            out = os.path.join(d, "out")
            shutil.rmtree(out, ignore_errors=True)
            wall, cpu, m = _timed_import(dr, im, out, engine, workers, a.shard_size)
            name = engine if workers is None else f"{engine}-{workers}"
            digests[name] = [s["sha256"] for s in m["shards"]]
            runs[name] = {"engine": engine, "workers": workers, "seconds": wall, "cpu_seconds": cpu,
                          "samples_per_s": a.samples / wall, "records_per_s": n_rec / wall,
                          "records_per_cpu_s": n_rec / max(cpu, 1e-9), "load_1min_after": os.getloadavg()[0]}
            print(f"{name:>8}: {n_rec / wall:,.0f} records/s ({a.samples / wall:,.1f} samples/s), "
                  f"{n_rec / max(cpu, 1e-9):,.0f} records per CPU-second", flush=True)
        dr_bytes = os.path.getsize(dr)
    same = len({tuple(v) for v in digests.values()}) == 1
    path = write_result("datacomp_import", {
        "machine_load_1min": {"start": load0[0], "end": os.getloadavg()[0]},
        "samples": a.samples, "augmentations_per_sample": a.num_aug, "records": n_rec, "shard_size": a.shard_size,
        "reinforcement_tar_bytes": dr_bytes, "shards_write_seconds": t_write,
        "engines_wrote_identical_shards": same, "engines": runs,
        "note": ("shards written here in DataCompDR-12M's layout (fastload.bench.datacomp_import.write_shards: "
                 "synthetic JPEGs 333-600 px, bf16 embeddings 2x768, 5 synthetic captions, 30 augmentations); "
                 "a record is one augmentation; import = stream the tars, join images by key, stage; per shard: "
                 "decode check, npz and paug.json parse, encode, write. 'local' is one process, 'ray-N' "
                 "converts shards in Ray tasks on N CPUs; cpu_seconds include the Ray workers (descendants)")},
        a.out_dir)
    print(f"wrote {path}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
