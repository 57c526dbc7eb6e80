"""One sequence-length bucket per step, constant tokens per step (Dataset Decomposition).

Bucket ``k`` holds rows of ``2^k + 1`` tokens; a step from bucket ``k`` is ``b_k =
tokens_per_step / 2^k`` rows, so every step carries ``tokens_per_step`` input tokens (per
rank). Which bucket a step uses is the ``schedule``:

* ``"remaining"`` (default): at every step bucket ``k`` is drawn with probability
  proportional to ``(batches left in k) x odds_k``; a new order every epoch;
* ``"reference"``: the mixer of Dataset Decomposition's published code (its open_lm patch,
  ``MyRandomMix`` with the ``--train-data-mix-weights`` of ``get_dd_params``): *fixed*
  weights ``(batches of k in the epoch) x odds_k`` until a bucket runs out, which then
  leaves the mix; draws come from ``random.Random(seed)`` exactly as upstream's (one
  ``random()`` per draw, including the draw that finds a bucket empty), so with one
  worker per GPU the bucket order is upstream's for the same ``--seed``; the same order
  every epoch, as upstream rebuilds the mixer with the same seed
  (``schedule_per_epoch=True`` draws a new one per epoch).

With pow2 odds the reference mixer empties the short buckets early (on the README's
example, 2^19 tokens per step over buckets 8..13 of the upstream wiki example, bucket 8 is
gone after 36% of the epoch, vs 76% with ``"remaining"``) and ends the epoch on the long
buckets alone. Curricula:

* ``"pow2"``: odds ``2^(max - k)`` (32, 16, 8, 4, 2, 1 for buckets 8..13): short buckets
  drain first, so the sequence length grows within a cycle;
* ``"uniform"``: all odds 1 (the order is a uniformly random interleaving);
* a dict ``{k: odds}`` or a sequence aligned with the sorted buckets.

Sequential draws with weights ``remaining x odds`` are exactly weighted sampling without
replacement, so the whole schedule of a cycle is drawn at once: every batch of bucket k gets
the key ``E / odds_k`` (E ~ Exp(1)) and the steps are the batches sorted by key
(Efraimidis-Spirakis). ``cycles=c`` splits each bucket's batches of an epoch into c equal
consecutive parts; each cycle runs its own curriculum over its part (length goes short ->
long c times per pass over the data).

Randomness: the ``"remaining"`` schedule comes from a private ``numpy`` Generator seeded by
``(seed, epoch)`` (``(seed, 0)`` with ``schedule_per_epoch=False``);
the rows of bucket k are shuffled by a keyed permutation of ``[0, n_k)`` with key
``H(seed, epoch, k)`` evaluated per index in C++ (``fl_dd_permute``), so a step costs
O(batch size), not an O(rows) table per epoch. The rank never enters either, so every rank
draws the same bucket at every step.

Distributed rule (elastic): ``tokens_per_step`` is per rank, so a step's *global* batch of
bucket k has ``G_k = b_k * world_size`` rows. Bucket k contributes ``m_k = floor(n_k / G_k)``
global batches per epoch; global batch j of bucket k is positions ``[j G_k, (j + 1) G_k)`` of
the epoch's row permutation, and rank r takes its slice ``[j G_k + r b_k, j G_k + (r + 1) b_k)``.
The schedule and the permutation depend on (seed, epoch, global tokens per step) only, never
on the world size itself, so a state saved at world size W1 resumes at W2 (with
``tokens_per_step`` scaled to keep ``tokens_per_step * world_size``) and continues the same
global batches: no row seen twice or missed in that epoch. The last ``n_k - m_k G_k`` rows of
the permutation are not used in that epoch (with ``shuffle=True`` a different subset each
epoch). Every rank has the same number of steps and the same bucket and shape at every step.

State: :mod:`fastload._state` (``state_dict()`` is the same on every rank; its fingerprint
holds the global tokens per step, not the world size).
"""
from __future__ import annotations

import random
import zlib
from typing import Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .._dist import DistributedArgs, check_epoch_end, check_same_across_ranks, on_background_thread
from .._state import StepIterable
from .._native import check
from ..tokens.decompose import _chunk_hash, _lib

Odds = Union[str, Mapping[int, float], Sequence[float]]

