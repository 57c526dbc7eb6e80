"""ReinforcedLoader and index sharding, on real small reinforced datasets (real JPEGs written
with the format's writer) and the real C++ replay kernel; pixels are checked against the
plain-PyTorch reference of the replay (fastload/replay/reference.py)."""
from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import torch

import fastload
from fastload.batch.sharding import ShardedSampler, epoch_permutation, shard_indices
from fastload._state import SupersededError
from fastload.format.reader import ReinforcedDataset
from fastload.loader.reinforced import ReinforcedLoader
from fastload.losses import densify
from fastload.sample import params as P

from _ddp_loader_worker import write_dataset

S = 16  # output size: small keeps the tests fast


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return ReinforcedDataset(write_dataset(str(tmp_path_factory.mktemp("cls") / "d"), n=23))


@pytest.fixture(scope="module")
def bad_ds(tmp_path_factory):
    return ReinforcedDataset(write_dataset(str(tmp_path_factory.mktemp("bad") / "d"), n=12, corrupt=(5,)))


@pytest.fixture(scope="module")
def text_ds(tmp_path_factory):
    return ReinforcedDataset(write_dataset(str(tmp_path_factory.mktemp("txt") / "d"), n=11,
                                           kind="image_text"))


def _loader(ds, **kw):
    kw.setdefault("image_size", S)
    kw.setdefault("batch_size", 5)
    return ReinforcedLoader(ds, **kw)


def _plan_rows(loader, epoch=None):
    """Per batch: (rows, aug ids) the loader is meant to use (recomputed from its plan)."""
    epoch = loader.epoch if epoch is None else epoch
    out = []
    for _, idx, hw in loader._plan(epoch, 0):
        rows = np.repeat(idx, loader.views)
        views = np.tile(np.arange(loader.views), len(idx))
        out.append((rows, loader._aug_ids(epoch, rows, views), hw))
    return out


def _decode(buf) -> np.ndarray:
    from PIL import Image

    return np.array(Image.open(io.BytesIO(bytes(buf))).convert("RGB"))


def _ref_rows(ds, rows, augs, hw, loader):
    from fastload.replay.reference import render_reference

    _, recs, _, _ = ds.gather(rows, augs)
    out = []
    for i, rec in zip(rows, recs):
        partner = _decode(ds.image_bytes(int(rec["partner"]))) if rec["partner"] >= 0 else None
        out.append(render_reference(_decode(ds.image_bytes(int(i))), rec, size=hw, partner_img=partner,
                                    mean=loader.mean, std=loader.std, interpolation=loader.interpolation))
    return torch.stack(out)


def _all(loader):
    return [tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in b) for b in loader]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            if isinstance(u, torch.Tensor):
                assert u.dtype == v.dtype and torch.equal(u, v)
            else:
                assert u == v


# ------------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("n,world", [(10, 3), (9, 3), (2, 3), (23, 4), (1, 1)])
@pytest.mark.parametrize("pad", [True, False])
def test_sharded_sampler_partition(n, world, pad):
    parts = []
    for r in range(world):
        s = ShardedSampler(n, shuffle=True, seed=4, rank=r, world_size=world, pad=pad)
        s.set_epoch(3)
        parts.append(list(s))
        assert len(parts[-1]) == len(s)
    assert len({len(p) for p in parts}) == 1  # every rank the same count
    flat = np.concatenate([np.array(p, dtype=np.int64) for p in parts])
    order = epoch_permutation(n, 4, 3)
    if pad:
        assert set(flat.tolist()) == set(range(n))
        assert len(flat) == -(-n // world) * world
        # the padding repeats the first indices of the epoch's order
        extra = len(flat) - n
        counts = np.bincount(flat, minlength=n)
        assert sorted(np.flatnonzero(counts == 2).tolist()) == sorted(order[:extra].tolist())
    else:
        assert len(set(flat.tolist())) == len(flat) == n - n % world


def test_sharded_sampler_deterministic_and_resume():
    a = ShardedSampler(50, seed=1, rank=0, world_size=2)
    a.set_epoch(0)
    e0 = list(a)
    a.set_epoch(1)
    e1 = list(a)
    assert e0 != e1
    b = ShardedSampler(50, seed=1, rank=0, world_size=2)
    b.set_epoch(1)
    it = iter(b)
    head = [next(it) for _ in range(7)]
    st = b.state_dict()
    c = ShardedSampler(50, seed=1, rank=0, world_size=2)
    c.load_state_dict(st)
    assert head + list(c) == e1 and c.epoch == 2  # a complete pass moves to the next epoch
    d = ShardedSampler(50, seed=1, rank=0, world_size=2)
    d.set_epoch(1)
    it = iter(d)
    next(it)
    assert list(d) == e1[1:]  # a new iter() continues at the position and supersedes `it`
    with pytest.raises(SupersededError):
        next(it)
    assert ShardedSampler(50, shuffle=False, world_size=2, rank=1).indices().tolist() == list(range(1, 50, 2))
    with pytest.raises(ValueError, match="seed"):
        ShardedSampler(50, seed=2, rank=0, world_size=2).load_state_dict(st)
    with pytest.raises(ValueError, match="rank"):
        ShardedSampler(5, rank=3, world_size=2)


def test_shard_indices_matches_distributed_sampler():
    from torch.utils.data.distributed import DistributedSampler

    for n, world in [(10, 3), (7, 4)]:
        for r in range(world):
            ds = DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=False)
            assert shard_indices(np.arange(n), r, world).tolist() == list(ds)


