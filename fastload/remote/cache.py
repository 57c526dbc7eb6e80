"""ShardCache: one remote dataset's local cache (see fastload/format/remote.py for the rules).

Composition: :mod:`.client` talks to the store, :mod:`.cachedir` holds the folder's
locks, leases, reservations and the node-wide table, :mod:`.policy` decides evictions,
:mod:`.prefetch` runs the predownload threads. Every remote byte that is kept comes through
:meth:`ShardCache._download_object` (reserved, bounded by ``cache_limit``, hashed while
received, verified before it is renamed into place).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from fastload.format import manifest as mf

from . import policy
from .cachedir import CacheDir, RankTable, Reservation, lease, mark_durable, mark_written, trusted
from .client import (FULL_DISK, SCHEMES, CacheFullError, ChecksumError, Client, RangedFile, RemoteError,
                     default_cache_dir, is_remote, join)
from .prefetch import Prefetcher

log = logging.getLogger("fastload.remote")

META_COLUMNS = mf.META_COLUMNS
_SPANS_KEY = b"fastload.source_spans"  # meta/ entries: [[offset, length, blake2b-128], ...]

# benchmarks/remote_timeline.py sets this to a callable(event, key, record dict): when each
# shard's GET starts and ends, the reader's waits, the CPU of each download phase. None (the
# default) costs one test per download and per fetch.
TRACE: Optional[Callable[[str, str, Dict[str, Any]], None]] = None


class ShardCache(Prefetcher):
    """The local cache of one remote dataset (see fastload/format/remote.py for the rules)."""

    def __init__(self, url: str, cache_dir: Optional[str] = None, cache_limit: Optional[int] = None,
                 predownload: int = 4, retries: int = 5, backoff: float = 0.25, timeout: float = 30.0):
        if not is_remote(url):
            raise ValueError(f"{url!r} is not a remote URL (expected one of {', '.join(SCHEMES)})")
        if cache_limit is not None and int(cache_limit) <= 0:
            raise ValueError(f"cache_limit must be a positive number of bytes or None, got {cache_limit}")
        if int(predownload) < 0:
            raise ValueError(f"predownload must be >= 0, got {predownload}")
        self.url = url.rstrip("/")
        self.client = Client(self.url, retries, backoff, timeout)
        base = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
        self.dir = os.path.join(base, hashlib.sha256(self.url.encode()).hexdigest()[:16])
        self.folder = CacheDir(self.dir)
        self.cache_limit = None if cache_limit is None else int(cache_limit)
        self.predownload = int(predownload)
        self.stats = {"downloads": 0, "bytes_downloaded": 0, "evictions": 0, "meta_bytes": 0,
                      "row_reads": 0, "row_bytes": 0, "over_limit": 0}
        self._stats_lock = threading.Lock()
        self._init_prefetch()
        self._table: Optional[RankTable] = None
        self.shards: List[Dict[str, Any]] = []
        self._names: Dict[str, int] = {}
        self._opened: Optional[Dict[int, Any]] = None  # the reader's {position: mapped shard}
        self._disk_limit: Optional[int] = None  # learned from ENOSPC when cache_limit is None
        self._disk_full_seen = False
        self.meta_index: Optional[List[Any]] = None  # per shard: its META_COLUMNS batch (meta-index.ipc)
        self._shard_columns: Optional[List[str]] = None  # shard 0's column names, from the index

    def __getstate__(self):
        st = dict(self.__dict__)
        for k in ("_cv", "_stats_lock", "_table"):
            st.pop(k, None)
        st["meta_index"] = None  # read at open only: workers get the dataset's arrays
        st.update(_threads=[], _burst=[], _plan=None, _cursor=0, _step_starts=None, _opened=None)
        return st

    def __setstate__(self, st):
        self.__dict__.update(st)
        self._cv, self._stats_lock, self._table = threading.Condition(), threading.Lock(), None

    def _count(self, **kw: int) -> None:
        with self._stats_lock:
            for k, v in kw.items():
                self.stats[k] += v

    # -- the node-wide table (prefetch's hooks) ---------------------------------------------
    def _publish(self, order: np.ndarray, steps: np.ndarray, cur: int) -> None:
        if self._table is None:
            self._table = RankTable(self.dir)
        with self.folder.lock():
            self._table.publish(order, steps, cur)

    def _publish_step(self, cur: int) -> None:
        if self._table is not None:
            self._table.at_step(cur)

    def _close_table(self) -> None:
        if self._table is not None:
            self._table.close()
            self._table = None

    # -- manifest -------------------------------------------------------------------------
    def read_json(self, name: str = "manifest.json") -> Dict[str, Any]:
        raw = self.client.get_bytes(name)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{join(self.url, name)}: not valid JSON ({e})") from e

    def set_shards(self, shards: List[Dict[str, Any]]) -> None:
        for s in shards:
            f = s["file"]
            if os.path.basename(f) != f or f in ("", ".", ".."):
                raise ValueError(f"{self.url}: shard file {f!r} must be a plain name")
        self.shards = shards
        self._names = {os.path.basename(self.local_name(p)): p for p in range(len(shards))}

    def local_name(self, pos: int) -> str:
        s = self.shards[pos]
        return os.path.join(self.dir, f"{s['sha256'][:16]}-{s['file']}")

    # -- metadata columns -------------------------------------------------------------------
    def load_meta_index(self, m: Dict[str, Any]) -> bool:
        """Every shard's metadata columns from the dataset's ``meta-index.ipc`` (one GET,
        hashed against the manifest's sha256, kept under meta/): a dataset of thousands of
        shards opens with two requests. False when the manifest lists none (a dataset written
        before it existed, or the object is missing): :meth:`meta_batch` then reads each
        shard's footer and columns by ranged GETs.

        The index is verified by the sha256 the writer listed beside the shards' own, so its
        columns are the writer's for those shards (no per-shard comparison after download, as
        the ranged reads need: those bytes are unverified until the shard is). Each shard's
        ``hash`` column is also checked against the manifest's ``hash_sha256`` for it."""
        import pyarrow as pa

        ent = m.get("meta_index")
        if not (isinstance(ent, dict) and isinstance(ent.get("file"), str) and isinstance(ent.get("sha256"), str)
                and isinstance(ent.get("bytes"), int) and ent.get("shards") == len(self.shards)):
            return False
        name = ent["file"]
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise ValueError(f"{self.url}: meta_index file {name!r} must be a plain name")
        path = os.path.join(self.dir, "meta", f"index-{ent['sha256'][:16]}.arrow")
        data = None
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            # hashed again on every open (a few MB per million rows): a local file damaged or
            # torn by a crash is never used, it is downloaded again
            if hashlib.sha256(data).hexdigest() != ent["sha256"]:
                data = None
        if data is None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                os.close(self._download_object(name, Reservation(path), ent["bytes"], ent["sha256"], counted=False))
            except RemoteError as e:
                if e.errno != errno.ENOENT:
                    raise
                log.warning("%s: the manifest lists %s but it is not there: reading each shard's metadata",
                            self.url, name)
                return False
            with open(path, "rb") as f:
                data = f.read()
            self._count(meta_bytes=len(data))
        where = join(self.url, name)
        try:
            r = pa.ipc.open_file(pa.py_buffer(data))
            batches = [r.get_batch(k) for k in range(r.num_record_batches)]
        except pa.ArrowInvalid as e:
            raise ValueError(f"{where}: not a valid Arrow IPC file ({e})") from e
        if len(batches) != len(self.shards) or any(c not in r.schema.names for c in META_COLUMNS):
            raise ValueError(f"{where}: {len(batches)} batches with columns {r.schema.names}, expected "
                             f"{len(self.shards)} (one per shard) with {list(META_COLUMNS)}")
        for s, b in zip(self.shards, batches):
            want = s.get("hash_sha256")
            if isinstance(want, str):
                col = b.column("hash")
                got = hashlib.sha256(memoryview(col.buffers()[1])[col.offset * 16:(col.offset + len(col)) * 16])
                if got.hexdigest() != want:
                    raise ChecksumError(f"{where}: the row hashes of {s['file']} differ from the manifest's "
                                        "hash_sha256 (an index written for other shards?)")
        self.meta_index = batches
        cols = ent.get("shard_columns")
        self._shard_columns = list(cols) if isinstance(cols, list) else None
        return True

    def meta_batch(self, pos: int, columns: Sequence[str] = META_COLUMNS):
        """The small per-row columns of shard ``pos`` (ranged GETs; cached under meta/)."""
        import pyarrow as pa

        if self.meta_index is not None and set(columns) <= set(META_COLUMNS):
            return self.meta_index[pos].select(list(columns))
        s = self.shards[pos]
        path = os.path.join(self.dir, "meta", f"{s['sha256'][:16]}.arrow")
        full = self.local_name(pos)
        try:
            if os.path.exists(path):  # small: read into memory, no map outliving its file
                with open(path, "rb") as f:
                    return pa.ipc.open_file(pa.py_buffer(f.read())).get_batch(0)
            fd = lease(full)
            if fd is not None and not trusted(fd):  # may be torn by a crash: read by range
                os.close(fd)
                fd = None
            if fd is not None:  # already downloaded (and verified): read it locally
                try:
                    with open(fd, "rb", closefd=False) as f:
                        data = f.read()
                finally:
                    os.close(fd)
                return _open_selected(lambda: pa.BufferReader(pa.py_buffer(data)), columns)
        except pa.ArrowInvalid:
            pass  # a damaged cache entry: read it again from the remote
        rf = RangedFile(self.client, s["file"], s["bytes"])
        try:
            batch = _open_selected(lambda: pa.PythonFile(rf, mode="r"), columns)
        except pa.ArrowInvalid as e:
            raise ValueError(f"{join(self.url, s['file'])}: not a valid Arrow IPC shard ({e})") from e
        except OSError as e:
            if isinstance(e, RemoteError):
                raise
            raise RemoteError(errno.EIO, f"{join(self.url, s['file'])}: {e}") from e
        self._count(meta_bytes=rf.bytes_read)
        # the byte spans it came from, hashed: once the shard is downloaded and verified,
        # comparing them (a few KiB) proves the metadata equal without decoding (_check_meta)
        spans = [[a, len(d), hashlib.blake2b(d, digest_size=16).hexdigest()] for a, d in rf._blocks]
        sink = pa.BufferOutputStream()
        schema = batch.schema.with_metadata({_SPANS_KEY: json.dumps(spans)})
        with pa.ipc.new_file(sink, schema) as w:
            w.write_batch(batch.replace_schema_metadata(schema.metadata))
        mf.atomic_write_bytes(path, sink.getvalue().to_pybytes())
        return batch

    def schema_names(self, pos: int) -> List[str]:
        """Column names of shard ``pos`` (from its footer by a ranged GET; kept in memory)."""
        import pyarrow as pa

        names = self._schemas.get(pos) if hasattr(self, "_schemas") else None
        if names is None and pos == 0 and self._shard_columns is not None:
            names = self._shard_columns  # listed by the writer in the manifest's meta_index
        if names is None:
            s = self.shards[pos]
            src = lambda: pa.PythonFile(RangedFile(self.client, s["file"], s["bytes"]), mode="r")  # noqa: E731
            try:
                names = list(pa.ipc.open_file(src()).schema.names)
            except pa.ArrowInvalid as e:
                raise ValueError(f"{join(self.url, s['file'])}: not a valid Arrow IPC shard ({e})") from e
            self.__dict__.setdefault("_schemas", {})[pos] = names
        return names

    # -- single rows by range -----------------------------------------------------------------
    def read_rows(self, items: Sequence[tuple], column: str = "image") -> List[bytes]:
        """The bytes of ``column`` at each (shard position, row), by ranged GETs (a few
        concurrent): for rows outside the planned order (MixUp/CutMix partners), whose whole
        shard would cost far more than the row. The caller verifies the bytes."""
        import pyarrow as pa

        from fastload.format import ipc_layout

        locs = self.__dict__.setdefault("_locators", {})
        for pos in sorted({p for p, _ in items}):
            if (pos, column) not in locs:
                s = self.shards[pos]
                url = join(self.url, s["file"])
                try:
                    schema = pa.ipc.open_file(pa.PythonFile(RangedFile(self.client, s["file"], s["bytes"]),
                                                            mode="r")).schema
                    locs[(pos, column)] = ipc_layout.row_locator(
                        lambda a, b, k=s["file"]: self.client.get_range(k, a, b), int(s["bytes"]), schema, column)
                except (ValueError, KeyError, pa.ArrowInvalid) as e:
                    raise ValueError(f"{url}: cannot locate column {column!r} rows ({e})") from e

        def one(item):
            pos, row = item
            a, b = locs[(pos, column)].span(int(row))
            return self.client.get_range(self.shards[pos]["file"], a, b) if b > a else b""

        from fastload._threads import parallel_map  # works during interpreter shutdown too

        out = parallel_map(one, list(items), 16, name="fastload-range")
        self._count(row_reads=len(out), row_bytes=sum(len(x) for x in out))
        return out

    # -- shards ----------------------------------------------------------------------------
    def fetch(self, pos: int, opened: Optional[Dict[int, Any]] = None) -> str:
        """Local path of shard ``pos``, downloaded (once per node) and verified if needed.
        No lease is kept: a reader that maps the file uses :meth:`fetch_leased`."""
        path, fd = self.fetch_leased(pos, opened)
        os.close(fd)
        return path

    def fetch_leased(self, pos: int, opened: Optional[Dict[int, Any]] = None) -> Tuple[str, int]:
        """(path, fd) of shard ``pos``, downloaded (once per node) and verified if needed; the
        fd holds a shared flock (the lease) until closed: map it, and the map keeps it.

        ``opened``: the reader's {position: open shard}. With a ``cache_limit``, before a
        download the reader's maps of shards outside its current window are dropped from it,
        so their leases end once the batches using them are gone and they can be evicted."""
        path = self.local_name(pos)
        if opened is not None:
            self._opened = opened
        self._advance(pos)
        t0, how = time.perf_counter(), "cached"
        fd = lease(path)
        if fd is not None and not trusted(fd):  # written before a crash? checked under the lock
            os.close(fd)
            fd = None
        if fd is None:
            self._prune_opened(keep=pos)
            how = "waited"
            with self.folder.shard_lock(os.path.basename(path)):
                fd = lease(path)  # another rank (or our predownload) got it meanwhile
                if fd is not None and not trusted(fd):
                    fd = self._reverify(pos, fd)
                if fd is None:
                    how = "fetched"
                    fd = self._fetch_now(pos)
        self.folder.touch(pos, time.time())
        if TRACE is not None:
            TRACE("need", self.shards[pos]["file"], {"t0": t0, "t1": time.perf_counter(), "how": how})
        return path, fd

    def _reverify(self, pos: int, fd: int) -> Optional[int]:
        """A shard in place (``fd``: its lease) whose bytes may not have reached the disk
        before a crash (see cachedir.trusted): hash it; a match is fsync'd, marked durable and
        ``fd`` returned; a mismatch is evicted where no one else holds it and None returned
        (the caller downloads it again, renamed over it). Call under its shard lock."""
        path, s = self.local_name(pos), self.shards[pos]
        h = hashlib.sha256()
        with open(fd, "rb", buffering=0, closefd=False) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() == s["sha256"]:
            mark_durable(fd)
            return fd
        os.close(fd)
        log.warning("%s: cached %s does not match its sha256 (written before a crash?): downloading it again",
                    self.dir, s["file"])
        self.folder.evict(os.path.basename(path))
        return None

    def _prune_opened(self, keep: Optional[int] = None) -> None:
        """With a ``cache_limit`` (or once the disk was full): drop the reader's maps of
        shards outside its current window (their leases end once the batches using them are
        gone, so any rank may evict them). Called at each step and before a download."""
        opened = self._opened
        if opened is None or (self.cache_limit is None and not self._disk_full_seen):
            return
        window = set(self.current_window())
        for p in [p for p in list(opened) if p != keep and p not in window]:
            opened.pop(p, None)

    def _fetch_now(self, pos: int) -> int:
        """The reader's download (it needs the shard now): room made or waited for, one retry
        after a full disk; returns the leased fd."""
        s = self.shards[pos]
        res = self._reserve_waiting(pos)
        try:
            return self._download(pos, res)
        except OSError as e:
            if e.errno not in FULL_DISK or isinstance(e, RemoteError):
                raise
        # the disk is the limit now: maps of shards outside the window go (unmapped, their
        # blocks can be freed), then every shard the rules allow is evicted
        self._disk_full_seen = True
        self._prune_opened(keep=pos)
        res = self._reserve_waiting(pos, disk_full=True)
        try:
            return self._download(pos, res)
        except OSError as e2:
            if e2.errno in FULL_DISK:
                raise CacheFullError(e2.errno, f"cache folder {self.dir} is full (disk or quota) while "
                                     f"downloading {join(self.url, s['file'])} ({s['bytes']} bytes) "
                                     "even after evicting unneeded shards: free space or set "
                                     "cache_dir elsewhere") from e2
            raise

    def fetch_ahead(self, pos: int, wait: bool = True) -> Optional[bool]:
        """Download shard ``pos`` if there is room for it without evicting a shard needed
        sooner (the predownload thread). False: no room now; None (``wait=False``): someone
        else is downloading it now."""
        if self._disk_full_seen and self.cache_limit is None:
            return False  # the disk filled up: the reader alone fetches, what it needs when it needs it
        path = self.local_name(pos)
        lock = self.folder.shard_lock(os.path.basename(path))
        if not lock.acquire(wait):
            return None
        try:
            if not os.path.exists(path):
                res = self._reserve(pos, ahead=True)
                if not isinstance(res, Reservation):
                    return False
                os.close(self._download(pos, res))
        finally:
            lock.release()
        return True

    def _reserve_waiting(self, pos: int, disk_full: bool = False) -> Reservation:
        """:meth:`_reserve` for the reader: while only downloads in flight stand in the way,
        wait for them to land (their writers are alive: the kernel says so; each ends within
        the client's deadline)."""
        end = time.monotonic() + self.client.deadline + 5.0
        while True:
            res = self._reserve(pos, disk_full=disk_full)
            if isinstance(res, Reservation):
                return res
            if time.monotonic() > end:
                raise CacheFullError(errno.ENOSPC, f"cache folder {self.dir}: cache_limit={self.cache_limit} "
                                     f"bytes cannot hold shard {self.shards[pos]['file']} beside downloads "
                                     f"in flight for {self.client.deadline + 5:.0f} s")
            if self.client.stop.wait(0.02):
                raise RemoteError(errno.ECANCELED, f"{self.url}: cache closed while waiting for room")

    def _reserve(self, pos: int, ahead: bool = False, disk_full: bool = False):
        """Evict what the policy says, then reserve shard ``pos``'s full size (its temporary
        file, created sparse and locked inside the cache lock), so that downloads running
        side by side (the reader, the predownload threads, other ranks) each count the
        others' whole shards. Returns the Reservation, or the policy's outcome ("wait": the
        predownload must not evict sooner shards; "busy": downloads in flight in the way)."""
        need = int(self.shards[pos]["bytes"])
        final = self.local_name(pos)
        limit = self.cache_limit if self.cache_limit is not None else (None if disk_full else self._disk_limit)
        with self.folder.lock():
            if limit is None and not disk_full:
                return Reservation(final)
            if self.cache_limit is not None and need > self.cache_limit:
                raise CacheFullError(errno.ENOSPC, f"cache folder {self.dir}: cache_limit={self.cache_limit} "
                                     f"bytes cannot hold shard {self.shards[pos]['file']} ({need} bytes): "
                                     "raise cache_limit")
            entries = self.folder.scan(self._names, self.folder.atimes(len(self.shards)))
            every, others = self._next_uses()
            d = policy.choose(entries, need, limit, pos, every, ahead=ahead, disk_full=disk_full, others=others)
            gone = sum(self.folder.evict(name) for name in d.evict)
            self._count(evictions=gone)
            if disk_full and self.cache_limit is None and d.outcome in ("fits", "busy"):
                # what the disk holds after this eviction plus this shard is the limit from
                # now on (the predownload then waits for room instead of racing the reader
                # for the last blocks)
                self._disk_limit = max(d.used_after + need, max(int(x["bytes"]) for x in self.shards))
            if d.outcome == "too_big" and self.cache_limit is None:
                return Reservation(final)  # a limit learned from the disk: the disk decides
            if d.outcome == "too_big":
                raise CacheFullError(errno.ENOSPC, f"cache folder {self.dir}: cache_limit={self.cache_limit} "
                                     f"bytes cannot hold shard {self.shards[pos]['file']} ({need} bytes)")
            if d.outcome in ("fits", "over"):
                if d.outcome == "over":
                    self._count(over_limit=1)
                    log.debug("%s: over cache_limit=%s for %s (the shards in the way are being read)",
                              self.dir, self.cache_limit, self.shards[pos]["file"])
                return Reservation(final, need if limit is not None else None)
            return d.outcome

    def _next_uses(self) -> Tuple[Dict[int, int], Dict[int, int]]:
        """({shard: steps to its next use by any live rank}, the same over the other ranks),
        from the node-wide table (call under the cache lock)."""
        every, others = RankTable.next_uses(self.dir, len(self.shards), self._table.path if self._table else None)
        nz, nzo = np.flatnonzero(every < policy.NEVER), np.flatnonzero(others < policy.NEVER)
        return dict(zip(nz.tolist(), every[nz].tolist())), dict(zip(nzo.tolist(), others[nzo].tolist()))

    def trim(self) -> int:
        """Evict down to ``cache_limit`` now (shards leased or needed now or next by a live
        rank stay); a download does this before it starts. Returns the bytes in the folder."""
        with self.folder.lock():
            entries = self.folder.scan(self._names, self.folder.atimes(len(self.shards)))
            if self.cache_limit is None:
                return sum(e.size for e in entries)
            every, others = self._next_uses()
            d = policy.choose(entries, 0, self.cache_limit, -1, every, others=others)
            gone = [e for e in entries if e.name in set(d.evict) and self.folder.evict(e.name)]
            self._count(evictions=len(gone))
            return sum(e.size for e in entries) - sum(e.size for e in gone)

    def _download(self, pos: int, res: Reservation) -> int:
        """Stream shard ``pos`` into its reservation, verify size and sha256 while receiving,
        fsync, rename into place; returns the fd with a shared lock (the caller's lease)."""
        s = self.shards[pos]
        fd = self._download_object(s["file"], res, int(s["bytes"]), s["sha256"], marked=True)
        self._check_meta(s, self.local_name(pos))
        return fd

    def _download_object(self, key: str, res: Reservation, size: int, sha256: Optional[str],
                         counted: bool = True, marked: bool = False) -> int:
        """The one download path: every kept remote byte comes through here. ``counted``:
        in ``stats["downloads"]``/``["bytes_downloaded"]`` (the metadata index counts as
        ``meta_bytes`` instead). ``marked``: the file is marked with the boot id instead of
        fsync'd where the file system allows (shards, whose every reader checks the mark:
        cachedir.trusted); other files are fsync'd."""
        url = join(self.url, key)
        state: Dict[str, Any] = {}
        tr = TRACE
        clock, cpu = time.perf_counter, time.thread_time
        rec = {"t0": clock(), "c0": cpu(), "hash_cpu": 0.0, "write_cpu": 0.0} if tr is not None else None

        def open_dst():
            f = state.get("f") or open(res.fd, "r+b", buffering=0, closefd=False)
            f.seek(0)
            state["f"], state["h"], state["n"] = f, hashlib.sha256(), 0
            return f

        def on_chunk(f, chunk):
            b = memoryview(chunk)
            if state["n"] + len(b) > size:  # never write more than the manifest announces
                raise ChecksumError(f"{url}: more than the {size} bytes the manifest lists")
            if rec is not None:
                rec.setdefault("t_first_byte", clock())
                c = cpu()
            done = 0
            while done < len(b):  # an unbuffered write may be short (a nearly full disk)
                done += f.write(b[done:])
            if rec is not None:
                c2 = cpu()
                rec["write_cpu"] += c2 - c
            state["h"].update(b)
            if rec is not None:
                rec["hash_cpu"] += cpu() - c2
            state["n"] += len(b)

        try:
            self.client.stream_to(key, open_dst, on_chunk)
            digest = state["h"].hexdigest()
            if state["n"] != size or (sha256 is not None and digest != sha256):
                raise ChecksumError(f"{url}: downloaded {state['n']} bytes with sha256 {digest}, the manifest "
                                    f"lists {size} bytes" + (f" with sha256 {sha256}" if sha256 else "") +
                                    " (corrupt or replaced object; it was not cached)")
            if rec is not None:
                rec["t_received"], rec["c_received"] = clock(), cpu()
            os.ftruncate(res.fd, size)
            if not (marked and sha256 is not None and mark_written(res.fd)):
                os.fsync(res.fd)  # a renamed but unwritten file after a crash would pass for verified
            if rec is not None:
                rec["t_fsynced"], rec["c_fsynced"] = clock(), cpu()
            # no fsync of the folder: a rename lost in a crash only costs a download again
            res.commit()
            fcntl.flock(res.fd, fcntl.LOCK_SH)  # the writer's lease becomes a reader's
            fd, res.fd = res.fd, None
        finally:
            if state.get("f") is not None:
                state["f"].close()  # closefd=False: the descriptor stays with res
            res.close()
        if counted:
            self._count(downloads=1, bytes_downloaded=size)
        log.debug("downloaded %s (%d bytes)", url, size)
        if rec is not None:
            tr("download", key, dict(rec, t1=clock(), c1=cpu(), bytes=size, thread=threading.current_thread().name))
        return fd

    def _check_meta(self, s: Dict[str, Any], path: str) -> None:
        """The metadata read earlier by ranged GETs must equal the verified shard's."""
        import pyarrow as pa

        meta = os.path.join(self.dir, "meta", f"{s['sha256'][:16]}.arrow")
        if not os.path.exists(meta):
            return
        with open(meta, "rb") as f:
            cached = pa.ipc.open_file(pa.py_buffer(f.read())).get_batch(0)
        spans = json.loads((cached.schema.metadata or {}).get(_SPANS_KEY, b"null"))
        if spans:  # the same bytes at the same offsets decode to the same columns
            with open(path, "rb") as f:
                same = True
                for a, n, digest in spans:
                    f.seek(a)
                    same &= hashlib.blake2b(f.read(n), digest_size=16).hexdigest() == digest
        else:  # a meta/ entry without spans: decode and compare
            # pa.OSFile, not a Python file object: this runs on the predownload thread too, and
            # Arrow calling back into Python from there can abort the process at interpreter exit
            full = _open_selected(lambda: pa.OSFile(path), cached.schema.names)
            same = full.equals(cached.replace_schema_metadata(None))
        if not same:
            os.unlink(meta)
            raise ChecksumError(f"{join(self.url, s['file'])}: the metadata columns read earlier by ranged "
                                "GETs differ from the verified shard (the object changed during the run?); "
                                "reopen the dataset")


