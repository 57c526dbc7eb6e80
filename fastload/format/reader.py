"""``ReinforcedDataset``: O(1) random access to a reinforced dataset through memory maps."""
from __future__ import annotations

import hashlib
import logging
import mmap
import os
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from fastload.format import manifest as mf
from fastload.format import remote
from fastload.format.manifest import CorruptDataError
from fastload.format.shards import (decode_array, decode_augs, decode_augs_batch, decode_target_at,
                                    decode_targets, decode_targets_batch)
from fastload.sample.params import AUG_DTYPE

log = logging.getLogger("fastload.format")


# columns that may hold nulls (an image-text row without captions)
_NULLABLE = ("captions", "syn_captions")


def open_shard(path: str, kind: str, expected_bytes: Optional[int] = None, fd: Optional[int] = None) -> "_Shard":
    """Map and validate one shard file: the one place a shard is opened (a remote cache
    hooks in here by handing over a local path and ``fd``, an open descriptor holding its
    lease: the map is made from it, and it is closed)."""
    return _Shard(path, kind, expected_bytes, fd)


class _Shard:
    """One memory-mapped Arrow IPC shard; binary columns exposed as (offsets, buffer).

    The map is Python's ``mmap`` (read-only, file-backed) handed to Arrow zero-copy, so its
    touched pages can be dropped from the process with ``release()``: they are clean file
    pages, re-read from the page cache on the next access, never lost.

    Opening checks what can be checked without reading the big columns: the file size
    against the manifest, the Arrow structure, the schema (names and types), and Arrow's
    full validation (offsets monotonic and inside their buffers, UTF-8 keys, null counts),
    so no later slice or conversion can read outside the file. Every failure is a
    :class:`CorruptDataError` naming the file.
    """

    def __init__(self, path: str, kind: str, expected_bytes: Optional[int] = None, fd: Optional[int] = None):
        import pyarrow as pa

        from fastload.format.shards import arrow_schema

        self.path = path
        try:
            # a remote cache's fd holds a shared flock (its lease against eviction): mmap
            # dup()s the descriptor, so the lock lives exactly as long as the map
            with (open(fd, "rb") if fd is not None else open(path, "rb")) as f:
                self.mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                st = os.fstat(f.fileno())
        except (OSError, ValueError) as e:  # ValueError: empty file
            raise CorruptDataError(path, f"cannot open shard ({e})") from e
        self.stat = (st.st_size, st.st_mtime_ns, st.st_ino)
        if expected_bytes is not None and len(self.mmap) != expected_bytes:
            raise CorruptDataError(path, f"{len(self.mmap)} bytes, manifest says {expected_bytes}")
        try:
            reader = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(self.mmap)))
            if reader.num_record_batches != 1:
                raise CorruptDataError(path, f"expected one record batch, found {reader.num_record_batches}")
            batch = reader.get_batch(0)
            want = arrow_schema(kind)
            for f in want:
                got = batch.schema.field(f.name).type if f.name in batch.schema.names else None
                if got != f.type:
                    raise CorruptDataError(path, f"column {f.name!r} is {got}, expected {f.type}")
            # offsets monotonic and in bounds, child arrays consistent, UTF-8 strings (costs
            # O(rows + key bytes): the big binary columns' data is not read)
            batch.validate(full=True)
            for name in batch.schema.names:
                if name not in _NULLABLE and batch.column(name).null_count:
                    raise CorruptDataError(path, f"column {name!r} holds nulls")
        except CorruptDataError:
            raise
        except (pa.ArrowException, OSError, KeyError, IndexError, TypeError, ValueError) as e:
            raise CorruptDataError(path, f"not a valid Arrow IPC shard ({type(e).__name__}: {e})") from e
        self.batch = batch
        self._bin: Dict[str, Tuple[np.ndarray, memoryview]] = {}

    def binary(self, name: str) -> Tuple[np.ndarray, memoryview]:
        got = self._bin.get(name)
        if got is None:
            arr = self.batch.column(name)
            _, off_buf, data_buf = arr.buffers()
            # by count: Arrow's validation guarantees at least this many offsets, in bounds
            # and monotonic (the buffer itself may be longer than a multiple of 8)
            off = np.frombuffer(off_buf, dtype=np.int64, count=len(arr) + 1, offset=arr.offset * 8)
            data = memoryview(data_buf) if data_buf is not None else memoryview(b"")
            got = self._bin[name] = (off, data)
        return got

    def blob(self, name: str, row: int) -> memoryview:
        off, data = self.binary(name)
        return data[off[row]:off[row + 1]]

    def sha256(self) -> str:
        """sha256 of the mapped bytes (GIL released while hashing); the pages it touched
        are dropped afterwards so hashing does not grow RSS by the shard size."""
        h = hashlib.sha256(self.mmap).hexdigest()
        self.release()
        return h

    def release(self) -> None:
        """Drop this shard's resident pages from the process (RSS), keeping the mapping."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self.mmap.madvise(mmap.MADV_DONTNEED)


class ReinforcedDataset:
    """A reinforced dataset (``manifest.json`` + Arrow IPC shards) opened for random access.

    Shards are memory-mapped on first use (after unpickling in a DataLoader worker too: the
    pickle holds only the path and the small per-row arrays). ``ds[i]`` returns a dict;
    ``gather`` serves a loader's batch.

    ``verify``: ``"lazy"`` (default) checks every shard's size and structure at open and its
    sha256 the first time a row of it is served (``gather``, ``ds[i]``, per-sample
    accessors), before anything of it is returned; ``"open"`` (or ``True``) hashes every
    shard in the constructor; ``"off"`` (or ``False``) skips the sha256 (sizes and structure
    are still checked) for data checked already. Any mismatch or corruption raises
    :class:`fastload.format.CorruptDataError` (a ``ValueError``) naming the shard file. The
    per-row arrays read at open (``labels``, ``source_hw``, ``keys``) are range-checked then;
    their bytes are covered by the shard's sha256 once a row of that shard is served. A
    shard verified in this process is trusted by pickled copies (DataLoader workers) while
    its size, mtime and inode are unchanged.

    Remote (``s3://``, ``gs://``, ``az://``, ``http(s)://``; ``cache_dir``, ``cache_limit``,
    ``predownload``: see :mod:`fastload.format.remote`). ``partner_reads``: how a MixUp/CutMix
    partner whose shard is not cached is read: ``"shard"`` downloads its whole shard (cached:
    the best choice when the cache holds the dataset, later epochs read locally), ``"range"``
    reads the row alone by a ranged GET (bytes per epoch stay near the rank's share, each
    epoch pays a request per partner), ``"auto"`` (default) is ``"shard"`` when
    ``cache_limit`` is None or holds every shard, else ``"range"``.

    Example:
        >>> ds = ReinforcedDataset("imagenet_plus/")              # doctest: +SKIP
        >>> ids, probs = ds.target(0, ds.num_augmentations - 1)   # doctest: +SKIP
    """

    def __init__(self, path: str, verify="lazy", max_resident_mib: Optional[float] = 8,
                 cache_dir: Optional[str] = None, cache_limit: Optional[int] = None, predownload: int = 4,
                 partner_reads: str = "auto"):
        self.path = os.fspath(path)
        if partner_reads not in ("auto", "range", "shard"):
            raise ValueError(f"partner_reads must be 'auto', 'range' or 'shard', got {partner_reads!r}")
        modes = {True: "open", False: "off", "lazy": "lazy", "open": "open", "off": "off"}
        if not isinstance(verify, (bool, str)) or verify not in modes:
            raise ValueError(f"verify must be 'lazy', 'open' or 'off' (or True/False), got {verify!r}")
        self.verify_mode = modes[verify]
        # s3:// gs:// az:// http(s)://: shards come through a local cache (fastload/format/remote.py)
        # that hashes each download against the manifest's sha256 before renaming it into place
        self.remote = None
        self._ranged_partners = False  # partner rows by ranged GET (remote; see partner_images)
        # Mapped pages a loader touched count in RSS and would grow with the dataset; after
        # about this many MiB read through `gather`, they are dropped (None: never).
        self.max_resident_mib = max_resident_mib
        self._touched = 0
        if remote.is_remote(self.path):
            self.remote, m = remote.open_reinforced(self.path, cache_dir, cache_limit, predownload)
            if partner_reads == "auto":
                whole = sum(int(x["bytes"]) for x in self.remote.shards)
                partner_reads = "shard" if cache_limit is None or int(cache_limit) >= whole else "range"
            self._ranged_partners = partner_reads == "range"
            if self.verify_mode == "lazy":  # verified on download already: no second hash
                self.verify_mode = "off"
        else:
            m = mf.read_manifest(self.path)
        if not m.get("complete"):
            raise ValueError(f"{self.path!r} is incomplete ({len(m['shards'])}/{m.get('num_shards')} shards "
                             "written): rerun the same `reinforce` call to resume it")
        mf.validate(m, os.path.join(self.path, mf.MANIFEST), strict=True)
        self.manifest = m
        self._shards_meta = sorted(m["shards"], key=lambda s: s["index"])
        self._starts = np.array([s["first_row"] for s in self._shards_meta] + [m["num_rows"]], np.int64)
        self._open: Dict[int, _Shard] = {}
        # shard position -> (size, mtime_ns, inode) when its sha256 matched
        self._verified: Dict[int, Tuple[int, int, int]] = {}
        self._vlock = threading.Lock()
        self._shard_locks: Dict[int, threading.Lock] = {}
        self._open_locks: Dict[int, threading.Lock] = {}
        self._load_columns()
        self.policy  # a manifest whose policy cannot be read is corrupt: say so at open
        if self.verify_mode == "open":
            self._check_many(range(len(self._shards_meta)))

    # -- metadata ------------------------------------------------------------------------
    def _meta_batches(self):
        """(position, manifest entry, Arrow batch of the small columns) per shard, in order.
        Remote: a few ranged GETs per shard, 16 shards at a time (thousands of shards
        one after the other would take minutes to open)."""
        metas = self._shards_meta
        if self.remote is not None and self.remote.meta_index is not None:  # one file for all shards
            yield from zip(range(len(metas)), metas, self.remote.meta_index)
            return
        if not self.remote or len(metas) < 2:
            for pos, s in enumerate(metas):
                yield pos, s, (self.remote.meta_batch(pos) if self.remote else self._shard(pos).batch)
            return
        from fastload._threads import parallel_map  # not concurrent.futures: see parallel_map

        batches = parallel_map(self.remote.meta_batch, list(range(len(metas))), 16, name="fastload-meta")
        yield from zip(range(len(metas)), metas, batches)

    def _load_columns(self) -> None:
        labels, hw, ohw, keys, hashes = [], [], [], [], []
        nc = self.manifest.get("num_classes") if self.kind == "classification" else None
        for pos, s, b in self._meta_batches():
            where = f"{self.path.rstrip('/')}/{s['file']}"
            if b.num_rows != s["rows"]:
                raise CorruptDataError(where, f"{b.num_rows} rows, manifest says {s['rows']}")
            h, w = b.column("src_h").to_numpy(), b.column("src_w").to_numpy()
            lab = b.column("label").to_numpy()
            if b.num_rows and (min(h.min(), w.min()) < 1 or min(b.column("orig_h").to_numpy().min(),
                                                                b.column("orig_w").to_numpy().min()) < 0):
                raise CorruptDataError(where, "an image size is not positive")
            if b.num_rows and (lab.min() < -1 or (nc is not None and lab.max() >= nc)):
                raise CorruptDataError(where, f"label outside [-1, {nc}) (num_classes in the manifest)")
            labels.append(b.column("label").to_numpy())
            hw.append(np.stack([b.column("src_h").to_numpy(), b.column("src_w").to_numpy()], 1))
            ohw.append(np.stack([b.column("orig_h").to_numpy(), b.column("orig_w").to_numpy()], 1))
            keys += b.column("key").to_pylist()
            hashes.append(np.frombuffer(b.column("hash").buffers()[1], np.uint8)
                          [b.column("hash").offset * 16:(b.column("hash").offset + b.num_rows) * 16].reshape(-1, 16))
        n = int(self.manifest["num_rows"])
        self.labels = np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64)
        self.source_hw = np.concatenate(hw).astype(np.int32) if hw else np.zeros((0, 2), np.int32)
        self.orig_hw = np.concatenate(ohw).astype(np.int32) if ohw else np.zeros((0, 2), np.int32)
        self._keys: List[str] = keys
        self._hash = np.concatenate(hashes) if hashes else np.zeros((0, 16), np.uint8)
        if len(self.labels) != n:
            raise CorruptDataError(os.path.join(self.path, mf.MANIFEST),
                                   f"shards hold {len(self.labels)} rows, manifest says {n}")
        self._hw_tuples = [(int(a), int(b)) for a, b in self.source_hw.tolist()]
        # the grid erase/CutMix boxes were sampled on (pixel-exact storage of those boxes)
        self._box_grid = tuple(self.replay.get("box_grid", self.replay["image_size"]))

    def __len__(self) -> int:
        return int(self.manifest["num_rows"])

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def num_augmentations(self) -> int:
        return int(self.manifest["num_augmentations"])

    @property
    def topk(self) -> int:
        return int(self.manifest.get("topk") or 0)

    @property
    def num_classes(self) -> Optional[int]:
        return self.manifest.get("num_classes")

    @property
    def policy(self):
        from fastload.sample.policy import AugmentPolicy

        try:
            return AugmentPolicy.from_dict(self.manifest["policy"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CorruptDataError(os.path.join(self.path, mf.MANIFEST), f"invalid policy ({e})") from e

    @property
    def replay(self) -> Dict[str, Any]:
        return self.manifest["replay"]

    @property
    def keys(self) -> List[str]:
        return self._keys

    # -- shards --------------------------------------------------------------------------
    def _shard(self, pos: int) -> _Shard:
        """The mapped shard (structure checked, sha256 not necessarily: see ``_checked``)."""
        sh = self._open.get(pos)
        if sh is None:
            with self._vlock:  # one map per shard, whichever thread asks first
                lock = self._open_locks.setdefault(pos, threading.Lock())
            with lock:
                sh = self._open.get(pos)
                if sh is None:
                    meta = self._shards_meta[pos]
                    if self.remote:
                        path, fd = self.remote.fetch_leased(pos, self._open)
                    else:
                        path, fd = os.path.join(self.path, meta["file"]), None
                    sh = self._open[pos] = open_shard(path, self.kind, meta["bytes"], fd)
        return sh

    def _check(self, pos: int, sh: Optional[_Shard] = None) -> None:
        """sha256 of shard ``pos`` against the manifest, once per mapping (thread-safe: one
        lock per shard, so threads hash different shards at the same time)."""
        sh = self._shard(pos) if sh is None else sh
        if self._verified.get(pos) == sh.stat:
            return
        with self._vlock:
            lock = self._shard_locks.setdefault(pos, threading.Lock())
        with lock:
            if self._verified.get(pos) == sh.stat:
                return
            if sh.sha256() != self._shards_meta[pos]["sha256"]:
                raise CorruptDataError(sh.path, "sha256 does not match the manifest (the shard is corrupt)")
            self._verified[pos] = sh.stat

    def _check_many(self, positions) -> Dict[int, _Shard]:
        """Hash the not yet verified shards among ``positions`` on all cores (hashlib
        releases the GIL): a shuffled first batch touches many shards at once. Returns the
        shards it mapped: held by the caller, a shard the remote cache evicts meanwhile
        (to make room for the next one) stays mapped and is not fetched twice."""
        held = {int(p): self._shard(int(p)) for p in positions}
        todo = [p for p, sh in held.items() if self._verified.get(p) != sh.stat]
        if len(todo) <= 1 or self.remote is not None:  # cache fetches: one at a time
            for p in todo:
                self._check(p, held[p])
            return held
        # plain threads (fastload._threads): concurrent.futures refuses work at interpreter
        # shutdown, when a training loop in a non-daemon thread may still read its first batch
        from fastload._threads import parallel_map

        parallel_map(lambda p: self._check(p, held[p]), todo, os.cpu_count() or 1)  # first error raised
        return held

    def _checked(self, pos: int) -> _Shard:
        """The shard, its sha256 verified first unless ``verify="off"``: every path that
        returns data of a row goes through here."""
        sh = self._shard(pos)
        if self.verify_mode != "off" and self._verified.get(pos) != sh.stat:
            self._check(pos)
        return sh

    def release_pages(self) -> None:
        """Drop the mapped pages this process holds (they stay in the OS page cache), so RSS
        stays bounded whatever the dataset size; buffers already handed out stay valid."""
        self._touched = 0
        for sh in list(self._open.values()):
            sh.release()

    def _shard_table(self, index: int):
        for pos, s in enumerate(self._shards_meta):
            if s["index"] == index:
                return self._checked(pos).batch
        raise KeyError(index)

    def _locate(self, i: int) -> Tuple[_Shard, int]:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} rows")
        pos = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._checked(pos), i - int(self._starts[pos])

    def __getstate__(self):
        st = dict(self.__dict__)
        st["_open"] = {}  # memory maps are reopened lazily in the worker
        st["_item_renderer"] = None  # rebuilt in the worker from _item_options
        st["_verified"] = dict(self._verified)
        del st["_vlock"], st["_shard_locks"], st["_open_locks"]
        return st

    def __setstate__(self, st):
        self.__dict__.update(st)
        self._vlock = threading.Lock()
        self._shard_locks = {}
        self._open_locks = {}

    def verify(self) -> List[str]:
        """Names of shards whose sha256 or size does not match the manifest (reads every
        shard; does not raise)."""
        bad = []
        for s in self._shards_meta:
            p = os.path.join(self.path, s["file"])
            if not os.path.isfile(p) or os.path.getsize(p) != s["bytes"] or mf.sha256_file(p) != s["sha256"]:
                bad.append(s["file"])
        return bad

    # -- per-sample access ---------------------------------------------------------------
    def _row_error(self, e: CorruptDataError, sh: _Shard, r: int) -> CorruptDataError:
        """A decoder's error (no file) re-raised naming the shard and row."""
        if e.path is not None:
            return e
        return CorruptDataError(sh.path, f"row {r}: {e.detail}")

    def _decode(self, sh: _Shard, r: int, fn, *args):
        try:
            return fn(*args)
        except CorruptDataError as e:
            raise self._row_error(e, sh, r) from e

    def image_bytes(self, i: int) -> memoryview:
        """The stored encoded image (zero-copy view into the memory map; empty if not stored)."""
        sh, r = self._locate(i)
        return sh.blob("image", r)

    def partner_images(self, indices: Sequence[int]) -> List[Any]:
        """Encoded images of MixUp/CutMix partners (any rows of the dataset). Remote with
        ``partner_reads="range"``: a row whose shard is not local is read by a ranged GET of
        its bytes, not its whole shard, and served only if its blake2b-128 equals the row's
        stored ``hash`` (true wherever the stored bytes are the hashed source: JPEG sources
        kept as they were, ml-dr and DataComp imports). On a mismatch the row comes from its downloaded, sha256-verified shard; if
        that equals the ranged bytes, the images were re-encoded when stored (their hash is of
        the source), and partners come from whole shards from then on (logged once)."""
        idx = [int(i) for i in indices]
        if self.remote is None or not self._ranged_partners:
            return [self.image_bytes(i) for i in idx]
        N = len(self)
        rows = [i + N if i < 0 else i for i in idx]
        pos = (np.searchsorted(self._starts, np.asarray(rows, np.int64), side="right") - 1).tolist()
        out: List[Any] = [None] * len(idx)
        far = []
        for k, (r, p) in enumerate(zip(rows, pos)):
            if p in self._open or os.path.exists(self.remote.local_name(p)):
                out[k] = self.image_bytes(r)
            else:
                far.append(k)
        if not far:
            return out
        # the row hashes came by ranged GETs too: trusted only once their table's sha256 equals
        # the manifest's hash_sha256 (else a consistent edit of a row and its hash is served)
        unverified = [k for k in far if not self._hash_table_ok(pos[k])]
        for k in unverified:
            out[k] = self.image_bytes(rows[k])  # no digest to check against: the verified shard
        far = [k for k in far if k not in set(unverified)]
        if not far:
            return out
        got = self.remote.read_rows([(pos[k], rows[k] - int(self._starts[pos[k]])) for k in far])
        for k, b in zip(far, got):
            if not self._ranged_partners:
                out[k] = self.image_bytes(rows[k])
            elif hashlib.blake2b(b, digest_size=16).digest() == self._hash[rows[k]].tobytes():
                out[k] = b
            else:
                out[k] = whole = self.image_bytes(rows[k])  # the verified shard decides
                if bytes(whole) == b:
                    self._ranged_partners = False
                    log.info("%s: stored images are not the bytes their hash covers (re-encoded): "
                             "MixUp/CutMix partners are read from whole shards", self.path)
        return out

    def _hash_table_ok(self, pos: int) -> bool:
        """Shard ``pos``'s row hashes (read by range at open) against the manifest's
        ``hash_sha256``; False when the manifest lists none (older datasets), a
        ChecksumError naming the shard's URL when they differ."""
        done = self.__dict__.setdefault("_hash_tables", {})
        ok = done.get(pos)
        if ok is None:
            want = self._shards_meta[pos].get("hash_sha256")
            a, b = int(self._starts[pos]), int(self._starts[pos + 1])
            if want is None:
                ok = False
            elif hashlib.sha256(self._hash[a:b].tobytes()).hexdigest() != want:
                raise remote.ChecksumError(
                    f"{self.path.rstrip('/')}/{self._shards_meta[pos]['file']}: the row hashes read by range differ "
                    "from the manifest's hash_sha256 (the object changed, or was edited, on the server)")
            else:
                ok = True
            done[pos] = ok
        return ok

    def augs(self, i: int) -> np.ndarray:
        """The N stored augmentation records of row ``i`` (AUG_DTYPE[N])."""
        sh, r = self._locate(i)
        i = int(i) % len(self)
        return self._decode(sh, r, decode_augs, sh.blob("augs", r), self._hw_tuples[i], self._box_grid,
                            self.source_hw, self.num_augmentations)

    @property
    def has_ext(self) -> bool:
        """Whether the shards hold extension records (schema v2 ``augs_ext``)."""
        if not self._shards_meta:
            return False
        if self.remote is not None and 0 not in self._open:  # the footer only, not the shard
            return "augs_ext" in self.remote.schema_names(0)
        return "augs_ext" in self._shard(0).batch.schema.names

    def augs_ext(self, i: int) -> np.ndarray:
        """The N extension records of row ``i`` (AUG_EXT_DTYPE[N]); empty ones when the
        dataset has none (schema v1, or nothing to extend)."""
        from fastload.format.record_ext import decode_ext
        from fastload.sample.params import empty_ext

        sh, r = self._locate(i)
        if "augs_ext" not in sh.batch.schema.names:
            return empty_ext(self.num_augmentations)
        return self._decode(sh, r, decode_ext, sh.blob("augs_ext", r), self.num_augmentations)

    def _targets_row(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        if self.kind != "classification":
            raise ValueError("top-k targets exist only in classification datasets")
        sh, r = self._locate(i)
        ids, probs = self._decode(sh, r, decode_targets, sh.blob("targets", r), (self.num_augmentations, self.topk))
        self._check_targets(ids, probs, lambda b: (sh, r))
        return ids, probs

    def target(self, i: int, j: int) -> Tuple[np.ndarray, np.ndarray]:
        """Teacher top-k (ids int64[k], probs float32[k]) of augmentation ``j`` of row ``i``."""
        if self.kind != "classification":
            raise ValueError("top-k targets exist only in classification datasets")
        sh, r = self._locate(i)
        ids, probs = self._decode(sh, r, decode_target_at, sh.blob("targets", r), int(j),
                                  (self.num_augmentations, self.topk))
        self._check_targets(ids[None], probs[None], lambda b: (sh, r))
        return ids, probs

    def _check_targets(self, ids: np.ndarray, probs: np.ndarray, where) -> None:
        """Class ids inside [0, num_classes) and probabilities in [0, 1] (one reduction each):
        a corrupt target is an error, never a wrong distribution or a failure in the loss."""
        if not ids.size:
            return
        nc = self.num_classes
        bad = (ids < 0).any(1) | ((ids >= nc).any(1) if nc is not None else False)
        bad |= ~((probs >= 0) & (probs <= 1)).all(1)  # NaN fails too
        if bad.any():
            b = int(np.flatnonzero(bad)[0])
            sh, r = where(b)
            raise CorruptDataError(sh.path, f"row {r}: stored targets outside [0, {nc}) or probabilities "
                                            "outside [0, 1]")

    def gather(self, indices: Sequence[int], aug_ids: Sequence[int]):
        """Batch access: (image buffers, AUG_DTYPE[B], ids int64[B, k], probs float32[B, k])."""
        indices = np.asarray(indices, np.int64)
        aug_ids = np.asarray(aug_ids, np.int64)
        if indices.shape != aug_ids.shape or indices.ndim != 1:
            raise ValueError("indices and aug_ids must be 1-D of the same length")
        if len(aug_ids) and (aug_ids.min() < 0 or aug_ids.max() >= self.num_augmentations):
            raise ValueError(f"aug_ids must be in [0, {self.num_augmentations})")
        B, k, n = len(indices), self.topk, self.num_augmentations
        N = len(self)
        cls = self.kind == "classification"
        # vectorized locate (one searchsorted per batch, not one Python call per row)
        if B and (indices.min() < -N or indices.max() >= N):
            bad = int(indices[(indices < -N) | (indices >= N)][0])
            raise IndexError(f"index {bad} out of range for a dataset of {N} rows")
        rows = np.where(indices < 0, indices + N, indices)
        pos = np.searchsorted(self._starts, rows, side="right") - 1
        local = rows - self._starts[pos]
        cols = ("image", "augs", "targets") if cls else ("image", "augs")
        out: List[List[Optional[memoryview]]] = [[None] * B for _ in cols]
        touched = 0
        upos = np.unique(pos).tolist()
        held = self._check_many(upos) if self.verify_mode != "off" else {}
        for p in upos:
            sel = np.flatnonzero(pos == p)
            r = local[sel]
            sh = held[p] if p in held else self._checked(p)
            sel_l = sel.tolist()
            for c, name in enumerate(cols):
                off, data = sh.binary(name)
                a, e = off[r], off[r + 1]
                touched += int((e - a).sum())
                dst = out[c]
                for b, x, y in zip(sel_l, a.tolist(), e.tolist()):
                    dst[b] = data[x:y]
        images: List[memoryview] = out[0]
        ablobs = out[1]
        tblobs = out[2] if cls else []
        if self.max_resident_mib is not None:
            self._touched += touched
            if self._touched > self.max_resident_mib * 2**20:
                self.release_pages()
        def where(b):
            return self._open[int(pos[b])], int(local[b])

        try:
            recs = decode_augs_batch(ablobs, aug_ids, self.source_hw[rows], self._box_grid, self.source_hw, n)
            if cls:
                ids, probs = decode_targets_batch(tblobs, aug_ids, n, k)
        except CorruptDataError as e:
            b = getattr(e, "batch_index", None)
            if e.path is not None or b is None:
                raise
            raise self._row_error(e, *where(b)) from e
        if cls:
            self._check_targets(ids, probs, where)
        else:
            ids, probs = np.zeros((B, 0), np.int64), np.zeros((B, 0), np.float32)
        return images, recs, ids, probs

    # image-text
    def _emb_dim(self) -> int:
        return int(self.manifest["embedding_dim"])

    def image_embedding(self, i: int, j: int) -> np.ndarray:
        """fp16 teacher image embedding of augmentation ``j`` of row ``i``."""
        sh, r = self._locate(i)
        return self._decode(sh, r, decode_array, sh.blob("image_emb", r), (self.num_augmentations, self._emb_dim()))[j]

    def text_embeddings(self, i: int) -> np.ndarray:
        """fp16 [num_captions, D]: the real caption(s) first, then the synthetic ones."""
        sh, r = self._locate(i)
        n = int(self.manifest["num_captions"])
        return self._decode(sh, r, decode_array, sh.blob("text_emb", r), (n, self._emb_dim()))

    def captions(self, i: int) -> Tuple[List[str], List[str]]:
        """(real captions, synthetic captions) of row ``i``."""
        sh, r = self._locate(i)
        return (sh.batch.column("captions")[r].as_py() or [], sh.batch.column("syn_captions")[r].as_py() or [])

    def configure_items(self, **options) -> "ReinforcedDataset":
        """Settings of ``ds[i]`` (``ReinforcedLoader``'s: image_size, seed, target_format,
        dtype, mean, std, p_reinforced, ...; see ``fastload.loader._item``)."""
        self._item_options, self._item_renderer = dict(options), None
        return self

    def set_epoch(self, epoch: int) -> None:
        """The epoch ``ds[i]`` replays (which stored augmentation each sample shows)."""
        self._item_epoch = int(epoch)

    def __getitem__(self, i: int):
        """One replayed sample ``(image [3, h, w], label, target)`` (``fastload.loader._item``);
        the stored record is ``record(i)``."""
        if getattr(self, "_item_renderer", None) is None:
            from fastload.loader._item import ItemRenderer

            self._item_renderer = ItemRenderer(self, getattr(self, "_item_options", {}))
        return self._item_renderer(i, getattr(self, "_item_epoch", 0))

    def record(self, i: int) -> Dict[str, Any]:
        """The stored record of row ``i``: key, label, encoded image, augmentations, targets."""
        sh, r = self._locate(i)
        i = int(i) % len(self)
        d = {"id": i, "key": self._keys[i], "label": int(self.labels[i]), "image": self.image_bytes(i),
             "source_hw": tuple(int(x) for x in self.source_hw[i]), "augs": self.augs(i)}
        if self.kind == "classification":
            d["target_ids"], d["target_probs"] = self._targets_row(i)
        else:
            d["image_emb"] = self._decode(sh, r, decode_array, sh.blob("image_emb", r),
                                          (self.num_augmentations, self._emb_dim()))
            d["text_emb"] = self.text_embeddings(i)
            d["captions"], d["syn_captions"] = self.captions(i)
        return d

    def __repr__(self) -> str:
        return (f"ReinforcedDataset({self.path!r}, kind={self.kind}, rows={len(self)}, "
                f"N={self.num_augmentations}, k={self.topk})")
