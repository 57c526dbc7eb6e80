"""`fastload bench` on a first run: results and caches under
XDG_CACHE_HOME (never the current folder's benchmarks/results), the run names what it
measured and what it could not and why, and `--peers auto` builds an isolated environment
(torch 2.14.1 + torchvision, DALI, FFCV, SPDL) naming FFCV's and SPDL's system packages instead of
installing them, unless asked to (--install-system-packages, as root)."""
import json
import os
import subprocess
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what `ldconfig -p` lists where FFmpeg's shared libraries are installed (SPDL's probe)
FFMPEG_LIBS = b"".join(b"\t%s.59 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/%s.59\n" % (n, n) for n in (
    b"libavutil.so", b"libavcodec.so", b"libavformat.so", b"libavfilter.so", b"libavdevice.so", b"libswscale.so"))


@pytest.mark.slow
def test_bench_writes_under_xdg_and_names_coverage(tmp_path):
    cache, cwd = tmp_path / "xdg", tmp_path / "checkout"
    (cwd / "benchmarks" / "results").mkdir(parents=True)
    env = dict(os.environ, XDG_CACHE_HOME=str(cache))
    p = subprocess.run([sys.executable, "-m", "fastload.cli", "bench", "--quick", "--num-images", "24",
                        "--batch-size", "8", "--image-size", "32", "--augmentations", "2",
                        "--pipelines", "torchvision,fastload,decode_full", "--seconds", "0.2",
                        "--max-batches", "2", "--warmup", "1", "--workers", "1", "--no-rss", "--no-chart"],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert os.listdir(cwd / "benchmarks" / "results") == []
    doc = json.load(open(cache / "fastload" / "results" / "images.json"))
    assert (cache / "fastload" / "bench").is_dir()
    assert set(doc["measured"]) == {"fastload", "decode_full"}
    assert "--peers auto" in doc["not_measured"]["torchvision"]
    assert "measured: fastload, decode_full" in p.stdout and "not measured:" in p.stdout


def test_other_bench_modes_default_to_the_cache(monkeypatch, tmp_path):
    from fastload import cli

    seen = {}
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cli, "_call", lambda target, argv: seen.setdefault(target, argv) and 0)
    cli.main(["bench", "--lm", "--quick"])
    assert seen["fastload.bench.lm:main"][-2:] == ["--out-dir", str(tmp_path / "fastload" / "results")]
    seen.clear()
    cli.main(["bench", "--variable", "--out-dir", "here"])
    assert seen["fastload.bench.variable:main"] == ["--out-dir", "here"]


def test_peers_auto_builds_an_isolated_env_and_names_ffcv_packages(tmp_path, monkeypatch):
    from fastload.bench import peers_env

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []

    def fake_run(cmd, check=False, capture_output=False):
        calls.append(list(cmd))
        if cmd[:2] == ["pkg-config", "--exists"]:
            return types.SimpleNamespace(returncode=1)
        if cmd[1:3] == ["-m", "venv"]:
            os.makedirs(os.path.join(cmd[3], "bin"), exist_ok=True)
            open(os.path.join(cmd[3], "bin", "python"), "w").close()
        return types.SimpleNamespace(returncode=0)

    monkeypatch.setattr(peers_env.shutil, "which", lambda name: "/usr/bin/pkg-config")
    logs = []
    py, notes = peers_env.ensure_peers_env(run=fake_run, log=logs.append)
    assert py == str(tmp_path / "fastload" / "peers-venv" / "bin" / "python")
    pips = [c for c in calls if c[1:4] == ["-m", "pip", "install"]]
    assert pips[0][-4:] == ["torch==2.14.1", "torchvision==0.29.1", "numpy", "pillow"]
    assert all(c[0] == py for c in pips)  # never the running interpreter's torch
    assert not any("apt-get" in " ".join(c) for c in calls)  # named, not run
    assert "libturbojpeg0-dev libopencv-dev" in notes["ffcv"] and not any("ffcv" in c for c in pips)
    assert "--peers auto` again" in notes["ffcv"]


