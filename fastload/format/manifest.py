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
     "skipped": [{"key": ..., "error": ...}], "fingerprint": {...},
     "meta_index": {"file": "meta-index.ipc", "bytes": ..., "sha256": ..., "shards": ...,
                    "shard_columns": [...]}}   # optional: every shard's META_COLUMNS in one file
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Any, Dict

from fastload.errors import CorruptDataError  # noqa: F401 - defined there, raised here

# v2: shards may hold the ``augs_ext`` column (fastload.sample.params.AUG_EXT_DTYPE); v1
# datasets have none and read as empty extensions.
SCHEMA_VERSION = 2
FORMAT_NAME = "fastload-reinforced"
MANIFEST = "manifest.json"
KINDS = ("classification", "image_text")
# the small per-row columns a reader loads at open (labels, sizes, keys, row hashes); the
# writer gathers them for every shard into one file (writer.write_meta_index)
META_COLUMNS = ("key", "hash", "orig_h", "orig_w", "src_h", "src_w", "label")


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
    """Write to ``path.tmp-<pid>-<thread>``, fsync, rename into place, fsync the directory
    (threads of one process, e.g. the remote cache's downloaders, never share a temp name)."""
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_manifest(root: str, manifest: Dict[str, Any]) -> None:
    atomic_write_bytes(os.path.join(root, MANIFEST), (json.dumps(manifest, indent=1) + "\n").encode())


def read_manifest(root: str, strict: bool = False) -> Dict[str, Any]:
    """Load and validate ``root/manifest.json`` (clear errors for a foreign or newer file).

    A missing manifest is a ``ValueError`` (not a dataset); a manifest that exists but cannot
    be what fastload wrote is a :class:`CorruptDataError` naming it. ``strict``: every field
    a reader needs must be present and in range (readers pass it; the writer's resume path
    reads partial headers).
    """
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        raise ValueError(f"{root!r} is not a reinforced dataset: no {MANIFEST}")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise CorruptDataError(path, f"larger than {MAX_MANIFEST_BYTES} bytes")
        m = json.loads(raw.decode("utf-8"))
    except OSError as e:
        raise CorruptDataError(path, f"cannot read ({e})") from e
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CorruptDataError(path, f"not valid JSON ({type(e).__name__}: {str(e)[:200]})") from e
    validate(m, path, strict=strict)
    return m


