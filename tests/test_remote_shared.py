"""Ranks of one node sharing one cache folder (real processes, a real HTTP server with Range
support that logs every GET): 4 ranks, cache_limit of 2 shards, 3 shuffled epochs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("obstore")

from _ddp_loader_worker import write_dataset
from _remote_servers import HERE, RangeHTTP

_RANK = r"""
import json, sys, threading, time
import numpy as np
from fastload.format.reader import ReinforcedDataset
from fastload.loader.reinforced import ReinforcedLoader
from fastload.remote import cache as rc
from fastload.remote.cachedir import CacheDir, RankTable
url, cache_dir, limit, rank, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
log = {"steps": [], "evictions": [], "plans": []}
seen = threading.local()
real_next, real_evict, real_plan = RankTable.next_uses, CacheDir.evict, rc.ShardCache.plan_steps

def next_uses(*a, **k):  # when this eviction looked at the other ranks' plans
    seen.t = time.monotonic()
    return real_next(*a, **k)

def evict(self, name):
    ok = real_evict(self, name)
    if ok:
        log["evictions"].append([seen.t, name])
    return ok

def plan_steps(self, per_step):  # [published no earlier than, no later than, plan]
    t0 = time.monotonic()
    real_plan(self, per_step)
    log["plans"].append([t0, time.monotonic(), [np.asarray(x).tolist() for x in per_step]])

real_at = rc.ShardCache.at_step
def at_step(self, step):
    t0 = time.monotonic()
    real_at(self, step)
    log["steps"].append([t0, time.monotonic(), step])

RankTable.next_uses, CacheDir.evict = staticmethod(next_uses), evict
rc.ShardCache.plan_steps, rc.ShardCache.at_step = plan_steps, at_step
ds = ReinforcedDataset(url, cache_dir=cache_dir, cache_limit=limit, predownload=1)
loader = ReinforcedLoader(ds, seed=5, image_size=16, batch_size=2, shuffle=True, rank=rank, world_size=4)
n = 0
for epoch in range(3):
    loader.set_epoch(epoch)
    for b in loader:
        n += 1
log["end"] = time.monotonic()  # needs nothing from here on
log["names"] = {str(p): rc.os.path.basename(ds.remote.local_name(p)) for p in range(len(ds.remote.shards))}
log["stats"], log["batches"] = ds.remote.stats, n
json.dump(log, open(out, "w"))
"""


@pytest.mark.slow
def test_four_ranks_share_a_small_cache(tmp_path):
    # 16 shards; row hashes of the stored bytes: MixUp/CutMix partners come by range
    local = write_dataset(str(tmp_path / "d"), n=96, shard_size=6, content_hash=True)
    shutil.copytree(local, tmp_path / "srv" / "ds")
    srv = RangeHTTP(str(tmp_path / "srv"), str(tmp_path / "get.log"))
    try:
        size = max(os.path.getsize(os.path.join(local, f)) for f in os.listdir(local) if f.endswith(".arrow"))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE] + sys.path))
        cache = str(tmp_path / "shared")
        outs = [str(tmp_path / f"r{r}.json") for r in range(4)]
        procs = [subprocess.Popen([sys.executable, "-c", _RANK, srv.url + "/ds", cache, str(2 * size), str(r),
                                   outs[r]], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r in range(4)]
        res = [p.communicate(timeout=300) for p in procs]
        assert all(p.returncode == 0 for p in procs), [e[-3000:] for _, e in res]  # no FileNotFoundError
        assert not any("FileNotFoundError" in e for _, e in res)
        logs = [json.load(open(o)) for o in outs]
        assert all(lg["batches"] == 3 * 12 for lg in logs)  # 96 rows / (2 x 4) per epoch
        names = logs[0]["names"]
        by_name = {v: int(k) for k, v in names.items()}
        gets = sum(srv.full_gets(f"shard-{k:05d}.arrow") for k in range(16))
        evictions = sum(len(lg["evictions"]) for lg in logs)
        assert evictions > 0, [lg["stats"] for lg in logs]  # the limit was binding
        assert gets <= 16 + evictions, (gets, evictions)  # one GET per shard, then one per eviction
        # no shard evicted while another rank needed it in its current or next step: at the
        # moment the evicting rank read the table, whichever of the other rank's states it may
        # have seen there (a step being published is either one)
        bad, why = 0, []
        for a, lg in enumerate(logs):
            for t, name in lg["evictions"]:
                shard = by_name[name]
                for b, other in enumerate(logs):
                    if b == a or t > other["end"]:
                        continue
                    plans = [p for p in other["plans"] if p[0] <= t]
                    if not plans or plans[-1][1] > t:
                        continue  # no plan yet, or a new plan being published
                    per_step = plans[-1][2]
                    steps = [s for s in other["steps"] if s[0] >= plans[-1][1] and s[0] <= t]
                    if not steps:
                        continue
                    maybe = [steps[-1][2]] + ([steps[-2][2]] if steps[-1][1] > t and len(steps) > 1 else [])
                    if all(any(shard in per_step[k] for k in range(cur, min(cur + 2, len(per_step))))
                           for cur in maybe):
                        bad += 1
                        why.append((a, b, shard, maybe, [per_step[k] for k in range(maybe[0], min(maybe[0] + 2, len(per_step)))],
                                    round(t - steps[-1][1], 4)))
        assert bad == 0, f"{bad} evictions of a shard another rank read now or next: {why}"
    finally:
        srv.kill()