def test_peers_auto_reprobes_a_missing_peer_on_reuse(tmp_path, monkeypatch):
    """A reused environment checks again what its last build lacked: while FFCV's system
    packages are missing it says exactly what to run; once they appear it installs FFCV; a
    complete environment is then reused without a command."""
    from fastload.bench import peers_env

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(peers_env.shutil, "which", lambda name: "/usr/bin/pkg-config")
    system = {"installed": False}
    calls = []

    def fake_run(cmd, check=False, capture_output=False):
        calls.append(list(cmd))
        if cmd[:2] == ["pkg-config", "--exists"]:
            return types.SimpleNamespace(returncode=0 if system["installed"] else 1)
        if cmd[:2] == ["ldconfig", "-p"]:
            return types.SimpleNamespace(returncode=0, stdout=FFMPEG_LIBS if system["installed"] else b"")
        if cmd[1:3] == ["-m", "venv"]:
            os.makedirs(os.path.join(cmd[3], "bin"), exist_ok=True)
            open(os.path.join(cmd[3], "bin", "python"), "w").close()
        return types.SimpleNamespace(returncode=0)

    py, notes = peers_env.ensure_peers_env(run=fake_run, log=lambda m: None)
    assert set(notes) == {"ffcv", "spdl", "spdl_ra_mix"}
    assert "apt-get install -y --no-install-recommends ffmpeg" in notes["spdl"]
    # reused, packages still missing: probed again, nothing installed, same advice
    del calls[:]
    logs = []
    assert peers_env.ensure_peers_env(run=fake_run, log=logs.append) == (py, notes)
    assert calls and all(c[0] in ("pkg-config", "ldconfig") for c in calls)
    assert "checking again" in logs[0] and "ffcv" in logs[0] and "spdl" in logs[0]
    # the system packages appear: the next run installs FFCV and SPDL (only them) in the reused env
    system["installed"] = True
    del calls[:]
    py2, notes2 = peers_env.ensure_peers_env(run=fake_run, log=lambda m: None)
    pips = [c for c in calls if c[1:4] == ["-m", "pip", "install"]]
    assert py2 == py and notes2 == {} and [c[-1] for c in pips] == ["ffcv", "spdl==0.8.0"] and pips[0][0] == py
    assert not any(c[1:3] == ["-m", "venv"] for c in calls)  # the environment was not rebuilt
    # complete now: reused without any command
    del calls[:]
    assert peers_env.ensure_peers_env(run=fake_run, log=lambda m: None) == (py, {}) and calls == []


def test_peers_auto_failed_pip_install_names_the_retry_command(tmp_path, monkeypatch):
    from fastload.bench import peers_env

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(peers_env.shutil, "which", lambda name: "/usr/bin/pkg-config")

    def fake_run(cmd, check=False, capture_output=False):
        if cmd[1:3] == ["-m", "venv"]:
            os.makedirs(os.path.join(cmd[3], "bin"), exist_ok=True)
            open(os.path.join(cmd[3], "bin", "python"), "w").close()
        failing = cmd[1:4] == ["-m", "pip", "install"] and "nvidia-dali-cuda120" in cmd
        return types.SimpleNamespace(returncode=1 if failing else 0, stdout=FFMPEG_LIBS)

    py, notes = peers_env.ensure_peers_env(run=fake_run, log=lambda m: None)
    assert set(notes) == {"dali_cpu"}
    assert f"{py} -m pip install nvidia-dali-cuda120" in notes["dali_cpu"]