# ------------------------------------------------------------------------------- basics
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.uint8])
def test_shapes_dtypes_and_labels(ds, dtype):
    L = _loader(ds, shuffle=True, dtype=dtype, image_size=(S, S + 4), num_workers=2)
    plan = _plan_rows(L)
    batches = _all(L)
    assert len(batches) == len(L) == 5  # ceil(23 / 5)
    for (images, labels, targets), (rows, _, _) in zip(batches, plan):
        assert images.dtype == dtype and images.shape == (len(rows), 3, S, S + 4)
        assert labels.dtype == torch.int64 and labels.tolist() == ds.labels[rows].tolist()
        assert targets.dtype == torch.float32 and targets.shape == (len(rows), ds.num_classes)
        torch.testing.assert_close(targets.sum(1), torch.ones(len(rows)), atol=1e-3, rtol=0)
    assert sorted(np.concatenate([r for r, _, _ in plan]).tolist()) == list(range(len(ds)))
    assert len(_loader(ds, drop_last=True)) == 4 == len(_all(_loader(ds, drop_last=True)))


def test_device_and_pin_memory_args(ds):
    ref = _all(_loader(ds, shuffle=True))
    if not torch.cuda.is_available():
        with pytest.warns(UserWarning, match="pin_memory"):
            L = _loader(ds, shuffle=True, pin_memory=True, device="cpu", num_workers=2)
    else:
        L = _loader(ds, shuffle=True, pin_memory=True, device="cuda", num_workers=2, reuse_buffers=True)
    got = [tuple(t.cpu() for t in b) for b in L]
    _same(ref, got)


def test_pixels_match_reference(ds):
    """Each row is the replay of the stored record the loader says it picked."""
    L = _loader(ds, shuffle=True, seed=7, num_workers=2, dct_scale=False, batch_size=8)
    plan = _plan_rows(L)
    for (images, _, _), (rows, augs, hw) in zip(L, plan[:2]):
        ref = _ref_rows(ds, rows, augs, hw, L)
        # two JPEG decoders (libjpeg vs Pillow) and uint8 rounding: within ~2 levels
        err = (images - ref).abs() * torch.tensor(L.std).view(1, 3, 1, 1) * 255
        assert err.mean() < 0.1 and err.max() <= 3.0, (err.mean(), err.max())


