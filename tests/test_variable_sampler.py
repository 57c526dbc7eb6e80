"""VariableBatchSampler / ResolutionCurriculum against plain-Python references of the
ml-cvnets rules (RECIPES.md section 3)."""
import json
import math
import random
from collections import Counter

import numpy as np
import pytest
import torch

import fastload
from fastload.batch.variable import AtResolution, ResolutionCurriculum, VariableBatchSampler, make_divisible


# ----------------------------------------------------------------------------- references
def ref_make_divisible(v, d):
    """Nearest multiple of d (halves up, at least d); one step up if that fell below 0.9 v."""
    n = max(d, int(v + d / 2) // d * d)
    return n + d if n < 0.9 * v else n


def ref_linspace(lo, hi, n):
    if n == 1:
        return [float(lo)]
    step = (hi - lo) / (n - 1)
    return [lo + i * step for i in range(n - 1)] + [float(hi)]


def ref_grid(base, bs0, lo, hi, n, d=32, pairing="index", ref=None, include_base=True):
    """The recipe's grid with the two axes paired by index (or the full product)."""
    ref = base if ref is None else ref
    hs = [ref_make_divisible(v, d) for v in ref_linspace(lo[0], hi[0], n)]
    ws = [ref_make_divisible(v, d) for v in ref_linspace(lo[1], hi[1], n)]
    bh, bw = ref_make_divisible(base[0], d), ref_make_divisible(base[1], d)
    if pairing == "index":
        pairs = set(zip(hs, ws)) | ({(bh, bw)} if include_base else set())
    else:
        pairs = {(h, w) for h in set(hs) | {bh} for w in set(ws) | {bw}}
    return sorted((h, w, (bs0 * ref[0] * ref[1]) // (h * w)) for h, w in pairs)  # floor: within budget


def reference_zip_grid(base, lo, hi, n, d=32, bs0=None):
    """The ml-cvnets grid as published (data/sampler/utils.py, image_batch_pairs): per axis the
    set of linspace(min, max, n) values plus the base, each made divisible, *sorted*, with
    duplicates kept; the two lists zipped (the shorter one truncates); b = int(round(x, 2)),
    at least 1. Returns (h, w) pairs, or (h, w, b) when bs0 is given."""
    def axis(a):
        vals = set(np.linspace(lo[a], hi[a], n).tolist())
        vals.add(base[a])
        return sorted(ref_make_divisible(v, d) for v in vals)
    pairs = list(zip(axis(0), axis(1)))
    if bs0 is None:
        return sorted(set(pairs))
    total = bs0 * base[0] * base[1]
    return sorted({(h, w, max(1, int(round(total / (h * w), 2)))) for h, w in pairs})


def all_batches(s):
    e = s.epoch
    out = [list(b) for b in s]
    s.set_epoch(e)  # a complete pass moved to the next epoch (fastload._state): come back
    return out


# ----------------------------------------------------------------------------- grid
def test_make_divisible_matches_reference():
    for d in (8, 16, 32, 64):
        for v in np.concatenate([np.arange(1, 700, 0.25), np.linspace(100, 900, 997)]):
            assert make_divisible(float(v), d) == ref_make_divisible(float(v), d), (v, d)


CONFIGS = [
    dict(base_size=256, base_batch_size=128, min_size=160, max_size=320, num_scales=5),
    dict(base_size=224, base_batch_size=64, min_size=128, max_size=320, num_scales=8),
    dict(base_size=(256, 192), base_batch_size=96, min_size=(160, 128), max_size=(320, 256), num_scales=5),
    dict(base_size=(200, 224), base_batch_size=32, min_size=160, max_size=320, num_scales=5),
    dict(base_size=512, base_batch_size=16, min_size=384, max_size=640, num_scales=3, divisible_by=64),
    dict(base_size=100, base_batch_size=50, min_size=90, max_size=130, num_scales=1, divisible_by=16),
    dict(base_size=(64, 96), base_batch_size=12, min_size=(48, 48), max_size=(96, 160), num_scales=6,
         divisible_by=16, pairing="product"),
    dict(base_size=224, base_batch_size=256, min_size=128, max_size=288, num_scales=5, batch_reference="max"),
    dict(base_size=224, base_batch_size=64, min_size=160, max_size=256, num_scales=4, batch_reference=(192, 160)),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_grid_matches_reference_rule(cfg):
    s = VariableBatchSampler(1000, **cfg)
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)
    ref = cfg.get("batch_reference", "base")
    ref = pair(cfg["base_size"]) if ref == "base" else pair(cfg["max_size"]) if ref == "max" else pair(ref)
    want = ref_grid(pair(cfg["base_size"]), cfg["base_batch_size"], pair(cfg["min_size"]), pair(cfg["max_size"]),
                    cfg["num_scales"], cfg.get("divisible_by", 32), cfg.get("pairing", "index"), ref)
    assert s.grid == want
    assert fastload.batch.variable.scale_grid(**cfg) == want
    d = cfg.get("divisible_by", 32)
    assert all(h % d == 0 and w % d == 0 and b >= 1 for h, w, b in s.grid)
    assert len(set((h, w) for h, w, _ in s.grid)) == len(s.grid)  # no duplicates


def test_default_grid_is_the_recipe_default():
    s = VariableBatchSampler(10, base_size=256, base_batch_size=128, min_size=160, max_size=320, num_scales=5)
    assert s.grid == [(160, 160, 327), (192, 192, 227), (256, 256, 128), (288, 288, 101), (320, 320, 81)]


def test_axes_of_different_grid_length_are_not_mismatched():
    # the h grid contains its base (200), the w grid does not (224): the reference's zip
    # pairs 5 heights with the first 5 of 6 widths and silently drops the base pair.
    base, lo, hi = (200, 224), (160, 160), (320, 320)
    zipped = reference_zip_grid(base, lo, hi, 5)
    assert (192, 224) not in zipped
    s = VariableBatchSampler(100, base, 32, lo, hi, 5)
    assert (192, 224) in [(h, w) for h, w, _ in s.grid]


@pytest.mark.parametrize("kwargs,name", [
    (dict(min_size=330), "min_size"),
    (dict(min_size=(160, 400), max_size=(320, 320)), "min_size"),
    (dict(base_size=128), "base_size"),
    (dict(base_size=(256, 400)), "base_size"),
    (dict(num_scales=0), "num_scales"),
    (dict(num_scales=2.5), "num_scales"),
    (dict(min_size=0), "min_size"),
    (dict(max_size=(320, -1)), "max_size"),
    (dict(base_size=(256, 256, 3)), "base_size"),
    (dict(base_batch_size=1), "base_batch_size"),  # b(320x320) = floor(0.64) = 0
    (dict(base_batch_size=0), "base_batch_size"),
    (dict(divisible_by=0), "divisible_by"),
    (dict(pairing="zip"), "pairing"),
    (dict(batch_reference="min"), "batch_reference"),
])
def test_bad_input_names_the_argument(kwargs, name):
    cfg = dict(base_size=256, base_batch_size=128, min_size=160, max_size=320, num_scales=5)
    cfg.update(kwargs)
    if kwargs == dict(base_batch_size=1):
        cfg["max_size"] = 384  # b at 384x384 = floor(65536/147456) = 0 (also under "nearest")
    with pytest.raises(ValueError, match=name):
        VariableBatchSampler(1000, **cfg)


def test_bad_input_other():
    with pytest.raises(ValueError, match="num_samples"):
        VariableBatchSampler(0)
    with pytest.raises(ValueError, match="aspect_ratios"):
        VariableBatchSampler(10, aspect_ratios=np.ones(9))
    with pytest.raises(ValueError, match="start_max_size"):
        VariableBatchSampler(10, curriculum=ResolutionCurriculum.linear(5, start_max_size=100))
    # a curriculum that grows the resolution until b < 1 fails at construction
    with pytest.raises(ValueError, match="base_batch_size"):
        VariableBatchSampler(10, base_batch_size=2, curriculum=ResolutionCurriculum.step([3, 6], factor=1.0))


# ----------------------------------------------------------------------------- iteration
@pytest.mark.parametrize("drop_last", [False, True])
def test_epoch_covers_samples_one_shape_per_batch(drop_last):
    n = 1003
    s = VariableBatchSampler(n, base_size=64, base_batch_size=10, min_size=32, max_size=96, num_scales=3,
                             divisible_by=16, seed=5, drop_last=drop_last)
    grid = {(h, w): b for h, w, b in s.grid}
    batches = all_batches(s)
    assert len(batches) == len(s)
    for k, batch in enumerate(batches):
        (h, w), = {(h, w) for _, h, w in batch}
        assert (h, w) in grid
        if k < len(batches) - 1 or drop_last:
            assert len(batch) == grid[(h, w)]
        else:
            assert 1 <= len(batch) <= grid[(h, w)]
    ids = [i for b in batches for i, _, _ in b]
    assert len(ids) == len(set(ids))
    if drop_last:
        assert n - max(grid.values()) < len(ids) <= n
    else:
        assert sorted(ids) == list(range(n))
    assert s.samples_per_epoch() == len(ids)
    # each scale is drawn (uniformly: 3 scales, ~ len/3 each)
    assert set(Counter((b[0][1], b[0][2]) for b in batches)) == set(grid)


def test_shuffle_false_keeps_order():
    s = VariableBatchSampler(500, 64, 8, 32, 96, 3, divisible_by=16, shuffle=False)
    assert [i for b in s for i, _, _ in b] == list(range(500))


def test_deterministic_and_private_rng():
    kw = dict(base_size=64, base_batch_size=10, min_size=32, max_size=96, num_scales=3, divisible_by=16, seed=7)
    a = VariableBatchSampler(777, **kw)
    random.seed(1)
    torch.manual_seed(1)
    np.random.seed(1)
    first = all_batches(a)
    random.seed(2)
    torch.manual_seed(2)
    np.random.seed(2)
    b = VariableBatchSampler(777, **kw)
    random.random()
    assert all_batches(b) == first
    assert all_batches(a) == first  # re-iterating the same epoch repeats it
    a.set_epoch(1)
    assert all_batches(a) != first
    assert all_batches(VariableBatchSampler(777, **dict(kw, seed=8))) != first


@pytest.mark.parametrize("stop", [0, 1, 17, 40])
def test_exact_mid_epoch_resume(stop):
    kw = dict(base_size=64, base_batch_size=10, min_size=32, max_size=96, num_scales=3, divisible_by=16, seed=11)
    s = VariableBatchSampler(900, **kw)
    s.set_epoch(3)
    full = all_batches(s)
    stop = min(stop, len(full))
    it = iter(s)
    seen = [next(it) for _ in range(stop)]
    state = json.loads(json.dumps(s.state_dict()))  # plain JSON: no pickle needed
    assert state["epoch"] == 3 and state["step"] == stop
    t = VariableBatchSampler(900, **kw)
    t.load_state_dict(state)
    t.set_epoch(3)  # the usual epoch loop: setting the loaded epoch keeps the position
    assert len(t) == len(full)
    assert seen + all_batches(t) == full
    assert all_batches(t) == full  # the next pass is a whole epoch again
    t.set_epoch(4)
    s.set_epoch(4)
    assert all_batches(t) == all_batches(s)


def test_resume_with_consumed_count_and_mismatch():
    s = VariableBatchSampler(300, 64, 8, 32, 96, 3, divisible_by=16)
    full = all_batches(s)
    it = iter(s)
    for _ in range(6):  # a prefetching loader pulled 6, the model saw 4
        next(it)
    state = s.state_dict(batches_consumed=4)
    t = VariableBatchSampler(300, 64, 8, 32, 96, 3, divisible_by=16)
    t.load_state_dict(state)
    assert all_batches(t) == full[4:]
    with pytest.raises(ValueError, match="num_samples"):
        VariableBatchSampler(301, 64, 8, 32, 96, 3, divisible_by=16).load_state_dict(state)
    with pytest.raises(ValueError, match="grid_code"):
        VariableBatchSampler(300, 64, 9, 32, 96, 3, divisible_by=16).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        VariableBatchSampler(300, 64, 8, 32, 96, 3, divisible_by=16, seed=1).load_state_dict(state)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_sharding_in_process(world, drop_last):
    n = 1001
    kw = dict(base_size=64, base_batch_size=9, min_size=32, max_size=96, num_scales=4, divisible_by=16, seed=2,
              drop_last=drop_last)
    ranks = [VariableBatchSampler(n, rank=r, world_size=world, **kw) for r in range(world)]
    per = [all_batches(s) for s in ranks]
    assert len({len(p) for p in per}) == 1 and all(len(s) == len(p) for s, p in zip(ranks, per))
    for step in zip(*per):
        assert len({(len(b), b[0][1], b[0][2]) for b in step}) == 1
    ids = [i for p in per for b in p for i, _, _ in b]
    pad = -(-n // world) * world - n
    if drop_last:
        assert len(ids) - len(set(ids)) <= pad
    else:
        assert sorted(set(ids)) == list(range(n)) and len(ids) == n + pad
    with pytest.raises(ValueError, match="rank"):
        VariableBatchSampler(n, rank=world, world_size=world, **kw)


# ----------------------------------------------------------------------------- curriculum
def ref_step_bounds(lo, hi, milestones, factor, epoch):
    """ml-cvnets update_scales, called at the start of every epoch."""
    lo, hi = list(lo), list(hi)
    for e in range(epoch + 1):
        if e in milestones:
            lo = [v + int(v * factor) for v in lo]
            hi = [v + int(v * factor) for v in hi]
    return tuple(lo), tuple(hi)


def test_step_curriculum_matches_reference():
    base, lo, hi = (224, 224), (96, 128), (224, 256)
    cur = ResolutionCurriculum.step([2, 5], factor=0.25)
    s = VariableBatchSampler(2000, base, 128, lo, hi, 5, curriculum=cur)
    assert s.horizon == 5
    for epoch in range(8):
        s.set_epoch(epoch)
        elo, ehi = ref_step_bounds(lo, hi, [2, 5], 0.25, epoch)
        inside = all(elo[a] <= base[a] <= ehi[a] for a in (0, 1))
        assert s.grid == ref_grid(base, 128, elo, ehi, 5, include_base=inside), epoch
        # every batch is drawn from this epoch's grid
        shapes = {(h, w, b) for h, w, b in s.grid}
        assert all((b[0][1], b[0][2], len(b)) in shapes for b in list(s)[:-1])
    s.set_epoch(0)
    p0 = s.pixels_per_epoch()
    s.set_epoch(6)
    assert s.pixels_per_epoch() > p0


@pytest.mark.parametrize("mode", ["linear", "cosine"])
def test_smooth_curriculum(mode):
    E, start = 11, (128, 160)
    cur = getattr(ResolutionCurriculum, mode)(epochs=E, start_max_size=start)
    lo, hi, base = (96, 96), (320, 352), (224, 224)
    s = VariableBatchSampler(5000, base, 64, lo, hi, 5, curriculum=cur)
    maxes, pix = [], []
    for e in range(E + 2):
        s.set_epoch(e)
        p = min(1.0, e / (E - 1))
        f = p if mode == "linear" else (1 - math.cos(math.pi * p)) / 2
        ehi = tuple(start[a] + (hi[a] - start[a]) * f for a in (0, 1))
        inside = all(lo[a] <= base[a] <= ehi[a] for a in (0, 1))
        assert s.grid == ref_grid(base, 64, lo, ehi, 5, include_base=inside), e
        maxes.append(max(h * w for h, w, _ in s.grid))
        pix.append(s.pixels_per_epoch())
    assert maxes == sorted(maxes) and maxes[0] < maxes[-1]
    assert max(h for h, _, _ in s.grid) == 320 and max(w for _, w, _ in s.grid) == 352
    s.set_epoch(0)
    assert max(h for h, _, _ in s.grid) == 128 and max(w for _, w, _ in s.grid) == 160
    # the curriculum renders fewer pixels than the final grid would, same samples per epoch
    assert pix[0] < pix[-1]
    full = VariableBatchSampler(5000, base, 64, lo, hi, 5)
    assert s.samples_per_epoch() == full.samples_per_epoch() == 5000


def test_pixels_per_epoch_counts_iterated_pixels():
    s = VariableBatchSampler(1234, 64, 10, 32, 96, 3, divisible_by=16, rank=1, world_size=2)
    it = sum(len(b) * b[0][1] * b[0][2] for b in s)
    assert s.pixels_per_epoch(0) == 2 * it


# ----------------------------------------------------------------------------- aspect buckets
class FakeReinforced:
    def __init__(self, hw):
        self.source_hw = hw

    def __len__(self):
        return len(self.source_hw)


def test_aspect_buckets_keep_native_ratio(rng):
    n = 1500
    hw = np.stack([rng.integers(200, 900, n), rng.integers(200, 900, n)], axis=1)
    buckets = (0.5, 0.75, 1.0, 4 / 3, 2.0)
    s = VariableBatchSampler(n, 256, 32, 160, 320, 5, aspect_ratios=FakeReinforced(hw), aspect_buckets=buckets,
                             seed=4)
    ratio = hw[:, 0] / hw[:, 1]
    nearest = np.asarray(buckets)[np.abs(np.log(ratio)[:, None] - np.log(buckets)).argmin(1)]
    assert s.bucket_sizes == {r: int((nearest == r).sum()) for r in buckets if (nearest == r).any()}
    grids = s.bucket_grids
    seen = []
    for batch in s:
        (h, w), = {(h, w) for _, h, w in batch}
        idx = np.array([i for i, _, _ in batch])
        r, = set(nearest[idx])  # one bucket per batch
        assert (h, w) in {(gh, gw) for gh, gw, _ in grids[r]}
        assert h % 32 == 0 and w % 32 == 0
        assert abs(math.log(h / w) - math.log(r)) < 0.25  # the crop keeps the bucket's ratio
        seen.extend(idx.tolist())
    assert sorted(seen) == list(range(n))
    s.set_epoch(0)  # the pass moved to epoch 1
    # the same from an (N, 2) array and from plain ratios
    t = VariableBatchSampler(n, 256, 32, 160, 320, 5, aspect_ratios=hw, aspect_buckets=buckets, seed=4)
    u = VariableBatchSampler(n, 256, 32, 160, 320, 5, aspect_ratios=ratio, aspect_buckets=buckets, seed=4)
    assert all_batches(t) == all_batches(u) == all_batches(s)
    # bucket shapes: area of each grid scale at the bucket's ratio, rounded like the grid
    for r, g in grids.items():
        want = sorted({(make_divisible(math.sqrt(a * r)), make_divisible(math.sqrt(a / r)))
                       for a in [gh * gw for gh, gw, _ in s.grid]})
        assert [(h, w) for h, w, _ in g] == want


def test_aspect_buckets_distributed():
    n, world = 999, 3
    ratios = np.where(np.arange(n) % 3 == 0, 0.75, np.where(np.arange(n) % 3 == 1, 1.0, 1.5))
    ranks = [VariableBatchSampler(n, 64, 8, 32, 96, 3, divisible_by=16, aspect_ratios=ratios, rank=r,
                                  world_size=world, seed=9) for r in range(world)]
    per = [all_batches(s) for s in ranks]
    assert len({len(p) for p in per}) == 1
    for step in zip(*per):
        assert len({(len(b), b[0][1], b[0][2]) for b in step}) == 1
    ids = [i for p in per for b in p for i, _, _ in b]
    assert sorted(set(ids)) == list(range(n))
    assert len(ids) - n <= 3 * (world - 1)  # padding per bucket


# ----------------------------------------------------------------------------- shapes / warm-up
def test_shapes_and_warmup_order():
    cur = ResolutionCurriculum.step([1], factor=0.5)
    s = VariableBatchSampler(700, 64, 10, 32, 96, 3, divisible_by=16, curriculum=cur)
    want = set()
    for e in (0, 1):
        s.set_epoch(e)
        want |= {(b, h, w) for h, w, b in s.grid}
    assert s.shapes() == sorted(want)
    big = s.shapes(largest_first=True)
    assert sorted(big) == sorted(want)
    keys = [(b * h * w, h * w) for b, h, w in big]
    assert keys == sorted(keys, reverse=True)
    # exact shapes of given epochs include the short last batch
    seen = set()
    for e in (0, 1, 2):
        s.set_epoch(e)
        seen |= {(len(b), b[0][1], b[0][2]) for b in s}
    assert set(s.shapes(epochs=[0, 1, 2])) == seen
    wb = s.warmup_batches()
    assert [(len(b), b[0][1], b[0][2]) for b in wb] == big
    assert all(0 <= i < 700 for b in wb for i, _, _ in b)


# ----------------------------------------------------------------------------- integration
class SquaresDataset:
    """Images whose pixels encode their index, cropped/resized at the requested size."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.full((40, 50, 3), i % 251, np.uint8), i


def _at_size(item, h, w):
    img, label = item
    t = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    return torch.nn.functional.interpolate(t, size=(h, w), mode="nearest")[0], label


@pytest.mark.parametrize("workers", [0, 2])
def test_plain_torch_dataloader(workers):
    n = 203
    s = VariableBatchSampler(n, 64, 6, 32, 96, 3, divisible_by=16, seed=1)
    dl = torch.utils.data.DataLoader(AtResolution(SquaresDataset(n), _at_size), batch_sampler=s,
                                     num_workers=workers)
    plan = all_batches(s)
    n_dl = len(dl)
    got = list(dl)
    assert len(got) == len(plan) == n_dl
    for (x, y), batch in zip(got, plan):
        assert tuple(x.shape) == (len(batch), 3, batch[0][1], batch[0][2])
        assert y.tolist() == [i for i, _, _ in batch]
        assert torch.equal(x[:, :, 0, 0], (y % 251).float()[:, None].expand(-1, 3))
    with pytest.raises(ValueError, match="index, h, w"):
        AtResolution(SquaresDataset(3), _at_size)[1]


def test_public_names():
    assert fastload.VariableBatchSampler is VariableBatchSampler
    assert fastload.ResolutionCurriculum is ResolutionCurriculum


def test_reinforced_loader_renders_each_step_at_its_size(tmp_path):
    """ReinforcedLoader(rds, batch_sampler=VariableBatchSampler(...)): every batch comes out at
    the step's (h, w) with the step's samples, pixels equal to the plain-PyTorch replay
    reference rendered directly at that size; aspect buckets from the dataset's source_hw."""
    import io
    import os
    import sys

    from PIL import Image

    sys.path.insert(0, os.path.dirname(__file__))
    from _ddp_loader_worker import write_dataset

    from fastload.format.reader import ReinforcedDataset
    from fastload.loader.reinforced import ReinforcedLoader
    from fastload.replay.reference import render_reference

    ds = ReinforcedDataset(write_dataset(str(tmp_path / "d"), n=21))
    vs = VariableBatchSampler(len(ds), base_size=32, base_batch_size=3, min_size=16, max_size=48, num_scales=3,
                              divisible_by=16, seed=0, aspect_ratios=ds, aspect_buckets=(0.75, 1.0, 4 / 3))
    L = ReinforcedLoader(ds, batch_sampler=vs, num_workers=2, dct_scale=False)
    plan = all_batches(vs)
    n = len(L)
    got = [(x.clone(), y.clone()) for x, y, _ in L]
    assert len(got) == len(plan) == n
    labels = np.asarray(ds.labels)
    decode = lambda b: np.asarray(Image.open(io.BytesIO(bytes(b))).convert("RGB"))
    for k, ((x, y), batch) in enumerate(zip(got, plan)):
        idx = [i for i, _, _ in batch]
        h, w = batch[0][1], batch[0][2]
        assert tuple(x.shape) == (len(batch), 3, h, w)
        assert y.tolist() == labels[idx].tolist()
        if k < 3:  # pixels: the reference replay at the step's size
            rows = np.asarray(idx)
            augs = L._aug_ids(0, rows, np.zeros(len(rows), np.int64))
            _, recs, _, _ = ds.gather(rows, augs)
            ref = []
            for i, rec in zip(rows, recs):
                partner = decode(ds.image_bytes(int(rec["partner"]))) if rec["partner"] >= 0 else None
                ref.append(render_reference(decode(ds.image_bytes(int(i))), rec, size=(h, w), partner_img=partner,
                                            mean=L.mean, std=L.std, interpolation=L.interpolation))
            err = ((x - torch.stack(ref)).abs() * torch.tensor(L.std).view(1, 3, 1, 1) * 255).mean()
            assert err < 0.5, (k, float(err))


# ----------------------------------------------------------------------------- lazy order
@pytest.mark.parametrize("world,n", [(1, 1000), (3, 1001), (8, 5)])
def test_iter_arrays_matches_batches_and_resume(world, n):
    kw = dict(base_size=64, base_batch_size=4, min_size=32, max_size=96, num_scales=3, divisible_by=16, seed=5)
    for r in range(world):
        s = VariableBatchSampler(n, rank=r, world_size=world, **kw)
        lists = all_batches(s)
        arrays = [(i.tolist(), h, w) for i, h, w in s.iter_arrays()]
        assert arrays == [([i for i, _, _ in b], b[0][1], b[0][2]) for b in lists]
        s.set_epoch(0)  # the pass moved to epoch 1
        it = s.iter_arrays()
        next(it)
        state = s.state_dict()
        t = VariableBatchSampler(n, rank=r, world_size=world, **kw)
        t.load_state_dict(state)
        if len(lists) == 1:  # its only batch completed the pass: the state is epoch 1's start
            assert (state["epoch"], state["step"]) == (1, 0)
        else:
            assert all_batches(t) == lists[1:]


def test_lazy_order_covers_each_bucket_once_with_windows():
    # more samples than one id window (8192): windows must join without gaps or repeats
    n = 20000
    ratios = np.where(np.arange(n) % 3 == 0, 0.75, 1.0)
    s = VariableBatchSampler(n, 64, 16, 32, 96, 3, divisible_by=16, seed=3, aspect_ratios=ratios,
                             aspect_buckets=(0.75, 1.0))
    ids = [i for b in s for i, _, _ in b]
    assert sorted(ids) == list(range(n))
    assert ids[:50] != sorted(ids[:50])  # shuffled
    for b in s:
        assert len({ratios[i] for i, _, _ in b}) == 1
