"""The fused C++ replay kernel (``csrc/replay``) from Python.

``render_batch`` turns a batch of sources (JPEG bytes or decoded uint8 HWC arrays) and their
stored augmentation records into a normalized NCHW batch written straight into ``out``:
decode (DCT-scaled, region only) -> crop -> antialiased resize -> flip -> RandAugment ->
normalize -> erase -> MixUp -> CutMix, on a pool of native threads with the GIL released.
Its plain-PyTorch specification is ``fastload.replay.reference.render_reference``.

If the library was built without libjpeg, JPEG sources are decoded with Pillow in Python
first (a documented slow path: one Python decode per image, the GIL held while decoding).
"""
from __future__ import annotations

import ctypes
import io
from typing import Optional, Sequence

import numpy as np
import torch

from .. import _native
from ..sample import params as P
from ..sample import schema as S
from .reference import IMAGENET_MEAN, IMAGENET_STD

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.uint8: 2}
_INTERP = {"bilinear": 0, "bicubic": 1}
_CT = {"<i8": ctypes.c_int64, "<i4": ctypes.c_int32, "<f4": ctypes.c_float}


def _ctypes_struct(rec: "S.Record"):
    """A ctypes mirror of a schema record; its offsets are checked against the schema's."""
    fields = [(f.name, _CT[f.code] * f.count if f.count > 1 else _CT[f.code]) for f in rec.fields]
    cls = type(rec.cname, (ctypes.Structure,), {"_fields_": fields, **({"_pack_": 1} if rec.packed else {})})
    offs = rec.offsets()
    bad = [f.name for f in rec.fields if getattr(cls, f.name).offset != offs[f.name]]
    if bad or ctypes.sizeof(cls) != rec.size:
        raise ImportError(f"ctypes lays out {rec.cname} unlike fastload/sample/schema.py (fields {bad}, size "
                          f"{ctypes.sizeof(cls)} vs {rec.size})")
    return cls


_Options = _ctypes_struct(S.REPLAY_OPTIONS)

_SOURCE_DTYPE = np.dtype([("data", "<u8"), ("len", "<i8"), ("h", "<i4"), ("w", "<i4"),
                          ("kind", "<i4"), ("pad", "<i4")])


def _lib():
    lib = _native.load("replay")
    if not getattr(lib, "_fl_typed", False):
        vp, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        _check_layout(lib)
        lib.fl_replay.argtypes = [vp, vp, vp, vp, i64, vp, ctypes.POINTER(_Options), vp]
        lib.fl_replay.restype = i32
        lib.fl_replay_submit.argtypes = [vp, vp, vp, vp, i64, vp, ctypes.POINTER(_Options)]
        lib.fl_replay_submit.restype = i64
        lib.fl_replay_wait.argtypes = [i64, vp]
        lib.fl_replay_wait.restype = i32
        lib.fl_replay_pending.restype = i32
        lib.fl_decode_batch.argtypes = [vp, i64, i32, vp, vp, i32, vp]
        lib.fl_decode_batch.restype = i32
        lib.fl_jpeg_dims_batch.argtypes = [vp, i64, i32, vp, i64, i32, vp]
        lib.fl_crop_floor_batch.argtypes = [vp, vp, i64, i32, i32, i32, vp, vp, vp, i32, vp]
        lib.fl_crop_floor_batch.restype = i32
        lib.fl_jpeg_dims_batch.restype = i32
        lib.fl_replay_set_limits.argtypes = [i64, i64, i64, i64]
        lib.fl_replay_set_limits.restype = i32
        lib.fl_replay_get_limits.argtypes = [vp, i64]
        lib.fl_replay_get_limits.restype = i32
        lib.fl_jpeg_encode_test.argtypes = [vp, i32, i32, i32, i32, i32, i32, i32, vp, i64, vp]
        lib.fl_jpeg_add_restarts.argtypes = [ctypes.c_char_p, i64, vp, i64, vp]
        lib.fl_jpeg_add_restarts.restype = i32
        lib.fl_jpeg_slice_count.restype = i64
        lib.fl_jpeg_encode_test.restype = i32
        lib.fl_replay_have_jpeg.restype = i32
        lib.fl_replay_have_randaugment.restype = i32
        _limits_from_env(lib)
        lib._fl_typed = True
    return lib


