"""Images loader from S3 (moto_server on 127.0.0.1) beside the same loader on local disk.

2 ranks as separate processes, each with its own cache; per round, side by side:
``local`` (the dataset folder), ``s3_cold`` (empty caches: shards download during the epoch,
predownload driven by the sampler's known order), ``s3_warm`` (the caches the cold run
filled, new processes). Every mode uses the same order (BlockShuffleSampler, 2 partitions,
so each rank reads its own shards) and the same ReinforcedLoader settings, so only the
source differs. Bytes downloaded per rank per epoch are reported beside the rank's share of
the dataset. Real JPEGs (fastload.bench.data), 2 shared cores: noisy, compare within a round.

    python benchmarks/remote.py [--images 1536] [--rounds 3]   # -> benchmarks/results/remote.json
    python benchmarks/remote.py --policy ra_mix                  # -> remote_ra_mix.json (MixUp/CutMix:
                                                                 #    partners read by ranged GETs)
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

G, SHARD, BLOCK, IMAGE = 128, 64, 4, 160


def build(n: int, work: str, kind: str = "crop") -> str:
    import fastload
    from fastload.bench.data import build_images, list_images, policy, tiny_teacher

    out = os.path.join(work, f"reinforced-{n}-shard{SHARD}" + ("" if kind == "crop" else f"-{kind}"))
    if os.path.exists(os.path.join(out, "manifest.json")):
        return out
    images = build_images(os.path.join(work, f"jpeg-{n}"), n=n, progress=False)
    _, _, classes = list_images(images)
    fastload.reinforce(images, tiny_teacher(len(classes)), out, num_augmentations=4, topk=5, policy=policy(kind),
                       image_size=224, shard_size=SHARD, progress=False)
    return out


def worker(source: str, cache: str, rank: int, world: int) -> dict:
    from fastload.batch.shuffle import BlockShuffleSampler
    from fastload.format.reader import ReinforcedDataset
    from fastload.loader.reinforced import ReinforcedLoader

    t0 = time.perf_counter()
    ds = ReinforcedDataset(source, cache_dir=cache, cache_limit=None, predownload=4) if "://" in source \
        else ReinforcedDataset(source)
    t_open = time.perf_counter() - t0
    sampler = BlockShuffleSampler(ds, block_shards=BLOCK, seed=0, partitions=world, global_batch_size=G)
    bs = sampler.batch_sampler(G, rank=rank, world_size=world, dataset=ds)
    loader = ReinforcedLoader(ds, batch_sampler=bs, image_size=IMAGE, seed=0)
    import resource

    def cpu():
        u = resource.getrusage(resource.RUSAGE_SELF)
        return u.ru_utime + u.ru_stime

    n = 0
    c0, t0 = cpu(), time.perf_counter()
    for batch in loader:
        n += batch[0].shape[0]
    t_epoch, c_epoch = time.perf_counter() - t0, cpu() - c0
    st = ds.remote.stats if ds.remote is not None else {"bytes_downloaded": 0, "meta_bytes": 0, "downloads": 0,
                                                        "row_bytes": 0, "row_reads": 0}
    dataset_bytes = sum(s["bytes"] for s in ds.manifest["shards"])
    if ds.remote is not None:
        ds.remote.close()
    return {"images": n, "epoch_s": t_epoch, "cpu_s": c_epoch, "open_s": t_open, "bytes_downloaded": st["bytes_downloaded"],
            "meta_bytes": st["meta_bytes"], "shard_downloads": st["downloads"], "dataset_bytes": dataset_bytes,
            "row_bytes": st["row_bytes"], "row_reads": st["row_reads"]}


def run_mode(source: str, caches, env) -> dict:
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", source, caches[r], str(r), "2"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = []
    for p in procs:
        o, e = p.communicate(timeout=900)
        if p.returncode:
            raise RuntimeError(e[-3000:])
        outs.append(json.loads(o.strip().splitlines()[-1]))
    images = sum(o["images"] for o in outs)
    wall = max(o["epoch_s"] for o in outs)
    return {"images_per_s": images / wall, "images_per_cpu_s": images / sum(o["cpu_s"] for o in outs),
            "ranks": outs}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1536)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--policy", choices=("crop", "ra_mix"), default="crop")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "fastload_remote_bench"))
    ap.add_argument("--worker", nargs=4, metavar=("SOURCE", "CACHE", "RANK", "WORLD"))
    a = ap.parse_args()
    if a.worker:
        src, cache, r, w = a.worker
        print(json.dumps(worker(src, cache, int(r), int(w))))
        return
    import signal

    from _remote_servers import Moto
    from fastload.bench._common import write_result

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop moto_server on the way out

    os.makedirs(a.work, exist_ok=True)
    t_build = time.time()
    local = build(a.images, a.work, a.policy)
    t_build = time.time() - t_build
    moto = Moto()
    try:
        url = moto.upload(local, "bench", "imagenet-like")
        env = dict(os.environ, **moto.env)
        warm_up = tempfile.mkdtemp(dir=a.work)
        run_mode(local, [warm_up, warm_up], env)  # page cache and imports warm for every mode alike
        rounds = []
        for k in range(a.rounds):
            caches = [tempfile.mkdtemp(prefix=f"flc{k}r{r}-", dir=a.work) for r in range(2)]
            row = {"local": run_mode(local, caches, env),
                   "s3_cold": run_mode(url, caches, env),
                   "s3_warm": run_mode(url, caches, env)}
            for c in caches:
                shutil.rmtree(c, ignore_errors=True)
            row["warm_vs_local"] = row["s3_warm"]["images_per_s"] / row["local"]["images_per_s"]
            row["cold_vs_local"] = row["s3_cold"]["images_per_s"] / row["local"]["images_per_s"]
            for m in ("warm", "cold"):  # per CPU-second of the loader processes: robust to outside load
                row[f"{m}_vs_local_cpu"] = row[f"s3_{m}"]["images_per_cpu_s"] / row["local"]["images_per_cpu_s"]
            rounds.append(row)
            print(f"round {k}: local {row['local']['images_per_s']:.0f} img/s, cold {row['s3_cold']['images_per_s']:.0f} "
                  f"({row['cold_vs_local']:.2f}x), warm {row['s3_warm']['images_per_s']:.0f} ({row['warm_vs_local']:.2f}x)",
                  flush=True)
        ds_bytes = rounds[0]["local"]["ranks"][0]["dataset_bytes"]
        cold = [r["s3_cold"]["ranks"] for r in rounds]
        per_rank = [x["bytes_downloaded"] + x["meta_bytes"] + x["row_bytes"] for rr in cold for x in rr]
        summary = {
            "warm_vs_local_median": statistics.median(r["warm_vs_local"] for r in rounds),
            "cold_vs_local_median": statistics.median(r["cold_vs_local"] for r in rounds),
            "warm_vs_local_cpu_median": statistics.median(r["warm_vs_local_cpu"] for r in rounds),
            "cold_vs_local_cpu_median": statistics.median(r["cold_vs_local_cpu"] for r in rounds),
            "note": "wall-clock ratios (images/s, both ranks) are the targets' figure; per-CPU-second ratios "
                    "exclude the outside load but also moto_server's CPU and the time spent waiting on it",
            "targets": {"warm_vs_local": 0.95, "cold_vs_local": 0.80, "bytes_per_rank_vs_share": 1.1},
            "dataset_bytes": ds_bytes, "rank_share_bytes": ds_bytes / 2,
            "cold_bytes_per_rank_per_epoch_max": max(per_rank),
            "cold_bytes_per_rank_vs_share_max": max(per_rank) / (ds_bytes / 2),
            "warm_bytes_downloaded": sum(x["bytes_downloaded"] for r in rounds for x in r["s3_warm"]["ranks"]),
        }
        print(json.dumps(summary, indent=1))
        path = write_result("remote" if a.policy == "crop" else f"remote_{a.policy}", {
            "setup": {"images": a.images, "rows_per_shard": SHARD, "shards": -(-a.images // SHARD),
                      "global_batch": G, "ranks": 2, "image_size": IMAGE, "policy": {"crop": "crop (RRC+flip)", "ra_mix": "RRC+flip+RandAugment(2,9)+MixUp/CutMix "
                                 "(p=0.5 each; a partner is any row, read by ranged GET)"}[a.policy] + ", 4 stored augs",
                      "order": f"BlockShuffleSampler(block_shards={BLOCK}, partitions=2)",
                      "server": "moto_server on 127.0.0.1 (S3 REST over HTTP), same machine",
                      "caches": "one per rank (separate folders), predownload=4 shards"},
            "note": "2 shared cores, and moto_server itself (Python) runs on them: noisy; ratios are within "
                    "one round (modes run back to back); bytes per rank count shards, metadata and partner rows",
            "build_seconds": t_build, "load_average": os.getloadavg(), "rounds": rounds, "summary": summary,
            "mosaicml_streaming": "see benchmarks/remote_peers.py (it needs its own venv)"}, a.out_dir)
        print(path)
    finally:
        moto.stop()


if __name__ == "__main__":
    main()
