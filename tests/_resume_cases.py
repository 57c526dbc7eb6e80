"""The stateful pieces of fastload built the same way in the test process and in the fresh
process that resumes them (test_resume_contract.py), the README's training loop, and a
digest of every batch so two runs compare bit for bit.

Run as a script (the restarted process): ``python _resume_cases.py spec.json`` loads each
state file with ``torch.load(weights_only=True)`` into a freshly built object, runs the loop
from the loaded epoch to the end and writes the digests as JSON (``spec.json.out``).
"""
from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import torch

EPOCHS = 2


def build(case: str, paths: dict, nw: int):
    import fastload
    from fastload.batch.buckets import BucketBatchSampler
    from fastload.batch.sharding import ShardedSampler
    from fastload.batch.variable import VariableBatchSampler

    if case == "ReinforcedLoader":
        return fastload.ReinforcedLoader(paths["images"], batch_size=5, shuffle=True, seed=3,
                                         num_workers=nw, image_size=16, p_reinforced=0.7)
    if case == "ReinforcedLoader+VariableBatchSampler":
        vs = VariableBatchSampler(23, base_size=(32, 32), base_batch_size=4, min_size=(16, 16),
                                  max_size=(48, 48), num_scales=3, seed=1, rank=0, world_size=1)
        return fastload.ReinforcedLoader(paths["images"], batch_sampler=vs, num_workers=nw)
    if case == "DecompositionLoader":
        return fastload.DecompositionLoader(paths["tokens"], tokens_per_step=256, seed=2, cycles=2,
                                            num_threads=max(nw, 1), pin_memory=False)
    if case == "BucketBatchSampler":
        return BucketBatchSampler({8: 70, 9: 33, 10: 12}, tokens_per_step=1024, cycles=2, seed=5)
    if case == "VariableBatchSampler":
        return VariableBatchSampler(300, base_size=64, base_batch_size=8, min_size=32, max_size=96,
                                    num_scales=3, divisible_by=16, seed=7)
    if case == "ShardedSampler":
        return ShardedSampler(13, shuffle=True, seed=4, rank=1, world_size=2)
    raise ValueError(case)


def digest(item) -> str:
    h = hashlib.sha1()

    def add(x):
        if isinstance(x, torch.Tensor):
            h.update(f"{x.dtype}{tuple(x.shape)}".encode())
            h.update(x.contiguous().numpy().tobytes())
        elif isinstance(x, np.ndarray):
            h.update(f"{x.dtype}{x.shape}".encode())
            h.update(np.ascontiguousarray(x).tobytes())
        elif isinstance(x, (tuple, list)):
            h.update(b"(")
            for y in x:
                add(y)
            h.update(b")")
        else:
            h.update(repr(x).encode())

    add(item)
    return h.hexdigest()


def training_loop(obj, start_epoch: int, on_cut=None):
    """The README's loop; returns [epoch, digest] per batch. ``on_cut(batches so far, where)``
    is called right after set_epoch (step 0), after every batch and after each epoch's loop."""
    out = []
    for epoch in range(start_epoch, EPOCHS):
        obj.set_epoch(epoch)
        if on_cut:
            on_cut(len(out), (epoch, 0))
        for j, batch in enumerate(obj, 1):
            out.append([epoch, digest(batch)])
            if on_cut:
                on_cut(len(out), (epoch, j))
        if on_cut:
            on_cut(len(out), (epoch, "end"))
    return out


def main(spec_file: str) -> None:
    with open(spec_file) as f:
        specs = json.load(f)
    results = {}
    for key, spec in specs.items():
        results[key] = []
        for state_file in spec["states"]:
            obj = build(spec["case"], spec["paths"], spec["nw"])
            obj.load_state_dict(torch.load(state_file, weights_only=True))
            results[key].append(training_loop(obj, obj.epoch))
    with open(spec_file + ".out", "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
