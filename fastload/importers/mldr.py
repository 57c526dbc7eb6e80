"""Import apple/ml-dr reinforcements (ImageNet+, CIFAR-100+, ... as published) into the
reinforced format, joined with the user's own copy of the images.

The archives (``reinforced_data.tar``, ``.tar.gz`` or the extracted folder) hold
``reinforced_data/{id}.pth.tar`` (``torch.save((id, samples), pickle_protocol=4)``) or
``{id}.jb`` (``joblib.dump(..., compress=True)``) per image, and ``config.pth.tar`` (the
reinforcement config: transforms, ``num_samples``, ``topk``). ``samples`` is a list of
``{"params": ..., "prob": (top-k probabilities, top-k class ids)}``; ``params`` is ml-dr's
compressed list (``reinforce.compress: true``, the published archives) or its dict. ``id``
is the index into torchvision's ``ImageFolder`` of the training folder (sorted class
folders, then sorted files), which is how the images are joined here.

Safety: nothing is unpickled with arbitrary globals. ``.pth.tar`` is tried with
``torch.load(weights_only=True)``; torch's weights-only unpickler rejects the protocol-4
FRAME opcode every ml-dr sample file uses (measured on torch 2.13: "Unsupported operand
149"), so those, and ``.jb`` files, go through :class:`SafeUnpickler`, which admits only
containers, numbers, strings, bytes and numpy arrays/scalars (joblib's inline array format
included, read without importing joblib). Everything else raises
:class:`UnsafePickleError` before any constructor runs. No admitted constructor allocates by
argument (``bytearray`` from bytes only, ``numpy.ndarray`` never called, ``_reconstruct``
only with numpy's empty placeholder: an array's size comes with its bytes). Every read is
bounded, the config copied into the manifest too (values and depth, shared references
counted as expanded), files are told apart by content (a joblib file named ``.pth.tar``
imports), error messages carry no byte of a file, and a compressed tar's own check (gzip's
CRC-32 and length) is verified.

Streaming: tar archives are read member by member (``r|*``, no extraction, no seeking);
converted records are staged per output shard under ``out/.mldr-staging`` and a shard is
written once all its ids arrived, so memory stays bounded whatever the archive order. An
interrupted import resumes: finished shards (listed in the manifest) are kept and their ids
skipped; the staging is rebuilt.

Lossless: see ``fastload.sample.params`` (schema v2 extension records) for the partner's own
RandAugment and erasing, ml-dr's black erasing before Normalize, float magnitudes, exact
MixUp/CutMix lambdas and empty CutMix boxes. Targets are stored as fastload stores every
target (ids + fp16 probabilities); :func:`fastload.losses.densify` with ``mode="mldr"``
(ml-dr's default ``densify: zeros``) or ``"mldr_smooth"`` turns them into ml-dr's dense
targets.
"""
from __future__ import annotations

import argparse
import bz2
import dataclasses
import functools
import hashlib
import io
import lzma
import math
import os
import pickle
import re
import shutil
import struct
import sys
import tarfile
import zipfile
import zlib
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from fastload.sample import params as P
from fastload.errors import UnsafePickleError

MAX_FILE = 64 << 20  # no reinforcement file (compressed or not) may claim more
# The config copied into the manifest: shared references (a pickle's memo) could make a
# ~2 KB file expand to billions of nodes ("billion laughs"), so the copy is bounded.
MAX_CONFIG_NODES = 100_000
MAX_CONFIG_DEPTH = 32
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's

# ml-dr's composition order (dr/transforms.py) and the transforms without random parameters
TRANSFORM_ORDER = ("uint8", "resize", "center_crop", "random_crop", "random_resized_crop",
                   "random_horizontal_flip", "rand_augment", "to_tensor", "random_erase", "normalize",
                   "mixup", "cutmix")
NO_PARAM = frozenset({"uint8", "center_crop", "to_tensor", "normalize"})
SUPPORTED = frozenset({"uint8", "random_resized_crop", "random_horizontal_flip", "rand_augment", "to_tensor",
                       "random_erase", "normalize", "mixup", "cutmix"})
_NAME = re.compile(r"^(\d+)\.(pth\.tar|jb)$")


# ---------------------------------------------------------------------------------------
# safe loading


class _JoblibArray:
    """Stand-in for joblib's ``NumpyArrayWrapper``: its pickled state says what raw array
    bytes follow in the stream; :meth:`read` takes them."""

    _KEYS = {"subclass", "shape", "order", "dtype", "allow_mmap", "numpy_array_alignment_bytes"}

    def __setstate__(self, state):
        if not isinstance(state, dict) or not set(state) <= self._KEYS or not {"shape", "dtype"} <= set(state):
            raise UnsafePickleError(f"joblib array header with unexpected fields {sorted(state)[:8]}")
        self.state = state

    def read(self, read, where: str) -> np.ndarray:
        st = self.state
        dtype, shape = st["dtype"], st["shape"]
        if not isinstance(dtype, np.dtype) or dtype.hasobject:
            raise UnsafePickleError(f"{where}: joblib array of dtype {dtype!r} (object arrays are refused)")
        if st.get("subclass", np.ndarray) not in (np.ndarray, _ndarray_ctor):
            raise UnsafePickleError(f"{where}: joblib array subclass {st.get('subclass')!r} is refused")
        if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise pickle.UnpicklingError(f"{where}: joblib array shape {shape!r}")
        nbytes = math.prod(shape) * dtype.itemsize  # Python ints: a forged shape cannot overflow
        if nbytes > MAX_FILE:
            raise pickle.UnpicklingError(f"{where}: joblib array of {nbytes} bytes over the {MAX_FILE} limit")
        align = st.get("numpy_array_alignment_bytes")
        if align is not None:
            pad = read(1)
            if len(pad) != 1 or pad[0] > int(align):
                raise pickle.UnpicklingError(f"{where}: corrupt joblib array padding")
            if pad[0] and len(read(pad[0])) != pad[0]:
                raise pickle.UnpicklingError(f"{where}: truncated joblib array padding")
        data = read(nbytes) if nbytes else b""
        if len(data) != nbytes:
            raise pickle.UnpicklingError(f"{where}: truncated joblib array ({len(data)} of {nbytes} bytes)")
        arr = np.frombuffer(data, dtype).copy()
        if st.get("order") == "F":
            return arr.reshape(shape[::-1]).T
        return arr.reshape(shape)


def _np_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError(f"numpy scalar of dtype {dtype!r} is refused")
    if len(data) != dtype.itemsize:
        raise pickle.UnpicklingError("corrupt numpy scalar")
    return np.frombuffer(bytes(data), dtype)[0]


def _ndarray_ctor(*args, **kwargs):
    """What ``numpy.ndarray`` resolves to: usable only as ``_reconstruct``'s class argument.
    Called, it would allocate a shape given by the pickle (not by bytes present): refused."""
    raise UnsafePickleError("the numpy.ndarray constructor is refused (it allocates by argument)")