def test_uint8_is_unnormalized_float(ds):
    a = _all(_loader(ds, shuffle=True, dtype=torch.uint8, num_workers=1))
    b = _all(_loader(ds, shuffle=True, dtype=torch.float32, num_workers=1))
    mean = torch.tensor(fastload.loader.reinforced.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(fastload.loader.reinforced.IMAGENET_STD).view(1, 3, 1, 1)
    for (u, _, _), (f, _, _) in zip(a, b):
        back = (u.float() / 255 - mean) / std
        assert ((back - f).abs() * std * 255).max() <= 1.01


def test_dense_and_topk_targets(ds):
    L = _loader(ds, shuffle=True, num_workers=0)
    T = _loader(ds, shuffle=True, num_workers=0, target_format="topk")
    plan = _plan_rows(L)
    for (_, _, dense), (_, _, (ids, probs)), (rows, augs, _) in zip(L, T, plan):
        ref_ids = np.stack([ds.target(int(i), int(j))[0] for i, j in zip(rows, augs)])
        ref_probs = np.stack([ds.target(int(i), int(j))[1] for i, j in zip(rows, augs)])
        assert ids.tolist() == ref_ids.tolist()
        assert torch.equal(probs, torch.from_numpy(ref_probs))
        ref = torch.as_tensor(densify(ref_ids, ref_probs, ds.num_classes, "smooth"))
        torch.testing.assert_close(dense, ref.float())


def test_aug_choice_uniform_and_epoch_mode(ds):
    L = _loader(ds, batch_size=23)
    counts = np.zeros(ds.num_augmentations)
    for e in range(40):
        (rows, augs, _), = _plan_rows(L, e)
        counts += np.bincount(augs, minlength=ds.num_augmentations)
    expected = counts.sum() / ds.num_augmentations
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected)  # uniform over N
    E = _loader(ds, batch_size=23, aug_choice="epoch")
    for e in range(3):
        (rows, augs, _), = _plan_rows(E, e)
        assert (augs == e % ds.num_augmentations).all()


# ------------------------------------------------------------------------------- p_reinforced
def test_p_reinforced_zero_one_hot_fresh(ds):
    L0 = _loader(ds, shuffle=True, p_reinforced=0.0, num_workers=2, dct_scale=False)
    L1 = _loader(ds, shuffle=True, p_reinforced=1.0, num_workers=2, dct_scale=False)
    b0, b1 = _all(L0), _all(L1)
    for (x0, y0, t0), (x1, y1, t1) in zip(b0, b1):
        assert torch.equal(y0, y1)
        assert torch.equal(t0, torch.nn.functional.one_hot(y0, ds.num_classes).float())
        assert not torch.equal(x0, x1)  # fresh augmentations, not the stored ones
    _same(b0, _all(_loader(ds, shuffle=True, p_reinforced=0.0, num_workers=0, dct_scale=False)))
    # the fresh records: sampled from the dataset's policy, mixing removed; rendered faithfully
    step, idx, hw = next(L0._plan(0, 0))
    recs = L0._gather._fresh(0, step, idx)
    assert (recs["partner"] == -1).all() and not (recs["flags"] & (P.FLAG_MIXUP | P.FLAG_CUTMIX)).any()
    if ds.policy.randaugment:
        assert recs["ra_ops"][:, :2].max() < len(P.RA_OPS)
    from fastload.replay.reference import render_reference

    ref = torch.stack([render_reference(_decode(ds.image_bytes(int(i))), r, size=hw, mean=L0.mean,
                                        std=L0.std, interpolation=L0.interpolation)
                       for i, r in zip(idx, recs)])
    err = (b0[0][0] - ref).abs() * torch.tensor(L0.std).view(1, 3, 1, 1) * 255
    assert err.mean() < 0.1


def test_p_reinforced_mixed(ds):
    L = _loader(ds, shuffle=True, p_reinforced=0.5, num_workers=1, target_format="topk", batch_size=23)
    ref = _loader(ds, shuffle=True, p_reinforced=1.0, num_workers=1, target_format="topk", batch_size=23)
    n_fresh = 0
    for e in range(4):
        L.set_epoch(e)
        ref.set_epoch(e)
        (x, y, (ids, probs)), = _all(L)
        (xr, yr, (idr, pr)), = _all(ref)
        one_hot = (probs[:, 0] == 1) & (ids[:, 0] == y)
        same = (x == xr).flatten(1).all(1)
        # each row: either the stored replay (same pixels and target) or fresh + one-hot
        assert torch.equal(same, ~one_hot)
        assert torch.equal(ids[same], idr[same])
        n_fresh += int(one_hot.sum())
    assert 20 < n_fresh < 72  # about half of 92


