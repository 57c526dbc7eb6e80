"""`fastload bench` on a first run: results and caches under
XDG_CACHE_HOME (never the current folder's benchmarks/results), the run names what it
measured and what it could not and why, and `--peers auto` builds an isolated environment
(torch 2.14.1 + torchvision, DALI, FFCV) naming FFCV's system packages instead of installing them."""
import json
import os
import subprocess
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
        if cmd[1:3] == ["-m", "venv"]:
            os.makedirs(os.path.join(cmd[3], "bin"), exist_ok=True)
            open(os.path.join(cmd[3], "bin", "python"), "w").close()
        return types.SimpleNamespace(returncode=0)

    py, notes = peers_env.ensure_peers_env(run=fake_run, log=lambda m: None)
    assert set(notes) == {"ffcv"}
    # reused, packages still missing: probed again, nothing installed, same advice
    del calls[:]
    logs = []
    assert peers_env.ensure_peers_env(run=fake_run, log=logs.append) == (py, notes)
    assert calls and all(c[0] == "pkg-config" for c in calls)
    assert "checking again" in logs[0] and "ffcv" in logs[0]
    # the system packages appear: the next run installs FFCV (and only FFCV) in the reused env
    system["installed"] = True
    del calls[:]
    py2, notes2 = peers_env.ensure_peers_env(run=fake_run, log=lambda m: None)
    pips = [c for c in calls if c[1:4] == ["-m", "pip", "install"]]
    assert py2 == py and notes2 == {} and [c[-1] for c in pips] == ["ffcv"] and pips[0][0] == py
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
        return types.SimpleNamespace(returncode=1 if failing else 0)

    py, notes = peers_env.ensure_peers_env(run=fake_run, log=lambda m: None)
    assert set(notes) == {"dali_cpu"}
    assert f"{py} -m pip install nvidia-dali-cuda120" in notes["dali_cpu"]
