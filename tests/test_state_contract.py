"""ONE contract test (fastload._state.StepIterable) parametrized over every stateful class:
fresh state, mid-epoch resume bit for bit, epoch rollover, supersession, a step past the end,
forged fingerprints and types, nested state and legacy states. The cross-restart resume of
the README's loop is test_resume_contract.py."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from _resume_cases import digest
from fastload._state import StepIterable, SupersededError


def _build(case: str, paths: dict):
    import fastload
    from fastload.batch.buckets import BucketBatchSampler
    from fastload.batch.mixing import StreamMixer
    from fastload.batch.sharding import ShardedSampler
    from fastload.batch.shuffle import BlockShuffleSampler
    from fastload.batch.tic import TiCSampler
    from fastload.batch.variable import VariableBatchSampler

    def vbs():
        return VariableBatchSampler(23, base_size=(32, 32), base_batch_size=4, min_size=(16, 16),
                                    max_size=(48, 48), num_scales=3, seed=1, rank=0, world_size=1)

    if case == "ReinforcedLoader":
        return fastload.ReinforcedLoader(paths["images"], batch_size=5, shuffle=True, seed=3,
                                         image_size=16, p_reinforced=0.7)
    if case == "ReinforcedLoader+bytes":  # ByteFormer input: re-encoded in the render stage
        return fastload.ReinforcedLoader(paths["images"], batch_size=5, shuffle=True, seed=3,
                                         image_size=16, output="bytes", encode="png", bucket=True,
                                         num_workers=2)
    if case == "ReinforcedLoader+VariableBatchSampler":
        return fastload.ReinforcedLoader(paths["images"], batch_sampler=vbs(), num_workers=2)
    if case == "ReinforcedLoader+StreamMixer":
        mixer = StreamMixer({"a": 15, "b": 8}, [0.5, 0.5], epoch_size=20, global_batch_size=4, seed=2,
                            rank=0, world_size=1)
        return fastload.ReinforcedLoader(paths["images"], batch_size=4, sampler=mixer, image_size=16)
    if case == "DecompositionLoader":
        return fastload.DecompositionLoader(paths["tokens"], tokens_per_step=256, seed=2, cycles=2,
                                            pin_memory=False)
    if case == "BucketBatchSampler":
        return BucketBatchSampler({8: 70, 9: 33, 10: 12}, tokens_per_step=1024, cycles=2, seed=5)
    if case == "VariableBatchSampler":
        return VariableBatchSampler(300, base_size=64, base_batch_size=8, min_size=32, max_size=96,
                                    num_scales=3, divisible_by=16, seed=7)
    if case == "ShardedSampler":
        return ShardedSampler(13, shuffle=True, seed=4, rank=1, world_size=2)
    if case == "BlockShuffleSampler":
        return BlockShuffleSampler([5, 7, 3, 8], block_shards=2, seed=6)
    if case == "RankBatches":
        return BlockShuffleSampler([5, 7, 3, 8], block_shards=2, seed=6).batch_sampler(
            4, rank=1, world_size=2, drop_last=False)
    if case == "StreamMixer":
        return StreamMixer({"a": 30, "b": 7}, [0.7, 0.3], epoch_size=24, global_batch_size=4, seed=1,
                           rank=0, world_size=2)
    if case == "TiCSampler":
        return TiCSampler([10, 12, 9], time_step=2, policy="cumulative-all", budget=20,
                          global_batch_size=4, seed=3, rank=1, world_size=2)
    raise ValueError(case)


CASES = ["ReinforcedLoader", "ReinforcedLoader+bytes", "ReinforcedLoader+VariableBatchSampler", "ReinforcedLoader+StreamMixer",
         "DecompositionLoader", "BucketBatchSampler", "VariableBatchSampler", "ShardedSampler",
         "BlockShuffleSampler", "RankBatches", "StreamMixer", "TiCSampler"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    import fastload
    from _ddp_loader_worker import write_dataset

    root = tmp_path_factory.mktemp("contract")
    images = write_dataset(str(root / "images"), n=23)
    toks = np.random.default_rng(0).integers(0, 256, 30000).astype(np.int32)
    fastload.decompose((toks, np.arange(0, 30001, 500)), str(root / "tokens"), min_bucket=4,
                       max_bucket=6, vocab_size=257, eot_id=256, progress=False)
    return {"images": images, "tokens": str(root / "tokens")}


def _epoch(obj):
    return [digest(b) for b in obj]


@pytest.fixture(params=CASES)
def case(request, paths):
    return request.param, (lambda: _build(request.param, paths))


def test_every_stateful_class_is_a_step_iterable(case):
    name, build = case
    obj = build()
    assert isinstance(obj, StepIterable)
    st = obj.state_dict()
    assert {"kind", "version", "epoch", "step", "fingerprint"} <= set(st)
    assert (st["epoch"], st["step"]) == (0, 0) and st["kind"] == name.split("+")[0]
    assert st == copy.deepcopy(st)
    torch.save(st, "/dev/null")  # plain types


def test_mid_epoch_resume_is_bit_exact_and_epochs_roll_over(case, tmp_path):
    name, build = case
    ref = build()
    e0, e1 = _epoch(ref), _epoch(ref)  # no set_epoch: the finished pass moved to epoch 1
    assert ref.epoch == 2 and len(e0) >= 2
    if name not in ("ShardedSampler",):  # every other case is shuffled per epoch too
        assert e0 != e1
    obj = build()
    it = iter(obj)
    k = len(e0) // 2
    for _ in range(k):
        next(it)
    st = obj.state_dict()
    assert (st["epoch"], st["step"]) == (0, k)
    torch.save(st, tmp_path / "s.pt")
    fresh = build()
    fresh.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert (fresh.epoch, fresh.step) == (0, k)
    assert _epoch(fresh) == e0[k:]
    assert fresh.epoch == 1 and fresh.state_dict()["step"] == 0
    assert _epoch(fresh) == e1
    # the state at the end of a pass is the next epoch's start
    end = build()
    end.load_state_dict({**st, "step": len(e0)})
    assert _epoch(end) == [] and end.epoch == 1


def test_supersession(case):
    _, build = case
    obj = build()
    x, y = iter(obj), iter(obj)
    with pytest.raises(SupersededError):
        next(x)
    next(y)
    st = obj.state_dict()
    obj.load_state_dict(st)
    with pytest.raises(SupersededError):
        next(y)
    z = iter(obj)
    next(z)
    obj.set_epoch(5)
    with pytest.raises(SupersededError):
        next(z)
    assert (obj.epoch, obj.state_dict()["step"]) == (5, 0)


def test_step_past_the_end_is_an_error(case):
    _, build = case
    obj = build()
    st = obj.state_dict()
    n = len(obj)
    obj.load_state_dict({**st, "step": n})  # the end itself is a position
    for bad in (n + 1, 10 ** 9):
        with pytest.raises(ValueError, match="past the end"):
            build().load_state_dict({**st, "step": bad})


def test_forged_fingerprints_are_rejected(case):
    _, build = case
    obj = build()
    st = obj.state_dict()
    fp = st["fingerprint"]
    key = sorted(fp)[0]
    renamed = {**{k: v for k, v in fp.items() if k != key}, key + "_x": fp[key]}
    missing = {k: v for k, v in fp.items() if k != key}
    extra = {**fp, "zzz": 1}
    for forged, what in (({}, "missing"), (renamed, "missing"), (missing, key), (extra, "zzz")):
        with pytest.raises(ValueError, match=what):
            build().load_state_dict({**st, "fingerprint": forged})
    changed = {**fp, key: "something else"}
    with pytest.raises(ValueError, match=key):
        build().load_state_dict({**st, "fingerprint": changed})
    with pytest.raises(TypeError, match="fingerprint"):
        build().load_state_dict({**st, "fingerprint": [1, 2]})


def test_forged_types_and_values_are_rejected(case):
    _, build = case
    st = build().state_dict()
    for field, bad in (("epoch", 2 ** 62), ("epoch", 2 ** 63), ("epoch", -1), ("step", -1)):
        with pytest.raises(ValueError, match=field):
            build().load_state_dict({**st, field: bad})
    for field, bad in (("step", 1.7), ("step", "1"), ("step", True), ("epoch", 0.0), ("epoch", "0"),
                       ("version", "1")):
        with pytest.raises(TypeError, match=f"{field} must be an int"):
            build().load_state_dict({**st, field: bad})
    with pytest.raises(ValueError, match="no 'kind'"):
        build().load_state_dict({k: v for k, v in st.items() if k != "kind"})
    with pytest.raises(ValueError, match="saved by a"):
        build().load_state_dict({**st, "kind": "SomethingElse"})
    for bad in ([st], None, "state", 3):
        with pytest.raises(TypeError, match="expects a dict"):
            build().load_state_dict(bad)
    # a failed load leaves the object where it was
    obj = build()
    next(iter(obj))
    before = obj.state_dict()
    with pytest.raises(ValueError):
        obj.load_state_dict({**st, "step": 10 ** 9})
    assert obj.state_dict() == before


def test_a_loaded_position_survives_another_rounds_trip(case):
    _, build = case
    obj = build()
    it = iter(obj)
    next(it)
    st = obj.state_dict()
    again = build()
    again.load_state_dict(st)
    assert again.state_dict() == st


# ------------------------------------------------------------------ nested state
def test_loader_state_nests_its_samplers(paths):
    L = _build("ReinforcedLoader+VariableBatchSampler", paths)
    st = L.state_dict()
    assert st["batch_sampler"]["kind"] == "VariableBatchSampler"
    M = _build("ReinforcedLoader+StreamMixer", paths)
    assert M.state_dict()["sampler"]["kind"] == "StreamMixer"
    # a nested state of another configuration is refused, naming the field
    bad = copy.deepcopy(st)
    bad["batch_sampler"]["fingerprint"]["seed"] = 99
    with pytest.raises(ValueError, match="seed"):
        _build("ReinforcedLoader+VariableBatchSampler", paths).load_state_dict(bad)


def test_stream_mixer_proportions_changed_at_a_boundary_survive_a_loader_resume(paths):
    """Epoch 0 at proportions p0; the run changes them to p1 at the epoch boundary (the mixer
    loads the state with its new proportions: streams continue from their counters), trains
    part of epoch 1 and checkpoints the LOADER. A resumed run (built with p1) must continue
    bit for bit: the mixer's counters base travels inside the loader's state."""
    import fastload
    from fastload.batch.mixing import StreamMixer

    def loader(p):
        m = StreamMixer({"a": 15, "b": 8}, p, epoch_size=20, global_batch_size=4, seed=2, rank=0, world_size=1)
        return fastload.ReinforcedLoader(paths["images"], batch_size=4, sampler=m, image_size=16), m

    L0, _ = loader([0.5, 0.5])
    _epoch(L0)
    boundary = L0.state_dict()
    assert (boundary["epoch"], boundary["step"]) == (1, 0)
    L1, m1 = loader([0.8, 0.2])
    # the mixer takes the boundary state with its new proportions; the loader its position
    m1.load_state_dict({**boundary["sampler"], "epoch": 1, "step": 0})
    L1.load_state_dict({k: v for k, v in boundary.items() if k != "sampler"})
    it = iter(L1)
    next(it)
    next(it)
    mid = L1.state_dict()
    rest = [digest(b) for b in it]
    L2, m2 = loader([0.8, 0.2])
    L2.load_state_dict(mid)
    assert int(m2._base_epoch) == 1 and m2._base.tolist() == m1._base.tolist()
    assert [digest(b) for b in L2] == rest
    # without the nested state the resumed order differs (what was lost before)
    L3, _ = loader([0.8, 0.2])
    L3.load_state_dict({k: v for k, v in mid.items() if k != "sampler"})
    assert [digest(b) for b in L3] != rest


# ------------------------------------------------------------------ legacy states
def test_states_saved_before_the_contract_still_load(paths):
    from fastload.batch.buckets import BucketBatchSampler
    from fastload.batch.sharding import ShardedSampler
    from fastload.batch.variable import VariableBatchSampler

    s = ShardedSampler(13, shuffle=True, seed=4, rank=1, world_size=2)
    s.load_state_dict({"epoch": 1, "pos": 3, "seed": 4, "num_samples": 13, "world_size": 2})
    assert (s.epoch, s.step) == (1, 3)
    with pytest.raises(ValueError, match="seed"):
        s.load_state_dict({"epoch": 1, "pos": 3, "seed": 5})
    v = VariableBatchSampler(300, base_size=64, base_batch_size=8, min_size=32, max_size=96,
                             num_scales=3, divisible_by=16, seed=7)
    v.load_state_dict({"epoch": 2, "batches_done": 1, "seed": 7, "num_samples": 300, "world_size": 1})
    assert (v.epoch, v.step) == (2, 1)
    b = BucketBatchSampler({8: 70, 9: 33, 10: 12}, tokens_per_step=1024, cycles=2, seed=5)
    cfg = {k: v for k, v in b.state_dict()["fingerprint"].items() if k != "global_tokens_per_step"}
    b.load_state_dict({"epoch": 0, "step": 2, "config": {**cfg, "tokens_per_step": 1024, "world_size": 1}})
    assert (b.epoch, b.step) == (0, 2)
    L = _build("ReinforcedLoader", paths)
    L.load_state_dict({"epoch": 1, "batches_done": 2, "seed": 3, "world_size": 1})
    assert (L.epoch, L.step) == (1, 2)
    d = _build("DecompositionLoader", paths)
    cfg = {k: v for k, v in d.state_dict()["fingerprint"].items() if k != "global_tokens_per_step"}
    d.load_state_dict({"sampler": {"epoch": 1, "step": 1, "config": {**cfg, "tokens_per_step": 256,
                                                                      "world_size": 1}}, "path": "x"})
    assert (d.epoch, d.step) == (1, 1)
