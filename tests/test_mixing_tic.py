"""Stream mixing and TiC rehearsal samplers: proportions, no repeats before a stream is
exhausted, world-size independence, the state contract (resume, fingerprint, superseded)."""
from __future__ import annotations

import doctest
import io

import numpy as np
import pytest
import torch

import fastload.batch.mixing as mixing_mod
import fastload.batch.tic as tic_mod
from fastload._state import SupersededError
from fastload.batch.mixing import StreamMixer, chain
from fastload.batch.tic import POLICIES, TiCSampler


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_doctests():
    assert doctest.testmod(mixing_mod).failed == 0
    assert doctest.testmod(tic_mod).failed == 0


def test_chain_passes_without_repeats():
    x = chain(7, 3, 25, 0, 1)
    full = chain(7, 0, 28, 0, 1)
    assert np.array_equal(x, full[3:28])
    for p in range(4):
        assert sorted(full[p * 7:(p + 1) * 7].tolist()) == list(range(7))


# -------------------------------------------------------------------------------- mixing
def _mixer(**kw):
    kw.setdefault("streams", {"a": 100, "b": 30, "c": 7})
    kw.setdefault("proportions", [0.5, 0.3, 0.2])
    kw.setdefault("epoch_size", 60)
    kw.setdefault("global_batch_size", 12)
    kw.setdefault("seed", 3)
    return StreamMixer(**kw)


