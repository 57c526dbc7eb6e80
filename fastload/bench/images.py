"""``fastload bench``: the image-loader benchmark.

With no arguments it builds the embedded default dataset (2000 JPEGs of about 500x375,
quality 90, made from the photos inside scikit-image; see fastload/bench/data.py) and its
reinforced versions, then measures in one run, on the same files and the same cores,
RandomResizedCrop 224 + flip + normalize, batch 64:

1. the torchvision DataLoader (num_workers = cores), or its PIL + torch stand-in, labelled
   as such, where torchvision does not import; FFCV and DALI (CPU) when importable;
   fastload.ReinforcedLoader; the decode-only limit (libjpeg-turbo on all cores at the DCT
   scale the loader would use, and at full scale);
2. + RandAugment(2, 9) + MixUp/CutMix: ReinforcedLoader vs torchvision v2 (or stand-in);
3. memory: ReinforcedLoader's peak RSS on a dataset 10x larger, and RSS over 10 epochs.

Every pipeline runs in its own subprocess (fastload/bench/peers.py), so its RSS and CPU
time are its own; warm-up batches are excluded. Results: images.json and images.png under
``--out-dir`` (default ``$XDG_CACHE_HOME/fastload/results``; the data cache is
``$XDG_CACHE_HOME/fastload/bench``); ``python benchmarks/images.py`` updates the checkout's
committed results. The peers (torchvision, DALI, FFCV) need their own torch build:
``--peers auto`` builds that environment once (fastload/bench/peers_env.py), or
``--python-peers PATH`` names one. The run ends by naming what it measured and what it could
not, and why.

Example::

    fastload bench --quick            # a tiny run (seconds)
    fastload bench                    # the default run (a few minutes on 2 cores)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import threading

from fastload._progress import Progress
from fastload.bench import data as bench_data
from fastload.bench import peers as peers_mod
from fastload.bench._common import write_result

PEERS_PY = os.path.abspath(peers_mod.__file__)
# the modules a pipeline needs, to pick a Python where it imports
NEEDS = {"torchvision": "torchvision", "torchvision_v2_ra": "torchvision.transforms.v2",
         "ffcv": "ffcv", "dali_cpu": "nvidia.dali", "spdl": "spdl.pipeline", "spdl_ra_mix": "spdl.pipeline"}


def _parser():
    from fastload.cli import BENCH_MODE_HELP

    modes = "\n".join(f"  fastload bench {flag:<12} {what}" for flag, (_, what) in BENCH_MODE_HELP.items())
    ap = argparse.ArgumentParser(
        prog="fastload bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill("The image-loader benchmark: builds the embedded dataset (photos shipped with "
                     "scikit-image, no download) and measures, on the same files and cores, the "
                     "torchvision DataLoader (or its PIL + torch stand-in, named as such), FFCV, "
                     "DALI and SPDL when they import, fastload.ReinforcedLoader and the JPEG decode "
                     "limits (full decode, and the floor of the stored crops).", 79),
        epilog="other benchmarks (one mode flag, then that mode's options; fastload bench MODE --help):\n"
               + modes + "\n\nexamples:\n  fastload bench --quick\n  fastload bench --peers auto\n"
               "  fastload bench --variable --quick")
    ap.add_argument("--data-dir", default=None,
                    help="dataset cache (default $XDG_CACHE_HOME/fastload/bench, ~/.cache/... when unset)")
    ap.add_argument("--num-images", type=int, default=None, help="images in the dataset (default 2000)")
    ap.add_argument("--augmentations", type=int, default=None, help="stored augmentations per image (default 4)")
    ap.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    ap.add_argument("--image-size", type=int, default=224, help="output side in pixels (default 224)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="DataLoader workers / decode threads (default: cores)")
    ap.add_argument("--seconds", type=float, default=None, help="time budget per pipeline after warm-up")
    ap.add_argument("--max-batches", type=int, default=None, help="batch budget per pipeline after warm-up")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up batches (excluded)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the dataset and the augmentations (default 0)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds; each pipeline keeps its best")
    ap.add_argument("--quick", action="store_true", help="a tiny run: 192 images, ~2 s per pipeline")
    ap.add_argument("--python-peers", action="append", default=[], metavar="PATH",
                    help="another Python executable where peers (torchvision, FFCV, DALI) import; repeatable")
    ap.add_argument("--pipelines", default=None,
                    help="comma-separated subset of: " + ",".join(sorted(peers_mod.PIPELINES)))
    ap.add_argument("--no-rss", action="store_true", help="skip the memory table")
    ap.add_argument("--rss-epochs", type=int, default=10, help="epochs of the RSS-over-time check (default 10)")
    ap.add_argument("--no-chart", action="store_true", help="do not draw images.png")
    ap.add_argument("--out-dir", default=None,
                    help="results folder (default $XDG_CACHE_HOME/fastload/results; never the current folder)")
    ap.add_argument("--peers", choices=("none", "auto"), default="none",
                    help="auto: build (once) and use an isolated environment with torchvision, DALI, "
                         "FFCV and SPDL (several GB under $XDG_CACHE_HOME/fastload/peers-venv)")
    ap.add_argument("--install-system-packages", action="store_true",
                    help="with --peers auto, as root: apt-get the system packages FFCV (libturbojpeg, "
                         "OpenCV, pkg-config) and SPDL (FFmpeg) need when missing; without it (or not "
                         "root) they are named and those peers reported as not measured")
    ap.add_argument("--name", default="images", help="result file name (default images)")
    return ap


def _settings(args):
    quick = args.quick
    def given(v, default):  # an explicit 0 is an error below, not "use the default"
        return default if v is None else v

    s = {"num_images": given(args.num_images, 192 if quick else 2000),
         "augmentations": given(args.augmentations, 2 if quick else 4),
         "seconds": args.seconds if args.seconds is not None else (2.0 if quick else 12.0),
         "max_batches": given(args.max_batches, 6 if quick else 300),
         "warmup": args.warmup if args.warmup is not None else (1 if quick else 5),
         "rss_epochs": 3 if quick and args.rss_epochs == 10 else args.rss_epochs}
    for k in ("num_images", "augmentations", "max_batches", "rss_epochs"):
        if s[k] <= 0:
            raise ValueError(f"--{k.replace('_', '-')} must be positive, got {s[k]}")
    for k, v in (("rounds", args.rounds), ("batch_size", args.batch_size), ("image_size", args.image_size), ("workers", args.workers)):
        if v <= 0:
            raise ValueError(f"--{k.replace('_', '-')} must be positive, got {v}")
    if s["num_images"] < args.batch_size:
        raise ValueError(f"--num-images ({s['num_images']}) must be at least --batch-size ({args.batch_size})")
    return s


_IMPORTABLE: dict = {}


def _importable(python: str) -> set:
    """Which peer modules import in ``python`` (one subprocess per Python, cached)."""
    if python not in _IMPORTABLE:
        code = ("import importlib\nfor m in %r:\n    try:\n        importlib.import_module(m)\n"
                "        print(m)\n    except Exception:\n        pass\n") % (sorted(set(NEEDS.values())),)
        try:
            r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
            _IMPORTABLE[python] = set(r.stdout.split())
        except (OSError, subprocess.SubprocessError):
            _IMPORTABLE[python] = set()
    return _IMPORTABLE[python]


def find_python(pipeline: str, pythons: list[str]):
    """The first Python in ``pythons`` where the pipeline's peer imports (None: nowhere)."""
    mod = NEEDS.get(pipeline)
    if mod is None:
        return pythons[0]
    for py in pythons:
        if mod in _importable(py):
            return py
    return None


