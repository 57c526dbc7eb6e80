"""Loader over a decomposed dataset: one length bucket per step, constant tokens per step."""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .._native import check
from .._state import StepIterable
from ..batch.buckets import BucketBatchSampler, Odds
from ..tokens.decompose import _lib, load_manifest, open_bucket
from ..format.remote import is_remote, materialize_decomposed

__all__ = ["DecompositionLoader"]


class DecompositionLoader(StepIterable):
    """Iterate ``(input_ids, targets)`` batches of a dataset written by :func:`fastload.decompose`.

    A step from bucket k is ``[tokens_per_step // 2^k, 2^k]`` for both tensors
    (``targets`` = inputs shifted by one, the chunk's ``+1`` token), so every step has
    ``tokens_per_step`` tokens per rank. Bucket choice, curricula, cycles, the per-epoch
    shuffle and the distributed rule are those of
    :class:`fastload.batch.buckets.BucketBatchSampler`: all ranks draw the same bucket at
    every step, and the step's global batch (``tokens_per_step * world_size`` tokens) is split
    across ranks, so the order depends on (seed, epoch, global tokens per step) only.

    State (:mod:`fastload._state`): ``state_dict()`` is the global position, the same on every
    rank; it resumes at any world size whose ``tokens_per_step * world_size`` is the saved
    one (no row seen twice or missed in that epoch). ``set_epoch(e)`` keeps the position when
    ``e`` is the current epoch; a finished pass moves to the next epoch; a new ``iter()``
    supersedes the previous iterator (its ``next()`` raises ``SupersededError``).

    Copies: rows are gathered from the memory-mapped bucket arrays straight into contiguous
    ``dtype`` tensors (one pass in C++, ``num_threads`` threads, pinned when ``pin_memory``).
    With ``shuffle=False`` and ``dtype=torch.int32`` the batch is a zero-copy view of the
    mapped array (``input_ids = rows[:, :-1]``, ``targets = rows[:, 1:]``, not contiguous).

    ``reuse_buffers=n`` (n >= 1) writes into a ring of n preallocated tensor pairs per bucket
    instead of fresh tensors (fresh large tensors cost page faults, about half the copy rate
    on a CPU): a batch is then overwritten n steps of its bucket later, so consume it (or
    copy it to the GPU) before that. 0 (default) gives fresh tensors.

    ``buckets`` restricts training to some buckets (e.g. ``range(8, 12)`` for a 2k context).

    ``schedule``: ``"remaining"`` (default: weights batches left x odds, a new order per
    epoch) or ``"reference"`` (Dataset Decomposition's published mixer: fixed weights
    batches x odds until a bucket runs out, the same order every epoch); see
    :mod:`fastload.batch.buckets`. ``schedule_per_epoch`` overrides whether the order changes
    with the epoch.

    >>> import tempfile, numpy as np, fastload
    >>> d = tempfile.mkdtemp()
    >>> toks = np.random.default_rng(0).integers(0, 256, 20000).astype(np.int32)
    >>> _ = fastload.decompose((toks, np.arange(0, 20001, 400)), d, min_bucket=4, max_bucket=6,
    ...                        vocab_size=257, eot_id=256, progress=False)
    >>> loader = fastload.DecompositionLoader(d, tokens_per_step=256, seed=0)
    >>> x, y = next(iter(loader))
    >>> x.shape[0] * x.shape[1], x.dtype, bool((x[:, 1:] == y[:, :-1]).all())
    (256, torch.int64, True)
    """

    def __init__(self, path: str, tokens_per_step: int, curriculum: Odds = "pow2", cycles: int = 1,
                 seed: int = 0, shuffle: bool = True, dtype: torch.dtype = torch.int64,
                 pin_memory: Optional[bool] = None, rank: Optional[int] = None,
                 world_size: Optional[int] = None, check_every: int = 0,
                 buckets: Optional[Sequence[int]] = None, num_threads: int = 1, reuse_buffers: int = 0,
                 schedule: str = "remaining", schedule_per_epoch: Optional[bool] = None,
                 cache_dir: Optional[str] = None, cache_limit: Optional[int] = None):
        if is_remote(path):  # s3:// gs:// http(s)://: bucket arrays are downloaded whole, then mapped
            path = materialize_decomposed(path, cache_dir, cache_limit)
        self.manifest = m = load_manifest(path)
        if dtype not in (torch.int64, torch.int32):
            raise ValueError(f"dtype must be torch.int64 or torch.int32, got {dtype}")
        avail = sorted(int(k) for k in m["buckets"])
        if buckets is None:
            use = [k for k in avail if m["buckets"][str(k)]["rows"] > 0]
        else:
            use = sorted(int(k) for k in buckets)
            bad = [k for k in use if k not in avail]
            if bad:
                raise ValueError(f"buckets {bad} are not in the dataset (it has {avail})")
        if not use:
            raise ValueError(f"{path}: no rows in any bucket (all documents shorter than 2^{m['min_bucket']}?)")
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory=True needs a CUDA device (torch.cuda.is_available() is False)")
        self.path, self.dtype, self.pin_memory, self.shuffle = path, dtype, bool(pin_memory), bool(shuffle)
        self.num_threads = max(1, int(num_threads))
        if reuse_buffers < 0:
            raise ValueError(f"reuse_buffers must be >= 0, got {reuse_buffers}")
        self.reuse_buffers, self._ring, self._ring_pos = int(reuse_buffers), {}, {}
        self._lib = _lib()
        self._arrays, self._bases, self._cum, self._rowbytes = {}, {}, {}, {}
        for k in use:
            arrs = []
            for f in m["buckets"][str(k)]["files"]:
                arrs.append(open_bucket(os.path.join(path, f["path"]), k, f["rows"]))
            self._arrays[k] = arrs
            self._bases[k] = np.array([a.__array_interface__["data"][0] if a.size else 0 for a in arrs], np.uint64)
            self._cum[k] = np.concatenate([[0], np.cumsum([a.shape[0] for a in arrs])]).astype(np.int64)
            self._rowbytes[k] = ((1 << k) + 1) * 4
        self.sampler = BucketBatchSampler({k: int(self._cum[k][-1]) for k in use}, tokens_per_step, curriculum,
                                          cycles, seed, shuffle, rank, world_size, check_every,
                                          schedule=schedule, schedule_per_epoch=schedule_per_epoch)
        from ._args import check_nonempty, decomposition_why

        check_nonempty(len(self.sampler), f"DecompositionLoader({path!r})", decomposition_why(self.sampler))
        self._init_position()

    # ------------------------------------------------------------------ iteration
    def __len__(self) -> int:
        return len(self.sampler)

    # the plan (fastload._state.StepIterable): the bucket sampler's steps, fetched
    def _num_steps(self, epoch: int) -> int:
        return len(self.sampler)

    def _start_iteration(self) -> None:
        pass  # the sampler reads the ranks when it starts

    def _plan_steps(self, epoch: int, start: int):
        self.sampler.seek(epoch, start)
        # iter(self.sampler) runs now (its plan and checks on this thread), the fetches lazily
        return (self.fetch(k, rows) for k, rows in iter(self.sampler))

    def _fingerprint(self, epoch: int = 0) -> dict:
        return self.sampler._fingerprint(epoch)

    def _addresses(self, k: int, rows: np.ndarray) -> np.ndarray:
        cum, bases = self._cum[k], self._bases[k]
        if len(bases) == 1:
            return bases[0] + rows.astype(np.uint64) * np.uint64(self._rowbytes[k])
        shard = np.searchsorted(cum, rows, side="right") - 1
        return bases[shard] + (rows - cum[shard]).astype(np.uint64) * np.uint64(self._rowbytes[k])

    def fetch(self, k: int, rows: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, targets) for rows of bucket k (global row indices over its files)."""
        n, L = len(rows), 1 << k
        if (self.dtype == torch.int32 and not self.pin_memory and n
                and int(rows[-1]) - int(rows[0]) == n - 1 and np.all(np.diff(rows) == 1)):
            s = int(np.searchsorted(self._cum[k], rows[0], side="right") - 1)
            lo = int(rows[0] - self._cum[k][s])
            if lo + n <= self._arrays[k][s].shape[0]:  # contiguous inside one file: zero copy
                block = torch.from_numpy(self._arrays[k][s][lo:lo + n])
                return block[:, :-1], block[:, 1:]
        addrs = self._addresses(k, rows)
        if self.reuse_buffers:
            ring = self._ring.setdefault(k, [])
            i = self._ring_pos.get(k, 0)
            if len(ring) <= i or ring[i][0].shape[0] != n:
                pair = tuple(torch.empty((n, L), dtype=self.dtype, pin_memory=self.pin_memory) for _ in range(2))
                ring[i:i + 1] = [pair]
            x, y = ring[i]
            self._ring_pos[k] = (i + 1) % self.reuse_buffers
        else:
            x = torch.empty((n, L), dtype=self.dtype, pin_memory=self.pin_memory)
            y = torch.empty((n, L), dtype=self.dtype, pin_memory=self.pin_memory)
        st = self._lib.fl_dd_gather(addrs.__array_interface__["data"][0], n, L + 1, x.data_ptr(), y.data_ptr(),
                                    min(x.numel(), y.numel()), x.element_size(), self.num_threads)
        check(self._lib, st, "decomposition gather")
        return x, y

    # ------------------------------------------------------------------ state
    def _upgrade_state(self, state):
        if "kind" not in state and isinstance(state.get("sampler"), Mapping):
            # saved before the contract: {"sampler": ..., "path": ...}
            sub = state["sampler"]
            if "fingerprint" not in sub and isinstance(sub.get("config"), Mapping):
                sub = self.sampler._upgrade_state(sub)
                self._legacy_fields = self.sampler._legacy_fields
            state = {**sub, "kind": "DecompositionLoader"}
        return state

    @property
    def tokens_per_step(self) -> int:
        return self.sampler.tokens_per_step

    def schedule(self) -> np.ndarray:
        """Bucket k of every step of the current epoch (for plots and checks)."""
        if self.sampler.epoch != self.epoch:
            self.sampler.seek(self.epoch, 0)
        return self.sampler.schedule()
