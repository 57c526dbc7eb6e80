"""Stream mixing: several datasets in fixed proportions, deterministic and resumable.

:class:`StreamMixer` yields batches of indices into the concatenation of the streams (the
index space of ``torch.utils.data.ConcatDataset(datasets)``), so any map-style datasets mix.

Rules (all a pure function of the seed and the position, never of the world size):

- An epoch has ``epoch_size`` samples; stream ``i`` contributes ``counts[i]`` of them, the
  largest-remainder rounding of ``epoch_size * p_i`` (p normalized), so the counts sum to
  ``epoch_size`` exactly.
- Stream ``i`` is read as an endless chain of its own permutations (pass ``c`` is
  ``perm(seed, i, c)``): no sample of a stream repeats before the stream has been seen whole,
  across epoch boundaries too, whatever the proportions. A stream smaller than its share is
  repeated (upsampled); a larger one is read partly per epoch and continues next epoch.
- Inside an epoch the streams interleave by a seeded permutation of the stream labels, so each
  global batch holds about ``p_i * G`` samples of stream ``i``.
- A rank takes its slice of each global batch (``slicing="contiguous"``: rows
  ``[r*G/W, (r+1)*G/W)``; ``"strided"``: rows ``r, r+W, ...``).

State (the contract of :mod:`fastload._state`): ``epoch``, ``step``, ``fingerprint`` (seed,
epoch size, global batch size, stream names and sizes) plus ``streams`` (samples consumed per
stream up to the position), ``proportions`` and the base the counters are measured from. A
state saved with other proportions loads at an epoch boundary (step 0) and the streams
continue from their counters; mid-epoch it is an error, because the interleaving would
change under the loaded step.

>>> m = StreamMixer({"imagenet": 100, "flowers": 10}, [0.75, 0.25], epoch_size=40,
...                 global_batch_size=8, seed=0)
>>> batches = list(m)
>>> len(batches), int(sum((b >= 100).sum() for b in batches))   # 5 steps, 10 flowers samples
(5, 10)
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from fastload.errors import StateError
from fastload._dist import DistributedArgs
from fastload._state import StepIterable

_TAG_STREAM = 0x4D49_5831
_TAG_LABELS = 0x4D49_5832


def _rng(seed: int, *words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [int(seed) & 0xFFFFFFFFFFFFFFFF] + [int(w) for w in words])))


def chain(n: int, start: int, count: int, seed: int, *words: int) -> np.ndarray:
    """Items ``start .. start+count-1`` of the endless chain of permutations of ``range(n)``
    (pass ``c`` is the permutation seeded by (seed, *words, c))."""
    if count <= 0:
        return np.zeros(0, np.int64)
    if n <= 0:
        raise ValueError("cannot draw from an empty stream")
    out, pos, end = [], int(start), int(start) + int(count)
    while pos < end:
        c, off = divmod(pos, n)
        take = min(n - off, end - pos)
        out.append(_rng(seed, *words, c).permutation(n)[off:off + take])
        pos += take
    return np.concatenate(out).astype(np.int64)


def largest_remainder(total: int, weights: Sequence[float]) -> np.ndarray:
    """Integers proportional to ``weights`` summing to ``total`` (ties to the lower index)."""
    w = np.asarray(weights, np.float64)
    if w.ndim != 1 or len(w) == 0 or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"proportions must be non-negative, finite, with a positive sum; got {list(weights)}")
    exact = total * w / w.sum()
    base = np.floor(exact).astype(np.int64)
    rest = int(total - base.sum())
    if rest:
        order = np.lexsort((np.arange(len(w)), -(exact - base)))
        base[order[:rest]] += 1
    return base


def _slice(batch: np.ndarray, rank: int, world: int, slicing: str) -> np.ndarray:
    if world == 1:
        return batch
    if slicing == "contiguous":
        b = len(batch) // world
        return batch[rank * b:(rank + 1) * b]
    return batch[rank::world]


class _GlobalBatches(StepIterable, DistributedArgs):
    """The plan of samplers whose epoch is a global order (``global_order(epoch)``) cut into
    global batches of ``global_batch_size``, each rank taking its slice (StreamMixer,
    TiCSampler); iteration and state are fastload._state.StepIterable's."""

    def _setup(self, seed, drop_last, rank, world_size, slicing) -> None:
        """Seed, rank slicing and the position (after ``global_batch_size`` and ``kind``)."""
        self.seed, self.drop_last = int(seed), bool(drop_last)
        self._init_ranks(rank, world_size)  # read when used (fastload._dist.DistributedArgs)
        self._check_world(self.world_size)
        if slicing not in ("contiguous", "strided"):
            raise ValueError(f"slicing must be 'contiguous' or 'strided', got {slicing!r}")
        self.slicing = slicing
        self._init_position(self.kind)

    def _check_world(self, w: int) -> None:
        if self.global_batch_size % w:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not a multiple of the world size {w}")

    def _start_iteration(self) -> None:
        self._check_world(self._bind_ranks()[1])

    def _num_steps(self, epoch: int) -> int:
        return len(self)

    def _plan_steps(self, epoch: int, start: int):
        order = self.global_order(epoch)
        G = self.global_batch_size
        rank, world = self.rank, self.world_size
        return (_slice(order[step * G:(step + 1) * G], rank, world, self.slicing)
                for step in range(start, len(self)))

    def _fingerprint(self, epoch: int = 0) -> Dict[str, Any]:
        return self.fingerprint


