"""Seeded fuzzing of JPEG bytes and of augmentation records through the native decode and render entry points (bit flips,
truncation, forged declared sizes, spans overwritten/inserted/deleted; baseline 4:2:0/4:4:4,
progressive, arithmetic, grayscale and CMYK inputs, and each with restart markers): every case ends in a result or a
ValueError naming its sample, never a crash, a hang or memory beyond the documented decode
limit (fastload.replay.native.set_decode_limits). The cases run in a child process
(tests/_jpeg_fuzz_worker.py) so that a crash fails the test with the case that caused it."""
import json
import os
import subprocess
import sys

import pytest

from fastload.replay import native

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.skipif(not native.have_jpeg(), reason="built without libjpeg: Pillow decodes")


def _fuzz(tmp_path, seed, n, timeout, mode="jpeg"):
    prog = tmp_path / f"progress-{seed}.txt"
    try:
        r = subprocess.run([sys.executable, os.path.join(HERE, "_jpeg_fuzz_worker.py"), str(seed), str(n), str(prog),
                            mode], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        last = prog.read_text().splitlines()[-1] if prog.exists() else "?"
        pytest.fail(f"fuzz seed {seed}: no result after {timeout} s (hang?) in case: {last}")
    if r.returncode != 0:
        last = prog.read_text().splitlines()[-1] if prog.exists() else "?"
        pytest.fail(f"fuzz seed {seed}: child died with exit {r.returncode} in case: {last}\n{r.stderr[-3000:]}")
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    assert stats["cases"] == n
    assert not stats["wrong"], "\n".join(stats["wrong"][:20])
    # memory: a decode holds at most max_bytes of libjpeg buffers plus its rows
    assert stats["max_rss_growth_mb"] < stats["limits"]["max_bytes"] / 2 ** 20 + 128, stats
    assert stats["ok"] > 0 and stats["errors"] > 0, stats
    return stats


def test_jpeg_fuzz_fast(tmp_path):
    _fuzz(tmp_path, seed=7, n=200, timeout=120)


@pytest.mark.slow
def test_jpeg_fuzz_10k(tmp_path):
    stats = _fuzz(tmp_path, seed=2026, n=10_000, timeout=300)
    assert stats["slowest_s"] < 5, stats  # a case that takes seconds is a hang in the making


def test_record_fuzz_fast(tmp_path):
    _fuzz(tmp_path, seed=11, n=200, timeout=120, mode="records")


@pytest.mark.slow
def test_record_fuzz_10k(tmp_path):
    stats = _fuzz(tmp_path, seed=2027, n=10_000, timeout=300, mode="records")
    assert stats["slowest_s"] < 5, stats
