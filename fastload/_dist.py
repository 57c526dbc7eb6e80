"""Rank/world-size resolution and the cross-rank agreement check shared by the samplers."""
from __future__ import annotations

import os
import threading
from typing import Optional, Sequence, Tuple

from fastload.errors import RankMismatchError

# The value every rank sends in place of a step's numbers once its epoch has ended: a rank
# that still has a batch then disagrees (and raises) instead of waiting in a collective that
# the finished rank never joins.
END_OF_EPOCH = -1


def rank_world(rank: Optional[int] = None, world_size: Optional[int] = None,
               strict: Optional[str] = None) -> Tuple[int, int]:
    """(rank, world_size): given values win, else torch.distributed when initialized, else (0, 1).

    ``strict`` (the name of the object starting an iteration): when a value is missing, no
    process group is initialized and the environment says ``WORLD_SIZE > 1`` (torchrun,
    Hugging Face/Lightning launchers), raise instead of silently using (0, 1): every rank
    would then read the same batches."""
    if rank is None or world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        else:
            if strict is not None and world_size != 1:
                env = _env_world_size()
                if env > 1:
                    raise RankMismatchError(
                        f"{strict}: WORLD_SIZE={env} in the environment but torch.distributed "
                        "is not initialized, so this rank cannot know its shard (every rank would "
                        "read the same batches). Call torch.distributed.init_process_group() "
                        "before iterating (the loader may be built before it), or pass rank= and "
                        "world_size= explicitly")
            rank = 0 if rank is None else rank
            world_size = 1 if world_size is None else world_size
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return int(rank), int(world_size)


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


class DistributedArgs:
    """``rank`` / ``world_size`` of a sampler or loader, read when used, never frozen at
    construction: a loader built before ``init_process_group`` (the Hugging Face order:
    loader first, then the Trainer starts the group) still shards. ``_bind_ranks()`` at the
    start of an iteration reads them strictly (see :func:`rank_world`)."""

    _rank_arg: Optional[int] = None
    _world_arg: Optional[int] = None

    def _init_ranks(self, rank: Optional[int], world_size: Optional[int]) -> None:
        self._rank_arg = None if rank is None else int(rank)
        self._world_arg = None if world_size is None else int(world_size)
        rank_world(rank, world_size)  # explicit values are checked now

    @property
    def rank(self) -> int:
        return rank_world(self._rank_arg, self._world_arg)[0]

    @property
    def world_size(self) -> int:
        return rank_world(self._rank_arg, self._world_arg)[1]

    def _bind_ranks(self) -> Tuple[int, int]:
        return rank_world(self._rank_arg, self._world_arg, strict=type(self).__name__)


_LOCAL = threading.local()


def mark_background_thread() -> None:
    """Mark the calling thread as a fastload background thread (prefetch, render): no
    collective may run on it (see :func:`check_same_across_ranks`)."""
    _LOCAL.background = True


def on_background_thread() -> bool:
    """True on a fastload background thread: per-step agreement checks are skipped there
    (the plan's agreement was checked on the caller's thread when the iteration started)."""
    return getattr(_LOCAL, "background", False)


def collective_device(backend: str):
    """Where the check's tensors must live for ``backend``: NCCL only reduces CUDA tensors
    (on the rank's current device); gloo, MPI and mixed "cpu:gloo,cuda:nccl" take CPU ones."""
    import torch

    b = str(backend).lower()
    if "nccl" in b and "cpu:" not in b:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def min_max_across_ranks(values: Sequence[int], what: str):
    """(min, max) over ranks of ``values`` (lists of ints), by two all-reduces on the calling
    thread; None when torch.distributed is not initialized or has one rank."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if on_background_thread():
        # collectives run in the order each thread issues them: one issued here would
        # interleave with the training loop's (DDP gradients) and gloo/NCCL would pair a
        # shape check of one rank with a gradient bucket of another
        raise RuntimeError(f"fastload: the agreement check on {what} was issued from a background "
                           "thread; collectives must run on the thread that iterates")
    dev = collective_device(dist.get_backend())
    v = torch.tensor(list(values), dtype=torch.int64, device=dev)
    lo, hi = v.clone(), v.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return lo.tolist(), hi.tolist()


def check_same_across_ranks(values: Sequence[int], what: str) -> None:
    """All-reduce min and max of ``values``; raise if any rank differs (never hang on shapes).

    Every rank must call this at the same step with the same number of values; at the end
    of an epoch each rank calls :func:`check_epoch_end` with that number, so a rank with an
    extra step meets the sentinel and both raise. A no-op when torch.distributed is not
    initialized.
    """
    mm = min_max_across_ranks(values, what)
    if mm is not None and mm[0] != mm[1]:
        raise disagreement(values, what, *mm)


def disagreement(values: Sequence[int], what: str, lo, hi, detail: str = "") -> RankMismatchError:
    import torch.distributed as dist

    # steps and shapes are >= 0: a -1 in the minimum is some rank's sentinel
    note = (" (a rank ended its epoch while another still had a batch: unequal step counts)"
            if END_OF_EPOCH in lo else "")
    return RankMismatchError(f"ranks disagree on {what}: rank {dist.get_rank()} has {list(values)}, "
                        f"min over ranks {lo}, max {hi}{note}{detail}")


def check_epoch_end(width: int, what: str = "the number of steps in the epoch") -> None:
    """The end-of-epoch sentinel: ``width`` values of ``END_OF_EPOCH`` (the width of the
    per-step check it answers)."""
    check_same_across_ranks([END_OF_EPOCH] * int(width), f"{what} (end-of-epoch sentinel)")