def _np_reconstruct(cls, shape, typecode):
    if cls is not _ndarray_ctor and cls is not np.ndarray:
        raise UnsafePickleError(f"numpy array subclass {cls!r} is refused")
    # numpy pickles an array as an empty placeholder (shape (0,)) whose __setstate__ then
    # brings the shape with its bytes (numpy checks they match): any other placeholder shape
    # would allocate memory no byte of the file pays for.
    if not isinstance(shape, tuple) or len(shape) > 32 or not all(isinstance(d, int) and 0 <= d for d in shape) \
            or math.prod(shape) != 0:
        raise UnsafePickleError(f"numpy array placeholder of shape {shape!r} is refused (numpy writes an "
                                "empty one; another would allocate by argument)")
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    return _reconstruct(np.ndarray, shape, typecode)


def _bytearray(*args):
    """``bytearray`` from bytes present in the file only (``bytearray(n)`` would allocate n)."""
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytearray(args[0])
    if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):  # protocol 2
        return bytearray(args[0], "latin-1")
    if not args:
        return bytearray()
    raise UnsafePickleError("bytearray(size or iterable) is refused (it allocates by argument; "
                            "bytearray is admitted from bytes only)")


def _latin1(s, encoding="latin1"):  # protocol 2 pickles bytes as _codecs.encode(str, "latin1")
    if not isinstance(s, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("_codecs.encode is admitted for latin-1 bytes only")
    return s.encode("latin-1")


_ALLOWED = {
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "complex"): complex,
    ("builtins", "bytearray"): _bytearray, ("collections", "OrderedDict"): dict,
    ("_codecs", "encode"): _latin1,
    ("numpy", "ndarray"): _ndarray_ctor, ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): _np_scalar, ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("joblib.numpy_pickle", "NumpyArrayWrapper"): _JoblibArray,
}
# protocol 2 names the builtins module as Python 2 did
_ALLOWED.update({("__builtin__", n): f for (m, n), f in list(_ALLOWED.items()) if m == "builtins"})


def _find(module: str, name: str, where: str):
    got = _ALLOWED.get((module, name))
    if got is None and module in ("numpy.dtypes",) and name.endswith("DType") and name != "ObjectDType":
        got = getattr(np.dtypes, name, None)  # numpy 2 pickles some dtypes by their class
    if got is None:
        raise UnsafePickleError(f"{where}: refuses to load global {module}.{name} "
                                "(only containers, numbers, strings and numpy arrays are admitted)")
    return got


class SafeUnpickler(pickle._Unpickler):
    """A pure-Python unpickler (its dispatch table can take joblib's inline arrays) that
    admits only the globals in the allow-list.

    Example:
        >>> import io, pickle
        >>> SafeUnpickler(io.BytesIO(pickle.dumps((1, [2.5, "x"])))).load()
        (1, [2.5, 'x'])
    """

    def __init__(self, file, where: str = "pickle"):
        super().__init__(file)
        self.where = where

    def find_class(self, module, name):
        return _find(module, name, self.where)

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.where}: holds persistent objects (tensor storages), which the "
                                "importer does not read")

    def _load_build(self):
        pickle._Unpickler.load_build(self)
        top = self.stack[-1]
        if isinstance(top, _JoblibArray):
            self.stack[-1] = top.read(self.read, self.where)

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = _load_build


class _FastSafeUnpickler(pickle.Unpickler):
    """The C unpickler with the same allow-list (for ``data.pkl`` of ``.pth.tar``: no
    joblib arrays there, and about 10x faster)."""

    def __init__(self, file, where: str):
        super().__init__(file)
        self.where = where

    def find_class(self, module, name):
        if (module, name) == ("joblib.numpy_pickle", "NumpyArrayWrapper"):
            raise UnsafePickleError(f"{self.where}: joblib array inside a torch file")
        return _find(module, name, self.where)

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.where}: holds tensor storages, which the importer does not read")


def _bounded(dec, data: bytes, where: str) -> bytes:
    out = dec(data, MAX_FILE + 1)
    if len(out) > MAX_FILE:
        raise ValueError(f"{where}: decompresses to more than {MAX_FILE} bytes")
    return out


def _decompress_joblib(data: bytes, where: str) -> bytes:
    """joblib's compressors, told apart by their magic bytes (as joblib does)."""
    if data[:1] == b"\x80":
        return data  # uncompressed pickle
    try:
        if data[:1] == b"\x78":
            d = zlib.decompressobj()
            return _bounded(d.decompress, data, where)
        if data[:2] == b"\x1f\x8b":
            d = zlib.decompressobj(wbits=31)
            return _bounded(d.decompress, data, where)
        if data[:3] == b"BZh":
            d = bz2.BZ2Decompressor()
            return _bounded(lambda b, n: d.decompress(b, max_length=n), data, where)
        if data[:6] == b"\xfd7zXZ\x00" or data[:3] == b"\x5d\x00\x00":
            d = lzma.LZMADecompressor()
            return _bounded(lambda b, n: d.decompress(b, max_length=n), data, where)
    except (zlib.error, OSError, EOFError, lzma.LZMAError) as e:
        raise ValueError(f"{where}: corrupt compressed joblib file ({type(e).__name__})") from e
    # no byte of the file in the message: it may be a link to a file the user did not mean to show
    raise ValueError(f"{where}: not a joblib file (unknown compression magic; lz4 is not supported)")


def load_jb(data: bytes, where: str = ".jb") -> Any:
    """Load a joblib file's bytes with :class:`SafeUnpickler`."""
    return _unpickle(SafeUnpickler, _decompress_joblib(bytes(data), where), where, "joblib pickle")


def _unpickle(cls, raw: bytes, where: str, what: str) -> Any:
    """``cls(raw).load()`` (an allow-list unpickler); a malformed pickle is a ValueError naming
    ``where``, a refused global stays an UnsafePickleError."""
    try:
        return cls(io.BytesIO(raw), where).load()
    except UnsafePickleError as e:
        if where in str(e):
            raise
        raise UnsafePickleError(f"{where}: {e}") from e
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, struct.error, MemoryError, RecursionError) as e:
        raise ValueError(f"{where}: corrupt {what} ({_no_content(e, where)})") from e


def _no_content(e: BaseException, where: str) -> str:
    """An exception's text without bytes of the file: the unpickler's own messages quote them
    ("invalid load key, 'S'"), ours name ``where`` and never do."""
    msg = str(e)
    return msg if where in msg else type(e).__name__


def _torch_numpy_globals() -> list:
    """The numpy entries torch's weights-only unpickler needs for numpy scalars (ml-dr's
    CutMix boxes are numpy ints) and arrays: the same checked wrappers as the allow-list
    (named as numpy's, which is how pickles refer to them) and dtypes, nothing else.
    ``numpy.ndarray`` resolves to the refusing constructor; the real class is registered under
    a name no GLOBAL opcode can spell (a newline), only so that BUILD may set an array's state."""
    g = [(f, f"{mod}.{name}") for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
         for name, f in (("scalar", _np_scalar), ("_reconstruct", _np_reconstruct))]
    g += [(_ndarray_ctor, "numpy.ndarray"), (np.ndarray, "numpy.ndarray\nBUILD only"), np.dtype]
    dts = getattr(np, "dtypes", None)
    if dts is not None:
        g += [getattr(dts, n) for n in dir(dts) if n.endswith("DType") and n != "ObjectDType"]
    return g


