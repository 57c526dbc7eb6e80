"""The object-store client of a remote dataset: one obstore store per URL, bounded retries,
a per-request timeout and a stop flag that every wait looks at.

Bounds (what ``close()`` and the docs rely on): one request takes at most ``timeout`` s
(obstore's client timeout); a transient failure is retried ``retries`` times after sleeps of
``backoff`` s doubling, capped at :data:`MAX_BACKOFF`; with the defaults (5 retries from
0.25 s) a server that refuses connections is reported after 0.25+0.5+1+2+4 = 7.75 s. The
whole call (all attempts and sleeps) is also cut at ``deadline`` s. A set stop flag ends
the sleeps at once and the streaming between two chunks.
"""
from __future__ import annotations

import errno
import io
import logging
import os
import re
import threading
import time
from typing import Any, Callable, List, Optional

from fastload.errors import CacheFullError, ChecksumError, RemoteError  # noqa: F401 - re-exported

log = logging.getLogger("fastload.remote")

SCHEMES = ("s3://", "s3a://", "gs://", "az://", "abfs://", "abfss://", "http://", "https://")
FULL_DISK = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
MAX_BACKOFF = 4.0
DEAD_FOR = 10.0  # after a call gave up on the server, others try once for this long


class Stopped(RemoteError):
    """The cache was closed while this call waited or streamed."""


def is_remote(path: Any) -> bool:
    return isinstance(path, str) and path.lower().startswith(SCHEMES)


def default_cache_dir() -> str:
    return os.environ.get("FASTLOAD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastload")


def join(url: str, key: str) -> str:
    return url.rstrip("/") + "/" + key


def first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__


def _auth_like(msg: str) -> bool:
    m = msg.lower()
    # 403 only where it is a status: not inside a port (127.0.0.1:40323) nor a duration ("in
    # 403.506µs", which failed CI once when a refused connection happened to take that long)
    return bool(re.search(r"403 forbidden|status(?: code)?:? ?403\b|\b(?:http|error) 403\b", m)) or any(
        w in m for w in ("forbidden", "accessdenied", "invalidaccesskeyid", "signaturedoesnotmatch",
                         "401 unauthorized"))


def _denied(url: str, what: str) -> str:
    return (f"{url}: access denied ({what}); check the credentials in the environment "
            "(AWS_*/GOOGLE_*/AZURE_* variables or config files)")


