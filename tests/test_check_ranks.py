"""check_ranks cannot hang (issue 10 item 5): unequal batch counts end in a clear error
within seconds, on gloo; the collectives use device tensors when the backend needs them."""
from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp

from _check_ranks_worker import worker
from _ddp_loader_worker import write_dataset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two spawned processes importing torch: ~15 s each on the shared CI cores
@pytest.mark.timeout(120)
@pytest.mark.parametrize("nw", [0, 2])
def test_unequal_batch_counts_raise_ranks_disagree(tmp_path, nw):
    root = write_dataset(str(tmp_path / "d"), n=8)
    mp.spawn(worker, args=(2, _free_port(), root, str(tmp_path), nw), nprocs=2, join=True)
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in res:
        assert r["error"] is not None and "ranks disagree" in r["error"], res
        assert "unequal step counts" in r["error"] and r["seconds"] < 10, res
    assert "end-of-epoch sentinel" in res[1]["error"]  # the rank that ran out says so
    assert [r["steps"] for r in res] == [2, 2]


def test_collective_device_per_backend(monkeypatch):
    from fastload._dist import collective_device

    assert collective_device("gloo") == torch.device("cpu")
    assert collective_device("cpu:gloo,cuda:nccl") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collective_device("nccl") == torch.device("cuda", 3)
    assert collective_device("NCCL") == torch.device("cuda", 3)


@pytest.mark.parametrize("nw", [0, 2])
def test_sentinel_answers_every_step_check(tmp_path, monkeypatch, nw):
    """In-process: with check_ranks, each step's check and the end-of-epoch sentinel carry
    the same number of values (a collective of another size would hang or fail on gloo)."""
    import fastload._dist as D
    import fastload.loader.pipeline as PL
    import fastload.loader.reinforced as R

    calls = []
    monkeypatch.setattr(PL, "check_same_across_ranks", lambda v, what: calls.append(list(v)))
    monkeypatch.setattr(D, "check_same_across_ranks", lambda v, what: calls.append(list(v)))
    root = write_dataset(str(tmp_path / "d"), n=5)
    L = R.ReinforcedLoader(root, batch_size=2, image_size=8, check_ranks=True, num_workers=nw)
    assert len(list(L)) == 3
    assert [c[0] for c in calls] == [0, 1, 2, -1] and {len(c) for c in calls} == {5}
    assert calls[-1] == [D.END_OF_EPOCH] * 5