def _refuse_torch_default_allocators(pkl: bytes, where: str, exact: bool) -> None:
    """torch's weights-only unpickler admits ``bytearray`` by default (before any global we
    add), and ``bytearray(n)`` allocates n bytes that the file does not hold. ml-dr files never
    hold a bytearray: refuse the global before torch runs. ``exact``: ``pkl`` is one pickle
    (the zip's data.pkl), scanned opcode by opcode; otherwise (torch's legacy format, several
    pickles and raw storages) any occurrence of the name is refused."""
    import pickletools

    if not exact:
        if b"bytearray" in pkl:
            raise UnsafePickleError(f"{where}: a legacy torch file naming bytearray is refused "
                                    "(bytearray(n) allocates by argument)")
        return
    try:
        for op, arg, _ in pickletools.genops(pkl):
            if op.name == "GLOBAL" and isinstance(arg, str) and arg.split(" ")[-1] == "bytearray":
                raise UnsafePickleError(f"{where}: bytearray is refused in a torch file (bytearray(n) "
                                        "allocates by argument)")
            if op.name == "STOP":
                break
    except UnsafePickleError:
        raise
    except Exception as e:  # let torch report the malformed pickle in its own words (bounded)
        if isinstance(e, (MemoryError, RecursionError)):
            raise ValueError(f"{where}: corrupt pickle ({type(e).__name__})") from e


