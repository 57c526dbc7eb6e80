"""Datasets in object storage: ``s3://``, ``gs://``, ``az://``, ``http(s)://`` through a local shard cache.

``ReinforcedDataset("s3://bucket/prefix")`` and ``DecompositionLoader("s3://...")`` take a
URL wherever they take a folder. The client library is **obstore** (Rust ``object_store``:
one client for S3, GCS, Azure and plain HTTP with range requests; measured beside s3fs on the
same moto_server in ``benchmarks/results/remote_clients.json``). Credentials, region and
endpoint come from obstore's usual environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``,
``AWS_ALLOW_HTTP``, ``GOOGLE_SERVICE_ACCOUNT``, ...); fastload never takes them as arguments
and never logs them (messages name the URL only).

The cache (``cache_dir``, default ``$FASTLOAD_CACHE`` or ``~/.cache/fastload``) keeps one
folder per dataset URL; inside it:

- shards are stored as ``<sha256[:16]>-<file>``: a dataset rewritten under the same URL gets
  new names, so a stale shard is never served (the manifest is re-read on every open);
- a download goes to ``<name>.tmp-<pid>-<thread>``, is hashed while written, fsync'd and
  renamed into place only if its sha256 and size match the manifest: a reader never sees half
  a shard, and a mismatch raises :class:`ChecksumError` naming the URL;
- ranks on one node share the folder: a per-shard ``fcntl`` lock makes the first process
  download and the others wait and reuse the file (each shard is downloaded once per node);
- ``cache_limit`` (bytes, None = unbounded) bounds the folder: before a download, shards are
  evicted, first those no longer in the manifest, then those whose next use in the planned
  order is farthest (never used again first), then the least recently used. The predownload
  never evicts a shard needed before the one it fetches: when the cache is full of sooner
  shards it waits for the reader to move on (the window shrinks to what the limit holds).
  A read that needs a shard now may evict anything but that shard, the window last. An
  evicted shard that a process still has memory-mapped stays valid for it (Linux keeps the
  pages until unmapped). A download reserves its shard's full size (its temporary file,
  created sparse at that size under the cache lock), so downloads side by side (reader,
  predownload thread, other ranks) never overshoot the limit together; a read that finds
  only downloads in flight in its way waits for them to land. Only a shard larger than the
  limit is a :class:`CacheFullError`, naming the folder and the sizes. A disk that fills up
  (ENOSPC, EDQUOT, EFBIG) triggers eviction and one retry, then the same error;
- the planned order comes from the reader: :class:`~fastload.ReinforcedLoader` hands the cache
  this rank's shards for the rest of the epoch, step by step, whenever an epoch starts or
  resumes (its built-in order or a ``sampler``; a ``batch_sampler`` cannot be read ahead,
  except ``BlockShuffleSampler.batch_sampler(dataset=...)``, which plans by itself, step by
  step too); ``PREDOWNLOAD_STREAMS`` threads keep the shards of the step being read and the
  next ``predownload`` distinct shards on disk, each skipping a shard someone else is
  fetching;
- per-row metadata (labels, sizes, keys) is read with ranged GETs of the Arrow footer and
  the small columns only (two GETs of at most 8 KiB per shard, 16 shards at a time), cached
  under ``meta/`` with the hashes of the byte spans it came from, which are compared with the
  full shard once that is downloaded and verified.

Network errors (refused connection, reset, timeout, 5xx) are retried ``retries`` times with
exponential backoff (``backoff`` s doubling, capped at 8 s); a missing object, wrong
credentials or a URL that holds something else fail at once with :class:`RemoteError`
naming the URL. Every request has a timeout, so nothing hangs.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import threading
import time
import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np

from fastload.format import manifest as mf

log = logging.getLogger("fastload.remote")

SCHEMES = ("s3://", "s3a://", "gs://", "az://", "abfs://", "abfss://", "http://", "https://")
META_COLUMNS = ("key", "hash", "orig_h", "orig_w", "src_h", "src_w", "label")
_FULL_DISK = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_SPANS_KEY = b"fastload.source_spans"  # meta/ entries: [[offset, length, blake2b-128], ...]
# predownload threads per cache (each one download at a time, besides the reader's own)
PREDOWNLOAD_STREAMS = int(os.environ.get("FASTLOAD_PREDOWNLOAD_STREAMS", "2"))


class RemoteError(OSError):
    """A remote object could not be read; the message names its URL."""


class ChecksumError(ValueError):
    """Downloaded bytes differ from the manifest's sha256 or size (the message names the URL)."""


class CacheFullError(OSError):
    """The cache folder cannot hold what the loader needs now (names the folder and sizes)."""


