"""What every benchmark or check result carries (machine, versions, command, date), and where
it is written. Used by ``fastload bench`` and by the library's own checks
(``fastload.kernels.aot_check``), so it lives outside the benchmark harness."""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            mem_gib = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gib,
            "platform": platform.platform(), "gpu": None}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("fastload", "torch", "numpy", "pyarrow", "zstandard", "triton", "torchvision",
                "PIL", "ffcv", "nvidia.dali"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            out[mod] = getattr(m, "__version__", "?")
        except Exception:  # noqa: BLE001 - any import failure means "not available"
            pass
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                           text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def cache_home() -> str:
    """``$XDG_CACHE_HOME`` or ``~/.cache`` (the XDG base directory rule)."""
    return os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")


def default_results_dir() -> str:
    """Where benchmark results go unless ``--out-dir`` says otherwise: the user's cache, never
    the current folder (run from a checkout, a relative default overwrote committed results)."""
    return os.path.join(cache_home(), "fastload", "results")


def run_stamp(now: datetime.datetime | None = None) -> str:
    """UTC timestamp for per-run file names, e.g. ``20261207T013012Z`` (sorts by time)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return now.astimezone(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def write_result(name: str, payload: dict, out_dir: str | None = None, stamp: str | None = None) -> str:
    """Write this run's result as ``<out_dir>/<name>-<UTC stamp>.json`` (a new file per run, so
    an earlier run is never overwritten) and copy it to ``<out_dir>/<name>.json``, the latest
    run (the name links and tools read). Returns the per-run file's path."""
    out_dir = out_dir or default_results_dir()
    os.makedirs(out_dir, exist_ok=True)
    stamp = stamp or run_stamp()
    doc = {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "machine": machine_info(),
        "versions": versions(),
        **payload,
    }
    path = os.path.join(out_dir, f"{name}-{stamp}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, default=float)
        f.write("\n")
    os.replace(tmp, path)
    publish_latest(path, os.path.join(out_dir, f"{name}.json"))
    return path


def publish_latest(path: str, latest: str) -> None:
    """Make ``latest`` a copy of ``path`` (a copy, not a symlink: a committed result stays a
    plain file that links and diffs can show), replaced atomically."""
    tmp = latest + ".tmp"
    shutil.copyfile(path, tmp)
    os.replace(tmp, latest)
