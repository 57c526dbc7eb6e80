"""Variable-resolution batching with a constant pixel budget per batch (ml-cvnets multi-scale
samplers, RECIPES.md section 3), a resolution curriculum and aspect-ratio buckets.

Every step draws one resolution (h, w) from a grid and a batch size
``b = floor(bs0 * H0 * W0 / (h * w))`` so that pixels per batch stay at or under the base
batch's (the budget users size to their GPU memory). The sampler
yields, per step, a list of ``(index, h, w)`` tuples: a dataset receiving ``(index, h, w)``
builds its crop at that size, so it works with ``torch.utils.data.DataLoader(dataset,
batch_sampler=sampler)`` and with ``fastload.ReinforcedLoader(rds, batch_sampler=sampler)``.

What differs from the reference (deliberately):

* the h-grid and w-grid are paired explicitly (``pairing="index"`` pairs the i-th height
  with the i-th width of two grids of the same length ``num_scales`` and adds the base pair
  (H0, W0) on its own; ``pairing="product"`` takes every (h, w) combination), never with a
  ``zip`` of two lists that can differ in length;
* ``rounding="floor"`` (default) never exceeds the budget ``bs0 * H0 * W0``; the reference
  computes ``int(round(x, 2))``, which rounds x up when its fraction is >= 0.995 (then the
  batch is over budget): ``rounding="cvnets"`` reproduces it, ``"nearest"`` rounds half up
  (up to half a sample over budget); a ``b < 1`` is an error, not silently clamped to 1;
* randomness comes from a private generator seeded by ``(seed, epoch)``, identical on every
  rank, so all ranks draw the same (h, w, b) per step and the same number of steps;
* ``len(sampler)`` is the number of batches (the reference returns samples).
"""
from __future__ import annotations

import math
import zlib
from itertools import product
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from fastload.errors import StateError
from fastload._dist import (DistributedArgs, check_epoch_end, check_same_across_ranks, disagreement,
                            min_max_across_ranks, on_background_thread)
from fastload._state import StepIterable

Size = Union[int, Sequence[int]]

# Native aspect ratios (height / width) of the default buckets: portrait 1:2 to landscape 2:1.
DEFAULT_ASPECT_BUCKETS = (2.0, 16 / 9, 3 / 2, 4 / 3, 1.0, 3 / 4, 2 / 3, 9 / 16, 0.5)

__all__ = ["VariableBatchSampler", "ResolutionCurriculum", "AtResolution", "make_divisible",
           "scale_grid", "DEFAULT_ASPECT_BUCKETS"]


# --------------------------------------------------------------------------- grid rule
def make_divisible(v: float, divisor: int = 32) -> int:
    """The reference's rounding: nearest multiple of ``divisor`` (halves up, at least
    ``divisor``), one step up if that fell below 0.9 * v.

    >>> make_divisible(200), make_divisible(240), make_divisible(16)
    (192, 256, 32)
    """
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return int(new_v)


ROUNDINGS = ("floor", "nearest", "cvnets")


def _batch_for(bs0: int, ref_hw: Tuple[int, int], h: int, w: int, rounding: str = "floor") -> int:
    budget = bs0 * ref_hw[0] * ref_hw[1]
    if rounding == "floor":  # integer arithmetic: exactly the largest b within the budget
        return budget // (h * w)
    if rounding == "cvnets":  # ml-cvnets' image_batch_pairs: round to 2 decimals, truncate
        return int(round(budget / (h * w), 2))
    # round half up (Python's round() is banker's rounding)
    return int(math.floor(budget / (h * w) + 0.5))


def _check_rounding(rounding) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return rounding


def _pair(name: str, v: Size) -> Tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        hw = (int(v), int(v))
    else:
        try:
            hw = tuple(int(x) for x in v)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be an int or an (h, w) pair of ints, got {v!r}") from None
        if len(hw) != 2 or any(float(x) != float(y) for x, y in zip(hw, v)):
            raise ValueError(f"{name} must be an int or an (h, w) pair of ints, got {v!r}")
    if hw[0] <= 0 or hw[1] <= 0:
        raise ValueError(f"{name} must be positive, got {v!r}")
    return hw  # type: ignore[return-value]


def _scale_pairs(base: Tuple[float, float], lo: Tuple[float, float], hi: Tuple[float, float],
                 num_scales: int, divisor: int, pairing: str, include_base: bool) -> List[Tuple[int, int]]:
    """The (h, w) pairs of the grid, before batch sizes. See :func:`scale_grid`."""
    hs = np.linspace(lo[0], hi[0], num_scales)
    ws = np.linspace(lo[1], hi[1], num_scales)
    if pairing == "index":
        # same length by construction: the i-th height goes with the i-th width
        pairs = {(make_divisible(h, divisor), make_divisible(w, divisor)) for h, w in zip(hs, ws)}
        if include_base:
            pairs.add((make_divisible(base[0], divisor), make_divisible(base[1], divisor)))
    elif pairing == "product":
        hv = {make_divisible(h, divisor) for h in hs}
        wv = {make_divisible(w, divisor) for w in ws}
        if include_base:
            hv.add(make_divisible(base[0], divisor))
            wv.add(make_divisible(base[1], divisor))
        pairs = {(h, w) for h in hv for w in wv}
    else:
        raise ValueError(f"pairing must be 'index' or 'product', got {pairing!r}")
    return sorted(pairs)