def load_pth(data: bytes, where: str = ".pth.tar") -> Any:
    """Load a ``torch.save`` file's bytes: ``torch.load(weights_only=True)``, or, for the
    pickle protocols torch's weights-only unpickler rejects, the same allow-list here."""
    import torch

    bio = io.BytesIO(bytes(data))
    pkl = None
    if zipfile.is_zipfile(bio):
        try:
            zf = zipfile.ZipFile(bio)
            names = [i for i in zf.infolist() if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
            if len(names) != 1:
                raise ValueError(f"{where}: a torch zip file needs one data.pkl, found {len(names)}")
            if names[0].file_size > MAX_FILE:
                raise ValueError(f"{where}: data.pkl claims {names[0].file_size} bytes")
            with zf.open(names[0]) as f:
                pkl = f.read(MAX_FILE + 1)
        except zipfile.BadZipFile as e:
            raise ValueError(f"{where}: corrupt torch zip file ({e})") from e
    if pkl is not None and pkl[:2] in (b"\x80\x04", b"\x80\x05"):
        return _unpickle(_FastSafeUnpickler, pkl, where, "pickle")
    _refuse_torch_default_allocators(pkl if pkl is not None else bytes(data), where, exact=pkl is not None)
    bio.seek(0)
    try:
        with torch.serialization.safe_globals(_torch_numpy_globals()):
            return torch.load(bio, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(f"{where}: torch.load(weights_only=True) refused it "
                                f"({_no_content(e, where).splitlines()[0]})") from e
    except (RuntimeError, EOFError, ValueError, TypeError, MemoryError, RecursionError) as e:
        raise ValueError(f"{where}: not a readable torch file ({type(e).__name__})") from e


# ---------------------------------------------------------------------------------------
# the archive


def _member_id(name: str) -> Optional[Tuple[int, str]]:
    m = _NAME.match(os.path.basename(name))
    return (int(m.group(1)), m.group(2)) if m else None


def _read_member(tf: tarfile.TarFile, m: tarfile.TarInfo, where: str) -> bytes:
    if m.size > MAX_FILE:
        raise ValueError(f"{where}: member {m.name!r} is {m.size} bytes, over the {MAX_FILE} limit")
    f = tf.extractfile(m)
    data = f.read(m.size) if f is not None else b""
    if len(data) != m.size:
        raise ValueError(f"{where}: member {m.name!r} is truncated")
    return data


# torch.save's legacy (non-zip) format opens with a pickle of its magic number
_TORCH_LEGACY = b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def _load(kind: str, data: bytes, where: str):
    """A reinforcement file by its content, not its name: ml-dr's ``joblib: true`` writes
    joblib files named ``.pth.tar``. A zip or torch's legacy magic is a torch file; anything
    else (joblib's compressors, or a plain pickle) is read as joblib."""
    if data[:4] == b"PK\x03\x04" or (data[:1] == b"\x80" and data[2:14] == _TORCH_LEGACY):
        return load_pth(data, where)
    return load_jb(data, where)


@dataclasses.dataclass(frozen=True)
class _Raw:
    """An archive member not yet decoded: its kind (``pth.tar``/``jb``), bytes and name."""
    kind: str
    data: bytes
    where: str


def iter_archive(archive: str, raw: bool = False) -> Iterator[Tuple[str, Any]]:
    """Yield ``("config", cfg)`` and ``(id, (id, samples))`` in archive order, streaming.
    ``raw``: members are yielded undecoded, as ``(id, _Raw(kind, bytes, where))`` (the
    import decodes them per shard, possibly in another process); the config is decoded."""
    load = (lambda kind, data, where: _Raw(kind, data, where)) if raw else _load
    if os.path.isdir(archive):
        root = os.path.join(archive, "reinforced_data")
        root = root if os.path.isdir(root) else archive
        with os.scandir(root) as it:
            names = sorted(e.name for e in it if e.is_file())
        for name in names:
            where = os.path.join(root, name)
            if name == "config.pth.tar":
                with open(where, "rb") as f:
                    yield "config", _load("pth.tar", f.read(MAX_FILE + 1), where)
                continue
            mid = _member_id(name)
            if mid is None:
                continue
            if os.path.getsize(where) > MAX_FILE:
                raise ValueError(f"{where}: over the {MAX_FILE} byte limit")
            with open(where, "rb") as f:
                yield mid[0], load(mid[1], f.read(), where)
        return
    raw = open(archive, "rb")
    stream = _CheckedStream(raw, archive)
    try:
        tf = tarfile.open(fileobj=stream, mode="r|")
    except (tarfile.TarError, OSError, ValueError) as e:
        raw.close()
        raise ValueError(f"{archive}: not a readable tar(.gz) archive or folder ({type(e).__name__}: "
                         f"{_no_content(e, archive)})") from e
    with raw, tf:
        try:
            for m in tf:
                if not m.isfile():
                    continue
                where = f"{archive}:{m.name}"
                if os.path.basename(m.name) == "config.pth.tar":
                    yield "config", _load("pth.tar", _read_member(tf, m, archive), where)
                    continue
                mid = _member_id(m.name)
                if mid is None:
                    continue
                yield mid[0], load(mid[1], _read_member(tf, m, archive), where)
            # tarfile stops at the end-of-archive blocks; the compressed stream's trailer
            # (gzip's CRC-32 and length) comes after them: read to the end so it is checked.
            stream.drain()
        except (tarfile.TarError, zlib.error, EOFError, OSError, lzma.LZMAError) as e:
            raise ValueError(f"{archive}: corrupt or truncated archive ({type(e).__name__}: "
                             f"{_no_content(e, archive)})") from e


_ZLIB = type(zlib.decompressobj())


class _CheckedStream:
    """A tar archive's bytes, decompressed (gzip, bzip2, xz or none, told by magic) with the
    format's own integrity check: gzip's CRC-32 and length trailer, which tarfile's stream
    mode never verifies (it inflates raw deflate and ignores the trailer). A mismatch, or a
    stream that ends before its trailer, is an ``OSError`` naming the archive."""

    def __init__(self, f, where: str):
        self.f, self.where = f, where
        head = f.read(6)
        self.pending = head
        if head[:2] == b"\x1f\x8b":
            self.kind, self.new = "gzip", lambda: zlib.decompressobj(wbits=31)
        elif head[:3] == b"BZh":
            self.kind, self.new = "bzip2", bz2.BZ2Decompressor
        elif head[:6] == b"\xfd7zXZ\x00":
            self.kind, self.new = "xz", lzma.LZMADecompressor
        else:
            self.kind, self.new = None, None
        self.d = self.new() if self.new else None
        self.buf = b""
        self.done = False

    def _more(self) -> None:
        d = self.d
        if d is None:
            chunk = self.pending or self.f.read(1 << 20)
            self.pending = b""
            self.buf += chunk
            self.done = not chunk
            return
        limit = 1 << 22  # bounded output per step: a bomb costs no more memory than a chunk
        try:
            if not isinstance(d, _ZLIB) and not d.eof and not d.needs_input:
                self.buf += d.decompress(b"", limit)  # output left from the last step
                return
            chunk = self.pending or self.f.read(1 << 20)
            self.pending = b""
            if d.eof:
                if chunk.strip(b"\x00"):  # another member after the first (gzip allows it)
                    self.d = d = self.new()
                else:
                    self.done = not chunk
                    return
            if not chunk:
                raise OSError(f"{self.where}: the {self.kind} stream ends before its trailer (truncated)")
            self.buf += d.decompress(chunk, limit)
            if isinstance(d, _ZLIB):
                self.pending = d.unconsumed_tail
            if d.eof and d.unused_data:
                self.pending = d.unused_data + self.pending
        except zlib.error as e:
            raise OSError(f"{self.where}: corrupt {self.kind} data ({e}; a wrong CRC-32 or length in "
                          "the trailer is reported here)") from e
        except (EOFError, lzma.LZMAError) as e:
            raise OSError(f"{self.where}: corrupt {self.kind} data ({type(e).__name__})") from e

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            while not self.done:
                self._more()
            out, self.buf = self.buf, b""
            return out
        while len(self.buf) < n and not self.done:
            self._more()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def drain(self) -> None:
        while not self.done:
            self._more()
            self.buf = b""


def read_config(archive: str) -> Dict[str, Any]:
    """The archive's ``config.pth.tar`` (streams up to it)."""
    for key, val in iter_archive(archive):
        if key == "config":
            if not isinstance(val, dict) or not isinstance(val.get("reinforce"), dict):
                raise ValueError(f"{archive}: config.pth.tar has no 'reinforce' section")
            return val
    raise ValueError(f"{archive}: no config.pth.tar found")


# ---------------------------------------------------------------------------------------
# ml-dr parameters -> records

@functools.lru_cache(maxsize=256)
def _table(op: str, num_bins: int, h: int, w: int) -> Optional[np.ndarray]:
    """torchvision's magnitude table of ``op`` for an h x w image (float32, as ml-dr read it)."""
    from fastload.replay.reference_ra import magnitude_table

    t = magnitude_table(op, num_bins, h, w)
    return None if t is None else t.float().numpy()


def ra_fields(ops, size: Tuple[int, int], num_bins: int, where: str):
    """ml-dr RandAugment params ``[(op name or index, float magnitude), ...]`` (or None)
    -> (ra_ops, ra_mags, ra_vals, off_grid): the bins where a value is exactly a table entry
    at ``size`` (the crop it was drawn on), else the nearest bin and ``off_grid`` (the
    record then needs ``EXT_RA_FLOAT``). Integer (non-float) magnitudes are bins."""
    o = np.full(P.MAX_RA, P.RA_NONE, np.uint8)
    m = np.zeros(P.MAX_RA, np.int8)
    v = np.zeros(P.MAX_RA, np.float32)
    off_grid = False
    if ops is None:
        return o, m, v, off_grid
    if len(ops) > P.MAX_RA:
        raise ValueError(f"{where}: {len(ops)} RandAugment ops, the record holds {P.MAX_RA}")
    for s, op in enumerate(ops):
        try:
            name, raw = op[0], op[1]
            mag = float(raw)
        except (TypeError, ValueError, IndexError) as e:
            raise ValueError(f"{where}: RandAugment op {op!r} is not (op, magnitude)") from e
        hit = _RA_SEEN.get((name, type(raw), raw, size, num_bins))
        if hit is not None:  # archives repeat a few dozen (op, magnitude) pairs
            o[s], m[s], v[s], off = hit
            off_grid |= off
            continue
        if isinstance(name, (int, np.integer)) and not isinstance(name, bool) and 0 <= int(name) < len(P.RA_OPS):
            name = P.RA_OPS[int(name)]
        if name not in P.RA_OPS:
            raise ValueError(f"{where}: unknown RandAugment op {op[0]!r}")
        if not np.isfinite(mag):
            raise ValueError(f"{where}: non-finite RandAugment magnitude {raw!r}")
        o[s] = P.RA_OPS.index(name)
        table = _table(name, int(num_bins), int(size[0]), int(size[1]))
        if isinstance(raw, (int, np.integer)) and not isinstance(raw, bool):  # a signed bin
            k = abs(int(raw))
            if k >= num_bins:
                raise ValueError(f"{where}: magnitude bin {raw} outside [-{num_bins - 1}, {num_bins - 1}]")
            m[s] = int(raw)  # as given (the sign of an unsigned op is ignored by the replay)
            v[s] = 0.0 if table is None else float(table[k]) * (-1.0 if int(raw) < 0 and name in P.RA_SIGNED else 1.0)
            continue
        v[s] = mag
        if table is None:
            off_grid |= mag != 0.0
            continue
        a = np.float32(abs(mag)) if name in P.RA_SIGNED else np.float32(mag)
        hit = np.nonzero(table == a)[0]
        k = int(hit[0]) if hit.size else int(np.argmin(np.abs(table - a)))
        off = not hit.size or (name not in P.RA_SIGNED and mag < 0)
        off_grid |= off
        m[s] = -k if (name in P.RA_SIGNED and mag < 0) else k
        if len(_RA_SEEN) < 100000:
            _RA_SEEN[(op[0], type(raw), raw, size, num_bins)] = (o[s], m[s], v[s], off)
    return o, m, v, off_grid


_RA_SEEN: Dict[tuple, tuple] = {}


def _smooth_branch(q) -> bool:
    """fastload.losses.densify(mode="mldr_smooth")'s branch for stored top-k values: True
    where ``1 - sum`` is negative (softmax), with its own arithmetic (float32 sum of a row)."""
    import torch

    q = torch.as_tensor(np.asarray(q, np.float32)).reshape(1, -1)
    return bool((1.0 - q.sum(1, keepdim=True)) < 0)


def _smooth_branch_kept(archive_vals: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """The top-k values to store (float32 holding fp16 values, as ``encode_targets`` keeps
    them) such that densify's "mldr_smooth" takes ml-dr's branch on this record.

    ml-dr's ``densify`` switches to softmax where ``1.0 - torch.tensor(values).sum() < 0``:
    a float32 sum, in the archive's order, of values whose sum is 1 up to rounding, so fp16
    storage alone moves a record across the switch (targets then differ by up to ~0.8). The
    branch is decided here from ml-dr's own float32 values; where the fp16 values would take
    the other one, the largest is moved by one fp16 step at a time until they agree (a change
    of the size of the fp16 rounding itself)."""
    import torch

    want = bool((1.0 - torch.tensor(np.asarray(archive_vals, np.float64).tolist(), dtype=torch.float32).sum()) < 0.0)
    q = np.asarray(stored, np.float64).astype(np.float16)
    if q.size == 0:
        return q.astype(np.float32)
    toward = np.float16(np.inf) if want else np.float16(0)
    for _ in range(64):
        if _smooth_branch(q.astype(np.float32)) == want:
            break
        q[0] = np.nextafter(q[0], toward)
    return q.astype(np.float32)


def _flat(x, k: int, what: str, where: str):
    """``x`` as a flat sequence of k numbers, checked before numpy sees it (a nested list of
    shared references would make ``np.asarray`` allocate its full expansion)."""
    if hasattr(x, "numel") and hasattr(x, "numpy"):  # a torch tensor
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        if x.size != k or x.dtype.hasobject:
            raise ValueError(f"{where}: prob holds {x.size} {what}, config topk is {k}")
        return x
    if not isinstance(x, (list, tuple)) or len(x) != k \
            or not all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in x):
        raise ValueError(f"{where}: prob's {what} must be {k} numbers (config topk), got "
                         f"{len(x) if isinstance(x, (list, tuple)) else type(x).__name__}")
    return x


class Layout:
    """What a reinforcement config says about the stored parameters."""

    def __init__(self, config: Dict[str, Any]):
        r = config["reinforce"]
        aug = {k: dict(v or {}) for k, v in (r.get("image_augmentation") or {}).items()}
        aug = {k: v for k, v in aug.items() if v.pop("enable", True)}  # ml-dr's clean_config
        unknown = sorted(set(aug) - set(TRANSFORM_ORDER))
        if unknown:
            raise ValueError(f"config: unknown transforms {unknown}")
        self.names = [t for t in TRANSFORM_ORDER if t in aug]
        bad = sorted(set(self.names) - SUPPORTED)
        if bad:
            raise ValueError(f"config: transforms {bad} are not supported by the importer "
                             f"(supported: {sorted(SUPPORTED)})")
        if "random_resized_crop" not in self.names:
            raise ValueError("config: the importer needs random_resized_crop (the ImageNet+ variants)")
        self.aug = aug
        self.mixing = "mixup" in aug or "cutmix" in aug
        self.with_param = [t for t in self.names if t not in NO_PARAM]
        size = aug["random_resized_crop"].get("size", 224)
        size = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(s) for s in size)
        self.size = size if len(size) == 2 else (size[0], size[0])
        rrc = aug["random_resized_crop"]
        self.interpolation = str(rrc.get("interpolation", "bilinear")).split(".")[-1].lower()
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"config: random_resized_crop interpolation {self.interpolation!r} is not supported")
        ra = aug.get("rand_augment", {})
        self.ra_bins = int(ra.get("num_magnitude_bins", 31))
        self.ra = (int(ra.get("num_ops", 2)), int(ra.get("magnitude", 9))) if "rand_augment" in aug else None
        norm = aug.get("normalize", {})
        self.mean = tuple(float(v) for v in norm.get("mean", (0.0, 0.0, 0.0)))
        self.std = tuple(float(v) for v in norm.get("std", (1.0, 1.0, 1.0)))
        self.num_samples = int(r["num_samples"])
        self.topk = int(r.get("topk") or 0)
        self.num_classes = config.get("num_classes")

    def policy(self, semantics: str = "v1", resize: str = "torch"):
        from fastload.sample.policy import AugmentPolicy

        a = self.aug
        rrc = a["random_resized_crop"]
        er = a.get("random_erase", {})
        return AugmentPolicy(
            rrc=True, rrc_scale=tuple(rrc.get("scale", (0.08, 1.0))), rrc_ratio=tuple(rrc.get("ratio", (3 / 4, 4 / 3))),
            flip="random_horizontal_flip" in a, randaugment=self.ra, ra_num_bins=self.ra_bins,
            erase=float(er.get("p", 0.5)) if "random_erase" in a else 0.0,
            erase_scale=tuple(er.get("scale", (0.02, 0.33))), erase_ratio=tuple(er.get("ratio", (0.3, 3.3))),
            mixup=float(a["mixup"].get("alpha", 1.0)) if "mixup" in a else 0.0,
            cutmix=float(a["cutmix"].get("alpha", 1.0)) if "cutmix" in a else 0.0,
            mix_p=float(a.get("mixup", a.get("cutmix", {})).get("p", 1.0)) if self.mixing else 0.5,
            interpolation=self.interpolation, size=self.size, randaugment_semantics=semantics, resize=resize)

    def _ra(self, ops, where: str):
        return ra_fields(ops, self.size, self.ra_bins, where)

    def unpack(self, params, where: str) -> Dict[str, Any]:
        """ml-dr params (compressed list or dict) -> {transform: (value, partner value)}."""
        out: Dict[str, Any] = {}
        if isinstance(params, dict):
            for t in self.with_param:
                v = params.get(t)
                if t in ("mixup", "cutmix"):
                    out[t] = v
                elif v is not None:
                    v = tuple(v)
                    out[t] = (v[0], v[1] if len(v) > 1 else None)
            out["id2"] = params.get("id2")
            return out
        if not isinstance(params, (list, tuple)):
            raise ValueError(f"{where}: params must be ml-dr's list or dict, got {type(params).__name__}")
        params = list(params)
        pair = None
        if self.mixing:
            if not params:
                raise ValueError(f"{where}: empty params")
            pair, params = params[0], params[1:]
        if len(params) != len(self.with_param):
            raise ValueError(f"{where}: {len(params)} parameter entries, the config's transforms "
                             f"{self.with_param} need {len(self.with_param)}")
        for p, t in zip(params, self.with_param):
            if p is None:
                continue
            if t in ("mixup", "cutmix"):
                out[t] = p
            elif pair is not None and isinstance(p, (list, tuple)) and len(p) > 1:
                out[t] = (p[0], p[1])
            else:
                out[t] = (p, None)
        out["id2"] = pair
        return out

    def _box(self, box, h: int, w: int, what: str, where: str) -> np.ndarray:
        try:
            i, j, bh, bw = (int(x) for x in box)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {what} {box!r} is not (top, left, height, width)") from e
        if not (0 <= i and 0 <= j and bh >= 1 and bw >= 1 and i + bh <= h and j + bw <= w):
            raise ValueError(f"{where}: {what} {box!r} outside the {h}x{w} image")
        return P.pixels_to_box(i, j, bh, bw, h, w)

    def to_records(self, samples, hw: Tuple[int, int], all_hw: np.ndarray, where: str):
        """One image's ml-dr samples -> (AUG_DTYPE[n], AUG_EXT_DTYPE[n], ids[n, k], probs[n, k])."""
        if not isinstance(samples, (list, tuple)) or len(samples) != self.num_samples:
            raise ValueError(f"{where}: expected {self.num_samples} samples, got "
                             f"{len(samples) if isinstance(samples, (list, tuple)) else type(samples).__name__}")
        n, k = len(samples), self.topk
        rec, ext = P.empty(n), P.empty_ext(n)
        ids = np.zeros((n, k), np.int64)
        probs = np.zeros((n, k), np.float32)
        oh, ow = self.size
        H, W = hw
        for a, s in enumerate(samples):
            w = f"{where} sample {a}"
            if not isinstance(s, dict) or "params" not in s or "prob" not in s:
                raise ValueError(f"{w}: expected a dict with 'params' and 'prob'")
            prob = s["prob"]
            if not isinstance(prob, (list, tuple)) or len(prob) != 2:
                raise ValueError(f"{w}: prob must be (top-k probabilities, top-k ids) as ml-dr's sparsify stores")
            pv, pi = _flat(prob[0], k, "probabilities", w), _flat(prob[1], k, "class ids", w)
            pv, pi = np.asarray(pv, np.float64).reshape(-1), np.asarray(pi).reshape(-1)
            if pv.shape != (k,) or pi.shape != (k,) or not np.issubdtype(pi.dtype, np.integer):
                raise ValueError(f"{w}: prob holds {pv.shape[0]} values / {pi.shape[0]} ids, config topk is {k}")
            if self.num_classes is not None and k and (pi.min() < 0 or pi.max() >= int(self.num_classes)):
                raise ValueError(f"{w}: class id outside [0, {self.num_classes})")
            if not np.all(np.isfinite(pv)):
                raise ValueError(f"{w}: non-finite probability")
            order = np.argsort(-pv, kind="stable")  # fastload stores top-k descending
            ids[a], probs[a] = pi[order], _smooth_branch_kept(pv, pv[order])

            u = self.unpack(s["params"], w)
            r, e = rec[a], ext[a]
            flags, xb = 0, 0
            crop = u.get("random_resized_crop")
            if crop is None or crop[0] is None:
                raise ValueError(f"{w}: no random_resized_crop parameters")
            r["crop"] = self._box(crop[0], H, W, "crop", w)
            flip = u.get("random_horizontal_flip", (None, None))
            if flip[0]:
                flags |= P.FLAG_FLIP
            ra = u.get("rand_augment", (None, None))
            r["ra_ops"], r["ra_mags"], e["ra_vals"], off = self._ra(ra[0], w)
            xb |= P.EXT_RA_FLOAT if off else 0
            er = u.get("random_erase", (None, None))
            if "random_erase" in self.names:
                xb |= P.EXT_ERASE_BLACK
            if er[0] is not None and int(er[0][0]) != -1:
                r["erase"] = self._erase(er[0], w)
            mix, cut = u.get("mixup"), u.get("cutmix")
            if mix is not None or cut is not None:
                pid = u.get("id2")
                if not isinstance(pid, (int, np.integer)) or not 0 <= int(pid) < len(all_hw):
                    raise ValueError(f"{w}: mixing partner {pid!r} outside the dataset of {len(all_hw)} images")
                r["partner"] = int(pid)
                ph, pw = (int(x) for x in all_hw[int(pid)])
                if crop[1] is None:
                    raise ValueError(f"{w}: mixing without the partner's crop")
                r["pcrop"] = self._box(crop[1], ph, pw, "partner crop", w)
                if flip[1]:
                    flags |= P.FLAG_PARTNER_FLIP
                po, pm, pv_, poff = self._ra(ra[1], w)
                e["pra_ops"], e["pra_mags"], e["pra_vals"] = po, pm, pv_
                xb |= P.EXT_RA_FLOAT if poff else 0
                if er[1] is not None and int(er[1][0]) != -1:
                    e["perase"] = self._erase(er[1], w)
                if (po != P.RA_NONE).any() or e["perase"][3] != 0:
                    xb |= P.EXT_PARTNER_AUG
                if mix is not None:
                    lam = float(mix[0] if isinstance(mix, (list, tuple)) else mix)
                    if not 0.0 <= lam <= 1.0:
                        raise ValueError(f"{w}: MixUp lambda {lam} outside [0, 1]")
                    flags |= P.FLAG_MIXUP
                    r["mixup"] = int(np.rint(lam * P.Q))
                    e["mixup_f"] = lam
                if cut is not None:
                    if len(cut) == 2 and isinstance(cut[1], (list, tuple)):
                        lam, box = cut[0], cut[1]
                    else:
                        lam, box = cut[0], cut[1:]
                    x1, y1, x2, y2 = (int(v) for v in box)
                    if not (0 <= x1 <= x2 <= oh and 0 <= y1 <= y2 <= ow):
                        raise ValueError(f"{w}: CutMix box {tuple(box)} outside the {oh}x{ow} output")
                    e["cutmix_lam"] = float(lam)
                    if x2 > x1 and y2 > y1:
                        flags |= P.FLAG_CUTMIX
                        r["cutmix"] = P.pixels_to_box(x1, y1, x2 - x1, y2 - y1, oh, ow)
                    else:
                        xb |= P.EXT_CUTMIX_EMPTY
            r["flags"] = flags
            e["ext"] = xb
            if not xb & P.EXT_RA_FLOAT:  # the bins reproduce every value exactly: keep none
                e["ra_vals"] = 0
                e["pra_vals"] = 0
        return rec, ext, ids, probs

    def _erase(self, box, where: str) -> np.ndarray:
        oh, ow = self.size
        i, j, h, w = (int(v) for v in box)
        if h <= 0 or w <= 0:
            return np.zeros(4, np.uint16)
        if not (0 <= i and 0 <= j and i + h <= oh and j + w <= ow):
            raise ValueError(f"{where}: erase box {tuple(box)} outside the {oh}x{ow} output")
        return P.pixels_to_box(i, j, h, w, oh, ow)


