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

from fastload._dist import rank_world

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


class ShardedSampler:
    """Shuffled (or sequential) indices, sharded over ranks, reproducible from (seed, epoch).

    Rank and world size come from the arguments, else from ``torch.distributed`` when it is
    initialized, else (0, 1). ``len(sampler)`` is this rank's count, equal on every rank.
    ``state_dict()`` records the epoch and the indices yielded in it; after
    ``load_state_dict`` the next iteration resumes at the exact next index. A new ``iter()``
    otherwise restarts the epoch (DataLoader semantics). When the sampler is passed to a
    ``ReinforcedLoader``, checkpoint the loader (it counts consumed batches), not the sampler.

    Example:
        >>> s = ShardedSampler(10, shuffle=True, seed=0, rank=1, world_size=3)
        >>> s.set_epoch(2)
        >>> len(s), len(list(s))
        (4, 4)
        >>> a = ShardedSampler(10, seed=0, rank=0, world_size=3); a.set_epoch(2)
        >>> b = ShardedSampler(10, seed=0, rank=2, world_size=3); b.set_epoch(2)
        >>> sorted(set(list(a)) | set(list(s)) | set(list(b))) == list(range(10))
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
        self.rank, self.world_size = rank_world(rank, world_size)
        self.epoch = 0
        self._pos = 0  # indices already yielded in this epoch
        self._resume = 0  # where the next __iter__ starts (set by load_state_dict only)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order. Setting the epoch being resumed keeps the resume point."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self._pos = self._resume = 0
        self.epoch = epoch

    def indices(self, epoch: Optional[int] = None) -> np.ndarray:
        """This rank's full index array for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else int(epoch)
        order = epoch_permutation(self.num_samples, self.seed, epoch, self.shuffle)
        return shard_indices(order, self.rank, self.world_size, self.pad)

    def __len__(self) -> int:
        n, w = self.num_samples, self.world_size
        return -(-n // w) if self.pad else n // w

    def __iter__(self) -> Iterator[int]:
        idx = self.indices()
        start, self._resume = min(self._resume, len(idx)), 0
        self._pos = start
        for k in range(start, len(idx)):
            self._pos = k + 1
            yield int(idx[k])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self._pos, "seed": self.seed,
                "num_samples": self.num_samples, "world_size": self.world_size,
                "shuffle": self.shuffle, "pad": self.pad}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_samples", "world_size"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(f"state_dict {key}={state[key]} does not match this sampler's "
                                 f"{key}={getattr(self, key)}")
        self.epoch = int(state["epoch"])
        self._pos = self._resume = int(state["pos"])