def is_remote(path: Any) -> bool:
    return isinstance(path, str) and path.lower().startswith(SCHEMES)


def default_cache_dir() -> str:
    return os.environ.get("FASTLOAD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastload")


def _join(url: str, key: str) -> str:
    return url.rstrip("/") + "/" + key


# --------------------------------------------------------------------------------- client
class _Client:
    """One obstore store for a dataset URL, with bounded retries around every call."""

    def __init__(self, url: str, retries: int = 5, backoff: float = 0.25, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.retries, self.backoff, self.timeout = int(retries), float(backoff), float(timeout)
        self._store = None
        self._pid = None
        self.retried = 0  # transient failures bridged by a retry (tests and logs read it)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_store"} | {"_store": None}

    def store(self):
        # obstore stores hold a connection pool: make a fresh one after fork (DataLoader workers)
        if self._store is None or self._pid != os.getpid():
            try:
                from obstore.store import from_url
            except ImportError as e:
                raise ImportError("remote datasets need obstore: pip install obstore") from e
            opts = {"timeout": f"{max(1, int(self.timeout))}s", "connect_timeout": "5s"}
            # passing client_options drops the ones obstore reads from the environment: carry
            # allow_http over (GOOGLE_ALLOW_HTTP: a GCS emulator's http:// gcs_base_url)
            if self.url.lower().startswith("http://") or any(
                    os.environ.get(k, "").lower() == "true"
                    for k in ("AWS_ALLOW_HTTP", "GOOGLE_ALLOW_HTTP", "AZURE_ALLOW_HTTP")):
                opts["allow_http"] = True
            # obstore's own retries are off: ours below are bounded and name the URL
            self._store = from_url(self.url, client_options=opts, retry_config={"max_retries": 0})
            self._pid = os.getpid()
        return self._store

    def call(self, what: str, key: str, fn: Callable):
        """Run ``fn(store)``; retry transient failures with exponential backoff."""
        import obstore.exceptions as oe

        url = _join(self.url, key)
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return fn(self.store())
            except oe.NotFoundError as e:
                raise RemoteError(errno.ENOENT, f"{url}: not found ({what})") from e
            except (oe.PermissionDeniedError, oe.UnauthenticatedError) as e:
                raise RemoteError(errno.EACCES, f"{url}: access denied ({what}); check the credentials in "
                                  "the environment (AWS_*/GOOGLE_*/AZURE_* variables or config files)") from e
            except (oe.InvalidPathError, oe.UnknownConfigurationKeyError, oe.NotSupportedError) as e:
                raise RemoteError(errno.EINVAL, f"{url}: {type(e).__name__} ({what}): {_first_line(e)}") from e
            except (ChecksumError, CacheFullError, RemoteError):
                raise
            except OSError as e:
                if e.errno in _FULL_DISK or getattr(e, "filename", None):  # our side: the cache disk
                    raise
                if isinstance(e, FileNotFoundError):  # obstore's "object not found"
                    raise RemoteError(errno.ENOENT, f"{url}: not found ({what})") from e
                if isinstance(e, PermissionError):
                    raise RemoteError(errno.EACCES, f"{url}: access denied ({what}); check the credentials "
                                      "in the environment (AWS_*/GOOGLE_*/AZURE_* variables or config "
                                      "files)") from e
                if attempt == self.retries:
                    raise RemoteError(errno.EIO, f"{url}: {what} failed after {self.retries + 1} attempts "
                                      f"({type(e).__name__}: {_first_line(e)})") from e
                log.warning("%s: %s failed (%s), retry %d/%d in %.2fs", url, what, _first_line(e),
                            attempt + 1, self.retries, delay)
                self.retried += 1
                time.sleep(delay)
                delay = min(delay * 2, 8.0)
            except Exception as e:  # noqa: BLE001 - connection refused/reset, timeout, 5xx
                msg = _first_line(e)
                if _auth_like(msg):
                    raise RemoteError(errno.EACCES, f"{url}: access denied ({what}): {msg}") from e
                if attempt == self.retries:
                    raise RemoteError(errno.EIO, f"{url}: {what} failed after {self.retries + 1} attempts "
                                      f"({type(e).__name__}: {msg})") from e
                log.warning("%s: %s failed (%s), retry %d/%d in %.2fs", url, what, msg, attempt + 1,
                            self.retries, delay)
                self.retried += 1
                time.sleep(delay)
                delay = min(delay * 2, 8.0)

    def get_bytes(self, key: str) -> bytes:
        import obstore as obs

        return self.call("get", key, lambda s: bytes(obs.get(s, key).bytes()))

    def get_range(self, key: str, start: int, end: int) -> bytes:
        import obstore as obs

        return self.call("ranged get", key, lambda s: bytes(obs.get_range(s, key, start=start, end=end)))

    def stream_to(self, key: str, dst_open: Callable[[], Any], on_chunk: Callable[[Any, bytes], None]):
        """Download ``key`` chunk by chunk; each attempt starts a fresh destination."""
        import obstore as obs

        def run(s):
            f = dst_open()
            # 256 KiB: coalescing the network reads into bigger chunks costs a copy (measured: 4 MiB
            # chunks took 1.6x the CPU of 256 KiB ones for download + sha256 + write)
            for chunk in obs.get(s, key).stream(min_chunk_size=256 << 10):
                on_chunk(f, chunk)
            return f

        return self.call("get", key, run)


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__


def _auth_like(msg: str) -> bool:
    m = msg.lower()
    return any(w in m for w in ("403", "forbidden", "accessdenied", "invalidaccesskeyid",
                                "signaturedoesnotmatch", "401 unauthorized"))


# ---------------------------------------------------------------------------- file locks
def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _writer_is_gone(name: str) -> bool:
    """``<shard>.tmp-<pid>-<thread>``: True if that process no longer exists on this host
    (killed mid-download). A cache folder is per node, so the pid is this host's."""
    try:
        pid = int(name.rsplit(".tmp-", 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class _FileLock:
    """An exclusive ``fcntl.flock`` on ``path`` (shared by processes and threads alike)."""

    _tlocks: Dict[str, threading.Lock] = {}
    _guard = threading.Lock()

    def __init__(self, path: str):
        self.path = path
        with _FileLock._guard:
            self._t = _FileLock._tlocks.setdefault(path, threading.Lock())

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

    def __exit__(self, *exc):
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
        finally:
            self._t.release()


# ------------------------------------------------------------------------ ranged reader
class _RangedFile(io.RawIOBase):
    """A seekable read-only file over ranged GETs (for Arrow's footer + selected columns)."""

    def __init__(self, client: _Client, key: str, size: int, readahead: int = 8192):
        self.client, self.key, self.size, self.pos = client, key, int(size), 0
        self.bytes_read = 0
        # never a sizable part of a small shard: metadata reads stay a few % of the bytes
        self.readahead = min(int(readahead), max(512, self.size // 32))
        self._blocks: List[tuple] = []  # (start, bytes) fetched so far

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, off, whence=0):
        self.pos = off if whence == 0 else (self.pos + off if whence == 1 else self.size + off)
        return self.pos

    def readinto(self, b):
        n = min(len(b), self.size - self.pos)
        if n <= 0:
            return 0
        a = self.pos
        for start, data in self._blocks:
            if start <= a and a + n <= start + len(data):
                break
        else:
            # Arrow reads the 10-byte tail, then the footer before it, then a batch header and
            # the selected buffers after that: one GET of ``readahead`` bytes each at the end
            # and at the header serves what took 4 (the server's cost is per request)
            if a + n > self.size - self.readahead:
                start, end = max(0, min(a, self.size - self.readahead)), self.size
            else:
                start, end = a, min(self.size, a + max(n, self.readahead))
            data = self.client.get_range(self.key, start, end)
            if len(data) != end - start:
                raise RemoteError(errno.EIO, f"{_join(self.client.url, self.key)}: {len(data)} bytes for the "
                                  f"range [{start}, {end}) (the object is shorter than the manifest says?)")
            self.bytes_read += len(data)
            self._blocks.append((start, data))
        b[:n] = data[a - start:a - start + n]
        self.pos += n
        return n


# ------------------------------------------------------------------------------- cache
class ShardCache:
    """The local cache of one remote dataset (see the module docstring for the rules)."""

    def __init__(self, url: str, cache_dir: Optional[str] = None, cache_limit: Optional[int] = None,
                 predownload: int = 4, retries: int = 5, backoff: float = 0.25, timeout: float = 30.0):
        if not is_remote(url):
            raise ValueError(f"{url!r} is not a remote URL (expected one of {', '.join(SCHEMES)})")
        if cache_limit is not None and int(cache_limit) <= 0:
            raise ValueError(f"cache_limit must be a positive number of bytes or None, got {cache_limit}")
        if int(predownload) < 0:
            raise ValueError(f"predownload must be >= 0, got {predownload}")
        self.url = url.rstrip("/")
        self.client = _Client(self.url, retries, backoff, timeout)
        base = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
        self.dir = os.path.join(base, hashlib.sha256(self.url.encode()).hexdigest()[:16])
        os.makedirs(os.path.join(self.dir, "locks"), exist_ok=True)
        os.makedirs(os.path.join(self.dir, "meta"), exist_ok=True)
        self.cache_limit = None if cache_limit is None else int(cache_limit)
        self.predownload = int(predownload)
        self.stats = {"downloads": 0, "bytes_downloaded": 0, "evictions": 0, "meta_bytes": 0,
                      "row_reads": 0, "row_bytes": 0}
        self._plan: Optional[np.ndarray] = None  # shard positions in consumption order
        self._cursor = 0
        self._step_starts: Optional[np.ndarray] = None  # plan index where each step begins
        self._cv = threading.Condition()
        self._threads: List[threading.Thread] = []
        self._stop = False
        self.shards: List[Dict[str, Any]] = []
        self._opened: Optional[Dict[int, Any]] = None

    def __getstate__(self):
        st = dict(self.__dict__)
        st.update(_cv=None, _threads=[], _plan=None, _cursor=0, _opened=None, _step_starts=None)
        return st

    def __setstate__(self, st):
        self.__dict__.update(st)
        self._cv = threading.Condition()

    # -- manifest -------------------------------------------------------------------------
    def read_json(self, name: str = "manifest.json") -> Dict[str, Any]:
        raw = self.client.get_bytes(name)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{_join(self.url, name)}: not valid JSON ({e})") from e

    def set_shards(self, shards: List[Dict[str, Any]]) -> None:
        for s in shards:
            f = s["file"]
            if os.path.basename(f) != f or f in ("", ".", ".."):
                raise ValueError(f"{self.url}: shard file {f!r} must be a plain name")
        self.shards = shards

    def local_name(self, pos: int) -> str:
        s = self.shards[pos]
        return os.path.join(self.dir, f"{s['sha256'][:16]}-{s['file']}")

    # -- metadata columns -------------------------------------------------------------------
    def meta_batch(self, pos: int, columns: Sequence[str] = META_COLUMNS):
        """The small per-row columns of shard ``pos`` (ranged GETs; cached under meta/)."""
        import pyarrow as pa

        s = self.shards[pos]
        path = os.path.join(self.dir, "meta", f"{s['sha256'][:16]}.arrow")
        full = self.local_name(pos)
        try:
            if os.path.exists(path):  # small: read into memory, no map outliving its file
                with open(path, "rb") as f:
                    return pa.ipc.open_file(pa.py_buffer(f.read())).get_batch(0)
            if os.path.exists(full):  # already downloaded (and verified): read it locally
                return _open_selected(lambda: pa.OSFile(full), columns)
        except pa.ArrowInvalid:
            pass  # a damaged cache entry: read it again from the remote
        rf = _RangedFile(self.client, s["file"], s["bytes"])
        try:
            batch = _open_selected(lambda: pa.PythonFile(rf, mode="r"), columns)
        except pa.ArrowInvalid as e:
            raise ValueError(f"{_join(self.url, s['file'])}: not a valid Arrow IPC shard ({e})") from e
        except OSError as e:
            if isinstance(e, RemoteError):
                raise
            raise RemoteError(errno.EIO, f"{_join(self.url, s['file'])}: {e}") from e
        with self._cv:  # meta_batch runs on several threads at open
            self.stats["meta_bytes"] += rf.bytes_read
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
        if names is None:
            s, full = self.shards[pos], self.local_name(pos)
            src = (lambda: pa.OSFile(full)) if os.path.exists(full) else \
                (lambda: pa.PythonFile(_RangedFile(self.client, s["file"], s["bytes"]), mode="r"))
            try:
                names = list(pa.ipc.open_file(src()).schema.names)
            except pa.ArrowInvalid as e:
                raise ValueError(f"{_join(self.url, s['file'])}: not a valid Arrow IPC shard ({e})") from e
            self.__dict__.setdefault("_schemas", {})[pos] = names
        return names

    # -- single rows by range -----------------------------------------------------------------
    def read_rows(self, items: Sequence[tuple], column: str = "image") -> List[bytes]:
        """The bytes of ``column`` at each (shard position, row), by ranged GETs (a few
        concurrent): for rows outside the planned order (MixUp/CutMix partners), whose whole
        shard would cost far more than the row. The caller verifies the bytes."""
        from concurrent.futures import ThreadPoolExecutor

        import pyarrow as pa

        from fastload.format import ipc_layout

        locs = self.__dict__.setdefault("_locators", {})
        for pos in sorted({p for p, _ in items}):
            if (pos, column) not in locs:
                s = self.shards[pos]
                url = _join(self.url, s["file"])
                try:
                    schema = pa.ipc.open_file(pa.PythonFile(_RangedFile(self.client, s["file"], s["bytes"]),
                                                            mode="r")).schema
                    locs[(pos, column)] = ipc_layout.row_locator(
                        lambda a, b, k=s["file"]: self.client.get_range(k, a, b), int(s["bytes"]), schema, column)
                except (ValueError, KeyError, pa.ArrowInvalid) as e:
                    raise ValueError(f"{url}: cannot locate column {column!r} rows ({e})") from e

        def one(item):
            pos, row = item
            a, b = locs[(pos, column)].span(int(row))
            return self.client.get_range(self.shards[pos]["file"], a, b) if b > a else b""

        if len(items) <= 1:
            out = [one(x) for x in items]
        else:
            with ThreadPoolExecutor(min(16, len(items)), thread_name_prefix="fastload-range") as ex:
                out = list(ex.map(one, items))
        self.stats["row_reads"] += len(out)
        self.stats["row_bytes"] += sum(len(x) for x in out)
        return out

    # -- shards ----------------------------------------------------------------------------
    def fetch(self, pos: int, opened: Optional[Dict[int, Any]] = None) -> str:
        """Local path of shard ``pos``, downloaded (once per node) and verified if needed.

        ``opened``: the reader's {position: open shard}; an evicted shard is dropped from it
        so its memory map (and disk space) goes once the batches using it are gone."""
        if opened is not None:
            self._opened = opened
        path = self.local_name(pos)
        self._advance(pos)
        if os.path.exists(path):
            _touch(path)
            return path
        s = self.shards[pos]
        with _FileLock(os.path.join(self.dir, "locks", os.path.basename(path) + ".lock")):
            if os.path.exists(path):  # another rank (or our predownload) got it meanwhile
                _touch(path)
                return path
            tmp = self._tmp_name(path)
            self._wait_for_room(int(s["bytes"]), pos, tmp)
            try:
                self._download(s, path, tmp)
            except OSError as e:
                if e.errno not in _FULL_DISK or isinstance(e, RemoteError):
                    raise
                self._wait_for_room(int(s["bytes"]), pos, tmp, disk_full=True)
                try:
                    self._download(s, path, tmp)
                except OSError as e2:
                    if e2.errno in _FULL_DISK:
                        raise CacheFullError(e2.errno, f"cache folder {self.dir} is full (disk or quota) while "
                                             f"downloading {_join(self.url, s['file'])} ({s['bytes']} bytes) "
                                             "even after evicting unneeded shards: free space or set "
                                             "cache_dir elsewhere") from e2
                    raise
        return path

    @staticmethod
    def _tmp_name(path: str) -> str:
        return f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"

    def _download(self, s: Dict[str, Any], path: str, tmp: str) -> None:
        """Stream shard ``s`` into ``tmp`` (the reservation :meth:`_make_room` made, if any:
        opened without truncating, so it keeps counting at its full size) and verify it."""
        url = _join(self.url, s["file"])
        state = {}

        def open_dst():
            if "f" in state:
                state["f"].close()
            state["f"] = open(tmp, "r+b" if os.path.exists(tmp) else "wb")
            state["h"], state["n"] = hashlib.sha256(), 0
            return state["f"]

        def on_chunk(f, chunk):
            b = memoryview(chunk)
            f.write(b)
            state["h"].update(b)
            state["n"] += len(b)
            if state["n"] > int(s["bytes"]):  # never write more than the manifest announces
                raise ChecksumError(f"{url}: more than the {s['bytes']} bytes the manifest lists")

        try:
            f = self.client.stream_to(s["file"], open_dst, on_chunk)
            if state["n"] != int(s["bytes"]) or state["h"].hexdigest() != s["sha256"]:
                raise ChecksumError(f"{url}: downloaded {state['n']} bytes with sha256 {state['h'].hexdigest()}, "
                                    f"the manifest lists {s['bytes']} bytes with sha256 {s['sha256']} "
                                    "(corrupt or replaced object; the shard was not cached)")
            f.truncate(state["n"])
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(tmp, path)
            mf.fsync_dir(self.dir)
        finally:
            if "f" in state and not state["f"].closed:
                try:
                    state["f"].close()
                except OSError:
                    pass  # a full disk fails the flush too; the partial file goes below
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.stats["downloads"] += 1
        self.stats["bytes_downloaded"] += int(s["bytes"])
        self._check_meta(s, path)
        log.debug("downloaded %s (%d bytes)", url, s["bytes"])

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
            raise ChecksumError(f"{_join(self.url, s['file'])}: the metadata columns read earlier by ranged "
                                "GETs differ from the verified shard (the object changed during the run?); "
                                "reopen the dataset")

    # -- eviction --------------------------------------------------------------------------
    def _next_use(self) -> Dict[int, int]:
        """{shard: distance of its next use from the cursor} within a horizon of the plan
        (vectorized: a global shuffle's plan is as long as the epoch has rows)."""
        plan = self._plan
        if plan is None:
            return {}
        ahead = plan[self._cursor:self._cursor + 8 * len(self.shards) + 64]
        uniq, first = np.unique(ahead, return_index=True)
        return dict(zip(uniq.tolist(), first.tolist()))

    def _wait_for_room(self, need: int, keep: int, tmp: str, disk_full: bool = False) -> None:
        """The reader's :meth:`_make_room`: when the only bytes left to free are downloads
        in flight (their reservations), wait for them to land, then evict them. Those
        downloads need nothing we hold, so they end; one that stops writing for longer than
        a request may take (timeout plus the longest backoff) is a CacheFullError."""
        stall = self.client.timeout + 13.0
        while True:
            busy = self._make_room(need, keep, disk_full, reserve=tmp)
            if busy is True:
                return
            newest = max(m for _, m in busy)
            if time.time() - newest > stall:
                raise CacheFullError(errno.ENOSPC, f"cache folder {self.dir}: cache_limit={self.cache_limit} "
                                     f"bytes cannot hold shard {self.shards[keep]['file']} ({need} bytes) beside "
                                     f"downloads that stopped writing {stall:.0f} s ago: "
                                     f"{', '.join(n for n, _ in busy)}")
            time.sleep(0.02)

    def _make_room(self, need: int, keep: int, disk_full: bool = False, ahead: bool = False,
                   reserve: Optional[str] = None):
        """Evict until ``need`` more bytes fit, then reserve them: create ``reserve`` (the
        download's temporary file) at its full size inside the cache lock, so that downloads
        running side by side (the reader, the predownload thread, other ranks) each count
        the others' whole shards, not the part written so far.

        The reader (``ahead=False``) may evict anything but ``keep`` and downloads in flight,
        shards needed soonest last. It raises CacheFullError when ``keep`` alone cannot fit;
        when only in-flight downloads stand in the way it returns them as [(name, mtime)]
        (see :meth:`_wait_for_room`). The predownload (``ahead=True``) never evicts a shard
        needed before ``keep`` and returns False instead of evicting one."""
        if self.cache_limit is None and not disk_full:
            return True
        if self.cache_limit is not None and need > self.cache_limit:
            raise CacheFullError(errno.ENOSPC, f"cache folder {self.dir}: cache_limit={self.cache_limit} bytes "
                                 f"cannot hold shard {self.shards[keep]['file']} ({need} bytes): raise cache_limit")
        with _FileLock(os.path.join(self.dir, "locks", "cache.lock")):
            entries, flight = [], []
            for e in os.scandir(self.dir):
                if e.is_file() and "-" in e.name and not e.name.endswith(".lock"):
                    try:
                        st = e.stat()
                    except FileNotFoundError:  # evicted or renamed by another process meanwhile
                        continue
                    if ".tmp-" in e.name:
                        if e.path == reserve:
                            continue  # our own, from an attempt that failed: replaced below
                        if _writer_is_gone(e.name):  # a process killed mid-download left it
                            _unlink(e.path)
                            continue
                        flight.append((e.name, st.st_mtime))
                    entries.append((e.name, st.st_size, st.st_mtime))
            used = sum(sz for _, sz, _ in entries)
            limit = self.cache_limit if self.cache_limit is not None else float("inf")
            if disk_full or used + need > limit:
                live = {os.path.basename(self.local_name(p)): p for p in range(len(self.shards))}
                next_use = self._next_use()
                far = 1 << 62
                keep_name = os.path.basename(self.local_name(keep))
                keep_use = next_use.get(keep, far)
                cands = [(n, sz, mt) for n, sz, mt in entries if n != keep_name and ".tmp-" not in n]
                # evict first what the manifest no longer lists, then the farthest next use, then LRU
                cands.sort(key=lambda c: (c[0] in live, -next_use.get(live.get(c[0], -1), far), c[2]))
                for name, sz, _ in cands:
                    if not disk_full and used + need <= limit:
                        break
                    if ahead and name in live and next_use.get(live[name], far) <= keep_use:
                        return False  # the rest are needed no later than keep: wait for the reader
                    _unlink(os.path.join(self.dir, name))
                    used -= sz
                    self.stats["evictions"] += 1
                    if name in live and self._opened is not None:
                        self._opened.pop(live[name], None)
                if not disk_full and used + need > limit:
                    return False if ahead else flight  # flight is non-empty: need <= limit
            if reserve is not None and self.cache_limit is not None:
                try:
                    with open(reserve, "wb") as f:
                        f.truncate(need)  # sparse: counts at its full size, allocates nothing yet
                except OSError as e:
                    _unlink(reserve)  # a file-size limit: the download meets it and says so
                    if e.errno not in _FULL_DISK:
                        raise
            return True

    # -- predownload -------------------------------------------------------------------------
    def plan(self, shard_order: Iterable[int], step_starts: Optional[Sequence[int]] = None) -> None:
        """Shards in the order this process will read them; threads keep the current step's
        shards and ``predownload`` more on disk (:meth:`_window`). A new plan replaces the old one.
        ``step_starts[k]``: where step k's shards begin in ``shard_order``, for :meth:`at_step`."""
        order = np.asarray(list(shard_order) if not isinstance(shard_order, np.ndarray) else shard_order,
                           np.int64)
        starts = None if step_starts is None else np.asarray(step_starts, np.int64)
        if len(order):
            keep = np.ones(len(order), bool)
            keep[1:] = order[1:] != order[:-1]
            if starts is not None:  # positions after dropping consecutive repeats
                starts = np.maximum(np.cumsum(keep)[np.minimum(starts, len(order) - 1)] - 1, 0)
            order = order[keep]
        with self._cv:
            self._plan, self._cursor, self._step_starts = order, 0, starts
            self._cv.notify_all()
            if self.predownload and not any(t.is_alive() for t in self._threads):
                self._stop = False
                # a few streams: the first step's shards (a block) arrive side by side
                self._threads = [threading.Thread(target=self._run, name=f"fastload-predownload-{k}", daemon=True)
                                 for k in range(min(self.predownload, PREDOWNLOAD_STREAMS))]
                for t in self._threads:
                    t.start()
                _LIVE.add(self)

    def plan_steps(self, per_step: Sequence[np.ndarray]) -> None:
        """:meth:`plan` from the shards each step reads (each read in ascending order, as
        the dataset's ``gather`` does); step 0 is the first one in ``per_step``."""
        lens = np.fromiter((len(x) for x in per_step), np.int64, len(per_step))
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]]) if len(lens) else lens
        self.plan(np.concatenate(per_step) if len(per_step) else np.zeros(0, np.int64), starts)

    def at_step(self, step: int) -> None:
        """The reader starts step ``step`` of the last :meth:`plan_steps`: the window moves there."""
        starts = getattr(self, "_step_starts", None)
        if starts is None or not 0 <= step < len(starts):
            return
        with self._cv:
            if self._step_starts is starts:
                self._cursor = max(self._cursor, int(starts[step]))
                self._cv.notify_all()

    def close(self, timeout: Optional[float] = None) -> None:
        """Stop the predownload threads and wait for their downloads in flight (if any)."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        end = time.monotonic() + (self.client.timeout + 5 if timeout is None else timeout)
        for th in self._threads:
            if th.is_alive() and th is not threading.current_thread():
                th.join(max(0.0, end - time.monotonic()))

    def _advance(self, pos: int) -> None:
        plan = self._plan
        if plan is None:
            return
        with self._cv:
            hits = np.flatnonzero(plan[self._cursor:self._cursor + 4 * self.predownload + 8] == pos)
            if len(hits):
                self._cursor += int(hits[0])
                self._cv.notify_all()

    def _window(self, plan: np.ndarray, cur: int) -> List[int]:
        """The shards the step at ``cur`` reads, then the next ``predownload`` distinct shards
        of the plan. Distinct shards, not plan entries: with blocks of shards, each step
        reads the whole block and the next steps read it again, so counting entries would
        never reach the next block and the reader would wait for it at every block start."""
        starts = self._step_starts
        end = cur + 1
        if starts is not None and len(starts):
            k = int(np.searchsorted(starts, cur, side="right"))
            end = int(starts[k]) if k < len(starts) else len(plan)
        out = list(dict.fromkeys(plan[cur:max(end, cur + 1)].tolist()))
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

    def _run(self) -> None:
        failed_plan, failed = None, set()
        while True:
            with self._cv:
                while not self._stop:
                    plan, cur = self._plan, self._cursor
                    if plan is not failed_plan:
                        failed_plan, failed = plan, set()
                    todo = [p for p in self._window(plan, cur)
                            if p not in failed and not os.path.exists(self.local_name(p))]
                    if todo:
                        break
                    self._cv.wait(1.0)
                if self._stop:
                    return
            outcome = "busy"
            for p in todo:  # the first one that is not being downloaded by someone else
                try:
                    got = self.fetch_ahead(p, wait=False)
                except Exception as e:  # noqa: BLE001 - the reader's own fetch raises it in the main path
                    log.warning("predownload of %s failed: %s", self.shards[p]["file"], _first_line(e))
                    failed.add(p)
                    got = True
                if got is not None:
                    outcome = "done" if got else "full"
                    break
            if outcome == "done":
                continue  # the window is recomputed: the reader may have moved meanwhile
            # "full": no room without evicting sooner shards: wait for the reader to move on.
            # "busy": all in flight elsewhere (the reader, another rank): look again shortly
            deadline = None if outcome == "full" else time.monotonic() + 0.02
            with self._cv:
                while not self._stop and self._plan is plan and self._cursor == cur:
                    left = 1.0 if deadline is None else deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)

    def fetch_ahead(self, pos: int, wait: bool = True) -> Optional[bool]:
        """Download shard ``pos`` if there is room for it without evicting a shard needed
        sooner (the predownload thread; the consumption cursor stays). False: no room now;
        None (``wait=False``): someone else is downloading it now."""
        path = self.local_name(pos)
        s = self.shards[pos]
        lock = _FileLock(os.path.join(self.dir, "locks", os.path.basename(path) + ".lock"))
        if not lock.acquire(wait):
            return None
        try:
            if not os.path.exists(path):
                tmp = self._tmp_name(path)
                if not self._make_room(int(s["bytes"]), keep=pos, ahead=True, reserve=tmp):
                    return False
                self._download(s, path, tmp)
        finally:
            lock.__exit__(None, None, None)
        return True


# Caches whose predownload thread may be inside a download. At interpreter exit a daemon
# thread returning from native code (obstore releases the GIL) is unwound by
# pthread_exit, which aborts the process ("terminate called without an active exception")
# when it crosses C++/Rust frames: stop and join them first.
_LIVE: "weakref.WeakSet[ShardCache]" = weakref.WeakSet()


@atexit.register
def _stop_predownloads() -> None:
    for cache in list(_LIVE):
        try:
            cache.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


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


def _touch(path: str) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


# ------------------------------------------------------------------------- entry points
def open_reinforced(url: str, cache_dir: Optional[str] = None, cache_limit: Optional[int] = None,
                    predownload: int = 4, **client):
    """(ShardCache, manifest) of a reinforced dataset at ``url`` (manifest read fresh, validated)."""
    from fastload.format import manifest as mf

    cache = ShardCache(url, cache_dir, cache_limit, predownload, **client)
    try:
        m = cache.read_json(mf.MANIFEST)
    except RemoteError as e:
        if e.errno == errno.ENOENT:
            raise RemoteError(errno.ENOENT, f"{cache.url}: no {mf.MANIFEST} there: not a fastload "
                              "reinforced dataset (wrong prefix?)") from e
        raise
    mf.validate(m, _join(cache.url, mf.MANIFEST))
    cache.set_shards(sorted(m["shards"], key=lambda s: s["index"]))
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
    cache and return the local folder. The decomposed manifest lists no checksums, so each
    file is checked against its size (the loader then checks dtype and shape); the folder is
    keyed by the manifest's own sha256, so a rewritten dataset never reuses stale files."""
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
    from fastload.format.decompose import FORMAT_NAME

    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise ValueError(f"{cache.url}/manifest.json: not a {FORMAT_NAME} manifest (a different dataset?)")
    root = os.path.join(cache.dir, "d-" + hashlib.sha256(raw).hexdigest()[:16])
    files = [f for b in m.get("buckets", {}).values() for f in b.get("files", []) if f.get("rows")]
    total = 0
    for f in files:
        rel = f["path"]
        if os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
            raise ValueError(f"{cache.url}/manifest.json: file path {rel!r} leaves the dataset")
    metas = [cache.client.call("head", f["path"], lambda s, k=f["path"]: __import__("obstore").head(s, k))
             for f in files]
    total = sum(int(x["size"]) for x in metas)
    if cache_limit is not None and total > int(cache_limit):
        raise CacheFullError(errno.ENOSPC, f"{cache.url}: the decomposed dataset is {total} bytes, more than "
                             f"cache_limit={cache_limit} (its bucket arrays are memory-mapped whole)")
    for f, meta in zip(files, metas):
        dst = os.path.join(root, f["path"])
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        size = int(meta["size"])
        with _FileLock(os.path.join(cache.dir, "locks", hashlib.sha256(dst.encode()).hexdigest()[:16] + ".lock")):
            if os.path.exists(dst) and os.path.getsize(dst) == size:
                continue
            tmp = f"{dst}.tmp-{os.getpid()}"
            n = [0]

            def open_dst():
                n[0] = 0
                return open(tmp, "wb")

            def on_chunk(fh, chunk):
                fh.write(memoryview(chunk))
                n[0] += len(chunk)

            try:
                fh = cache.client.stream_to(f["path"], open_dst, on_chunk)
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()
                if n[0] != size:
                    raise ChecksumError(f"{_join(cache.url, f['path'])}: downloaded {n[0]} bytes, the object "
                                        f"has {size}")
                os.replace(tmp, dst)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    mf.atomic_write_bytes(os.path.join(root, "manifest.json"), raw)
    return root
