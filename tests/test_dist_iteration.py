"""Issue 18, distributed correctness: rank and world size are read when iteration starts
(never frozen at construction); WORLD_SIZE > 1 without a process group is an error, not a
silent world of 1; collectives run only on the caller's thread."""
from __future__ import annotations

import json
import socket
import threading

import numpy as np
import pytest
import torch.multiprocessing as mp

import fastload
from fastload.batch.mixing import StreamMixer
from fastload.batch.sharding import ShardedSampler
from fastload.batch.shuffle import BlockShuffleSampler
from fastload.batch.tic import TiCSampler
from _ddp_loader_worker import write_dataset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("d") / "ds"), n=16)


# ------------------------------------------------------------------ WORLD_SIZE without a group
def test_world_size_env_without_group_raises(root, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    from _late_init_worker import build

    objs = build(root)  # construction is fine: nothing is read yet
    ds = fastload.ReinforcedDataset(root)
    objs["tic"] = TiCSampler([8, 8], time_step=1, policy="cumulative-all", budget=8,
                                      global_batch_size=4)
    objs["block"] = BlockShuffleSampler(ds, seed=0).batch_sampler(4, dataset=ds)
    toks = np.random.default_rng(0).integers(0, 256, 4000).astype(np.int32)
    fastload.decompose((toks, np.arange(0, 4001, 500)), str(tmp_path / "tok"), min_bucket=4, max_bucket=6,
                       vocab_size=257, eot_id=256, progress=False)
    objs["decomposition"] = fastload.DecompositionLoader(str(tmp_path / "tok"), tokens_per_step=64,
                                                         pin_memory=False)
    for name, obj in objs.items():
        with pytest.raises(RuntimeError, match="init_process_group") as e:
            next(iter(obj))
        assert "WORLD_SIZE=2" in str(e.value) and "rank=" in str(e.value), name


def test_explicit_rank_world_size_or_world_one_iterate(root, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    L = fastload.ReinforcedLoader(root, batch_size=2, image_size=8, rank=1, world_size=2)
    assert len(list(L)) == 4 and L.world_size == 2
    L1 = fastload.ReinforcedLoader(root, batch_size=2, image_size=8, world_size=1)
    assert len(list(L1)) == 8
    s = ShardedSampler(16, rank=0, world_size=2)
    assert len(list(s)) == 8


def test_world_size_read_when_iterating(root, monkeypatch):
    """The same objects follow the process group that exists when they are iterated."""
    import torch.distributed as dist

    from _late_init_worker import build

    objs = build(root)
    assert objs["loader"].world_size == 1 and len(objs["loader"]) == 8
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    L = objs["loader"]
    assert (L.rank, L.world_size, len(L)) == (1, 2, 4)
    ref = fastload.ReinforcedLoader(root, batch_size=2, shuffle=True, image_size=8, seed=3, rank=1, world_size=2)
    from _late_init_worker import digests

    assert digests(L) == digests(ref)
    s = objs["sharded"]
    assert list(s) == list(ShardedSampler(16, seed=1, rank=1, world_size=2))
    m = objs["mixer"]
    ref_m = StreamMixer({"a": 16}, [1.0], epoch_size=16, global_batch_size=4, rank=1, world_size=2)
    assert [b.tolist() for b in m] == [b.tolist() for b in ref_m]


# ------------------------------------------------------------------ collectives' thread
@pytest.mark.parametrize("nw", [0, 2])
def test_check_shapes_collectives_run_on_the_calling_thread(root, monkeypatch, nw):
    """VariableBatchSampler(check_shapes=True) driven by a loader with a prefetch thread: every
    agreement check runs on the thread iterating the loader, none on the prefetch thread."""
    import fastload._dist as D
    import fastload.batch.variable as V

    seen = []

    def record(values, what):
        seen.append((threading.current_thread(), what))

    def record_mm(values, what):
        record(values, what)
        return None

    monkeypatch.setattr(V, "check_same_across_ranks", record)
    monkeypatch.setattr(V, "min_max_across_ranks", record_mm)
    monkeypatch.setattr(D, "check_same_across_ranks", record)
    s = fastload.VariableBatchSampler(16, base_size=16, base_batch_size=2, min_size=8, max_size=16,
                                      num_scales=2, divisible_by=8, seed=0, check_shapes=True)
    L = fastload.ReinforcedLoader(root, batch_sampler=s, num_workers=nw)
    caller = []

    def run():
        caller.append(threading.current_thread())
        for _ in range(2):
            list(L)

    t = threading.Thread(target=run, name="training-loop")
    t.start()
    t.join()
    assert seen, "the check never ran"
    assert {th for th, _ in seen} == set(caller), [(th.name, w) for th, w in seen]
    assert any("epoch plan" in w for _, w in seen)


def test_collective_from_a_background_thread_is_refused(monkeypatch):
    import torch.distributed as dist

    import fastload._dist as D

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    errors = []

    def body():
        try:
            D.check_same_across_ranks([1], "a test value")
        except RuntimeError as e:
            errors.append(str(e))

    from fastload._threads import start_thread

    start_thread(body, (), None, name="fastload-test").join()
    assert errors and "background thread" in errors[0]


def test_plan_digest_covers_every_step_shape():
    from fastload.batch.variable import _plan_digest

    a = fastload.VariableBatchSampler(64, 32, 4, 16, 48, num_scales=3, divisible_by=8, seed=0)
    b = fastload.VariableBatchSampler(64, 32, 4, 16, 48, num_scales=3, divisible_by=8, seed=1)
    assert _plan_digest(a._plan(0)) == _plan_digest(a._plan(0))
    assert a.steps(0).tolist() != b.steps(0).tolist()
    assert _plan_digest(a._plan(0)) != _plan_digest(b._plan(0))


# ------------------------------------------------------------------ 2 real processes
@pytest.mark.slow  # two spawned processes importing torch
@pytest.mark.timeout(180)
def test_loader_built_before_init_process_group_shards(tmp_path, root):
    """torchrun-style env, loaders built before the group: iterating before init raises;
    after init every rank gets its own shard (disjoint, equal to an explicit-rank loader's)."""
    from _late_init_worker import worker

    mp.spawn(worker, args=(2, _free_port(), root, str(tmp_path)), nprocs=2, join=True)
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in res:
        assert all(e is not None and "init_process_group" in e for e in r["errors"].values()), r["errors"]
        assert set(r["world"].values()) == {2}
        assert r["len"] == 4
    assert not set(res[0]["loader"]) & set(res[1]["loader"])  # no duplicated batch
    assert not set(res[0]["sharded"]) & set(res[1]["sharded"])
    assert sorted(res[0]["sharded"] + res[1]["sharded"]) == list(range(16))
    m0 = np.concatenate(res[0]["mixer"]).tolist()
    m1 = np.concatenate(res[1]["mixer"]).tolist()
    assert not set(m0) & set(m1) and len(m0) == len(m1) == 8
    from _late_init_worker import digests

    for rank in range(2):
        ref = fastload.ReinforcedLoader(root, batch_size=2, shuffle=True, image_size=8, seed=3,
                                        rank=rank, world_size=2)
        assert res[rank]["loader"] == digests(ref)
        vbs = fastload.VariableBatchSampler(16, base_size=16, base_batch_size=2, min_size=8, max_size=16,
                                            num_scales=2, divisible_by=8, seed=0, rank=rank, world_size=2)
        assert res[rank]["vloader"] == digests(fastload.ReinforcedLoader(root, batch_sampler=vbs))
    assert res[0]["vloader"] != res[1]["vloader"]