def _check_layout(lib) -> None:
    """Every record kind the library was compiled with must be the schema's (a stale build or
    a hand-edited header is an error here, not wrong pixels later)."""
    path = getattr(lib, "_name", "fastload._replay")
    if not hasattr(lib, "fl_replay_layout_hash"):
        raise ImportError(f"{path} predates the record schema (no fl_replay_layout_hash): rebuild it "
                          f"(python setup.py build_ext --inplace)")
    lib.fl_replay_layout_hash.argtypes = [ctypes.c_int]
    lib.fl_replay_layout_hash.restype = ctypes.c_uint64
    for kind, rec in enumerate(S.RECORDS):
        got = lib.fl_replay_layout_hash(kind)
        if got != rec.layout_hash():
            raise ImportError(f"{path} was built with another layout of {rec.cname} (hash {got:#x}, "
                              f"fastload/sample/schema.py says {rec.layout_hash():#x}): regenerate the header "
                              f"(python -m fastload.sample.schema --write) and rebuild")


# JPEG decode limits: environment variable -> set_decode_limits argument.
_LIMIT_ENV = {"FASTLOAD_MAX_DECODE_PIXELS": "max_pixels", "FASTLOAD_MAX_DECODE_BYTES": "max_bytes",
              "FASTLOAD_MAX_PIXELS_PER_BYTE": "max_pixels_per_byte"}


def _limits_from_env(lib):
    import os

    args = {}
    for var, name in _LIMIT_ENV.items():
        v = os.environ.get(var)
        if v is None or v == "":
            continue
        try:
            args[name] = int(v)
        except ValueError:
            raise ValueError(f"{var} must be an integer, got {v!r}") from None
        if args[name] < (0 if name == "max_pixels_per_byte" else 1):
            raise ValueError(f"{var} must be {'>= 0' if name == 'max_pixels_per_byte' else '>= 1'}, got {v!r}")
    if args:
        lib.fl_replay_set_limits(args.get("max_pixels", 0), args.get("max_bytes", 0),
                                 args.get("max_pixels_per_byte", -1), -1)


def decode_limits() -> dict:
    """The JPEG decode limits in force (see ``set_decode_limits``)."""
    v = np.zeros(4, np.int64)
    _native.check(_lib(), _lib().fl_replay_get_limits(v.ctypes.data, 4), "decode_limits")
    return {"max_pixels": int(v[0]), "max_bytes": int(v[1]), "max_pixels_per_byte": int(v[2]),
            "free_pixels": int(v[3])}


def set_decode_limits(max_pixels: Optional[int] = None, max_bytes: Optional[int] = None,
                      max_pixels_per_byte: Optional[int] = None, free_pixels: Optional[int] = None) -> dict:
    """Bound the work and memory of one JPEG decode (process-wide); returns the old limits.

    A header is cheap to forge: a few KB of arithmetic-coded or progressive data can declare
    16384 x 16384 pixels, which the decoder then walks for seconds or buffers (~0.7 GB). Every
    native decode (render_batch, decode_batch) checks, before any pixel work:

    - ``max_pixels`` (default 2**26 = 8192 x 8192; env ``FASTLOAD_MAX_DECODE_PIXELS``):
      declared width x height;
    - ``max_pixels_per_byte`` (default 4096; env ``FASTLOAD_MAX_PIXELS_PER_BYTE``, 0 = off):
      for images above ``free_pixels`` (default 2**22), declared pixels per byte of JPEG data.
      Real images carry far more data (a flat colour in baseline Huffman coding needs a byte
      per ~170 pixels), so only forged or truncated headers trip it;
    - ``max_bytes`` (default 384 MiB; env ``FASTLOAD_MAX_DECODE_BYTES``): memory libjpeg may
      hold for the coefficient buffers of a progressive or multi-scan image.

    An image over a limit is a bad sample: ``render_batch`` raises ``ValueError`` naming it,
    and the loaders apply their ``on_error`` rule (raise or skip and count) to it.
    """
    old = decode_limits()
    for name, v, lo in (("max_pixels", max_pixels, 1), ("max_bytes", max_bytes, 1),
                        ("max_pixels_per_byte", max_pixels_per_byte, 0), ("free_pixels", free_pixels, 0)):
        if v is not None and (not isinstance(v, (int, np.integer)) or v < lo):
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    _lib().fl_replay_set_limits(int(max_pixels or 0), int(max_bytes or 0),
                                -1 if max_pixels_per_byte is None else int(max_pixels_per_byte),
                                -1 if free_pixels is None else int(free_pixels))
    return old


def have_jpeg() -> bool:
    """Whether the native library decodes JPEG itself (built with libjpeg)."""
    return bool(_lib().fl_replay_have_jpeg())


# DCT scaling rules (csrc/replay/jpeg.cpp). True means "pow2", the rule datasets recorded as
# `dct_scale: true` were generated with; keep it so that they replay bit for bit.
DCT_RULES = {"off": 0, "pow2": 1, "m8": 2}
DECODER_IFAST = 1      # measurement switches (see fastload/bench/kernel.py): ReplayOptions.decoder_flags
DECODER_NO_FANCY = 2


