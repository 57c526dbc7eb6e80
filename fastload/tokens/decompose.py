"""Dataset Decomposition (arXiv 2405.13226): tokenized documents -> per-length buckets.

Every document, with an end-of-text (EOT) token appended, is cut into chunks of ``2^k + 1``
tokens (the ``+1`` is the shifted target) by the reference rule (``get_binary`` of
apple/ml-dataset-decomposition)::

    pos = 0
    while L - pos > 1:                      # L = len(doc) + 1 (EOT included)
        k = floor(log2(L - pos - 1))
        if k < min_bucket: break            # the remainder is dropped (and counted)
        if k > max_bucket: k = draw() if randomize else max_bucket
        emit doc[pos : pos + 2^k + 1] into bucket k; pos += 2^k + 1

``draw()`` picks k in [min_bucket, max_bucket] with P(k) proportional to 2^(max_bucket - k).
Its random stream is defined here (and in ``csrc/decompose/decompose.cpp``) as a
counter-based hash, so the output does not depend on threads or on how the work is split:
``r = (H(seed, file, doc, chunk) * W) >> 64`` with ``W = 2^(n_buckets) - 1`` and
``H = splitmix64(splitmix64(splitmix64(splitmix64(seed) ^ file) ^ doc) ^ chunk)``, where
``file`` is the index of the input file in sorted order (0 for in-memory input), ``doc`` the
document index inside that file and ``chunk`` the chunk index inside the document; k is the
first k (from min_bucket up) whose cumulative weight exceeds r.

Output folder::

    manifest.json                 schema version, buckets, counts, drops, vocab, seed, files
    bucket_08.npy ... bucket_13.npy   int32 [rows_k, 2^k + 1], memory-mappable (np.load mmap)

(the Ray engine writes ``shards/<file>/bucket_KK.npy`` per input file instead; the manifest
lists every file of every bucket). Inside a bucket, rows are in document order; the loader
shuffles per epoch.

Input: a Parquet or Arrow IPC/Feather file (or a folder of them) with one ``list<int>``
column of token ids (``column=`` picks one when there are several), an ``.npz`` with flat
``tokens`` and ``offsets`` arrays, a ``(tokens, offsets)`` pair of arrays, or a pyarrow
Table/ListArray. :func:`tokenize_folder` makes such a dataset from text files with any
tokenizer (default: byte-level, vocabulary 257, EOT 256).

Bad input: empty documents and documents shorter than ``2^min_bucket`` tokens yield no chunk
and are counted (``empty_documents``, ``dropped_documents``, ``dropped_tokens``); token ids
outside ``[0, vocab_size)``, ``min_bucket > max_bucket``, null documents, decreasing offsets
and paths holding no token dataset raise ``ValueError`` naming the file/document.
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import shutil
import sys
import tempfile
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._native import check, load, ptr
from ..format.manifest import CorruptDataError

SCHEMA_VERSION = 1
FORMAT_NAME = "fastload-decomposition"
TOKEN_EXTS = (".parquet", ".arrow", ".feather", ".ipc", ".npz")
BYTE_VOCAB, BYTE_EOT = 257, 256
_BLOCK = 1024  # documents per counting block (fixed: the output must not depend on threads)
_M64 = (1 << 64) - 1

__all__ = ["decompose", "tokenize_folder", "read_tokens", "load_manifest", "main",
           "reference_decompose"]


# ----------------------------------------------------------------------------- reference
def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _chunk_hash(seed: int, file: int, doc: int, chunk: int) -> int:
    h = _splitmix64(seed & _M64)
    h = _splitmix64(h ^ file)
    h = _splitmix64(h ^ doc)
    return _splitmix64(h ^ chunk)


def _draw(seed: int, file: int, doc: int, chunk: int, min_k: int, max_k: int) -> int:
    """The documented random bucket for a chunk above max_k (same stream as the C++ kernel)."""
    w = (1 << (max_k - min_k + 1)) - 1
    r = (_chunk_hash(seed, file, doc, chunk) * w) >> 64
    k, acc = min_k, 1 << (max_k - min_k)
    while r >= acc:
        k += 1
        acc += 1 << (max_k - k)
    return k


def reference_decompose(doc: Sequence[int], eot: int, min_k: int, max_k: int, randomize: bool,
                        seed: int = 0, file: int = 0, doc_index: int = 0):
    """Plain-Python rule for one document: ({k: [chunks]}, dropped tokens). For tests/docs."""
    seq = list(doc) + [eot]
    out: Dict[int, list] = {}
    c = 0
    while len(seq) > 1:
        k = (len(seq) - 1).bit_length() - 1
        if k < min_k:
            break
        if k > max_k:
            k = _draw(seed, file, doc_index, c, min_k, max_k) if randomize else max_k
        out.setdefault(k, []).append(seq[: (1 << k) + 1])
        seq = seq[(1 << k) + 1:]
        c += 1
    return out, len(seq)


# ----------------------------------------------------------------------------- input
def _lib():
    lib = load("decompose")
    if not getattr(lib, "_fl_typed", False):
        i64, u64, vp, i32 = ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_int
        lib.fl_dd_count.argtypes = [vp, vp, i64, i32, i32, i32, u64, u64, i64, i64, vp, i64, vp, i64, i32]
        lib.fl_dd_copy.argtypes = [vp, i64, vp, i64, i32, i32, i32, u64, u64, ctypes.c_int32, i64, i64, vp, vp, i64,
                                   vp, vp, i32]
        lib.fl_dd_gather.argtypes = [vp, i64, i64, vp, vp, i64, i32, i32]
        lib.fl_dd_memcpy.argtypes = [vp, i64, vp, i64, i32]
        lib.fl_dd_permute.argtypes = [i64, u64, i64, i64, vp]
        for f in (lib.fl_dd_count, lib.fl_dd_copy, lib.fl_dd_gather, lib.fl_dd_memcpy, lib.fl_dd_permute):
            f.restype = ctypes.c_int
        lib._fl_typed = True
    return lib


def _as_int32(values: np.ndarray, what: str) -> np.ndarray:
    if values.dtype == np.int32:
        return np.ascontiguousarray(values)
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{what}: token ids must be integers, got dtype {values.dtype}")
    if values.size and (values.min() < np.iinfo(np.int32).min or values.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{what}: token ids do not fit in int32")
    return values.astype(np.int32)


def _from_list_array(col, what: str):
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        raise ValueError(f"{what}: expected a list<int> column of token ids, got {col.type}")
    if not pa.types.is_integer(col.type.value_type):
        raise ValueError(f"{what}: token lists must hold integers, got {col.type.value_type}")
    if col.null_count:
        bad = int(np.flatnonzero(np.asarray(col.is_null()))[0])
        raise ValueError(f"{what}: document {bad} is null (use an empty list for an empty document)")
    values = col.values
    if values.null_count:
        raise ValueError(f"{what}: token lists contain null token ids")
    offsets = np.asarray(col.offsets).astype(np.int64)
    return _as_int32(values.to_numpy(zero_copy_only=False), what), offsets


def _meta_int(meta, key):
    if meta and key in meta:
        return int(meta[key])
    return None


def read_tokens(src, column: Optional[str] = None):
    """Load one token source -> (tokens int32, offsets int64 [n_docs + 1], meta dict).

    ``src``: a .parquet/.arrow/.feather/.ipc file with a list<int> column, an .npz with
    ``tokens`` and ``offsets``, a ``(tokens, offsets)`` pair, or a pyarrow Table/ListArray.
    ``meta`` holds ``vocab_size``/``eot_id`` when the file declares them (schema metadata
    ``fastload.vocab_size`` / ``fastload.eot_id``).

    >>> toks, offs, meta = read_tokens((np.arange(5, dtype=np.int32), np.array([0, 2, 5])))
    >>> offs.tolist()
    [0, 2, 5]
    """
    import pyarrow as pa

    meta: Dict[str, Optional[int]] = {"vocab_size": None, "eot_id": None}
    what = "input"
    if isinstance(src, tuple):
        if len(src) != 2:
            raise ValueError("input: a tuple input must be (tokens, offsets)")
        tokens, offsets = np.asarray(src[0]), np.asarray(src[1])
    elif isinstance(src, (pa.Array, pa.ChunkedArray)):
        tokens, offsets = _from_list_array(src, what)
    elif isinstance(src, pa.Table):
        return _from_table(src, column, what)
    elif isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        what = path
        if not os.path.isfile(path):
            raise ValueError(f"{path}: not a file")
        ext = os.path.splitext(path)[1].lower()
        try:
            if ext == ".npz":
                with np.load(path, allow_pickle=False) as z:
                    if "tokens" not in z or "offsets" not in z:
                        raise ValueError(f"{path}: an .npz token dataset needs arrays 'tokens' and 'offsets', "
                                         f"found {sorted(z.files)}")
                    tokens, offsets = z["tokens"], z["offsets"]
                    for key in ("vocab_size", "eot_id"):
                        if key in z:
                            meta[key] = int(z[key])
            elif ext == ".parquet":
                import pyarrow.parquet as pq

                return _from_table(pq.read_table(path, columns=[column] if column else None), column, path)
            elif ext in (".arrow", ".feather", ".ipc"):
                import pyarrow.feather as feather

                return _from_table(feather.read_table(path, columns=[column] if column else None,
                                                      memory_map=True), column, path)
            else:
                raise ValueError(f"{path}: not a token dataset (expected one of {', '.join(TOKEN_EXTS)})")
        except (pa.ArrowInvalid, pa.ArrowException, OSError, KeyError) as e:
            raise ValueError(f"{path}: not a readable token dataset ({e})") from e
    else:
        raise ValueError(f"input: unsupported type {type(src).__name__} (path, (tokens, offsets), pyarrow)")
    tokens = _as_int32(np.asarray(tokens).reshape(-1), what)
    offsets = np.asarray(offsets)
    if offsets.ndim != 1 or offsets.size < 1 or not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError(f"{what}: offsets must be a 1-D integer array of n_docs + 1 entries")
    offsets = offsets.astype(np.int64)
    _check_offsets(offsets, tokens.size, what)
    return tokens, offsets, meta


def _check_offsets(offsets: np.ndarray, n_tokens: int, what: str) -> None:
    if offsets[0] < 0 or offsets[-1] > n_tokens:
        raise ValueError(f"{what}: offsets must lie in [0, {n_tokens}], got [{offsets[0]}, {offsets[-1]}]")
    d = np.diff(offsets)
    if d.size and d.min() < 0:
        bad = int(np.argmax(d < 0))
        raise ValueError(f"{what}: offsets decrease at document {bad}")


def _from_table(table, column, what):
    import pyarrow as pa

    meta_raw = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    meta = {"vocab_size": _meta_int(meta_raw, "fastload.vocab_size"),
            "eot_id": _meta_int(meta_raw, "fastload.eot_id")}
    if column is None:
        cands = [f.name for f in table.schema
                 if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)]
        if not cands:
            raise ValueError(f"{what}: not a token dataset (no list<int> column; columns: {table.column_names})")
        if len(cands) > 1:
            raise ValueError(f"{what}: several list columns {cands}; pass column=")
        column = cands[0]
    elif column not in table.column_names:
        raise ValueError(f"{what}: no column {column!r} (columns: {table.column_names})")
    tokens, offsets = _from_list_array(table.column(column), f"{what} column {column!r}")
    _check_offsets(offsets, tokens.size, what)
    return tokens, offsets, meta


def _list_inputs(src) -> List:
    """Sources in a fixed order (their index is the ``file`` of the random stream)."""
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if os.path.isdir(path):
            files = sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                           if os.path.isfile(p) and p.lower().endswith(TOKEN_EXTS))
            if not files:
                raise ValueError(f"{path}: not a token dataset (no {'/'.join(TOKEN_EXTS)} files inside)")
            return files
        if not os.path.exists(path):
            raise ValueError(f"{path}: input path does not exist")
        return [path]
    if isinstance(src, list):
        if not src:
            raise ValueError("input: empty list of sources")
        return list(src)
    return [src]


def tokenize_folder(src: str, out: str, tokenizer: Optional[Callable] = None, pattern: str = "**/*.txt",
                    vocab_size: Optional[int] = None, eot_id: Optional[int] = None,
                    docs_per_file: int = 100_000, encoding: str = "utf-8") -> List[str]:
    """Tokenize every file matching ``pattern`` under ``src`` (one file = one document) into
    Parquet files ``out/tokens-00000.parquet``... (column ``tokens``: list<int32>).

    ``tokenizer(text) -> sequence of ints`` (a list, an array, or anything with
    ``input_ids``); None means byte-level: the UTF-8 bytes are the ids, vocabulary 257 with
    EOT 256 (no vocabulary file needed). With a custom tokenizer pass ``eot_id`` (and
    ``vocab_size`` to have ids checked). Both are stored in the schema metadata, where
    :func:`decompose` finds them.

    >>> import tempfile, pathlib
    >>> d = tempfile.mkdtemp(); pathlib.Path(d, "a.txt").write_text("hello")
    5
    >>> files = tokenize_folder(d, d + "/tok")
    >>> read_tokens(files[0])[0].tolist()
    [104, 101, 108, 108, 111]
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not os.path.isdir(src):
        raise ValueError(f"{src}: not a folder")
    paths = sorted(p for p in glob.glob(os.path.join(src, pattern), recursive=True) if os.path.isfile(p))
    if not paths:
        raise ValueError(f"{src}: no files match {pattern!r}")
    if tokenizer is None:
        vocab_size, eot_id = (BYTE_VOCAB if vocab_size is None else vocab_size), (BYTE_EOT if eot_id is None else eot_id)
    elif eot_id is None:
        raise ValueError("eot_id: required with a custom tokenizer (the id appended to every document)")
    os.makedirs(out, exist_ok=True)
    written = []
    meta = {"fastload.eot_id": str(eot_id)}
    if vocab_size is not None:
        meta["fastload.vocab_size"] = str(vocab_size)
    for part, s in enumerate(range(0, len(paths), docs_per_file)):
        docs = []
        for p in paths[s: s + docs_per_file]:
            if tokenizer is None:
                with open(p, "rb") as f:
                    docs.append(np.frombuffer(f.read(), dtype=np.uint8).astype(np.int32))
            else:
                with open(p, encoding=encoding, errors="replace") as f:
                    ids = tokenizer(f.read())
                ids = getattr(ids, "input_ids", ids)
                if isinstance(ids, dict):
                    ids = ids["input_ids"]
                docs.append(_as_int32(np.asarray(ids).reshape(-1), p))
        lens = np.array([len(d) for d in docs], dtype=np.int64)
        offsets = np.zeros(len(docs) + 1, dtype=np.int32 if lens.sum() < 2**31 else np.int64)
        np.cumsum(lens, out=offsets[1:])
        flat = np.concatenate(docs) if docs else np.zeros(0, np.int32)
        arr_t = pa.ListArray if offsets.dtype == np.int32 else pa.LargeListArray
        col = arr_t.from_arrays(pa.array(offsets), pa.array(flat, type=pa.int32()))
        table = pa.table({"tokens": col}).replace_schema_metadata(meta)
        path = os.path.join(out, f"tokens-{part:05d}.parquet")
        pq.write_table(table, path)
        written.append(path)
    return written


