"""Per-rank body of tests/test_variable_ddp.py (a module of its own so spawned processes can
import it without importing the test module)."""
import json
import os
from datetime import timedelta


def run_rank(rank: int, world: int, tmp: str, num_samples: int) -> None:
    import torch.distributed as dist

    from fastload.batch.variable import VariableBatchSampler

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # a short timeout turns any hang into an error the test sees
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    out = {"rank": rank}
    try:
        kw = dict(base_size=(64, 96), base_batch_size=8, min_size=(32, 64), max_size=(96, 128), num_scales=4,
                  divisible_by=16, seed=3)
        s = VariableBatchSampler(num_samples, check_shapes=True, **kw)  # rank/world from torch.distributed
        out["rank_world"] = [s.rank, s.world_size]
        out["len"] = {}
        out["epochs"] = {}
        for epoch in (0, 1):
            s.set_epoch(epoch)
            out["len"][epoch] = len(s)
            out["epochs"][epoch] = list(s)

        # ranks that disagree on a step's shape: the checked sampler must raise on every rank
        t = VariableBatchSampler(num_samples, check_shapes=True, **kw)
        plan = t._plan(0)
        if rank == world - 1:
            plan.h[2] += 16  # this rank now believes step 2 has another height
        try:
            for _ in t:
                pass
            out["shape_error"] = None
        except RuntimeError as e:
            out["shape_error"] = str(e)

        # ranks built with different batch sizes: caught by the per-epoch plan check
        kw2 = dict(kw, base_batch_size=8 + (rank == 0))
        u = VariableBatchSampler(num_samples, check_shapes=True, **kw2)
        try:
            next(iter(u))
            out["plan_error"] = None
        except RuntimeError as e:
            out["plan_error"] = str(e)
    finally:
        with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
        dist.destroy_process_group()