def _dct_code(dct_scale) -> int:
    if dct_scale is True or dct_scale is False:
        return int(dct_scale)
    if isinstance(dct_scale, str) and dct_scale in DCT_RULES:
        return DCT_RULES[dct_scale]
    raise ValueError(f"dct_scale must be True, False or one of {sorted(DCT_RULES)}, got {dct_scale!r}")


def _pil_decode(b) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(bytes(b))) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad sample
        raise RuntimeError(f"bad JPEG: {e}") from None


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_png(b) -> bool:
    """Whether ``b`` (bytes-like) holds a PNG (by content, not name)."""
    if b is None or isinstance(b, (np.ndarray, torch.Tensor)):
        return False
    try:
        return bytes(memoryview(b)[:8]) == PNG_SIGNATURE
    except TypeError:
        return False


def decode_png(b) -> np.ndarray:
    """A PNG source's pixels as the replay sees them: Pillow's decode and ``convert("RGB")``
    (what torchvision's ``pil_loader`` gives a training loop), uint8 HWC."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(bytes(b))) as im:
            if im.format != "PNG":
                raise RuntimeError(f"not a PNG ({im.format})")
            return np.ascontiguousarray(np.asarray(im.convert("RGB")))
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad sample
        raise RuntimeError(f"bad PNG: {e}") from None


def _png_sources(sources, sample_ids, what):
    """PNG sources (stored losslessly by the importers) decoded to pixels; the native decoder
    reads JPEG only. Returns ``sources`` itself when none is a PNG."""
    pos = [i for i, s in enumerate(sources) if is_png(s)]
    if not pos:
        return sources
    out = list(sources)
    for i in pos:
        try:
            out[i] = decode_png(sources[i])
        except RuntimeError as e:
            name = sample_ids[i] if sample_ids is not None else i
            raise ValueError(f"sample {name} ({what} {i}): {e}") from None
    return out


def _address(a: np.ndarray) -> int:
    # ctypes.c_char.from_buffer is several times cheaper than __array_interface__ / .ctypes
    # (Python overhead per source matters at thousands of images per second).
    if a.flags.writeable and a.size:
        return ctypes.addressof(ctypes.c_char.from_buffer(a))
    return a.__array_interface__["data"][0] if a.size else 0


def _describe(sources, keep: list, what: str, allow_none=False) -> np.ndarray:
    """Source descriptors for the C side; `keep` holds the buffers alive during the call."""
    n = len(sources)
    desc = np.zeros(n, dtype=_SOURCE_DTYPE)
    ptrs = [0] * n
    lens = [0] * n
    raw = []  # (position, array) of decoded sources
    byte_pos = []  # positions of `bytes` sources: their addresses are taken in one ctypes call
    for i, s in enumerate(sources):
        if type(s) is bytes:
            byte_pos.append(i)
            lens[i] = len(s)
            continue
        if s is None:
            if allow_none:
                continue
            raise ValueError(f"{what}[{i}] is None")
        if isinstance(s, np.ndarray):
            if s.dtype != np.uint8 or s.ndim != 3 or s.shape[2] != 3 or s.shape[0] < 1 or s.shape[1] < 1:
                raise ValueError(f"{what}[{i}]: a raw source must be a uint8 HWC array with 3 channels, "
                                 f"got {s.dtype} {s.shape}")
            a = s if s.flags.c_contiguous else np.ascontiguousarray(s)
            keep.append(a)
            ptrs[i] = _address(a)
            lens[i] = a.nbytes
            raw.append((i, a))
            continue
        if isinstance(s, torch.Tensor):
            raise ValueError(f"{what}[{i}]: pass raw images as numpy uint8 HWC arrays, not tensors")
        try:
            a = np.frombuffer(s, dtype=np.uint8)
        except TypeError:
            raise ValueError(f"{what}[{i}]: expected JPEG bytes or a uint8 HWC array, "
                             f"got {type(s).__name__}") from None
        keep.append(a)
        ptrs[i] = a.__array_interface__["data"][0] if a.size else 0
        lens[i] = a.size
    if byte_pos:
        objs = [sources[i] for i in byte_pos]
        keep.append(objs)
        cptrs = (ctypes.c_char_p * len(objs))(*objs)  # points into the bytes objects, no copy
        addr = np.frombuffer(cptrs, dtype=np.uint64)
        for j, i in enumerate(byte_pos):
            ptrs[i] = int(addr[j])
    desc["data"] = ptrs
    desc["len"] = lens
    if raw:
        pos = [i for i, _ in raw]
        desc["h"][pos] = [a.shape[0] for _, a in raw]
        desc["w"][pos] = [a.shape[1] for _, a in raw]
        desc["kind"][pos] = 1
    return desc


def _decode_python(sources, sample_ids, what):
    out = []
    for i, s in enumerate(sources):
        if s is None or isinstance(s, np.ndarray):
            out.append(s)
            continue
        try:
            out.append(_pil_decode(s))
        except RuntimeError as e:
            name = sample_ids[i] if sample_ids is not None else i
            raise ValueError(f"sample {name} ({what} {i}): {e}") from None
    return out


def render_batch(sources: Sequence, params: np.ndarray, out: torch.Tensor, *,
                 partner_sources: Optional[Sequence] = None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 interpolation: str = "bilinear", dct_scale: bool = True, threads: Optional[int] = None,
                 sample_ids: Optional[Sequence] = None, ra_num_bins: int = 31,
                 ra_semantics: str = "v1", _decoder_flags: int = 0, ext: Optional[np.ndarray] = None,
                 box_grid: Optional[Sequence[int]] = None, ra_fill: Sequence[int] = (124, 116, 104),
                 resize: str = "torch") -> torch.Tensor:
    """Replay ``params[i]`` on ``sources[i]`` into ``out[i]`` (a [B, 3, h, w] CPU tensor).

    ``out`` may be float32 / float16 (normalized with ``mean`` / ``std``) or uint8 (no
    normalization; erased pixels take the mean colour), and may be pinned: the kernel writes
    into it directly. ``ra_semantics`` ("v1", "v2", "pil" or "timm": the dataset policy's
    ``randaugment_semantics``) picks torchvision's RandAugment arithmetic (tensor v1, tensor v2,
    or on PIL images) or timm's (its records carry their levels in ``ext``; ``ra_fill`` is the
    fill colour of its geometric ops, the policy's ``timm_fill``). ``partner_sources[i]`` is the MixUp/CutMix partner of sample i (``None``
    where the record does not mix). ``dct_scale`` lets the JPEG decoder downscale in the DCT
    domain: ``True`` / ``"pow2"`` (the default rule, the one datasets recorded as
    ``dct_scale: true`` were generated with) decodes at 1/2, 1/4 or 1/8 when the crop is at
    least 2x, 4x, 8x the output; ``"m8"`` at M/8 (M = 1..8, the smallest keeping the scaled
    crop >= the output), measured slower (libjpeg-turbo's non-power-of-two IDCTs are not SIMD)
    and further from the exact decode, so it is not the default; ``False`` / ``"off"`` never.
    Generation and replay of one dataset must use the same rule. ``_decoder_flags``
    (``DECODER_IFAST``, ``DECODER_NO_FANCY``) are measurement switches for the benchmark: they
    change pixels by more than the 1-level contract. A bad sample raises ``ValueError`` naming
    ``sample_ids[i]`` (or the position i). ``ext``: schema-v2 extension records
    (``params.AUG_EXT_DTYPE``, one per record: float magnitudes, black erasing, the
    partner's own RandAugment/erasing), with ``box_grid`` the (h, w) their float
    translations were sampled on (the dataset's ``replay.box_grid``; default: the output).
    ``resize`` (the dataset policy's ``resize``): the crop resize's arithmetic, ``"torch"``
    (``F.interpolate(antialias=True)`` on float, rounded) or ``"pil"`` / ``"pil12"``
    (Pillow's ``Image.resize`` of the integer crop, byte-exact, in Pillow >= 13's / <= 12's
    pass order; JPEGs are then decoded at full scale, as Pillow does: ``dct_scale`` and
    ``_decoder_flags`` do not apply).

    Example:
        >>> import numpy as np, torch
        >>> from fastload.sample import params as P
        >>> img = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
        >>> out = torch.empty(2, 3, 32, 32)
        >>> _ = render_batch([img, img], P.empty(2), out)
        >>> out.shape
        torch.Size([2, 3, 32, 32])
    """
    pending = _submit(sources, params, out, partner_sources, mean, std, interpolation, dct_scale, threads,
                      sample_ids, ra_num_bins, ra_semantics, _decoder_flags, ext, box_grid, ra_fill, resize,
                      queued=False)
    return out if pending is None else pending.wait()


def render_batch_async(sources: Sequence, params: np.ndarray, out: torch.Tensor, *,
                       partner_sources: Optional[Sequence] = None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                       interpolation: str = "bilinear", dct_scale: bool = True, threads: Optional[int] = None,
                       sample_ids: Optional[Sequence] = None, ra_num_bins: int = 31,
                       ra_semantics: str = "v1", _decoder_flags: int = 0, ext: Optional[np.ndarray] = None,
                       box_grid: Optional[Sequence[int]] = None, ra_fill: Sequence[int] = (124, 116, 104),
                       resize: str = "torch") -> "PendingRender":
    """:func:`render_batch`, queued: the arguments are checked now (``ValueError``), the batch
    is rendered by the native runner thread in submission order, and ``.wait()`` returns
    ``out`` or raises the ``ValueError`` render_batch would. Why: a caller that submits the
    next batch before waiting for this one keeps the native threads busy while it waits for
    the GIL and prepares the next batch (the loader's render stage does).

    Example:
        >>> import numpy as np, torch
        >>> from fastload.sample import params as P
        >>> img = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
        >>> a, b = torch.empty(2, 3, 32, 32), torch.empty(2, 3, 32, 32)
        >>> pa = render_batch_async([img, img], P.empty(2), a)
        >>> pb = render_batch_async([img, img], P.empty(2), b)
        >>> torch.equal(pa.wait(), pb.wait())
        True
    """
    pending = _submit(sources, params, out, partner_sources, mean, std, interpolation, dct_scale, threads,
                      sample_ids, ra_num_bins, ra_semantics, _decoder_flags, ext, box_grid, ra_fill, resize,
                      queued=True)
    return PendingRender(out, None, None, None) if pending is None else pending


class PendingRender:
    """A submitted batch (:func:`render_batch_async`). Holds every buffer the native side reads
    or writes until the batch is done; ``wait()`` returns the output tensor or raises."""

    __slots__ = ("out", "_ticket", "_keep", "_ids", "_status")

    def __init__(self, out, ticket, keep, ids):
        self.out, self._ticket, self._keep, self._ids = out, ticket, keep, ids
        self._status = None if ticket is not None else (0, -1, "")

    def wait(self) -> torch.Tensor:
        if self._status is None:
            lib = _lib()
            bad = ctypes.c_int64(-1)
            rc = lib.fl_replay_wait(self._ticket, ctypes.byref(bad))  # GIL released (ctypes)
            msg = (lib.fl_last_error() or b"").decode("utf-8", "replace") if rc else ""
            self._status, self._keep = (rc, bad.value, msg), None
        return _replay_result(self.out, *self._status, self._ids)

    def __del__(self):
        # A batch dropped unwaited (an abandoned iteration) still owns its buffers until the
        # native side is done with them.
        if getattr(self, "_status", 0) is None:
            try:
                self.wait()
            except Exception:  # noqa: BLE001 - nobody asked for this batch's result
                pass


def _replay_result(out, status, bad, msg, sample_ids):
    if status != 0:
        if bad >= 0:
            name = sample_ids[bad] if sample_ids is not None else bad
            raise ValueError(f"render_batch: sample {name} (position {bad}): {msg.split(': ', 1)[-1]}")
        raise ValueError(f"render_batch: {msg}")
    return out


def _submit(sources, params, out, partner_sources, mean, std, interpolation, dct_scale, threads, sample_ids,
            ra_num_bins, ra_semantics, _decoder_flags, ext, box_grid, ra_fill, resize, queued):
    """render_batch's checks and descriptors, then the native call: synchronous (returns None
    after rendering, or raises), or queued (returns a PendingRender)."""
    lib = _lib()
    params = np.ascontiguousarray(params).reshape(-1)
    if params.dtype != P.AUG_DTYPE:
        raise ValueError(f"params must have dtype fastload.sample.params.AUG_DTYPE, got {params.dtype}")
    n = len(sources)
    if params.shape[0] != n:
        raise ValueError(f"params holds {params.shape[0]} records for {n} sources")
    if ext is not None:
        ext = np.ascontiguousarray(ext).reshape(-1)
        if ext.dtype != P.AUG_EXT_DTYPE or ext.shape[0] != n:
            raise ValueError(f"ext must be {n} records of dtype fastload.sample.params.AUG_EXT_DTYPE, got "
                             f"{ext.shape[0]} of {ext.dtype}")
    gh, gw = (0, 0) if box_grid is None else (int(box_grid[0]), int(box_grid[1]))
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != n or out.shape[1] != 3:
        raise ValueError(f"out must be a [{n}, 3, h, w] tensor, got "
                         f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    if out.dtype not in _DTYPES:
        raise ValueError(f"out dtype must be float32, float16 or uint8, got {out.dtype}")
    if out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError("out must be a contiguous CPU tensor (pinned is fine)")
    if interpolation not in _INTERP:
        raise ValueError(f"interpolation must be one of {sorted(_INTERP)}, got {interpolation!r}")
    if ra_semantics not in S.RA_SEMANTICS:
        raise ValueError(f"ra_semantics must be one of {sorted(S.RA_SEMANTICS)}, got {ra_semantics!r}")
    if resize not in S.RESIZE_MODES:
        raise ValueError(f"resize must be one of {sorted(S.RESIZE_MODES)}, got {resize!r}")
    if sample_ids is not None and len(sample_ids) != n:
        raise ValueError(f"sample_ids has {len(sample_ids)} entries for {n} sources")
    if partner_sources is not None and len(partner_sources) != n:
        raise ValueError(f"partner_sources has {len(partner_sources)} entries for {n} sources")
    mean_a = np.asarray(mean, dtype=np.float32).reshape(-1)
    std_a = np.asarray(std, dtype=np.float32).reshape(-1)
    if mean_a.size != 3 or std_a.size != 3:
        raise ValueError("mean and std must have 3 values")
    if (std_a <= 0).any():
        raise ValueError(f"std must be positive, got {std}")
    if n == 0:
        return None
    h, w = int(out.shape[2]), int(out.shape[3])
    native_jpeg = bool(lib.fl_replay_have_jpeg())
    if not native_jpeg:  # slow path: Pillow decodes in Python
        sources = _decode_python(sources, sample_ids, "source")
        if partner_sources is not None:
            partner_sources = _decode_python(partner_sources, sample_ids, "partner of source")
    else:  # lossless (PNG) sources: Pillow decodes them, the kernel takes their pixels
        sources = _png_sources(sources, sample_ids, "source")
        if partner_sources is not None:
            partner_sources = _png_sources(partner_sources, sample_ids, "partner of source")
    keep: list = []
    desc = _describe(sources, keep, "sources")
    pdesc = None
    if partner_sources is not None:
        pdesc = _describe(partner_sources, keep, "partner_sources", allow_none=True)
    if int(_decoder_flags) & ~(DECODER_IFAST | DECODER_NO_FANCY):
        raise ValueError(f"_decoder_flags: unknown bits {int(_decoder_flags):#x}")
    opt = _Options(out_bytes=out.numel() * out.element_size(), dtype=_DTYPES[out.dtype], out_h=h, out_w=w,
                   interpolation=_INTERP[interpolation], dct_rule=_dct_code(dct_scale),
                   decoder_flags=int(_decoder_flags), ra_num_bins=int(ra_num_bins),
                   ra_semantics=S.RA_SEMANTICS[ra_semantics][0], grid_h=gh, grid_w=gw, threads=int(threads or 0),
                   resize=S.RESIZE_MODES[resize])
    fill = [int(v) for v in ra_fill]
    if len(fill) != 3 or not all(0 <= v <= 255 for v in fill):
        raise ValueError(f"ra_fill must be 3 values in 0..255, got {ra_fill!r}")
    opt.ra_fill[:] = fill
    opt.mean[:] = [float(v) for v in mean_a]
    opt.std[:] = [float(v) for v in std_a]
    args = (desc.ctypes.data, pdesc.ctypes.data if pdesc is not None else None, params.ctypes.data,
            ext.ctypes.data if ext is not None else None, n, out.data_ptr(), ctypes.byref(opt))
    if queued and hasattr(lib, "fl_replay_submit"):
        ticket = lib.fl_replay_submit(*args)
        if ticket < 0:
            _replay_result(out, -1, -1, (lib.fl_last_error() or b"").decode("utf-8", "replace"), sample_ids)
        # everything the native side reads or writes stays alive with the pending batch
        return PendingRender(out, ticket, (keep, desc, pdesc, params, ext, opt, sources, partner_sources),
                             sample_ids)
    bad = ctypes.c_int64(-1)
    status = lib.fl_replay(*args, ctypes.byref(bad))
    msg = (lib.fl_last_error() or b"").decode("utf-8", "replace") if status else ""
    _replay_result(out, status, bad.value, msg, sample_ids)
    return None


def decode_batch(sources: Sequence, scale: int = 1, threads: Optional[int] = None,
                 keep: bool = True, sample_ids: Optional[Sequence] = None) -> Optional[list]:
    """Decode JPEGs at DCT scale 1/``scale`` (1, 2, 4, 8) on the native thread pool.

    Returns a list of uint8 HWC arrays, or ``None`` when ``keep=False`` (decode into
    per-thread scratch and discard: the benchmark's decode-only limit). A bad JPEG (corrupt,
    or over the limits of ``set_decode_limits``) raises ``ValueError`` naming
    ``sample_ids[i]`` (or the position i).

    Example:
        >>> import io, numpy as np
        >>> from PIL import Image
        >>> buf = io.BytesIO(); Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, "JPEG")
        >>> decode_batch([buf.getvalue()], scale=2)[0].shape
        (24, 32, 3)
    """
    if scale not in (1, 2, 4, 8):
        raise ValueError(f"scale must be 1, 2, 4 or 8, got {scale}")
    lib = _lib()
    if not lib.fl_replay_have_jpeg():
        arrs = _decode_python(sources, None, "source")
        if scale != 1:
            from PIL import Image

            arrs = [np.asarray(Image.fromarray(a).reduce(scale)) for a in arrs]
        return arrs if keep else None
    png = {i for i, s in enumerate(sources) if is_png(s)}
    if png:  # lossless sources: Pillow's decode (no DCT scaling: Pillow's reduce by `scale`)
        from PIL import Image

        rest = [i for i in range(len(sources)) if i not in png]
        got = decode_batch([sources[i] for i in rest], scale, threads, keep,
                           None if sample_ids is None else [sample_ids[i] for i in rest]) if rest else []
        arrs: list = [None] * len(sources)
        for i, a in zip(rest, got or []):
            arrs[i] = a
        for i in sorted(png):
            try:
                a = decode_png(sources[i])
            except RuntimeError as e:
                raise ValueError(f"sample {sample_ids[i] if sample_ids is not None else i}: {e}") from None
            arrs[i] = a if scale == 1 else np.asarray(Image.fromarray(a).reduce(scale))
        return arrs if keep else None
    hold: list = []
    for i, s in enumerate(sources):
        if isinstance(s, np.ndarray) or s is None:
            raise ValueError(f"sources[{i}] must be JPEG (or PNG) bytes")
    desc = _describe(sources, hold, "sources")
    n = len(sources)
    bad = ctypes.c_int64(-1)
    nt = int(threads or 0)
    if not keep:
        st = lib.fl_decode_batch(desc.ctypes.data, n, scale, None, None, nt, ctypes.byref(bad))
        _decode_error(lib, st, bad.value, sample_ids)
        return None
    hw = np.zeros((n, 2), np.int32)
    st = lib.fl_jpeg_dims_batch(desc.ctypes.data, n, scale, hw.ctypes.data, hw.size, nt, ctypes.byref(bad))
    _decode_error(lib, st, bad.value, sample_ids)
    arrs = [np.empty((int(a), int(b), 3), np.uint8) for a, b in hw]
    ptrs = (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrs])
    caps = np.array([a.nbytes for a in arrs], np.int64)
    st = lib.fl_decode_batch(desc.ctypes.data, n, scale, ptrs, caps.ctypes.data, nt, ctypes.byref(bad))
    _decode_error(lib, st, bad.value, sample_ids)
    return arrs


def crop_floor_batch(sources: Sequence, crops, out_size=(224, 224), dct_scale: str = "pow2",
                     threads: Optional[int] = None, keep: bool = True):
    """The JPEG decode floor of each source's crop: what any JPEG loader must decode to produce
    that crop at ``out_size`` (the benchmark's ``decode_floor`` pipeline). Rows above the crop
    are skipped with ``jpeg_skip_scanlines`` (entropy decoding, no IDCT), columns outside it are
    cut with ``jpeg_crop_scanline``, the crop's rows are decoded at the DCT scale the loader's
    rule picks, and decoding stops after the crop's last row.

    ``crops``: (n, 4) uint16 quantized boxes (top, left, height, width; the stored
    augmentations' ``crop`` field). Returns, when ``keep``, a list of (region, pixels): region
    (y0, x0, h, w) in pixels of the image decoded at that scale, pixels its uint8 HWC RGB;
    ``None`` when ``keep=False`` (pixels discarded: only the decoding is timed).

    Example:
        >>> import io, numpy as np
        >>> from PIL import Image
        >>> buf = io.BytesIO(); Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, "JPEG")
        >>> # a 48 x 32 crop for an 8 x 8 output: decoded at 1/4 scale
        >>> (region, px), = crop_floor_batch([buf.getvalue()], np.array([[0, 0, 65535, 32768]]), (8, 8))
        >>> region, px.shape
        ((0, 0, 12, 8), (12, 8, 3))
    """
    lib = _lib()
    if not lib.fl_replay_have_jpeg():
        raise RuntimeError("crop_floor_batch needs the native JPEG decoder (fastload built without libjpeg)")
    crops = np.ascontiguousarray(crops, dtype=np.uint16).reshape(-1, 4)
    n = len(sources)
    if crops.shape[0] != n:
        raise ValueError(f"crops has {crops.shape[0]} rows for {n} sources")
    hold: list = []
    for i, s in enumerate(sources):
        if isinstance(s, np.ndarray) or s is None:
            raise ValueError(f"sources[{i}] must be JPEG bytes")
    desc = _describe(sources, hold, "sources")
    regions = np.zeros((n, 4), np.int32)
    bad = ctypes.c_int64(-1)
    nt = int(threads or 0)
    rule = _dct_code(dct_scale)
    oh, ow = int(out_size[0]), int(out_size[1])
    if not keep:
        st = lib.fl_crop_floor_batch(desc.ctypes.data, crops.ctypes.data, n, oh, ow, rule, None, None,
                                     regions.ctypes.data, nt, ctypes.byref(bad))
        _decode_error(lib, st, bad.value, None)
        return None
    hw = np.zeros((n, 2), np.int32)  # full-scale dims bound every region
    st = lib.fl_jpeg_dims_batch(desc.ctypes.data, n, 1, hw.ctypes.data, hw.size, nt, ctypes.byref(bad))
    _decode_error(lib, st, bad.value, None)
    bufs = [np.empty(int(a) * int(b) * 3, np.uint8) for a, b in hw]
    ptrs = (ctypes.c_void_p * n)(*[b.ctypes.data for b in bufs])
    caps = np.array([b.nbytes for b in bufs], np.int64)
    st = lib.fl_crop_floor_batch(desc.ctypes.data, crops.ctypes.data, n, oh, ow, rule, ptrs, caps.ctypes.data,
                                 regions.ctypes.data, nt, ctypes.byref(bad))
    _decode_error(lib, st, bad.value, None)
    out = []
    for b, (y0, x0, h, w) in zip(bufs, regions.tolist()):
        out.append(((y0, x0, h, w), b[:h * w * 3].reshape(h, w, 3)))
    return out


def _decode_error(lib, status, i, sample_ids):
    if status == 0:
        return
    msg = (lib.fl_last_error() or b"").decode("utf-8", "replace")
    if i >= 0:
        name = sample_ids[i] if sample_ids is not None else i
        raise ValueError(f"decode_batch: sample {name} (position {i}): {msg.split(': ', 1)[-1]}")
    raise ValueError(f"decode_batch: {msg}")


def add_restarts(data: bytes, what: str = "image") -> bytes:
    """``data`` losslessly transcoded so the loader can start decoding at any MCU row: a
    baseline (or progressive) Huffman JPEG becomes baseline with a restart marker opening
    every MCU row and optimized Huffman tables. The quantized coefficients and tables are
    untouched, so every decoder gives the same pixels as before; the file is usually a few %
    smaller. The loader then decodes a crop from the MCU row above it instead of
    entropy-decoding every row above (``jpeg_skip_scanlines`` does), ~1/5 of a
    RandomResizedCrop render. Anything else (arithmetic coding, a file already so marked,
    not a JPEG) comes back unchanged. A corrupt JPEG raises ``ValueError`` naming ``what``."""
    b = bytes(data)
    if b[:2] != b"\xff\xd8" or not have_jpeg():
        return b
    lib = _lib()
    cap = len(b) + len(b) // 4 + 65536
    for _ in range(2):
        out = np.empty(cap, np.uint8)
        n = ctypes.c_int64(0)
        st = lib.fl_jpeg_add_restarts(b, len(b), out.ctypes.data, cap, ctypes.byref(n))
        if st == 1:
            return b
        if st != 0:
            msg = (lib.fl_last_error() or b"").decode("utf-8", "replace")
            raise ValueError(f"{what}: {msg.split(': ', 1)[-1]}")
        if n.value <= cap:
            return out[:n.value].tobytes()
        cap = n.value
    raise RuntimeError(f"{what}: the transcode did not fit {cap} bytes twice")


def slice_count() -> int:
    """Renders decoded from a restart-marker slice in this process (tests and benchmarks)."""
    return int(_lib().fl_jpeg_slice_count()) if have_jpeg() else 0


def _encode_jpeg(pixels: np.ndarray, quality: int = 90, progressive: bool = False, arithmetic: bool = False,
                 subsample: bool = True) -> bytes:
    """Encode with the library's libjpeg (tests and fuzzing: Pillow cannot write arithmetic
    coding). ``pixels``: uint8 HxW (grayscale), HxWx3 (RGB) or HxWx4 (CMYK)."""
    a = np.ascontiguousarray(pixels, dtype=np.uint8)
    comps = 1 if a.ndim == 2 else a.shape[2]
    cap = a.size * 2 + 65536
    out = np.empty(cap, np.uint8)
    n = ctypes.c_int64(0)
    lib = _lib()
    _native.check(lib, lib.fl_jpeg_encode_test(a.ctypes.data, a.shape[0], a.shape[1], comps, int(quality),
                                                int(progressive), int(arithmetic), int(subsample),
                                                out.ctypes.data, cap, ctypes.byref(n)), "encode")
    return out[:n.value].tobytes()
