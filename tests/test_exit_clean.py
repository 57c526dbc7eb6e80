"""The process exits with the script's own code, never SIGABRT (issue 10 item 11), when a
script raises, is interrupted (SIGINT), breaks out and exits, or just ends while a
ReinforcedLoader iterator with num_workers > 0 is alive. Before the fix the daemon prefetch
thread re-took the GIL inside torch during interpreter finalization and the forced unwind
through pybind11 ended in "terminate called without an active exception" (9 runs of 12 of
the "end" script on this machine)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from _ddp_loader_worker import write_dataset

SCRIPT = r'''
import os, signal, sys, time
import fastload
root, mode = sys.argv[1], sys.argv[2]
L = fastload.ReinforcedLoader(root, batch_size=8, num_workers=2, image_size=96, shuffle=True,
                              prefetch_factor=4)
it = iter(L)
next(it)  # the prefetch threads are rendering the next batches now
if mode == "raise":
    raise ValueError("the training script failed")
if mode == "sigint":
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)
if mode == "break":
    for _ in L:
        break
    sys.exit(3)
'''
EXPECTED = {"end": 0, "raise": 1, "sigint": -signal.SIGINT, "break": 3}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("exit")
    (d / "script.py").write_text(SCRIPT)
    return str(d / "script.py"), write_dataset(str(d / "ds"), n=40)


def _run(setup, mode):
    script, root = setup
    p = subprocess.run([sys.executable, script, root, mode], capture_output=True, text=True, timeout=120)
    return p.returncode, p.stderr


def _check(setup, modes):
    bad = []
    for mode in modes:
        rc, err = _run(setup, mode)
        if rc != EXPECTED[mode] or "terminate called" in err:
            bad.append((mode, rc, err[-300:]))
    assert not bad, f"{len(bad)} of {len(modes)} runs did not exit cleanly: {bad[:3]}"


@pytest.mark.timeout(300)
def test_exit_clean_each_end_state(setup):
    _check(setup, list(EXPECTED))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_exit_clean_40_runs(setup):
    _check(setup, list(EXPECTED) * 10)


@pytest.mark.parametrize("how", ["iter", "load_state_dict", "set_epoch"])
def test_superseded_iterator_stops_its_threads(setup, how):
    import fastload

    L = fastload.ReinforcedLoader(setup[1], batch_size=4, num_workers=2, image_size=32, prefetch_factor=2)
    it = iter(L)
    next(it)
    st = L.state_dict()
    if how == "iter":
        new = iter(L)  # noqa: F841 - keeps the new iterator alive
    elif how == "load_state_dict":
        L.load_state_dict(st)
    else:
        L.set_epoch(7)
    t0 = time.time()
    while it.thread.is_alive() or it.prep_thread.is_alive():
        assert time.time() - t0 < 5, f"the superseded iterator's threads still run after {how}"
        time.sleep(0.02)
    with pytest.raises(fastload.loader.reinforced.SupersededError):
        next(it)
    assert not any(t is it.thread for t in threading.enumerate())


THREAD_SCRIPT = r'''
import sys, threading, time
import fastload  # imported by the main thread, as a training script does
from fastload import ReinforcedDataset, ReinforcedLoader
root, nw = sys.argv[1], int(sys.argv[2])

def train():
    time.sleep(0.5)  # the main thread has returned: the interpreter is shutting down
    L = ReinforcedLoader(ReinforcedDataset(root), batch_size=8, num_workers=nw,
                         image_size=32, shuffle=True)
    n = sum(1 for _ in L)
    print("batches", n, flush=True)

threading.Thread(target=train).start()  # non-daemon: the process waits for it
'''


@pytest.mark.timeout(300)
@pytest.mark.parametrize("nw", [0, 2])
def test_loader_in_non_daemon_thread_after_main_returns(setup, tmp_path, nw):
    """Default verification hashes a shuffled first batch's shards in parallel; it must not
    use concurrent.futures, which refuses work once the main thread has returned."""
    _, root = setup  # 40 rows in 4 shards: the first batch touches several unverified shards
    script = tmp_path / "thread_script.py"
    script.write_text(THREAD_SCRIPT)
    p = subprocess.run([sys.executable, str(script), root, str(nw)], capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 0 and "batches 5" in p.stdout, p.stdout[-500:] + p.stderr[-2000:]
    assert "interpreter shutdown" not in p.stderr


def test_exit_hook_names_threads_it_could_not_join(capsys):
    """The exit hook stops every fastload thread; one that does not stop in time is named on
    stderr with its stack (what it is blocked in)."""
    from fastload import _threads

    # threads earlier tests left running (remote datasets never closed: their predownload
    # threads look at the stop flag about once a second) are not what this test names
    _threads.stop_all_threads(timeout=10)
    _threads._EXITING.clear()
    release = threading.Event()

    def stuck_in_native_wait():
        release.wait(30)

    t = _threads.start_thread(stuck_in_native_wait, (), threading.Event(), name="fastload-stuck-test")
    try:
        stuck = _threads.stop_all_threads(timeout=0.2)
    finally:
        release.set()
        t.join(10)
        _threads._EXITING.clear()  # the hook ran in-process: let later tests start threads
    assert stuck == [t]
    err = capsys.readouterr().err
    assert "fastload-stuck-test" in err and "stuck_in_native_wait" in err and "release.wait" in err


def test_exit_hook_joins_threads_that_stop():
    from fastload import _threads

    stop = threading.Event()
    t = _threads.start_thread(lambda: stop.wait(30), (), stop, name="fastload-stops-test")
    try:
        assert _threads.stop_all_threads(timeout=10) == []
    finally:
        _threads._EXITING.clear()
    assert not t.is_alive()
