"""Timeline of one cold epoch from moto_server: when each shard's GET starts and ends, when the
reader first needs the shard and how long it waits for it, and the CPU of each download phase
(receive, write, sha256, fsync, rename) and of opening the dataset (metadata reads).

Same data, ranks, sampler and loader settings as benchmarks/remote.py (its ``build`` and
``worker``); the ranks start their epoch together. The hooks are
``fastload.remote.cache.TRACE`` and wrappers of ``ShardCache.meta_batch`` / ``Prefetcher.at_step``
set in the worker processes only.

    python benchmarks/remote_timeline.py [--images 1536] [--rounds 3] [--tag before]
        # -> benchmarks/results/remote_timeline[_<images>][_<tag>].json
    python benchmarks/remote_timeline.py --fsync-ab --rounds 4
        # each round twice, alternating: shards fsync'd before their rename (as before) and
        # marked with the boot id instead (now) -> remote_timeline_fsync_ab.json
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, HERE)


def traced_worker(source: str, cache: str, rank: int, world: int) -> dict:
    import remote as bench

    from fastload.remote import cache as rc
    from fastload.remote import prefetch

    events = []
    lock = threading.Lock()
    origin = [time.perf_counter()]

    def trace(event, key, rec):
        with lock:
            events.append(dict(rec, event=event, key=key))

    rc.TRACE = trace
    if os.environ.get("FASTLOAD_TIMELINE_FSYNC"):  # the download path as before: fsync, no boot mark
        from fastload.remote import cachedir

        rc.mark_written = lambda fd: False
        cachedir.mark_written = rc.mark_written
    meta_batch, at_step = rc.ShardCache.meta_batch, prefetch.Prefetcher.at_step

    def traced_meta(self, pos, *a, **k):
        t0, c0 = time.perf_counter(), time.thread_time()
        out = meta_batch(self, pos, *a, **k)
        trace("meta", self.shards[pos]["file"], {"t0": t0, "t1": time.perf_counter(), "cpu": time.thread_time() - c0})
        return out

    def traced_step(self, step):
        trace("step", str(step), {"t0": time.perf_counter()})
        if step == 0:  # the epoch's iteration started (the plan was handed over just before)
            origin[0] = min(origin[0], time.perf_counter())
        return at_step(self, step)

    rc.ShardCache.meta_batch, prefetch.Prefetcher.at_step = traced_meta, traced_step
    plan = prefetch.Prefetcher.plan

    def traced_plan(self, *a, **k):
        trace("plan", "", {"t0": time.perf_counter()})
        return plan(self, *a, **k)

    prefetch.Prefetcher.plan = traced_plan
    t_start = time.perf_counter()
    out = bench.worker(source, cache, rank, world)
    out["events"] = events
    out["t_worker_start"] = t_start
    return out


def summarize(ranks):
    """Per rank: the reader's waits, the GET spans, the CPU per shard by phase."""
    rows = []
    for r in ranks:
        ev = r["events"]
        plan_t = min(e["t0"] for e in ev if e["event"] == "plan")
        dl = {e["key"]: e for e in ev if e["event"] == "download"}
        need = [e for e in ev if e["event"] == "need"]
        first_need = {}
        for e in sorted(need, key=lambda e: e["t0"]):
            first_need.setdefault(e["key"], e)
        shards = []
        for key, n in sorted(first_need.items(), key=lambda kv: kv[1]["t0"]):
            d = dl.get(key)
            shards.append({"key": key, "need_at": n["t0"] - plan_t, "wait_s": n["t1"] - n["t0"], "how": n["how"],
                           "get_start": d["t0"] - plan_t if d else None,
                           "first_byte": d["t_first_byte"] - plan_t if d and "t_first_byte" in d else None,
                           "get_end": d["t1"] - plan_t if d else None, "by": d["thread"] if d else None})
        cpu = {"receive": [], "write": [], "hash": [], "fsync": [], "rename_lock": []}
        wall = {"get": [], "fsync": []}
        for d in dl.values():
            recv_total = d["c_received"] - d["c0"]
            cpu["receive"].append(recv_total - d["write_cpu"] - d["hash_cpu"])
            cpu["write"].append(d["write_cpu"])
            cpu["hash"].append(d["hash_cpu"])
            cpu["fsync"].append(d["c_fsynced"] - d["c_received"])
            cpu["rename_lock"].append(d["c1"] - d["c_fsynced"])
            wall["get"].append(d["t_received"] - d["t0"])
            wall["fsync"].append(d["t_fsynced"] - d["t_received"])
        meta = [e for e in ev if e["event"] == "meta"]
        rows.append({
            "open_s": r["open_s"], "epoch_s": r["epoch_s"], "first_batch_s": r["first_batch_s"], "cpu_s": r["cpu_s"],
            "reader_wait_s": sum(s["wait_s"] for s in shards),
            "reader_waits_over_5ms": sum(s["wait_s"] > 0.005 for s in shards),
            "shards_fetched_by_reader": sum(s["how"] == "fetched" for s in shards),
            "downloads": len(dl), "shard_bytes_median": statistics.median(d["bytes"] for d in dl.values()) if dl else 0,
            "cpu_ms_per_shard_median": {k: 1e3 * statistics.median(v) for k, v in cpu.items() if v},
            "wall_ms_per_shard_median": {k: 1e3 * statistics.median(v) for k, v in wall.items() if v},
            "meta_reads": len(meta), "meta_cpu_s": sum(e["cpu"] for e in meta),
            "shards": shards})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1536)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--tag", default="")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "fastload_remote_bench"))
    ap.add_argument("--worker", nargs=4)
    ap.add_argument("--fsync-ab", action="store_true")
    a = ap.parse_args()
    if a.worker:
        src, cache, r, w = a.worker
        print(json.dumps(traced_worker(src, cache, int(r), int(w))))
        return
    import shutil

    import remote as bench
    from _remote_servers import Moto
    from fastload.bench._common import write_result

    local = bench.build(a.images, a.work)
    moto = Moto()
    try:
        url = moto.upload(local, "bench", "imagenet-like")
        env = dict(os.environ, **moto.env, FASTLOAD_BENCH_BARRIER="1")
        rounds = []
        variants = [("fsync", dict(env, FASTLOAD_TIMELINE_FSYNC="1")), ("boot_mark", env)] if a.fsync_ab \
            else [("", env)]
        for k, (variant, venv) in ((k, v) for k in range(a.rounds)
                                   for v in (variants if k % 2 == 0 else variants[::-1])):
            caches = [tempfile.mkdtemp(prefix=f"tl{k}r{r}-", dir=a.work) for r in range(a.ranks)]
            load = os.getloadavg()[0]
            procs = [subprocess.Popen([sys.executable, __file__, "--worker", url, caches[r], str(r), str(a.ranks)],
                                      env=venv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                     for r in range(a.ranks)]
            for p in procs:
                assert p.stdout.readline().strip() == "READY"
            for p in procs:
                p.stdin.write("go\n")
                p.stdin.close()
            outs = [json.loads(p.stdout.read().strip().splitlines()[-1]) for p in procs]
            for p in procs:
                p.wait(600)
            for c in caches:
                shutil.rmtree(c, ignore_errors=True)
            s = summarize(outs)
            rounds.append({"load_average_1m": load, "variant": variant, "ranks": s})
            print(f"round {k} {variant} (load {load:.1f}): " + "; ".join(
                f"rank: open {x['open_s']:.2f}s epoch {x['epoch_s']:.2f}s first batch {x['first_batch_s']:.3f}s "
                f"reader waits {x['reader_wait_s']:.3f}s ({x['reader_waits_over_5ms']} over 5 ms, "
                f"{x['shards_fetched_by_reader']} fetched by the reader) cpu/shard ms {x['cpu_ms_per_shard_median']} "
                f"wall/shard ms {x['wall_ms_per_shard_median']}" for x in s), flush=True)
        name = "remote_timeline" + ("" if a.images == 1536 else f"_{a.images}") + (f"_{a.tag}" if a.tag else "") \
            + ("_fsync_ab" if a.fsync_ab else "")
        if a.fsync_ab:
            def med(v, f):
                return statistics.median(f(x) for r in rounds if r["variant"] == v for x in r["ranks"])

            summary = {v: {"get_wall_ms": med(v, lambda x: x["wall_ms_per_shard_median"]["get"]),
                           "fsync_wall_ms": med(v, lambda x: x["wall_ms_per_shard_median"]["fsync"]),
                           "download_cpu_ms": med(v, lambda x: sum(x["cpu_ms_per_shard_median"].values())),
                           "write_cpu_ms": med(v, lambda x: x["cpu_ms_per_shard_median"]["write"]),
                           "reader_wait_s": med(v, lambda x: x["reader_wait_s"]),
                           "first_batch_s": med(v, lambda x: x["first_batch_s"]),
                           "epoch_s": med(v, lambda x: x["epoch_s"]), "cpu_s": med(v, lambda x: x["cpu_s"])}
                       for v, _ in variants}
            print(json.dumps(summary, indent=1))
        else:
            summary = None
        print(write_result(name, {"setup": {"images": a.images, "ranks": a.ranks, "rounds": a.rounds,
                                            "as": "benchmarks/remote.py s3_cold (moto_server), traced"},
                                  "note": "times in s from the moment the rank handed its plan to the cache; "
                                          "wait_s: the reader's fetch_leased (0: cached already)",
                                  "summary_medians_over_ranks_and_rounds": summary,
                                  "rounds": rounds}, os.path.join(HERE, "results")))
    finally:
        moto.stop()


if __name__ == "__main__":
    main()