def scale_grid(base_size: Size = 256, base_batch_size: int = 128, min_size: Size = 160,
               max_size: Size = 320, num_scales: int = 5, divisible_by: int = 32,
               pairing: str = "index", batch_reference: Union[str, Size] = "base",
               rounding: str = "floor") -> List[Tuple[int, int, int]]:
    """The (h, w, b) grid of the multi-scale sampler, sorted.

    Per axis: ``linspace(min, max, num_scales)`` plus the base, each value made divisible by
    ``divisible_by`` with :func:`make_divisible`; duplicates removed. ``pairing="index"``
    pairs the i-th height with the i-th width and adds (H0, W0); ``pairing="product"`` takes
    every combination of the per-axis values. ``b = floor(bs0 * Hr * Wr / (h * w))`` where
    (Hr, Wr) is ``batch_reference``: ``"base"`` (the base crop, as the reference code does),
    ``"max"`` (``max_size``, as the reference docs say) or an explicit size; ``rounding``
    "nearest" rounds half up, "cvnets" as ml-cvnets (``int(round(x, 2))``).

    >>> scale_grid(256, 128, 160, 320, 5)
    [(160, 160, 327), (192, 192, 227), (256, 256, 128), (288, 288, 101), (320, 320, 81)]
    """
    base, lo, hi = _pair("base_size", base_size), _pair("min_size", min_size), _pair("max_size", max_size)
    _validate_bounds(base, lo, hi, num_scales, base_batch_size, divisible_by)
    ref = _reference(batch_reference, base, hi)
    _check_rounding(rounding)
    pairs = _scale_pairs(base, lo, hi, num_scales, divisible_by, pairing, True)
    grid = [(h, w, _batch_for(base_batch_size, ref, h, w, rounding)) for h, w in pairs]
    _check_batches(grid)
    return grid


def _validate_bounds(base, lo, hi, num_scales, base_batch_size, divisible_by) -> None:
    if not isinstance(num_scales, (int, np.integer)) or num_scales < 1:
        raise ValueError(f"num_scales must be an int >= 1, got {num_scales!r}")
    if not isinstance(base_batch_size, (int, np.integer)) or base_batch_size < 1:
        raise ValueError(f"base_batch_size must be an int >= 1, got {base_batch_size!r}")
    if not isinstance(divisible_by, (int, np.integer)) or divisible_by < 1:
        raise ValueError(f"divisible_by must be an int >= 1, got {divisible_by!r}")
    for ax in (0, 1):
        if lo[ax] > hi[ax]:
            raise ValueError(f"min_size {lo} must not exceed max_size {hi}")
        if not lo[ax] <= base[ax] <= hi[ax]:
            raise ValueError(f"base_size {base} must lie within [min_size {lo}, max_size {hi}]")


def _reference(batch_reference, base, hi) -> Tuple[int, int]:
    if isinstance(batch_reference, str):
        if batch_reference == "base":
            return base
        if batch_reference == "max":
            return hi
        raise ValueError(f"batch_reference must be 'base', 'max' or a size, got {batch_reference!r}")
    return _pair("batch_reference", batch_reference)


def _check_batches(grid, where: str = "") -> None:
    bad = [g for g in grid if g[2] < 1]
    if bad:
        h, w, _ = max(bad, key=lambda g: g[0] * g[1])
        raise ValueError(f"base_batch_size is too small: the batch size at scale {h}x{w}{where} rounds "
                         f"to {bad[0][2]} < 1; raise base_batch_size or lower max_size")


