"""``manifest.json`` of a reinforced dataset (schema v2; v1 is read too): reading, validation, atomic writes.

The manifest is the single source of truth: a shard exists for readers only once it is
listed here, and it is listed only after it was written to a temporary name, fsync'd and
renamed into place (see :mod:`fastload.format.writer`). Layout::

    {"format": "fastload-reinforced", "schema_version": 1, "kind": "classification",
     "num_rows": ..., "num_augmentations": N, "topk": k, "num_classes": C, "seeds": [...],
     "policy": {...AugmentPolicy.to_dict()}, "ra_ops": [...14 names...],
     "replay": {"image_size": [h, w], "interpolation": ..., "dct_scale": ..., "mean": [...], "std": [...]},
     "teachers": [{"name": ..., "description": ...}], "embedding_dim": ..., "num_captions": ...,
     "shard_size": ..., "num_shards": ..., "complete": true,
     "shards": [{"index": 0, "file": "shard-00000.arrow", "rows": ..., "first_row": ...,
                 "sha256": ..., "bytes": ...}],
     "skipped": [{"key": ..., "error": ...}], "fingerprint": {...}}
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict

# v2: shards may hold the ``augs_ext`` column (fastload.sample.params.AUG_EXT_DTYPE); v1
# datasets have none and read as empty extensions.
SCHEMA_VERSION = 2
FORMAT_NAME = "fastload-reinforced"
MANIFEST = "manifest.json"
KINDS = ("classification", "image_text")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write to ``path.tmp-<pid>``, fsync, rename into place, fsync the directory."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_manifest(root: str, manifest: Dict[str, Any]) -> None:
    atomic_write_bytes(os.path.join(root, MANIFEST), (json.dumps(manifest, indent=1) + "\n").encode())


def read_manifest(root: str) -> Dict[str, Any]:
    """Load and validate ``root/manifest.json`` (clear errors for a foreign or newer file)."""
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        raise ValueError(f"{root!r} is not a reinforced dataset: no {MANIFEST}")
    try:
        with open(path, "rb") as f:
            m = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    validate(m, path)
    return m


def validate(m: Dict[str, Any], where: str = MANIFEST) -> None:
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise ValueError(f"{where}: not a fastload reinforced-dataset manifest")
    v = m.get("schema_version")
    if not isinstance(v, int):
        raise ValueError(f"{where}: schema_version missing or not an integer")
    if v > SCHEMA_VERSION:
        raise ValueError(f"{where}: schema_version {v} is newer than this fastload supports "
                         f"({SCHEMA_VERSION}); upgrade fastload to read it")
    if v < 1:
        raise ValueError(f"{where}: invalid schema_version {v}")
    if m.get("kind") not in KINDS:
        raise ValueError(f"{where}: kind must be one of {KINDS}, got {m.get('kind')!r}")
    for key in ("num_augmentations", "shards", "replay"):
        if key not in m:
            raise ValueError(f"{where}: missing field {key!r}")
    for s in m["shards"]:
        for key in ("file", "rows", "sha256", "bytes"):
            if key not in s:
                raise ValueError(f"{where}: shard {s.get('index')} lacks {key!r}")
        if os.path.basename(s["file"]) != s["file"]:
            raise ValueError(f"{where}: shard file {s['file']!r} must be a plain name")


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def fingerprint_digest(fp: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()
