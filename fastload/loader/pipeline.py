"""How ``ReinforcedLoader`` runs its stages for one iteration (one epoch pass).

``num_workers == 0``: plan -> gather -> render -> deliver, all in the caller's thread.
``num_workers > 0``: thread 1 runs plan + gather, thread 2 renders (the native render
releases the GIL, so the gather of the next batch overlaps it; thread 2 queues the next
batch on the native runner before it waits for the current one, see ``_render_stage``), with
``prefetch_factor - 1`` rendered batches queued; deliver (the device copy, the collate hook, the counters) and every
collective (``check_ranks``) run in the caller's thread, in ``__next__``. The threads are
fastload background threads (``fastload._threads``): stopped and joined at exit, and no
collective may run on them. Each stage's time and batches go to the loader's ``stats()``."""
from __future__ import annotations

import queue
import threading
import time

from fastload._dist import check_epoch_end, check_same_across_ranks
from fastload._state import StepIterable

_END = object()


class _Error:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event):
    while not stop.is_set():
        try:
            return q.get(timeout=0.05)
        except queue.Empty:
            continue
    return _END


def _start_thread(target, args, stop: threading.Event) -> threading.Thread:
    from fastload._threads import start_thread

    return start_thread(target, args, stop, name="fastload-prefetch")


def _timed(stage, t0: float, count: bool = True) -> float:
    t1 = time.perf_counter()
    stage.seconds += t1 - t0
    stage.items += count
    return t1


def _plan_gather_stage(plan, gather, epoch: int, q: queue.Queue, stop: threading.Event, stats) -> None:
    """Thread 1: plan + gather (Python). Runs while thread 2's native render of the previous
    batch holds no GIL, so the native pool never waits for the gather."""
    try:
        it = iter(plan)
        while not stop.is_set():
            t0 = time.perf_counter()
            item = next(it, _END)
            if item is _END:
                break
            step, idx, hw = item
            t0 = _timed(stats["plan"], t0)
            prep = gather.prepare(epoch, step, idx, hw)
            _timed(stats["gather"], t0)
            if not _put(q, prep, stop):
                return
        _put(q, _END, stop)
    except BaseException as exc:  # surfaces in the training loop
        _put(q, _Error(exc), stop)


def _render_stage(render, bufs, src: queue.Queue, q: queue.Queue, stop: threading.Event, stats) -> None:
    """Thread 2: render gathered batches into output buffers. Neither thread holds a
    reference to the iterator, so an abandoned iterator is collected and stops them.

    Two batches in flight: when the next gathered batch is already waiting, it is submitted
    (queued on the native runner) before the previous one is waited for, so the native
    threads go from one batch to the next without waiting for this thread to get the GIL
    back. When none is waiting, the previous batch is finished and delivered first (a slow
    gather, e.g. a cold remote shard, never holds back a rendered batch)."""
    pending = None  # the submitted, not yet delivered batch

    def deliver() -> bool:
        t0 = time.perf_counter()
        host = pending.result()
        _timed(stats["render"], t0, count=False)
        return _put(q, host, stop)

    try:
        while True:
            if pending is None:
                prep = _get(src, stop)
            else:
                try:
                    prep = src.get_nowait()
                except queue.Empty:
                    if not deliver():
                        return
                    pending = None
                    continue
            if prep is _END or isinstance(prep, _Error) or stop.is_set():
                if pending is not None and not stop.is_set() and not deliver():
                    return
                _put(q, prep, stop)
                return
            t0 = time.perf_counter()
            handle = render.submit(prep, bufs)
            _timed(stats["render"], t0)
            if pending is not None and not deliver():
                return
            pending = handle
    except BaseException as exc:
        _put(q, _Error(exc), stop)


