"""``fastload bench --peers auto``: an isolated environment for the peers the benchmark
compares against (torchvision, NVIDIA DALI, FFCV), built once under
``$XDG_CACHE_HOME/fastload/peers-venv`` and reused.

Why a separate environment: torchvision's wheels pull their own torch build (torch 2.14.1 +
torchvision 0.29.1, a CUDA build of about 5.5 GB that runs on the CPU), which must never
replace the torch fastload runs with. The peers run as subprocesses of that Python
(``fastload/bench/peers.py`` imports only the standard library at the top).

FFCV builds from source against system libraries (libturbojpeg, OpenCV, pkg-config). Those
are named, never installed here: without them FFCV is reported as not measured, with the
``apt-get`` line that installs them. The next ``--peers auto`` run checks again and installs
FFCV once they are there (so does any peer whose install failed).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Tuple

from fastload._results import cache_home

# torchvision 0.29.1 is the release built against torch 2.14.1 (both install from the index)
TORCH_PINS = ["torch==2.14.1", "torchvision==0.29.1", "numpy", "pillow"]
DALI = ["nvidia-dali-cuda120"]
FFCV = ["ffcv"]
FFCV_SYSTEM = "apt-get install -y --no-install-recommends libturbojpeg0-dev libopencv-dev pkg-config"
FFCV_PKGCONFIG = ("libturbojpeg", "opencv4")
FFCV_AFTER = "; then run `fastload bench --peers auto` again, which installs FFCV"
SPEC_VERSION = 1


def peers_env_dir() -> str:
    return os.path.join(cache_home(), "fastload", "peers-venv")


def _ffcv_system_ok(run) -> Tuple[bool, str]:
    if shutil.which("pkg-config") is None:
        return False, f"FFCV needs system packages that are not installed (no pkg-config): {FFCV_SYSTEM}{FFCV_AFTER}"
    missing = [m for m in FFCV_PKGCONFIG
               if run(["pkg-config", "--exists", m], check=False, capture_output=True).returncode != 0]
    if missing:
        return False, (f"FFCV needs system packages that are not installed ({', '.join(missing)} not found "
                       f"by pkg-config): {FFCV_SYSTEM}{FFCV_AFTER}")
    return True, ""


def ensure_peers_env(path: Optional[str] = None, log: Callable[[str], None] = print,
                     run: Callable = subprocess.run) -> Tuple[str, Dict[str, str]]:
    """Create (or reuse) the peers' virtual environment; returns (its python, notes), where
    notes maps a peer that could not be installed to the reason and the command that fixes it.

    A reused environment is not trusted blindly: every peer its last build could not install
    is probed again (FFCV's system packages may have been installed since) and installed now
    when it can be."""
    path = path or peers_env_dir()
    py = os.path.join(path, "bin", "python")
    marker = os.path.join(path, "fastload-peers.json")
    notes: Dict[str, str] = {}
    state = None
    if os.path.exists(marker) and os.path.exists(py):
        try:
            with open(marker) as f:
                state = json.load(f)
        except (OSError, ValueError):
            state = None
    if state is not None and state.get("version") == SPEC_VERSION:
        notes = dict(state.get("notes", {}))
        if not notes:
            log(f"peers environment: {path} (reused)")
            return py, notes
        log(f"peers environment: {path} (reused; checking again what was missing: {', '.join(sorted(notes))})")
        missing = set(notes)
        notes = {}
    else:
        log(f"peers environment: building {path} (torch 2.14.1 + torchvision, DALI, FFCV; several GB, "
            "minutes; reused afterwards)")
        run([sys.executable, "-m", "venv", path], check=True)
        missing = {"torchvision", "torchvision_v2_ra", "dali_cpu", "ffcv"}
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check"]

    def install(what: List[str], who: List[str]) -> bool:
        log("  pip install " + " ".join(what))
        r = run(pip + what, check=False)
        if r.returncode != 0:
            for w in who:
                notes[w] = (f"pip install {' '.join(what)} failed in {path} (exit {r.returncode}); "
                            f"to retry by hand: {py} -m pip install {' '.join(what)}")
            return False
        return True

    torch_ok = True
    if {"torchvision", "torchvision_v2_ra"} & missing:
        torch_ok = install(TORCH_PINS, ["torchvision", "torchvision_v2_ra"])
    if not torch_ok:
        for w in ("dali_cpu", "ffcv"):
            if w in missing:
                notes[w] = f"not tried: the peers' torch did not install ({notes['torchvision']})"
    else:
        if "dali_cpu" in missing:
            install(DALI, ["dali_cpu"])
        if "ffcv" in missing:
            ok, why = _ffcv_system_ok(run)
            if ok:
                install(FFCV, ["ffcv"])
            else:
                notes["ffcv"] = why
                log("  " + why)
    with open(marker, "w") as f:
        json.dump({"version": SPEC_VERSION, "notes": notes, "pins": TORCH_PINS + DALI + FFCV}, f)
    return py, notes