MAX_MANIFEST_BYTES = 1 << 30
# bounds on what a manifest may announce (the shard decoders allocate from them)
MAX_AUGMENTATIONS = 1 << 16
MAX_TARGET_ENTRIES = 1 << 24  # num_augmentations * topk
MAX_EMBEDDING = 1 << 16
MAX_ROWS = 1 << 40


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate(m: Dict[str, Any], where: str = MANIFEST, strict: bool = False) -> None:
    """Check a parsed manifest; every problem is a :class:`CorruptDataError` naming ``where``."""
    def bad(detail):
        raise CorruptDataError(where, detail)

    def int_field(d, key, lo, hi, required=True, none_ok=False, ctx=""):
        if key not in d:
            if required:
                bad(f"{ctx}missing field {key!r}")
            return
        v = d[key]
        if v is None and none_ok:
            return
        if not _is_int(v) or not lo <= v <= hi:
            bad(f"{ctx}field {key!r} must be an integer in [{lo}, {hi}], got {str(v)[:40]!r}")

    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        bad("not a fastload reinforced-dataset manifest")
    v = m.get("schema_version")
    if not _is_int(v):
        bad("schema_version missing or not an integer")
    if v > SCHEMA_VERSION:
        # a newer file is not corrupt: a plain ValueError that says what to do
        raise ValueError(f"{where}: schema_version {v} is newer than this fastload supports "
                         f"({SCHEMA_VERSION}); upgrade fastload to read it")
    if v < 1:
        bad(f"invalid schema_version {v}")
    if m.get("kind") not in KINDS:
        bad(f"kind must be one of {KINDS}, got {str(m.get('kind'))[:40]!r}")
    for key in ("num_augmentations", "shards", "replay"):
        if key not in m:
            bad(f"missing field {key!r}")
    if not isinstance(m["shards"], list):
        bad("field 'shards' must be a list")
    from fastload.sample.schema import op_table_problem

    problem = op_table_problem(m.get("ra_ops"))
    if problem:
        bad(problem)
    if not isinstance(m["replay"], dict):
        bad("field 'replay' must be an object")
    int_field(m, "num_augmentations", 1, MAX_AUGMENTATIONS)
    int_field(m, "topk", 0, MAX_TARGET_ENTRIES, required=False)
    int_field(m, "num_rows", 0, MAX_ROWS, required=strict)
    int_field(m, "num_shards", 0, MAX_ROWS, required=False)
    if "complete" in m and not isinstance(m["complete"], bool):
        bad("field 'complete' must be true or false")
    if m["num_augmentations"] * (m.get("topk") or 0) > MAX_TARGET_ENTRIES:
        bad(f"num_augmentations * topk exceeds {MAX_TARGET_ENTRIES}")
    for key in ("policy", "fingerprint"):
        if key in m and not isinstance(m[key], dict):
            bad(f"field {key!r} must be an object")
    for key in ("skipped", "teachers", "seeds"):
        if key in m and not isinstance(m[key], list):
            bad(f"field {key!r} must be a list")
    if "classes" in m and m["classes"] is not None and not isinstance(m["classes"], list):
        bad("field 'classes' must be a list")
    seen = set()
    for i, s in enumerate(m["shards"]):
        ctx = f"shard entry {i}: "
        if not isinstance(s, dict):
            bad(f"{ctx}not an object")
        for key in ("file", "rows", "sha256", "bytes"):
            if key not in s:
                bad(f"shard {s.get('index')} lacks {key!r}")
        if not isinstance(s["file"], str) or os.path.basename(s["file"]) != s["file"] or s["file"] in ("", ".", ".."):
            bad(f"{ctx}shard file {str(s['file'])[:80]!r} must be a plain name")
        if not isinstance(s["sha256"], str) or len(s["sha256"]) != 64:
            bad(f"{ctx}'sha256' must be 64 hex digits")
        if "hash_sha256" in s and (not isinstance(s["hash_sha256"], str) or len(s["hash_sha256"]) != 64):
            bad(f"{ctx}'hash_sha256' must be 64 hex digits")
        int_field(s, "rows", 0, MAX_ROWS, ctx=ctx)
        int_field(s, "bytes", 0, 1 << 50, ctx=ctx)
        int_field(s, "index", 0, MAX_ROWS, required=strict, ctx=ctx)
        int_field(s, "first_row", 0, MAX_ROWS, required=strict, ctx=ctx)
        if "index" in s:
            if s["index"] in seen:
                bad(f"{ctx}duplicate shard index {s['index']}")
            seen.add(s["index"])
    if not strict:
        return
    kind = m["kind"]
    topk = m.get("topk") or 0
    if kind == "classification":
        int_field(m, "num_classes", max(topk, 1), 1 << 31)
    else:
        int_field(m, "embedding_dim", 1, MAX_EMBEDDING)
        int_field(m, "num_captions", 1, MAX_AUGMENTATIONS)
    r = m["replay"]
    for key in ("image_size", "box_grid"):
        if key in r or key == "image_size":
            g = r.get(key)
            if not (isinstance(g, list) and len(g) == 2 and all(_is_int(x) and 1 <= x <= 1 << 16 for x in g)):
                bad(f"replay.{key} must be [height, width] of positive integers, got {str(g)[:40]}")
    if "dct_scale" in r and not isinstance(r["dct_scale"], bool):
        # a string reads as true in Python: DCT-scaled decoding where the recipe decoded at
        # full size (import-datacomp wrote one before; re-import, or set it to false)
        bad(f"replay.dct_scale must be true or false, got {str(r['dct_scale'])[:60]!r}")
    if "interpolation" in r and not isinstance(r["interpolation"], str):
        bad("replay.interpolation must be a string")
    for key in ("mean", "std"):
        if key in r and not (isinstance(r[key], list) and len(r[key]) == 3
                             and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x == x for x in r[key])):
            bad(f"replay.{key} must be three numbers")
    if "std" in r and any(x == 0 for x in r["std"]):
        bad("replay.std must not hold a zero")
    start = 0
    for s in sorted(m["shards"], key=lambda s: s["index"]):
        if s["first_row"] != start:
            bad(f"shard {s['index']}: first_row {s['first_row']}, the shards before it hold {start} rows")
        start += s["rows"]
    if m.get("complete") and start != m["num_rows"]:
        bad(f"shards hold {start} rows, num_rows says {m['num_rows']}")


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
