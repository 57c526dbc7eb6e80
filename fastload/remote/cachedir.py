"""The cache folder's mechanism: locks, kernel-held leases, reservations and the node-wide
table of next uses that every rank sharing the folder publishes.

Liveness is the kernel's, never a pid (ranks in separate containers share a hostPath cache
across pid namespaces, and pids are reused):

- a download writes ``<shard>.tmp-<random>`` and holds an exclusive ``flock`` on it from its
  creation (under the cache lock) to its rename: a scanner that can take that lock with
  ``LOCK_NB`` found a file whose writer died (the kernel drops a dead process's locks) and
  removes it; otherwise it is a download in flight whose reservation counts in full;
- a reader holds a shared ``flock`` on a shard from lookup until its memory map is gone
  (the map's descriptor is a dup of the locked one, so the lock lives as long as the map):
  eviction takes the exclusive lock with ``LOCK_NB`` and skips what is leased, so a shard
  is never unlinked between ``exists`` and ``open``, and mapped bytes (which an unlink would
  not free) stay counted against the limit;
- each rank's plan (the shards it reads, step by step) is a file ``ranks/<random>.plan``
  on which its owner holds a shared ``flock``: a table file whose lock can be taken is a
  dead rank's and is removed. Eviction reads all of them (under the cache lock) to know
  every live rank's next use of every shard.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import uuid
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .policy import NEVER, Entry

log = logging.getLogger("fastload.remote")
FULL_DISK = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}

TMP = ".tmp-"


def unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class FileLock:
    """An exclusive ``fcntl.flock`` on ``path`` (shared by processes and threads alike)."""

    _tlocks: Dict[str, threading.Lock] = {}
    _guard = threading.Lock()

    def __init__(self, path: str):
        self.path = path
        with FileLock._guard:
            self._t = FileLock._tlocks.setdefault(path, threading.Lock())

    def __enter__(self):
        self.acquire(True)
        return self

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; ``blocking=False``: False at once if another thread or process holds it."""
        if not self._t.acquire(blocking):  # flock is per open file description: threads need their own lock
            return False
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._fd)
                self._t.release()
                return False
        except BaseException:
            self._t.release()
            raise
        return True

    def release(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
        finally:
            self._t.release()

    def __exit__(self, *exc):
        self.release()


# -- durability without an fsync per shard ---------------------------------------------------
# A downloaded shard is renamed into place once its sha256 matched, and later readers trust
# it without hashing again. An fsync before the rename made that safe against a crash of the
# machine (a renamed file whose blocks never reached the disk would pass for verified), at a
# cost the timeline measured at 7-19 ms of wall per 2 MB shard on this VM's disk (a third of
# its GET), on the predownload thread the reader waits for. Instead the shard carries an
# extended attribute naming the boot it was written in: while that boot lasts, the page
# cache holds the written bytes (a process crash loses nothing; only a kernel crash or power
# loss can, and either means a new boot). A reader trusts a shard marked with the current
# boot id or marked DURABLE; any other (another boot's mark, or no mark: lost in the crash,
# or a cache written before this existed) is hashed again from the disk once, then fsync'd
# and marked DURABLE, or evicted and downloaded again. The mark can only be too cautious,
# never too trusting: it is set before the rename, and DURABLE only after an fsync.
# Where extended attributes are not supported (ENOTSUP; some NFS, old tmpfs), every shard
# is fsync'd before its rename as before, and all shards there are trusted.
XATTR = "user.fastload.written"
DURABLE = b"durable"


def boot_id() -> Optional[bytes]:
    """This boot's id (Linux), or None: then every download is fsync'd."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read().strip() or None
    except OSError:
        return None


_BOOT = boot_id()


def mark_written(fd: int) -> bool:
    """Mark a verified download with this boot's id; False where that cannot be done (the
    caller then fsyncs the file before renaming it into place)."""
    if _BOOT is None or not hasattr(os, "setxattr"):
        return False
    try:
        os.setxattr(fd, XATTR, _BOOT)
        return True
    except OSError:
        return False


def trusted(fd: int) -> bool:
    """Whether a shard in place may be used without hashing it again (see above)."""
    if not hasattr(os, "getxattr"):
        return True  # no xattrs here: every shard was fsync'd before its rename
    try:
        v = os.getxattr(fd, XATTR)
    except OSError as e:
        # ENOTSUP: the file system has no xattrs, so every shard there was fsync'd
        return e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP)
    return v == DURABLE or (_BOOT is not None and v == _BOOT)


def mark_durable(fd: int) -> None:
    """After a shard was hashed again from the disk and matched: fsync it (so DURABLE is never
    set on bytes the disk may not hold), then mark it so no later boot hashes it again."""
    os.fsync(fd)
    try:
        os.setxattr(fd, XATTR, DURABLE)
    except OSError:
        pass  # hashed again next time: slower, never wrong


def try_exclusive(path: str) -> Optional[int]:
    """An fd of ``path`` holding its exclusive flock, or None (leased, or gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def lease(path: str) -> Optional[int]:
    """A read-only fd of ``path`` holding a shared flock (the caller maps it, which keeps the
    lease), or None when the file is not there (never was, or was evicted meanwhile)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits out an eviction holding the exclusive lock
        st = os.fstat(fd)
        try:
            same = os.stat(path).st_ino == st.st_ino
        except FileNotFoundError:
            same = False
        if not same or st.st_nlink == 0:  # evicted between open and lock
            os.close(fd)
            return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def is_leased(path: str) -> bool:
    fd = try_exclusive(path)
    if fd is None:
        return os.path.exists(path)
    os.close(fd)
    return False


class Reservation:
    """A download's temporary file, created (sparse, at its full size when ``size`` is given)
    and exclusively flock'ed at once: the lock is the writer's lease, released by the kernel
    if the process dies. ``fd`` stays open (and locked) until :meth:`close`."""

    def __init__(self, final: str, size: Optional[int] = None):
        self.final = final
        self.path = f"{final}{TMP}{uuid.uuid4().hex[:16]}"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            if size is not None:
                try:
                    os.ftruncate(self.fd, int(size))  # sparse: counts in full, allocates nothing yet
                except OSError as e:
                    if e.errno not in (errno.EFBIG, errno.ENOSPC, errno.EDQUOT):
                        raise  # a file-size limit: the download meets it and says so
        except BaseException:
            self.close()
            raise

    def commit(self) -> None:
        """Rename into place (still locked: nobody evicts it before the lock goes)."""
        os.replace(self.path, self.final)
        self.path = self.final

    def close(self) -> None:
        if self.fd is not None:
            if self.path != self.final:
                unlink(self.path)
            os.close(self.fd)
            self.fd = None


class RankTable:
    """This rank's row of the node-wide table: ``ranks/<random>.plan`` holds int64s
    ``[current step, (shard, step) * n]`` (the plan's uses, by step), and the owner holds a
    shared flock on it for as long as it lives."""

    HORIZON = 1 << 16  # plan entries published (a global shuffle's plan has one per row)

    def __init__(self, root: str):
        self.dir = os.path.join(root, "ranks")
        os.makedirs(self.dir, exist_ok=True)
        self.path = os.path.join(self.dir, uuid.uuid4().hex[:16] + ".plan")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_SH)

    def publish(self, shards: np.ndarray, steps: np.ndarray, cur: int) -> None:
        """Replace the plan (call under the cache lock: readers take it too)."""
        n = min(len(shards), self.HORIZON)
        data = np.empty(1 + 2 * n, np.int64)
        data[0] = cur
        data[1::2], data[2::2] = shards[:n], steps[:n]
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, data.tobytes(), 0)
        except OSError as e:  # a full disk: other ranks miss our plan until the next one
            if e.errno not in FULL_DISK:
                raise
            log.warning("%s: cannot publish this rank's plan (%s)", self.path, e)

    def at_step(self, cur: int) -> None:
        os.pwrite(self.fd, np.int64(cur).tobytes(), 0)  # one aligned 8-byte write

    def close(self) -> None:
        if self.fd is not None:
            unlink(self.path)
            os.close(self.fd)
            self.fd = None

    def __del__(self):  # a cache dropped without close(): its plan must not pin shards
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    @staticmethod
    def next_uses(root: str, num_shards: int, me: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
        """(soonest use over all live ranks, over the others than ``me``): steps from each
        rank's current step, NEVER where none. Removes dead ranks' rows."""
        d = os.path.join(root, "ranks")
        every = np.full(num_shards, NEVER, np.int64)
        others = every.copy()
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return every, others
        for name in names:
            p = os.path.join(d, name)
            if p != me:
                fd = try_exclusive(p)
                if fd is not None:  # its owner is gone
                    unlink(p)
                    os.close(fd)
                    continue
            try:
                data = np.fromfile(p, np.int64)
            except (FileNotFoundError, ValueError):
                continue
            if len(data) < 3:
                continue
            cur, sh, st = data[0], data[1::2], data[2::2]
            n = min(len(sh), len(st))
            sh, st = sh[:n], st[:n]
            ok = (st >= cur) & (sh >= 0) & (sh < num_shards)
            dist = np.full(num_shards, NEVER, np.int64)
            np.minimum.at(dist, sh[ok], st[ok] - cur)
            np.minimum(every, dist, out=every)
            if p != me:
                np.minimum(others, dist, out=others)
        return every, others


_HEX = set("0123456789abcdef")


def _is_cache_name(name: str) -> bool:
    """``<sha256[:16]>-<file>``, a shard or its download (nothing else in the folder)."""
    return len(name) > 17 and name[16] == "-" and set(name[:16]) <= _HEX


class CacheDir:
    """One dataset's cache folder: ``<sha16>-<file>`` shards, ``*.tmp-*`` downloads in flight,
    ``locks/``, ``meta/``, ``ranks/`` and ``atime`` (float64 per shard: last access by any
    rank, for the least-recently-used order)."""

    def __init__(self, path: str):
        self.path = path
        for sub in ("locks", "meta", "ranks"):
            os.makedirs(os.path.join(path, sub), exist_ok=True)

    def lock(self) -> FileLock:
        return FileLock(os.path.join(self.path, "locks", "cache.lock"))

    def shard_lock(self, name: str) -> FileLock:
        return FileLock(os.path.join(self.path, "locks", name + ".lock"))

    def touch(self, shard: int, now: float) -> None:
        """Record an access (a lost race between two ranks' writes only reorders LRU ties)."""
        try:
            fd = os.open(os.path.join(self.path, "atime"), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                os.pwrite(fd, np.float64(now).tobytes(), 8 * int(shard))
            finally:
                os.close(fd)
        except OSError as e:  # a full disk: the LRU order is a hint, the read goes on
            if e.errno not in FULL_DISK:
                raise

    def atimes(self, num_shards: int) -> np.ndarray:
        try:
            a = np.fromfile(os.path.join(self.path, "atime"), np.float64)
        except (FileNotFoundError, ValueError):
            a = np.zeros(0)
        out = np.zeros(num_shards)
        out[:min(len(a), num_shards)] = a[:num_shards]
        return out

    def scan(self, live: Dict[str, int], atime: Sequence[float], skip: Sequence[str] = ()) -> List[Entry]:
        """The folder's shards and downloads (call under :meth:`lock`); removes the
        temporary files of dead writers."""
        out = []
        for e in os.scandir(self.path):
            if not _is_cache_name(e.name) or e.path in skip or not e.is_file():
                continue
            try:
                size = e.stat().st_size
            except FileNotFoundError:  # evicted or renamed by another process meanwhile
                continue
            if TMP in e.name:
                fd = try_exclusive(e.path)
                if fd is not None:  # its writer is gone (killed mid-download)
                    unlink(e.path)
                    os.close(fd)
                    continue
                out.append(Entry(e.name, size, live.get(e.name.split(TMP)[0]), "writing"))
                continue
            shard = live.get(e.name)
            state = "leased" if is_leased(e.path) else "idle"
            out.append(Entry(e.name, size, shard, state, float(atime[shard]) if shard is not None else 0.0))
        return out

    def evict(self, name: str) -> bool:
        """Unlink a shard unless a reader leased it since the scan."""
        p = os.path.join(self.path, name)
        fd = try_exclusive(p)
        if fd is None:
            return False
        try:
            unlink(p)
        finally:
            os.close(fd)
        return True
