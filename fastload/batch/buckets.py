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

Distributed trimming rule: bucket k contributes ``m_k = floor(n_k / (b_k * world_size))``
batches per rank per epoch. The epoch's row permutation is cut into ``m_k * world_size``
consecutive groups of b_k rows; group ``r * m_k + j`` is batch j of rank r (each rank reads
one contiguous part of the permutation, in windows of several batches per native call). The last
``n_k - m_k * b_k * world_size`` rows of the permutation are not used in that epoch (with
``shuffle=True`` a different subset each epoch). Every rank thus has the same number of
batches per bucket, the same steps and the same shapes per step.
"""
from __future__ import annotations

import random
from typing import Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .._dist import check_same_across_ranks, rank_world
from .._native import check
from ..format.decompose import _chunk_hash, _lib

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


class BucketBatchSampler:
    """Yields ``(k, rows)``: the bucket of the step and this rank's row indices into it.

    ``rows``: ``{k: number of rows in bucket k}``. ``tokens_per_step`` (per rank) must be a
    multiple of the longest bucket length ``2^max(k)``. One pass (``len(self)`` steps) is an
    epoch; after a complete pass the epoch advances by itself (``set_epoch`` overrides).
    ``state_dict()`` taken after n batches and loaded into a fresh sampler resumes with batch
    n + 1, bit for bit. ``check_every=n`` (distributed) all-reduces (step, bucket, batch
    size) every n steps and raises if ranks disagree.

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
        self.rank, self.world_size = rank_world(rank, world_size)
        self.check_every = int(check_every)
        self.batches = self.rows // (self.batch_size * self.world_size)  # per rank, per epoch
        self.epoch, self._step = 0, 0
        self._plan_epoch = None
        self._lib = _lib()
        self._nrows = self.rows.tolist()

    # ------------------------------------------------------------------ schedule
    def __len__(self) -> int:
        return int(self.batches.sum())

    def _plan(self) -> None:
        if self._plan_epoch == self.epoch:
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
        self._plan_epoch = self.epoch

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

    def step_rows(self, t: int) -> Tuple[int, np.ndarray]:
        """(k, this rank's rows) of step t of the current epoch."""
        self._plan()
        b = int(self._sched_b[t])
        bs = int(self.batch_size[b])
        start = (self.rank * int(self.batches[b]) + int(self._sched_j[t])) * bs
        return self.buckets[b], self._rows(b, start, bs)

    def __iter__(self) -> Iterator[Tuple[int, np.ndarray]]:
        self._plan()
        n = len(self)
        if self.check_every > 0:
            check_same_across_ranks([self.epoch, self._step, n, self.seed, *self.rows.tolist()],
                                    "epoch/step/steps per epoch/seed/bucket rows")
        buckets, sb, sj, rows = self.buckets, self._sb, self._sj, self._rows
        bsz, check_every = self.batch_size.tolist(), self.check_every
        # this rank's part of bucket b starts at row r * m_b * b_b; its batches are read front
        # to back, so rows come from windows of >= _WINDOW rows (one native call each)
        first = [self.rank * m * bs for m, bs in zip(self.batches.tolist(), bsz)]
        end = [f + m * bs for f, m, bs in zip(first, self.batches.tolist(), bsz)]
        win_at, win = [0] * len(buckets), [None] * len(buckets)
        while self._step < n:
            t = self._step
            b = sb[t]
            bs = bsz[b]
            start = first[b] + sj[t] * bs
            if check_every > 0 and t % check_every == 0:
                check_same_across_ranks([t, buckets[b], bs], "step/bucket/batch size")
            w = win[b]
            o = start - win_at[b]
            if w is None or o < 0 or o + bs > len(w):
                win_at[b], o = start, 0
                w = win[b] = rows(b, start, min(max(_WINDOW, bs), end[b] - start))
            self._step = t + 1
            yield buckets[b], w[o:o + bs]
        # A complete pass: the next iteration is the next epoch.
        self.epoch += 1
        self._step = 0

    # ------------------------------------------------------------------ state
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first step (call before iterating, as with DistributedSampler)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch, self._step = int(epoch), 0

    def _fingerprint(self) -> dict:
        return {"buckets": self.buckets, "rows": self.rows.tolist(), "tokens_per_step": self.tokens_per_step,
                "odds": self.odds.tolist(), "cycles": self.cycles, "seed": self.seed, "shuffle": self.shuffle,
                "world_size": self.world_size, "schedule": self.schedule_name,
                "schedule_per_epoch": self.schedule_per_epoch}

    def state_dict(self) -> Dict:
        return {"epoch": self.epoch, "step": self._step, "config": self._fingerprint()}

    def load_state_dict(self, state: Mapping) -> None:
        cfg = state.get("config")
        if cfg is not None and cfg != self._fingerprint():
            diff = sorted(k for k in cfg if cfg[k] != self._fingerprint().get(k))
            raise ValueError(f"state_dict was saved with a different sampler configuration ({', '.join(diff)})")
        step = int(state["step"])
        self.epoch = int(state["epoch"])
        self._plan()
        if not 0 <= step <= len(self):
            raise ValueError(f"state_dict step {step} outside [0, {len(self)}]")
        self._step = step
