"""``python -m fastload.bench.mldr_import``: import throughput of ml-dr archives and the bytes
per augmentation of the imported dataset vs the archive's, for each published ImageNet+
variant, on archives written in ml-dr's layout (fastload.bench.mldr_layout: synthetic
parameters and teacher top-k, ImageNet-like image sizes, 1000 classes, top-10, gzip as
published). Writes benchmarks/results/mldr_import.json."""
from __future__ import annotations

import argparse

from fastload.cli import describe
import os
import shutil
import sys
import tempfile
import time

from fastload.bench._common import write_result


def _timed_import(arch, imgs, out, engine, workers, shard_size):
    """(wall seconds, CPU seconds of this process tree: the Ray workers are its descendants)."""
    from fastload.bench.peers import tree_cpu_seconds
    from fastload.importers.mldr import import_mldr

    if engine == "ray":
        import ray

        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        c0, t0 = tree_cpu_seconds(os.getpid()), time.perf_counter()
        import_mldr(arch, imgs, out, progress=False, engine=engine, workers=workers, shard_size=shard_size)
        return time.perf_counter() - t0, tree_cpu_seconds(os.getpid()) - c0
    finally:
        if engine == "ray":
            ray.shutdown()


def run(n_images: int, num_samples: int, variants, fmt: str, workdir: str, engines=(("local", None),),
        shard_size: int = 1000) -> list:
    from fastload.bench import mldr_layout as L
    from fastload.tools.inspect import summarize

    imgs = os.path.join(workdir, "imgs")
    # 1000 classes as ImageNet (folders), few images each: ImageNet-like sizes
    hw = L.write_image_folder(imgs, n_images, classes=min(1000, n_images),
                              sizes=((375, 500), (500, 333), (333, 500), (500, 375), (400, 600)))
    if n_images < 1000:  # the class count must match the reinforcement's: empty class folders
        for c in range(n_images, 1000):
            os.makedirs(os.path.join(imgs, f"class{c:04d}"), exist_ok=True)
    rows = []
    for variant in variants:
        jb = variant.endswith("+jb")
        base = variant.replace("+jb", "")
        cfg = L.make_config(base, num_samples, 10, 1000, size=224, joblib=jb)
        arch = os.path.join(workdir, f"{variant}.{fmt}" if fmt != "dir" else variant)
        t0 = time.perf_counter()
        L.write_archive(arch, hw, cfg, fmt=fmt)
        t_write = time.perf_counter() - t0
        arch_bytes = os.path.getsize(arch) if fmt != "dir" else sum(
            os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(arch) for f in fs)
        out = os.path.join(workdir, f"out-{variant}")
        n_aug = n_images * num_samples
        runs = {}
        for engine, workers in engines:
            shutil.rmtree(out, ignore_errors=True)
            wall, cpu = _timed_import(arch, imgs, out, engine, workers, shard_size)
            name = engine if workers is None else f"{engine}-{workers}"
            runs[name] = {"engine": engine, "workers": workers, "seconds": wall, "cpu_seconds": cpu,
                          "records_per_s": n_aug / wall, "records_per_cpu_s": n_aug / max(cpu, 1e-9)}
            print(f"{variant:>10} {name:>8}: {n_aug / wall:,.0f} records/s, {n_aug / max(cpu, 1e-9):,.0f} "
                  f"records per CPU-second", flush=True)
        t_import = runs[next(iter(runs))]["seconds"]
        s = summarize(out)
        b = s["bytes_per_augmentation"]
        rows.append({"variant": variant, "format": fmt + (" (.jb files)" if jb else " (.pth.tar files)"),
                     "images": n_images, "augmentations_per_image": num_samples,
                     "archive_bytes": arch_bytes, "archive_bytes_per_augmentation": arch_bytes / n_aug,
                     "fastload_params_bytes_per_augmentation": b["params"],
                     "fastload_ext_bytes_per_augmentation": b["params_ext"],
                     "fastload_targets_bytes_per_augmentation": b["targets"],
                     "fastload_params_plus_targets_bytes_per_augmentation": b["params_plus_targets"],
                     "ratio_archive_to_fastload": (arch_bytes / n_aug) / b["params_plus_targets"],
                     "import_seconds": t_import, "import_images_per_s": n_images / t_import,
                     "import_records_per_s": n_aug / t_import, "archive_write_seconds": t_write,
                     "engines": runs})
        print(f"{variant:>10}: archive {arch_bytes / n_aug:7.1f} B/aug, fastload {b['params_plus_targets']:6.2f} "
              f"B/aug (params {b['params']:.2f}, of which ext {b['params_ext']:.2f}; targets {b['targets']:.2f}); "
              f"import {n_aug / t_import:,.0f} records/s ({n_images / t_import:.1f} images/s)")
        shutil.rmtree(out)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastload.bench.mldr_import", description=describe(__doc__))
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--num-samples", type=int, default=50, help="augmentations per image (ImageNet+: 50)")
    ap.add_argument("--format", default="tar.gz", choices=("tar", "tar.gz", "dir"))
    ap.add_argument("--variants", nargs="+", default=["rrc", "mix", "rare", "mix_rare", "mix_rare+jb"])
    ap.add_argument("--shard-size", type=int, default=1000, help="images per shard (Ray: one task per shard)")
    ap.add_argument("--engines", nargs="+", default=["local"],
                    help="local, or ray-N (Ray with N CPUs), e.g. --engines local ray-1 ray-2")
    ap.add_argument("--out-dir", default="benchmarks/results")
    a = ap.parse_args(argv)
    engines = [("local", None) if e == "local" else ("ray", int(e.split("-", 1)[1])) for e in a.engines]
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        rows = run(a.images, a.num_samples, a.variants, a.format, d, engines, a.shard_size)
    path = write_result("mldr_import", {
        "machine_load_1min": {"start": load0[0], "end": os.getloadavg()[0]},
        "note": ("archives written in ml-dr's layout by fastload.bench.mldr_layout (synthetic parameters "
                 "and top-10 targets over 1000 classes); import = stream, safe-unpickle, convert, stage, "
                 "write shards (images copied from the folder); 'local' is one process, 'ray-N' streams the "
                 "archive here and converts shards in Ray tasks on N CPUs; cpu_seconds include the Ray "
                 "workers (descendants of this process)"),
        "results": rows}, a.out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
