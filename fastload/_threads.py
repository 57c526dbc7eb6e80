"""fastload's background threads: started in one place, stopped and joined at exit, and
named with their stacks when they cannot be joined.

At interpreter exit a daemon thread still running when finalization starts is killed the
moment it re-takes the GIL (``torch.empty`` from the buffer pool after a native render), and
that forced unwind through pybind11 aborts the process ("terminate called without an active
exception") instead of letting it exit with its own code. The atexit hook below therefore
stops every registered thread and joins it; a thread that does not stop in time is printed
to stderr with its stack, so an abort at exit names its culprit.

``parallel_map`` runs short jobs on plain threads: ``concurrent.futures`` refuses new work
once the interpreter is shutting down ("cannot schedule new futures after interpreter
shutdown"), which is exactly when a training loop in a non-daemon thread still runs after
the main thread has returned.
"""
from __future__ import annotations

import atexit
import sys
import threading
import time
import traceback
from typing import Callable, Dict, Iterable, List, Optional, TypeVar

from fastload._dist import mark_background_thread

T = TypeVar("T")
R = TypeVar("R")

# Every background thread alive, with the event that asks it to stop (None: it stops by itself).
_THREADS: Dict[threading.Thread, Optional[threading.Event]] = {}
_LOCK = threading.Lock()
_EXITING = threading.Event()


def start_thread(target: Callable, args: tuple, stop: Optional[threading.Event],
                 name: str = "fastload-prefetch", daemon: bool = True) -> threading.Thread:
    """Start ``target(*args)`` on a registered background thread (no collective may run on
    it: see ``fastload._dist.on_background_thread``)."""
    def body():
        mark_background_thread()
        try:
            target(*args)
        finally:
            with _LOCK:
                _THREADS.pop(threading.current_thread(), None)

    t = threading.Thread(target=body, name=name, daemon=daemon)
    with _LOCK:
        if _EXITING.is_set() and daemon:
            raise RuntimeError("fastload: cannot start a background thread while the interpreter exits")
        _THREADS[t] = stop
        t.start()
    return t


def live_threads() -> List[threading.Thread]:
    with _LOCK:
        return [t for t in _THREADS if t.is_alive()]


def report_stuck(threads: Iterable[threading.Thread], file=None) -> None:
    """Print each thread's name and current stack (what it is blocked in)."""
    file = sys.stderr if file is None else file
    frames = sys._current_frames()
    for t in threads:
        f = frames.get(t.ident)
        stack = "".join(traceback.format_stack(f)) if f is not None else "  (no Python frame)\n"
        print(f"fastload: thread {t.name!r} (ident {t.ident}) did not stop at exit; its stack:\n{stack}",
              file=file, end="")
    try:
        file.flush()
    except Exception:
        pass


@atexit.register
def stop_all_threads(timeout: float = 60.0) -> List[threading.Thread]:
    """Stop every background thread and wait for it (a batch being rendered finishes first);
    name any thread that could not be joined, with its stack, on stderr. Returns those."""
    _EXITING.set()
    with _LOCK:
        live = list(_THREADS.items())
    for _, stop in live:
        if stop is not None:
            stop.set()
    deadline = time.monotonic() + timeout
    for t, _ in live:
        if t is not threading.current_thread():
            t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t for t, _ in live if t.is_alive() and t is not threading.current_thread()]
    if stuck:
        report_stuck(stuck)
    return stuck


def parallel_map(fn: Callable[[T], R], items: List[T], max_workers: int,
                 name: str = "fastload-verify") -> List[R]:
    """``[fn(x) for x in items]`` on up to ``max_workers`` plain threads (for functions that
    release the GIL, such as hashlib); the first exception is re-raised in the caller.

    Plain threads, not ``concurrent.futures``: it refuses work during interpreter shutdown,
    while a non-daemon thread's training loop may still need to verify shards then. Non-daemon
    threads, so that finalization waits for them instead of killing them mid-hash."""
    n = min(max_workers, len(items))
    if n <= 1:
        return [fn(x) for x in items]
    results: List = [None] * len(items)
    errors: List[BaseException] = []
    nxt = iter(range(len(items)))
    lock = threading.Lock()

    def work():
        while True:
            with lock:
                if errors:
                    return
                k = next(nxt, None)
            if k is None:
                return
            try:
                results[k] = fn(items[k])
            except BaseException as e:  # the caller re-raises it
                with lock:
                    errors.append(e)
                return

    threads = []
    for i in range(n - 1):
        t = threading.Thread(target=work, name=f"{name}-{i}", daemon=False)
        try:
            t.start()
        except RuntimeError:  # "can't create new thread at interpreter shutdown": work inline
            break
        threads.append(t)
    work()  # the caller works too
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