# ----------------------------------------------------------------------------- kernel driver
def _bucket_name(k: int) -> str:
    return f"bucket_{k:02d}.npy"


def _count(lib, tokens, offsets, n_docs, p, file_index, nthreads):
    nb = p["max_bucket"] - p["min_bucket"] + 1
    n_blocks = (n_docs + _BLOCK - 1) // _BLOCK
    counts = np.zeros((max(n_blocks, 1), nb), np.int64)
    dropped = np.zeros(max(n_blocks, 1), np.int64)
    st = lib.fl_dd_count(ptr(tokens), ptr(offsets), n_docs, p["min_bucket"], p["max_bucket"],
                         int(p["randomize"]), p["seed"] & _M64, file_index,
                         p["vocab_size"] or 0, _BLOCK, ptr(counts), counts.size, ptr(dropped), dropped.size,
                         nthreads)
    if st != 0:
        raise ValueError(f"{p['_what']}: {lib.fl_last_error().decode()}")
    return counts[:n_blocks], dropped[:n_blocks]


def _resolve_vocab(meta, p, what):
    vocab = p["vocab_size"] if p["vocab_size"] is not None else meta.get("vocab_size")
    eot = p["eot_id"] if p["eot_id"] is not None else meta.get("eot_id")
    if eot is None:
        raise ValueError(f"{what}: eot_id is not declared in the input; pass eot_id= (and vocab_size=)")
    if vocab is not None and not 0 <= eot < vocab:
        raise ValueError(f"eot_id {eot} outside the vocabulary [0, {vocab})")
    return vocab, eot


