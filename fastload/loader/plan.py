"""Stage 1 of ``ReinforcedLoader``: the plan. Which samples each step of an epoch holds on
this rank, at which size; no I/O.

The epoch's global order is ``epoch_permutation(n, seed, epoch, shuffle)`` (or a sampler's
``global_order(epoch)``), a function of (seed, epoch) only. Global batch t is samples
``[t G, (t + 1) G)`` of it with ``G = batch_size * world_size``, and rank r takes its slice
``[r B, (r + 1) B)``; the last partial global batch is dropped (``drop_last``) or padded by
wrapping to ``W * ceil(m / W)`` samples. A ``batch_sampler`` (a fastload one is placed at the
loader's position with its public ``seek``; a plain one is re-iterated and skipped) or a
plain ``sampler`` (batched here) give their own order instead. With a remote dataset the plan
also hands the dataset's cache this rank's shards step by step (predownload)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional, Tuple

import numpy as np

from fastload._state import StepIterable
from fastload.batch.sharding import epoch_permutation

Step = Tuple[int, np.ndarray, Tuple[int, int]]  # (step, this rank's indices int64[b], (h, w))


def pair(v, name: str) -> Tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        v = (int(v), int(v))
    try:
        h, w = (int(x) for x in v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or an (h, w) pair, got {v!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{name} must be positive, got {v!r}")
    return h, w


@dataclass(frozen=True)
class PlanConfig:
    num_samples: int
    seed: int
    shuffle: bool
    batch_size: Optional[int]  # per rank; None with a batch_sampler
    drop_last: bool
    image_size: Tuple[int, int]
    sampler: Any = None
    batch_sampler: Any = None


class Plan:
    """The batch plan of one loader (rank and world size are passed per call: they are read
    when iteration starts). ``cache`` / ``shard_starts``: a remote dataset's cache and the
    first row of each shard, for the predownload plan."""

    def __init__(self, cfg: PlanConfig, cache=None, shard_starts=None):
        self.cfg = cfg
        self.cache, self.shard_starts = cache, shard_starts
        self._order_cache: Tuple[int, Optional[np.ndarray]] = (-1, None)

    @property
    def elastic(self) -> bool:
        """The order is a global one cut into global batches."""
        c = self.cfg
        return c.batch_sampler is None and (c.sampler is None or hasattr(c.sampler, "global_order"))

    def forget_order(self) -> None:
        """A sampler's order may have changed (its state was loaded)."""
        self._order_cache = (-1, None)

    def global_order(self, epoch: int) -> np.ndarray:
        """The epoch's global sample order: a function of (seed, epoch) only (or the
        sampler's ``global_order(epoch)``), never of the world size or num_workers."""
        cached = self._order_cache
        if cached[0] == epoch:
            return cached[1]
        c = self.cfg
        if c.sampler is not None:
            order = np.asarray(c.sampler.global_order(epoch))
            if order.ndim != 1 or order.dtype.kind not in "iu":
                raise ValueError(f"sampler.global_order({epoch}) must return a 1-D integer array, "
                                 f"got {order.dtype} of shape {order.shape}")
            order = order.astype(np.int64, copy=False)
            self.check_range(order, "sampler.global_order")
        else:
            order = epoch_permutation(c.num_samples, c.seed, epoch, c.shuffle)
        self._order_cache = (epoch, order)
        return order

    def order_len(self, epoch: int) -> int:
        if self.cfg.sampler is not None:
            return len(self.global_order(epoch))
        return self.cfg.num_samples

    def global_steps(self, n: int, world: int) -> Tuple[int, int]:
        """(steps, this rank's size of the last batch) for a global order of n samples."""
        B = self.cfg.batch_size
        full, rem = divmod(n, B * world)
        if rem == 0 or self.cfg.drop_last:
            return full, B
        return full + 1, -(-rem // world)

    def global_batch(self, epoch: int, step: int, rank: int, world: int) -> Tuple[np.ndarray, int]:
        """(global batch ``step`` of ``epoch``, this rank's offset in it)."""
        order = self.global_order(epoch)
        B = self.cfg.batch_size
        n, G = len(order), B * world
        if (step + 1) * G <= n:
            return order[step * G:(step + 1) * G], rank * B
        # the last, partial global batch: wrapped around to ceil(rem / W) rows per rank
        last = self.global_steps(n, world)[1]
        pos = np.arange(step * G, step * G + last * world) % max(n, 1)
        return order[pos], rank * last

    def num_steps(self, epoch: int, world: int) -> Optional[int]:
        """Batches of ``epoch`` on every rank (None: a plain batch sampler without a length)."""
        c = self.cfg
        bs = c.batch_sampler
        if bs is not None:
            if isinstance(bs, StepIterable):
                return bs._num_steps(epoch)
            try:
                return len(bs)
            except TypeError:
                return None
        if self.elastic:
            return self.global_steps(self.order_len(epoch), world)[0]
        n = len(c.sampler)
        return n // c.batch_size if c.drop_last else -(-n // c.batch_size)

    def check_range(self, idx: np.ndarray, what: str) -> None:
        n = self.cfg.num_samples
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = idx[(idx < 0) | (idx >= n)][0]
            raise ValueError(f"{what} yielded index {int(bad)}, outside [0, {n})")

    def steps(self, epoch: int, start: int, rank: int, world: int) -> Iterator[Step]:
        """Yield (step, this rank's indices int64[b], (h, w)) from batch ``start`` of ``epoch``.

        Samplers are set up now, in the calling thread (a fastload sampler is placed at the
        loader's position and its iterator taken here: its agreement checks run on this
        thread); the returned generator may run in the prefetch thread."""
        c = self.cfg
        size = c.image_size
        if c.batch_sampler is not None:
            bs = c.batch_sampler
            arrays = hasattr(bs, "iter_arrays")
            if isinstance(bs, StepIterable):
                bs.seek(epoch, start)  # the sampler starts at the loader's position
                first = start
            else:
                if hasattr(bs, "set_epoch"):
                    bs.set_epoch(epoch)
                first = 0  # a plain batch sampler restarts: skip to the position
            it = bs.iter_arrays() if arrays else iter(bs)
            return self._batch_sampler_steps(it, arrays, first, start, size)
        if not self.elastic:
            if isinstance(c.sampler, StepIterable):
                c.sampler.seek(epoch, 0)  # the loader counts batches, not the sampler
            elif hasattr(c.sampler, "set_epoch"):
                c.sampler.set_epoch(epoch)
            idx = np.fromiter((int(i) for i in c.sampler), dtype=np.int64)
            self.check_range(idx, "sampler")
            b = c.batch_size
            nb = len(idx) // b if c.drop_last else -(-len(idx) // b)
            return self._predownload((step, idx[step * b:(step + 1) * b], size) for step in range(start, nb))
        steps = self.global_steps(len(self.global_order(epoch)), world)[0]
        return self._predownload(self._elastic_steps(epoch, start, steps, size, rank, world))

    def _predownload(self, plan: Iterator[Step]):
        """A remote dataset's cache gets this rank's shards for the rest of the epoch, step
        by step (predownload ahead, eviction by next use); the plan then tells it each step
        as the step is read. A local dataset's plan stays a lazy generator."""
        cache = self.cache
        if cache is None:
            return plan
        from fastload.remote.plan import shards_per_step  # one planner: RankBatches uses it too

        plan = list(plan)
        cache.plan_steps(shards_per_step(self.shard_starts, [idx for _, idx, _ in plan]))

        def steps():
            for k, item in enumerate(plan):
                cache.at_step(k)
                yield item

        return steps()

    def _elastic_steps(self, epoch, start, steps, size, rank, world):
        for step in range(start, steps):
            gidx, off = self.global_batch(epoch, step, rank, world)
            b = len(gidx) // world
            yield step, gidx[off:off + b], size

    def _batch_sampler_steps(self, it, arrays, first, start, size):
        for step, batch in enumerate(it, first):
            if step < start:
                continue
            if arrays:
                idx, h, w = batch
                idx = np.asarray(idx, dtype=np.int64)
                hw = pair((h, w), "batch_sampler (h, w)")
                self.check_range(idx, "batch_sampler")
                yield step, idx, hw
                continue
            batch = list(batch)
            if batch and isinstance(batch[0], (tuple, list)):
                arr = np.asarray(batch, dtype=np.int64)
                if arr.ndim != 2 or arr.shape[1] != 3 or not (arr[:, 1:] == arr[0, 1:]).all():
                    raise ValueError("batch_sampler must yield lists of ints or of (index, h, w) "
                                     f"tuples sharing one (h, w); got {batch[:4]}...")
                idx, hw = arr[:, 0], pair((arr[0, 1], arr[0, 2]), "batch_sampler (h, w)")
            else:
                idx, hw = np.asarray(batch, dtype=np.int64).reshape(-1), size
            self.check_range(idx, "batch_sampler")
            yield step, idx, hw
