"""Body of the spawned gloo processes of test_check_ranks.py: rank 1's batch sampler gives
one batch fewer than rank 0's; with check_ranks=True both must raise "ranks disagree" (the
end-of-epoch sentinel meets rank 0's extra step) instead of waiting for a collective."""
from __future__ import annotations

import datetime
import json
import os
import time


def worker(rank: int, world: int, port: int, root: str, out_dir: str, nw: int) -> None:
    import torch.distributed as dist

    from fastload.loader.reinforced import ReinforcedLoader

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    # a short timeout: a regression that waits in a collective fails in seconds, not minutes
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=15))
    batches = [[0, 1], [2, 3], [4, 5]][: 3 - rank]
    L = ReinforcedLoader(root, batch_sampler=batches, image_size=8, check_ranks=True, num_workers=nw)
    t0 = time.monotonic()
    res = {"error": None, "steps": 0}
    try:
        for _ in L:
            res["steps"] += 1
    except Exception as e:  # noqa: BLE001 - the test inspects what was raised
        res["error"] = f"{type(e).__name__}: {e}"
    res["seconds"] = time.monotonic() - t0
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()
