"""The four stages of ReinforcedLoader, each built from its plain config (no loader):
plan (fastload.loader.plan), gather, render, deliver; and loader.stats()."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import fastload
from _ddp_loader_worker import write_dataset
from fastload.loader.deliver import Deliver, DeliverConfig, LoaderStats
from fastload.loader.gather import Gather, GatherConfig
from fastload.loader.plan import Plan, PlanConfig
from fastload.loader.render import Render, RenderConfig


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return fastload.ReinforcedDataset(write_dataset(str(tmp_path_factory.mktemp("st") / "d"), n=23))


@pytest.fixture(scope="module")
def bad_ds(tmp_path_factory):
    return fastload.ReinforcedDataset(write_dataset(str(tmp_path_factory.mktemp("bad") / "d"), n=12,
                                                    corrupt=(3,)))


# ------------------------------------------------------------------ plan
def _cfg(**kw):
    base = dict(num_samples=23, seed=3, shuffle=True, batch_size=4, drop_last=False, image_size=(16, 16))
    return PlanConfig(**{**base, **kw})


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_plan_ranks_partition_each_global_batch(drop_last, world):
    plan = Plan(_cfg(drop_last=drop_last))
    per_rank = [list(plan.steps(1, 0, r, world)) for r in range(world)]
    n = plan.num_steps(1, world)
    assert all(len(p) == n for p in per_rank)
    order = plan.global_order(1)
    assert sorted(order.tolist()) == list(range(23))
    for t in range(n):
        gidx, _ = plan.global_batch(1, t, 0, world)
        got = np.concatenate([per_rank[r][t][1] for r in range(world)])
        assert got.tolist() == gidx.tolist()  # rank slices, in rank order, are the global batch
        assert len({len(per_rank[r][t][1]) for r in range(world)}) == 1  # same shape on every rank
    seen = np.concatenate([idx for p in per_rank for _, idx, _ in p])
    if drop_last:
        assert len(seen) == n * 4 * world and len(set(seen.tolist())) == len(seen)
    else:
        assert set(seen.tolist()) == set(range(23))  # the wrap pads, never drops
    # resuming at a step yields the same remaining steps
    assert [s for s, _, _ in plan.steps(1, 2, 0, world)] == list(range(2, n))


def test_plan_order_depends_on_seed_and_epoch_only():
    a, b = Plan(_cfg()), Plan(_cfg(batch_size=8))
    assert a.global_order(4).tolist() == b.global_order(4).tolist()
    assert a.global_order(4).tolist() != a.global_order(5).tolist()
    assert Plan(_cfg(shuffle=False)).global_order(0).tolist() == list(range(23))


def test_plan_drives_samplers_through_their_public_api():
    vbs = fastload.VariableBatchSampler(23, base_size=(32, 32), base_batch_size=4, min_size=(16, 16),
                                        max_size=(48, 48), num_scales=3, seed=1, rank=0, world_size=1)
    plan = Plan(_cfg(batch_size=None, batch_sampler=vbs))
    steps = list(plan.steps(2, 1, 0, 1))
    vbs.set_epoch(2)
    ref = [(idx.tolist(), (h, w)) for idx, h, w in vbs.iter_arrays()][1:]
    assert [(i.tolist(), hw) for _, i, hw in steps] == ref
    assert [s for s, _, _ in steps] == list(range(1, len(ref) + 1))
    # a plain batch sampler is re-iterated and skipped to the position
    plain = Plan(_cfg(batch_size=None, batch_sampler=[[0, 1], [2, 3], [4, 5]]))
    assert [(s, i.tolist()) for s, i, _ in plain.steps(0, 1, 0, 1)] == [(1, [2, 3]), (2, [4, 5])]
    with pytest.raises(ValueError, match="batch_sampler yielded index 99"):
        list(Plan(_cfg(batch_size=None, batch_sampler=[[0, 99]])).steps(0, 0, 0, 1))


def test_plan_hands_a_remote_cache_its_steps():
    class Cache:
        def __init__(self):
            self.planned, self.at = None, []

        def plan_steps(self, steps):
            self.planned = [s.tolist() for s in steps]

        def at_step(self, k):
            self.at.append(k)

    cache = Cache()
    starts = np.array([0, 10, 20], np.int64)
    plan = Plan(_cfg(shuffle=False, batch_size=5), cache=cache, shard_starts=starts)
    it = plan.steps(0, 0, 0, 1)
    assert cache.planned == [[0], [0], [1], [1], [2]]  # the shards of each step, planned up front
    assert [s for s, _, _ in it] == [0, 1, 2, 3, 4] and cache.at == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------ gather
def _gather(ds, **kw):
    base = dict(seed=3, kind="classification", views=1, num_augmentations=ds.num_augmentations,
                aug_choice="random", p_reinforced=1.0, num_classes=ds.num_classes,
                target_format="dense", target_mode="smooth")
    cfg = GatherConfig(**{**base, **kw})
    plan = Plan(_cfg())
    return Gather(cfg, ds, np.asarray(ds.labels), plan, lambda: (0, 1))


def test_gather_records_targets_and_labels(ds):
    g = _gather(ds)
    idx = np.array([4, 0, 7], np.int64)
    prep = g.prepare(0, 0, idx, (16, 16))
    assert prep["rows"].tolist() == [4, 0, 7] and len(prep["sources"]) == 3
    assert prep["labels"].tolist() == np.asarray(ds.labels)[[4, 0, 7]].tolist()
    assert prep["tgt"].shape == (3, ds.num_classes)
    assert torch.allclose(prep["tgt"].sum(1), torch.ones(3))
    aug = g.aug_ids(0, prep["rows"], np.zeros(3, np.int64))
    for r, a, rec in zip(idx, aug, prep["recs"]):  # the replayed record is the stored one
        assert ds.augs(int(r))[int(a)].tobytes() == rec.tobytes()
    again = _gather(ds).prepare(0, 0, idx, (16, 16))
    assert torch.equal(again["tgt"], prep["tgt"]) and (again["recs"] == prep["recs"]).all()
    topk = _gather(ds, target_format="topk").prepare(0, 0, idx, (16, 16))
    assert isinstance(topk["tgt"], tuple) and topk["tgt"][0].dtype == torch.int64


def test_gather_fresh_rows_have_one_hot_targets(ds):
    g = _gather(ds, p_reinforced=0.0)
    step, idx, hw = list(g.plan.steps(1, 0, 0, 1))[2]
    prep = g.prepare(1, step, idx, hw)
    labels = torch.from_numpy(prep["labels"])
    assert torch.equal(prep["tgt"], torch.nn.functional.one_hot(labels, ds.num_classes).float())
    assert (prep["recs"]["partner"] == -1).all()


# ------------------------------------------------------------------ render
def _render(ds, gather, on_error="raise"):
    cfg = RenderConfig(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear",
                       dct_scale=False, threads=2, views=1, on_error=on_error, dtype=torch.float32,
                       num_samples=len(ds))
    return Render(cfg, ds, gather)


def test_render_matches_the_reference(ds):
    from fastload.replay.reference import render_reference
    from test_loader import _decode

    g = _gather(ds)
    every = g.prepare(0, 0, np.arange(len(ds), dtype=np.int64), (16, 16))
    alone = np.flatnonzero(every["recs"]["partner"] < 0)[:2]  # the reference renders one image
    prep = g.prepare(0, 0, alone.astype(np.int64), (16, 16))
    out, labels, tgt, culprits = _render(ds, g)(prep, lambda shape: torch.empty(shape))
    assert out.shape == (2, 3, 16, 16) and culprits == []
    ref = torch.stack([render_reference(_decode(ds.image_bytes(int(i))), r, size=(16, 16), mean=(0.5,) * 3,
                                        std=(0.25,) * 3, interpolation="bilinear")
                       for i, r in zip(alone, prep["recs"])])
    assert ((out - ref).abs() * 0.25 * 255).mean() < 0.5


def test_render_error_recovery(bad_ds):
    g = _gather(bad_ds)
    idx = np.array([2, 3, 4], np.int64)
    with pytest.raises(RuntimeError, match=r"cannot render sample id\(s\) \[3"):
        _render(bad_ds, g)(g.prepare(0, 0, idx, (16, 16)), lambda s: torch.empty(s))
    prep = g.prepare(0, 0, idx, (16, 16))
    out, labels, tgt, culprits = _render(bad_ds, g, "skip")(prep, lambda s: torch.empty(s))
    assert 3 in culprits and out.shape == (3, 3, 16, 16)
    assert torch.isfinite(out).all()
    # every row failed: a substitute sample is rendered instead (deterministic)
    only_bad = g.prepare(0, 0, np.array([3], np.int64), (16, 16))
    a = _render(bad_ds, g, "skip")(only_bad, lambda s: torch.empty(s))
    b = _render(bad_ds, g, "skip")(g.prepare(0, 0, np.array([3], np.int64), (16, 16)), lambda s: torch.empty(s))
    assert torch.equal(a[0], b[0]) and a[3] == [3]


def test_render_submit_equals_render_now(ds, bad_ds):
    """Render.submit (the batch queued on the native runner, as the render thread does)
    gives what rendering at once gives, error recovery included."""
    for d, idx in ((ds, np.arange(8)), (bad_ds, np.array([2, 3, 4]))):
        g = _gather(d)
        for on_error in ("skip", "raise"):
            r = _render(d, g, on_error)
            preps = [g.prepare(0, k, idx.astype(np.int64), (16, 16)) for k in range(2)]
            try:
                now = r(preps[0], lambda s: torch.empty(s))
            except RuntimeError as e:
                now = e
            handles = [r.submit(p, lambda s: torch.full(s, float("nan"))) for p in preps]
            for h in handles:
                try:
                    got = h.result()
                except RuntimeError as e:
                    assert isinstance(now, RuntimeError) and str(e) == str(now)
                    continue
                assert torch.equal(got[0], now[0]) and got[3] == now[3]
                assert np.array_equal(got[1], now[1])


def test_render_stage_does_not_hold_a_batch_back_for_a_slow_gather(ds):
    """The render thread queues the next batch before waiting for the current one only when
    the next is already gathered: a slow gather (a cold remote shard) never delays a
    rendered batch."""
    L = fastload.ReinforcedLoader(ds, batch_size=5, image_size=16, num_workers=2)
    release = threading.Event()
    prepare = L._gather.prepare

    def slow(epoch, step, *a, **k):
        if step == 1:
            assert release.wait(60)
        return prepare(epoch, step, *a, **k)

    L._gather.prepare = slow
    it = iter(L)
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("first", next(it)))
    t.start()
    t.join(20)
    try:
        assert "first" in got, "batch 0 was held back while batch 1 was being gathered"
    finally:
        release.set()
    assert len(list(it)) == len(L) - 1


# ------------------------------------------------------------------ deliver
def test_deliver_counts_hooks_and_buffers():
    from fastload.loader import _args

    _, hooks = _args.dataloader_args(2, None, 0, None, None, 0, "", None, True)
    d = Deliver(DeliverConfig(kind="classification", dtype=torch.float32, pin_memory=False,
                              reuse_buffers=False, prefetch_factor=2), hooks)
    bufs = d.buffers()
    out = bufs((2, 3, 4, 4))
    out.fill_(1.0)
    host = (out, np.array([1, 2]), torch.zeros(2, 5), [7, 7])
    x, y, t = d(host)
    assert x.data_ptr() == out.data_ptr() and y.tolist() == [1, 2]
    d((out, np.array([1, 2]), torch.zeros(2, 5), [7, 8]))
    assert d.skipped == 4 and d.skipped_ids == [7, 8]  # rows replaced; each sample once
    held = bufs((2, 3, 4, 4))  # a caller-held buffer is never handed out again
    assert held.data_ptr() != x.data_ptr()
    _, hooks = _args.dataloader_args(2, None, 0, lambda b: ("collated", len(b)), None, 0, "", None, True)
    d2 = Deliver(DeliverConfig("classification", torch.float32, False, False, 2), hooks)
    assert d2((out, np.array([1, 2]), torch.zeros(2, 5), [])) == ("collated", 3)


# ------------------------------------------------------------------ stats
@pytest.mark.parametrize("nw", [0, 2])
def test_loader_stats(ds, nw):
    L = fastload.ReinforcedLoader(ds, batch_size=5, image_size=16, num_workers=nw)
    seen = {}

    def loop():
        for k, _ in enumerate(L):
            if k == 1:
                seen["live"] = L.stats()

    t = threading.Thread(target=loop)
    t.start()
    t.join()
    st = L.stats()
    assert isinstance(st, LoaderStats)
    n = len(L)
    assert [st.stages[s].items for s in ("gather", "render", "deliver")] == [n, n, n]
    assert all(st.stages[s].seconds > 0 for s in ("gather", "render", "deliver"))
    assert st.stages["render"].ms_per_item > 0
    text = str(st)
    assert all(name in text for name in ("plan", "gather", "render", "deliver"))
    if nw:
        depth, cap = seen["live"].queues["rendered"]
        assert 0 <= depth <= cap == 1 and "gathered" in seen["live"].queues
    else:
        assert seen["live"].queues == {}
    L.reset_stats()
    assert L.stats().stages["render"].items == 0