def _open_selected(source_fn: Callable[[], Any], columns: Sequence[str]):
    """The first record batch of an Arrow IPC file with only ``columns``; Arrow then reads
    only the footer and those columns' buffers (a few KiB of a shard)."""
    import pyarrow as pa

    names = pa.ipc.open_file(source_fn()).schema.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"shard lacks the columns {missing}")
    opts = pa.ipc.IpcReadOptions(included_fields=[names.index(c) for c in columns])
    return pa.ipc.open_file(source_fn(), options=opts).get_batch(0)


# ------------------------------------------------------------------------- entry points
def open_reinforced(url: str, cache_dir: Optional[str] = None, cache_limit: Optional[int] = None,
                    predownload: int = 4, **client):
    """(ShardCache, manifest) of a reinforced dataset at ``url`` (manifest read fresh, validated)."""
    cache = ShardCache(url, cache_dir, cache_limit, predownload, **client)
    try:
        m = cache.read_json(mf.MANIFEST)
    except RemoteError as e:
        if e.errno == errno.ENOENT:
            raise RemoteError(errno.ENOENT, f"{cache.url}: no {mf.MANIFEST} there: not a fastload "
                              "reinforced dataset (wrong prefix?)") from e
        raise
    mf.validate(m, join(cache.url, mf.MANIFEST))
    cache.set_shards(sorted(m["shards"], key=lambda s: s["index"]))
    cache.load_meta_index(m)
    # the manifest is kept beside the shards (for `fastload inspect` and post-mortems)
    mf.atomic_write_bytes(os.path.join(cache.dir, mf.MANIFEST), json.dumps(m).encode())
    return cache, m


