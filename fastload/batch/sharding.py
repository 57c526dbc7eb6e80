"""Deterministic, shuffled index sampling sharded over distributed ranks.

The order of an epoch is a pure function of ``(seed, epoch)`` (a private NumPy PCG64 seeded
through a SeedSequence; never Python's global ``random`` or torch's global RNG), so every rank
computes the same permutation without communicating, and a resumed run gets the same order.

Sharding rule (as torch's ``DistributedSampler``): the permutation is made a multiple of
``world_size`` long, then rank ``r`` takes positions ``r, r + world, r + 2 world, ...``.

- ``pad=True`` (default): the permutation is extended by repeating its first
  ``(-n) % world_size`` indices. Every sample is seen at least once per epoch; at most
  ``world_size - 1`` samples are seen twice.
- ``pad=False``: the last ``n % world_size`` indices of the permutation are dropped (a
  different set every epoch); no sample is seen twice.

Either way every rank gets exactly the same number of indices, hence the same number of
batches and, per step, the same batch size.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from fastload._dist import DistributedArgs
from fastload._state import StepIterable, is_legacy

_SHUFFLE_TAG = 0x5348_5546  # separates this stream from the loader's other seeded streams


def epoch_permutation(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The epoch's global order (int64), identical on every rank and every run."""
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch), _SHUFFLE_TAG])
    return np.random.Generator(np.random.PCG64(ss)).permutation(num_samples).astype(np.int64)


def shard_indices(order: np.ndarray, rank: int, world_size: int, pad: bool = True) -> np.ndarray:
    """This rank's share of ``order`` under the module's padding/dropping rule."""
    n = len(order)
    if world_size == 1:
        return order
    if pad:
        extra = (-n) % world_size
        if extra:
            reps = -(-extra // max(n, 1))
            order = np.concatenate([order, np.tile(order, reps)[:extra]])
    else:
        order = order[: n - n % world_size]
    return order[rank::world_size]


class ShardedSampler(StepIterable, DistributedArgs):
    """Shuffled (or sequential) indices, sharded over ranks, reproducible from (seed, epoch).

    Rank and world size come from the arguments, else from ``torch.distributed`` when it is
    initialized, else (0, 1), read when iteration starts. ``len(sampler)`` is this rank's
    count, equal on every rank. State (:mod:`fastload._state`): a step is one global batch of
    ``world_size`` indices (one per rank), so ``step`` counts the indices this rank has
    yielded in the epoch (the same number on every rank); a complete pass moves to the next
    epoch; ``set_epoch(e)`` keeps the position when ``e`` is the current epoch; ``iter()``
    continues at the position and supersedes an older iterator. When the sampler is passed
    to a ``ReinforcedLoader``, checkpoint the loader (it counts consumed batches; the
    sampler's state nests in the loader's).

    Example:
        >>> s = ShardedSampler(10, shuffle=True, seed=0, rank=1, world_size=3)
        >>> s.set_epoch(2)
        >>> len(s), len(list(s)), s.epoch  # a complete pass moves to the next epoch
        (4, 4, 3)
        >>> parts = [ShardedSampler(10, seed=0, rank=r, world_size=3).indices(2) for r in range(3)]
        >>> sorted(set(np.concatenate(parts).tolist())) == list(range(10))
        True
    """

    _step_aliases = ("pos", "batches_done")  # names of step in states saved before the contract

    def __init__(self, num_samples: int, shuffle: bool = True, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None, pad: bool = True):
        if int(num_samples) < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.num_samples = int(num_samples)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.pad = bool(pad)
        self._init_ranks(rank, world_size)  # read when used (fastload._dist.DistributedArgs)
        self._init_position()

    def indices(self, epoch: Optional[int] = None) -> np.ndarray:
        """This rank's full index array for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else int(epoch)
        order = epoch_permutation(self.num_samples, self.seed, epoch, self.shuffle)
        return shard_indices(order, self.rank, self.world_size, self.pad)

    def __len__(self) -> int:
        n, w = self.num_samples, self.world_size
        return -(-n // w) if self.pad else n // w

    # -- the plan (fastload._state.StepIterable) -----------------------------------------------
    def _num_steps(self, epoch: int) -> int:
        return len(self)

    def _plan_steps(self, epoch: int, start: int):
        return map(int, self.indices(epoch)[start:])

    def _fingerprint(self, epoch: int = 0) -> dict:
        return {"seed": self.seed, "num_samples": self.num_samples, "world_size": self.world_size,
                "shuffle": self.shuffle, "pad": self.pad}

    def _upgrade_state(self, state):
        if is_legacy(state):  # saved before the contract: the fields were at the top level
            self._legacy_fields = True
            return {**state, "fingerprint": {k: state[k] for k in self._fingerprint() if k in state}}
        return state