__all__ = ["BucketBatchSampler", "curriculum_odds", "SCHEDULES"]

SCHEDULES = ("remaining", "reference")

# Rows of a bucket permuted per native call (several batches: the call's fixed cost, a few
# microseconds, would otherwise be paid every step).
_WINDOW = 4096


def curriculum_odds(buckets: Sequence[int], curriculum: Odds) -> np.ndarray:
    """Odds per bucket (sorted ``buckets``) for a curriculum name or user-given odds.

    >>> curriculum_odds([8, 9, 10], "pow2").tolist()
    [4.0, 2.0, 1.0]
    """
    buckets = sorted(buckets)
    if isinstance(curriculum, str):
        if curriculum == "pow2":
            return np.array([2.0 ** (buckets[-1] - k) for k in buckets])
        if curriculum == "uniform":
            return np.ones(len(buckets))
        raise ValueError(f"curriculum must be 'pow2', 'uniform', a dict or a sequence of odds, got {curriculum!r}")
    if isinstance(curriculum, Mapping):
        missing = [k for k in buckets if k not in curriculum]
        if missing:
            raise ValueError(f"curriculum: no odds for buckets {missing}")
        odds = np.array([float(curriculum[k]) for k in buckets])
    else:
        odds = np.asarray(list(curriculum), dtype=np.float64)
        if odds.shape != (len(buckets),):
            raise ValueError(f"curriculum: expected {len(buckets)} odds (one per bucket {buckets}), got {odds.size}")
    if not np.all(np.isfinite(odds)) or np.any(odds <= 0):
        raise ValueError(f"curriculum: odds must be finite and > 0, got {odds.tolist()}")
    return odds


def _reference_mix(counts: np.ndarray, weights: np.ndarray, rng: random.Random) -> np.ndarray:
    """Bucket index of every step under upstream's fixed-weight mixer.

    Upstream draws ``r = rng.random()`` and takes source ``searchsorted(cumsum(p / sum(p)), r)``;
    a draw that lands on an exhausted source removes it (and its weight) without yielding.
    Every draw consumes one number, so the whole stream (batches + one per source) is drawn
    up front and consumed in vectorized runs between removals. A ``r`` past the last cumulative
    weight (float rounding) goes to the last source, where upstream would raise IndexError.
    """
    left = [int(c) for c in counts]
    live = [b for b in range(len(left)) if left[b] > 0]
    total = sum(left)
    n = total + len(live)
    u = np.fromiter((rng.random() for _ in range(n)), np.float64, n)  # no list of n floats
    out = np.empty(total, np.int64)
    t = pos = 0
    while live:
        p = np.array([float(weights[b]) for b in live])
        pick = np.minimum(np.searchsorted((p / np.sum(p)).cumsum(), u[pos:]), len(live) - 1)
        stop = len(pick)  # the first draw that finds its source empty
        for j, b in enumerate(live):
            hits = np.flatnonzero(pick[:stop] == j)
            if len(hits) > left[b]:
                stop = int(hits[left[b]])
        taken = pick[:stop]
        out[t:t + stop] = np.asarray(live)[taken]
        t += stop
        for j, b in enumerate(live):
            left[b] -= int(np.count_nonzero(taken == j))
        del live[int(pick[stop])]
        pos += stop + 1
    return out