def predownload_rows(dataset, rows) -> None:
    """Tell a remote ``ReinforcedDataset`` the rows it will read, in order (this rank's
    share); its cache then downloads ``predownload`` shards ahead and evicts by next use.
    A local dataset ignores the call."""
    cache = getattr(dataset, "remote", None)
    if cache is None:
        return
    rows = np.asarray(rows, np.int64)
    cache.plan(np.searchsorted(dataset._starts, rows, side="right") - 1)


def materialize_decomposed(url: str, cache_dir: Optional[str] = None, cache_limit: Optional[int] = None,
                           **client) -> str:
    """Download a decomposed dataset (its bucket arrays are memory-mapped whole) into the
    cache and return the local folder. Files come through the shard cache's one download
    path (a reservation under the cache lock, kernel-held writer lease, bounded by the
    object's size, hashed while received and checked against a ``sha256`` where the manifest
    lists one, fsync'd and renamed into place); the whole dataset must fit ``cache_limit``.
    The folder is keyed by the manifest's own sha256, so a rewritten dataset never reuses
    stale files."""
    from fastload.tokens.decompose import FORMAT_NAME

    cache = ShardCache(url, cache_dir, None, 0, **client)
    try:
        raw = cache.client.get_bytes("manifest.json")
    except RemoteError as e:
        if e.errno == errno.ENOENT:
            raise RemoteError(errno.ENOENT, f"{cache.url}: no manifest.json there: not a decomposed "
                              "dataset (wrong prefix?)") from e
        raise
    try:
        m = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cache.url}/manifest.json: not valid JSON ({e})") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise ValueError(f"{cache.url}/manifest.json: not a {FORMAT_NAME} manifest (a different dataset?)")
    root = os.path.join(cache.dir, "d-" + hashlib.sha256(raw).hexdigest()[:16])
    files = [f for b in m.get("buckets", {}).values() for f in b.get("files", []) if f.get("rows")]
    for f in files:
        rel = f["path"]
        if os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
            raise ValueError(f"{cache.url}/manifest.json: file path {rel!r} leaves the dataset")
    sizes = [int(cache.client.head(f["path"])["size"]) for f in files]
    total = sum(sizes)
    if cache_limit is not None and total > int(cache_limit):
        raise CacheFullError(errno.ENOSPC, f"{cache.url}: the decomposed dataset is {total} bytes, more than "
                             f"cache_limit={cache_limit} (its bucket arrays are memory-mapped whole)")
    for f, size in zip(files, sizes):
        dst = os.path.join(root, f["path"])
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        sha = f.get("sha256") if isinstance(f.get("sha256"), str) else None
        with cache.folder.shard_lock(hashlib.sha256(dst.encode()).hexdigest()[:16]):
            if os.path.exists(dst) and os.path.getsize(dst) == size:
                continue
            with cache.folder.lock():
                res = Reservation(dst, size)
            os.close(cache._download_object(f["path"], res, size, sha))
    mf.atomic_write_bytes(os.path.join(root, "manifest.json"), raw)
    return root
