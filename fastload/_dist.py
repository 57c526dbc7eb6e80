"""Rank/world-size resolution and the cross-rank agreement check shared by the samplers."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

# The value every rank sends in place of a step's numbers once its epoch has ended: a rank
# that still has a batch then disagrees (and raises) instead of waiting in a collective that
# the finished rank never joins.
END_OF_EPOCH = -1


def rank_world(rank: Optional[int] = None, world_size: Optional[int] = None) -> Tuple[int, int]:
    """(rank, world_size): given values win, else torch.distributed when initialized, else (0, 1)."""
    if rank is None or world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        else:
            rank = 0 if rank is None else rank
            world_size = 1 if world_size is None else world_size
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return int(rank), int(world_size)


def collective_device(backend: str):
    """Where the check's tensors must live for ``backend``: NCCL only reduces CUDA tensors
    (on the rank's current device); gloo, MPI and mixed "cpu:gloo,cuda:nccl" take CPU ones."""
    import torch

    b = str(backend).lower()
    if "nccl" in b and "cpu:" not in b:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_same_across_ranks(values: Sequence[int], what: str) -> None:
    """All-reduce min and max of ``values``; raise if any rank differs (never hang on shapes).

    Every rank must call this at the same step with the same number of values; at the end
    of an epoch each rank calls :func:`check_epoch_end` with that number, so a rank with an
    extra step meets the sentinel and both raise. A no-op when torch.distributed is not
    initialized.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    dev = collective_device(dist.get_backend())
    v = torch.tensor(list(values), dtype=torch.int64, device=dev)
    lo, hi = v.clone(), v.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        lo_l, hi_l = lo.tolist(), hi.tolist()
        # steps and shapes are >= 0: a -1 in the minimum is some rank's sentinel
        note = (" (a rank ended its epoch while another still had a batch: unequal step counts)"
                if END_OF_EPOCH in lo_l else "")
        raise RuntimeError(
            f"ranks disagree on {what}: rank {dist.get_rank()} has {list(values)}, "
            f"min over ranks {lo_l}, max {hi_l}{note}"
        )


def check_epoch_end(width: int, what: str = "the number of steps in the epoch") -> None:
    """The end-of-epoch sentinel: ``width`` values of ``END_OF_EPOCH`` (the width of the
    per-step check it answers)."""
    check_same_across_ranks([END_OF_EPOCH] * int(width), f"{what} (end-of-epoch sentinel)")
