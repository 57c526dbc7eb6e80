"""The cache folder's mechanism alone: kernel-held leases, reservations, the node-wide table.
Real files, real processes, no sleeps: liveness is the kernel's flock, never a pid."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np

from fastload.remote.cachedir import CacheDir, RankTable, Reservation, is_leased, lease
from fastload.remote.policy import NEVER

NAME = "0123456789abcdef-shard-00000.arrow"


def _holder(code: str):
    """A child process that runs ``code`` then prints 'ready' and waits for stdin."""
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code) + "\nprint('ready', flush=True)\n"
                          "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert p.stdout.readline().strip() == "ready"
    return p


def test_reader_lease_blocks_eviction_until_the_map_goes(tmp_path):
    d = CacheDir(str(tmp_path))
    path = os.path.join(d.path, NAME)
    with open(path, "wb") as f:
        f.write(b"x" * 4096)
    import mmap

    fd = lease(path)
    m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    os.close(fd)  # the map's dup keeps the lease
    assert is_leased(path) and not d.evict(NAME) and os.path.exists(path)
    m.close()
    assert not is_leased(path) and d.evict(NAME) and not os.path.exists(path)
    assert lease(path) is None  # gone: a lookup misses, never a FileNotFoundError later


def test_lease_after_eviction_between_open_and_lock_misses(tmp_path):
    d = CacheDir(str(tmp_path))
    path = os.path.join(d.path, NAME)
    open(path, "wb").write(b"x")
    fd = os.open(path, os.O_RDONLY)  # the reader's open ...
    assert d.evict(NAME)  # ... an eviction before its lock ...
    os.close(fd)
    open(path, "wb").write(b"y")  # ... and a new download of the same name
    fd = lease(path)
    assert fd is not None and os.read(fd, 1) == b"y"
    os.close(fd)


def test_a_live_writer_in_another_process_keeps_its_reservation(tmp_path):
    """The writer's pid is meaningless here (as in another pid namespace): only its flock
    counts. Alive: kept and counted at full size; killed: removed by the next scan."""
    d = CacheDir(str(tmp_path))
    final = os.path.join(d.path, NAME)
    p = _holder(f"""
        import sys
        from fastload.remote.cachedir import Reservation
        r = Reservation({final!r}, 1000)
        """)
    try:
        entries = d.scan({NAME: 0}, [0.0])
        assert [(e.state, e.size, e.shard) for e in entries] == [("writing", 1000, 0)]
    finally:
        p.kill()
        p.wait()
    assert d.scan({NAME: 0}, [0.0]) == []
    assert not [f for f in os.listdir(d.path) if ".tmp-" in f]


def test_unshare_pid_namespace_writer_keeps_its_reservation(tmp_path):
    """A writer in its own pid namespace (its pid there is 1): still alive to the scanner."""
    import pytest

    if subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True).returncode:
        pytest.skip("unshare --pid needs privileges here")
    d = CacheDir(str(tmp_path))
    final = os.path.join(d.path, NAME)
    code = (f"import os,sys; from fastload.remote.cachedir import Reservation; r = Reservation({final!r}, 77); "
            "print(os.getpid(), flush=True); sys.stdin.read()")
    p = subprocess.Popen(["unshare", "--pid", "--fork", sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert p.stdout.readline().strip() == "1"  # pid 1 in its namespace: useless to anyone else
        assert [e.state for e in d.scan({NAME: 0}, [0.0])] == ["writing"]
    finally:
        p.stdin.close()
        p.wait(10)
    assert d.scan({NAME: 0}, [0.0]) == []


def test_reservation_commit_and_abort(tmp_path):
    d = CacheDir(str(tmp_path))
    final = os.path.join(d.path, NAME)
    r = Reservation(final, 10)
    assert os.path.getsize(r.path) == 10
    os.pwrite(r.fd, b"hello", 0)
    r.commit()
    assert is_leased(final)  # still the writer's until closed
    r.close()
    assert open(final, "rb").read(5) == b"hello" and not is_leased(final)
    r2 = Reservation(final + "2", 10)
    tmp = r2.path
    r2.close()
    assert not os.path.exists(tmp)


def test_rank_table_next_uses_and_dead_ranks(tmp_path):
    root = str(tmp_path)
    me = RankTable(root)
    me.publish(np.array([0, 1, 2, 1]), np.array([0, 1, 2, 3]), 0)
    other = _holder(f"""
        import sys, numpy as np
        from fastload.remote.cachedir import RankTable
        t = RankTable({root!r})
        t.publish(np.array([3, 2]), np.array([5, 6]), 0)
        t.at_step(5)
        """)
    try:
        every, others = RankTable.next_uses(root, 5, me.path)
        assert every.tolist() == [0, 1, 1, 0, NEVER]  # shard 2: mine at 2, the other's at 6-5
        assert others.tolist() == [NEVER, NEVER, 1, 0, NEVER]
        me.at_step(2)
        every, _ = RankTable.next_uses(root, 5, me.path)
        assert every.tolist() == [NEVER, 1, 0, 0, NEVER]
    finally:
        other.kill()
        other.wait()
    every, others = RankTable.next_uses(root, 5, me.path)  # the dead rank's row is gone
    assert others.tolist() == [NEVER] * 5 and len(os.listdir(os.path.join(root, "ranks"))) == 1
    me.close()
