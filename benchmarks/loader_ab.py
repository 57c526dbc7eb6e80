"""Images/s of the ReinforcedLoader of this checkout against another checkout's (e.g. the
release before a rewrite), side by side in one run: the same reinforced dataset (the
embedded demo photos), the same settings (RandomResizedCrop + flip replay, batch 64,
num_workers = cores, shuffle), each epoch run in a fresh subprocess, the two checkouts
alternating (A B B A ...). Reports images/s and CPU-seconds per image for each, their
ratios (per round and median), and the new loader's per-stage timings (loader.stats()).
Writes benchmarks/results/loader_ab_<policy>.json.

    python benchmarks/loader_ab.py --other PATH_TO_OTHER_CHECKOUT [--rounds 5] [--images 1536] [--name NAME]

The other checkout must have its native libraries built (python setup.py build_ext --inplace).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import json, os, resource, sys, time
import fastload
path, epochs, workers, stats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
ds = fastload.ReinforcedDataset(path)
loader = fastload.ReinforcedLoader(ds, batch_size=64, shuffle=True, num_workers=workers, drop_last=True,
                                   seed=0, p_reinforced=1.0)
out = []
load0 = os.getloadavg()[0]
for e in range(epochs):
    loader.set_epoch(e)
    r0, t0, n = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), 0
    for images, labels, targets in loader:
        n += images.shape[0]
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    out.append({"epoch": e, "images": n, "wall_s": wall, "cpu_s": cpu})
# the 1-minute load average around the run: other processes on the machine skew images/s
# (CPU-seconds per image less so)
res = {"epochs": out, "fastload": fastload.__file__, "loadavg_before": load0, "loadavg_after": os.getloadavg()[0]}
if stats and hasattr(loader, "stats"):
    res["stats"] = str(loader.stats())
print("RESULT " + json.dumps(res))
"""


def _run(checkout: str, path: str, epochs: int, workers: int, stats: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=checkout)
    env.pop("FASTLOAD_NATIVE_DIR", None)
    r = subprocess.run([sys.executable, "-c", _CHILD, path, str(epochs), str(workers), "1" if stats else "0"],
                       env=env, capture_output=True, text=True, timeout=1800, cwd=tempfile.gettempdir())
    if r.returncode != 0:
        raise RuntimeError(f"run in {checkout} failed:\n{r.stderr[-3000:]}")
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    if not res["fastload"].startswith(os.path.realpath(checkout)) and not res["fastload"].startswith(checkout):
        raise RuntimeError(f"{checkout}: imported fastload from {res['fastload']}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--other", required=True, help="the checkout to compare with (native libraries built)")
    ap.add_argument("--rounds", type=int, default=5, help="pairs of runs")
    ap.add_argument("--images", type=int, default=1536, help="images in the demo dataset")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run (the first pays shard verification)")
    ap.add_argument("--policy", default="crop", choices=["crop", "ra_mix"],
                    help="the demo dataset's stored policy: crop + flip, or RandAugment + MixUp/CutMix")
    ap.add_argument("--no-restart-markers", action="store_true",
                    help="the dataset stores its JPEGs byte for byte (as datasets written before restart markers)")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "benchmarks", "results"))
    ap.add_argument("--name", default=None, help="result file name (default loader_ab_<policy>)")
    a = ap.parse_args(argv)
    sys.path.insert(0, HERE)
    from fastload import datasets
    from fastload._results import write_result  # machine, versions, command, commit, date

    workers = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        images = datasets.build_images(os.path.join(tmp, "jpeg"), n=a.images, progress=False)
        path = datasets.build_reinforced(images, os.path.join(tmp, "reinforced"), kind=a.policy, progress=False,
                                          restart_markers=not a.no_restart_markers)
        rounds = []
        for k in range(a.rounds):
            order = [("new", HERE), ("old", a.other)] if k % 2 == 0 else [("old", a.other), ("new", HERE)]
            got = {}
            for name, ck in order:
                got[name] = _run(ck, path, a.epochs, workers, stats=(name == "new"))
            rounds.append(got)
            def rate(r, e):
                x = r["epochs"][e]
                return x["images"] / x["wall_s"]
            print(f"round {k}: later-epoch images/s new {rate(got['new'], -1):.0f} old {rate(got['old'], -1):.0f}"
                  f" (load {max(g['loadavg_after'] for g in got.values()):.1f})", flush=True)

    def per(name, e, key):
        return [r[name]["epochs"][e]["images"] / r[name]["epochs"][e][key] for r in rounds]

    summary = {}
    for e, label in ((0, "first_epoch"), (a.epochs - 1, "later_epoch")):
        new_ips, old_ips = per("new", e, "wall_s"), per("old", e, "wall_s")
        new_pc, old_pc = per("new", e, "cpu_s"), per("old", e, "cpu_s")
        ratios = [n / o for n, o in zip(new_ips, old_ips)]
        cpu_ratios = [n / o for n, o in zip(new_pc, old_pc)]
        summary[label] = {
            "new_images_per_s_median": statistics.median(new_ips), "old_images_per_s_median": statistics.median(old_ips),
            "ratio_per_round": ratios, "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios),
            "per_cpu_second_ratio_per_round": cpu_ratios, "per_cpu_second_ratio_median": statistics.median(cpu_ratios),
        }
    result = {"what": "ReinforcedLoader images/s, this checkout (new) vs another (old), alternating subprocess runs",
              "settings": {"images": a.images, "policy": a.policy, "batch_size": 64, "num_workers": workers, "epochs_per_run": a.epochs,
                           "rounds": a.rounds, "replay": "demo dataset policy, p_reinforced=1",
                           "sources": "JPEGs byte for byte (no restart markers)" if a.no_restart_markers else
                           "JPEGs with restart markers (reinforce's default since 8b561b7)"},
              "other_checkout_commit": subprocess.run(["git", "-C", a.other, "rev-parse", "HEAD"], capture_output=True,
                                                      text=True).stdout.strip(),
              "summary": summary,
              "max_loadavg": max(max(r[c]["loadavg_before"], r[c]["loadavg_after"]) for r in rounds for c in r),
              "new_stats_last_round": rounds[-1]["new"].get("stats"), "rounds": rounds}
    print("wrote", write_result(a.name or f"loader_ab_{a.policy}", result, out_dir=a.out_dir))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
