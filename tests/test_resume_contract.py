"""One resume contract (fastload._state) on every stateful piece, across a real restart.

For each piece, an uninterrupted run of the README's loop (``set_epoch(epoch)`` then ``for
batch in loader``) over EPOCHS epochs records a digest of every batch and saves
``state_dict()`` (``torch.save``) at every cut point: right after ``set_epoch`` (step 0),
after every batch (the last one included), and after each epoch's loop (the epoch
boundary). A fresh Python process then builds the piece again, loads each state with
``torch.load(weights_only=True)``, runs the same loop from the loaded epoch, and must yield
exactly the batches the uninterrupted run yielded after that cut, bit for bit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from _resume_cases import EPOCHS, build, training_loop

HERE = os.path.dirname(os.path.abspath(__file__))

CASES = [
    ("ReinforcedLoader", 0), ("ReinforcedLoader", 2),
    ("ReinforcedLoader+VariableBatchSampler", 0), ("ReinforcedLoader+VariableBatchSampler", 2),
    ("DecompositionLoader", 0), ("DecompositionLoader", 2),
    ("BucketBatchSampler", 0), ("VariableBatchSampler", 0), ("ShardedSampler", 0),
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    import fastload
    from _ddp_loader_worker import write_dataset

    root = tmp_path_factory.mktemp("resume")
    images = write_dataset(str(root / "images"), n=23)
    toks = np.random.default_rng(0).integers(0, 256, 30000).astype(np.int32)
    fastload.decompose((toks, np.arange(0, 30001, 500)), str(root / "tokens"), min_bucket=4,
                       max_bucket=6, vocab_size=257, eot_id=256, progress=False)
    return {"images": images, "tokens": str(root / "tokens")}


@pytest.fixture(scope="module")
def runs(paths, tmp_path_factory):
    """Per case: the uninterrupted run, its cuts, and what one restarted process resumed from
    each cut (one process for all cases: a Python + torch start costs seconds)."""
    tmp = tmp_path_factory.mktemp("states")
    out, specs = {}, {}
    for case, nw in CASES:
        key = f"{case}-nw{nw}"
        obj = build(case, paths, nw)
        cuts = []  # (batches consumed before the cut, state file, where)

        def on_cut(done, where, obj=obj, cuts=cuts, key=key):
            f = tmp / f"{key}-{len(cuts)}.pt"
            torch.save(obj.state_dict(), f)
            cuts.append((done, str(f), where))

        full = training_loop(obj, 0, on_cut)
        out[key] = (full, cuts)
        specs[key] = {"case": case, "nw": nw, "paths": paths, "states": [f for _, f, _ in cuts]}
    spec_file = str(tmp / "spec.json")
    with open(spec_file, "w") as f:
        json.dump(specs, f)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, os.path.join(HERE, "_resume_cases.py"), spec_file],
                   check=True, env=env, timeout=500)
    with open(spec_file + ".out") as f:
        resumed = json.load(f)
    return {k: (full, cuts, resumed[k]) for k, (full, cuts) in out.items()}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case,nw", CASES, ids=[f"{c}-nw{n}" for c, n in CASES])
def test_resume_matches_uninterrupted_run_across_restart(case, nw, runs):
    full, cuts, resumed = runs[f"{case}-nw{nw}"]
    assert {e for e, _ in full} == set(range(EPOCHS)) and len(full) >= 2 * EPOCHS
    # the epochs differ (auto-advance / set_epoch reshuffles), so a wrong epoch is caught
    per_epoch = [[d for e, d in full if e == k] for k in range(EPOCHS)]
    assert per_epoch[0] != per_epoch[1]
    assert len(cuts) == len(resumed) == len(full) + 2 * EPOCHS
    for (done, _, where), got in zip(cuts, resumed):
        assert got == full[done:], f"{case} (num_workers={nw}) resumed after {where} ({done} batches)"


@pytest.mark.parametrize("case", sorted({c for c, _ in CASES}))
def test_contract_surface(case, paths):
    """Same keys, plain types, torchdata/DCP's Stateful protocol, one live iterator."""
    from torch.distributed.checkpoint.stateful import Stateful

    from fastload._state import SupersededError

    obj = build(case, paths, 0)
    assert isinstance(obj, Stateful)
    st = obj.state_dict()
    assert {"kind", "version", "epoch", "step", "fingerprint"} <= set(st)
    assert st["kind"] == case.split("+")[0] and (st["epoch"], st["step"]) == (0, 0)
    x, y = iter(obj), iter(obj)
    with pytest.raises(SupersededError, match="superseded"):
        next(x)
    next(y)
    with pytest.raises(SupersededError):
        list(zip(obj, obj))
    obj.set_epoch(3)
    assert (obj.state_dict()["epoch"], obj.state_dict()["step"]) == (3, 0)
    with pytest.raises(SupersededError):
        next(y)
    # issue 10 item 15: load_state_dict under a live iterator supersedes it; the old iterator
    # can neither go on nor, running out, move the loaded position
    z = iter(obj)
    next(z)
    obj.load_state_dict({**st, "epoch": 2, "step": 1})
    with pytest.raises(SupersededError):
        for _ in z:
            pass
    assert (obj.state_dict()["epoch"], obj.state_dict()["step"]) == (2, 1)
    # a state of another configuration names the field
    other = {**st, "fingerprint": {**st["fingerprint"], "seed": -1}}
    with pytest.raises(ValueError, match="seed"):
        build(case, paths, 0).load_state_dict(other)
