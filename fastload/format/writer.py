"""Crash-safe writing of reinforced datasets, resume, and merging of runs (N grows).

A shard is written to ``<name>.tmp-<pid>``, fsync'd, renamed into place, and only then listed
in ``manifest.json`` (itself replaced atomically). A crash at any point therefore loses
nothing that is listed; a rerun with the same arguments skips the listed shards.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from fastload.format import manifest as mf
from fastload.format.shards import arrow_schema, encode_augs, encode_targets


def write_shard_file(root: str, index: int, columns: Dict[str, list], kind: str) -> Dict[str, Any]:
    """Write one shard (one Arrow IPC record batch) atomically; return its manifest entry."""
    import pyarrow as pa

    schema = arrow_schema(kind, ext="augs_ext" in columns)
    batch = pa.record_batch([pa.array(columns[f.name], type=f.type) for f in schema], schema=schema)
    name = mf.shard_name(index)
    path = os.path.join(root, name)
    tmp = f"{path}.tmp-{os.getpid()}"
    with pa.OSFile(tmp, "wb") as sink:
        with pa.ipc.new_file(sink, schema) as w:
            w.write_batch(batch)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    digest = mf.sha256_file(tmp)
    size = os.path.getsize(tmp)
    os.replace(tmp, path)
    mf.fsync_dir(root)
    return {"index": int(index), "file": name, "rows": int(batch.num_rows), "sha256": digest, "bytes": int(size)}


def hash_table_sha256(path: str) -> Optional[str]:
    """sha256 of a shard's ``hash`` column (16 bytes per row, in row order): the manifest
    lists it, so a remote reader that fetches single rows by range (MixUp/CutMix partners)
    verifies the row hashes it read by range before trusting them (fastload/format/reader.py)."""
    import hashlib

    import pyarrow as pa

    with pa.memory_map(path) as src:
        r = pa.ipc.open_file(src)
        names = r.schema.names
        if "hash" not in names:
            return None
        col = pa.ipc.open_file(src, options=pa.ipc.IpcReadOptions(
            included_fields=[names.index("hash")])).get_batch(0).column(0)
        buf = col.buffers()[1]
        return hashlib.sha256(memoryview(buf)[col.offset * 16:(col.offset + len(col)) * 16]).hexdigest()


META_INDEX = "meta-index.ipc"  # not .arrow: tools that list the shards glob *.arrow


def write_meta_index(root: str, shards: Sequence[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Write ``meta-index.ipc``: every shard's small per-row columns (``mf.META_COLUMNS``),
    one Arrow record batch per shard in manifest order, and return its manifest entry
    (``{"file", "bytes", "sha256", "shards", "shard_columns"}``; None for no shards).

    A remote reader opens a dataset of thousands of shards with two GETs (the manifest, this
    file, hashed against the manifest's sha256) instead of two ranged GETs per shard. Written
    atomically before the manifest that lists it (``finish``), so a listed index exists."""
    import hashlib

    import pyarrow as pa

    if not shards:
        return None
    sink = pa.BufferOutputStream()
    writer, names = None, None
    for s in shards:
        with pa.memory_map(os.path.join(root, s["file"])) as src:
            all_names = pa.ipc.open_file(src).schema.names
            opts = pa.ipc.IpcReadOptions(included_fields=[all_names.index(c) for c in mf.META_COLUMNS])
            b = pa.ipc.open_file(src, options=opts).get_batch(0)
            if writer is None:
                names = list(all_names)
                writer = pa.ipc.new_file(sink, b.schema)
            writer.write_batch(b)  # copies the buffers out of the map before it closes
    writer.close()
    data = sink.getvalue().to_pybytes()
    mf.atomic_write_bytes(os.path.join(root, META_INDEX), data)
    return {"file": META_INDEX, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "shards": len(shards), "shard_columns": names}


