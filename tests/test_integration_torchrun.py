"""torchrun integration (examples/torchrun_ddp.py): 2 gloo ranks, ReinforcedLoader driven by a
VariableBatchSampler, a torch.compile'd DDP model warmed over sampler.shapes(): every step has
the same shape on both ranks, only shapes from sampler.shapes(), no recompilation after the
warm-up, and each rank's batches equal the loader's own shard computed in one process."""
import hashlib
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "torchrun_ddp.py")


def _steps(w, rank):
    with open(os.path.join(w, f"steps_rank{rank}.txt")) as f:
        return [line.split() for line in f]


@pytest.mark.slow
def test_torchrun_variable_resolution_compiled(tmp_path):
    import fastload

    w = str(tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           EXAMPLE, w, "--epochs", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    if p.returncode != 0 and "terminate called without an active exception" in p.stderr:
        # Known flaky (1 of 4 CI runs, 2026-12-01): a rank aborted at interpreter exit after
        # training under DDP + torch.compile; whose thread is not established yet (see the
        # session note). One rerun; a second abort fails the test.
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ok = [line for line in p.stdout.splitlines() if line.startswith("torchrun_ddp: OK")]
    assert len(ok) == 1 and "2 ranks" in ok[0], p.stdout[-2000:]  # one success line, from rank 0
    r0, r1 = _steps(w, 0), _steps(w, 1)
    assert len(r0) == len(r1) > 0
    assert [s[:5] for s in r0] == [s[:5] for s in r1]          # same step, b, h, w on both ranks
    assert all(a[5] != b[5] for a, b in zip(r0, r1))           # different samples
    with open(os.path.join(w, "compile.txt")) as f:
        before, after = map(int, f.readline().split())
        shapes = set(f.readline().split())
    assert after == before                                      # warm-up covered every shape
    assert {f"{b}x{h}x{wd}" for _, _, b, h, wd, _ in r0} <= shapes
    ds = fastload.ReinforcedDataset(os.path.join(w, "data_plus"))
    for rank, seen in ((0, r0), (1, r1)):
        sampler = fastload.VariableBatchSampler(ds, base_size=32, base_batch_size=8, min_size=24,
                                                max_size=40, num_scales=3, divisible_by=8, seed=0,
                                                rank=rank, world_size=2)
        ref = fastload.ReinforcedLoader(ds, batch_sampler=sampler)
        want = []
        for epoch in (0, 1):
            ref.set_epoch(epoch)
            want += [hashlib.sha1(b[0].contiguous().numpy().tobytes()).hexdigest()[:16] for b in ref]
        assert [s[5] for s in seen] == want


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_torchrun_check_shapes_with_ddp_gradients_never_aborts(tmp_path):
    """Issue 18: with check_shapes=True the sampler's agreement checks ran on the loader's
    prefetch thread, unordered against DDP's gradient all-reduces on the main thread: gloo
    paired an 8-byte shape check with a gradient bucket and aborted (SIGABRT, 3 of 3 runs).
    The checks now run on the thread that starts the iteration. FASTLOAD_TORCHRUN_RUNS
    (default 10: the bug aborted every run; 20 took 2.6 of CI's 60 minutes) sets the number
    of runs; every one must exit 0 with equal shapes on both ranks."""
    runs = int(os.environ.get("FASTLOAD_TORCHRUN_RUNS", "10"))
    w = str(tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           EXAMPLE, w, "--epochs", "2", "--no-compile", "--check-shapes"]
    bad = []
    for k in range(runs):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
        if p.returncode != 0:
            # the ranks' own last words (the launcher's summary comes after them)
            why = [ln for ln in p.stderr.splitlines()
                   if any(w in ln for w in ("terminate", "Enforce", "gloo", "Error", "abort", "fastload"))]
            bad.append((k, p.returncode, "\n".join(why[-20:])))
            continue
        r0, r1 = _steps(w, 0), _steps(w, 1)
        assert len(r0) == len(r1) > 0 and [s[:5] for s in r0] == [s[:5] for s in r1]
    assert not bad, f"{len(bad)} of {runs} runs failed; first: {bad[0]}"
