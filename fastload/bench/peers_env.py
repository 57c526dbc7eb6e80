"""``fastload bench --peers auto``: an isolated environment for the peers the benchmark
compares against (torchvision, NVIDIA DALI, FFCV, SPDL), built once under
``$XDG_CACHE_HOME/fastload/peers-venv`` and reused.

Why a separate environment: torchvision's wheels pull their own torch build (torch 2.14.1 +
torchvision 0.29.1, a CUDA build of about 5.5 GB that runs on the CPU), which must never
replace the torch fastload runs with. The peers run as subprocesses of that Python
(``fastload/bench/peers.py`` imports only the standard library at the top).

Two peers need system libraries: FFCV builds from source against libturbojpeg, OpenCV and
pkg-config; SPDL's image decode loads FFmpeg's shared libraries (libavcodec, libavfilter, ...)
at import. By default those are named, never installed: without them the peer is reported as
not measured, with the ``apt-get`` line that installs them. With
``install_system_packages=True`` (``fastload bench --peers auto --install-system-packages``)
and running as root (as in CI), the missing ones are installed with apt-get first. The next
``--peers auto`` run checks again and installs a peer once its packages are there (so does
any peer whose install failed).
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
FFCV_PACKAGES = ["libturbojpeg0-dev", "libopencv-dev", "pkg-config"]
FFCV_SYSTEM = "apt-get install -y --no-install-recommends " + " ".join(FFCV_PACKAGES)
FFCV_PKGCONFIG = ("libturbojpeg", "opencv4")
FFCV_AFTER = ("; then run `fastload bench --peers auto` again, which installs FFCV (or, as root: "
              "`fastload bench --peers auto --install-system-packages`)")
# SPDL 0.8.0 (facebookresearch/spdl): pure wheels; spdl.io dlopens FFmpeg 4-9's libraries
SPDL = ["spdl==0.8.0"]
SPDL_PACKAGES = ["ffmpeg"]
SPDL_SYSTEM = "apt-get install -y --no-install-recommends " + " ".join(SPDL_PACKAGES)
SPDL_LIBS = ("libavutil.so.", "libavcodec.so.", "libavformat.so.", "libavfilter.so.", "libavdevice.so.",
             "libswscale.so.")
SPDL_AFTER = ("; then run `fastload bench --peers auto` again (or, as root: "
              "`fastload bench --peers auto --install-system-packages`)")
SPEC_VERSION = 2
PEERS = ("torchvision", "torchvision_v2_ra", "dali_cpu", "ffcv", "spdl", "spdl_ra_mix")


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


def _spdl_system_ok(run) -> Tuple[bool, str]:
    """Whether the dynamic linker knows FFmpeg's libraries (``ldconfig -p``)."""
    try:
        r = run(["ldconfig", "-p"], check=False, capture_output=True)
        out = r.stdout if isinstance(getattr(r, "stdout", None), (bytes, str)) else b""
    except OSError:
        out = b""
    text = out.decode("utf-8", "replace") if isinstance(out, bytes) else out
    missing = [lib.rstrip(".") for lib in SPDL_LIBS if lib not in text]
    if missing:
        return False, (f"SPDL's image decode needs FFmpeg's shared libraries, not found ({', '.join(missing)}): "
                       f"{SPDL_SYSTEM}{SPDL_AFTER}")
    return True, ""


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def install_system_packages(packages: List[str], run: Callable = subprocess.run, log: Callable[[str], None] = print,
                            is_root: Optional[bool] = None) -> Tuple[bool, str]:
    """``apt-get update`` then ``apt-get install`` the packages (non-interactive); only as root
    and only where apt-get exists. Returns (ok, why not)."""
    root = _is_root() if is_root is None else is_root
    line = "apt-get install -y --no-install-recommends " + " ".join(packages)
    if not root:
        return False, f"installing system packages needs root; run as root: {line}"
    if shutil.which("apt-get") is None:
        return False, f"no apt-get on this system; install the equivalent of: {line}"
    env = ["env", "DEBIAN_FRONTEND=noninteractive"]
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends"] + list(packages)):
        log("  " + " ".join(cmd))
        r = run(env + cmd, check=False)
        if r.returncode != 0:
            return False, f"`{' '.join(cmd)}` failed (exit {r.returncode}); to retry by hand: {line}"
    return True, ""


def ensure_peers_env(path: Optional[str] = None, log: Callable[[str], None] = print,
                     run: Callable = subprocess.run, install_system: bool = False,
                     is_root: Optional[bool] = None) -> Tuple[str, Dict[str, str]]:
    """Create (or reuse) the peers' virtual environment; returns (its python, notes), where
    notes maps a peer that could not be installed to the reason and the command that fixes it.

    ``install_system``: install the system packages FFCV and SPDL need with apt-get when they
    are missing (root only; otherwise they are named in the notes, as by default).

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
        log(f"peers environment: building {path} (torch 2.14.1 + torchvision, DALI, FFCV, SPDL; several "
            "GB, minutes; reused afterwards)")
        run([sys.executable, "-m", "venv", path], check=True)
        missing = set(PEERS)
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
        for w in ("dali_cpu", "ffcv", "spdl", "spdl_ra_mix"):
            if w in missing:
                notes[w] = f"not tried: the peers' torch did not install ({notes['torchvision']})"
    else:
        if "dali_cpu" in missing:
            install(DALI, ["dali_cpu"])

        def with_system(who: List[str], probe, packages: List[str], pins: List[str]) -> None:
            ok, why = probe(run)
            if not ok and install_system:
                done, how = install_system_packages(packages, run=run, log=log, is_root=is_root)
                ok, why = probe(run) if done else (False, how)
                if done and not ok:
                    why = f"installed {' '.join(packages)}, yet still: {why}"
            if ok:
                install(pins, who)
            else:
                for w in who:
                    notes[w] = why
                log("  " + why)

        if "ffcv" in missing:
            with_system(["ffcv"], _ffcv_system_ok, FFCV_PACKAGES, FFCV)
        spdl = [w for w in ("spdl", "spdl_ra_mix") if w in missing]
        if spdl:
            with_system(spdl, _spdl_system_ok, SPDL_PACKAGES, SPDL)
    with open(marker, "w") as f:
        json.dump({"version": SPEC_VERSION, "notes": notes, "pins": TORCH_PINS + DALI + FFCV + SPDL}, f)
    return py, notes
