"""Which cached shards go to make room: a pure function of the cache's state (no files, no
threads, no clock), so the rules are tested on their own (tests/test_remote_policy.py).

The state is what every rank sharing the folder published (fastload/remote/cachedir.py):
for each shard its size, whether a reader holds a lease on it (mapped: evicting it would
free nothing), whether it is a download in flight (a reservation), its next use in steps
from now, the soonest over all live ranks, and its last access.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

NEVER = 1 << 62

# a shard any live rank reads in its current or next step is never evicted by another
# read: evicting it costs that rank a second download of the same shard moments later
PROTECT_STEPS = 1


@dataclass(frozen=True)
class Entry:
    name: str
    size: int
    shard: Optional[int]  # position in the manifest; None: not listed (a stale dataset's)
    state: str = "idle"  # "idle" | "leased" (mapped by a reader) | "writing" (download in flight)
    atime: float = 0.0


@dataclass
class Decision:
    """``outcome``: "fits" (after evicting ``evict``), "wait" (the predownload: only shards
    needed no later than its own stand in the way), "busy" (downloads in flight stand in the
    way: wait for them), "over" (only shards being read or needed in the next step stand in
    the way: the read goes over the limit; those bytes are in use), "too_big" (the shard alone
    exceeds the limit)."""
    outcome: str
    evict: List[str] = field(default_factory=list)
    used_after: int = 0


def choose(entries: Sequence[Entry], need: int, limit: Optional[float], keep: int,
           next_use: Dict[int, int], ahead: bool = False, disk_full: bool = False,
           others: Optional[Dict[int, int]] = None) -> Decision:
    """What to evict so that ``need`` more bytes fit under ``limit`` for shard ``keep``.

    ``next_use``: {shard: steps until its next use by any live rank} (absent: never);
    ``others``: the same over the other ranks only (None: as ``next_use``). A shard another
    rank reads in its current or next step (``PROTECT_STEPS``) is never evicted, nor one
    this rank reads in its current step; this rank's own next-step shards may go last.
    ``ahead``: a predownload, which never evicts a shard needed no later than ``keep``.
    ``disk_full``: the disk said ENOSPC: evict every candidate the rules allow.

    Order: shards the manifest no longer lists, then the farthest next use (never used
    again first), then the least recently accessed."""
    lim = float("inf") if limit is None else float(limit)
    if need > lim:
        return Decision("too_big")
    others = next_use if others is None else others
    used = sum(e.size for e in entries)
    if not disk_full and used + need <= lim:
        return Decision("fits", [], used)
    keep_use = next_use.get(keep, NEVER)
    cands = [e for e in entries if e.state == "idle" and e.shard != keep]
    cands.sort(key=lambda e: (e.shard is not None, -next_use.get(e.shard, NEVER), e.atime))
    evict: List[str] = []
    blocked = False
    for e in cands:
        if not disk_full and used + need <= lim:
            break
        use = next_use.get(e.shard, NEVER) if e.shard is not None else NEVER
        if ahead and use <= keep_use:
            return Decision("wait", evict, used)  # the rest are needed no later than keep
        if use == 0 or others.get(e.shard, NEVER) <= PROTECT_STEPS:
            blocked = True  # read now, or by another rank now or next: not ours to take
            continue
        evict.append(e.name)
        used -= e.size
    if disk_full and any(e.state == "writing" for e in entries):
        return Decision("busy", evict, used)  # their blocks are the ones missing: let them land
    if disk_full or used + need <= lim:
        return Decision("fits", evict, used)
    if ahead:
        return Decision("wait", evict, used)
    if any(e.state == "writing" for e in entries):
        return Decision("busy", evict, used)
    if blocked or any(e.state == "leased" for e in entries):
        return Decision("over", evict, used)
    return Decision("too_big", evict, used)
