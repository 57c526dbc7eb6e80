"""Elastic determinism (issue 12 item 3): the global order depends on (seed, epoch) only; a
global batch is batch_size * world_size consecutive samples of it, rank r takes its slice;
a state saved by any rank at world size W1 resumes every rank at W2 (same global batch size)
with no sample seen twice or missed in that epoch, and the same bytes as a W = 1 run.
Ranks are simulated in one process with rank=/world_size= arguments."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import fastload
from fastload.batch.buckets import BucketBatchSampler
from fastload.loader.reinforced import ReinforcedLoader

from _ddp_loader_worker import write_dataset

WORLDS = (1, 2, 3, 4)
PAIRS = list(itertools.product(WORLDS, WORLDS))
G = 12  # global batch size, divisible by every world size


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return fastload.ReinforcedDataset(write_dataset(str(tmp_path_factory.mktemp("el") / "d"), n=48))


@pytest.fixture(scope="module")
def images23(tmp_path_factory):
    return fastload.ReinforcedDataset(write_dataset(str(tmp_path_factory.mktemp("el23") / "d"), n=23))


def _rl(ds, W, r, **kw):
    kw = {"shuffle": True, "seed": 9, "image_size": 8, "num_workers": 0, "p_reinforced": 0.6, **kw}
    return ReinforcedLoader(ds, batch_size=G // W, rank=r, world_size=W, **kw)


def _rank_batches(loaders, state=None, epoch=0):
    """Per step, the global batch put back together: rank slices concatenated in rank order
    (rows, images); the ranks' steps and shapes must agree."""
    its = []
    for L in loaders:
        if state is not None:
            L.load_state_dict(state)
        L.set_epoch(epoch)
        its.append(iter(L))
    out = []
    for step in zip(*its):
        shapes = {tuple(b[0].shape) for b in step}
        assert len(shapes) == 1, shapes
        out.append(tuple(torch.cat([b[k] for b in step]) for k in range(3)))
    for it in its:  # every rank ended at the same step
        with pytest.raises(StopIteration):
            next(it)
    return out


def _ids(loader, epoch, start):
    return [idx for _, idx, _ in loader._plan(epoch, start)]


@pytest.mark.parametrize("w1,w2", PAIRS)
def test_reinforced_loader_elastic_resume(images, w1, w2):
    ref = _rank_batches([_rl(images, 1, 0)])  # W = 1: the global batches
    assert len(ref) == 48 // G
    n = len(ref)
    for cut in range(n + 1):
        first = [_rl(images, w1, r) for r in range(w1)]
        its = [iter(L) for L in first]
        for _ in range(cut):
            for it in its:
                next(it)
        states = [L.state_dict() for L in first]
        assert all(s == states[0] for s in states)  # the global position, same on every rank
        state = states[w1 - 1]  # any rank's state resumes every new rank
        if cut == n:  # the last batch completed the pass: the state is the next epoch's start
            assert (state["epoch"], state["step"]) == (1, 0)
            continue
        second = [_rl(images, w2, r) for r in range(w2)]
        got = _rank_batches(second, state)
        assert len(got) == n - cut
        for a, b in zip(got, ref[cut:]):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
        # ids: what W1 served before the cut and W2 after it cover the epoch once each
        ids = [np.concatenate([_ids(L, 0, 0)[t] for L in first]) for t in range(cut)]
        ids += [np.concatenate([_ids(L, 0, cut)[t - cut] for L in second]) for t in range(cut, n)]
        flat = np.concatenate(ids)
        assert len(flat) == len(set(flat.tolist())) == 48  # 0 duplicates, 0 missing