class StreamMixer(_GlobalBatches):
    """Batches of ConcatDataset indices mixing several streams in fixed proportions.

    Args:
        streams: {name: number of samples} (or a list of (name, size)), in ConcatDataset order.
        proportions: one weight per stream (normalized here).
        epoch_size: samples per epoch over all streams.
        global_batch_size: samples per step over all ranks (a multiple of the world size).
        seed: everything derives from it.
        drop_last: drop the last partial global batch (default) or keep it.
        rank, world_size: default from torch.distributed, else (0, 1).
        slicing: how a rank takes its part of a global batch ("contiguous" or "strided").
    """

    kind = "StreamMixer"

    def __init__(self, streams: Union[Mapping[str, int], Sequence[Tuple[str, int]]], proportions: Sequence[float],
                 epoch_size: int, global_batch_size: int, seed: int = 0, drop_last: bool = True,
                 rank: Optional[int] = None, world_size: Optional[int] = None, slicing: str = "contiguous"):
        items = list(streams.items()) if isinstance(streams, Mapping) else [tuple(x) for x in streams]
        if not items:
            raise ValueError("StreamMixer needs at least one stream")
        self.names = [str(k) for k, _ in items]
        self.sizes = np.array([int(v) for _, v in items], np.int64)
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"stream names must be unique, got {self.names}")
        if (self.sizes <= 0).any():
            raise ValueError(f"every stream needs samples; sizes {dict(zip(self.names, self.sizes.tolist()))}")
        if len(proportions) != len(items):
            raise ValueError(f"{len(proportions)} proportions for {len(items)} streams")
        self.proportions = [float(p) for p in proportions]
        self.epoch_size, self.global_batch_size = int(epoch_size), int(global_batch_size)
        if self.epoch_size < 1 or self.global_batch_size < 1:
            raise ValueError("epoch_size and global_batch_size must be >= 1")
        self.counts = largest_remainder(self.epoch_size, self.proportions)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self._setup(seed, drop_last, rank, world_size, slicing)
        self._base_epoch = 0
        self._base = np.zeros(len(items), np.int64)  # samples consumed per stream before _base_epoch

    # -- the order ---------------------------------------------------------------------------
    def _labels(self, epoch: int) -> np.ndarray:
        lab = np.repeat(np.arange(len(self.counts)), self.counts)
        return lab[_rng(self.seed, epoch, _TAG_LABELS).permutation(len(lab))]

    def _before(self, epoch: int) -> np.ndarray:
        if epoch < self._base_epoch:
            raise ValueError(f"epoch {epoch} is before the loaded state's epoch {self._base_epoch}")
        return self._base + (epoch - self._base_epoch) * self.counts

    def global_order(self, epoch: int) -> np.ndarray:
        """The epoch's ConcatDataset indices in order (int64), the same on every rank."""
        lab = self._labels(epoch)
        before = self._before(epoch)
        out = np.empty(len(lab), np.int64)
        for i in range(len(self.sizes)):
            where = np.flatnonzero(lab == i)
            local = chain(int(self.sizes[i]), int(before[i]), len(where), self.seed, _TAG_STREAM, i)
            out[where] = self.offsets[i] + local
        return out

    def stream_of(self, indices: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.offsets, np.asarray(indices, np.int64), side="right") - 1

    def consumed(self, epoch: int, step: int) -> Dict[str, int]:
        """Samples consumed per stream at (epoch, step) (global, all ranks together)."""
        lab = self._labels(epoch)[: step * self.global_batch_size]
        done = self._before(epoch) + np.bincount(lab, minlength=len(self.sizes))
        return dict(zip(self.names, (int(x) for x in done)))

    # -- iteration (the state contract) --------------------------------------------------------
    def __len__(self) -> int:
        G = self.global_batch_size
        return self.epoch_size // G if self.drop_last else -(-self.epoch_size // G)


    @property
    def fingerprint(self) -> Dict[str, Any]:
        return {"seed": self.seed, "epoch_size": self.epoch_size, "global_batch_size": self.global_batch_size,
                "streams": [[n, int(s)] for n, s in zip(self.names, self.sizes)], "drop_last": self.drop_last}

    def _state_extra(self) -> Dict[str, Any]:
        e, s = self._pos.epoch, self._pos.step
        return dict(streams=self.consumed(e, s), proportions=list(self.proportions),
                    base_epoch=int(self._base_epoch), base=[int(x) for x in self._base])

    def _load_extra(self, state: Mapping[str, Any], epoch: int, step: int):
        saved_p = state.get("proportions", self.proportions)
        if not isinstance(saved_p, (list, tuple)) or len(saved_p) != len(self.names):
            raise StateError(f"{self.kind}.load_state_dict: proportions must be a list of "
                             f"{len(self.names)} numbers, got {saved_p!r}")
        saved_p = [float(p) for p in saved_p]
        streams = state.get("streams")
        if not isinstance(streams, Mapping) or sorted(streams) != sorted(self.names):
            raise StateError(f"{self.kind}.load_state_dict: the state's per-stream counters "
                             f"{sorted(streams) if isinstance(streams, Mapping) else streams!r} "
                             f"do not name the streams {self.names}")
        if saved_p != self.proportions:
            if step != 0:
                raise StateError(f"{self.kind}.load_state_dict: proportions changed ({saved_p} -> "
                                 f"{self.proportions}) in the middle of epoch {epoch} (step {step}); "
                                 "change proportions at an epoch boundary")
            base_epoch, base = epoch, np.array([int(streams[n]) for n in self.names], np.int64)
        else:
            base_epoch = int(state.get("base_epoch", 0))
            base = np.array(state.get("base", [0] * len(self.names)), np.int64)
            if base.shape != (len(self.names),) or base_epoch < 0 or base_epoch > epoch or (base < 0).any():
                raise StateError(f"{self.kind}.load_state_dict: invalid stream base "
                                 f"({state.get('base_epoch')!r}, {state.get('base')!r})")

        def apply():
            self._base_epoch, self._base = base_epoch, base
        return apply


__all__: List[str] = ["StreamMixer", "chain", "largest_remainder"]
