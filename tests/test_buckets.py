"""Bucket sampler: constant tokens, curricula, cycles, resume, distributed rule."""
import numpy as np
import pytest

from fastload.batch.buckets import BucketBatchSampler, curriculum_odds
from fastload.tokens.decompose import _lib

ROWS = {4: 900, 5: 400, 6: 150, 7: 70}


def run(s):
    return [(k, r.copy()) for k, r in s]


def test_constant_tokens_and_rows_used_once():
    s = BucketBatchSampler(ROWS, tokens_per_step=256, seed=3)
    steps = run(s)
    assert len(steps) == len(s) == sum(n // (256 >> k) for k, n in ROWS.items())
    assert all(len(r) * (1 << k) == 256 for k, r in steps)
    for k, n in ROWS.items():
        used = np.concatenate([r for kk, r in steps if kk == k])
        assert len(np.unique(used)) == len(used) and used.min() >= 0 and used.max() < n
        assert len(used) == (n // (256 >> k)) * (256 >> k)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 4097, 100003])
def test_row_permutation_is_a_bijection(n):
    out = np.empty(n, np.int64)
    assert _lib().fl_dd_permute(n, 987654321, 0, n, out.ctypes.data) == 0
    np.testing.assert_array_equal(np.sort(out), np.arange(n))
    if n >= 64:  # it shuffles: far from the identity
        assert (out == np.arange(n)).mean() < 0.1
    part = np.empty(n // 2, np.int64)  # any sub-range gives the same values as the full evaluation
    _lib().fl_dd_permute(n, 987654321, n - n // 2, n // 2, part.ctypes.data)
    np.testing.assert_array_equal(part, out[n - n // 2:])


def test_pow2_short_buckets_drain_first():
    rows = {k: 64 * (256 >> k) for k in range(4, 9)}  # 64 batches in every bucket
    s = BucketBatchSampler(rows, tokens_per_step=256, curriculum="pow2", seed=0)
    sched = s.schedule()
    mean_pos = [np.flatnonzero(sched == k).mean() for k in range(4, 9)]
    assert all(a < b for a, b in zip(mean_pos, mean_pos[1:])), mean_pos
    u = BucketBatchSampler(rows, tokens_per_step=256, curriculum="uniform", seed=0).schedule()
    first_half = [np.mean(np.flatnonzero(u == k) < len(u) / 2) for k in range(4, 9)]
    assert all(0.35 < f < 0.65 for f in first_half), first_half


@pytest.mark.parametrize("curriculum", ["pow2", "uniform", {4: 1.0, 5: 5.0, 6: 1.0, 7: 3.0}])
def test_first_step_law_is_remaining_times_odds(curriculum):
    # The mixture rule at step 0: P(k) = batches_k * odds_k / sum. Fixed seeds: deterministic.
    s0 = BucketBatchSampler(ROWS, tokens_per_step=256, curriculum=curriculum, seed=0)
    w = s0.batches * curriculum_odds(list(ROWS), curriculum)
    p = w / w.sum()
    n = 1500
    firsts = np.array([BucketBatchSampler(ROWS, 256, curriculum, seed=i).schedule()[0] for i in range(n)])
    obs = np.array([(firsts == k).sum() for k in sorted(ROWS)])
    exp = n * p
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    assert chi2 < 16.3, (obs, exp)  # 99.9% quantile of chi2(3)


def test_second_step_law_after_first(rng):
    # Weights use the batches *left*: after a first draw from a bucket with one batch it is gone.
    rows = {4: 16, 5: 8 * 50}  # bucket 4: one batch of 16; bucket 5: 50 batches of 8
    odds = {4: 1000.0, 5: 1.0}
    seen = [list(BucketBatchSampler(rows, 256, odds, seed=i).schedule()[:2]).count(4) for i in range(200)]
    assert max(seen) == 1  # never twice: drawn without replacement


def test_user_odds_and_bad_arguments():
    assert curriculum_odds([4, 5], [3, 1]).tolist() == [3.0, 1.0]
    with pytest.raises(ValueError, match="curriculum"):
        curriculum_odds([4, 5], "linear")
    with pytest.raises(ValueError, match="odds"):
        curriculum_odds([4, 5], [1, 0])
    with pytest.raises(ValueError, match="no odds"):
        curriculum_odds([4, 5], {4: 1})
    with pytest.raises(ValueError, match="divisible by the longest bucket"):
        BucketBatchSampler(ROWS, tokens_per_step=100)
    with pytest.raises(ValueError, match="cycles"):
        BucketBatchSampler(ROWS, 256, cycles=0)


def test_cycles_each_have_their_own_curriculum():
    rows = {k: 40 * (256 >> k) for k in range(4, 8)}
    s = BucketBatchSampler(rows, 256, "pow2", cycles=4, seed=1)
    steps = run(s)
    sched = np.array([k for k, _ in steps])
    per_cycle = len(sched) // 4
    for c in range(4):
        part = sched[c * per_cycle:(c + 1) * per_cycle]
        assert sorted(np.unique(part, return_counts=True)[1].tolist()) == [10, 10, 10, 10]
        mean_pos = [np.flatnonzero(part == k).mean() for k in range(4, 8)]
        assert mean_pos[0] < mean_pos[-1]  # short -> long inside every cycle
    for k in rows:  # every row once over the epoch
        used = np.concatenate([r for kk, r in steps if kk == k])
        assert len(np.unique(used)) == rows[k]


def test_exact_resume_and_epochs():
    full = BucketBatchSampler(ROWS, 256, cycles=2, seed=9)
    ref = run(full) + run(full)  # two epochs (the epoch advances by itself)
    for cut in [0, 1, 17, len(full) - 1, len(full), len(full) + 5]:
        s = BucketBatchSampler(ROWS, 256, cycles=2, seed=9)
        got = []
        it = iter(s)
        for _ in range(cut):
            try:
                got.append(next(it))
            except StopIteration:
                it = iter(s)
                got.append(next(it))
        state = s.state_dict()
        s2 = BucketBatchSampler(ROWS, 256, cycles=2, seed=9)
        s2.load_state_dict(state)
        rest = run(s2)
        if s2.epoch == 1 and state["epoch"] == 0:
            rest += run(s2)
        else:
            rest += run(s2) if state["epoch"] == 0 else []
        tail = got + rest
        for (ka, ra), (kb, rb) in zip(tail, ref):
            assert ka == kb and np.array_equal(ra, rb)
    a = [k for k, _ in BucketBatchSampler(ROWS, 256, seed=9)]
    s = BucketBatchSampler(ROWS, 256, seed=9)
    s.set_epoch(1)
    assert [k for k, _ in s] != a
    s.set_epoch(0)
    assert [k for k, _ in s] == a
    with pytest.raises(ValueError, match="different configuration.*seed"):
        BucketBatchSampler(ROWS, 256, seed=8).load_state_dict(full.state_dict())


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_same_bucket_equal_counts_disjoint_rows(world):
    samplers = [BucketBatchSampler(ROWS, 256, cycles=2, seed=4, rank=r, world_size=world) for r in range(world)]
    runs = [run(s) for s in samplers]
    assert len({len(r) for r in runs}) == 1
    for steps in zip(*runs):
        assert len({k for k, _ in steps}) == 1 and len({len(r) for _, r in steps}) == 1
    for k, n in ROWS.items():
        b = 256 >> k
        used = np.concatenate([r for run_ in runs for kk, r in run_ if kk == k])
        assert len(used) == (n // (b * world)) * b * world == len(np.unique(used))