# --------------------------------------------------------------------------- curriculum
class ResolutionCurriculum:
    """How the sampler's resolution bounds change with the epoch.

    * ``ResolutionCurriculum.step(milestones, factor=0.25)``: the reference schedule. At each
      milestone epoch (from that epoch on) both bounds of both axes grow by
      ``bound += int(bound * factor)``, cumulatively; ``min_size``/``max_size`` of the
      sampler are the starting bounds.
    * ``ResolutionCurriculum.linear(epochs, start_max_size)`` / ``.cosine(...)``: the max
      resolution grows smoothly from ``start_max_size`` at epoch 0 to the sampler's
      ``max_size`` at epoch ``epochs - 1`` (linear, or half-cosine ease-in-out); the min
      stays at ``min_size``.

    The base pair (H0, W0) joins an epoch's grid only while it lies within that epoch's
    bounds (so an early small-resolution epoch is not forced to the base size); the batch
    size keeps using the fixed reference resolution, so pixels per batch stay constant.

    >>> import fastload
    >>> cur = fastload.ResolutionCurriculum.linear(epochs=10, start_max_size=160)
    >>> s = fastload.VariableBatchSampler(1000, base_size=224, base_batch_size=64, min_size=128,
    ...                                   max_size=288, curriculum=cur)
    >>> s.grid[-1][:2], (s.set_epoch(9), s.grid[-1][:2])[1]
    ((160, 160), (288, 288))
    """

    MODES = ("step", "linear", "cosine")

    def __init__(self, mode: str = "step", milestones: Sequence[int] = (), factor: float = 0.25,
                 epochs: Optional[int] = None, start_max_size: Optional[Size] = None):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        if mode == "step":
            ms = [int(m) for m in milestones]
            if any(m < 0 for m in ms):
                raise ValueError(f"milestones must be epochs >= 0, got {list(milestones)}")
            if not (isinstance(factor, (int, float)) and factor >= 0 and math.isfinite(factor)):
                raise ValueError(f"factor must be a finite number >= 0, got {factor!r}")
            self.milestones, self.factor = sorted(ms), float(factor)
            self.epochs, self.start_max_size = None, None
        else:
            if not isinstance(epochs, (int, np.integer)) or epochs < 1:
                raise ValueError(f"epochs must be an int >= 1 for a {mode} curriculum, got {epochs!r}")
            if start_max_size is None:
                raise ValueError(f"start_max_size is required for a {mode} curriculum")
            self.epochs, self.start_max_size = int(epochs), _pair("start_max_size", start_max_size)
            self.milestones, self.factor = [], 0.0

    @classmethod
    def step(cls, milestones: Sequence[int], factor: float = 0.25) -> "ResolutionCurriculum":
        return cls("step", milestones=milestones, factor=factor)

    @classmethod
    def linear(cls, epochs: int, start_max_size: Size) -> "ResolutionCurriculum":
        return cls("linear", epochs=epochs, start_max_size=start_max_size)

    @classmethod
    def cosine(cls, epochs: int, start_max_size: Size) -> "ResolutionCurriculum":
        return cls("cosine", epochs=epochs, start_max_size=start_max_size)

    @property
    def horizon(self) -> int:
        """The last epoch at which the bounds change (they stay put afterwards)."""
        if self.mode == "step":
            return self.milestones[-1] if self.milestones else 0
        return self.epochs - 1

    def progress(self, epoch: int) -> float:
        """Fraction of the growth done at ``epoch`` (smooth modes)."""
        p = 1.0 if self.epochs <= 1 else min(1.0, max(0.0, epoch / (self.epochs - 1)))
        return p if self.mode == "linear" else 0.5 * (1.0 - math.cos(math.pi * p))

    def bounds(self, epoch: int, min_size: Tuple[int, int], max_size: Tuple[int, int]):
        """((min_h, min_w), (max_h, max_w)) at ``epoch``."""
        if self.mode == "step":
            lo, hi = list(min_size), list(max_size)
            for m in self.milestones:
                if m <= epoch:
                    # integer growth exactly as the reference's update_scales
                    lo = [v + int(v * self.factor) for v in lo]
                    hi = [v + int(v * self.factor) for v in hi]
            return tuple(lo), tuple(hi)
        f = self.progress(epoch)
        s = self.start_max_size
        hi = tuple(s[a] + (max_size[a] - s[a]) * f for a in (0, 1))
        return tuple(min_size), hi

    def validate(self, min_size, max_size) -> None:
        if self.mode != "step":
            s = self.start_max_size
            for a in (0, 1):
                if not min_size[a] <= s[a] <= max_size[a]:
                    raise ValueError(f"start_max_size {s} must lie within [min_size {min_size}, "
                                     f"max_size {max_size}]")

    def __repr__(self) -> str:
        if self.mode == "step":
            return f"ResolutionCurriculum.step(milestones={self.milestones}, factor={self.factor})"
        return f"ResolutionCurriculum.{self.mode}(epochs={self.epochs}, start_max_size={self.start_max_size})"


# --------------------------------------------------------------------------- sampler
def _chunk_key(seed: int, epoch: int, bucket: int) -> int:
    from fastload.tokens.decompose import _chunk_hash

    return _chunk_hash(seed, epoch, bucket, 0x5CA1E)  # salt: not the LM sampler's keys


def _plan_shapes(plan: "_Plan") -> np.ndarray:
    """(steps, 3) int64: every step's (h, w, b)."""
    return np.stack([np.asarray(plan.h, np.int64), np.asarray(plan.w, np.int64),
                     np.asarray(plan.end, np.int64) - np.asarray(plan.start, np.int64)], axis=1).reshape(-1, 3)


def _plan_digest(plan: "_Plan") -> int:
    """crc32 of every step's (h, w, b): equal on all ranks iff their epochs have the same shapes."""
    return zlib.crc32(np.ascontiguousarray(_plan_shapes(plan)).tobytes())


class _Plan:
    """One epoch on one rank: per bucket, how to produce this rank's sample ids (lazily); per
    step, its bucket, shape and slice of the bucket's per-rank positions."""

    __slots__ = ("buckets", "bucket", "h", "w", "b", "start", "end", "n")

    def __init__(self, buckets, bucket, h, w, b, start, end):
        self.buckets = buckets  # per bucket: (members or None, n_all, per, permutation key or None)
        self.bucket, self.h, self.w, self.b, self.start, self.end = bucket, h, w, b, start, end
        self.n = len(bucket)


