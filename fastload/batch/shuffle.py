"""Shard-aware shuffle: a two-level deterministic order whose working set of shards is bounded.

A global shuffle draws every batch from (nearly) every shard, so a rank reading from object
storage needs the whole dataset in its cache at once. :class:`BlockShuffleSampler` orders an
epoch in two levels, a pure function of ``(seed, epoch)``:

1. the shards are permuted;
2. consecutive runs of ``block_shards`` shards (in that permuted order) form a block, and the
   samples of a block are permuted among themselves; the epoch is the blocks one after another.

So the samples of global batch ``b`` come from at most two consecutive blocks, i.e. from at
most ``2 * block_shards`` shards, and which shards those are is known before the epoch starts
(:meth:`shards_for_steps`), which is what a cache needs to predownload and to evict. The cost
is shuffle quality: a batch draws from ``block_shards`` shards instead of all of them; the
figures for both orders are in ``benchmarks/results/shuffle.json`` (``benchmarks/shuffle.py``).
Larger blocks approach the global shuffle; data written in a random order (rather than sorted
by class) keeps the class mix per batch close to a global shuffle even with small blocks.

The order depends on (seed, epoch, shard sizes, block_shards) only: never on the world size,
the rank or num_workers. Local data keeps the plain global shuffle
(:func:`fastload.batch.sharding.epoch_permutation`).

>>> s = BlockShuffleSampler([4, 4, 4, 4], block_shards=2, seed=0)
>>> order = s.global_order(0)
>>> sorted(order.tolist()) == list(range(16))
True
>>> [len(x) for x in s.shards_for_steps(0, 0, 4, global_batch_size=4)]   # <= 2 shards per batch
[2, 2, 2, 2]
"""
from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from fastload._dist import DistributedArgs
from fastload._state import StepIterable

_TAG_SHARDS = 0x5348_4431
_TAG_BLOCK = 0x5348_4432


def _rng(seed: int, *words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [int(seed) & 0xFFFFFFFFFFFFFFFF] + [int(w) for w in words])))


