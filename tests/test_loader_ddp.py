"""ReinforcedLoader under torch.distributed (gloo, 2 and 3 spawned processes): every rank
the same number of steps and batch sizes; no sample missing, duplicates only the documented
padding (the first ``(-n) % world`` indices of the epoch's order)."""
from __future__ import annotations

import socket

import numpy as np
import pytest
import torch.multiprocessing as mp

from fastload.batch.sharding import epoch_permutation

from _ddp_loader_worker import ddp_worker, write_dataset

N = 23


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("ddp") / "d"), n=N)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world,batch_size,drop_last",
                         [(2, 4, False), pytest.param(3, 3, True, marks=pytest.mark.slow)])
def test_ddp_equal_steps_no_missing(root, tmp_path, world, batch_size, drop_last):
    mp.spawn(ddp_worker, args=(world, _free_port(), root, str(tmp_path), batch_size, drop_last),
             nprocs=world, join=True)
    res = [np.load(tmp_path / f"rank{r}.npz") for r in range(world)]
    steps = {int(r["steps"]) for r in res}
    assert len(steps) == 1 and steps == {int(res[0]["max_steps"])} == {int(res[0]["n_batches"])}
    for r in res:  # at every step, all ranks had the same batch size
        sh = r["shapes"]
        assert (sh == sh[:, :1]).all()
    per_rank = -(-N // world)
    seen = np.concatenate([r["ids"] for r in res]).astype(np.int64)
    order = epoch_permutation(N, 5, 1)
    pad = order[: per_rank * world - N]
    if not drop_last:
        assert len(seen) == per_rank * world
        counts = np.bincount(seen, minlength=N)
        assert (counts >= 1).all()  # nothing missing
        assert sorted(np.flatnonzero(counts == 2).tolist()) == sorted(pad.tolist())
        assert counts.max() <= 2
    else:
        # drop_last drops the same number of trailing samples on every rank
        full = (per_rank // batch_size) * batch_size
        assert len(seen) == full * world
        counts = np.bincount(seen, minlength=N)
        assert set(np.flatnonzero(counts > 1).tolist()) <= set(pad.tolist()) and counts.max() <= 2
        assert (counts == 0).sum() == N - len(set(seen.tolist())) <= world * (per_rank - full)