def _fake_system(calls, apt_fails=False):
    """A fake `run`: FFCV's and SPDL's system packages appear once apt-get installs them."""
    installed = set()

    def fake_run(cmd, check=False, capture_output=False):
        calls.append(list(cmd))
        if cmd[:2] == ["env", "DEBIAN_FRONTEND=noninteractive"] and cmd[2] == "apt-get":
            if cmd[3] == "install":
                if apt_fails:
                    return types.SimpleNamespace(returncode=100)
                installed.update(cmd[4:])
            return types.SimpleNamespace(returncode=0)
        if cmd[:2] == ["pkg-config", "--exists"]:
            return types.SimpleNamespace(returncode=0 if "libopencv-dev" in installed else 1)
        if cmd[:2] == ["ldconfig", "-p"]:
            return types.SimpleNamespace(returncode=0, stdout=FFMPEG_LIBS if "ffmpeg" in installed else b"")
        if cmd[1:3] == ["-m", "venv"]:
            os.makedirs(os.path.join(cmd[3], "bin"), exist_ok=True)
            open(os.path.join(cmd[3], "bin", "python"), "w").close()
        return types.SimpleNamespace(returncode=0)

    return fake_run


def test_install_system_packages_as_root_installs_ffcv_and_spdl(tmp_path, monkeypatch):
    """--install-system-packages as root: apt-get update + install of FFCV's packages, then of
    SPDL's (FFmpeg), then each peer's pip install, in the peers' environment."""
    from fastload.bench import peers_env

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(peers_env.shutil, "which", lambda name: "/usr/bin/" + name)
    calls = []
    py, notes = peers_env.ensure_peers_env(run=_fake_system(calls), log=lambda m: None, install_system=True,
                                           is_root=True)
    assert notes == {}
    apt = [c[2:] for c in calls if c[:3] == ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]]
    assert apt == [["apt-get", "update"],
                   ["apt-get", "install", "-y", "--no-install-recommends", "libturbojpeg0-dev", "libopencv-dev",
                    "pkg-config"],
                   ["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "ffmpeg"]]
    pips = [c for c in calls if c[1:4] == ["-m", "pip", "install"]]
    assert [c[-1] for c in pips] == ["pillow", "nvidia-dali-cuda120", "ffcv", "spdl==0.8.0"]
    assert all(c[0] == py for c in pips)
    # the pip install of FFCV comes after its system packages
    i_apt = calls.index(["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y",
                         "--no-install-recommends", "libturbojpeg0-dev", "libopencv-dev", "pkg-config"])
    assert i_apt < calls.index(pips[2])


def test_install_system_packages_needs_root(tmp_path, monkeypatch):
    """Not root: nothing is run with apt-get; FFCV and SPDL are named as not measured with the
    exact command, and that it needs root."""
    from fastload.bench import peers_env

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(peers_env.shutil, "which", lambda name: "/usr/bin/" + name)
    calls = []
    py, notes = peers_env.ensure_peers_env(run=_fake_system(calls), log=lambda m: None, install_system=True,
                                           is_root=False)
    assert not any("apt-get" in c for cmd in calls for c in cmd)
    assert set(notes) == {"ffcv", "spdl", "spdl_ra_mix"}
    assert "needs root" in notes["ffcv"] and FFCV_LINE in notes["ffcv"]
    assert "needs root" in notes["spdl"] and "apt-get install -y --no-install-recommends ffmpeg" in notes["spdl"]
    pips = [c[-1] for c in calls if c[1:4] == ["-m", "pip", "install"]]
    assert "ffcv" not in pips and "spdl==0.8.0" not in pips


def test_install_system_packages_failed_apt_names_the_retry(tmp_path, monkeypatch):
    from fastload.bench import peers_env

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(peers_env.shutil, "which", lambda name: "/usr/bin/" + name)
    calls = []
    py, notes = peers_env.ensure_peers_env(run=_fake_system(calls, apt_fails=True), log=lambda m: None,
                                           install_system=True, is_root=True)
    assert set(notes) == {"ffcv", "spdl", "spdl_ra_mix"}
    assert "failed (exit 100)" in notes["ffcv"] and FFCV_LINE in notes["ffcv"]
    # the next run (packages installed by hand meanwhile) probes again and installs
    py2, notes2 = peers_env.ensure_peers_env(run=_fake_system(calls), log=lambda m: None, install_system=True,
                                             is_root=True)
    assert py2 == py and notes2 == {}


FFCV_LINE = "apt-get install -y --no-install-recommends libturbojpeg0-dev libopencv-dev pkg-config"
