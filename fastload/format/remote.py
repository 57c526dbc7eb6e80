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
- a download goes to ``<name>.tmp-<random>``, created sparse at the shard's full size (its
  reservation, so downloads side by side never overshoot the limit together) and held under
  an exclusive ``flock`` by its writer until it is hashed while received and renamed
  into place only if its sha256 and size match the manifest: a reader never sees half a
  shard, and a mismatch raises :class:`ChecksumError` naming the URL. Instead of an fsync
  per shard, the file is marked (extended attribute) with the boot it was written in; a
  shard marked by another boot or not at all (the machine may have crashed before its
  blocks reached the disk) is hashed again before use, then fsync'd and marked durable, or
  downloaded again (:mod:`fastload.remote.cachedir`); where xattrs are unsupported, every
  shard is fsync'd before its rename. Liveness is the
  kernel's: a temporary file whose lock can be taken belongs to a dead writer (any pid
  namespace) and is removed; no pid is ever looked at;
- ranks on one node share the folder: a per-shard ``flock`` makes the first process
  download and the others wait and reuse the file (each shard is downloaded once per node);
  a reader holds a shared ``flock`` on a shard from lookup until its memory map is gone
  (a lease), and eviction skips leased shards, so a shard is never removed between lookup
  and open, and the bytes of mapped shards count against the limit;
- ``cache_limit`` (bytes, None = unbounded) bounds the folder. Every rank publishes its plan
  (the shards it reads, step by step) in the folder's node-wide table (``ranks/``), so an
  eviction weighs every live rank's next use (:mod:`fastload.remote.policy`, a pure function):
  first shards no longer in the manifest go, then the farthest next use over all ranks,
  then the least recently accessed (any rank). A shard any rank reads in its current or next
  step, or one being read (leased), is never evicted: when only those stand in the way, the
  read goes over the limit by them (their bytes are in use; ``stats["over_limit"]`` counts
  it) rather than have another rank download them again moments later. The predownload never
  evicts a shard needed no later than the one it fetches: it waits for the readers to move
  on. A read finding only downloads in flight in its way waits for them to land. Only a shard
  larger than the limit is a :class:`CacheFullError`, naming the folder and the sizes. A disk
  that fills up (ENOSPC, EDQUOT, EFBIG) triggers eviction and one retry, then the same error;
- the planned order comes from the reader: :class:`~fastload.ReinforcedLoader` hands the cache
  this rank's shards for the rest of the epoch, step by step, whenever an epoch starts or
  resumes (its built-in order or a ``sampler``; a ``batch_sampler`` cannot be read ahead,
  except ``BlockShuffleSampler.batch_sampler(dataset=...)``, which plans by itself, step by
  step too); the shards of the plan's first step are requested at once, side by side (up to
  ``FIRST_STEP_STREAMS``, one-shot threads); ``PREDOWNLOAD_STREAMS`` threads then keep the
  shards of the step being read and the next ``predownload`` distinct shards on disk, each
  skipping a shard someone else is fetching;
- per-row metadata (labels, sizes, keys, row hashes) comes from the dataset's
  ``meta-index.ipc`` (written by the dataset writer, listed in the manifest with its sha256:
  one GET for every shard, hashed before use, kept under ``meta/``). A dataset written
  before the index existed is read with ranged GETs of each shard's Arrow footer and small
  columns (two GETs of at most 8 KiB per shard, 16 shards at a time), cached under ``meta/``
  with the hashes of the byte spans it came from, which are compared with the full shard
  once that is downloaded and verified.

Network errors (refused connection, reset, timeout, 5xx) are retried ``retries`` times with
exponential backoff (``backoff`` s doubling, capped at 8 s); a missing object, wrong
credentials or a URL that holds something else fail at once with :class:`RemoteError`
naming the URL. Every request has a timeout (``timeout``, 30 s) and every call, retries
included, a deadline (``timeout`` + 10 s); a server that refuses connections is reported
after the backoff sleeps, 7.75 s with the defaults. ``close()`` (also at interpreter exit)
sets a stop flag that ends every wait and cancels downloads between two chunks, then joins
the predownload threads within ``timeout`` + 5 s, logging the stack of any it cannot join.

The code is split by job in :mod:`fastload.remote` (client, cachedir, policy, prefetch,
cache); this module keeps the public names.
"""
from fastload.remote.cache import (META_COLUMNS, ShardCache, materialize_decomposed, open_reinforced,  # noqa: F401
                                   predownload_rows)
from fastload.remote.cachedir import FileLock as _FileLock  # noqa: F401
from fastload.remote.client import (SCHEMES, CacheFullError, ChecksumError, RemoteError,  # noqa: F401
                                    default_cache_dir, is_remote)
from fastload.remote.client import Client as _Client  # noqa: F401
from fastload.remote.client import RangedFile as _RangedFile  # noqa: F401
from fastload.remote.client import first_line as _first_line  # noqa: F401
from fastload.remote.client import join as _join  # noqa: F401
from fastload.remote.prefetch import FIRST_STEP_STREAMS, PREDOWNLOAD_STREAMS  # noqa: F401

__all__ = ["RemoteError", "ChecksumError", "CacheFullError", "ShardCache", "is_remote", "default_cache_dir",
           "open_reinforced", "predownload_rows", "materialize_decomposed", "SCHEMES", "META_COLUMNS",
           "PREDOWNLOAD_STREAMS", "FIRST_STEP_STREAMS"]