def _decompose_sources(sources: List, file_indices: List[int], out_dir: str, p: dict,
                       progress: bool = True) -> dict:
    """Two passes: count every source, allocate the buckets once, copy every source."""
    from .._progress import Progress

    lib = _lib()
    nthreads = p["num_threads"]
    min_k, max_k = p["min_bucket"], p["max_bucket"]
    nb = max_k - min_k + 1
    infos, all_counts, vocab, eot = [], [], None, None
    cached = []
    bar = Progress(2 * len(sources), desc="decompose", unit="file", enabled=progress)
    for src, fi in zip(sources, file_indices):
        what = src if isinstance(src, str) else "input"
        tokens, offsets, meta = read_tokens(src, p["column"])
        v, e = _resolve_vocab(meta, p, what)
        if vocab is None and eot is None:
            vocab, eot = v, e
        elif (v, e) != (vocab, eot):
            raise ValueError(f"{what}: vocab_size/eot_id {(v, e)} differ from the first input's {(vocab, eot)}")
        pp = dict(p, vocab_size=vocab, _what=what)
        n_docs = offsets.size - 1
        counts, dropped = _count(lib, tokens, offsets, n_docs, pp, fi, nthreads)
        lens = np.diff(offsets)
        infos.append({"path": os.path.abspath(src) if isinstance(src, str) else None, "file_index": fi,
                      "documents": int(n_docs), "tokens": int(lens.sum()),
                      "empty_documents": int((lens == 0).sum()),
                      "dropped_documents": int((lens < (1 << min_k)).sum()),
                      "dropped_tokens": int(dropped.sum()),
                      "rows": {str(k): int(counts[:, i].sum()) for i, k in enumerate(range(min_k, max_k + 1))}})
        all_counts.append(counts)
        # Keep in-memory sources (no re-read); files are re-read in the copy pass.
        cached.append((tokens, offsets) if not isinstance(src, str) else None)
        del tokens, offsets
        bar.update()
    totals = np.array([sum(int(c[:, i].sum()) for c in all_counts) for i in range(nb)], np.int64)
    os.makedirs(out_dir, exist_ok=True)
    arrays, ptrs = [], (ctypes.c_void_p * nb)()
    for i, k in enumerate(range(min_k, max_k + 1)):
        path = os.path.join(out_dir, _bucket_name(k))
        if totals[i] == 0:
            np.save(path, np.zeros((0, (1 << k) + 1), np.int32))
            arrays.append(None)
            ptrs[i] = None
        else:
            a = np.lib.format.open_memmap(path, mode="w+", dtype=np.int32, shape=(int(totals[i]), (1 << k) + 1))
            arrays.append(a)
            ptrs[i] = a.ctypes.data
    base = np.zeros(nb, np.int64)
    for j, (src, fi) in enumerate(zip(sources, file_indices)):
        if cached[j] is not None:
            tokens, offsets = cached[j]
        else:
            tokens, offsets, _ = read_tokens(src, p["column"])
        counts = all_counts[j]
        row_start = np.zeros_like(counts)
        if counts.shape[0]:
            row_start[1:] = np.cumsum(counts, axis=0)[:-1]
        row_start += base
        # The copy is checked against pass 1's counts and the buckets' capacities: a file
        # that changed in between is an error naming it, never a write past the buckets.
        st = lib.fl_dd_copy(ptr(tokens), tokens.size, ptr(offsets), offsets.size - 1, min_k, max_k,
                            int(p["randomize"]), p["seed"] & _M64, fi, eot, vocab or 0, _BLOCK, ptr(counts),
                            ptr(row_start), counts.shape[0], ctypes.cast(ptrs, ctypes.c_void_p), ptr(totals),
                            nthreads)
        if st != 0:
            what = src if isinstance(src, str) else "input"
            raise ValueError(f"{what}: {lib.fl_last_error().decode('utf-8', 'replace')}")
        base += counts.sum(axis=0)
        cached[j] = None
        bar.update()
    bar.close()
    if p.get("fsync"):
        # msync: the rows are on disk before the manifest / done marker is written (survives
        # a power loss). Without it they are in the page cache, visible to every reader and
        # written back by the kernel; a crashed process loses nothing. It costs the disk's
        # write time (2-3x the decomposition's own time on the benchmark machine).
        for a in arrays:
            if a is not None:
                a.flush()
    del arrays
    return {"vocab_size": vocab, "eot_id": eot, "inputs": infos,
            "rows": {str(k): int(totals[i]) for i, k in enumerate(range(min_k, max_k + 1))}}