def run_pipeline(python: str, cfg: dict, timeout: float = 900) -> dict:
    """Run one pipeline in a subprocess; sample its process tree's RSS meanwhile."""
    proc = subprocess.Popen([python, PEERS_PY, "--config", json.dumps(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = {"rss": 0.0, "anon": 0.0, "file": 0.0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            m = peers_mod.tree_memory_mib(proc.pid)
            for k in peak:
                peak[k] = max(peak[k], m[k])
            done.wait(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err += f"\n(timed out after {timeout} s)"
    done.set()
    th.join()
    for line in out.splitlines():
        if line.startswith("FASTLOAD_RESULT "):
            res = json.loads(line[len("FASTLOAD_RESULT "):])
            res["peak_rss_mib"], res["peak_rss_anon_mib"] = peak["rss"], peak["anon"]
            res["python"] = python
            return res
    tail = "\n".join((err or "").strip().splitlines()[-6:])
    return {"pipeline": cfg["pipeline"], "error": tail or f"exit code {proc.returncode}", "python": python}


def _fmt_table(rows, cols):
    head = "| " + " | ".join(c for c, _ in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(f(r) for _, f in cols) + " |" for r in rows]
    return "\n".join([head, sep] + body)


def _num(v, fmt="{:,.0f}"):
    return "-" if v is None else fmt.format(v)


def _speed_rows(results, names, base):
    rows = []
    b = results.get(base, {}).get("images_per_s")
    for n in names:
        r = results.get(n)
        if r is None:
            continue
        ips = r.get("images_per_s")
        rows.append({"pipeline": n, "label": r.get("label", peers_mod.LABELS.get(n, n)), "images_per_s": ips,
                     "cpu_ms_per_image": None if ips is None else 1000 * r["cpu_s_per_image"],
                     "peak_rss_mib": r.get("peak_rss_mib"), "vs_baseline": (ips / b) if ips and b else None,
                     "error": r.get("error")})
    return rows


def _print_speed(title, rows, base):
    if not rows:
        return
    print(f"\n## {title} (vs baseline: against {SHORT.get(base, base)})")
    print(_fmt_table(rows, [
        ("pipeline", lambda r: r["label"] + (f" [FAILED: {r['error'].splitlines()[-1][:120]}]" if r["error"] else "")),
        ("images/s", lambda r: _num(r["images_per_s"])),
        ("CPU ms/image", lambda r: _num(r["cpu_ms_per_image"], "{:.2f}")),
        ("peak RSS MiB", lambda r: _num(r["peak_rss_mib"])),
        ("vs baseline", lambda r: _num(r["vs_baseline"], "{:.2f}x"))]))


def _print_stages(results):
    """ReinforcedLoader.stats() of the timed batches: time per batch in each stage (with
    prefetching the stages overlap, so the slowest one bounds the throughput)."""
    for name in ("fastload", "fastload_ra_mix"):
        st = results.get(name, {}).get("stages")
        if not st:
            continue
        print(f"\n## loader.stats() of {name}: ms per batch by stage (stages overlap across threads)")
        print("  " + "  ".join(f"{k} {v['ms_per_batch']:.2f}" for k, v in st.items()))


SHORT = {"torchvision": "torchvision", "torch_pil": "torch+PIL (torchvision stand-in)", "ffcv": "FFCV",
         "dali_cpu": "DALI CPU", "fastload": "fastload", "decode_scaled": "decode only, loader's DCT scale",
         "decode_full": "decode only, full scale", "torchvision_v2_ra": "torchvision v2",
         "torch_ra_mix": "torch ops (torchvision v2 stand-in)", "fastload_ra_mix": "fastload",
         "decode_floor": "decode floor (stored crop only)", "spdl": "SPDL", "spdl_ra_mix": "SPDL"}


def _chart(path, table1, table2):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no chart; pip install 'fastload[bench]')")
        return None
    rows = [("RRC+flip: " + SHORT.get(r["pipeline"], r["pipeline"]), r) for r in table1 if r["images_per_s"]]
    rows += [("RA+mix: " + SHORT.get(r["pipeline"], r["pipeline"]), r) for r in table2 if r["images_per_s"]]
    if not rows:
        return None
    rows = rows[::-1]
    names = [n for n, _ in rows]
    colors = ["tab:orange" if r["pipeline"].startswith("fastload") else
              ("tab:gray" if r["pipeline"].startswith("decode") else "tab:blue") for _, r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.4), sharey=True)
    for ax, key, xlabel, fmt in ((axes[0], "images_per_s", "images/s (higher is better)", "{:,.0f}"),
                                 (axes[1], "cpu_ms_per_image", "CPU ms per image (lower is better)", "{:.2f}")):
        vals = [r[key] or 0 for _, r in rows]
        ax.barh(names, vals, color=colors)
        for y, v in enumerate(vals):
            ax.text(v, y, " " + fmt.format(v), va="center", fontsize=8)
        ax.set_xlabel(xlabel)
        ax.margins(x=0.15)
    fig.suptitle(f"fastload bench: batch 64, 224x224, same JPEGs, {os.cpu_count()} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _label(name: str) -> str:
    return peers_mod.LABELS.get(name, name)


def _coverage_lines(measured: dict, not_measured: dict) -> list:
    lines = ["measured: " + (", ".join(measured) if measured else "nothing")]
    if not_measured:
        lines.append("not measured:")
        lines += [f"  {k}: {why}" for k, why in not_measured.items()]
    return lines


# Reference targets of the project's design, keyed by ratio name; a ratio exists only for a
# pipeline that was measured, so a target never applies to a stand-in.
TARGETS = {"fastload_vs_torchvision": 5.0, "fastload_vs_ffcv": 2.5, "fastload_vs_dali_cpu": 2.5,
           "fastload_vs_spdl": 2.0, "fastload_of_decode_full": 1.2, "fastload_of_decode_limit": 0.75,
           "ra_mix_fastload_vs_torchvision_v2": 5.0, "ra_mix_fastload_vs_spdl_ra_mix": 2.0,
           "rss_10x_growth": 0.10, "rss_10_epochs_growth": 0.05}


def named_ratios(ratio, cpu_ratio, base1: str, base2: str):
    """fastload's throughput and per-CPU-second ratios against what was measured, each named
    after the pipeline it divides by (``fastload_vs_torch_pil`` when the torchvision stand-in
    ran, never ``..._vs_torchvision``). Ratios whose pipelines did not run are left out."""
    pairs = {f"fastload_vs_{base1}": ("fastload", base1), "fastload_vs_ffcv": ("fastload", "ffcv"),
             "fastload_vs_dali_cpu": ("fastload", "dali_cpu"), "fastload_vs_spdl": ("fastload", "spdl"),
             "fastload_of_decode_limit": ("fastload", "decode_scaled"),
             "fastload_of_decode_full": ("fastload", "decode_full"),
             "fastload_of_decode_floor": ("fastload", "decode_floor"),
             f"ra_mix_fastload_vs_{base2}": ("fastload_ra_mix", base2),
             "ra_mix_fastload_vs_spdl_ra_mix": ("fastload_ra_mix", "spdl_ra_mix")}
    ratios, per_cpu = {}, {}
    for name, (a, b) in pairs.items():
        if ratio(a, b) is not None:
            ratios[name] = ratio(a, b)
            per_cpu[name] = cpu_ratio(a, b)
    return ratios, per_cpu


def ratio_lines(ratios: dict, per_cpu: dict, max_load, cores: int) -> list:
    """The ratio block: throughput and per-CPU-second side by side; on a loaded machine (load
    average above the core count) it says which is stable and shows no target; on a quiet one
    the design targets appear as information."""
    loaded = max_load is not None and max_load > cores
    lines = ["", "## fastload against the pipelines measured in this run"]
    names = [k for k in ratios if not k.startswith("rss") and k not in ("baseline", "ra_mix_baseline",
                                                                       "per_cpu_second")]
    if not names:
        return lines + ["  (no ratio: fastload or the pipeline it is compared with did not run)"]
    for k in names:
        v, c = ratios[k], per_cpu.get(k)
        text = f"  {k}: {v:.2f}x images/s" + ("" if c is None else f", {c:.2f}x images per CPU-second")
        if not loaded and k in TARGETS:
            text += f" (design target >= {TARGETS[k]:g}x, information only)"
        lines.append(text)
    if loaded and any(per_cpu.get(k) for k in names):
        lines += [f"load average reached {max_load:.1f} on {cores} cores (other processes): the "
                  "images/s ratios swing with outside load; the per-CPU-second ratios are the stable "
                  "figure of this run. No target is shown for a run on a loaded machine."]
    elif loaded:
        lines += [f"load average reached {max_load:.1f} on {cores} cores (other processes): the "
                  "images/s ratios swing with outside load, and this run was too short to measure CPU "
                  "time per image; rerun longer (or on a quiet machine) for a stable figure. No target "
                  "is shown for a run on a loaded machine."]
    elif max_load is not None:
        lines.append(f"load average stayed at or below {max_load:.1f} on {cores} cores: both ratios are usable.")
    return lines


CACHE_MARKER = "fastload-bench-cache.json"


def check_data_dir(path: str) -> None:
    """``--data-dir`` must be a folder this benchmark owns: new, empty, or one it wrote before
    (its marker file). The benchmark writes several cache folders there, so a folder with other
    content is refused rather than filled."""
    if os.path.isdir(path) and os.listdir(path) and not os.path.exists(os.path.join(path, CACHE_MARKER)):
        raise ValueError(f"--data-dir {path!r} is not empty and is not a fastload bench cache "
                         f"(no {CACHE_MARKER}); name a new or empty folder")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--data-dir {path!r} is a file, not a folder")


def _validate(args) -> dict:
    """Every argument check, before anything is built or installed."""
    s = _settings(args)
    if args.install_system_packages and args.peers != "auto":
        raise ValueError("--install-system-packages installs what the peers' environment needs: "
                         "use it with --peers auto")
    for py in args.python_peers:
        if not (os.path.isfile(py) and os.access(py, os.X_OK)):
            raise ValueError(f"--python-peers {py!r}: no such executable")
    if args.pipelines is not None:
        wanted = {p.strip() for p in args.pipelines.split(",") if p.strip()}
        bad = wanted - set(peers_mod.PIPELINES)
        if bad or not wanted:
            raise ValueError(f"--pipelines: unknown {', '.join(sorted(bad)) or 'empty list'}; "
                             f"known: {', '.join(sorted(peers_mod.PIPELINES))}")
    if args.data_dir is not None:
        check_data_dir(args.data_dir)
    return s


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        s = _validate(args)
    except ValueError as e:
        print(f"fastload bench: error: {e}", file=sys.stderr)
        return 2
    if args.data_dir is not None:
        os.makedirs(args.data_dir, exist_ok=True)
        with open(os.path.join(args.data_dir, CACHE_MARKER), "w") as f:
            json.dump({"written_by": "fastload bench", "contents": "cached benchmark datasets"}, f)
    cache = args.data_dir or bench_data.default_cache_dir()
    from fastload.bench._common import default_results_dir

    args.out_dir = args.out_dir or default_results_dir()
    pythons = [sys.executable] + list(args.python_peers)
    peer_notes = {}
    if args.peers == "auto":
        from fastload.bench.peers_env import ensure_peers_env

        py, peer_notes = ensure_peers_env(install_system=args.install_system_packages)
        pythons.append(py)
    wanted = {p.strip() for p in args.pipelines.split(",") if p.strip()} if args.pipelines else None

    # -- data
    n = s["num_images"]
    paths = bench_data.build_all(cache, n=n, seed=args.seed, num_augmentations=s["augmentations"], tolerant=True)
    n_small = max(args.batch_size, n // 10)
    small = None
    if not args.no_rss and (wanted is None or "fastload" in wanted):
        small = bench_data.build_all(cache, n=n_small, seed=args.seed, num_augmentations=s["augmentations"],
                                     kinds=("crop",), tolerant=True)
        if small["crop"] is None or paths["crop"] is None:
            small = None
    base_cfg = {"images": paths["images"], "reinforced": paths["crop"], "reinforced_ra_mix": paths["ra_mix"],
                "image_size": args.image_size, "batch_size": args.batch_size, "workers": args.workers,
                "threads": args.workers, "seed": args.seed, "warmup": s["warmup"],
                "max_batches": s["max_batches"], "seconds": s["seconds"]}

    # -- which pipelines run, and with which Python
    t1 = ["torchvision", "torch_pil", "ffcv", "dali_cpu", "spdl", "fastload", "decode_scaled", "decode_full",
          "decode_floor"]
    t2 = ["torchvision_v2_ra", "torch_ra_mix", "spdl_ra_mix", "fastload_ra_mix"]
    plan, skipped = [], {}
    for name in t1 + t2:
        if wanted is not None and name not in wanted:
            continue
        need = {"fastload": "crop", "fastload_ra_mix": "ra_mix", "decode_floor": "crop"}.get(name)
        if need and paths[need] is None:
            skipped[name] = "no reinforced dataset: " + paths["errors"][need]
            continue
        py = find_python(name, pythons)
        if py is None:
            skipped[name] = peer_notes.get(name) or (
                f"{NEEDS[name]} does not import in {pythons}: `fastload bench --peers auto` builds an "
                "environment with it (or pass --python-peers PATH)")
            continue
        plan.append((name, py))
    print(f"fastload bench: {n} images, batch {args.batch_size}, {args.image_size}px, {args.workers} workers, "
          f"{s['seconds']} s or {s['max_batches']} batches per pipeline after {s['warmup']} warm-up batches")
    for name, why in skipped.items():
        print(f"  skipped {name}: {why}")

    results = {}
    loads_all: list = []  # 1-minute load averages seen around every measurement
    extra = 3 if small else 0
    bar = Progress(len(plan) * args.rounds + extra, desc="bench pipelines", unit="pipeline")
    for rnd in range(args.rounds):
        # rounds interleave the pipelines, so a burst of outside load hits all of them alike;
        # each pipeline keeps its fastest round
        for name, py in plan:
            if rnd and "error" in results[name]:
                bar.update()
                continue
            r = run_pipeline(py, {**base_cfg, "pipeline": name})
            prev = results.get(name)
            rounds = (prev or {}).get("rounds_images_per_s", []) + [r.get("images_per_s")]
            loads_all += [r[k] for k in ("loadavg_before", "loadavg_after") if r.get(k) is not None]
            if prev is None or r.get("images_per_s", 0) > prev.get("images_per_s", 0):
                results[name] = r
            results[name]["rounds_images_per_s"] = rounds
            msg = (f"{r['images_per_s']:,.0f} img/s, {1000 * r['cpu_s_per_image']:.2f} CPU ms/img"
                   if "images_per_s" in r else "FAILED: " + r["error"].splitlines()[-1])
            print(f"  {name}{f' (round {rnd + 1})' if args.rounds > 1 else ''}: {msg}", flush=True)
            bar.update()

    # -- memory: 10x data, and RSS over epochs
    rss = {}
    if small:
        same = {**base_cfg, "pipeline": "fastload", "seconds": 1e9,
                "max_batches": min(s["max_batches"], 40 if not args.quick else 6)}
        r_small = run_pipeline(sys.executable, {**same, "images": small["images"], "reinforced": small["crop"]})
        bar.update()
        r_big = run_pipeline(sys.executable, same)
        bar.update()
        per_epoch = n_small // args.batch_size
        r_ep = run_pipeline(sys.executable, {**base_cfg, "pipeline": "fastload", "images": small["images"],
                                             "reinforced": small["crop"], "epochs_rss": s["rss_epochs"],
                                             "epoch_batches": per_epoch})
        bar.update()
        rss = {"small_images": n_small, "large_images": n, "batches": same["max_batches"], "small": r_small,
               "large": r_big, "epochs": r_ep}
        if "peak_rss_mib" in r_small and "peak_rss_mib" in r_big:
            rss["peak_rss_small_mib"] = r_small["peak_rss_mib"]
            rss["peak_rss_large_mib"] = r_big["peak_rss_mib"]
            rss["rss_10x_growth"] = r_big["peak_rss_mib"] / r_small["peak_rss_mib"] - 1
            rss["rss_anon_10x_growth"] = r_big["peak_rss_anon_mib"] / r_small["peak_rss_anon_mib"] - 1
        per = r_ep.get("rss_per_epoch_mib")
        if per:
            rss["rss_epoch_1_mib"], rss["rss_epoch_last_mib"] = per[0]["rss"], per[-1]["rss"]
            rss["rss_10_epochs_growth"] = per[-1]["rss"] / per[0]["rss"] - 1
    bar.close()

    # -- tables and ratios
    base1 = "torchvision" if "images_per_s" in results.get("torchvision", {}) else "torch_pil"
    base2 = "torchvision_v2_ra" if "images_per_s" in results.get("torchvision_v2_ra", {}) else "torch_ra_mix"
    table1 = _speed_rows(results, t1, base1)
    table2 = _speed_rows(results, t2, base2)
    ips = {k: v.get("images_per_s") for k, v in results.items()}

    cpu = {k: v.get("cpu_s_per_image") for k, v in results.items()}

    def ratio(a, b):
        return ips[a] / ips[b] if ips.get(a) and ips.get(b) else None

    def cpu_ratio(a, b):  # images per CPU-second, a vs b: robust to outside load
        return cpu[b] / cpu[a] if cpu.get(a) and cpu.get(b) else None

    ratios, per_cpu = named_ratios(ratio, cpu_ratio, base1, base2)
    ratios.update({"baseline": base1, "ra_mix_baseline": base2, "per_cpu_second": per_cpu,
                   "rss_10x_growth": rss.get("rss_10x_growth"),
                   "rss_anon_10x_growth": rss.get("rss_anon_10x_growth"),
                   "rss_10_epochs_growth": rss.get("rss_10_epochs_growth")})

    _print_speed("RandomResizedCrop 224 + flip + normalize", table1, base1)
    _print_speed("+ RandAugment(2, 9) + MixUp/CutMix", table2, base2)
    _print_stages(results)
    if rss:
        print(f"\n## Memory (fastload.ReinforcedLoader, {args.workers} workers)")
        print(f"peak RSS, {n_small} images: {_num(rss.get('peak_rss_small_mib'))} MiB; {n} images "
              f"({n / n_small:.3g}x): "
              f"{_num(rss.get('peak_rss_large_mib'))} MiB; growth {_num(rss.get('rss_10x_growth'), '{:+.1%}')}; anonymous memory only: {_num(rss.get('rss_anon_10x_growth'), '{:+.1%}')} "
              "(the rest is file-backed: pages of the memory-mapped dataset)")
        print(f"RSS after epoch 1: {_num(rss.get('rss_epoch_1_mib'))} MiB, after epoch {s['rss_epochs']}: "
              f"{_num(rss.get('rss_epoch_last_mib'))} MiB; growth {_num(rss.get('rss_10_epochs_growth'), '{:+.1%}')}")
    loads = loads_all + [v.get(k) for v in (rss.get("small", {}), rss.get("large", {}))
                         for k in ("loadavg_before", "loadavg_after") if v.get(k)]
    max_load = max(loads) if loads else None
    loaded = max_load is not None and max_load > (os.cpu_count() or 1)
    for line in ratio_lines(ratios, per_cpu, max_load, os.cpu_count() or 1):
        print(line)

    payload = {"settings": {**s, "batch_size": args.batch_size, "image_size": args.image_size,
                            "workers": args.workers, "seed": args.seed, "quick": args.quick},
               "dataset": {"images": paths["images"], "reinforced": {k: paths[k] for k in ("crop", "ra_mix")},
                           "num_images": n, "jpeg": f"{bench_data.WIDTH}x{bench_data.HEIGHT} q{bench_data.QUALITY}",
                           "teacher": "tiny fixed conv net (loader speed only)"},
               "pythons": pythons, "skipped": skipped, "data_errors": paths["errors"], "results": results,
               "table_rrc_flip": table1, "table_ra_mix": table2, "memory": rss, "ratios": ratios,
               "max_loadavg": max_load, "machine_loaded": loaded,
               "stable_ratio": "per_cpu_second" if loaded else "images_per_s"}
    if not loaded:  # reference targets are information only, and only from a quiet machine
        payload["reference_targets"] = {k: t for k, t in TARGETS.items() if k in ratios}
    notes = ["Every pipeline runs in its own process; images/s and CPU seconds (its whole process "
             "tree) are measured after the warm-up batches; peak RSS is the process tree's RSS sampled "
             "every 50 ms (worker processes add their shared pages again).",
             "The reinforced datasets store the same JPEG bytes as the ImageFolder the baselines read; "
             "the teacher is a tiny fixed conv net (loader speed only).",
             "decode_scaled decodes every file at the DCT scale the loader's rule (csrc/replay/jpeg.cpp "
             "choose_denom) picks for a torchvision-sampled crop; counts per denominator in its result."]
    if any(r.get("python") != sys.executable for r in results.values()):
        notes.append("Pipelines run with another Python (see each result's 'python') carry that "
                     "environment's torch build in their RSS.")
    if "ffcv" in results:
        notes.append("FFCV reads a .beton written from the same images (re-encoded as JPEG quality 90).")
    notes.append("The reinforced datasets store their JPEGs as reinforce() does by default: losslessly "
                 "transcoded with a restart marker every ~4 MCUs and optimized Huffman tables (the same "
                 "pixels; fastload.replay.native.add_restarts), so the loader decodes only the MCU rows and "
                 "restart intervals around each crop. decode_scaled/decode_full decode the source files "
                 "as they are.")
    notes.append("decode_floor decodes, for each sample, one of its stored crops only, from the dataset's "
                 "stored bytes as the loader does (the MCU rows and restart intervals around it; rows above "
                 "skipped by jpeg_skip_scanlines in files without markers), columns cut (jpeg_crop_scanline), "
                 "stop after its last row, at the loader's DCT scale (fastload.replay.native.crop_floor_batch); "
                 "fastload_of_decode_floor is the loader's images/s over the floor's.")
    payload["notes"] = notes
    payload["peer_settings"] = {k: v.get("settings") for k, v in results.items() if "images_per_s" in v}
    payload["measured"] = {k: _label(k) for k, v in results.items() if "images_per_s" in v}
    payload["not_measured"] = {**skipped, **{k: "failed: " + v["error"].strip().splitlines()[-1]
                                             for k, v in results.items() if "error" in v}}
    path = write_result(args.name, payload, args.out_dir)
    chart = None
    if not args.no_chart:
        chart = _chart(path[:-len(".json")] + ".png", table1, table2)
        if chart:
            from fastload._results import publish_latest

            publish_latest(chart, os.path.join(args.out_dir, args.name + ".png"))
    print(f"\nresults: {path} (latest run: {os.path.join(args.out_dir, args.name + '.json')})"
          + (f", chart: {chart}" if chart else ""))
    for line in _coverage_lines(payload["measured"], payload["not_measured"]):
        print(line)
    failed = [k for k, v in results.items() if "error" in v]
    return 1 if failed and len(failed) == len(results) else 0


if __name__ == "__main__":
    sys.exit(main())
