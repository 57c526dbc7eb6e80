"""Lightning integration (examples/lightning_ddp.py) with the real library: DDP on 2 CPU
processes (gloo), no re-wrapped sampler (each rank sees exactly ReinforcedLoader's own shard),
a run stopped mid-epoch and resumed from Lightning's checkpoint gives the batches of an
uninterrupted run, and epoch 1 is a new epoch (not a replay of epoch 0)."""
import hashlib
import os
import subprocess
import sys

import pytest

pytest.importorskip("lightning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "lightning_ddp.py")


def _run(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, EXAMPLE, *args], capture_output=True, text=True,
                       timeout=240, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def _seen(workdir, rank):
    with open(os.path.join(workdir, f"batches_rank{rank}.txt")) as f:
        return [(int(s), h) for s, r, h in (line.split() for line in f)]


@pytest.mark.slow
def test_lightning_ddp_stop_and_resume(tmp_path):
    import fastload

    w = str(tmp_path)
    _run(w, "--max-steps", "4", "--save-every", "4")          # stop mid-epoch 0 (6 steps/epoch)
    ckpt = os.path.join(w, "ckpt", "epoch=0-step=4.ckpt")
    assert os.path.exists(ckpt)
    _run(w, "--max-steps", "9", "--resume", ckpt)             # into epoch 1
    for rank in (0, 1):
        # truth: the loader's own shard for this rank, uninterrupted, two epochs
        ref = fastload.ReinforcedLoader(os.path.join(w, "data_plus"), batch_size=4, shuffle=True,
                                        seed=0, drop_last=True, rank=rank, world_size=2)
        assert len(ref) == 6
        want = []
        for epoch in (0, 1):
            ref.set_epoch(epoch)
            want += [hashlib.sha1(b[0].contiguous().numpy().tobytes()).hexdigest()[:16] for b in ref]
        got = _seen(w, rank)
        assert [s for s, _ in got] == list(range(9))
        assert [h for _, h in got] == want[:9]
        assert want[6] != want[0]  # epoch 1 reshuffled
