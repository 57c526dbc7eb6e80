"""The remote package's client and predownload threads alone (no object store needed for
the prefetcher; the client against a closed port)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("obstore")

from fastload.remote.client import Client, RemoteError
from fastload.remote.prefetch import Prefetcher

from _remote_servers import free_port


def test_stop_flag_ends_the_backoff_at_once():
    c = Client(f"http://127.0.0.1:{free_port()}", retries=20, backoff=2.0)
    threading.Timer(0.3, c.stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match="cancelled"):
        c.get_bytes("x")
    assert time.monotonic() - t0 < 2.0


def test_a_dead_server_is_reported_within_the_stated_bound():
    """Defaults: 5 retries after 0.25+0.5+1+2+4 = 7.75 s of backoff (module docs: ~8 s)."""
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match=rf"{url}/x: get failed after 6 attempts"):
        Client(url).get_bytes("x")
    assert 7.0 < time.monotonic() - t0 < 9.5


def test_the_deadline_cuts_retries():
    c = Client(f"http://127.0.0.1:{free_port()}", retries=50, backoff=0.5, deadline=2.0)
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match="failed after"):
        c.get_bytes("x")
    assert time.monotonic() - t0 < 2.5


class _Host(Prefetcher):
    """What the prefetcher needs from a cache, with downloads that are events."""

    url = "fake://"

    def __init__(self, n, predownload=2):
        self.shards = [{"file": f"s{i}"} for i in range(n)]
        self.predownload = predownload
        self.client = Client("http://127.0.0.1:9")
        self.done, self.published, self.steps = set(), [], []
        self.got = threading.Condition()
        self._init_prefetch()

    def local_name(self, pos):
        return f"/nonexistent/{pos}-{'x' if pos in self.done else 'missing'}"

    def fetch_ahead(self, pos, wait=True):
        with self.got:
            self.done.add(pos)
            self.got.notify_all()
        return True

    def _publish(self, order, steps, cur):
        self.published.append((order.tolist(), steps.tolist(), cur))

    def _publish_step(self, cur):
        self.steps.append(cur)

    def wait_for(self, shards, timeout=10):
        with self.got:
            return self.got.wait_for(lambda: set(shards) <= self.done, timeout)


def test_prefetcher_follows_the_window_and_publishes_the_plan(monkeypatch):
    import os

    monkeypatch.setattr(os.path, "exists", lambda p: p.endswith("-x"))
    h = _Host(6, predownload=1)
    h.plan_steps([np.array([0, 1]), np.array([2]), np.array([3]), np.array([4, 5])])
    assert h.published == [([0, 1, 2, 3, 4, 5], [0, 0, 1, 2, 3, 3], 0)]
    assert h.wait_for([0, 1, 2])  # the step's shards and one more
    assert not h.wait_for([3], timeout=0.3)  # not before the reader moves
    h.at_step(2)
    assert h.steps == [2] and h.wait_for([3, 4])  # step 2 reads 3; one more: 4
    t0 = time.monotonic()
    h.close()
    assert time.monotonic() - t0 < 2 and not any(t.is_alive() for t in h._threads)


def test_the_first_steps_shards_are_requested_side_by_side(monkeypatch):
    """A plan's first step reads a block of 6 shards: all 6 downloads are in flight at once
    (before, 2 streams fetched them two by two while the first batch waited); later shards
    start only once the first step's have landed."""
    import os

    from fastload.remote import prefetch

    monkeypatch.setattr(os.path, "exists", lambda p: p.endswith("-x"))
    monkeypatch.setattr(prefetch, "FIRST_STEP_STREAMS", 8)
    release = threading.Event()
    inflight, peak, order = set(), [0], []

    class Slow(_Host):
        def fetch_ahead(self, pos, wait=True):
            with self.got:
                inflight.add(pos)
                order.append(pos)
                peak[0] = max(peak[0], len(inflight))
                self.got.notify_all()
            if pos < 6:
                release.wait(10)
            with self.got:
                inflight.discard(pos)
            return super().fetch_ahead(pos, wait)

    h = Slow(10, predownload=2)
    h.plan_steps([np.arange(6), np.arange(6), np.array([6, 7]), np.array([8, 9])])
    with h.got:
        assert h.got.wait_for(lambda: set(range(6)) <= inflight, 5)
    time.sleep(0.2)
    assert not {6, 7} & set(order)  # nothing later shares the server with the first step
    release.set()
    assert h.wait_for(range(8))
    assert peak[0] >= 6
    h.close()


def test_after_a_call_gave_up_the_next_one_tries_once():
    c = Client(f"http://127.0.0.1:{free_port()}", retries=3, backoff=0.3)
    with pytest.raises(RemoteError, match="after 4 attempts"):
        c.get_bytes("x")
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match="after 1 attempts"):
        c.get_bytes("y")
    assert time.monotonic() - t0 < 0.5


def test_close_names_a_thread_it_cannot_join_with_its_stack(monkeypatch, caplog):
    import logging
    import os

    monkeypatch.setattr(os.path, "exists", lambda p: p.endswith("-x"))
    release, entered = threading.Event(), threading.Event()

    class Stuck(_Host):
        def fetch_ahead(self, pos, wait=True):
            entered.set()
            release.wait(10)  # a client call that ignores the stop flag
            return super().fetch_ahead(pos, wait)

    h = Stuck(2, predownload=1)
    h.plan_steps([np.array([0]), np.array([1])])
    assert entered.wait(10)
    with caplog.at_level(logging.WARNING, logger="fastload.remote"):
        h.close(timeout=0.2)
    release.set()
    msg = caplog.text
    # the first thread in fetch_ahead is the one the plan started for its first step's shard
    assert "fastload-first-step-0 still running" in msg and "in fetch_ahead" in msg
    for t in h._threads:
        t.join(5)


def test_a_port_number_or_a_duration_is_not_an_http_403():
    from fastload.remote.client import _auth_like

    assert not _auth_like("Error performing GET http://127.0.0.1:40323/ds/manifest.json - error sending request")
    # a refused connection that took 403.506 µs (this message failed CI once)
    assert not _auth_like("Generic HTTP error: Error performing GET http://127.0.0.1:57653/ds/manifest.json "
                          "in 403.506µs - HTTP error: error sending request")
    assert not _auth_like("Error performing GET http://127.0.0.1:5/x in 403µs - error sending request")
    assert not _auth_like("Error performing GET http://127.0.0.1:5/x in 1.403s - error sending request")
    assert _auth_like("Server returned non-2xx status code: 403 Forbidden: ")
    assert _auth_like("<Code>AccessDenied</Code>") and _auth_like("HTTP error 403")
    assert _auth_like("Client error with status 403 Forbidden") and _auth_like("HTTP status 403")


def test_predownload_threads_are_registered_with_the_stop_flag(monkeypatch):
    """Predownload threads start through fastload._threads.start_thread, with the client's
    stop flag: at exit stop_all_threads sets it, joins them and names any it cannot join
    (plain threading.Thread before: invisible to it)."""
    import os

    from fastload import _threads

    monkeypatch.setattr(os.path, "exists", lambda p: p.endswith("-x"))
    h = _Host(4, predownload=2)
    h.plan_steps([np.array([0]), np.array([1]), np.array([2]), np.array([3])])
    try:
        assert h._threads and all(t in _threads.live_threads() for t in h._threads)
        with _threads._LOCK:
            assert all(_threads._THREADS[t] is h.client.stop for t in h._threads)
        assert h.wait_for([0, 1, 2])
    finally:
        h.close()
    assert not any(t.is_alive() for t in h._threads)
    assert not any(t in _threads.live_threads() for t in h._threads)