# ------------------------------------------------------------------------------- determinism
def test_determinism_across_workers_and_prefetch(ds):
    ref = _all(_loader(ds, shuffle=True, seed=11, num_workers=0))
    for nw, pf in [(2, 2), (1, 1), (3, 4)]:
        _same(ref, _all(_loader(ds, shuffle=True, seed=11, num_workers=nw, prefetch_factor=pf)))
    _same(ref, _all(_loader(ds, shuffle=True, generator=torch.Generator().manual_seed(11))))
    other = _all(_loader(ds, shuffle=True, seed=12, num_workers=0))
    assert not torch.equal(ref[0][0], other[0][0])


def test_epochs_reshuffle_and_auto_advance(ds):
    L = _loader(ds, shuffle=True, num_workers=2)
    e0 = _all(L)
    assert L.epoch == 1 and L.state_dict()["step"] == 0
    e1 = _all(L)
    assert not torch.equal(e0[0][1], e1[0][1]) or not torch.equal(e0[0][0], e1[0][0])
    L.set_epoch(0)
    _same(e0, _all(L))
    M = _loader(ds, shuffle=True, num_workers=0)
    M.set_epoch(1)
    _same(e1, _all(M))


@pytest.mark.parametrize("nw", [0, 2])
def test_exact_resume(ds, nw):
    full = _all(_loader(ds, shuffle=True, seed=3, num_workers=nw, p_reinforced=0.7))
    for k in [0, 1, 3, len(full) - 1, len(full)]:
        L = _loader(ds, shuffle=True, seed=3, num_workers=nw, p_reinforced=0.7)
        it = iter(L)
        head = [tuple(t.clone() for t in next(it)) for _ in range(k)]
        st = L.state_dict()
        del it
        R = _loader(ds, shuffle=True, seed=3, num_workers=2 - nw, p_reinforced=0.7)
        R.load_state_dict(st)
        if k == len(full):  # the last batch completed the pass: the state is epoch 1's start
            assert (st["epoch"], st["step"]) == (1, 0)
            _same(full, head)
            continue
        assert len(iter(R)) == len(full) - k
        R.load_state_dict(st)
        _same(full, head + _all(R))
    # a fresh iter() continues at the position and supersedes the old iterator (fastload._state)
    L = _loader(ds, shuffle=True, seed=3, num_workers=nw, p_reinforced=0.7)
    it = iter(L)
    head = [tuple(t.clone() for t in next(it)) for _ in range(2)]
    _same(full, head + _all(L))
    with pytest.raises(SupersededError, match="superseded"):
        next(it)


def test_resume_mid_epoch_two(ds):
    L = _loader(ds, shuffle=True, num_workers=2)
    _all(L)  # epoch 0 done -> epoch 1
    it = iter(L)
    next(it)
    st = L.state_dict()
    assert st["epoch"] == 1 and st["step"] == 1
    R = _loader(ds, shuffle=True, num_workers=0)
    R.load_state_dict(st)
    R.set_epoch(1)  # a trainer's usual set_epoch at the top of the resumed epoch keeps the position
    M = _loader(ds, shuffle=True, num_workers=0)
    M.set_epoch(1)
    _same(_all(M)[1:], _all(R))


# ------------------------------------------------------------------------------- errors
def test_bad_arguments(ds):
    with pytest.raises(ValueError, match="image_size"):
        _loader(ds, image_size=0)
    with pytest.raises(ValueError, match="image_size"):
        _loader(ds, image_size=(16, -2))
    with pytest.raises(ValueError, match="batch_size"):
        _loader(ds, batch_size=0)
    with pytest.raises(ValueError, match="p_reinforced"):
        _loader(ds, p_reinforced=1.5)
    with pytest.raises(ValueError, match="views_per_decode"):
        _loader(ds, views_per_decode=ds.num_augmentations + 1)
    with pytest.raises(ValueError, match="on_error"):
        _loader(ds, on_error="ignore")
    for nw in (0, 2):
        with pytest.raises(ValueError, match="sampler yielded index 23"):
            _all(_loader(ds, sampler=[0, 1, 23], num_workers=nw))
        with pytest.raises(ValueError, match="batch_sampler yielded index -1"):
            _all(ReinforcedLoader(ds, batch_sampler=[[0, 1], [-1, 2]], image_size=S, num_workers=nw))


