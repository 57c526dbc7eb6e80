"""Images loader from S3 (moto_server on 127.0.0.1) beside the same loader on local disk.

2 ranks (``--ranks``) as separate processes, each with its own cache; per round, side by
side: ``local`` (the dataset folder), ``s3_cold`` (empty caches: shards download during the
epoch, predownload driven by the sampler's known order), ``s3_warm`` (the caches the cold
run filled, new processes), and, where nginx is installed, ``s3nginx_cold``/``s3nginx_warm``:
the same s3:// URL and client with its GETs answered by nginx instead of moto_server, whose
Python spends about a core on a cold epoch (``server_cpu_s``). Every mode uses the same
order (BlockShuffleSampler, one partition per rank, so each rank reads its own shards) and
the same ReinforcedLoader settings, so only the source differs. The ranks open their
datasets (a remote one reads its metadata: ``open_s``), then start the epoch together, as DDP
ranks do at their first collective; the epoch clock starts there (the predownload plan is
made when the epoch's iteration starts, so it gets no head start). Bytes downloaded per rank
per epoch are reported beside the rank's share of the dataset. Real JPEGs
(fastload.bench.data), 2 shared cores: noisy, compare within a round.

    python benchmarks/remote.py [--images 1536] [--rounds 3]   # -> benchmarks/results/remote.json
    python benchmarks/remote.py --ranks 1                        # -> remote_1rank.json (a core left free)
    python benchmarks/remote.py --policy ra_mix                  # -> remote_ra_mix.json (MixUp/CutMix:
                                                                 #    partners read by ranged GETs)
    python benchmarks/remote.py --ranks 4 --shared-cache --partitions 1
        # -> remote_4rank_shared_1part.json: 4 ranks of one node, one cache folder, every rank
        #    reading every block: GETs per shard per epoch and bytes per rank vs its share

Each mode records the 1-minute load average as it starts; the summary gives medians, ranges
(spread over rounds), per-CPU-second ratios beside the wall-clock ones, and a verdict per
target: "met" only when every round clears it (a median at the line is not met).
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
    from fastload.datasets import build_images, list_images, policy, tiny_teacher

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
    ds = ReinforcedDataset(source, cache_dir=cache, cache_limit=None, predownload=4,
                           partner_reads=os.environ.get("FASTLOAD_BENCH_PARTNER_READS", "auto")) if "://" in source \
        else ReinforcedDataset(source)
    t_open = time.perf_counter() - t0
    parts = int(os.environ.get("FASTLOAD_BENCH_PARTITIONS", "0")) or world
    sampler = BlockShuffleSampler(ds, block_shards=BLOCK, seed=0, partitions=parts, global_batch_size=G)
    bs = sampler.batch_sampler(G, rank=rank, world_size=world, dataset=ds)
    loader = ReinforcedLoader(ds, batch_sampler=bs, image_size=IMAGE, seed=0)
    if os.environ.get("FASTLOAD_BENCH_BARRIER"):  # start together, as DDP ranks do at their first collective
        print("READY", flush=True)
        sys.stdin.readline()
    import resource

    def cpu():
        u = resource.getrusage(resource.RUSAGE_SELF)
        return u.ru_utime + u.ru_stime

    n, t_first, n_first = 0, None, 0
    c0, t0 = cpu(), time.perf_counter()
    for batch in loader:
        n += batch[0].shape[0]
        if t_first is None:  # a cold cache first waits for the shards of the first batch
            t_first, n_first = time.perf_counter() - t0, n
    t_epoch, c_epoch = time.perf_counter() - t0, cpu() - c0
    st = ds.remote.stats if ds.remote is not None else {"bytes_downloaded": 0, "meta_bytes": 0, "downloads": 0,
                                                        "row_bytes": 0, "row_reads": 0}
    retried = ds.remote.client.retried if ds.remote is not None else 0
    # the bytes of the shards this rank's plan read (its share as the sampler assigned it;
    # with a shared cache another rank may have downloaded some of them)
    own = 0
    if ds.remote is not None and ds.remote._plan is not None:
        own = sum(int(ds.manifest["shards"][p]["bytes"]) for p in set(ds.remote._plan.tolist()))
    dataset_bytes = sum(s["bytes"] for s in ds.manifest["shards"])
    if ds.remote is not None:
        ds.remote.close()
    return {"images": n, "epoch_s": t_epoch, "first_batch_s": t_first,
            "after_first_images_per_s": (n - n_first) / max(t_epoch - (t_first or 0.0), 1e-9), "cpu_s": c_epoch, "open_s": t_open, "bytes_downloaded": st["bytes_downloaded"],
            "meta_bytes": st["meta_bytes"], "shard_downloads": st["downloads"], "dataset_bytes": dataset_bytes,
            "row_bytes": st["row_bytes"], "row_reads": st["row_reads"], "retried": retried, "planned_shard_bytes": own,
            "num_shards": len(ds.manifest["shards"])}


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process and its live children (nginx's worker) have used
    so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        kids = []
    return total + sum(proc_cpu_s(k) for k in kids)


class Nginx:
    """nginx serving ``root`` as ``/<bucket>/<prefix>/...`` on 127.0.0.1: the GETs, HEADs and
    ranged GETs of the S3 REST API that the loader sends (path-style, signature ignored),
    answered by sendfile with little CPU. moto_server (Python) spends about a core on a cold
    epoch, and the 2 cores are the loaders' own; this server shows the client side alone."""

    def __init__(self, root: str, bucket: str, prefix: str, work: str):
        import shutil as sh

        from _remote_servers import _wait_http, free_port

        exe = sh.which("nginx")
        if exe is None:
            raise RuntimeError("nginx not found (Debian: apt-get install nginx-light)")
        self.dir = tempfile.mkdtemp(prefix="nginx-", dir=work)
        os.makedirs(os.path.join(self.dir, "root", bucket))
        os.symlink(os.path.abspath(root), os.path.join(self.dir, "root", bucket, prefix))
        self.port = free_port()
        d = self.dir
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""{'user root;' if os.geteuid() == 0 else ''}
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  sendfile on;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  types {{ application/octet-stream arrow; application/json json; }}
  server {{ listen 127.0.0.1:{self.port}; root {d}/root; }}
}}
""")
        self.proc = subprocess.Popen([exe, "-c", conf, "-p", d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        _wait_http(self.endpoint + "/", self.proc, "nginx")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def run_mode(source: str, caches, env, server_pid: int = 0) -> dict:
    load = os.getloadavg()[0]  # the machine is shared: the 1-minute load as the mode starts
    s0 = proc_cpu_s(server_pid) if server_pid else 0.0
    W = len(caches)
    env = dict(env, FASTLOAD_BENCH_BARRIER="1")
    errs = [tempfile.TemporaryFile("w+") for _ in range(W)]
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", source, caches[r], str(r), str(W)], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errs[r], text=True)
             for r in range(W)]
    # every rank opens its dataset (a remote one reads its metadata) and builds its loader, then
    # all start the epoch together: a rank still opening would otherwise share the cores with
    # another's epoch (in a DDP job the first collective lines them up the same way)
    for p, e in zip(procs, errs):
        line = p.stdout.readline()
        if line.strip() != "READY":
            p.wait(60)
            e.seek(0)
            raise RuntimeError(line + e.read()[-3000:])
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.close()
    outs = []
    for p, e in zip(procs, errs):
        o = p.stdout.read()
        p.wait(900)
        if p.returncode:
            e.seek(0)
            raise RuntimeError(e.read()[-3000:])
        outs.append(json.loads(o.strip().splitlines()[-1]))
    images = sum(o["images"] for o in outs)
    wall = max(o["epoch_s"] for o in outs)
    after = sum(o["after_first_images_per_s"] for o in outs)
    shards = outs[0]["num_shards"]
    return {"load_average_1m": load, "server_cpu_s": (proc_cpu_s(server_pid) - s0) if server_pid else 0.0,
            "images_per_s": images / wall, "images_per_cpu_s": images / sum(o["cpu_s"] for o in outs),
            # full-shard GETs (completed downloads) over all ranks, per shard of the dataset
            "gets_per_shard": sum(o["shard_downloads"] for o in outs) / shards,
            "after_first_batch_images_per_s": after, "first_batch_s_max": max(o["first_batch_s"] for o in outs),
            "ranks": outs}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1536)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--policy", choices=("crop", "ra_mix"), default="crop")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--ranks", type=int, default=2, help="loader processes (each its own cache)")
    ap.add_argument("--shared-cache", action="store_true",
                    help="the ranks share one cache folder (ranks of one node), as the README recommends")
    ap.add_argument("--partitions", type=int, default=0,
                    help="BlockShuffleSampler partitions (default: one per rank, each rank reads its own shards; "
                         "1: every rank reads every block, so a shared cache must deduplicate the GETs)")
    ap.add_argument("--partner-reads", choices=("auto", "range", "shard"), default="auto",
                    help="ReinforcedDataset(partner_reads=...) of the remote modes (ra_mix only)")
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
    os.environ["FASTLOAD_BENCH_PARTNER_READS"] = a.partner_reads  # the workers inherit it
    os.environ["FASTLOAD_BENCH_PARTITIONS"] = str(a.partitions)
    parts = a.partitions or a.ranks
    t_build = time.time()
    local = build(a.images, a.work, a.policy)
    t_build = time.time() - t_build
    moto = Moto()
    try:
        url = moto.upload(local, "bench", "imagenet-like")
        env = dict(os.environ, **moto.env)
        ngx = Nginx(local, "bench", "imagenet-like", a.work) if shutil.which("nginx") else None
        env_ngx = dict(env, AWS_ENDPOINT_URL=ngx.endpoint) if ngx else None
        warm_up = tempfile.mkdtemp(dir=a.work)
        run_mode(local, [warm_up] * a.ranks, env)  # page cache and imports warm for every mode alike
        rounds = []
        for k in range(a.rounds):
            caches = ([tempfile.mkdtemp(prefix=f"flc{k}-", dir=a.work)] * a.ranks if a.shared_cache else
                      [tempfile.mkdtemp(prefix=f"flc{k}r{r}-", dir=a.work) for r in range(a.ranks)])
            pid = moto.proc.pid  # moto_server's CPU: it shares the 2 cores with the loaders
            row = {"local": run_mode(local, caches, env, pid),
                   "s3_cold": run_mode(url, caches, env, pid),
                   "s3_warm": run_mode(url, caches, env, pid)}
            if ngx is not None:  # the same URL and client, the S3 GETs answered by nginx
                caches2 = ([tempfile.mkdtemp(prefix=f"flc{k}n-", dir=a.work)] * a.ranks if a.shared_cache else
                           [tempfile.mkdtemp(prefix=f"flc{k}n{r}-", dir=a.work) for r in range(a.ranks)])
                row["s3nginx_cold"] = run_mode(url, caches2, env_ngx, ngx.proc.pid)
                row["s3nginx_warm"] = run_mode(url, caches2, env_ngx, ngx.proc.pid)
                for c in set(caches2):
                    shutil.rmtree(c, ignore_errors=True)
                for m in ("cold", "warm"):
                    row[f"nginx_{m}_vs_local"] = row[f"s3nginx_{m}"]["images_per_s"] / row["local"]["images_per_s"]
            for c in set(caches):
                shutil.rmtree(c, ignore_errors=True)
            row["warm_vs_local"] = row["s3_warm"]["images_per_s"] / row["local"]["images_per_s"]
            row["cold_vs_local"] = row["s3_cold"]["images_per_s"] / row["local"]["images_per_s"]
            for m in ("warm", "cold"):  # per CPU-second of the loader processes: robust to outside load
                row[f"{m}_vs_local_cpu"] = row[f"s3_{m}"]["images_per_cpu_s"] / row["local"]["images_per_cpu_s"]
                # the epoch without its first batch (a cold cache's fixed start, waiting for the
                # first block's shards, weighs more the shorter the epoch)
                row[f"{m}_vs_local_after_first_batch"] = (row[f"s3_{m}"]["after_first_batch_images_per_s"]
                                                         / row["local"]["after_first_batch_images_per_s"])
            rounds.append(row)
            print(f"round {k}: local {row['local']['images_per_s']:.0f} img/s, cold {row['s3_cold']['images_per_s']:.0f} "
                  f"({row['cold_vs_local']:.2f}x), warm {row['s3_warm']['images_per_s']:.0f} ({row['warm_vs_local']:.2f}x)"
                  + (f"; nginx cold {row['nginx_cold_vs_local']:.2f}x, warm {row['nginx_warm_vs_local']:.2f}x"
                     if ngx is not None else ""), flush=True)
        ds_bytes = rounds[0]["local"]["ranks"][0]["dataset_bytes"]
        cold = [r["s3_cold"]["ranks"] for r in rounds]
        per_rank = [x["bytes_downloaded"] + x["meta_bytes"] + x["row_bytes"] for rr in cold for x in rr]
        # a node's ranks sharing one cache: what the node fetched, per rank
        per_node_rank = [sum(x["bytes_downloaded"] + x["meta_bytes"] + x["row_bytes"] for x in rr) / a.ranks
                         for rr in cold]
        targets = {"warm_vs_local": 0.98, "cold_vs_local": 0.85, "bytes_per_rank_vs_share": 1.05,
                   "gets_per_shard_per_epoch": 1.0}

        def verdict(vals, target):
            """met: the median and every round clear the target; at the line (median at or
            above it, some round below): not met; below: not met."""
            med = statistics.median(vals)
            return "met" if min(vals) > target else ("at the line: not met" if med >= target else "not met")

        cold_r, warm_r = [r["cold_vs_local"] for r in rounds], [r["warm_vs_local"] for r in rounds]
        gets = [r["s3_cold"]["gets_per_shard"] for r in rounds]
        summary = {
            "warm_vs_local_median": statistics.median(r["warm_vs_local"] for r in rounds),
            "cold_vs_local_median": statistics.median(r["cold_vs_local"] for r in rounds),
            "warm_vs_local_cpu_median": statistics.median(r["warm_vs_local_cpu"] for r in rounds),
            "cold_vs_local_cpu_median": statistics.median(r["cold_vs_local_cpu"] for r in rounds),
            "cold_vs_local_after_first_batch_median": statistics.median(
                r["cold_vs_local_after_first_batch"] for r in rounds),
            "cold_first_batch_s_median": statistics.median(r["s3_cold"]["first_batch_s_max"] for r in rounds),
            "local_first_batch_s_median": statistics.median(r["local"]["first_batch_s_max"] for r in rounds),
            "nginx_cold_vs_local_median": statistics.median(r["nginx_cold_vs_local"] for r in rounds) if ngx else None,
            "nginx_warm_vs_local_median": statistics.median(r["nginx_warm_vs_local"] for r in rounds) if ngx else None,
            "nginx_cold_vs_local_range": [min(r["nginx_cold_vs_local"] for r in rounds),
                                          max(r["nginx_cold_vs_local"] for r in rounds)] if ngx else None,
            "server_cpu_s_cold_median": {"moto_server": statistics.median(r["s3_cold"]["server_cpu_s"] for r in rounds),
                                         "nginx": statistics.median(r["s3nginx_cold"]["server_cpu_s"] for r in rounds)
                                         if ngx else None},
            "cold_vs_local_range": [min(r["cold_vs_local"] for r in rounds), max(r["cold_vs_local"] for r in rounds)],
            "warm_vs_local_range": [min(r["warm_vs_local"] for r in rounds), max(r["warm_vs_local"] for r in rounds)],
            "note": "wall-clock ratios (images/s, both ranks) are the targets' figure; per-CPU-second ratios "
                    "exclude the outside load but also moto_server's CPU and the time spent waiting on it",
            "targets": targets,
            "verdict": {"cold_vs_local": verdict(cold_r, targets["cold_vs_local"]),
                        "warm_vs_local": verdict(warm_r, targets["warm_vs_local"])},
            "load_average_1m_range": [min(r[m]["load_average_1m"] for r in rounds for m in ("local", "s3_cold", "s3_warm")),
                                      max(r[m]["load_average_1m"] for r in rounds for m in ("local", "s3_cold", "s3_warm"))],
            "cold_vs_local_cpu_range": [min(r["cold_vs_local_cpu"] for r in rounds),
                                        max(r["cold_vs_local_cpu"] for r in rounds)],
            "warm_vs_local_cpu_range": [min(r["warm_vs_local_cpu"] for r in rounds),
                                        max(r["warm_vs_local_cpu"] for r in rounds)],
            "cold_gets_per_shard_per_epoch": {"median": statistics.median(gets), "range": [min(gets), max(gets)]},
            "cold_retried_requests": sum(x["retried"] for rr in cold for x in rr),
            "dataset_bytes": ds_bytes, "rank_share_bytes": ds_bytes / a.ranks,
            "cold_bytes_per_rank_per_epoch_max": max(per_rank),
            "cold_bytes_per_rank_vs_share_max": max(per_rank) / (ds_bytes / a.ranks),
            "cold_bytes_per_rank_vs_share_range": [min(per_rank) / (ds_bytes / a.ranks),
                                                   max(per_rank) / (ds_bytes / a.ranks)],
            "cold_node_bytes_per_rank_vs_share_max": max(per_node_rank) / (ds_bytes / a.ranks),
            # downloaded (shards, metadata, rows) over the bytes of the shards its own plan read
            "cold_bytes_per_rank_vs_planned_shards_max": max(
                (x["bytes_downloaded"] + x["meta_bytes"] + x["row_bytes"]) / x["planned_shard_bytes"]
                for rr in cold for x in rr if x["planned_shard_bytes"]) if not a.shared_cache else None,
            "warm_bytes_downloaded": sum(x["bytes_downloaded"] for r in rounds for x in r["s3_warm"]["ranks"]),
        }
        print(json.dumps(summary, indent=1))
        name = "remote" + ("" if a.policy == "crop" else f"_{a.policy}") + ("" if a.images == 1536 else f"_{a.images}") \
            + ("" if a.partner_reads == "auto" else f"_{a.partner_reads}") + ("" if a.ranks == 2 else f"_{a.ranks}rank") \
            + ("_shared" if a.shared_cache else "") + ("" if parts == a.ranks else f"_{parts}part")
        path = write_result(name, {
            "setup": {"images": a.images, "rows_per_shard": SHARD, "shards": -(-a.images // SHARD),
                      "global_batch": G, "ranks": a.ranks, "image_size": IMAGE, "policy": {"crop": "crop (RRC+flip)", "ra_mix": "RRC+flip+RandAugment(2,9)+MixUp/CutMix "
                                 "(p=0.5 each; a partner is any row, read by ranged GET)"}[a.policy] + ", 4 stored augs",
                      "order": f"BlockShuffleSampler(block_shards={BLOCK}, partitions={parts})",
                      "server": "moto_server on 127.0.0.1 (S3 REST over HTTP), same machine; the s3nginx_* modes: the same "
                                "s3:// URL and client, its GETs answered by nginx (static files, path-style; see Nginx)",
                      "caches": ("one folder shared by the ranks (one node)" if a.shared_cache else
                                 "one per rank (separate folders)") + ", predownload=4 shards, cache_limit=None",
                      "partner_reads": a.partner_reads},
            "note": "2 shared cores, and moto_server itself (Python) runs on them: noisy; ratios are within "
                    "one round (modes run back to back); bytes per rank count shards, metadata and partner rows",
            "build_seconds": t_build, "load_average": os.getloadavg(), "rounds": rounds, "summary": summary,
            "mosaicml_streaming": "see benchmarks/remote_peers.py (it needs its own venv)"}, a.out_dir)
        print(path)
    finally:
        moto.stop()
        if "ngx" in locals() and ngx is not None:
            ngx.stop()


if __name__ == "__main__":
    main()