class Client:
    """One obstore store for a dataset URL, with bounded retries around every call."""

    def __init__(self, url: str, retries: int = 5, backoff: float = 0.25, timeout: float = 30.0,
                 deadline: Optional[float] = None):
        self.url = url.rstrip("/")
        self.retries, self.backoff, self.timeout = int(retries), float(backoff), float(timeout)
        # the longest one call may take, all attempts included (close() joins within it)
        self.deadline = float(deadline) if deadline is not None else self.timeout + 10.0
        self.stop = threading.Event()
        self._store = None
        self._pid = None
        self._lock = threading.Lock()
        self._dead_at: Optional[float] = None  # when a call last gave up on the server
        self.retried = 0  # transient failures bridged by a retry (tests and logs read it)

    def __getstate__(self):
        st = {k: v for k, v in self.__dict__.items() if k not in ("_store", "stop", "_lock")}
        return st | {"_store": None}

    def __setstate__(self, st):
        self.__dict__.update(st)
        self.stop, self._lock = threading.Event(), threading.Lock()

    def store(self):
        # obstore stores hold a connection pool: make a fresh one after fork (DataLoader workers)
        with self._lock:
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

    def _check_stop(self, url: str, what: str) -> None:
        if self.stop.is_set():
            raise Stopped(errno.ECANCELED, f"{url}: {what} cancelled (the cache was closed)")

    def call(self, what: str, key: str, fn: Callable):
        """Run ``fn(store)``; retry transient failures with exponential backoff."""
        import obstore.exceptions as oe

        url = join(self.url, key)
        delay = self.backoff
        end = time.monotonic() + self.deadline
        # another call just spent all its retries on this server: one attempt, not a second
        # round of backoff (a reader waiting for the predownload's failed shard reports at once)
        dead = self._dead_at is not None and time.monotonic() - self._dead_at < DEAD_FOR
        attempts = 1 if dead else self.retries + 1
        for attempt in range(attempts):
            self._check_stop(url, what)
            try:
                out = fn(self.store())
                self._dead_at = None
                return out
            except oe.NotFoundError as e:
                raise RemoteError(errno.ENOENT, f"{url}: not found ({what})") from e
            except (oe.PermissionDeniedError, oe.UnauthenticatedError) as e:
                raise RemoteError(errno.EACCES, _denied(url, what)) from e
            except (oe.InvalidPathError, oe.UnknownConfigurationKeyError, oe.NotSupportedError) as e:
                raise RemoteError(errno.EINVAL, f"{url}: {type(e).__name__} ({what}): {first_line(e)}") from e
            except (ChecksumError, CacheFullError, RemoteError):
                raise
            except OSError as e:
                if e.errno in FULL_DISK or getattr(e, "filename", None):  # our side: the cache disk
                    raise
                if isinstance(e, FileNotFoundError):  # obstore's "object not found"
                    raise RemoteError(errno.ENOENT, f"{url}: not found ({what})") from e
                if isinstance(e, PermissionError):
                    raise RemoteError(errno.EACCES, _denied(url, what)) from e
                delay = self._retry(url, what, e, first_line(e), attempt, attempts, delay, end)
            except Exception as e:  # noqa: BLE001 - connection refused/reset, timeout, 5xx
                msg = first_line(e)
                if _auth_like(msg):
                    raise RemoteError(errno.EACCES, f"{url}: access denied ({what}): {msg}") from e
                delay = self._retry(url, what, e, msg, attempt, attempts, delay, end)

    def _retry(self, url, what, e, msg, attempt, attempts, delay, end) -> float:
        self._check_stop(url, what)
        if attempt == attempts - 1 or time.monotonic() + delay > end:
            self._dead_at = time.monotonic()
            raise RemoteError(errno.EIO, f"{url}: {what} failed after {attempt + 1} attempts "
                              f"({type(e).__name__}: {msg})") from e
        log.warning("%s: %s failed (%s), retry %d/%d in %.2fs", url, what, msg, attempt + 1, self.retries, delay)
        self.retried += 1
        if self.stop.wait(delay):  # closed while backing off
            self._check_stop(url, what)
        return min(delay * 2, MAX_BACKOFF)

    def get_bytes(self, key: str) -> bytes:
        import obstore as obs

        return self.call("get", key, lambda s: bytes(obs.get(s, key).bytes()))

    def get_range(self, key: str, start: int, end: int) -> bytes:
        import obstore as obs

        return self.call("ranged get", key, lambda s: bytes(obs.get_range(s, key, start=start, end=end)))

    def head(self, key: str):
        import obstore as obs

        return self.call("head", key, lambda s: obs.head(s, key))

    def stream_to(self, key: str, dst_open: Callable[[], Any], on_chunk: Callable[[Any, bytes], None]):
        """Download ``key`` chunk by chunk; each attempt starts a fresh destination."""
        import obstore as obs

        url = join(self.url, key)

        def run(s):
            f = dst_open()
            # 256 KiB: coalescing the network reads into bigger chunks costs a copy (measured: 4 MiB
            # chunks took 1.6x the CPU of 256 KiB ones for download + sha256 + write)
            for chunk in obs.get(s, key).stream(min_chunk_size=256 << 10):
                self._check_stop(url, "get")
                on_chunk(f, chunk)
            return f

        return self.call("get", key, run)


class RangedFile(io.RawIOBase):
    """A seekable read-only file over ranged GETs (for Arrow's footer + selected columns)."""

    def __init__(self, client: Client, key: str, size: int, readahead: int = 8192):
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
                raise RemoteError(errno.EIO, f"{join(self.client.url, self.key)}: {len(data)} bytes for the "
                                  f"range [{start}, {end}) (the object is shorter than the manifest says?)")
            self.bytes_read += len(data)
            self._blocks.append((start, data))
        b[:n] = data[a - start:a - start + n]
        self.pos += n
        return n