@pytest.mark.parametrize("nw", [0, 2])
def test_corrupt_jpeg_raises_naming_sample(bad_ds, nw):
    L = _loader(bad_ds, num_workers=nw, batch_size=4)
    with pytest.raises(RuntimeError, match=r"sample id\(s\) \[5\]"):
        _all(L)


def test_corrupt_jpeg_skip_and_count(bad_ds):
    """Issue 10 item 9: skipped counts each replaced row once; skipped_ids names each failing
    sample once (it listed sample 5 once per broken row before)."""
    L = _loader(bad_ds, num_workers=2, batch_size=4, on_error="skip", views_per_decode=2)
    plan = _plan_rows(L, 0)
    bad_rows = 0
    for (rows, augs, _), (x, y, t) in zip(plan, L):
        assert x.shape[0] == 8
        # a row fails if its image or its MixUp/CutMix partner is sample 5
        _, recs, _, _ = bad_ds.gather(rows, augs)
        bad = (rows == 5) | (recs["partner"] == 5)
        bad_rows += int(bad.sum())
        assert L.skipped == bad_rows  # counted as consumed
        if bad.any():
            good = int(np.flatnonzero(~bad)[0])
            for r in np.flatnonzero(bad):
                assert torch.equal(x[r], x[good]) and y[r] == y[good] and torch.equal(t[r], t[good])
    assert bad_rows >= 2 and L.skipped == bad_rows and L.skipped_ids == [5]
    L.set_epoch(1)
    _all(L)  # another epoch: rows counted again, the id not listed twice
    assert L.skipped > bad_rows and L.skipped_ids == [5]


@pytest.mark.parametrize("nw", [0, 2])
def test_skip_batch_with_no_good_row(bad_ds, nw):
    """Issue 10 item 14: a batch whose every row fails under on_error="skip" used to raise
    (telling the user to pass on_error='skip'); now its rows are copies of the next sample
    that renders, the step is kept and counted."""
    L = ReinforcedLoader(bad_ds, batch_sampler=[[0, 1], [5, 5], [2]], image_size=S, num_workers=nw,
                         on_error="skip")
    out = _all(L)
    assert [b[0].shape[0] for b in out] == [2, 2, 1] and L.skipped == 2 and L.skipped_ids == [5]
    aug = L._aug_ids(0, np.array([5]), np.array([0]))
    cand = 6
    while bad_ds.gather(np.array([cand]), L._aug_ids(0, np.array([cand]), np.array([0])))[1]["partner"][0] == 5:
        cand += 1
    ref = _all(ReinforcedLoader(bad_ds, batch_sampler=[[cand]], image_size=S, num_workers=nw))[0]
    for r in range(2):
        assert torch.equal(out[1][0][r], ref[0][0]) and out[1][1][r] == ref[1][0]
        assert torch.equal(out[1][2][r], ref[2][0])
    assert aug.shape == (1,)


class _Boom(Exception):
    pass


def test_background_exception_surfaces_and_thread_exits(ds):
    def batches():
        yield [0, 1]
        yield [2, 3]
        raise _Boom("sampler failed")

    class BS:
        def __iter__(self):
            return batches()

        def __len__(self):
            return 3

    L = ReinforcedLoader(ds, batch_sampler=BS(), image_size=S, num_workers=2)
    it = iter(L)
    next(it)
    next(it)
    with pytest.raises(_Boom, match="sampler failed"):
        next(it)
    _wait_no_prefetch_threads()


def _wait_no_prefetch_threads(timeout=5.0):
    t0 = time.time()
    while any(t.name == "fastload-prefetch" for t in threading.enumerate()):
        assert time.time() - t0 < timeout, "prefetch thread still alive"
        time.sleep(0.02)


def test_early_break_and_gc_do_not_hang(ds):
    L = _loader(ds, shuffle=True, num_workers=2, prefetch_factor=1, batch_size=2)
    for i, _ in enumerate(L):
        if i == 1:
            break
    assert L.state_dict()["step"] == 2
    _wait_no_prefetch_threads()
    it = iter(L)
    next(it)
    del it
    _wait_no_prefetch_threads()


