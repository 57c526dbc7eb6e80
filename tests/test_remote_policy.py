"""The eviction policy alone: a pure function of the cache's state (no files, no threads)."""
from fastload.remote.policy import NEVER, Entry, choose

MB = 1 << 20


def E(name, shard, size=MB, state="idle", atime=0.0):
    return Entry(name, size, shard, state, atime)


def test_fits_without_evicting():
    d = choose([E("a", 0)], MB, 3 * MB, keep=1, next_use={})
    assert d.outcome == "fits" and d.evict == []


def test_order_stale_then_farthest_then_least_recent():
    entries = [E("near", 0, atime=1), E("far", 1, atime=2), E("never_old", 2, atime=1),
               E("never_new", 3, atime=5), E("stale", None, atime=9)]
    d = choose(entries, 4 * MB, 5 * MB, keep=9, next_use={0: 3, 1: 7})
    assert d.outcome == "fits" and d.evict == ["stale", "never_old", "never_new", "far"]


def test_a_shard_another_rank_needs_next_is_never_evicted():
    """Rank B reads shard 0 in its next step: rank A's read goes over the limit rather than
    evicting it (B would download it again at once)."""
    entries = [E("b_next", 0), E("b_now", 1)]
    d = choose(entries, MB, 2 * MB, keep=5, next_use={0: 1, 1: 0}, others={0: 1, 1: 0})
    assert d.outcome == "over" and d.evict == []
    # the same shard needed by B only in 5 steps may go
    d = choose(entries, MB, 2 * MB, keep=5, next_use={0: 5, 1: 0}, others={0: 5, 1: 0})
    assert d.outcome == "fits" and d.evict == ["b_next"]


def test_own_next_step_shard_may_go_last_but_not_own_current():
    entries = [E("mine_next", 0), E("mine_now", 1)]
    d = choose(entries, MB, 2 * MB, keep=5, next_use={0: 1, 1: 0}, others={})
    assert d.outcome == "fits" and d.evict == ["mine_next"]


def test_leased_and_writing_are_never_candidates():
    entries = [E("mapped", 0, state="leased"), E("flight", 1, state="writing")]
    d = choose(entries, MB, 2 * MB, keep=5, next_use={})
    assert d.outcome == "busy" and d.evict == []  # wait for the download to land
    d = choose([E("mapped", 0, state="leased")], MB, MB + 1, keep=5, next_use={})
    assert d.outcome == "over" and d.evict == []  # mapped bytes count; unlinking frees nothing


def test_predownload_never_evicts_a_shard_needed_no_later():
    entries = [E("soon", 0), E("later", 1)]
    d = choose(entries, MB, 2 * MB, keep=2, next_use={0: 1, 1: 9, 2: 4}, ahead=True)
    assert d.outcome == "fits" and d.evict == ["later"]
    d = choose(entries, MB, 2 * MB, keep=2, next_use={0: 1, 1: 3, 2: 4}, ahead=True)
    assert d.outcome == "wait" and d.evict == []
    d = choose([E("x", 0, state="leased")], MB, MB + 1, keep=2, next_use={}, ahead=True)
    assert d.outcome == "wait"  # the predownload never goes over the limit


def test_too_big_and_disk_full():
    assert choose([], 3 * MB, 2 * MB, keep=0, next_use={}).outcome == "too_big"
    entries = [E("a", 0), E("b", 1), E("now", 2)]
    d = choose(entries, MB, None, keep=3, next_use={2: 0}, disk_full=True)
    assert d.outcome == "fits" and sorted(d.evict) == ["a", "b"]  # all the rules allow
    d = choose(entries + [E("x.tmp", 1, state="writing")], MB, None, keep=3, next_use={2: 0}, disk_full=True)
    assert d.outcome == "busy"  # a download in flight holds the missing blocks: wait for it


def test_next_use_distance_over_ranks_is_the_minimum():
    entries = [E("a", 0), E("b", 1)]
    # a: A needs it in 8 steps, B in 2 -> 2 (kept), b: nobody -> NEVER (goes)
    d = choose(entries, MB, 2 * MB, keep=4, next_use={0: 2}, others={0: 2})
    assert d.evict == ["b"] and NEVER > 2
