"""Body of the spawned gloo processes of test_dist_iteration.py: loaders and samplers built
BEFORE init_process_group (the Hugging Face order) under WORLD_SIZE=2 must raise when
iterated before the group exists, then shard correctly once it does."""
from __future__ import annotations

import datetime
import hashlib
import json
import os


def digests(loader):
    return [hashlib.sha1(b[0].contiguous().numpy().tobytes()).hexdigest()[:16] for b in loader]


def build(root):
    """The loaders and samplers of the test, built without rank/world_size arguments."""
    import fastload
    from fastload.batch.mixing import StreamMixer
    from fastload.batch.sharding import ShardedSampler

    ds = fastload.ReinforcedDataset(root)
    vbs = fastload.VariableBatchSampler(len(ds), base_size=16, base_batch_size=2, min_size=8,
                                        max_size=16, num_scales=2, divisible_by=8, seed=0)
    return dict(
        loader=fastload.ReinforcedLoader(ds, batch_size=2, shuffle=True, image_size=8, num_workers=1, seed=3),
        vloader=fastload.ReinforcedLoader(ds, batch_sampler=vbs, num_workers=1),
        sharded=ShardedSampler(len(ds), seed=1),
        mixer=StreamMixer({"a": len(ds)}, [1.0], epoch_size=len(ds), global_batch_size=4))


def worker(rank: int, world: int, port: int, root: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch.distributed as dist

    objs = build(root)
    res = {"errors": {}}
    for name, obj in objs.items():
        try:
            next(iter(obj))
            res["errors"][name] = None
        except RuntimeError as e:
            res["errors"][name] = str(e)

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    res["world"] = {name: obj.world_size for name, obj in objs.items()}
    res["len"] = len(objs["loader"])
    res["loader"] = digests(objs["loader"])
    res["vloader"] = digests(objs["vloader"])
    res["sharded"] = list(objs["sharded"])
    res["mixer"] = [b.tolist() for b in objs["mixer"]]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()