# ------------------------------------------------------------------------------- buffers
def test_reuse_buffers_ring_contract(ds):
    ref = _all(_loader(ds, shuffle=True, num_workers=2, batch_size=2))
    L = _loader(ds, shuffle=True, num_workers=2, batch_size=2, reuse_buffers=True, prefetch_factor=2)
    ptrs = set()
    for k, (x, y, t) in enumerate(L):
        time.sleep(0.02)  # let the producer fill its queue: it must not touch the held batch
        assert torch.equal(x, ref[k][0]), k
        ptrs.add((tuple(x.shape), x.data_ptr()))
    assert len(ptrs) <= 2 * (max(2 - 1, 1) + 2)  # ring per shape (full + last short batch)
    assert len(ptrs) < len(ref)


def test_pooled_buffers_never_rewrite_what_the_caller_holds(ds):
    """Default buffers are pooled: a batch (or a view / numpy array of it) the caller still
    holds is never rendered into again; dropped batches' buffers are reused."""
    ref = _all(_loader(ds, shuffle=True, num_workers=0, batch_size=2))
    for workers in (0, 2):
        L = _loader(ds, shuffle=True, num_workers=workers, batch_size=2)
        kept_view, kept_np, ptrs = None, None, []
        for k, (x, y, t) in enumerate(L):
            time.sleep(0.01)  # let the producer run ahead
            assert torch.equal(x, ref[k][0]), (workers, k)
            ptrs.append(x.data_ptr())
            if k == 1:
                kept_view = x[1:]  # only a view survives the loop variable
            if k == 2:
                kept_np = x.numpy()
        assert torch.equal(kept_view, ref[1][0][1:])
        assert np.array_equal(kept_np, ref[2][0].numpy())
        assert len(set(ptrs)) < len(ptrs)  # dropped buffers were reused
        assert ptrs[1] not in ptrs[2:] and ptrs[2] not in ptrs[3:]  # held ones never
    # a caller keeping every batch gets distinct, intact tensors
    got = list(_loader(ds, shuffle=True, num_workers=2, batch_size=2))
    assert len({x.data_ptr() for x, _, _ in got}) == len(got)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, ref))


def test_buffer_pool_bounds_and_ownership():
    from fastload.loader.deliver import _Pool

    pool = _Pool(torch.float32, pin=False, cap=3)
    held = [pool((2, 3, 4, 4)) for _ in range(4)]  # 4th: pool full, an untracked tensor
    assert len({t.data_ptr() for t in held}) == 4
    held[0].fill_(7.0)
    view = held[0][1]
    del held[0]
    t = pool((2, 3, 4, 4))  # the only pooled base nobody holds: none (the view keeps it)
    assert torch.all(view == 7.0) and t.data_ptr() not in {v.data_ptr() for v in held}
    del view, t
    again = pool((2, 3, 4, 4))  # now reused
    assert sum(map(len, pool.bases.values())) == 3
    del again
    other = pool((1, 3, 8, 8))  # a new shape evicts a free base: still 3 in all
    assert sum(map(len, pool.bases.values())) == 3 and len(pool.bases[(1, 3, 8, 8)]) == 1
    assert other.shape == (1, 3, 8, 8)


# ------------------------------------------------------------------------------- samplers
def test_user_sampler_and_sharding_args(ds):
    s = ShardedSampler(len(ds), seed=2, rank=1, world_size=3)
    L = _loader(ds, sampler=s, num_workers=2)
    L.set_epoch(4)
    ys = torch.cat([y for _, y, _ in _all(L)])
    s.set_epoch(4)
    assert ys.tolist() == ds.labels[s.indices()].tolist()
    L.set_epoch(4)
    for _ in L:  # break mid-epoch: the next pass continues it
        break
    L.set_epoch(4)
    assert torch.cat([y for _, y, _ in _all(L)]).tolist() == ys.tolist()[L.batch_size:]
    # rank/world_size given: the loader shards the same way, equal batch counts
    seen = []
    counts = set()
    for r in range(3):
        R = _loader(ds, shuffle=True, rank=r, world_size=3, batch_size=3)
        counts.add(len(R))
        seen += np.concatenate([rows for rows, _, _ in _plan_rows(R)]).tolist()
        assert len(_all(R)) == len(R)
    assert len(counts) == 1 and set(seen) == set(range(len(ds))) and len(seen) == 24  # 1 padded


