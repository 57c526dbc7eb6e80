"""DecompositionLoader under torch.distributed (gloo, 2 and 3 processes): same bucket at every
step, equal batches per bucket, disjoint rows; a rank with another seed is caught by the check."""
import json
import os

import numpy as np
import pytest
import torch.multiprocessing as mp

from fastload import decompose


def _worker(rank, world, path, port, out, seed_of_rank):
    import torch.distributed as dist

    from fastload import DecompositionLoader

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        loader = DecompositionLoader(path, 256, cycles=2, seed=seed_of_rank(rank), check_every=1)
        rec = []
        try:
            for x, y in loader:
                rec.append([x.shape[1], x.shape[0], x[:, 0].tolist()])
            err = None
        except RuntimeError as e:
            err = str(e)
        with open(os.path.join(out, f"{rank}.json"), "w") as f:
            json.dump({"steps": rec, "error": err, "len": len(loader)}, f)
    finally:
        dist.destroy_process_group()


def _same_seed(rank):
    return 3


def _rank_seed(rank):
    return 3 + rank


@pytest.fixture(scope="module")
def dd(tmp_path_factory):
    rng = np.random.default_rng(1)
    lens = rng.integers(0, 600, 300)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    # token 0 at each row start would repeat; use a counter so rows are identifiable
    tokens = (np.arange(offsets[-1]) % 250).astype(np.int32)
    rng.shuffle(tokens)
    out = str(tmp_path_factory.mktemp("ddp") / "dd")
    decompose((tokens, offsets), out, 4, 8, seed=0, vocab_size=257, eot_id=256, progress=False)
    return out


def _launch(world, path, out, seed_fn, port):
    mp.start_processes(_worker, args=(world, path, port, out, seed_fn), nprocs=world, join=True,
                       start_method="spawn")
    return [json.load(open(os.path.join(out, f"{r}.json"))) for r in range(world)]


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_agree(dd, tmp_path, world):
    res = _launch(world, dd, str(tmp_path), _same_seed, 29500 + world)
    assert all(r["error"] is None for r in res)
    assert len({r["len"] for r in res}) == 1 and len(res[0]["steps"]) == res[0]["len"] > 0
    for steps in zip(*(r["steps"] for r in res)):
        assert len({(s[0], s[1]) for s in steps}) == 1  # same bucket and batch size
        assert steps[0][0] * steps[0][1] == 256
    for L in {s[0] for s in res[0]["steps"]}:
        counts = [sum(1 for s in r["steps"] if s[0] == L) for r in res]
        assert len(set(counts)) == 1


@pytest.mark.slow
def test_disagreeing_ranks_raise(dd, tmp_path):
    res = _launch(2, dd, str(tmp_path), _rank_seed, 29510)
    assert all(r["error"] and "ranks disagree" in r["error"] for r in res)
