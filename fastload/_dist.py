"""Rank/world-size resolution and the cross-rank agreement check shared by the samplers."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple


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


def check_same_across_ranks(values: Sequence[int], what: str) -> None:
    """All-reduce min and max of ``values``; raise if any rank differs (never hang on shapes).

    Every rank must call this at the same step. A no-op when torch.distributed is not
    initialized.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    v = torch.tensor(list(values), dtype=torch.int64)
    lo, hi = v.clone(), v.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError(
            f"ranks disagree on {what}: rank {dist.get_rank()} has {list(values)}, "
            f"min over ranks {lo.tolist()}, max {hi.tolist()}"
        )