def test_batch_sampler_with_sizes(ds):
    batches = [[(0, 16, 16), (1, 16, 16), (2, 16, 16)], [(3, 8, 24), (4, 8, 24)],
               [(5, 16, 16), (6, 16, 16), (7, 16, 16)], [8, 9]]
    L = ReinforcedLoader(ds, batch_sampler=batches, image_size=12, num_workers=2, dct_scale=False)
    out = _all(L)
    assert [tuple(b[0].shape) for b in out] == [(3, 3, 16, 16), (2, 3, 8, 24), (3, 3, 16, 16), (2, 3, 12, 12)]
    plan = _plan_rows(L, 0)
    for (x, _, _), (rows, augs, hw) in zip(out, plan):
        ref = _ref_rows(ds, rows, augs, hw, L)
        assert ((x - ref).abs() * torch.tensor(L.std).view(1, 3, 1, 1) * 255).mean() < 0.1
    with pytest.raises(ValueError, match="mutually exclusive"):
        ReinforcedLoader(ds, batch_sampler=batches, batch_size=4)


def test_variable_batch_sampler_integration(ds):
    from fastload.batch.variable import VariableBatchSampler

    vs = VariableBatchSampler(len(ds), base_size=(32, 32), base_batch_size=4, min_size=(32, 32),
                              max_size=(64, 64), num_scales=2, seed=0, rank=0, world_size=1)
    L = ReinforcedLoader(ds, batch_sampler=vs, num_workers=2, reuse_buffers=True)
    vs.set_epoch(0)
    expected = [(len(b), b[0][1], b[0][2]) for b in vs]
    n = len(L)  # the loader's epoch 0 (the sampler's pass above moved it to epoch 1)
    got = [(x.shape[0], x.shape[2], x.shape[3]) for x, _, _ in L]
    assert got == expected and n == len(expected) and L.epoch == vs.epoch == 1