def test_mixing_proportions_and_stream_passes():
    m = _mixer()
    assert m.counts.tolist() == [30, 18, 12]
    seen = {0: [], 1: [], 2: []}
    for e in range(5):
        o = m.global_order(e)
        st = m.stream_of(o)
        assert np.bincount(st, minlength=3).tolist() == [30, 18, 12]
        for i in range(3):
            seen[i] += (o[st == i] - m.offsets[i]).tolist()
    for i, n in enumerate([100, 30, 7]):
        s = seen[i]
        for p in range(len(s) // n):  # every full pass is a permutation: no repeat before exhaustion
            assert sorted(s[p * n:(p + 1) * n]) == list(range(n))


def test_mixing_world_size_independent():
    ref = [np.asarray(b) for b in _mixer()]
    for w in (2, 3, 4):
        for slicing in ("contiguous", "strided"):
            parts = [list(_mixer(rank=r, world_size=w, slicing=slicing)) for r in range(w)]
            for step, g in enumerate(ref):
                got = np.concatenate([parts[r][step] for r in range(w)])
                assert sorted(got.tolist()) == sorted(g.tolist())
                assert all(len(parts[r][step]) == 12 // w for r in range(w))


def test_mixing_resume_mid_epoch_any_world_size():
    m = _mixer()
    m.set_epoch(2)
    it = iter(m)
    head = [next(it) for _ in range(2)]
    state = _roundtrip(m.state_dict())
    assert state["epoch"] == 2 and state["step"] == 2
    assert sum(state["streams"].values()) == 2 * 60 + 2 * 12
    rest = list(it)
    n = _mixer()
    n.load_state_dict(state)
    n.set_epoch(2)  # the usual call at the top of the epoch loop keeps the position
    assert all(np.array_equal(a, b) for a, b in zip(list(n), rest)) and len(rest) == 3
    assert n.epoch == 3
    with pytest.raises(SupersededError):
        it2 = iter(m)
        next(it2)
        iter(m)
        next(it2)


def test_mixing_state_errors_and_proportion_change():
    m = _mixer()
    with pytest.raises(ValueError, match="epoch_size: saved 60, now 61"):
        _mixer(epoch_size=61).load_state_dict(m.state_dict())
    with pytest.raises(ValueError, match="seed"):
        _mixer(seed=4).load_state_dict(m.state_dict())
    m.set_epoch(3)
    it = iter(m)
    next(it)
    with pytest.raises(ValueError, match="epoch boundary"):
        _mixer(proportions=[0.2, 0.3, 0.5]).load_state_dict(m.state_dict())
    list(it)  # finish epoch 3 -> position (4, 0)
    st = m.state_dict()
    new = _mixer(proportions=[0.2, 0.3, 0.5])
    new.load_state_dict(st)
    o = new.global_order(4)
    # each stream continues its chain where the counters left it
    for i, name in enumerate(["a", "b", "c"]):
        mine = o[new.stream_of(o) == i] - new.offsets[i]
        want = chain(int(new.sizes[i]), st["streams"][name], len(mine), 3, mixing_mod._TAG_STREAM, i)
        assert np.array_equal(mine, want)


def test_mixing_bad_arguments():
    with pytest.raises(ValueError, match="proportions"):
        _mixer(proportions=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="3 streams"):
        _mixer(proportions=[1.0])
    with pytest.raises(ValueError, match="multiple of the world size"):
        _mixer(rank=0, world_size=5)


# -------------------------------------------------------------------------------------- TiC
SIZES = [400, 300, 500, 200, 100]


def _tic(policy, t=4, **kw):
    kw.setdefault("buffer_size", None if policy == "cumulative-all" else 120)
    return TiCSampler(SIZES, time_step=t, policy=policy, budget=256, global_batch_size=32, seed=1, **kw)


def test_tic_pools():
    assert _tic("cumulative-all").pool_counts() == [400, 300, 500, 200, 100]
    assert _tic("cumulative-equal").pool_counts() == [30, 30, 30, 30, 100]
    assert _tic("cumulative-exp").pool_counts() == [15, 15, 30, 60, 100]
    r = _tic("restricted").pool_counts()
    assert sum(r[:4]) == 120 and r[4] == 100
    big = TiCSampler([40000, 10000, 5], time_step=2, policy="restricted", buffer_size=5000, budget=64,
                     global_batch_size=32, seed=0).pool_counts()
    assert abs(big[0] - 4000) < 150 and abs(big[1] - 1000) < 100  # uniform over old data
    assert _tic("cumulative-equal", t=0).pool_counts() == [400]


# Hand-computed shares of a buffer of D = 160 old samples, oldest split first, for m = 1..5
# old splits (TiC-CLIP steps 2..6; ``time_step`` = m). -Exp: every new step halves each old
# split's share and gives the most recent old split D/2 (the two oldest hold the same share);
# -Equal: D/m each (a remainder sample to the oldest splits first). Splits of 1000 samples, so no share is capped by its split's size.
_D = 160
_EXP = {1: [160], 2: [80, 80], 3: [40, 40, 80], 4: [20, 20, 40, 80], 5: [10, 10, 20, 40, 80]}
_EQUAL = {1: [160], 2: [80, 80], 3: [54, 53, 53], 4: [40, 40, 40, 40], 5: [32, 32, 32, 32, 32]}


def _shares(policy, m):
    s = TiCSampler([1000] * 6, time_step=m, policy=policy, buffer_size=_D, budget=64,
                   global_batch_size=32, seed=5)
    return s, s.pool_counts()


@pytest.mark.parametrize("m", sorted(_EXP))
def test_tic_exp_shares_match_the_halving_rule(m):
    s, counts = _shares("cumulative-exp", m)
    assert counts == _EXP[m] + [1000] and s.shares() == _EXP[m]
    assert sum(counts[:m]) == _D
    if m > 1:  # each step halves what every old split had and gives the newest old one D/2
        prev = _EXP[m - 1]
        assert counts[:m - 1] == [x // 2 for x in prev] and counts[m - 1] == _D // 2


@pytest.mark.parametrize("m", sorted(_EQUAL))
def test_tic_equal_shares_split_the_buffer_evenly(m):
    s, counts = _shares("cumulative-equal", m)
    assert counts == _EQUAL[m] + [1000] and sum(counts[:m]) == _D
    assert max(counts[:m]) - min(counts[:m]) <= 1


def test_tic_all_and_sequential_pools():
    for m in range(6):
        assert _shares("cumulative-all", m)[1] == [1000] * (m + 1)  # every old split whole
        assert _shares("sequential", m)[1] == [0] * m + [1000]  # the new split only
    # sequential needs no buffer_size; the buffered policies do
    TiCSampler(SIZES, 3, "sequential", 10, 2)
    for policy in ("cumulative-equal", "cumulative-exp", "restricted"):
        with pytest.raises(ValueError, match="needs buffer_size"):
            TiCSampler(SIZES, 3, policy, 10, 2)


def test_tic_oracle_budget_is_one_budget_per_step():
    # the Oracle / Restart are "cumulative-all" from scratch; the Oracle's budget is one
    # per-step budget C per time step (7 x C over the 7 steps of TiC-DataComp)
    C, t = 64, 4
    s = TiCSampler(SIZES, time_step=t, policy="cumulative-all", budget=(t + 1) * C, global_batch_size=32)
    assert len(s) == (t + 1) * C // 32 and len(s.global_order(0)) == (t + 1) * C


@pytest.mark.parametrize("policy", ["cumulative-equal", "cumulative-exp", "restricted"])
def test_tic_buffer_never_regains_dropped_samples(policy):
    prev = None
    for t in range(1, 5):
        s = _tic(policy, t=t)
        old = set(s.pool()[s.split_of(s.pool()) < t].tolist())
        assert len(old) <= 120
        if prev is not None:
            assert old <= prev  # buffer(t) is inside buffer(t-1) plus the split added at t-1
        prev = old | set(range(s.offsets[t], s.offsets[t] + SIZES[t]))


@pytest.mark.parametrize("policy", POLICIES)
def test_tic_fixed_budget_deterministic_resumable(policy):
    s = _tic(policy)
    batches = list(s)
    assert len(batches) == 256 // 32 and all(len(b) == 32 for b in batches)
    pool = set(s.pool().tolist())
    assert all(set(b.tolist()) <= pool for b in batches)
    assert all(np.array_equal(a, b) for a, b in zip(batches, list(_tic(policy))))  # epoch 0 again
    s2 = _tic(policy)
    it = iter(s2)
    for _ in range(3):
        next(it)
    st = _roundtrip(s2.state_dict())
    assert sum(st["splits"].values()) == 96
    s3 = _tic(policy, rank=1, world_size=2)
    s3.load_state_dict(st)
    rest = list(s3)
    assert [len(b) for b in rest] == [16] * 5
    assert all(np.array_equal(a, b[16:]) for a, b in zip(rest, batches[3:]))
    with pytest.raises(ValueError, match="time_step"):
        _tic(policy, t=3).load_state_dict(st)


def test_tic_bad_arguments():
    with pytest.raises(ValueError, match="policy must be one of"):
        TiCSampler(SIZES, 1, "cumulative", 10, 2, buffer_size=3)
    with pytest.raises(ValueError, match="needs buffer_size"):
        TiCSampler(SIZES, 1, "restricted", 10, 2)
    with pytest.raises(ValueError, match="time_step"):
        TiCSampler(SIZES, 5, "cumulative-all", 10, 2)