@pytest.mark.parametrize("w", WORLDS)
@pytest.mark.parametrize("drop_last", [False, True])
def test_last_partial_global_batch_rule(images23, w, drop_last):
    """23 samples, global batch 12: one full global batch, then 11 left: dropped, or padded by
    wrapping to the start of the order up to w * ceil(11 / w), ceil(11 / w) rows per rank."""
    order = fastload.batch.sharding.epoch_permutation(23, 9, 0)
    loaders = [_rl(images23, w, r, drop_last=drop_last) for r in range(w)]
    assert len({len(L) for L in loaders}) == 1
    per_rank = [_ids(L, 0, 0) for L in loaders]
    steps = [np.concatenate(s) for s in zip(*per_rank)]
    assert np.array_equal(steps[0], order[:G])
    if drop_last:
        assert len(steps) == 1
        return
    last = -(-11 // w)
    assert len(steps) == 2 and {len(p[1]) for p in per_rank} == {last}
    assert np.array_equal(steps[1], np.concatenate([order[G:], order[:last * w - 11]]))
    batches = _rank_batches(loaders)
    assert [b[0].shape[0] for b in batches] == [G, last * w]


def test_elastic_state_errors(images, images23):
    L = _rl(images, 2, 0)
    it = iter(L)
    next(it)
    st = L.state_dict()
    with pytest.raises(ValueError, match="global_batch_size"):
        ReinforcedLoader(images, batch_size=5, world_size=2, rank=1, shuffle=True, seed=9).load_state_dict(st)
    with pytest.raises(ValueError, match="seed"):
        _rl(images, 3, 1, seed=10).load_state_dict(st)
    with pytest.raises(ValueError, match="num_samples"):
        _rl(images23, 2, 0).load_state_dict(st)
    _rl(images, 4, 3).load_state_dict(st)  # another world size with the same global batch: fine
    with pytest.raises(ValueError, match="step 9 is past the end"):
        _rl(images, 4, 3).load_state_dict({**st, "step": 9})


def test_global_order_hook(images):
    """A sampler with global_order(epoch) gives the order; the elastic rules stay."""
    class Blocks:
        def global_order(self, epoch):
            return np.arange(48, dtype=np.int64)[::-1].copy() if epoch == 0 else np.arange(24, dtype=np.int64)

    L = ReinforcedLoader(images, batch_size=4, sampler=Blocks(), rank=1, world_size=3, image_size=8)
    assert len(L) == 4
    assert [idx.tolist() for idx in _ids(L, 0, 0)][0] == [43, 42, 41, 40]
    L.set_epoch(1)
    assert len(L) == 2 and _ids(L, 1, 0)[1].tolist() == [16, 17, 18, 19]
    batches = list(L)
    assert len(batches) == 2 and L.epoch == 2
    bad = ReinforcedLoader(images, batch_size=4, sampler=type("S", (), {"global_order": lambda s, e: [0, 48]})(),
                           image_size=8)
    with pytest.raises(ValueError, match="global_order yielded index 48"):
        list(bad)


# ------------------------------------------------------------------------ decomposition
T = 12 * 64  # global tokens per step: per rank T / W, a multiple of the longest bucket (64)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("dd") / "d")
    toks = np.random.default_rng(1).integers(0, 256, 30000).astype(np.int32)
    fastload.decompose((toks, np.arange(0, 30001, 500)), d, min_bucket=4, max_bucket=6,
                       vocab_size=257, eot_id=256, progress=False)
    return d


def _dl(path, W, r):
    return fastload.DecompositionLoader(path, tokens_per_step=T // W, seed=3, cycles=2, rank=r,
                                        world_size=W, pin_memory=False)


def _dl_steps(loaders, state=None):
    its = []
    for L in loaders:
        if state is not None:
            L.load_state_dict(state)
        L.set_epoch(0)
        its.append(iter(L))
    out = []
    for step in zip(*its):
        assert len({tuple(x.shape) for x, _ in step}) == 1  # same bucket and shape on every rank
        out.append((torch.cat([x for x, _ in step]), torch.cat([y for _, y in step])))
    for it in its:
        with pytest.raises(StopIteration):
            next(it)
    return out


@pytest.mark.parametrize("w1,w2", PAIRS)
def test_decomposition_loader_elastic_resume(tokens, w1, w2):
    ref = _dl_steps([_dl(tokens, 1, 0)])
    n = len(ref)
    assert n >= 10
    for cut in sorted({0, 1, n // 2, n - 1, n}):
        first = [_dl(tokens, w1, r) for r in range(w1)]
        its = [iter(L) for L in first]
        for _ in range(cut):
            for it in its:
                next(it)
        states = [L.state_dict() for L in first]
        assert all(s == states[0] for s in states)
        if cut == n:  # the last batch completed the pass: the state is the next epoch's start
            assert (states[-1]["epoch"], states[-1]["step"]) == (1, 0)
            continue
        got = _dl_steps([_dl(tokens, w2, r) for r in range(w2)], states[-1])
        assert len(got) == n - cut
        for (x, y), (rx, ry) in zip(got, ref[cut:]):
            assert torch.equal(x, rx) and torch.equal(y, ry)


def test_bucket_sampler_elastic_rows_once():
    rows = {4: 500, 5: 200, 6: 90}
    ref = [(k, r.tolist()) for k, r in BucketBatchSampler(rows, T, cycles=2, seed=3)]
    n = len(ref)
    for w1, w2 in PAIRS:
        for cut in (0, 1, n // 3, n - 1, n):
            a = [BucketBatchSampler(rows, T // w1, cycles=2, seed=3, rank=r, world_size=w1) for r in range(w1)]
            its = [iter(s) for s in a]
            served = []
            for _ in range(cut):
                step = [next(it) for it in its]
                assert len({k for k, _ in step}) == 1
                served.append((step[0][0], np.concatenate([r for _, r in step]).tolist()))
            st = a[0].state_dict()
            if cut == n:  # the last batch completed the pass: the state is the next epoch's start
                assert (st["epoch"], st["step"]) == (1, 0) and served == ref
                continue
            b = [BucketBatchSampler(rows, T // w2, cycles=2, seed=3, rank=r, world_size=w2) for r in range(w2)]
            for s in b:
                s.load_state_dict(st)
            for step in zip(*b):
                assert len({k for k, _ in step}) == 1 and len({len(r) for _, r in step}) == 1
                served.append((step[0][0], np.concatenate([r for _, r in step]).tolist()))
            assert served == ref, (w1, w2, cut)
            flat = [(k, i) for k, rs in served for i in rs]
            assert len(flat) == len(set(flat))  # 0 duplicates; == ref: 0 missing
