"""VariableBatchSampler under torch.distributed (gloo, spawned processes): every rank draws the
same (h, w, b) per step and the same number of steps, the samples are sharded without
duplicates beyond the documented padding, and the shape check raises instead of hanging."""
import json
import os
import sys

import pytest

pytestmark = pytest.mark.timeout(120)


def _spawn(world, tmp_path, num_samples):
    import torch.multiprocessing as mp

    sys.path.insert(0, os.path.dirname(__file__))
    from _variable_ddp_worker import run_rank

    mp.spawn(run_rank, args=(world, str(tmp_path), num_samples), nprocs=world, join=True)
    outs = []
    for r in range(world):
        with open(tmp_path / f"rank{r}.json") as f:
            outs.append(json.load(f))
    return outs


@pytest.mark.parametrize("world,num_samples", [(2, 301), (3, 400)])
def test_gloo_ranks_agree_and_shard(world, num_samples, tmp_path):
    outs = _spawn(world, tmp_path, num_samples)
    assert [o["rank_world"] for o in outs] == [[r, world] for r in range(world)]
    for epoch in ("0", "1"):
        batches = [o["epochs"][epoch] for o in outs]
        # same number of steps on every rank, and len() told the truth
        assert len({len(b) for b in batches}) == 1
        assert all(o["len"][epoch] == len(b) for o, b in zip(outs, batches))
        # same (h, w, batch length) at every step
        for step in zip(*batches):
            shapes = {(len(batch), batch[0][1], batch[0][2]) for batch in step}
            assert len(shapes) == 1, shapes
            assert all(len({(h, w) for _, h, w in batch}) == 1 for batch in step)
        ids = [i for b in batches for batch in b for i, _, _ in batch]
        per_rank = -(-num_samples // world)
        pad = per_rank * world - num_samples
        assert sorted(set(ids)) == list(range(num_samples))  # every sample served
        assert len(ids) == num_samples + pad                 # duplicates only the padding
    # a new epoch is a new order
    assert outs[0]["epochs"]["0"] != outs[0]["epochs"]["1"]
    # disagreeing ranks: an error on every rank when the epoch starts (the plan's digest),
    # naming the first step whose shape differs, never a hang
    for o in outs:
        assert o["shape_error"] is not None and "differs is step 2" in o["shape_error"], o
        assert o["plan_error"] is not None and "epoch plan" in o["plan_error"], o