def _manifest(p: dict, parts: List[Tuple[str, dict]], engine: str) -> dict:
    """parts: (folder relative to out, summary of _decompose_sources)."""
    min_k, max_k = p["min_bucket"], p["max_bucket"]
    inputs = [i for _, s in parts for i in s["inputs"]]
    buckets = {}
    for k in range(min_k, max_k + 1):
        files = [{"path": os.path.join(rel, _bucket_name(k)) if rel else _bucket_name(k), "rows": s["rows"][str(k)]}
                 for rel, s in parts]
        rows = sum(f["rows"] for f in files)
        buckets[str(k)] = {"length": 1 << k, "row_length": (1 << k) + 1, "rows": rows,
                           "tokens": rows * ((1 << k) + 1), "files": files}
    s0 = parts[0][1] if parts else {"vocab_size": p["vocab_size"], "eot_id": p["eot_id"]}
    return {
        "format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "engine": engine,
        "min_bucket": min_k, "max_bucket": max_k, "randomize": bool(p["randomize"]), "seed": p["seed"],
        "rng": "k = first k whose cumulative 2^(max-k) weight exceeds (H(seed,file,doc,chunk) * W) >> 64; "
               "H = nested splitmix64 (fastload/tokens/decompose.py)",
        "vocab_size": s0["vocab_size"], "eot_id": s0["eot_id"], "dtype": "int32",
        "documents": sum(i["documents"] for i in inputs),
        "input_tokens": sum(i["tokens"] for i in inputs),
        "empty_documents": sum(i["empty_documents"] for i in inputs),
        "dropped_documents": sum(i["dropped_documents"] for i in inputs),
        "dropped_tokens": sum(i["dropped_tokens"] for i in inputs),
        "buckets": buckets, "inputs": inputs,
    }


