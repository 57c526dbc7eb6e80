"""Predownload: threads that keep the shards of the step being read and the next
``predownload`` distinct shards on disk, following the plan the loader hands over; the plan
is also published to the node-wide table (so other ranks' evictions know our next uses).

A mixin of :class:`~fastload.remote.cache.ShardCache`; what it needs from its host:
``shards``, ``predownload``, ``local_name(pos)``, ``fetch_ahead(pos, wait)``,
``_publish(order, steps, cur)``, ``_publish_step(cur)`` and ``client.stop`` (an Event that
ends every wait and cancels client calls). ``_plan``, ``_cursor`` and ``_step_starts`` are
read and written under ``_cv`` only.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import traceback
import weakref
from typing import Iterable, List, Optional, Sequence

import numpy as np

from .._threads import start_thread
from .client import first_line

log = logging.getLogger("fastload.remote")

# predownload threads per cache (each one download at a time, besides the reader's own)
PREDOWNLOAD_STREAMS = int(os.environ.get("FASTLOAD_PREDOWNLOAD_STREAMS", "2"))
# when a plan is handed over, the shards of its first step are requested at once, side by
# side, on up to this many one-shot threads: the reader needs all of them before its first
# batch, and with PREDOWNLOAD_STREAMS streams a block of 4 shards took two GETs one after the
# other (benchmarks/results/remote_timeline_before.json: the first step's last shard started
# only when a stream was free again). Object stores serve each stream at its own pace, so the
# first batch then waits for about one GET instead of two or more.
FIRST_STEP_STREAMS = int(os.environ.get("FASTLOAD_FIRST_STEP_STREAMS", "8"))


class Prefetcher:
    def _init_prefetch(self) -> None:
        self._plan: Optional[np.ndarray] = None  # shard positions in consumption order
        self._cursor = 0
        self._step_starts: Optional[np.ndarray] = None  # plan index where each step begins
        self._cv = threading.Condition()
        self._threads: List[threading.Thread] = []
        self._burst: List[threading.Thread] = []  # the first step's one-shot downloads

    # -- the plan -------------------------------------------------------------------------
    def plan(self, shard_order: Iterable[int], step_starts: Optional[Sequence[int]] = None) -> None:
        """Shards in the order this process will read them; threads keep the current step's
        shards and ``predownload`` more on disk (:meth:`_window`). A new plan replaces the old one.
        ``step_starts[k]``: where step k's shards begin in ``shard_order``, for :meth:`at_step`."""
        order = np.asarray(list(shard_order) if not isinstance(shard_order, np.ndarray) else shard_order,
                           np.int64)
        starts = None if step_starts is None else np.asarray(step_starts, np.int64)
        # with steps, the node-wide table gets every (shard, step) use, before repeats are
        # dropped (a shard read in two consecutive steps is needed in both) and at_step
        # publishes the step; without, each plan entry is a step and _advance the cursor
        with_steps = starts is not None and len(starts) > 0
        full, full_steps = order, (np.searchsorted(starts, np.arange(len(order)), side="right").astype(np.int64) - 1
                                   if with_steps else None)
        if len(order):
            keep = np.ones(len(order), bool)
            keep[1:] = order[1:] != order[:-1]
            if starts is not None:  # positions after dropping consecutive repeats
                starts = np.maximum(np.cumsum(keep)[np.minimum(starts, len(order) - 1)] - 1, 0)
            order = order[keep]
        with self._cv:
            self._plan, self._cursor, self._step_starts = order, 0, starts
            if with_steps:
                self._publish(full, full_steps, 0)
            else:
                self._publish(order, np.arange(len(order), dtype=np.int64), 0)
            self.client.stop.clear()
            self._cv.notify_all()
            if self.predownload:
                self._start_burst(order, starts)
            if self.predownload and not any(t.is_alive() for t in self._threads if t not in self._burst):
                # a few streams: the first step's shards (a block) arrive side by side. On
                # registered threads (fastload._threads): stop_all_threads at exit sets the
                # client's stop flag, joins them and names any it cannot join, with its stack
                self._threads = list(self._burst)
                for k in range(min(self.predownload, PREDOWNLOAD_STREAMS)):
                    try:
                        self._threads.append(start_thread(self._run, (), self.client.stop,
                                                          name=f"fastload-predownload-{k}"))
                    except RuntimeError:  # the interpreter exits: the reader fetches on its own
                        break
                _LIVE.add(self)

    def _start_burst(self, order: np.ndarray, starts: Optional[np.ndarray]) -> None:
        """One thread per shard of the plan's first step not on disk yet (up to
        FIRST_STEP_STREAMS), each downloading it once (skipped when another thread or rank
        has it in flight: the per-shard lock keeps it one GET per node). Call under ``_cv``."""
        end = int(starts[1]) if starts is not None and len(starts) > 1 else (len(order) if starts is not None else 1)
        first = [p for p in dict.fromkeys(order[:max(end, 1)].tolist()) if not os.path.exists(self.local_name(p))]
        self._burst = [t for t in self._burst if t.is_alive()]
        for p in first[:FIRST_STEP_STREAMS]:
            try:
                t = start_thread(self._fetch_once, (p,), self.client.stop, name=f"fastload-first-step-{p}")
            except RuntimeError:  # the interpreter exits: the reader fetches on its own
                break
            self._burst.append(t)
            self._threads.append(t)
        _LIVE.add(self)

    def _fetch_once(self, pos: int) -> None:
        try:
            self.fetch_ahead(pos, wait=False)
        except Exception as e:  # noqa: BLE001 - the reader's own fetch raises it in the main path
            if not self._stopped():
                log.warning("download of %s failed: %s", self.shards[pos]["file"], first_line(e))
        finally:
            with self._cv:
                self._cv.notify_all()  # the streams wait for the first step's downloads to land

    def plan_steps(self, per_step: Sequence[np.ndarray]) -> None:
        """:meth:`plan` from the shards each step reads (each read in ascending order, as
        the dataset's ``gather`` does); step 0 is the first one in ``per_step``."""
        lens = np.fromiter((len(x) for x in per_step), np.int64, len(per_step))
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]]) if len(lens) else lens
        self.plan(np.concatenate(per_step) if len(per_step) else np.zeros(0, np.int64), starts)

    def at_step(self, step: int) -> None:
        """The reader starts step ``step`` of the last :meth:`plan_steps`: the window moves there."""
        with self._cv:
            starts = self._step_starts
            if starts is None or not 0 <= step < len(starts):
                return
            self._cursor = max(self._cursor, int(starts[step]))
            self._publish_step(step)
            self._cv.notify_all()
        if hasattr(self, "_prune_opened"):
            self._prune_opened()

    def _advance(self, pos: int) -> None:
        """The reader opens shard ``pos``: a plan without steps moves to it."""
        with self._cv:
            plan = self._plan
            if plan is None or self._step_starts is not None:
                return
            hits = np.flatnonzero(plan[self._cursor:self._cursor + 4 * self.predownload + 8] == pos)
            if len(hits):
                self._cursor += int(hits[0])
                self._publish_step(self._cursor)
                self._cv.notify_all()

    def current_window(self) -> List[int]:
        """The shards the reader needs now and soon (its open maps outside it may go)."""
        with self._cv:
            if self._plan is None:
                return []
            return self._window(self._plan, self._cursor)

    def _step_end(self, plan: np.ndarray, cur: int) -> int:
        """Where the step at plan index ``cur`` ends (exclusive)."""
        starts = self._step_starts
        end = cur + 1
        if starts is not None and len(starts):
            k = int(np.searchsorted(starts, cur, side="right"))
            end = int(starts[k]) if k < len(starts) else len(plan)
        return max(end, cur + 1)

    def _window(self, plan: np.ndarray, cur: int) -> List[int]:
        """The shards the step at ``cur`` reads, then the next ``predownload`` distinct shards
        of the plan. Distinct shards, not plan entries: with blocks of shards, each step
        reads the whole block and the next steps read it again, so counting entries would
        never reach the next block and the reader would wait for it at every block start."""
        end = self._step_end(plan, cur)
        out = list(dict.fromkeys(plan[cur:end].tolist()))
        seen, want = set(out), len(out) + self.predownload
        i, span = end, 4 * self.predownload + 8
        while len(out) < want and i < len(plan):
            for p in plan[i:i + span].tolist():
                if p not in seen:
                    seen.add(p)
                    out.append(p)
                    if len(out) == want:
                        break
            i, span = i + span, span * 2
        return out

    # -- threads --------------------------------------------------------------------------
    def close(self, timeout: Optional[float] = None) -> None:
        """Stop the predownload threads: their waits end and their client calls are cancelled
        (between two chunks, or when a request's own timeout ends), within the client's
        ``deadline``; a thread still alive then is logged with its stack."""
        with self._cv:
            self.client.stop.set()
            self._cv.notify_all()
        budget = self.client.timeout + 5 if timeout is None else timeout
        end = time.monotonic() + budget
        for th in self._threads:
            if th.is_alive() and th is not threading.current_thread():
                th.join(max(0.0, end - time.monotonic()))
                if th.is_alive():
                    frame = sys._current_frames().get(th.ident)
                    stack = "".join(traceback.format_stack(frame)) if frame is not None else "?"
                    log.warning("%s: thread %s still running %.0f s after close():\n%s", self.url, th.name,
                                budget, stack)
        if hasattr(self, "_close_table"):
            self._close_table()

    def _stopped(self) -> bool:
        return self.client.stop.is_set()

    def _run(self) -> None:
        failed_plan, failed = None, set()
        while True:
            with self._cv:
                while not self._stopped():
                    plan, cur = self._plan, self._cursor
                    if plan is not failed_plan:
                        failed_plan, failed = plan, set()
                    window = self._window(plan, cur)
                    if any(t.is_alive() for t in self._burst):
                        # the first step's shards are arriving on their own threads: the
                        # streams join those (one may fall behind) but start no later shard
                        # that would share the server with them
                        window = window[:len(set(plan[cur:self._step_end(plan, cur)].tolist()))]
                    todo = [p for p in window if p not in failed and not os.path.exists(self.local_name(p))]
                    if todo:
                        break
                    self._cv.wait(1.0)
                if self._stopped():
                    return
            outcome = "busy"
            for p in todo:  # the first one that is not being downloaded by someone else
                try:
                    got = self.fetch_ahead(p, wait=False)
                except Exception as e:  # noqa: BLE001 - the reader's own fetch raises it in the main path
                    if self._stopped():
                        return
                    log.warning("predownload of %s failed: %s", self.shards[p]["file"], first_line(e))
                    failed.add(p)
                    got = True
                if got is not None:
                    outcome = "done" if got else "full"
                    break
            if outcome == "done":
                continue  # the window is recomputed: the reader may have moved meanwhile
            # "full": no room without evicting sooner shards: wait for the reader (or another
            # rank) to move on. "busy": all in flight elsewhere: look again shortly
            deadline = time.monotonic() + (0.25 if outcome == "full" else 0.02)
            with self._cv:
                while not self._stopped() and self._plan is plan and self._cursor == cur:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)


# Caches whose predownload thread may be inside a download. At interpreter exit a daemon
# thread returning from native code (obstore releases the GIL) is unwound by
# pthread_exit, which aborts the process ("terminate called without an active exception")
# when it crosses C++/Rust frames: stop and join them first.
_LIVE: "weakref.WeakSet" = weakref.WeakSet()


@atexit.register
def _stop_predownloads() -> None:
    for cache in list(_LIVE):
        try:
            cache.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
