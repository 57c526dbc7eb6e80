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

from typing import Iterator, Optional

import numpy as np

from fastload._dist import DistributedArgs
from fastload._state import Position

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


class ShardedSampler(DistributedArgs):
    """Shuffled (or sequential) indices, sharded over ranks, reproducible from (seed, epoch).

    Rank and world size come from the arguments, else from ``torch.distributed`` when it is
    initialized, else (0, 1). ``len(sampler)`` is this rank's count, equal on every rank.
    State (:mod:`fastload._state`): ``step`` counts the indices yielded in the epoch (the
    same on every rank); a complete pass moves to the next epoch; ``set_epoch(e)`` keeps the
    position when ``e`` is the current epoch; ``iter()`` continues at the position and
    supersedes an older iterator. When the sampler is passed to a ``ReinforcedLoader``,
    checkpoint the loader (it counts consumed batches), not the sampler.

    Example:
        >>> s = ShardedSampler(10, shuffle=True, seed=0, rank=1, world_size=3)
        >>> s.set_epoch(2)
        >>> len(s), len(list(s)), s.epoch  # a complete pass moves to the next epoch
        (4, 4, 3)
        >>> parts = [ShardedSampler(10, seed=0, rank=r, world_size=3).indices(2) for r in range(3)]
        >>> sorted(set(np.concatenate(parts).tolist())) == list(range(10))
        True
    """

    def __init__(self, num_samples: int, shuffle: bool = True, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None, pad: bool = True):
        if int(num_samples) < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.num_samples = int(num_samples)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.pad = bool(pad)
        self._init_ranks(rank, world_size)  # read when used (fastload._dist.DistributedArgs)
        self._pos = Position("ShardedSampler")

    @property
    def epoch(self) -> int:
        return self._pos.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order; the current epoch keeps its position."""
        self._pos.set_epoch(epoch)

    def indices(self, epoch: Optional[int] = None) -> np.ndarray:
        """This rank's full index array for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else int(epoch)
        order = epoch_permutation(self.num_samples, self.seed, epoch, self.shuffle)
        return shard_indices(order, self.rank, self.world_size, self.pad)

    def __len__(self) -> int:
        n, w = self.num_samples, self.world_size
        return -(-n // w) if self.pad else n // w

    def __iter__(self) -> Iterator[int]:
        return self._iterate(self._pos.begin())

    def _iterate(self, token: int) -> Iterator[int]:
        pos = self._pos
        pos.check(token)
        self._bind_ranks()
        idx = self.indices()
        for k in range(min(pos.step, len(idx)), len(idx)):
            pos.check(token)
            pos.step = k + 1
            if k == len(idx) - 1:  # the pass is complete once its last index is out
                pos.finish(token)
            yield int(idx[k])
        if pos.is_live(token):  # nothing was yielded (resumed at the end)
            pos.finish(token)

    def _fingerprint(self) -> dict:
        return {"seed": self.seed, "num_samples": self.num_samples, "world_size": self.world_size,
                "shuffle": self.shuffle, "pad": self.pad}

    def state_dict(self) -> dict:
        return self._pos.state(self._fingerprint())

    def load_state_dict(self, state: dict) -> None:
        if "fingerprint" not in state:  # saved before the contract: fields at the top level
            state = {**state, "fingerprint": {k: state[k] for k in self._fingerprint() if k in state}}
        self._pos.load(state, self._fingerprint(), step_aliases=("pos", "batches_done"))