def _write_json(path: str, doc: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)  # atomic: a manifest/done marker exists only when complete


def load_manifest(path: str) -> dict:
    """Read and validate ``<path>/manifest.json`` of a decomposed dataset: every field a
    loader reads is checked for type and range, so a corrupt manifest is a
    :class:`CorruptDataError` naming it, never a KeyError/TypeError later."""
    mpath = os.path.join(path, "manifest.json")
    if not os.path.isfile(mpath):
        raise ValueError(f"{path}: not a decomposed dataset (no manifest.json; run fastload.decompose first)")
    try:
        with open(mpath, "rb") as f:
            m = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise CorruptDataError(mpath, f"cannot read ({e})") from e
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CorruptDataError(mpath, f"not valid JSON ({type(e).__name__})") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise CorruptDataError(mpath, f"not a {FORMAT_NAME} manifest")
    if m.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{mpath}: schema version {m.get('schema_version')} (this fastload reads {SCHEMA_VERSION})")
    _validate_manifest(m, mpath)
    return m


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate_manifest(m: dict, mpath: str) -> None:
    def bad(detail):
        raise CorruptDataError(mpath, detail)

    for key in ("min_bucket", "max_bucket"):
        if not _is_int(m.get(key)) or not 0 <= m[key] <= 30:
            bad(f"{key} must be an integer in [0, 30]")
    if m["min_bucket"] > m["max_bucket"]:
        bad("min_bucket > max_bucket")
    for key in ("vocab_size", "eot_id"):
        if m.get(key) is not None and (not _is_int(m[key]) or not 0 <= m[key] < 2**31):
            bad(f"{key} must be a non-negative integer")
    b = m.get("buckets")
    if not isinstance(b, dict):
        bad("buckets must be an object")
    for key, e in b.items():
        if not key.isdigit() or not m["min_bucket"] <= int(key) <= m["max_bucket"]:
            bad(f"bucket {key[:20]!r} outside [{m['min_bucket']}, {m['max_bucket']}]")
        if not isinstance(e, dict) or not _is_int(e.get("rows")) or e["rows"] < 0 or not isinstance(e.get("files"), list):
            bad(f"bucket {key}: needs integer rows >= 0 and a files list")
        total = 0
        for f in e["files"]:
            if not isinstance(f, dict) or not isinstance(f.get("path"), str) or not _is_int(f.get("rows")) or f["rows"] < 0:
                bad(f"bucket {key}: a file entry needs a path and integer rows >= 0")
            p = os.path.normpath(f["path"])
            if os.path.isabs(p) or p.split(os.sep)[0] == ".." or not p.endswith(".npy"):
                bad(f"bucket {key}: file {f['path'][:80]!r} must be a .npy path inside the dataset")
            total += f["rows"]
        if total != e["rows"]:
            bad(f"bucket {key}: files hold {total} rows, the bucket says {e['rows']}")