class BlockShuffleSampler(StepIterable):
    """Two-level (shard order, then samples within a block of shards) deterministic shuffle.

    Args:
        shard_sizes: rows per shard, in dataset order (shard k holds the rows after those of
            shards 0..k-1), or a :class:`~fastload.format.reader.ReinforcedDataset` (its shards).
        block_shards: shards per block (the per-batch working set is <= 2 blocks).
        seed: the order is a pure function of (seed, epoch).
        shuffle: False gives the dataset order (blocks and samples unshuffled).
        partitions, global_batch_size: see :meth:`global_order`.
        shard_bytes: each shard's size in bytes (taken from the dataset when one is given):
            with ``partitions`` > 1 the shards are dealt to the partitions so that their bytes
            balance (a rank reads its share of the bytes, not its share of the shards).

    ``global_order(epoch)`` is what a loader slices into global batches;
    iterating the sampler yields ``global_order(epoch)`` for the epoch set by ``set_epoch``.
    """

    def __init__(self, shard_sizes, block_shards: int = 8, seed: int = 0, shuffle: bool = True,
                 partitions: int = 1, global_batch_size: Optional[int] = None,
                 shard_bytes: Optional[Sequence[int]] = None):
        if hasattr(shard_sizes, "_starts"):  # a ReinforcedDataset
            if shard_bytes is None and hasattr(shard_sizes, "_shards_meta"):
                shard_bytes = [int(m["bytes"]) for m in shard_sizes._shards_meta]
            starts = np.asarray(shard_sizes._starts, np.int64)
            shard_sizes = np.diff(starts)
        sizes = np.asarray(list(shard_sizes), np.int64)
        if sizes.ndim != 1 or len(sizes) == 0 or (sizes < 0).any():
            raise ValueError("shard_sizes must be a non-empty list of row counts >= 0")
        self.shard_bytes = None
        if shard_bytes is not None:
            b = np.asarray(list(shard_bytes), np.int64)
            if b.shape != sizes.shape or (b < 0).any():
                raise ValueError(f"shard_bytes must hold one size >= 0 per shard ({len(sizes)}), got {len(b)}")
            self.shard_bytes = b
        if int(block_shards) < 1:
            raise ValueError(f"block_shards must be >= 1, got {block_shards}")
        self.sizes = sizes
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.block_shards = int(block_shards)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self._init_position()
        self.partitions = int(partitions)
        if self.partitions < 1 or self.partitions > len(sizes):
            raise ValueError(f"partitions must be in [1, {len(sizes)}] (the number of shards), got {partitions}")
        self.global_batch_size = None if global_batch_size is None else int(global_batch_size)
        if self.partitions > 1 and (self.global_batch_size is None or self.global_batch_size % self.partitions):
            raise ValueError(f"partitions={self.partitions} needs global_batch_size, a multiple of it "
                             f"(got {global_batch_size})")

    # -- the order ---------------------------------------------------------------------------
    def __len__(self) -> int:
        """Samples per epoch: all rows, or with partitions the whole steps all partitions fill."""
        if self.partitions == 1:
            return int(self.starts[-1])
        q = self.global_batch_size // self.partitions
        groups = [int(self.sizes[g::self.partitions].sum()) for g in range(self.partitions)]
        return min(groups) // q * self.global_batch_size

    def shard_order(self, epoch: int) -> np.ndarray:
        """The permuted shard order of ``epoch`` (level 1)."""
        if not self.shuffle:
            return np.arange(len(self.sizes), dtype=np.int64)
        return _rng(self.seed, epoch, _TAG_SHARDS).permutation(len(self.sizes)).astype(np.int64)

    def _blocks(self, epoch: int, shards: np.ndarray, tag: int) -> np.ndarray:
        out = []
        for b in range(0, len(shards), self.block_shards):
            block = shards[b:b + self.block_shards]
            rows = np.concatenate([np.arange(self.starts[s], self.starts[s + 1], dtype=np.int64) for s in block])
            if self.shuffle:
                rows = rows[_rng(self.seed, epoch, _TAG_BLOCK, tag, b).permutation(len(rows))]
            out.append(rows)
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def global_order(self, epoch: int) -> np.ndarray:
        """All sample indices of ``epoch`` in order (int64), the same on every rank.

        With ``partitions=P`` the permuted shards are dealt round-robin into P groups, each
        block-shuffled on its own, and every global batch is P equal slices, slice g from
        group g: a rank whose slice covers whole partitions (``world_size`` dividing P, ranks
        taking contiguous slices) reads only its groups' shards, disjoint from other ranks'.
        The order depends on P (fixed by the run's configuration, like MosaicML's canonical
        nodes), never on the world size. Each group is truncated to the whole steps the
        smallest fills (< one slice plus one shard per group, a different set every epoch)."""
        order = self.shard_order(epoch)
        if self.partitions == 1:
            return self._blocks(epoch, order, 0)
        P, G = self.partitions, self.global_batch_size
        q = G // P
        steps = len(self) // G
        # The deal is the costly part (0.2 s at 10,000 shards) and an epoch asks for its order
        # several times (the loader's plan, the predownload plan): keep the last epoch's.
        key = (int(epoch), self.seed, self.shuffle, P)
        memo = getattr(self, "_deal_memo", None)
        if memo is None or memo[0] != key:
            memo = self._deal_memo = (key, self._deal(order))
        groups = memo[1]
        streams = [self._blocks(epoch, groups[g], g + 1)[: steps * q].reshape(steps, q) for g in range(P)]
        return np.stack(streams, 1).reshape(-1)

    def _deal(self, order: np.ndarray) -> List[np.ndarray]:
        """The permuted shards dealt into the partitions: round-robin (group g takes
        ``order[g::P]``), or with ``shard_bytes`` balanced: round by round (P shards each, a
        short last round to the first groups, as round-robin) the largest shard of a round
        goes to the group with the fewest bytes so far, then swaps between the heaviest and the
        lightest group while one lowers the heaviest. Each group keeps round-robin's number of
        shards, in the permuted order; a pure function of the order and the sizes."""
        P = self.partitions
        if self.shard_bytes is None:
            return [order[g::P] for g in range(P)]
        nb = self.shard_bytes
        out: List[List[int]] = [[] for _ in range(P)]
        load = np.zeros(P, np.int64)
        for r in range(0, len(order), P):
            rnd = order[r:r + P]
            takers = np.arange(len(rnd))
            takers = takers[np.argsort(load[takers], kind="stable")]
            for g, s in zip(takers, rnd[np.argsort(-nb[rnd], kind="stable")]):
                out[g].append(int(s))
                load[g] += nb[s]
        for _ in range(4 * len(order)):
            h, lo = int(np.argmax(load)), int(np.argmin(load))
            gap = int(load[h] - load[lo])
            a = np.asarray(out[h], np.int64)
            b = np.asarray(out[lo], np.int64)
            d = nb[a][:, None] - nb[b][None, :]  # bytes moved from h to lo by swapping a_i, b_j
            new_max = np.maximum(load[h] - d, load[lo] + d)
            i, j = np.unravel_index(int(np.argmin(new_max)), d.shape)
            if d[i, j] <= 0 or new_max[i, j] >= load[h] or gap <= 0:
                break
            out[h][i], out[lo][j] = int(b[j]), int(a[i])
            load[h] -= d[i, j]
            load[lo] += d[i, j]
        pos = np.empty(len(nb), np.int64)
        pos[order] = np.arange(len(order))
        return [np.asarray(sorted(x, key=lambda s: pos[s]), np.int64) for x in out]

    def shard_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, np.asarray(rows, np.int64), side="right") - 1

    def rows_for_steps(self, epoch: int, start: int, stop: int, global_batch_size: int,
                       rank: Optional[int] = None, world_size: Optional[int] = None,
                       slicing: str = "contiguous") -> List[np.ndarray]:
        """Per step in [start, stop): the rows a batch reads.

        With ``rank``/``world_size``, only that rank's slice of each global batch counts:
        ``slicing="contiguous"`` (rank r takes rows [r*b, (r+1)*b) of the batch, b = G / W)
        or ``"strided"`` (rank r takes rows r, r+W, ...)."""
        G = int(global_batch_size)
        if G < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        order = self.global_order(epoch)
        out = []
        for step in range(int(start), int(stop)):
            batch = order[step * G:(step + 1) * G]
            if not len(batch):
                break
            if rank is not None:
                W = int(world_size or 1)
                if slicing == "contiguous":
                    b = len(batch) // W
                    batch = batch[rank * b:(rank + 1) * b]
                elif slicing == "strided":
                    batch = batch[rank::W]
                else:
                    raise ValueError(f"slicing must be 'contiguous' or 'strided', got {slicing!r}")
            out.append(batch)
        return out

    def shards_for_steps(self, epoch: int, start: int, stop: int, global_batch_size: int,
                         rank: Optional[int] = None, world_size: Optional[int] = None,
                         slicing: str = "contiguous") -> List[np.ndarray]:
        """Per step in [start, stop): the shards (in order of first use) a batch reads
        (the rows of :meth:`rows_for_steps`)."""
        out = []
        for batch in self.rows_for_steps(epoch, start, stop, global_batch_size, rank, world_size, slicing):
            sh = self.shard_of(batch)
            _, first = np.unique(sh, return_index=True)
            out.append(sh[np.sort(first)])
        return out

    def shard_sequence(self, epoch: int, global_batch_size: int, rank: Optional[int] = None,
                       world_size: Optional[int] = None, slicing: str = "contiguous",
                       start: int = 0) -> np.ndarray:
        """The shards this rank reads from step ``start`` on, consecutive repeats removed:
        what :meth:`fastload.format.remote.ShardCache.plan` takes for predownload."""
        steps = -(-len(self) // int(global_batch_size))
        per = self.shards_for_steps(epoch, start, steps, global_batch_size, rank, world_size, slicing)
        seq = np.concatenate(per) if per else np.zeros(0, np.int64)
        if len(seq):
            keep = np.ones(len(seq), bool)
            keep[1:] = seq[1:] != seq[:-1]
            seq = seq[keep]
        return seq

    def batch_sampler(self, global_batch_size: int, rank: Optional[int] = None, world_size: Optional[int] = None,
                      slicing: str = "contiguous", dataset=None, drop_last: bool = True) -> "RankBatches":
        """This rank's batches (its slice of each global batch) as a ``batch_sampler`` for
        :class:`~fastload.ReinforcedLoader` or a DataLoader; with a remote ``dataset``, each
        epoch also hands the dataset's cache this rank's shard sequence (predownload)."""
        return RankBatches(self, global_batch_size, rank, world_size, slicing, dataset, drop_last)

    # -- the plan (fastload._state.StepIterable): one index per step ---------------------------
    def _num_steps(self, epoch: int) -> int:
        return len(self)

    def _start_iteration(self) -> None:
        pass

    def _plan_steps(self, epoch: int, start: int):
        return iter(self.global_order(epoch)[start:].tolist())

    def _fingerprint(self, epoch: int = 0) -> Dict[str, Any]:
        fp = {**self.fingerprint, "partitions": self.partitions, "global_batch_size": self.global_batch_size}
        if self.partitions > 1 and self.shard_bytes is not None:  # the deal balances bytes
            fp["shard_bytes_sha256"] = hashlib.sha256(self.shard_bytes.astype("<i8").tobytes()).hexdigest()
        return fp

    @property
    def fingerprint(self) -> Dict[str, Any]:
        """What the order depends on (for a loader's state fingerprint)."""
        return {"shuffle": "block" if self.shuffle else "none", "seed": self.seed,
                "block_shards": self.block_shards, "num_samples": len(self),
                "num_shards": int(len(self.sizes))}


class RankBatches(StepIterable, DistributedArgs):
    """A rank's batches of a :class:`BlockShuffleSampler` (see ``batch_sampler``)."""

    def __init__(self, sampler: BlockShuffleSampler, global_batch_size: int, rank: Optional[int],
                 world_size: Optional[int], slicing: str, dataset, drop_last: bool):
        self.sampler, self.G = sampler, int(global_batch_size)
        self._init_ranks(rank, world_size)  # read when used (fastload._dist.DistributedArgs)
        self._check_world(self.world_size)
        if slicing not in ("contiguous", "strided"):
            raise ValueError(f"slicing must be 'contiguous' or 'strided', got {slicing!r}")
        self.slicing, self.dataset, self.drop_last = slicing, dataset, bool(drop_last)
        self._init_position()

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.G if self.drop_last else -(-n // self.G)

    def _check_world(self, world_size: int) -> None:
        if self.G % world_size:
            raise ValueError(f"global_batch_size {self.G} is not a multiple of the world size {world_size}")

    # -- the plan (fastload._state.StepIterable) ----------------------------------------------
    def _start_iteration(self) -> None:
        self._check_world(self._bind_ranks()[1])

    def _num_steps(self, epoch: int) -> int:
        return len(self)

    def _plan_steps(self, epoch: int, start: int):
        order = self.sampler.global_order(epoch)
        cache = getattr(self.dataset, "remote", None)
        W, r = self.world_size, self.rank
        return self._batches(order, epoch, start, cache, W, r)

    def _batches(self, order, epoch, start, cache, W, r):
        if cache is not None:  # this rank's shards from step `start` on: the cache's step 0
            predownload_plan(self.sampler, self.dataset, epoch, self.G, r, W, self.slicing, start=start)
        for step in range(start, len(self)):
            if cache is not None:
                cache.at_step(step - start)  # the predownload window moves to this batch's shards
            batch = order[step * self.G:(step + 1) * self.G]
            if self.slicing == "contiguous":
                b = len(batch) // W
                yield batch[r * b:(r + 1) * b].tolist()
            else:
                yield batch[r::W].tolist()

    def _fingerprint(self, epoch: int = 0) -> Dict[str, Any]:
        # the global batch, not the world size: the position resumes at any world size
        return {**self.sampler._fingerprint(epoch), "global_batch_size": self.G, "drop_last": self.drop_last}


def shuffle_quality(order: np.ndarray, shard_of_row: np.ndarray, labels: np.ndarray,
                    batch_size: int) -> Dict[str, float]:
    """Mean distinct shards and classes per batch of ``order`` (the figure in the README)."""
    n = len(order) // batch_size * batch_size
    if n == 0:
        return {"distinct_shards": 0.0, "distinct_classes": 0.0}
    b = order[:n].reshape(-1, batch_size)
    sh = np.sort(shard_of_row[b], axis=1)
    cl = np.sort(labels[b], axis=1)
    ds = (np.diff(sh, axis=1) != 0).sum(1) + 1
    dc = (np.diff(cl, axis=1) != 0).sum(1) + 1
    return {"distinct_shards": float(ds.mean()), "distinct_classes": float(dc.mean())}


def predownload_plan(sampler: BlockShuffleSampler, dataset, epoch: int, global_batch_size: int,
                     rank: Optional[int] = None, world_size: Optional[int] = None,
                     slicing: str = "contiguous", start: int = 0) -> None:
    """Hand a remote dataset's cache the shards this rank will read this epoch, step by step
    from step ``start`` (the cache's step 0); ``cache.at_step(k)`` then moves its window."""
    cache = getattr(dataset, "remote", None)
    if cache is not None:
        from fastload.remote.plan import shards_per_step  # the loader's plan uses it too

        steps = -(-len(sampler) // int(global_batch_size))
        rows = sampler.rows_for_steps(epoch, start, steps, global_batch_size, rank, world_size, slicing)
        cache.plan_steps(shards_per_step(dataset._starts, rows))


__all__: Sequence[str] = ["BlockShuffleSampler", "RankBatches", "shuffle_quality", "predownload_plan"]