class DatasetWriter:
    """Owns ``manifest.json`` of an output directory: open (or resume), list shards, finish.

    ``header`` holds the dataset-level manifest fields; ``fingerprint`` the arguments that
    define the dataset: an existing manifest with another fingerprint is a different dataset
    and is refused rather than mixed.

    >>> import tempfile
    >>> w = DatasetWriter(tempfile.mkdtemp(), {"kind": "classification", "num_augmentations": 1,
    ...                   "replay": {}}, {"a": 1}, num_shards=0)
    >>> w.finish()["complete"]
    True
    """

    def __init__(self, root: str, header: Dict[str, Any], fingerprint: Dict[str, Any], num_shards: int):
        self.root = root
        os.makedirs(root, exist_ok=True)
        digest = mf.fingerprint_digest(fingerprint)
        path = os.path.join(root, mf.MANIFEST)
        if os.path.exists(path):
            old = mf.read_manifest(root)
            if old.get("fingerprint_sha256") != digest:
                diff = sorted(k for k in set(fingerprint) | set(old.get("fingerprint", {}))
                              if fingerprint.get(k) != old.get("fingerprint", {}).get(k))
                raise ValueError(f"out directory {root!r} already holds a different dataset "
                                 f"(differs in: {', '.join(map(str, diff)) or 'fingerprint'}); "
                                 "choose another directory or delete it")
            shards = [s for s in old["shards"] if self._intact(s)]
        else:
            others = [f for f in os.listdir(root) if ".tmp-" not in f]
            if others:
                raise ValueError(f"out directory {root!r} is not empty and holds no reinforced dataset "
                                 f"(found {others[:3]}); choose an empty directory")
            shards = []
        for f in os.listdir(root):  # leftovers of a crash: never listed, safe to drop
            if ".tmp-" in f:
                try:
                    os.remove(os.path.join(root, f))
                except OSError:
                    pass
        from fastload.sample.schema import manifest_tables  # the one writer of the op table

        self.manifest = dict(header, **manifest_tables(), format=mf.FORMAT_NAME, schema_version=mf.SCHEMA_VERSION,
                             fingerprint=fingerprint, fingerprint_sha256=digest, num_shards=int(num_shards),
                             complete=False, shards=shards)
        self.manifest.setdefault("skipped", [])
        mf.write_manifest(root, self.manifest)

    def _intact(self, s: Dict[str, Any]) -> bool:
        p = os.path.join(self.root, s["file"])
        return os.path.isfile(p) and os.path.getsize(p) == s["bytes"]

    @property
    def done(self) -> set:
        return {s["index"] for s in self.manifest["shards"]}

    def add_shard(self, info: Dict[str, Any]) -> None:
        """List a shard that is already complete and renamed into place."""
        if "hash_sha256" not in info:
            digest = hash_table_sha256(os.path.join(self.root, info["file"]))
            info = dict(info, **({"hash_sha256": digest} if digest else {}))
        self.manifest["shards"] = sorted([s for s in self.manifest["shards"] if s["index"] != info["index"]]
                                         + [info], key=lambda s: s["index"])
        mf.write_manifest(self.root, self.manifest)

    def finish(self, **extra) -> Dict[str, Any]:
        missing = sorted(set(range(self.manifest["num_shards"])) - self.done)
        if missing:
            raise RuntimeError(f"cannot finish {self.root!r}: shards {missing[:10]} were not written")
        first = 0
        for s in self.manifest["shards"]:
            s["first_row"] = first
            first += s["rows"]
        index = write_meta_index(self.root, self.manifest["shards"])
        if index is not None:
            extra = dict(extra, meta_index=index)
        self.manifest.update(extra, num_rows=first, complete=True)
        mf.write_manifest(self.root, self.manifest)
        return self.manifest


def merge(inputs: Sequence[str], out: str, progress: bool = True) -> Dict[str, Any]:
    """Merge reinforced datasets made from the same images (different seeds) into one whose
    N is the sum: augmentations and targets are concatenated per row.

    >>> # merge(["run_seed0/", "run_seed1/"], "merged/")  # N = N0 + N1
    """
    from fastload._progress import Progress
    from fastload.format.reader import ReinforcedDataset

    if len(inputs) < 2:
        raise ValueError("merge needs at least two input datasets")
    dss = [ReinforcedDataset(p) for p in inputs]
    a = dss[0]
    if a.kind != "classification":
        raise ValueError("merge supports classification datasets")
    for p, d in zip(inputs[1:], dss[1:]):
        for key in ("kind", "topk", "num_classes", "policy", "replay", "teachers", "num_rows"):
            if d.manifest.get(key) != a.manifest.get(key):
                raise ValueError(f"cannot merge {p!r}: {key!r} differs from {inputs[0]!r}")
        if not (np.array_equal(d._hash, a._hash) and d._keys == a._keys):
            raise ValueError(f"cannot merge {p!r}: its rows are not the same images as {inputs[0]!r}")
    seeds: List[int] = [s for d in dss for s in d.manifest["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"cannot merge runs with the same seed (seeds {seeds}): the augmentations would repeat")
    n_total = sum(d.num_augmentations for d in dss)
    header = {k: v for k, v in a.manifest.items()
              if k not in ("shards", "complete", "fingerprint", "fingerprint_sha256", "num_shards", "num_rows",
                           "meta_index")}
    header.update(num_augmentations=n_total, seeds=seeds, merged_from=[os.path.abspath(p) for p in inputs])
    fp = {"merge_of": [d.manifest["fingerprint_sha256"] for d in dss]}
    shards = sorted(a.manifest["shards"], key=lambda s: s["index"])
    w = DatasetWriter(out, header, fp, num_shards=len(shards))
    render_hw = a._box_grid
    with Progress(len(shards), "merge", "shards", enabled=progress) as bar:
        for s in shards:
            if s["index"] in w.done:
                bar.update()
                continue
            table = a._shard_table(s["index"])
            cols = {name: table.column(name).to_pylist() for name in table.schema.names
                    if name not in ("augs", "targets")}
            augs_col, tgt_col = [], []
            for r in range(s["first_row"], s["first_row"] + s["rows"]):
                hw = tuple(a.source_hw[r])
                aug = np.concatenate([d.augs(r) for d in dss])
                ids = np.concatenate([d._targets_row(r)[0] for d in dss])
                probs = np.concatenate([d._targets_row(r)[1] for d in dss])
                augs_col.append(encode_augs(aug, hw, render_hw, a.source_hw))
                tgt_col.append(encode_targets(ids, probs))
            cols["augs"], cols["targets"] = augs_col, tgt_col
            w.add_shard(write_shard_file(out, s["index"], cols, a.kind))
            bar.update()
    return w.finish(skipped=a.manifest.get("skipped", []))


__all__ = ["DatasetWriter", "write_shard_file", "write_meta_index", "merge", "META_INDEX"]
