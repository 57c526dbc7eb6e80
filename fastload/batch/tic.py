"""Time-continual rehearsal (TiC): replay policies over timestamped splits as a batch sampler.

TiC-CLIP (Garg et al., "TiC-CLIP: Continual Training of CLIP Models", ICLR 2024) trains on
timestamped splits D_1, D_2, ... (years or months of web data). At time step t the model
warm-starts from the checkpoint of step t-1 and trains on a fixed compute budget (a fixed
number of samples seen) drawn from the new split D_t plus replayed old data; the paper's
finding is that this cuts compute about 2.5x against retraining from scratch on all data.
The replay policies differ in which old data the pool keeps (D = the replay buffer size, in
samples; m = t-1 old splits):

- ``"cumulative-all"``: all old data, D_1 ∪ ... ∪ D_{t-1}, is replayed (no buffer limit);
- ``"cumulative-equal"``: a buffer of D old samples split equally among the old splits
  (D/m from each);
- ``"cumulative-exp"``: a buffer of D old samples with exponentially decaying shares: half
  from the most recent old split, a quarter from the one before, and so on, the oldest two
  splits sharing equally (step 3: D/2, D/2; step 4: D/2, D/4, D/4);
- ``"restricted"``: a fixed-size buffer of D old samples drawn uniformly from all old data
  (every old sample equally likely, whatever split it came from).

In every policy the new split D_t enters the pool whole. Note: the names and the first
three definitions follow the paper's Section 4 as summarized in its public reviews; the
paper's own text was not retrievable here, so check the exact "-Exp" halving rule against
it before relying on a figure comparison.

How fastload draws them (deterministic, resumable):

- Which samples a buffer keeps is a bottom-k selection by a fixed random key per sample
  (seeded by (seed, split, index)), so the buffer at step t+1 is always a subset of the
  buffer at step t plus D_t: a sample once dropped never comes back, as with a real
  buffer of bounded size. A split smaller than its share is kept whole (the buffer is then
  not full; the share is not redistributed).
- The round's order passes through the pool without replacement, pass after pass (each a
  seeded permutation), ``budget`` samples per epoch: the per-step budget is
  ``global_batch_size`` and the number of steps per epoch is ``budget // global_batch_size``,
  whatever the policy or the pool size.
- Indices are into the concatenation of the splits (``ConcatDataset(splits)``); a rank takes
  its slice of each global batch; the state follows :mod:`fastload._state` with per-split
  counters (samples of each split consumed up to the position).

>>> s = TiCSampler([100, 100, 100, 50], time_step=3, policy="cumulative-exp", buffer_size=40,
...                budget=64, global_batch_size=16, seed=0)
>>> s.pool_counts()      # old splits 0, 1, 2 (exp shares 10, 10, 20), then the new split whole
[10, 10, 20, 50]
>>> len(list(s))
4
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np

from fastload._dist import rank_world
from fastload._state import Position
from fastload.batch.mixing import _GlobalBatches, _rng, chain, largest_remainder

POLICIES = ("cumulative-all", "cumulative-equal", "cumulative-exp", "restricted")
_TAG_KEY = 0x5449_4331
_TAG_ORDER = 0x5449_4332


class TiCSampler(_GlobalBatches):
    """Batches of ConcatDataset indices over timestamped splits under a TiC replay policy.

    Args:
        split_sizes: samples per split, oldest first.
        time_step: index of the newest split trained on now (0-based; splits after it are unseen).
        policy: one of ``POLICIES`` (see the module docstring for the definitions).
        budget: samples per epoch (the round's compute budget; fixed whatever the policy).
        global_batch_size: samples per step over all ranks.
        buffer_size: D, the replay buffer size in samples (required except for "cumulative-all").
        seed, drop_last, rank, world_size, slicing: as :class:`fastload.batch.mixing.StreamMixer`.
    """

    kind = "TiCSampler"

    def __init__(self, split_sizes: Sequence[int], time_step: int, policy: str, budget: int,
                 global_batch_size: int, buffer_size: Optional[int] = None, seed: int = 0,
                 drop_last: bool = True, rank: Optional[int] = None, world_size: Optional[int] = None,
                 slicing: str = "contiguous"):
        self.sizes = np.asarray(list(split_sizes), np.int64)
        if self.sizes.ndim != 1 or len(self.sizes) == 0 or (self.sizes < 0).any():
            raise ValueError("split_sizes must be a non-empty list of sample counts >= 0")
        if not 0 <= int(time_step) < len(self.sizes):
            raise ValueError(f"time_step must be in [0, {len(self.sizes)}), got {time_step}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if policy != "cumulative-all" and int(time_step) > 0 and (buffer_size is None or int(buffer_size) < 0):
            raise ValueError(f"policy {policy!r} needs buffer_size (the replay buffer D, in samples, >= 0)")
        self.time_step, self.policy = int(time_step), policy
        self.buffer_size = None if buffer_size is None else int(buffer_size)
        self.budget, self.global_batch_size = int(budget), int(global_batch_size)
        if self.budget < 1 or self.global_batch_size < 1:
            raise ValueError("budget and global_batch_size must be >= 1")
        self.seed, self.drop_last = int(seed), bool(drop_last)
        r, w = rank_world(rank, world_size)
        if self.global_batch_size % w:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not a multiple of the world size {w}")
        if slicing not in ("contiguous", "strided"):
            raise ValueError(f"slicing must be 'contiguous' or 'strided', got {slicing!r}")
        self.rank, self.world_size, self.slicing = r, w, slicing
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self._pos = Position(self.kind)
        self._pool = self._make_pool()
        if len(self._pool) == 0:
            raise ValueError(f"the pool at time step {self.time_step} is empty (split sizes {self.sizes.tolist()})")

    # -- the pool ------------------------------------------------------------------------------
    def _keys(self, i: int) -> np.ndarray:
        return _rng(self.seed, _TAG_KEY, i).random(int(self.sizes[i]))

    def _bottom(self, i: int, k: int) -> np.ndarray:
        k = min(int(k), int(self.sizes[i]))
        if k <= 0:
            return np.zeros(0, np.int64)
        keys = self._keys(i)
        return np.sort(np.argsort(keys, kind="stable")[:k]).astype(np.int64) + self.offsets[i]

    def shares(self) -> List[int]:
        """Old samples the buffer keeps per old split (before capping at the split's size)."""
        m, D = self.time_step, self.buffer_size
        if m == 0:
            return []
        if self.policy == "cumulative-all":
            return [int(x) for x in self.sizes[:m]]
        if self.policy == "cumulative-equal":
            return largest_remainder(D, [1.0] * m).tolist() if D else [0] * m
        if self.policy == "cumulative-exp":
            ages = np.arange(m, 0, -1)  # split i has age m - i (1 = most recent old split)
            w = 2.0 ** -np.minimum(ages, m - 1 if m > 1 else 1).astype(np.float64)
            if m == 1:
                w = np.ones(1)
            return largest_remainder(D, w).tolist() if D else [0] * m
        # restricted: uniform over all old data: the union's bottom-D keys
        keys = np.concatenate([self._keys(i) for i in range(m)]) if m else np.zeros(0)
        chosen = np.argsort(keys, kind="stable")[: min(D, len(keys))]
        split = np.searchsorted(np.cumsum(self.sizes[:m]), chosen, side="right")
        return np.bincount(split, minlength=m).astype(int).tolist()

    def _make_pool(self) -> np.ndarray:
        m = self.time_step
        parts = []
        if self.policy == "restricted" and m:
            keys = np.concatenate([self._keys(i) for i in range(m)])
            chosen = np.sort(np.argsort(keys, kind="stable")[: min(self.buffer_size, len(keys))])
            # union position -> concat index (old splits are contiguous from offset 0)
            parts.append(chosen.astype(np.int64))
        else:
            for i, k in enumerate(self.shares()):
                parts.append(self._bottom(i, k))
        parts.append(np.arange(self.offsets[m], self.offsets[m] + self.sizes[m], dtype=np.int64))
        return np.concatenate(parts)

    def pool(self) -> np.ndarray:
        """ConcatDataset indices this round draws from (sorted)."""
        return self._pool

    def pool_counts(self) -> List[int]:
        """Samples per split in the pool (old splits first, then the new one)."""
        return np.bincount(self.split_of(self._pool), minlength=self.time_step + 1)[: self.time_step + 1].tolist()

    def split_of(self, indices) -> np.ndarray:
        return np.searchsorted(self.offsets, np.asarray(indices, np.int64), side="right") - 1

    # -- the order -------------------------------------------------------------------------------
    def global_order(self, epoch: int) -> np.ndarray:
        """The epoch's indices (``budget`` of them), the same on every rank."""
        idx = chain(len(self._pool), int(epoch) * self.budget, self.budget, self.seed, _TAG_ORDER, self.time_step)
        return self._pool[idx]

    def __len__(self) -> int:
        G = self.global_batch_size
        return self.budget // G if self.drop_last else -(-self.budget // G)


    def consumed(self, epoch: int, step: int) -> Dict[str, int]:
        """Samples of each split consumed at (epoch, step), all ranks together."""
        n = len(self.sizes)
        done = np.zeros(n, np.int64)
        used = len(self) * self.global_batch_size
        for e in range(int(epoch)):
            done += np.bincount(self.split_of(self.global_order(e)[:used]), minlength=n)
        cur = self.global_order(epoch)[: int(step) * self.global_batch_size]
        done += np.bincount(self.split_of(cur), minlength=n)
        return {str(i): int(done[i]) for i in range(n)}

    @property
    def fingerprint(self) -> Dict[str, Any]:
        return {"seed": self.seed, "split_sizes": self.sizes.tolist(), "time_step": self.time_step,
                "policy": self.policy, "buffer_size": self.buffer_size, "budget": self.budget,
                "global_batch_size": self.global_batch_size, "drop_last": self.drop_last}

    def state_dict(self) -> Dict[str, Any]:
        return self._pos.state(self.fingerprint, splits=self.consumed(self._pos.epoch, self._pos.step),
                               pool_size=int(len(self._pool)))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._pos.load(state, self.fingerprint)


__all__ = ["TiCSampler", "POLICIES"]