@pytest.mark.parametrize("nw", [0, 2])
def test_resume_with_variable_batch_sampler(ds, nw):
    from fastload.batch.variable import VariableBatchSampler

    def make():
        vs = VariableBatchSampler(len(ds), base_size=(32, 32), base_batch_size=4, min_size=(16, 16),
                                  max_size=(48, 48), num_scales=3, seed=1, rank=0, world_size=1)
        return ReinforcedLoader(ds, batch_sampler=vs, num_workers=nw, p_reinforced=0.5)

    full = _all(make())
    assert len({tuple(b[0].shape[2:]) for b in full}) > 1
    for k in [1, len(full) // 2, len(full) - 1]:
        L = make()
        it = iter(L)
        head = [tuple(t.clone() for t in next(it)) for _ in range(k)]
        st = L.state_dict()
        del it
        R = make()
        R.load_state_dict(st)
        _same(full, head + _all(R))


def test_views_per_decode(ds, monkeypatch):
    import fastload.replay.native as native

    decoded = []
    real = native.decode_batch
    monkeypatch.setattr(native, "decode_batch", lambda src, **kw: decoded.append(len(src)) or real(src, **kw))
    V = 3
    L = _loader(ds, shuffle=True, views_per_decode=V, num_workers=2, dct_scale=False, batch_size=4)
    plan = _plan_rows(L)
    out = _all(L)
    assert out[0][0].shape == (12, 3, S, S) and len(L) == 6
    for (x, y, t), (rows, augs, hw) in zip(out, plan):
        assert (rows.reshape(-1, V) == rows.reshape(-1, V)[:, :1]).all()  # views are consecutive
        a = augs.reshape(-1, V)
        assert all(len(set(r)) == V for r in a.tolist())  # distinct stored augmentations
        ref = _ref_rows(ds, rows, augs, hw, L)
        assert ((x - ref).abs() * torch.tensor(L.std).view(1, 3, 1, 1) * 255).mean() < 0.1
    assert decoded == [4, 4, 4, 4, 4, 3]  # each image decoded once per batch, not V times


# ------------------------------------------------------------------------------- image-text
def test_image_text(text_ds):
    ds = text_ds
    tok = lambda caps: torch.tensor([[len(c), c.count(" ")] for c in caps])  # noqa: E731
    L = _loader(ds, shuffle=True, num_workers=2, batch_size=4, views_per_decode=2)
    T = _loader(ds, shuffle=True, num_workers=0, batch_size=4, views_per_decode=2, tokenizer=tok)
    plan = _plan_rows(L)
    n = 0
    for b, bt, (rows, augs, hw) in zip(L, T, plan):
        images, caps, syn, img_emb, txt_emb, syn_emb = b
        assert images.shape == (len(rows), 3, S, S) and images.dtype == torch.float32
        assert torch.equal(images, bt.images)
        assert torch.equal(bt.captions, tok(caps)) and torch.equal(bt.syn_captions, tok(syn))
        for r, (i, j) in enumerate(zip(rows.tolist(), augs.tolist())):
            real, synthetic = ds.captions(i)
            assert caps[r] == real[0] and syn[r] in synthetic
            e = ds.text_embeddings(i).astype(np.float32)
            assert np.array_equal(txt_emb[r].numpy(), e[0])
            assert np.array_equal(syn_emb[r].numpy(), e[1 + synthetic.index(syn[r])])
            assert np.array_equal(img_emb[r].numpy(), ds.image_embedding(i, j).astype(np.float32))
            n += 1
    assert n == 22
    with pytest.raises(ValueError, match="p_reinforced"):
        _loader(ds, p_reinforced=0.5)


# ------------------------------------------------------------------------------- end to end
def test_end_to_end_with_reinforce_and_tiny_teacher(tmp_path):
    """fastload.reinforce with a tiny teacher, then the loader: running the teacher on the
    loader's images reproduces the stored top-k targets (the replay is what the teacher saw)."""
    from PIL import Image

    from _ddp_loader_worker import make_jpegs
    from fastload.sample.policy import AugmentPolicy

    jpegs, _ = make_jpegs(12, seed=3)
    for i, b in enumerate(jpegs):
        d = tmp_path / "photos" / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:03d}.jpg").write_bytes(b)
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 10))
    teacher.eval()
    policy = AugmentPolicy(randaugment=(2, 9), erase=0.25, mixup=1.0, cutmix=1.0, size=(24, 24))
    fastload.reinforce(str(tmp_path / "photos"), teacher, str(tmp_path / "plus"), num_augmentations=4,
                       topk=3, policy=policy, image_size=24, num_classes=10, progress=False)
    ds = fastload.ReinforcedDataset(str(tmp_path / "plus"))
    L = fastload.ReinforcedLoader(ds, batch_size=5, shuffle=True, num_workers=2, image_size=24,
                                  target_format="topk", mean=ds.replay["mean"], std=ds.replay["std"])
    n = 0
    with torch.no_grad():
        for images, labels, (ids, probs) in L:
            p = teacher(images).softmax(1)
            top = p.topk(3, dim=1)
            assert torch.equal(top.indices, ids)
            torch.testing.assert_close(top.values, probs, atol=2e-3, rtol=0)
            n += len(images)
    assert n == 12 and labels.max() <= 1


@pytest.mark.parametrize("nw", [0, 2])
def test_epoch_advances_when_its_last_batch_is_out(ds, nw):
    """Trainers (Lightning) take len(loader) batches and never ask for the StopIteration:
    the next iter() must still start the next epoch, not replay the finished one."""
    from fastload.batch.variable import VariableBatchSampler

    for make in (lambda: _loader(ds, shuffle=True, seed=1, num_workers=nw),
                 lambda: ReinforcedLoader(ds, num_workers=nw, batch_sampler=VariableBatchSampler(
                     len(ds), base_size=16, base_batch_size=4, min_size=16, max_size=32,
                     num_scales=2, divisible_by=16, seed=2))):
        L = make()
        ref = [[b[1].tolist() for b in L] for _ in range(2)]  # epochs 0 and 1, run to StopIteration
        assert ref[0] != ref[1]
        L = make()
        it = iter(L)
        first = [next(it)[1].tolist() for _ in range(len(L))]  # no StopIteration asked for
        assert first == ref[0] and (L.state_dict()["epoch"], L.state_dict()["step"]) == (1, 0)
        assert [b[1].tolist() for b in L] == ref[1]
        with pytest.raises(StopIteration):  # the old iterator is over
            next(it)
