"""Ahead-of-time compile check of every Triton kernel (``fastload.kernels.aot_check``) for
sm_80 and sm_90 with Triton's bundled ptxas: fails on a compile error, on register spills,
or on a launch leaving ``enable_fp_fusion`` to Triton's default. Runs in a subprocess
because the test session uses Triton's interpreter (conftest), which replaces the compiler.
The result (registers, spills, shared memory per kernel) goes to a temporary folder: a test
never rewrites the committed benchmarks/results/triton_compile.json (``python -m
fastload.kernels.aot_check`` run by hand updates it)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

# ~80 s on 2 cores (126 compiles): in CI's full run, not in the default quick suite
pytestmark = pytest.mark.slow


def _tracked_changes(root):
    r = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                       capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None  # None: not a git checkout


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = str(tmp_path / "results")
    before = _tracked_changes(root)
    r = subprocess.run([sys.executable, "-m", "fastload.kernels.aot_check", "--out-dir", out],
                       capture_output=True, text=True, env=env, timeout=1200, cwd=root)
    doc = json.loads(open(os.path.join(out, "triton_compile.json")).read())
    assert r.returncode == 0 and not doc["problems"], r.stdout[-4000:] + r.stderr[-4000:]
    assert _tracked_changes(root) == before  # nothing committed was rewritten
    kernels = {k["kernel"] for k in doc["kernels"]}
    assert kernels == {"_sparse_down_kernel", "_replay_kernel", "_resize_u8_kernel",
                       "_ra_stats_kernel", "_ra_final_kernel", "_ra_apply_kernel",
                       "_pil_stats_kernel", "_pil_final_kernel", "_pil_apply_kernel",
                       "_timm_apply_kernel"}, kernels
    assert {k["sm"] for k in doc["kernels"]} == {80, 90}
    for k in doc["kernels"]:
        assert 0 < k["registers"] <= 255 and k["shared_bytes"] >= 0
