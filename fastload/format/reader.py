"""``ReinforcedDataset``: O(1) random access to a reinforced dataset through memory maps."""
from __future__ import annotations

import mmap
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from fastload.format import manifest as mf
from fastload.format import remote
from fastload.format.shards import (decode_array, decode_augs, decode_augs_batch, decode_target_at,
                                    decode_targets, decode_targets_batch)
from fastload.sample.params import AUG_DTYPE


class _Shard:
    """One memory-mapped Arrow IPC shard; binary columns exposed as (offsets, buffer).

    The map is Python's ``mmap`` (read-only, file-backed) handed to Arrow zero-copy, so its
    touched pages can be dropped from the process with ``release()``: they are clean file
    pages, re-read from the page cache on the next access, never lost.
    """

    def __init__(self, path: str, kind: str):
        import pyarrow as pa

        try:
            with open(path, "rb") as f:
                self.mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:  # ValueError: empty file
            raise ValueError(f"cannot open shard {path}: {e}") from e
        try:
            reader = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(self.mmap)))
            if reader.num_record_batches != 1:
                raise ValueError(f"{path}: expected one record batch, found {reader.num_record_batches}")
            self.batch = reader.get_batch(0)
        except pa.ArrowInvalid as e:
            raise ValueError(f"{path}: not a valid Arrow IPC shard ({e})") from e
        self._bin: Dict[str, Tuple[np.ndarray, memoryview]] = {}
        self.path = path

    def binary(self, name: str) -> Tuple[np.ndarray, memoryview]:
        got = self._bin.get(name)
        if got is None:
            arr = self.batch.column(name)
            _, off_buf, data_buf = arr.buffers()
            off = np.frombuffer(off_buf, dtype=np.int64)[arr.offset:arr.offset + len(arr) + 1]
            data = memoryview(data_buf) if data_buf is not None else memoryview(b"")
            got = self._bin[name] = (off, data)
        return got

    def blob(self, name: str, row: int) -> memoryview:
        off, data = self.binary(name)
        return data[off[row]:off[row + 1]]

    def release(self) -> None:
        """Drop this shard's resident pages from the process (RSS), keeping the mapping."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self.mmap.madvise(mmap.MADV_DONTNEED)


class ReinforcedDataset:
    """A reinforced dataset (``manifest.json`` + Arrow IPC shards) opened for random access.

    Shards are memory-mapped on first use (after unpickling in a DataLoader worker too: the
    pickle holds only the path and the small per-row arrays). ``ds[i]`` returns a dict;
    ``gather`` serves a loader's batch.

    Example:
        >>> ds = ReinforcedDataset("imagenet_plus/")              # doctest: +SKIP
        >>> ids, probs = ds.target(0, ds.num_augmentations - 1)   # doctest: +SKIP
    """

    def __init__(self, path: str, verify: bool = False, max_resident_mib: Optional[float] = 8,
                 cache_dir: Optional[str] = None, cache_limit: Optional[int] = None, predownload: int = 4):
        self.path = os.fspath(path)
        # s3:// gs:// az:// http(s)://: shards come through a local cache (fastload/format/remote.py)
        self.remote = None
        # Mapped pages a loader touched count in RSS and would grow with the dataset; after
        # about this many MiB read through `gather`, they are dropped (None: never).
        self.max_resident_mib = max_resident_mib
        self._touched = 0
        if remote.is_remote(self.path):
            self.remote, m = remote.open_reinforced(self.path, cache_dir, cache_limit, predownload)
        else:
            m = mf.read_manifest(self.path)
        if not m.get("complete"):
            raise ValueError(f"{self.path!r} is incomplete ({len(m['shards'])}/{m.get('num_shards')} shards "
                             "written): rerun the same `reinforce` call to resume it")
        self.manifest = m
        self._shards_meta = sorted(m["shards"], key=lambda s: s["index"])
        if verify and self.remote is None:  # remote shards are verified on download
            bad = self.verify()
            if bad:
                raise ValueError(f"{self.path!r}: checksum mismatch in {bad}")
        self._starts = np.array([s["first_row"] for s in self._shards_meta] + [m["num_rows"]], np.int64)
        self._open: Dict[int, _Shard] = {}
        self._load_columns()

    # -- metadata ------------------------------------------------------------------------
    def _load_columns(self) -> None:
        labels, hw, ohw, keys, hashes = [], [], [], [], []
        for pos, s in enumerate(self._shards_meta):
            b = self.remote.meta_batch(pos) if self.remote else self._shard(pos).batch
            if b.num_rows != s["rows"]:
                raise ValueError(f"{s['file']}: {b.num_rows} rows, manifest says {s['rows']}")
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
            raise ValueError(f"{self.path!r}: shards hold {len(self.labels)} rows, manifest says {n}")
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

        return AugmentPolicy.from_dict(self.manifest["policy"])

    @property
    def replay(self) -> Dict[str, Any]:
        return self.manifest["replay"]

    @property
    def keys(self) -> List[str]:
        return self._keys

    # -- shards --------------------------------------------------------------------------
    def _shard(self, pos: int) -> _Shard:
        sh = self._open.get(pos)
        if sh is None:
            meta = self._shards_meta[pos]
            path = self.remote.fetch(pos, self._open) if self.remote else os.path.join(self.path, meta["file"])
            sh = self._open[pos] = _Shard(path, self.kind)
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
                return self._shard(pos).batch
        raise KeyError(index)

    def _locate(self, i: int) -> Tuple[_Shard, int]:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} rows")
        pos = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._shard(pos), i - int(self._starts[pos])

    def __getstate__(self):
        st = dict(self.__dict__)
        st["_open"] = {}  # memory maps are reopened lazily in the worker
        return st

    def verify(self) -> List[str]:
        """Names of shards whose sha256 or size does not match the manifest."""
        bad = []
        for s in self._shards_meta:
            p = os.path.join(self.path, s["file"])
            if not os.path.isfile(p) or os.path.getsize(p) != s["bytes"] or mf.sha256_file(p) != s["sha256"]:
                bad.append(s["file"])
        return bad

    # -- per-sample access ---------------------------------------------------------------
    def image_bytes(self, i: int) -> memoryview:
        """The stored encoded image (zero-copy view into the memory map; empty if not stored)."""
        sh, r = self._locate(i)
        return sh.blob("image", r)

    def augs(self, i: int) -> np.ndarray:
        """The N stored augmentation records of row ``i`` (AUG_DTYPE[N])."""
        sh, r = self._locate(i)
        i = int(i) % len(self)
        return decode_augs(sh.blob("augs", r), self._hw_tuples[i], self._box_grid, self.source_hw,
                           expected_n=self.num_augmentations)

    def _targets_row(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        if self.kind != "classification":
            raise ValueError("top-k targets exist only in classification datasets")
        sh, r = self._locate(i)
        return decode_targets(sh.blob("targets", r), (self.num_augmentations, self.topk))

    def target(self, i: int, j: int) -> Tuple[np.ndarray, np.ndarray]:
        """Teacher top-k (ids int64[k], probs float32[k]) of augmentation ``j`` of row ``i``."""
        if self.kind != "classification":
            raise ValueError("top-k targets exist only in classification datasets")
        sh, r = self._locate(i)
        return decode_target_at(sh.blob("targets", r), int(j), (self.num_augmentations, self.topk))

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
        for p in np.unique(pos).tolist():
            sel = np.flatnonzero(pos == p)
            r = local[sel]
            sh = self._shard(p)
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
        recs = decode_augs_batch(ablobs, aug_ids, self.source_hw[rows], self._box_grid, self.source_hw, n)
        if cls:
            ids, probs = decode_targets_batch(tblobs, aug_ids, n, k)
        else:
            ids, probs = np.zeros((B, 0), np.int64), np.zeros((B, 0), np.float32)
        return images, recs, ids, probs

    # image-text
    def _emb_dim(self) -> int:
        return int(self.manifest["embedding_dim"])

    def image_embedding(self, i: int, j: int) -> np.ndarray:
        """fp16 teacher image embedding of augmentation ``j`` of row ``i``."""
        sh, r = self._locate(i)
        return decode_array(sh.blob("image_emb", r), (self.num_augmentations, self._emb_dim()))[j]

    def text_embeddings(self, i: int) -> np.ndarray:
        """fp16 [num_captions, D]: the real caption(s) first, then the synthetic ones."""
        sh, r = self._locate(i)
        n = int(self.manifest["num_captions"])
        return decode_array(sh.blob("text_emb", r), (n, self._emb_dim()))

    def captions(self, i: int) -> Tuple[List[str], List[str]]:
        """(real captions, synthetic captions) of row ``i``."""
        sh, r = self._locate(i)
        return (sh.batch.column("captions")[r].as_py() or [], sh.batch.column("syn_captions")[r].as_py() or [])

    def __getitem__(self, i: int) -> Dict[str, Any]:
        sh, r = self._locate(i)
        i = int(i) % len(self)
        d = {"id": i, "key": self._keys[i], "label": int(self.labels[i]), "image": self.image_bytes(i),
             "source_hw": tuple(int(x) for x in self.source_hw[i]), "augs": self.augs(i)}
        if self.kind == "classification":
            d["target_ids"], d["target_probs"] = self._targets_row(i)
        else:
            d["image_emb"] = decode_array(sh.blob("image_emb", r), (self.num_augmentations, self._emb_dim()))
            d["text_emb"] = self.text_embeddings(i)
            d["captions"], d["syn_captions"] = self.captions(i)
        return d

    def __repr__(self) -> str:
        return (f"ReinforcedDataset({self.path!r}, kind={self.kind}, rows={len(self)}, "
                f"N={self.num_augmentations}, k={self.topk})")