# ---------------------------------------------------------------------------------------
# the images


def image_folder(root: str) -> Tuple[List[str], List[int], List[str]]:
    """torchvision ``ImageFolder`` order: (relative paths, labels, classes)."""
    if not os.path.isdir(root):
        raise ValueError(f"images: {root!r} is not a folder")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise ValueError(f"images: {root!r} has no class folders (ImageFolder layout: root/class/image.jpg)")
    files, labels = [], []
    for c, name in enumerate(classes):
        for dp, _, fs in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            for f in sorted(fs):
                if f.lower().endswith(IMG_EXTENSIONS):
                    files.append(os.path.relpath(os.path.join(dp, f), root))
                    labels.append(c)
    return files, labels, classes


def _image_sizes(root: str, files: List[str], progress: bool) -> np.ndarray:
    from PIL import Image

    from fastload._progress import Progress

    hw = np.zeros((len(files), 2), np.int64)
    with Progress(len(files), "image sizes", "images", enabled=progress) as bar:
        for i, f in enumerate(files):
            p = os.path.join(root, f)
            try:
                with Image.open(p) as im:  # reads the header only
                    w, h = im.size
            except Exception as e:  # any decoder error: name the file
                raise ValueError(f"images: cannot read {p}: {e}") from e
            hw[i] = (h, w)
            bar.update()
    return hw