class BucketBatchSampler(StepIterable, DistributedArgs):
    """Yields ``(k, rows)``: the bucket of the step and this rank's row indices into it.

    ``rows``: ``{k: number of rows in bucket k}``. ``tokens_per_step`` (per rank) must be a
    multiple of the longest bucket length ``2^max(k)``. One pass (``len(self)`` steps) is an
    epoch. Position, epochs, resume and the one-live-iterator rule follow
    :mod:`fastload._state`: ``state_dict()`` taken after n batches and loaded into a fresh
    sampler (any world size with the same global tokens per step) resumes with batch n + 1,
    bit for bit. ``check_every=n`` (distributed) all-reduces (step, bucket, batch size) every
    n steps, and an end-of-epoch sentinel, and raises if ranks disagree.

    >>> s = BucketBatchSampler({8: 64, 9: 16}, tokens_per_step=2048, seed=0)
    >>> [(k, len(r)) for k, r in s][:3]
    [(8, 8), (9, 4), (8, 8)]
    >>> len(s)
    12
    """

    def __init__(self, rows: Mapping[int, int], tokens_per_step: int, curriculum: Odds = "pow2", cycles: int = 1,
                 seed: int = 0, shuffle: bool = True, rank: Optional[int] = None,
                 world_size: Optional[int] = None, check_every: int = 0, schedule: str = "remaining",
                 schedule_per_epoch: Optional[bool] = None):
        if not rows:
            raise ValueError("rows: no buckets")
        self.buckets = sorted(int(k) for k in rows)
        self.rows = np.array([int(rows[k]) for k in self.buckets], dtype=np.int64)
        if np.any(self.rows < 0):
            raise ValueError(f"rows: negative counts {dict(zip(self.buckets, self.rows.tolist()))}")
        longest = 1 << self.buckets[-1]
        if not isinstance(tokens_per_step, (int, np.integer)) or tokens_per_step <= 0:
            raise ValueError(f"tokens_per_step must be a positive integer, got {tokens_per_step!r}")
        if tokens_per_step % longest:
            raise ValueError(f"tokens_per_step ({tokens_per_step}) must be divisible by the longest bucket "
                             f"length {longest} (bucket {self.buckets[-1]})")
        if not isinstance(cycles, (int, np.integer)) or cycles < 1:
            raise ValueError(f"cycles must be an integer >= 1, got {cycles!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.tokens_per_step = int(tokens_per_step)
        self.batch_size = np.array([self.tokens_per_step >> k for k in self.buckets], dtype=np.int64)
        self.odds = curriculum_odds(self.buckets, curriculum)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.schedule_name = schedule
        # upstream rebuilds its mixer with the same seed every epoch; ours draws anew
        self.schedule_per_epoch = (schedule == "remaining") if schedule_per_epoch is None else bool(schedule_per_epoch)
        self.cycles, self.seed, self.shuffle = int(cycles), int(seed), bool(shuffle)
        self._init_ranks(rank, world_size)  # read when used (fastload._dist.DistributedArgs)
        self.check_every = int(check_every)
        self._init_position()
        self._plan_epoch = None
        self._lib = _lib()
        self._nrows = self.rows.tolist()

    # ------------------------------------------------------------------ schedule
    @property
    def batches(self) -> np.ndarray:
        """Global batches per bucket per epoch (= each rank's batches of that bucket)."""
        return self.rows // (self.batch_size * self.world_size)

    def __len__(self) -> int:
        return int(self.batches.sum())

    def _plan(self) -> None:
        if self._plan_epoch == (self.epoch, self.world_size):
            return
        e = self.epoch if self.schedule_per_epoch else 0
        rng = np.random.default_rng([self.seed, e])
        # upstream's MyRandomMix seeds random.Random(seed); epoch e > 0 adds e << 96
        mix_rng = random.Random(self.seed + (e << 96)) if self.schedule_name == "reference" else None
        nb = len(self.buckets)
        self._keys = [_chunk_hash(self.seed, self.epoch, k, 0x5EED) for k in self.buckets]
        sched_b, sched_j = [], []
        for c in range(self.cycles):
            lo = self.batches * c // self.cycles
            hi = self.batches * (c + 1) // self.cycles
            cnt = hi - lo
            if mix_rng is not None:
                s = _reference_mix(cnt, cnt * self.odds, mix_rng)
            else:
                balls = np.repeat(np.arange(nb), cnt)
                keys = rng.standard_exponential(balls.size) / self.odds[balls]
                s = balls[np.argsort(keys, kind="stable")]
            j = np.empty_like(s)
            for b in range(nb):
                pos = np.flatnonzero(s == b)
                j[pos] = lo[b] + np.arange(pos.size)
            sched_b.append(s)
            sched_j.append(j)
        self._sched_b = np.concatenate(sched_b) if sched_b else np.zeros(0, np.int64)
        self._sched_j = np.concatenate(sched_j) if sched_j else np.zeros(0, np.int64)
        # Python ints: per-step arithmetic on numpy scalars costs ~100 ns per operation.
        self._sb, self._sj = self._sched_b.tolist(), self._sched_j.tolist()
        self._plan_epoch = (self.epoch, self.world_size)

    def _rows(self, b: int, start: int, count: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(start, start + count, dtype=np.int64)
        out = np.empty(count, np.int64)
        st = self._lib.fl_dd_permute(self._nrows[b], self._keys[b], start, count, out.ctypes.data)
        check(self._lib, st, "bucket permutation")
        return out

    def schedule(self) -> np.ndarray:
        """The bucket (k) of every step of the current epoch."""
        self._plan()
        return np.asarray(self.buckets)[self._sched_b]

    @property
    def _step(self) -> int:
        return self._pos.step

    def step_rows(self, t: int) -> Tuple[int, np.ndarray]:
        """(k, this rank's rows) of step t of the current epoch."""
        self._plan()
        b = int(self._sched_b[t])
        bs = int(self.batch_size[b])
        start = (int(self._sched_j[t]) * self.world_size + self.rank) * bs
        return self.buckets[b], self._rows(b, start, bs)

    # ------------------------------------------------------------------ the plan (StepIterable)
    def _num_steps(self, epoch: int) -> int:
        return len(self)

    def _plan_steps(self, epoch: int, start: int):
        self._plan()
        n = len(self)
        # per-step checks only where the iteration is driven from the caller's thread; the
        # first check covers the whole schedule (its digest), so a loader's background
        # thread needs none
        check_every = self.check_every if not on_background_thread() else 0
        if check_every > 0:
            digest = zlib.crc32(np.ascontiguousarray(self._sched_b, dtype=np.int64).tobytes())
            check_same_across_ranks([epoch, start, n, self.seed, digest, *self.rows.tolist()],
                                    "epoch/step/steps per epoch/seed/schedule/bucket rows")
        return self._steps(start, n, check_every)

    def _steps(self, first: int, n: int, check_every: int):
        buckets, sb, sj, rows = self.buckets, self._sb, self._sj, self._rows
        bsz, W = self.batch_size.tolist(), self.world_size
        # global batch j of bucket b is [j G, (j + 1) G) of its permutation (G = W b_b); this
        # rank's slice starts at r b_b inside it. Rows come from windows of >= _WINDOW
        # permutation positions (one native call each), read front to back.
        gsz = [W * bs for bs in bsz]
        end = [m * g for m, g in zip(self.batches.tolist(), gsz)]
        off = [self.rank * bs for bs in bsz]
        win_at, win = [0] * len(buckets), [None] * len(buckets)
        for t in range(first, n):
            b = sb[t]
            bs, g = bsz[b], gsz[b]
            start = sj[t] * g
            if check_every > 0 and t % check_every == 0:
                check_same_across_ranks([t, buckets[b], bs], "step/bucket/batch size")
            w = win[b]
            o = start - win_at[b]
            if w is None or o < 0 or o + g > len(w):
                win_at[b], o = start, 0
                w = win[b] = rows(b, start, min(max(_WINDOW, g), end[b] - start))
            o += off[b]
            yield buckets[b], w[o:o + bs]

    def _epoch_end(self, epoch: int) -> None:
        if self.check_every > 0 and not on_background_thread():
            check_epoch_end(3, "step/bucket/batch size")  # a rank with more steps meets this

    # ------------------------------------------------------------------ state
    def _fingerprint(self, epoch: int = 0) -> dict:
        # the global tokens per step, not the world size: the state resumes elastically
        return {"buckets": list(self.buckets), "rows": self.rows.tolist(),
                "global_tokens_per_step": self.tokens_per_step * self.world_size,
                "odds": self.odds.tolist(), "cycles": self.cycles, "seed": self.seed,
                "shuffle": self.shuffle, "schedule": self.schedule_name,
                "schedule_per_epoch": self.schedule_per_epoch}

    def _upgrade_state(self, state):
        if "fingerprint" not in state and isinstance(state.get("config"), Mapping):
            # a state saved before the contract: its config had the per-rank tokens and world size
            cfg = dict(state["config"])
            if "tokens_per_step" in cfg and "world_size" in cfg:
                cfg["global_tokens_per_step"] = int(cfg.pop("tokens_per_step")) * int(cfg.pop("world_size"))
            self._legacy_fields = True
            state = {**state, "fingerprint": cfg}
        return state
