"""Global selection: every rank's scores and rows, gathered on the caller's thread."""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch


def gather_scores(scores: torch.Tensor, rows: np.ndarray) -> Tuple[torch.Tensor, np.ndarray]:
    """(scores of all ranks, rows of all ranks), concatenated in rank order."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return scores.double(), rows
    from fastload._dist import check_same_across_ranks, collective_device

    # unequal super-batch sizes would hang the gather: an error instead, within seconds
    check_same_across_ranks([len(rows)], "the super-batch size")
    W = dist.get_world_size()
    dev = collective_device(dist.get_backend())
    both = torch.stack([scores.double().cpu(), torch.from_numpy(rows.astype(np.int64)).double()]).to(dev)
    parts = [torch.empty_like(both) for _ in range(W)]
    dist.all_gather(parts, both)
    allp = torch.cat([p.cpu() for p in parts], dim=1)
    # rows < 2^53 survive the float64 trip exactly
    return allp[0], allp[1].round().long().numpy()