def _image_bytes(path: str, restart_markers: bool = False) -> bytes:
    """The file's bytes as stored: losslessly (fastload.format.images.stored_image_bytes)."""
    from fastload.format.images import stored_image_bytes

    with open(path, "rb") as f:
        b = f.read()
    return stored_image_bytes(b, path, restart_markers=restart_markers)[0]


# ---------------------------------------------------------------------------------------
# staging (bounded memory, any archive order)

_RAW = struct.Struct("<QHHI")  # id, len(kind), len(where), len(data)


def _stage_raw(path: str, i: int, raw: _Raw) -> None:
    kind, where = raw.kind.encode(), raw.where.encode()
    with open(path, "ab") as f:
        f.write(_RAW.pack(i, len(kind), len(where), len(raw.data)) + kind + where + raw.data)


def _read_staged_raw(path: str) -> Dict[int, _Raw]:
    out = {}
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        i, nk, nw, nd = _RAW.unpack_from(data, pos)
        pos += _RAW.size
        kind, where = data[pos:pos + nk].decode(), data[pos + nk:pos + nk + nw].decode()
        pos += nk + nw
        out[i] = _Raw(kind, data[pos:pos + nd], where)
        pos += nd
    return out


@dataclasses.dataclass
class _ShardJob:
    """What converting one shard needs (sent to Ray tasks once, by reference)."""
    archive: str
    out: str
    images: str
    files: List[str]
    labels: List[int]
    all_hw: np.ndarray
    lay: "Layout"
    shard_size: int
    n: int
    stage: str
    restart_markers: bool = True