class Iteration:
    def __init__(self, loader, token: int, epoch: int, start: int):
        self.loader, self.token, self.epoch = loader, token, epoch
        self.done = self.finished = self.last_out = False
        # batches in the epoch, when known exactly (built-in plans and fastload samplers)
        bs = loader.batch_sampler
        self.total = len(loader) if bs is None or isinstance(bs, StepIterable) else None
        self.thread = None
        self.stats = loader._stats
        t0 = time.perf_counter()
        plan = loader._plan(epoch, start)  # samplers set up here, in the caller's thread
        self.stats["plan"].seconds += time.perf_counter() - t0
        bufs = loader._deliver.buffers()
        if loader.num_workers == 0:
            self.bufs, self.plan = bufs, iter(plan)
        else:
            qsize = max(loader.prefetch_factor - 1, 1)
            self.q: queue.Queue = queue.Queue(maxsize=qsize)
            self.mid: queue.Queue = queue.Queue(maxsize=1)
            self.stop = threading.Event()
            self.prep_thread = _start_thread(_plan_gather_stage, (plan, loader._gather, epoch, self.mid, self.stop,
                                                                  self.stats), self.stop)
            self.thread = _start_thread(_render_stage, (loader._render, bufs, self.mid, self.q, self.stop,
                                                        self.stats), self.stop)

    def __iter__(self):
        return self

    def __len__(self):
        L = self.loader
        return max(len(L) - L._pos.step, 0) if L._pos.is_live(self.token) else 0

    def _get(self):
        limit = self.loader._hooks.timeout
        waited = 0.0
        while True:
            try:
                return self.q.get(timeout=0.5 if not limit else min(0.5, limit - waited))
            except queue.Empty:
                waited += 0.5 if not limit else min(0.5, limit - waited)
                if limit and waited >= limit:
                    raise RuntimeError(f"ReinforcedLoader timed out after {limit} seconds waiting "
                                       "for a batch (timeout=)")
                if not self.thread.is_alive():
                    try:
                        return self.q.get_nowait()
                    except queue.Empty:
                        raise RuntimeError("fastload prefetch thread exited without a result") from None

    def __next__(self):
        L = self.loader
        if self.finished:
            raise StopIteration
        if self.last_out:  # the epoch already moved on when its last batch went out
            self._end()
            raise StopIteration
        if not L._pos.is_live(self.token):
            self.close()
            L._pos.check(self.token)  # raises SupersededError
        if self.done:  # closed after an error
            raise StopIteration
        stats = self.stats
        if self.thread is None:
            t0 = time.perf_counter()
            item = next(self.plan, _END)
            if item is _END:
                self._end()
                raise StopIteration
            step, idx, hw = item
            t0 = _timed(stats["plan"], t0)
            prep = L._gather.prepare(self.epoch, step, idx, hw)
            t0 = _timed(stats["gather"], t0)
            host = L._render(prep, self.bufs)
            _timed(stats["render"], t0)
        else:
            item = self._get()
            if item is _END:
                self._end()
                raise StopIteration
            if isinstance(item, _Error):
                self.close()
                raise item.exc
            host = item
        t0 = time.perf_counter()
        batch = L._deliver(host)
        _timed(stats["deliver"], t0)
        if L.check_ranks:
            # output="bytes": the row count (token lengths differ across ranks by design)
            shape = batch.lengths.shape if hasattr(batch, "lengths") else batch[0].shape
            check_same_across_ranks([L._pos.step, *shape], "the step and batch shape")
        L._pos.advance(self.token)
        if self.total is not None and L._pos.step >= self.total:
            # the pass is complete with its last batch: trainers (Lightning) stop after
            # len(loader) batches without asking for the StopIteration
            self.last_out = True
            L._pos.finish(self.token)
        return batch

    def _end(self):
        self.done = self.finished = True
        L = self.loader
        self.close()
        if L.check_ranks:  # a rank with more batches meets this sentinel instead of hanging
            check_epoch_end(5, "the step and batch shape")
        L._pos.finish(self.token)  # no-op when the last batch already finished the pass

    def close(self):
        self.done = True
        if self.thread is not None:
            self.stop.set()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