def open_bucket(path: str, k: int, rows: int) -> np.ndarray:
    """Map one bucket file read-only-on-disk (copy-on-write) after checking its header: int32,
    C order, [rows, 2^k + 1] and a file size that holds exactly that (no pickles ever)."""
    shape = (rows, (1 << k) + 1)
    if not rows:
        return np.zeros((0, shape[1]), np.int32)
    try:
        # "c" (copy-on-write) gives a writable view without ever writing the file, so
        # torch.from_numpy shares it without a warning.
        a = np.load(path, mmap_mode="c", allow_pickle=False)
    except Exception as e:  # the .npy header is parsed from untrusted bytes: any failure is corruption
        raise CorruptDataError(path, f"cannot map bucket file ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(a, np.ndarray) or a.dtype != np.int32 or a.shape != shape or not a.flags.c_contiguous:
        raise CorruptDataError(path, f"expected int32 C-order {list(shape)}, got {getattr(a, 'dtype', '?')} "
                                     f"{getattr(a, 'shape', '?')}")
    if a.offset + a.nbytes != os.path.getsize(path):
        raise CorruptDataError(path, f"{os.path.getsize(path)} bytes, the header announces {a.offset + a.nbytes}")
    return a


def _clear_output(out: str) -> None:
    """Remove only what a decomposition writes (manifest first, then buckets and shards):
    anything else in ``out`` (inputs included) is kept."""
    mpath = os.path.join(out, "manifest.json")
    if os.path.exists(mpath):
        os.remove(mpath)
    for f in glob.glob(os.path.join(out, "bucket_[0-9][0-9].npy")):
        os.remove(f)
    shutil.rmtree(os.path.join(out, "shards"), ignore_errors=True)


def decompose(src, out: str, min_bucket: int = 8, max_bucket: int = 13, randomize: bool = True, seed: int = 0,
              vocab_size: Optional[int] = None, eot_id: Optional[int] = None, column: Optional[str] = None,
              engine: str = "local", num_threads: int = 1, overwrite: bool = False,
              progress: bool = True, ray_num_cpus: Optional[int] = None, fsync: bool = False) -> dict:
    """Decompose tokenized documents into power-of-two length buckets; returns the manifest.

    ``engine="local"`` writes one array per bucket (two passes: count, then copy, so each
    array is written once); ``engine="ray"`` decomposes every input file in its own Ray task
    into ``out/shards/<file>/`` and skips files whose shard is already complete (resume).
    Both give the same rows (same random stream). ``fsync=True`` forces the bucket files to
    disk before the manifest is written (otherwise the kernel writes them back later).

    >>> import tempfile
    >>> toks = np.arange(300, dtype=np.int32) % 200
    >>> m = decompose((toks, np.array([0, 300])), tempfile.mkdtemp(), min_bucket=5, max_bucket=7,
    ...               vocab_size=257, eot_id=256, progress=False)
    >>> m["buckets"]["7"]["rows"], m["dropped_tokens"]
    (1, 8)
    """
    if not (isinstance(min_bucket, int) and isinstance(max_bucket, int)):
        raise ValueError("min_bucket and max_bucket must be integers")
    if min_bucket > max_bucket:
        raise ValueError(f"min_bucket ({min_bucket}) must be <= max_bucket ({max_bucket})")
    if min_bucket < 0 or max_bucket > 30:
        raise ValueError(f"buckets must lie in [0, 30], got [{min_bucket}, {max_bucket}]")
    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    if vocab_size is not None and vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    p = {"min_bucket": min_bucket, "max_bucket": max_bucket, "randomize": bool(randomize), "seed": int(seed),
         "vocab_size": vocab_size, "eot_id": eot_id, "column": column, "num_threads": max(1, int(num_threads)),
         "fsync": bool(fsync)}
    sources = _list_inputs(src)
    mpath = os.path.join(out, "manifest.json")
    if os.path.exists(mpath) and engine == "local":
        if not overwrite:
            raise ValueError(f"{out}: already holds a decomposed dataset (pass overwrite=True)")
        mine = {os.path.abspath(p) for p in glob.glob(os.path.join(out, "bucket_[0-9][0-9].npy"))}
        shards = os.path.abspath(os.path.join(out, "shards")) + os.sep
        for s in sources:
            if isinstance(s, str) and (os.path.abspath(s) in mine or os.path.abspath(s).startswith(shards)):
                raise ValueError(f"{s}: this input is part of the output being overwritten in {out}")
        _clear_output(out)
    if engine == "local":
        summary = _decompose_sources(sources, list(range(len(sources))), out, p, progress)
        m = _manifest(p, [("", summary)], "local")
    else:
        if not all(isinstance(s, str) for s in sources):
            raise ValueError("engine='ray' needs input files (a path or a folder)")
        m = _decompose_ray(sources, out, p, progress, ray_num_cpus)
    _write_json(mpath, m)
    return m


# ----------------------------------------------------------------------------- ray engine
def _shard_params(p: dict) -> dict:
    return {k: p[k] for k in ("min_bucket", "max_bucket", "randomize", "seed", "vocab_size", "eot_id", "column")}


def _shard_task(path: str, file_index: int, shard_dir: str, p: dict) -> dict:
    """One input file -> its own per-bucket shard folder, marked complete by done.json."""
    if os.path.isdir(shard_dir):
        shutil.rmtree(shard_dir)  # a partial shard from an interrupted run
    summary = _decompose_sources([path], [file_index], shard_dir, p, progress=False)
    st = os.stat(path)
    done = {"input": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "params": _shard_params(p), "summary": summary}
    _write_json(os.path.join(shard_dir, "done.json"), done)
    return done


def _shard_complete(path: str, shard_dir: str, p: dict) -> Optional[dict]:
    try:
        with open(os.path.join(shard_dir, "done.json")) as f:
            done = json.load(f)
    except (OSError, ValueError):
        return None
    st = os.stat(path)
    if (done.get("input") != os.path.abspath(path) or done.get("size") != st.st_size
            or done.get("mtime_ns") != st.st_mtime_ns or done.get("params") != _shard_params(p)):
        return None
    return done


def _decompose_ray(files: List[str], out: str, p: dict, progress: bool, num_cpus: Optional[int]) -> dict:
    import ray  # only this engine needs ray

    from .._progress import Progress

    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    task = ray.remote(num_cpus=1)(_shard_task)
    os.makedirs(os.path.join(out, "shards"), exist_ok=True)
    results: Dict[int, dict] = {}
    pending, skipped = {}, []
    for i, f in enumerate(files):
        shard_dir = os.path.join(out, "shards", f"{i:05d}")
        done = _shard_complete(f, shard_dir, p)
        if done is not None:
            results[i] = done  # resume: finished inputs are skipped
            skipped.append(i)
        else:
            pending[task.remote(f, i, shard_dir, dict(p, num_threads=1))] = i
    bar = Progress(len(files), desc="decompose (ray)", unit="file", enabled=progress)
    bar.update(len(results))
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            results[pending.pop(ref)] = ray.get(ref)
            bar.update()
    bar.close()
    parts = [(os.path.join("shards", f"{i:05d}"), results[i]["summary"]) for i in range(len(files))]
    vocab = {(s["vocab_size"], s["eot_id"]) for _, s in parts}
    if len(vocab) > 1:
        raise ValueError(f"inputs disagree on vocab_size/eot_id: {sorted(vocab)}")
    m = _manifest(p, parts, "ray")
    m["resumed_inputs"] = skipped  # inputs whose shard was complete before this run
    return m


# ----------------------------------------------------------------------------- CLI
def _summary_text(m: dict) -> str:
    lines = [f"{'bucket':>6} {'length':>7} {'rows':>10} {'tokens':>14}"]
    for k, b in m["buckets"].items():
        lines.append(f"{k:>6} {b['length']:>7} {b['rows']:>10,} {b['rows'] * b['length']:>14,}")
    total = m["input_tokens"] + m["documents"]
    lines.append(f"documents {m['documents']:,} (empty {m['empty_documents']:,}, no chunk {m['dropped_documents']:,}); "
                 f"tokens incl. EOT {total:,}; dropped {m['dropped_tokens']:,} "
                 f"({100 * m['dropped_tokens'] / max(total, 1):.2f}%)")
    return "\n".join(lines)


def main(argv=None) -> int:
    from fastload._cli import DefaultsFormatter, describe

    ap = argparse.ArgumentParser(prog="fastload decompose", description=describe(__doc__),
                                 formatter_class=DefaultsFormatter)
    ap.add_argument("input", help="token dataset: .parquet/.arrow/.npz file or a folder of them "
                                  "(or a folder of text files with --text)")
    ap.add_argument("out_positional", nargs="?", default=None, metavar="OUT",
                    help="output folder (older form; prefer --out, as the other commands)")
    ap.add_argument("--out", default=None, metavar="DIR", help="output folder")
    ap.add_argument("--min-bucket", type=int, default=8, help="shortest chunk length, as a power of two (8: 256 tokens)")
    ap.add_argument("--max-bucket", type=int, default=13, help="longest chunk length, as a power of two (13: 8192 tokens)")
    ap.add_argument("--no-randomize", action="store_true", help="cut long documents at max length, no draw")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random cut of long documents")
    ap.add_argument("--vocab-size", type=int, default=None, help="token ids are checked against it (default: the input's metadata)")
    ap.add_argument("--eot-id", type=int, default=None, help="end-of-text id appended to every document (default: the input's metadata)")
    ap.add_argument("--column", default=None, help="column holding the token lists (default: the only list column)")
    ap.add_argument("--engine", choices=["local", "ray"], default="local", help="decompose here, or one Ray task per input file")
    ap.add_argument("--threads", type=int, default=1, help="native threads of the local engine")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    ap.add_argument("--fsync", action="store_true", help="force the bucket files to disk before the manifest")
    ap.add_argument("--text", default=None, metavar="GLOB",
                    help="input is a folder of text files matching GLOB: tokenize byte-level first")
    a = ap.parse_args(argv)
    if a.out_positional is not None:
        if a.out is not None:
            ap.error("give the output folder once: --out DIR")
        print("fastload decompose: note: a positional OUT is deprecated; use --out OUT", file=sys.stderr)
        a.out = a.out_positional
    if a.out is None:
        ap.error("the output folder is required: fastload decompose INPUT --out DIR")
    src, tmp = a.input, None
    try:
        if a.text:
            # tokens go to a fresh folder removed afterwards: never one the output owns (an
            # overwrite used to delete them before they were read), never stale files
            os.makedirs(a.out, exist_ok=True)
            tmp = src = tempfile.mkdtemp(prefix="_tokens-", dir=a.out)
            tokenize_folder(a.input, src, pattern=a.text)
        m = decompose(src, a.out, a.min_bucket, a.max_bucket, not a.no_randomize, a.seed, a.vocab_size,
                      a.eot_id, a.column, a.engine, a.threads, a.overwrite, fsync=a.fsync)
    except ValueError as e:
        from fastload._cli import flag_error

        return flag_error("fastload decompose", e, ap)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    rows = sum(b["rows"] for b in m["buckets"].values())
    if rows == 0:
        # an empty dataset is no result: say why and keep nothing
        shutil.rmtree(a.out, ignore_errors=True)
        shortest = 2 ** a.min_bucket
        print(f"fastload decompose: error: every one of the {m['documents']:,} documents was dropped "
              f"(none reaches the shortest chunk, 2**{a.min_bucket} = {shortest} tokens with its end-of-text "
              f"token); lower --min-bucket; nothing was written to {a.out}", file=sys.stderr)
        return 2
    print(_summary_text(m))
    return 0