def _decode_staged(job: _ShardJob, staged: Dict[int, _Raw]) -> Dict[int, tuple]:
    """id -> (records, extensions, top-k ids, probabilities) of staged members, in id order."""
    conv = {}
    for i in sorted(staged):
        raw = staged[i]
        val = _load(raw.kind, raw.data, raw.where)
        where = f"{job.archive}: id {i}"
        if not isinstance(val, (tuple, list)) or len(val) != 2 or val[0] != i:
            raise ValueError(f"{where}: expected (id, samples) with id {i}")
        conv[i] = job.lay.to_records(val[1], tuple(int(x) for x in job.all_hw[i]), job.all_hw,
                                     f"{where} ({job.files[i]})")
    return conv


def _import_shard(job: _ShardJob, s: int) -> Dict[str, Any]:
    """Decode a complete shard's staged members, convert them and write the shard file;
    returns the shard's entry for the writer (which only the calling process adds)."""
    from fastload.format.record_ext import encode_ext
    from fastload.format.shards import encode_augs, encode_targets
    from fastload.format.writer import write_shard_file

    path = os.path.join(job.stage, f"{s:05d}.bin")
    rows = range(s * job.shard_size, min(job.n, (s + 1) * job.shard_size))
    conv = _decode_staged(job, _read_staged_raw(path))
    imgs = [_image_bytes(os.path.join(job.images, job.files[i]), job.restart_markers) for i in rows]
    size = job.lay.size
    cols = {"id": list(rows), "key": [job.files[i] for i in rows],
            "hash": [hashlib.blake2b(b, digest_size=16).digest() for b in imgs],
            "orig_h": [int(job.all_hw[i, 0]) for i in rows], "orig_w": [int(job.all_hw[i, 1]) for i in rows],
            "src_h": [int(job.all_hw[i, 0]) for i in rows], "src_w": [int(job.all_hw[i, 1]) for i in rows],
            "label": [job.labels[i] for i in rows], "image": imgs,
            "augs": [encode_augs(conv[i][0], tuple(job.all_hw[i]), size, job.all_hw) for i in rows],
            "targets": [encode_targets(conv[i][2], conv[i][3]) for i in rows],
            "augs_ext": [encode_ext(conv[i][1]) for i in rows]}
    info = write_shard_file(job.out, s, cols, "classification")
    os.remove(path)
    return info


# ---------------------------------------------------------------------------------------
# import


SEMANTICS = {"generation": "v1", "training": "pil"}
# the crop resize of each: Pillow's in both. reinforce.py runs its RandomResizedCrop before the
# collate, on the PIL image (its tensor steps, RandAugment included, come after), and the
# training-time ReinforcedDataset resizes PIL images too (F.resized_crop -> Image.resize);
# benchmarks/fidelity_upstream.py: 480 of 480 records exact with "pil", 0 with "torch"
RESIZE = {"generation": "pil", "training": "pil"}


