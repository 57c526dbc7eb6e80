"""The one place the shards per step are computed (the loader's plan and RankBatches share it)."""
from __future__ import annotations

from typing import Iterable, List

import numpy as np


def shards_per_step(shard_starts: np.ndarray, row_batches: Iterable[np.ndarray]) -> List[np.ndarray]:
    """For each step's rows, the distinct shards they fall in, ascending (the order the
    dataset's ``gather`` opens them). ``shard_starts[k]``: the first row of shard k."""
    starts = np.asarray(shard_starts, np.int64)
    return [np.unique(np.searchsorted(starts, np.asarray(rows, np.int64), side="right") - 1)
            for rows in row_batches]
