"""The one declaration of the stored augmentation records and of the replay kernel's options.

Everything that knows a record's layout is derived from the tables below:

- the numpy dtypes (``params.AUG_DTYPE``, ``params.AUG_EXT_DTYPE``);
- the C header ``csrc/include/fl_aug.h`` (generated: ``python -m fastload.sample.schema
  --write``; ``tests/test_schema.py`` regenerates it in memory and compares), with a
  ``static_assert(offsetof(...))`` for every field and a layout hash per record kind that
  ``fastload.replay.native`` compares with this module's when it loads the library;
- the ctypes options struct of ``fastload.replay.native``;
- the Triton kernel's parameter columns and op ids (``kernels/replay.py``);
- the shard codec's column groups and pixel-mode boxes (``fastload.format.shards``);
- the field-tagged ``augs_ext`` storage (``fastload.format.record_ext``);
- the export columns (``fastload.tools.export``);
- the manifest's RandAugment op table (written by :func:`manifest_tables`, checked on open with
  :func:`op_table_problem`).

Adding an extension field: append a :class:`Field` to ``AUG_EXT`` and regenerate the header
(old datasets read it as its ``default``). Adding a RandAugment op family: append its ops to
``RA_OP_TABLE`` (new ids, never reorder: ids are stored on disk), name the family in
``RA_FAMILIES`` and its semantics in ``RA_SEMANTICS``, regenerate the header; then write the
C++ op, the Triton fragment and the reference.

The base record ``AUG`` is frozen: its blob format (``shards.encode_augs``) is by position
within codec groups, and every existing dataset holds it. New data goes to the extension.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
from typing import Dict, Optional, Tuple

import numpy as np

# -- quantization: every fraction is an integer q in [0, Q]; the dequantization rule, as data
Q = 65535
# dq(q, n) = (q * n + DQ_ROUND) // Q, in integers wide enough for q * n (64-bit): half up.
DQ_ROUND = Q // 2
MAX_RA = 4
RA_NONE = 255


def dq(q: int, n: int) -> int:
    """The one dequantization rule (integer arithmetic: no tie-rounding differences)."""
    return (int(q) * int(n) + DQ_ROUND) // Q


def dq_array(q: np.ndarray, n) -> np.ndarray:
    """:func:`dq` on arrays (int64 products)."""
    return (np.asarray(q).astype(np.int64) * np.asarray(n, dtype=np.int64) + DQ_ROUND) // Q


def box_to_pixels_array(q: np.ndarray, h, w):
    """Quantized (top, left, height, width) boxes [n, 4] -> integer boxes inside h x w images
    (arrays or scalars): (top, left, bh, bw), each [n]; ``params.box_to_pixels`` for arrays."""
    q = np.asarray(q).astype(np.int64)
    h, w = np.asarray(h, np.int64), np.asarray(w, np.int64)
    bh = np.minimum(h, np.maximum(1, dq_array(q[:, 2], h)))
    bw = np.minimum(w, np.maximum(1, dq_array(q[:, 3], w)))
    return np.minimum(dq_array(q[:, 0], h), h - bh), np.minimum(dq_array(q[:, 1], w), w - bw), bh, bw


@dataclasses.dataclass(frozen=True)
class Field:
    """One field of a packed record.

    ``code``: numpy type code (little endian); ``count``: array length (1 = scalar);
    ``default``: the value of an 'empty' record (what a dataset without the field reads);
    ``box``: for a quantized (top, left, height, width) box, the grid its fractions refer to
    ("source", "partner" or "output"); ``bits``: names of flag bits (value, name, export
    column or None); ``group``: the shard codec group (base record); ``export``: column name
    (prefix for boxes) of ``fastload inspect --export``, None = not exported directly;
    ``present``: when the exported value is meaningful (None: always; ("flag", name): a bit
    of ``flags``; ("nonzero", component); ("partner",): the record has a partner; ("ext", name):
    a bit of the extension's ``ext``).
    """

    name: str
    code: str
    count: int = 1
    doc: str = ""
    default: object = 0  # a scalar, or one value per component
    box: Optional[str] = None
    quant: Optional[str] = None  # "fraction": q / Q
    bits: Tuple[tuple, ...] = ()
    role: Optional[str] = None  # "op_ids", "op_bins", "op_values" (per slot of the op_ids field `of`), "index"
    of: Optional[str] = None
    group: int = -1
    export: Optional[str] = None
    present: Optional[tuple] = None

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.code)

    @property
    def size(self) -> int:
        return self.dtype.itemsize * self.count


@dataclasses.dataclass(frozen=True)
class Record:
    kind: str      # storage / manifest name
    cname: str     # C++ struct name
    packed: bool
    fields: Tuple[Field, ...]
    doc: str = ""

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.kind} has no field {name!r}")

    def offsets(self) -> Dict[str, int]:
        out, pos = {}, 0
        for f in self.fields:
            a = 1 if self.packed else min(f.dtype.itemsize, 8)
            pos = (pos + a - 1) // a * a
            out[f.name] = pos
            pos += f.size
        return out

    @property
    def size(self) -> int:
        if not self.fields:
            return 0
        last = self.fields[-1]
        end = self.offsets()[last.name] + last.size
        a = 1 if self.packed else max(min(f.dtype.itemsize, 8) for f in self.fields)
        return (end + a - 1) // a * a

    def numpy_dtype(self) -> np.dtype:
        if self.packed:
            return np.dtype([(f.name, f.code, (f.count,)) if f.count > 1 else (f.name, f.code)
                             for f in self.fields])
        offs = self.offsets()
        return np.dtype({"names": [f.name for f in self.fields],
                         "formats": [(f.code, (f.count,)) if f.count > 1 else f.code for f in self.fields],
                         "offsets": [offs[f.name] for f in self.fields], "itemsize": self.size})

    def empty(self, shape) -> np.ndarray:
        a = np.zeros(shape, dtype=self.numpy_dtype())
        for f in self.fields:
            if f.default:
                a[f.name] = f.default
        return a

    def layout_string(self) -> str:
        offs = self.offsets()
        return f"{self.cname}/{self.size}:" + ";".join(
            f"{f.name}:{f.code}:{f.count}@{offs[f.name]}" for f in self.fields)

    def layout_hash(self) -> int:
        """64-bit hash of names, types, counts and offsets (also the C constant)."""
        return int.from_bytes(hashlib.sha256(self.layout_string().encode()).digest()[:8], "little") >> 1


_BOX = "top, left, height, width as fractions of the {}, 1/Q units"

# (value, name, export column or None, when the column is meaningful: see Field.present)
FLAG_BITS = ((1, "flip", "flip", None), (2, "partner_flip", "partner_flip", ("partner",)),
             (4, "mixup", None, None), (8, "cutmix", None, None))
EXT_BITS = ((1, "ra_float", None, None), (2, "erase_black", "erase_black", None),
            (4, "cutmix_empty", "cutmix_empty", None), (8, "partner_aug", None, None))

AUG = Record("augs", "Aug", True, (
    Field("crop", "<u2", 4, "RandomResizedCrop box: " + _BOX.format("source image"), default=(0, 0, Q, Q),
          box="source",
          group=0, export="crop"),
    Field("flags", "u1", 1, "flag bits", bits=FLAG_BITS, group=1),
    Field("ra_ops", "u1", MAX_RA, "RandAugment op ids in the order applied (RA_NONE: unused slot)",
          default=RA_NONE, group=1, export="ra_ops", role="op_ids"),
    Field("ra_mags", "i1", MAX_RA, "signed magnitude bins (sign = direction for signed ops)", group=1,
          export="ra_magnitudes", role="op_bins", of="ra_ops"),
    Field("erase", "<u2", 4, "RandomErasing box: " + _BOX.format("output") + "; width 0 = none", box="output",
          group=2, export="erase", present=("nonzero", 3)),
    Field("partner", "<i4", 1, "dataset index of the MixUp/CutMix partner (-1: none)", default=-1, group=1,
          export="mix_partner", present=("partner",), role="index"),
    Field("pcrop", "<u2", 4, "the partner's crop: " + _BOX.format("partner image"), box="partner", group=0,
          export="partner_crop", present=("partner",)),
    Field("mixup", "<u2", 1, "MixUp lambda, 1/Q units (flag mixup)", quant="fraction", group=2,
          export="mixup_lambda", present=("flag", "mixup")),
    Field("cutmix", "<u2", 4, "CutMix box: " + _BOX.format("output") + " (flag cutmix)", box="output", group=2,
          export="cutmix", present=("flag", "cutmix")),
), "The stored augmentation record (one per stored augmentation). Frozen.")

AUG_EXT = Record("augs_ext", "AugExt", True, (
    Field("ext", "u1", 1, "extension bits", bits=EXT_BITS),
    Field("ra_vals", "<f4", MAX_RA, "float RandAugment magnitudes (ext ra_float); translations in box-grid pixels",
          export="ra_values", role="op_values", of="ra_ops", present=("ext", "ra_float")),
    Field("pra_ops", "u1", MAX_RA, "the partner's own RandAugment op ids (ext partner_aug)", default=RA_NONE,
          export="partner_ra_ops", role="op_ids", present=("ext", "partner_aug")),
    Field("pra_mags", "i1", MAX_RA, "the partner's magnitude bins", export="partner_ra_magnitudes", role="op_bins",
          of="pra_ops", present=("ext", "partner_aug")),
    Field("pra_vals", "<f4", MAX_RA, "the partner's float magnitudes", export="partner_ra_values",
          role="op_values", of="pra_ops", present=("ext", "ra_float")),
    Field("perase", "<u2", 4, "the partner's erase box: " + _BOX.format("output") + "; width 0 = none",
          box="output", export="partner_erase", present=("nonzero", 3)),
    Field("mixup_f", "<f8", 1, "exact MixUp lambda (informational: kernels use Aug.mixup)",
          export="mixup_lambda_exact", present=("flag", "mixup")),
    Field("cutmix_lam", "<f8", 1, "exact CutMix Beta draw (informational)", export="cutmix_lambda"),
), "Schema-v2 extension record (one per base record; optional column augs_ext).")

# The options of the replay entry point fl_replay (natural alignment, not stored anywhere).
REPLAY_OPTIONS = Record("replay_options", "ReplayOptions", False, (
    Field("out_bytes", "<i8", 1, "capacity of the output buffer in bytes"),
    Field("dtype", "<i4", 1, "output dtype: 0 float32, 1 float16, 2 uint8 (no normalization)"),
    Field("out_h", "<i4", 1, "output height"),
    Field("out_w", "<i4", 1, "output width"),
    Field("interpolation", "<i4", 1, "0 bilinear, 1 bicubic"),
    Field("dct_rule", "<i4", 1, "JPEG DCT scaling rule: 0 off, 1 pow2, 2 m8"),
    Field("decoder_flags", "<i4", 1, "measurement switches: 1 ifast IDCT, 2 no fancy upsampling"),
    Field("ra_num_bins", "<i4", 1, "RandAugment magnitude bins the records' bins refer to"),
    Field("ra_semantics", "<i4", 1, "RandAugment arithmetic: an id of RA_SEMANTICS"),
    Field("grid_h", "<i4", 1, "box grid of float translations (0: the output)"),
    Field("grid_w", "<i4", 1, ""),
    Field("threads", "<i4", 1, "native threads (0: the pool default)"),
    Field("mean", "<f4", 3, "Normalize mean"),
    Field("std", "<f4", 3, "Normalize std"),
    Field("ra_fill", "<i4", 3, "fill colour of the geometric ops of the timm semantics (timm's img_mean)"),
    Field("resize", "<i4", 1, "crop resize arithmetic: an id of RESIZE_MODES"),
), "Options of fl_replay.")

RECORDS = (AUG, AUG_EXT, REPLAY_OPTIONS)  # the index is the kind id of fl_replay_layout_hash

# -- RandAugment: op ids are stored on disk: append only, never reorder.
# (id, name, signed, family)
RA_OP_TABLE = (
    (0, "Identity", False, "torchvision"), (1, "ShearX", True, "torchvision"),
    (2, "ShearY", True, "torchvision"), (3, "TranslateX", True, "torchvision"),
    (4, "TranslateY", True, "torchvision"), (5, "Rotate", True, "torchvision"),
    (6, "Brightness", True, "torchvision"), (7, "Color", True, "torchvision"),
    (8, "Contrast", True, "torchvision"), (9, "Sharpness", True, "torchvision"),
    (10, "Posterize", False, "torchvision"), (11, "Solarize", False, "torchvision"),
    (12, "AutoContrast", False, "torchvision"), (13, "Equalize", False, "torchvision"),
    # timm's RandAugment ops (timm.data.auto_augment, on PIL images). A record of this family
    # holds the level (timm's magnitude after noise and clipping) in the extension's ra_vals;
    # ra_mags holds the other draws: its sign is timm's random negation (ops marked signed),
    # |ra_mags| 2 = BICUBIC resampling, 1 = BILINEAR (geometric ops; 1 for the others).
    (14, "TimmAutoContrast", False, "timm"), (15, "TimmEqualize", False, "timm"),
    (16, "TimmInvert", False, "timm"), (17, "TimmRotate", True, "timm"),
    (18, "TimmPosterize", False, "timm"), (19, "TimmPosterizeIncreasing", False, "timm"),
    (20, "TimmSolarize", False, "timm"), (21, "TimmSolarizeIncreasing", False, "timm"),
    (22, "TimmSolarizeAdd", False, "timm"), (23, "TimmColor", False, "timm"),
    (24, "TimmColorIncreasing", True, "timm"), (25, "TimmContrast", False, "timm"),
    (26, "TimmContrastIncreasing", True, "timm"), (27, "TimmBrightness", False, "timm"),
    (28, "TimmBrightnessIncreasing", True, "timm"), (29, "TimmSharpness", False, "timm"),
    (30, "TimmSharpnessIncreasing", True, "timm"), (31, "TimmShearX", True, "timm"),
    (32, "TimmShearY", True, "timm"), (33, "TimmTranslateXRel", True, "timm"),
    (34, "TimmTranslateYRel", True, "timm"),
)
RA_FAMILIES = {"torchvision": "torchvision.transforms(.v2).RandAugment's op space, in its order",
               "timm": "timm's RandAugment ops (rand-... configs), named Timm + timm's op name"}
# semantics name -> (id in ReplayOptions.ra_semantics, op family)
RA_SEMANTICS = {"v1": (0, "torchvision"), "v2": (1, "torchvision"), "pil": (2, "torchvision"),
                "timm": (3, "timm")}
# The crop resize's arithmetic (AugmentPolicy.resize) -> id in ReplayOptions.resize:
# "torch": F.interpolate(antialias=True) on float, round half-even (torchvision's tensor path);
# "pil": Pillow's Image.resize (libImaging Resample.c, fixed point), the JPEG decoded at full
# scale, Pillow >= 13's pass order (the vertical pass first when the height shrinks by more than
# twice as many pixels as the width); "pil12": the same with Pillow <= 12's order (always
# horizontal first). The uint8 intermediate between the passes makes the order visible.
RESIZE_MODES = {"torch": 0, "pil": 1, "pil12": 2}
# timm's op sets (timm.data.auto_augment _RAND_TRANSFORMS / _RAND_INCREASING_TRANSFORMS), in order
TIMM_RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
                 "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
                 "TranslateYRel")
TIMM_RAND_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                            "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                            "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
                            "TranslateXRel", "TranslateYRel")
# the timm ops whose resampling filter is drawn (geometric) in the record's |ra_mags|
TIMM_GEOMETRIC = frozenset(("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"))

RA_OPS = tuple(name for _, name, _, _ in RA_OP_TABLE)
RA_SIGNED = frozenset(name for _, name, s, _ in RA_OP_TABLE if s)
RA_OP_ID = {name: i for i, name, _, _ in RA_OP_TABLE}


def family_ops(semantics: str) -> Tuple[int, ...]:
    """The op ids a policy with ``semantics`` samples from."""
    fam = RA_SEMANTICS[semantics][1]
    return tuple(i for i, _, _, f in RA_OP_TABLE if f == fam)


def _check_tables() -> None:
    ids = [i for i, *_ in RA_OP_TABLE]
    assert ids == list(range(len(ids))) and len(ids) < RA_NONE, "op ids must be 0..n-1 in order"
    assert all(f in RA_FAMILIES for *_, f in RA_OP_TABLE)
    assert all(fam in RA_FAMILIES for _, fam in RA_SEMANTICS.values())
    assert all(f"Timm{n}" in RA_OP_ID for n in TIMM_RAND_OPS + TIMM_RAND_INCREASING_OPS)
    for rec in RECORDS:
        assert len({f.name for f in rec.fields}) == len(rec.fields)


_check_tables()


# -- derived views
def codec_groups(rec: Record = AUG) -> Tuple[Tuple[str, ...], ...]:
    """The shard codec's column groups (fields of similar statistics, one frame each)."""
    n = max(f.group for f in rec.fields) + 1
    return tuple(tuple(f.name for f in rec.fields if f.group == g) for g in range(n))


def box_fields(rec: Record = AUG) -> Tuple[str, ...]:
    return tuple(f.name for f in rec.fields if f.box)


def bit(rec: Record, field: str, name: str) -> int:
    for v, n, *_ in rec.field(field).bits:
        if n == name:
            return v
    raise KeyError(f"{rec.kind}.{field} has no bit {name!r}")


def device_columns(rec: Record = AUG, skip=("ra_ops", "ra_mags", "partner", "mixup")) -> Dict[str, int]:
    """Column of each field in the Triton kernel's int32 parameter rows (fields the kernel
    reads per pixel; RandAugment and the MixUp lambda travel separately)."""
    cols, pos = {}, 0
    for f in rec.fields:
        if f.name in skip:
            continue
        cols[f.name] = pos
        pos += f.count
    return cols


# -- manifest tables
def manifest_tables() -> dict:
    """What a producer writes into manifest.json (the one writer of the op table)."""
    return {"ra_ops": list(RA_OPS)}


def op_table_problem(ops) -> Optional[str]:
    """What is wrong with a dataset's stored op table (None: nothing). It must be a prefix
    of this fastload's: op ids are stored, so a renamed or unknown op changes their meaning.
    A dataset without the table (``ops is None``) reads as before."""
    if ops is None:
        return None
    if not isinstance(ops, list) or not all(isinstance(o, str) for o in ops):
        return "ra_ops must be a list of op names"
    if len(ops) > len(RA_OPS):
        return (f"the dataset's RandAugment op table has {len(ops)} ops, this fastload knows {len(RA_OPS)} "
                f"({', '.join(ops[len(RA_OPS):])} unknown): upgrade fastload to read it")
    for i, (a, b) in enumerate(zip(ops, RA_OPS)):
        if a != b:
            return (f"the dataset's RandAugment op {i} is {a!r}, this fastload's is {b!r}: its stored op ids "
                    f"mean other ops")
    return None


# -- the C header
HEADER = os.path.join("csrc", "include", "fl_aug.h")
_CTYPE = {"u1": "uint8_t", "i1": "int8_t", "<u2": "uint16_t", "<i2": "int16_t", "<u4": "uint32_t",
          "<i4": "int32_t", "<i8": "int64_t", "<f4": "float", "<f8": "double"}


def _camel(s: str) -> str:
    return "".join(p[:1].upper() + p[1:] for p in s.split("_"))


def _struct(rec: Record) -> list:
    L = [f"// {rec.doc}"]
    if rec.packed:
        L.append("#pragma pack(push, 1)")
    L.append(f"struct {rec.cname} {{")
    for f in rec.fields:
        arr = f"[{f.count}]" if f.count > 1 else ""
        doc = f"  // {f.doc}" if f.doc else ""
        L.append(f"  {_CTYPE[f.code]} {f.name}{arr};{doc}")
    L.append("};")
    if rec.packed:
        L.append("#pragma pack(pop)")
    offs = rec.offsets()
    for f in rec.fields:
        L.append(f"static_assert(offsetof({rec.cname}, {f.name}) == {offs[f.name]}, \"{rec.cname}.{f.name}\");")
    L.append(f"static_assert(sizeof({rec.cname}) == {rec.size}, \"sizeof({rec.cname})\");")
    L.append(f"constexpr uint64_t k{rec.cname}LayoutHash = {rec.layout_hash()}ULL;  // {rec.layout_string()}")
    return L


def render_header() -> str:
    L = ["// GENERATED by `python -m fastload.sample.schema --write` from fastload/sample/schema.py.",
         "// Do not edit: change the schema and regenerate (tests/test_schema.py checks this file).",
         "#pragma once", "#include <cstddef>", "#include <cstdint>", "#include <cstring>", "",
         "namespace fl {", "",
         f"constexpr uint32_t kQ = {Q};  // quantization of every fraction",
         f"constexpr uint32_t kDqRound = {DQ_ROUND};",
         f"constexpr int kMaxRA = {MAX_RA};", f"constexpr uint8_t kRANone = {RA_NONE};"]
    for prefix, bits in (("kFlag", FLAG_BITS), ("kExt", EXT_BITS)):
        L.append("constexpr uint8_t " + ", ".join(f"{prefix}{_camel(n)} = {v}" for v, n, *_ in bits) + ";")
    L += ["", "// RandAugment op ids (stored on disk)", "enum RAOpId : uint8_t {"]
    L += [f"  kRA{name} = {i},  // {fam}" for i, name, _, fam in RA_OP_TABLE]
    L += [f"  kRANumOps = {len(RA_OP_TABLE)}", "};",
          "// Whether an op's magnitude is signed (a negative bin means the other direction).",
          "inline bool ra_signed(int op) {", "  switch (op) {"]
    L += [f"    case kRA{name}:" for _, name, signed, _ in RA_OP_TABLE if signed]
    L += ["      return true;", "    default:", "      return false;", "  }", "}",
          "// ReplayOptions::ra_semantics"]
    L += [f"constexpr int kRASem{_camel(n)} = {i};  // family {fam}" for n, (i, fam) in RA_SEMANTICS.items()]
    L += ["inline bool ra_semantics_known(int s) {", "  switch (s) {"]
    L += [f"    case kRASem{_camel(n)}:" for n in RA_SEMANTICS]
    L += ["      return true;", "    default:", "      return false;", "  }", "}"]
    L += ["// ReplayOptions::resize"]
    L += [f"constexpr int kResize{_camel(n)} = {i};" for n, i in RESIZE_MODES.items()]
    L += [f"constexpr int kResizeModes = {len(RESIZE_MODES)};  // ids are 0 .. kResizeModes - 1"]
    L.append("")
    for k, rec in enumerate(RECORDS):
        L += _struct(rec)
        L.append(f"constexpr int k{rec.cname}Kind = {k};")
        L.append("")
    # An aligned copy of an extension record (the packed one may sit at any address).
    ext = AUG_EXT
    L += ["// An aligned copy of one extension record (packed records may sit at any address).",
          "struct ExtView {"]
    L += [f"  {_CTYPE[f.code]} {f.name}{f'[{f.count}]' if f.count > 1 else ''};" for f in ext.fields]
    L += ["};", "", "inline void load_ext(const AugExt* src, ExtView* v) {",
          "  const char* b = reinterpret_cast<const char*>(src);"]
    L += [f"  std::memcpy({'&' if f.count == 1 else ''}v->{f.name}, b + offsetof(AugExt, {f.name}), "
          f"sizeof(v->{f.name}));" for f in ext.fields]
    L += ["}", "",
          "// The dequantization rule (schema.dq): 64-bit products, half up.",
          "inline int dq(uint32_t q, int n) { return (int)(((uint64_t)q * (uint64_t)n + kDqRound) / kQ); }", "",
          "// Integer box inside an h x w image from a quantized (top, left, height, width). q points",
          "// into a packed record (any alignment): read with memcpy, never as uint16_t loads.",
          "inline void box_to_pixels(const uint16_t* q_any, int h, int w, int* top, int* left, int* bh, int* bw) {",
          "  uint16_t q[4];", "  std::memcpy(q, (const void*)q_any, sizeof q);",
          "  int hh = dq(q[2], h), ww = dq(q[3], w);",
          "  hh = hh < 1 ? 1 : (hh > h ? h : hh);", "  ww = ww < 1 ? 1 : (ww > w ? w : ww);",
          "  int t = dq(q[0], h), l = dq(q[1], w);",
          "  *top = t > h - hh ? h - hh : t;", "  *left = l > w - ww ? w - ww : l;",
          "  *bh = hh;", "  *bw = ww;", "}", "", "}  // namespace fl", ""]
    return "\n".join(L)


def _root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m fastload.sample.schema",
                                 description="Generate (or check) csrc/include/fl_aug.h from the record schema.")
    ap.add_argument("--write", action="store_true", help="write the header (default: check it)")
    args = ap.parse_args(argv)
    path = os.path.join(_root(), HEADER)
    text = render_header()
    if args.write:
        with open(path, "w") as f:
            f.write(text)
        print(f"wrote {path}")
        return 0
    try:
        with open(path) as f:
            same = f.read() == text
    except OSError:
        same = False
    print(f"{path}: {'up to date' if same else 'OUT OF DATE (run with --write)'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