def import_mldr(archive: str, images: str, out: str, shard_size: int = 1000, config: Optional[str] = None,
                progress: bool = True, limit: Optional[int] = None, semantics: str = "generation",
                engine: str = "local", workers: Optional[int] = None,
                restart_markers: bool = True) -> Dict[str, Any]:
    """Import an ml-dr reinforcement ``archive`` (tar, tar.gz or folder) for the ImageNet-style
    ``images`` folder (the training split ml-dr reinforced: ``root/class/*.jpg``) into ``out``.

    ``config``: a ``config.pth.tar`` to use instead of the archive's (saves a pass over a
    tar.gz whose config comes last). ``limit``: import only the first ``limit`` images
    of the folder (ids ``0..limit-1``; the archive may hold more, e.g. a subset test).
    ``semantics``: whose RandAugment the replay reproduces: ``"generation"`` (the default:
    ml-dr's reinforce.py ran it on tensors, and that is what the teacher scored: torchvision
    v1, after Pillow's crop resize of the PIL image, ``resize="pil"``) or ``"training"`` (ml-dr's training-time
    ReinforcedDataset runs the crop and RandAugment on PIL images: ``randaugment_semantics="pil"``
    and ``resize="pil"``, Pillow's ``Image.resize`` byte for byte).
    ``engine``: ``"local"`` (this process) or ``"ray"``: this process only streams the archive
    (decompression and tar parsing are sequential) and stages each shard's members; decoding
    the pickles, converting and writing each shard are Ray tasks (``workers``: CPUs for a Ray
    started here; an initialized Ray is used as it is). Both write the same shards.
    ``restart_markers`` (default True): JPEG sources are stored losslessly transcoded with a
    restart marker every ~4 MCUs (:func:`fastload.format.images.with_restart_markers`): the
    same pixels, and the loader decodes only the part of each image around its crop (False:
    byte for byte, as the folder holds them).
    Returns the manifest. Rerunning the same call resumes an interrupted import (finished
    shards are kept).

    Example:
        >>> import_mldr("imagenet_plus_rrc.tar.gz", "imagenet/training", "imagenet_plus/")  # doctest: +SKIP
    """
    from fastload._progress import Progress
    from fastload.importers.shardjobs import Shards, checked_args
    from fastload.format.writer import DatasetWriter

    if not os.path.exists(archive):
        raise ValueError(f"archive: {archive!r} does not exist")
    shard_size = checked_args(engine, shard_size)
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {sorted(SEMANTICS)}, got {semantics!r}")
    if config is not None:
        with open(config, "rb") as f:
            cfg = load_pth(f.read(MAX_FILE + 1), config)
    else:
        cfg = read_config(archive)
    cfg_plain = _plain(cfg, config or f"{archive}: config.pth.tar")  # bounded: fails fast
    lay = Layout(cfg)
    files, labels, classes = image_folder(images)
    if limit is not None:
        files, labels = files[:int(limit)], labels[:int(limit)]
    N = len(files)
    subset = None
    if lay.num_classes is not None and len(classes) > int(lay.num_classes):
        raise ValueError(f"images: {len(classes)} class folders, more than the reinforcement's {lay.num_classes} classes")
    if lay.num_classes is not None and len(classes) < int(lay.num_classes):
        # a subset (e.g. ImageNet-100 reinforced with a 1000-class teacher): the ids still
        # index this folder's ImageFolder order; labels are indices into its classes, the
        # stored top-k ids stay in the teacher's class space. Said in the manifest and here.
        subset = {"folder_classes": len(classes), "config_num_classes": int(lay.num_classes),
                  "labels": "index into 'classes' (this folder's sorted class folders)",
                  "targets": f"top-k ids in the teacher's {int(lay.num_classes)}-class space"}
        if progress:
            print(f"import-mldr: {images} has {len(classes)} class folders, the reinforcement's config "
                  f"{lay.num_classes} classes: a subset. Labels index the folder's classes "
                  f"({classes[0]!r} -> 0, ...); targets keep the teacher's {lay.num_classes} class ids.",
                  file=sys.stderr)
    all_hw = _image_sizes(images, files, progress)
    policy = lay.policy(SEMANTICS[semantics], RESIZE[semantics])
    num_shards = -(-N // shard_size)
    st = os.stat(archive)
    fp = {"archive": os.path.abspath(archive), "archive_bytes": int(st.st_size) if not os.path.isdir(archive) else None,
          "images": os.path.abspath(images), "num_images": N, "shard_size": shard_size,
          "files_sha256": hashlib.sha256("\n".join(files).encode()).hexdigest(), "semantics": semantics}
    replay = {"image_size": list(lay.size), "box_grid": list(lay.size), "interpolation": lay.interpolation,
              "dct_scale": False, "mean": list(lay.mean), "std": list(lay.std),
              "kernel": "fastload.replay.native", "erase_fill": "black before normalize (ml-dr)",
              "densify": "fastload.losses.densify(mode='mldr') for ml-dr's default"}
    header = {"kind": "classification", "num_augmentations": lay.num_samples, "topk": lay.topk,
              "num_classes": int(lay.num_classes) if lay.num_classes is not None else len(classes),
              "seeds": [], "policy": policy.to_dict(), "replay": replay,
              "teachers": [{"name": str((cfg.get("teacher") or {}).get("name", "ml-dr teacher")),
                            "description": "imported from an apple/ml-dr reinforcement archive"}],
              "shard_size": shard_size, "classes": classes, "images_stored": True, "source": "ml-dr",
              "record_ext": True, "mldr_config": cfg_plain,
              "image_encoding": {"restart_markers": bool(restart_markers)}}
    if subset is not None:
        header["class_subset"] = subset
    w = DatasetWriter(out, header, fp, num_shards)
    done = w.done
    stage = os.path.join(out, ".mldr-staging")
    shutil.rmtree(stage, ignore_errors=True)  # partial staging of an interrupted run: rebuilt
    os.makedirs(stage)
    counts = np.zeros(num_shards, np.int64)
    seen = np.zeros(N, bool)
    for s in done:
        seen[s * shard_size:(s + 1) * shard_size] = True

    job = _ShardJob(archive, out, images, files, labels, all_hw, lay, shard_size, N, stage, bool(restart_markers))
    run = Shards(_import_shard, job, w, engine, workers)
    with Progress(N, f"import ml-dr ({engine})", "images", enabled=progress) as bar:
        bar.update(int(seen.sum()))
        for key, val in iter_archive(archive, raw=True):
            if key == "config":
                continue
            i = int(key)
            if i >= N:
                if limit is not None:
                    continue
                raise ValueError(f"{archive}: reinforcement id {i} but the image folder has {N} images")
            if i // shard_size in done:
                continue
            if seen[i]:
                raise ValueError(f"{archive}: id {i}: appears twice in the archive")
            s = i // shard_size
            _stage_raw(os.path.join(stage, f"{s:05d}.bin"), i, val)
            seen[i] = True
            counts[s] += 1
            if counts[s] == min(N, (s + 1) * shard_size) - s * shard_size:
                run.submit(s)  # complete: convert it (here, or in a Ray task)
            bar.update()
            run.collect(block=False)
    missing = np.nonzero(~seen)[0]
    if missing.size:
        # a member that does not decode is the better error than the ids missing after it:
        # decode what incomplete shards staged (only on this failure path)
        for s in sorted(set((missing // shard_size).tolist())):
            path = os.path.join(stage, f"{s:05d}.bin")
            if os.path.exists(path):
                _decode_staged(job, _read_staged_raw(path))
        raise ValueError(f"{archive}: no reinforcement for {missing.size} images, e.g. ids "
                         f"{missing[:5].tolist()} ({files[int(missing[0])]})")
    run.collect(block=True)
    shutil.rmtree(stage, ignore_errors=True)
    return w.finish()


def _plain(v, where: str = "config"):
    """The config as JSON-ready data (the manifest keeps it for provenance), bounded: at most
    MAX_CONFIG_NODES values (counted as expanded: a list referenced twice counts twice, so a
    pickle's shared references cannot multiply the copy) and MAX_CONFIG_DEPTH levels."""
    count = [0]

    def walk(x, depth):
        count[0] += 1
        if count[0] > MAX_CONFIG_NODES or depth > MAX_CONFIG_DEPTH:
            raise ValueError(f"{where}: the config is too large to copy into the manifest (over "
                             f"{MAX_CONFIG_NODES} values or {MAX_CONFIG_DEPTH} levels of nesting, counting "
                             "shared references as often as they are used); ml-dr's configs are a few "
                             "hundred values")
        if isinstance(x, dict):
            return {str(k)[:1000]: walk(y, depth + 1) for k, y in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(y, depth + 1) for y in x]
        if isinstance(x, str):
            if len(x) > 100_000:
                raise ValueError(f"{where}: a config string of {len(x)} characters")
            return x
        if isinstance(x, (int, float, bool)) or x is None:
            return x
        if isinstance(x, np.generic):
            return x.item()
        return repr(x)[:1000]

    return walk(v, 0)


def main(argv=None) -> int:
    """``fastload import-mldr ARCHIVE --images IMAGENET/training --out DIR``."""
    from fastload._cli import describe

    ap = argparse.ArgumentParser(prog="fastload import-mldr", description=describe(__doc__))
    ap.add_argument("archive", help="ml-dr reinforced_data.tar(.gz) or its extracted folder")
    ap.add_argument("--images", required=True, help="the ImageNet-style training folder (root/class/image)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--config", default=None, help="config.pth.tar to use instead of the archive's")
    ap.add_argument("--limit", type=int, default=None, help="import only the first N images of the folder")
    ap.add_argument("--semantics", choices=sorted(SEMANTICS), default="generation",
                    help="augmentation arithmetic to replay: generation (Pillow's crop resize, then RandAugment "
                         "on tensors: what the teacher scored; default) or training (PIL images: Pillow's resize and RandAugment, as "
                         "ml-dr's training-time dataset)")
    from fastload.importers.shardjobs import add_engine_args

    add_engine_args(ap, "the archive")
    ap.add_argument("--no-restart-markers", action="store_true",
                    help="store JPEG sources byte for byte (default: losslessly transcoded with a restart marker "
                         "every ~4 MCUs, the same pixels, so the loader decodes only around each crop)")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    try:
        m = import_mldr(a.archive, a.images, a.out, shard_size=a.shard_size, config=a.config,
                        progress=not a.quiet, limit=a.limit, semantics=a.semantics, engine=a.engine,
                        workers=a.workers, restart_markers=not a.no_restart_markers)
    except (ValueError, pickle.UnpicklingError) as e:
        print(f"fastload import-mldr: error: {e}", file=sys.stderr)
        return 2
    print(f"imported {m['num_rows']} images x {m['num_augmentations']} augmentations into {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