# Ids are produced in windows of this many positions: one native call and one tolist() per
# window instead of per batch (each costs ~1 us of fixed overhead).
_WINDOW = 8192


def _permute_lib():
    from fastload.tokens.decompose import _lib

    return _lib()


class VariableBatchSampler(StepIterable, DistributedArgs):
    """Batch sampler with one resolution per step and a constant pixel budget per batch.

    Each step yields a list of ``(index, h, w)`` tuples; every batch has one (h, w) and
    ``b = floor(base_batch_size * Hr * Wr / (h * w))`` samples (``Hr, Wr`` = the base crop,
    or ``max_size`` with ``batch_reference="max"``), except a short last batch per bucket
    when ``drop_last=False``: no batch holds more pixels than the base batch.
    ``rounding="nearest"`` (half up) or ``"cvnets"`` (ml-cvnets' ``int(round(x, 2))``) give
    batches up to half a sample, or 0.005 of one, over that budget. ``b`` is the per-rank
    batch size.

    Randomness (sample order, scale per step, bucket interleaving) comes from a private
    generator seeded by ``(seed, epoch)`` and is the same on every rank; the sample order of
    each bucket is a keyed pseudo-random permutation (key from ``(seed, epoch, bucket)``)
    evaluated lazily at the positions a batch needs, so an epoch costs O(its batches) on every
    rank, not an O(dataset) shuffle. Distributed (torch.distributed initialized, or
    ``rank``/``world_size`` given): each bucket's permuted ids are padded by repeating its
    first ids up to a multiple of ``world_size`` (at most ``world_size - 1`` duplicates per
    bucket per epoch) and cut into ``world_size`` contiguous equal parts, part r for rank r;
    every rank then gets the same number of steps and the same (h, w, b) at each step.
    ``check_shapes=True`` all-reduces each step's shape and raises ``RuntimeError`` when ranks
    disagree (one collective per step; for debugging).

    Aspect-ratio buckets (``aspect_ratios=``: per-sample h/w ratios, an (N, 2) array of native
    (h, w), or an object with ``source_hw`` such as a ``ReinforcedDataset``): samples are
    grouped by the nearest of ``aspect_buckets`` (in log ratio); for each bucket ratio r each
    grid scale (h, w) becomes (sqrt(h w r), sqrt(h w / r)) made divisible by ``divisible_by``
    (same area, so one side may exceed ``max_size``), so batches hold one bucket, one shape
    and need no padding. The loader picks crops of that shape's ratio.

    State (:mod:`fastload._state`): position (epoch, step), a finished pass moves to the next
    epoch, ``set_epoch(e)`` keeps the position when ``e`` is the current epoch, a new
    ``iter()`` supersedes the previous iterator. Checkpoint it when a torch DataLoader drives
    the sampler; ``ReinforcedLoader`` places it at its own position itself: checkpoint the
    loader there. The state holds the world size (the per-rank split is not elastic).

    >>> import fastload
    >>> s = fastload.VariableBatchSampler(1000, base_size=256, base_batch_size=32,
    ...                                   min_size=160, max_size=320, num_scales=5, seed=0)
    >>> s.grid
    [(160, 160, 81), (192, 192, 56), (256, 256, 32), (288, 288, 25), (320, 320, 20)]
    >>> steps = len(s); batch = next(iter(s)); len({(h, w) for _, h, w in batch})
    1
    >>> rest = list(s)  # a new iter() continues at the position: step 1
    >>> len(rest) == steps - 1 and sum(map(len, rest)) == 1000 - len(batch)
    True
    >>> s.epoch  # the complete pass moved to the next epoch
    1
    """

    def __init__(self, num_samples, base_size: Size = 256, base_batch_size: int = 128,
                 min_size: Size = 160, max_size: Size = 320, num_scales: int = 5, *,
                 divisible_by: int = 32, pairing: str = "index", batch_reference: Union[str, Size] = "base",
                 curriculum: Optional[ResolutionCurriculum] = None, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, rank: Optional[int] = None, world_size: Optional[int] = None,
                 check_shapes: bool = False, aspect_ratios=None,
                 aspect_buckets: Sequence[float] = DEFAULT_ASPECT_BUCKETS, rounding: str = "floor"):
        if not isinstance(num_samples, (int, np.integer)):
            try:
                num_samples = len(num_samples)
            except TypeError:
                raise ValueError(f"num_samples must be an int or a sized dataset, got {num_samples!r}") from None
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if pairing not in ("index", "product"):
            raise ValueError(f"pairing must be 'index' or 'product', got {pairing!r}")
        self.rounding = _check_rounding(rounding)
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.num_samples = int(num_samples)
        self.base_size = _pair("base_size", base_size)
        self.min_size = _pair("min_size", min_size)
        self.max_size = _pair("max_size", max_size)
        _validate_bounds(self.base_size, self.min_size, self.max_size, num_scales, base_batch_size, divisible_by)
        self.base_batch_size, self.num_scales = int(base_batch_size), int(num_scales)
        self.divisible_by, self.pairing = int(divisible_by), pairing
        self.batch_reference = _reference(batch_reference, self.base_size, self.max_size)
        if curriculum is not None and not isinstance(curriculum, ResolutionCurriculum):
            raise ValueError(f"curriculum must be a ResolutionCurriculum, got {type(curriculum).__name__}")
        if curriculum is not None:
            curriculum.validate(self.min_size, self.max_size)
        self.curriculum = curriculum
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        self._init_ranks(rank, world_size)  # read when used: see fastload._dist.DistributedArgs
        self.check_shapes = bool(check_shapes)

        self._ratios: Optional[List[float]] = None
        self._members: List[np.ndarray] = [np.arange(self.num_samples, dtype=np.int64)]
        if aspect_ratios is not None:
            self._init_buckets(aspect_ratios, aspect_buckets)

        self._init_position()  # step: batches handed out this epoch (fastload._state)
        self._grids: Dict[int, List[List[Tuple[int, int, int]]]] = {}
        self._plans: Dict[Tuple[int, int], _Plan] = {}  # (epoch, world size) -> plan
        # fail now, not at epoch 57, if a curriculum grid makes b < 1
        for e in sorted({0, self.horizon}):
            self._bucket_grids(e)

    # ---------------------------------------------------------------- buckets and grids
    def _init_buckets(self, aspect_ratios, aspect_buckets) -> None:
        src = getattr(aspect_ratios, "source_hw", aspect_ratios)
        try:
            arr = np.asarray(src, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError("aspect_ratios must be per-sample h/w ratios, an (N, 2) array of (h, w) "
                             "or an object with source_hw") from None
        if arr.ndim == 2 and arr.shape[1] == 2:
            if np.any(arr <= 0):
                raise ValueError("aspect_ratios: source sizes (h, w) must be positive")
            arr = arr[:, 0] / arr[:, 1]
        if arr.ndim != 1 or len(arr) != self.num_samples:
            raise ValueError(f"aspect_ratios must give one ratio per sample ({self.num_samples}), "
                             f"got shape {np.shape(src)}")
        if not np.all(np.isfinite(arr) & (arr > 0)):
            raise ValueError("aspect_ratios must be positive and finite")
        buckets = np.asarray(sorted({float(r) for r in aspect_buckets}), dtype=np.float64)
        if buckets.size == 0 or not np.all(np.isfinite(buckets) & (buckets > 0)):
            raise ValueError(f"aspect_buckets must be positive ratios, got {aspect_buckets!r}")
        which = np.abs(np.log(arr)[:, None] - np.log(buckets)[None, :]).argmin(axis=1)
        self._ratios, self._members = [], []
        for k, r in enumerate(buckets):
            # int32 when it fits: half the memory that the shuffled gathers touch at random
            ids = np.flatnonzero(which == k).astype(np.int32 if self.num_samples < 2**31 else np.int64)
            if ids.size:  # empty buckets produce no shapes
                self._ratios.append(float(r))
                self._members.append(ids)

    def _bounds(self, epoch: int):
        if self.curriculum is None:
            return self.min_size, self.max_size
        return self.curriculum.bounds(epoch, self.min_size, self.max_size)

    def _key_epoch(self, epoch: int) -> int:
        # grids stop changing after the curriculum's horizon
        return min(epoch, self.horizon)

    def _bucket_grids(self, epoch: int) -> List[List[Tuple[int, int, int]]]:
        key = self._key_epoch(epoch)
        g = self._grids.get(key)
        if g is not None:
            return g
        pairs = self._pairs(key)
        d, bs0, ref = self.divisible_by, self.base_batch_size, self.batch_reference
        where = f" (epoch {key})" if self.curriculum is not None else ""
        if self._ratios is None:
            grids = [[(h, w, _batch_for(bs0, ref, h, w, self.rounding)) for h, w in pairs]]
        else:
            grids = []
            for r in self._ratios:
                shp = {(make_divisible(math.sqrt(h * w * r), d), make_divisible(math.sqrt(h * w / r), d))
                       for h, w in pairs}
                grids.append([(h, w, _batch_for(bs0, ref, h, w, self.rounding)) for h, w in sorted(shp)])
        for gr in grids:
            _check_batches(gr, where)
        self._grids[key] = grids
        return grids

    def _pairs(self, epoch: int) -> List[Tuple[int, int]]:
        lo, hi = self._bounds(self._key_epoch(epoch))
        base = self.base_size
        inside = all(lo[a] <= base[a] <= hi[a] for a in (0, 1))
        return _scale_pairs(base, lo, hi, self.num_scales, self.divisible_by, self.pairing,
                            include_base=self.curriculum is None or inside)

    @property
    def horizon(self) -> int:
        """Last epoch whose grid differs from the one before (0 without a curriculum)."""
        return 0 if self.curriculum is None else self.curriculum.horizon

    @property
    def grid(self) -> List[Tuple[int, int, int]]:
        """The current epoch's (h, w, b) list (without aspect buckets; else see ``bucket_grids``)."""
        if self._ratios is None:
            return list(self._bucket_grids(self._epoch)[0])
        return [(h, w, _batch_for(self.base_batch_size, self.batch_reference, h, w, self.rounding))
                for h, w in self._pairs(self._epoch)]

    @property
    def bucket_grids(self) -> Optional[Dict[float, List[Tuple[int, int, int]]]]:
        """Aspect ratio (h/w) -> its (h, w, b) list for the current epoch; None without buckets."""
        if self._ratios is None:
            return None
        return dict(zip(self._ratios, (list(g) for g in self._bucket_grids(self._epoch))))

    @property
    def bucket_sizes(self) -> Optional[Dict[float, int]]:
        """Aspect ratio -> number of samples in that bucket; None without buckets."""
        if self._ratios is None:
            return None
        return {r: int(m.size) for r, m in zip(self._ratios, self._members)}

    # ---------------------------------------------------------------- epoch plan
    def _rng(self, epoch: int) -> np.random.Generator:
        # rank-independent on purpose: every rank must draw the same scales
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, int(epoch)])))

    def _plan(self, epoch: int) -> _Plan:
        W = self.world_size
        plan = self._plans.get((epoch, W))
        if plan is not None:
            return plan
        rng = self._rng(epoch)
        grids = self._bucket_grids(epoch)
        buckets, parts = [], []
        for k, (members, grid) in enumerate(zip(self._members, grids)):
            n_all = members.size
            per = -(-n_all // W)
            # The epoch's order of bucket k is a keyed permutation P of [0, n_all) (key from
            # (seed, epoch, bucket), never the rank), evaluated only at this rank's positions
            # when a batch needs them: no O(n) shuffle per epoch and rank.
            key = _chunk_key(self.seed, epoch, k) if self.shuffle else None
            buckets.append((None if self._ratios is None else members, n_all, per, key))
            g = np.asarray(grid, dtype=np.int64)
            bsz = g[:, 2]
            draws = rng.integers(0, len(g), size=per // int(bsz.min()) + 2)
            ends = np.cumsum(bsz[draws])
            nsteps = int(np.searchsorted(ends, per)) + 1  # first step whose end reaches `per`
            draws, ends = draws[:nsteps], np.minimum(ends[:nsteps], per)
            starts = np.concatenate([[0], ends[:-1]])
            if self.drop_last and nsteps and ends[-1] - starts[-1] < bsz[draws[-1]]:
                draws, starts, ends = draws[:-1], starts[:-1], ends[:-1]
            parts.append(np.stack([np.full(len(draws), k), g[draws, 0], g[draws, 1], bsz[draws],
                                   starts, ends], axis=1))
        steps = np.concatenate(parts, axis=0) if parts else np.zeros((0, 6), np.int64)
        if len(parts) > 1:  # interleave the buckets' batches
            steps = steps[rng.permutation(len(steps))]
            # then hand each bucket's positions out in step order (the ids at the positions are
            # random anyway), so a bucket's batches read its id windows front to back
            for k in range(len(parts)):
                sel = np.flatnonzero(steps[:, 0] == k)
                ln = steps[sel, 5] - steps[sel, 4]
                steps[sel, 5] = np.cumsum(ln)
                steps[sel, 4] = steps[sel, 5] - ln
        cols = [c.tolist() for c in steps.T]
        plan = _Plan(buckets, *cols)
        if len(self._plans) > 4:
            self._plans.clear()
        self._plans[(epoch, W)] = plan
        return plan

    def _ids_array(self, bucket, a: int, m: int) -> np.ndarray:
        """Sample ids (int64 array) at this rank's positions [a, a + m) of a bucket.

        Rank r holds the positions [r * per, (r + 1) * per) of the bucket's permuted order,
        extended past n_all by wrapping to its start (the padding repeats the first ids)."""
        members, n_all, per, key = bucket
        g0 = self.rank * per + a
        if key is None and g0 + m <= n_all:
            return np.arange(g0, g0 + m, dtype=np.int64) if members is None else members[g0:g0 + m]
        out = np.empty(m, np.int64)
        lib = _permute_lib() if key is not None else None
        done = 0
        while done < m:  # contiguous runs of P's argument (one run unless padding wraps)
            q = (g0 + done) % n_all
            run = min(m - done, n_all - q)
            if key is None:
                out[done:done + run] = np.arange(q, q + run)
            else:
                st = lib.fl_dd_permute(n_all, key, q, run, out.ctypes.data + 8 * done)
                if st != 0:
                    raise RuntimeError(f"permutation failed: {lib.fl_last_error().decode()}")
            done += run
        return out if members is None else members[out]

    def _ids(self, bucket, a: int, m: int) -> list:
        members, n_all, per, key = bucket
        g0 = self.rank * per + a
        if key is None and members is None and g0 + m <= n_all:
            return list(range(g0, g0 + m))
        return self._ids_array(bucket, a, m).tolist()

    def steps(self, epoch: Optional[int] = None) -> np.ndarray:
        """(num_steps, 3) int64 array of (h, w, batch length) per step of ``epoch`` on this rank."""
        p = self._plan(self._epoch if epoch is None else int(epoch))
        return np.stack([np.asarray(p.h, np.int64), np.asarray(p.w, np.int64),
                         np.asarray(p.end, np.int64) - np.asarray(p.start, np.int64)], axis=1).reshape(-1, 3)

    def pixels_per_epoch(self, epoch: Optional[int] = None) -> int:
        """Pixels rendered in ``epoch`` over all ranks (exact: from the epoch's plan)."""
        s = self.steps(epoch)
        return int((s[:, 0] * s[:, 1] * s[:, 2]).sum()) * self.world_size

    def samples_per_epoch(self, epoch: Optional[int] = None) -> int:
        """Samples yielded in ``epoch`` over all ranks (padding included, drop_last excluded)."""
        return int(self.steps(epoch)[:, 2].sum()) * self.world_size

    # ---------------------------------------------------------------- shapes / warm-up
    def shapes(self, epochs: Optional[Sequence[int]] = None, largest_first: bool = False) -> List[Tuple[int, int, int]]:
        """The finite set of batch shapes (b, h, w).

        ``epochs=None``: the full-batch shapes of every grid the curriculum can produce.
        Given ``epochs``: the exact shapes of those epochs' plans on this rank, short last
        batches included (with ``drop_last=False`` their b varies from epoch to epoch).
        ``largest_first=True`` orders by pixels per batch, then per image, descending (the
        warm-up order: the first compile/capture reserves the peak memory).
        """
        out = set()
        if epochs is None:
            for e in range(self.horizon + 1):
                for grid in self._bucket_grids(e):
                    out.update((b, h, w) for h, w, b in grid)
        else:
            for e in epochs:
                out.update(map(tuple, self.steps(e)[:, [2, 0, 1]].tolist()))
        if largest_first:
            return sorted(out, key=lambda s: (s[0] * s[1] * s[2], s[1] * s[2], s), reverse=True)
        return sorted(out)

    def warmup_batches(self, epochs: Optional[Sequence[int]] = None) -> List[List[Tuple[int, int, int]]]:
        """One batch per shape, largest first, to pre-compile (torch.compile, CUDA graphs)
        before training: feed them through the loader and the model once."""
        return [[(i % self.num_samples, h, w) for i in range(b)]
                for b, h, w in self.shapes(epochs, largest_first=True)]

    # ---------------------------------------------------------------- iteration
    def __len__(self) -> int:
        """Number of batches this epoch on this rank (the same on every rank)."""
        return self._plan(self._epoch).n

    def _grid_code(self, epoch: int) -> int:
        g = np.asarray([x for gr in self._bucket_grids(epoch) for x in gr], dtype=np.int64)
        return zlib.crc32(g.tobytes()) ^ (self.num_samples << 32)

    def iter_arrays(self) -> Iterator[Tuple[np.ndarray, int, int]]:
        """Like ``iter(self)`` (same batches, same position tracking for ``state_dict``) but
        yields ``(indices int64[b], h, w)`` instead of a list of tuples: no Python object per
        sample, for consumers that want arrays (a loader rendering the batch in C++).

        >>> import fastload
        >>> s = fastload.VariableBatchSampler(1000, 256, 32, 160, 320, seed=0)
        >>> arrays = [(list(i), h, w) for i, h, w in s.iter_arrays()]
        >>> s.set_epoch(0)
        >>> arrays == [([i for i, _, _ in b], b[0][1], b[0][2]) for b in s]
        True
        """
        return self._iterate(arrays=True)

    # ---------------------------------------------------------------- the plan (StepIterable)
    def _num_steps(self, epoch: int) -> int:
        return self._plan(epoch).n

    def _plan_steps(self, epoch: int, start: int, arrays: bool = False):
        plan = self._plan(epoch)
        if self.check_shapes:
            self._check_plan(plan, epoch, start)
        if arrays:
            return self._array_batches(plan, start)
        return self._batches(plan, start)

    def _check_plan(self, plan: _Plan, epoch: int, start: int) -> None:
        """Here, on the thread that starts the iteration: the plan fixes every step's shape,
        so agreeing on its digest now agrees on every batch ahead of time (a loader drives
        the steps from its prefetch thread, where no collective may run). On a mismatch with
        equal step counts, one more collective names the first step whose shape differs."""
        what = f"the epoch plan (steps, grid, resume step, epoch, shapes) of epoch {epoch}"
        values = [plan.n, self._grid_code(epoch), start, epoch, _plan_digest(plan)]
        mm = min_max_across_ranks(values, what)
        if mm is None or mm[0] == mm[1]:
            return
        detail = ""
        if mm[0][0] == mm[1][0]:  # every rank has this many steps: compare them
            shapes = _plan_shapes(plan)
            lo, hi = min_max_across_ranks(shapes.reshape(-1).tolist(), what)
            bad = np.flatnonzero((np.asarray(lo) != np.asarray(hi)).reshape(-1, 3).any(axis=1))
            if bad.size:
                s = int(bad[0])
                detail = (f"; the first step whose batch shape (h, w, b) differs is step {s} "
                          f"(this rank: {tuple(shapes[s].tolist())})")
        raise disagreement(values, what, *mm, detail=detail)

    def _steps(self, plan: _Plan, first: int, fetch):
        """Per step from ``first``: (window of this rank's ids, offset, batch size, h, w).
        ``fetch(bucket, start, count)`` gives a window (a list or an array); one native call
        serves many steps."""
        check = self.check_shapes and not on_background_thread()
        bk, hs, ws, st, en = plan.bucket, plan.h, plan.w, plan.start, plan.end
        # per bucket: first position and ids of the current window
        win_at = [0] * len(plan.buckets)
        win = [None] * len(plan.buckets)
        for s in range(first, plan.n):
            h, w, k, a, e = hs[s], ws[s], bk[s], st[s], en[s]
            if check:
                check_same_across_ranks([s, h, w, e - a], f"the batch shape (step, h, w, b) at step {s}")
            ids = win[k]
            if ids is None or a < win_at[k] or e - win_at[k] > len(ids):
                bucket = plan.buckets[k]
                win_at[k] = a
                ids = win[k] = fetch(bucket, a, min(max(_WINDOW, e - a), bucket[2] - a))
            yield ids, a - win_at[k], e - a, h, w

    def _epoch_end(self, epoch: int) -> None:
        if self.check_shapes and not on_background_thread():
            # a rank with more steps meets this sentinel instead of hanging
            check_epoch_end(4, f"the batch shape (step, h, w, b) of epoch {epoch}")

    def _batches(self, plan: _Plan, first: int) -> Iterator[List[Tuple[int, int, int]]]:
        for ids, o, b, h, w in self._steps(plan, first, self._ids):
            # product(ids[o:o + b], (h,), (w,)) builds the (i, h, w) tuples ~15% faster than zip/repeat
            yield list(product(ids[o:o + b], (h,), (w,)))

    def _array_batches(self, plan: _Plan, first: int):
        for ids, o, b, h, w in self._steps(plan, first, self._ids_array):
            yield ids[o:o + b].astype(np.int64), h, w  # a copy (int64 even for int32 members)

    @property
    def _epoch(self) -> int:
        return self._pos.epoch

    def _fingerprint(self, epoch: int) -> dict:
        return {"seed": self.seed, "num_samples": self.num_samples, "world_size": self.world_size,
                "grid_code": self._grid_code(epoch)}

    def state_dict(self, batches_consumed: Optional[int] = None) -> dict:
        """Position for an exact mid-epoch resume (fastload._state keys).

        The sampler counts the batches it has handed out; a DataLoader with workers prefetches
        ahead of the training loop, so pass ``batches_consumed`` (the number of this epoch's
        batches the model has actually seen) when checkpointing under one.
        """
        st = super().state_dict()
        if batches_consumed is not None:
            if int(batches_consumed) < 0:
                raise ValueError(f"batches_consumed must be >= 0, got {batches_consumed}")
            st["step"] = int(batches_consumed)
        return st

    def _upgrade_state(self, state):
        if "fingerprint" not in state:  # saved before the contract: the fields were top level
            missing = [k for k in ("seed", "num_samples", "world_size") if k not in state]
            if missing:
                raise StateError(f"VariableBatchSampler.load_state_dict: the state is missing {missing}")
            self._legacy_fields = True
            state = {**state, "fingerprint": {k: state[k] for k in
                                              ("seed", "num_samples", "world_size", "grid_code") if k in state}}
        return state

    def __repr__(self) -> str:
        return (f"VariableBatchSampler(num_samples={self.num_samples}, grid={self.grid}, "
                f"rank={self.rank}/{self.world_size}, epoch={self._epoch}, curriculum={self.curriculum})")


class AtResolution:
    """Map-style dataset adapter for ``torch.utils.data.DataLoader(..., batch_sampler=sampler)``:
    ``ds[(index, h, w)] = transform(dataset[index], h, w)``.

    >>> import numpy as np, torch, fastload
    >>> from fastload.batch.variable import AtResolution
    >>> images = [np.zeros((300, 400, 3), np.uint8)] * 10
    >>> crop = lambda img, h, w: torch.from_numpy(img[:h, :w]).permute(2, 0, 1)
    >>> s = fastload.VariableBatchSampler(10, 224, 4, 160, 288, seed=0)
    >>> dl = torch.utils.data.DataLoader(AtResolution(images, crop), batch_sampler=s)
    >>> [tuple(x.shape[2:]) in {(h, w) for h, w, _ in s.grid} for x in dl] == [True] * len(s)
    True
    """

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        try:
            index, h, w = key
        except (TypeError, ValueError):
            raise ValueError(f"AtResolution expects (index, h, w) keys from a VariableBatchSampler, "
                             f"got {key!r}") from None
        return self.transform(self.dataset[index], h, w)
