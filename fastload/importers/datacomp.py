"""Import DataCompDR-style WebDataset shards into the reinforced format (kind ``image_text``).

Per sample (WebDataset: tar members ``<key>.<ext>``) the reinforcement tars hold
``syn.json`` (synthetic captions: a list, or ``{"syn_text": [...]}``), ``paug.json`` (per
augmentation ml-dr's compressed parameters ``[[i, j, h, w], [[op, mag], ...]]`` with the
crop in source pixels, the op a RandAugment name or index; or ``{"param_aug": [...]}``, the
real DataCompDR-12M layout) and ``npz`` (``image_emb`` [N, D] and ``text_emb`` [C + S, D]:
real captions then synthetic ones, float32, or bfloat16 bit patterns stored as uint16);
``url.txt`` and ``json`` (per-sample metadata) may be present and are not needed.
Magnitudes are DataCompDR's floats (the value torchvision's ``_apply_op`` receives, drawn on
the ``reinforce_size`` crop, 224): stored exactly in the schema-v2 extension record, and as
the matching bin when they are one (always, for DataCompDR-12M); an integer magnitude is a
signed bin (fastload's own layout). A RandAugment entry of ``null`` (skipped) is no op. Images are not part of DataCompDR: they are joined by key from image tars
or a folder (``<key>.jpg``), with the real caption from ``<key>.txt`` or ``<key>.json``
(``{"caption": ...}``). Embeddings are stored as fp16.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import zipfile
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from fastload.format.images import stored_image_bytes
from fastload.format.record_ext import encode_ext
from fastload.importers.shardjobs import read_staged_parts, stage_parts
from fastload.format.shards import encode_array, encode_augs
from fastload.format.writer import DatasetWriter, write_shard_file
from fastload.sample import params as P

_IMG_EXT = ("jpg", "jpeg", "png", "webp")
MAX_MEMBER = 256 << 20  # no single tar member / npz array may claim more (bounded reads)


def _split(name: str) -> Tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the basename."""
    d, b = os.path.split(name)
    if "." not in b:
        return name, ""
    stem, ext = b.split(".", 1)
    return (os.path.join(d, stem) if d else stem), ext.lower()


def _iter_tar_samples(path: str) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """Group consecutive members of a tar by key."""
    try:
        tf = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"{path}: not a readable tar file ({e})") from e
    with tf:
        cur, parts = None, {}
        for m in tf:
            if not m.isfile():
                continue
            if m.size > MAX_MEMBER:
                raise ValueError(f"{path}: member {m.name!r} is {m.size} bytes, over the {MAX_MEMBER} limit")
            key, ext = _split(m.name)
            if key != cur and cur is not None:
                yield cur, parts
                parts = {}
            cur = key
            f = tf.extractfile(m)
            parts[ext] = f.read(m.size) if f is not None else b""
        if cur is not None:
            yield cur, parts


class _ImageIndex:
    """key -> (image bytes, real caption) from image tars or a folder, read lazily."""

    def __init__(self, images: Sequence[str]):
        self.tar_members: Dict[str, Dict[str, Tuple[str, int, int]]] = {}
        self.folder: Optional[str] = None
        for src in images:
            if os.path.isdir(src):
                self.folder = src
                continue
            try:
                tf = tarfile.open(src, "r:")
            except (tarfile.TarError, OSError) as e:
                raise ValueError(f"images: {src!r} is neither a folder nor an uncompressed tar ({e})") from e
            with tf:
                for m in tf:
                    if m.isfile():
                        key, ext = _split(m.name)
                        self.tar_members.setdefault(key, {})[ext] = (src, m.offset_data, m.size)

    def _read(self, spec) -> bytes:
        path, off, size = spec
        if size > MAX_MEMBER:
            raise ValueError(f"{path}: member of {size} bytes over the limit")
        with open(path, "rb") as f:
            f.seek(off)
            return f.read(size)

    def get(self, key: str) -> Tuple[Optional[bytes], Optional[str]]:
        img = cap = None
        parts = self.tar_members.get(key)
        if parts:
            for ext in _IMG_EXT:
                if ext in parts:
                    img = self._read(parts[ext])
                    break
            if "txt" in parts:
                cap = self._read(parts["txt"]).decode("utf-8", "replace")
            elif "json" in parts:
                cap = _caption_from_json(self._read(parts["json"]))
        if img is None and self.folder:
            for ext in _IMG_EXT:
                p = os.path.join(self.folder, f"{key}.{ext}")
                if os.path.isfile(p):
                    with open(p, "rb") as f:
                        img = f.read()
                    break
            p = os.path.join(self.folder, f"{key}.txt")
            if cap is None and os.path.isfile(p):
                with open(p, encoding="utf-8", errors="replace") as f:
                    cap = f.read()
        return img, cap


def _caption_from_json(b: bytes) -> Optional[str]:
    try:
        d = json.loads(b)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return d.get("caption") if isinstance(d, dict) else None


NPZ_FIELDS = ("image_emb", "text_emb", "syn_text_emb")


def _load_npz(b: bytes, key: str) -> Tuple[np.ndarray, np.ndarray, Optional[int]]:
    """(image_emb [N, D], text_emb [C + S, D], S or None). The newer ml-mobileclip layout keeps
    the synthetic captions' embeddings apart (``text_emb`` real ones, ``syn_text_emb``
    synthetic ones): they are stacked after the real ones, as the older layout stores them,
    and S is returned so that the caller can check it against syn.json."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(b))
        for info in zf.infolist():
            if info.file_size > MAX_MEMBER:
                raise ValueError(f"sample {key!r}: npz member {info.filename} claims {info.file_size} bytes")
        with np.load(io.BytesIO(b), allow_pickle=False) as z:
            if "image_emb" not in z.files or "text_emb" not in z.files:
                raise ValueError(f"sample {key!r}: npz needs image_emb and text_emb, has {z.files}")
            unknown = sorted(set(z.files) - set(NPZ_FIELDS))
            if unknown:  # an embedding silently dropped would be an IndexError at training time
                raise ValueError(f"sample {key!r}: npz fields {unknown[:8]} are not understood (known: "
                                 f"{', '.join(NPZ_FIELDS)})")
            ie, te = z["image_emb"], z["text_emb"]
            se = z["syn_text_emb"] if "syn_text_emb" in z.files else None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"sample {key!r}: corrupt npz ({e})") from e

    def f32(a):
        if a.dtype in (np.uint16, np.int16):  # bfloat16 bit patterns
            return (a.astype(np.uint32) << 16).view(np.float32)
        if a.dtype.kind != "f":
            raise ValueError(f"sample {key!r}: embeddings must be float or bf16 bits, got {a.dtype}")
        return a.astype(np.float32)

    ie, te = f32(ie), f32(te)
    n_syn = None
    if se is not None:
        se = f32(se)
        if te.ndim == 1:  # one real caption stored as a vector
            te = te[None]
        if se.ndim != 2 or te.ndim != 2 or se.shape[1] != te.shape[1]:
            raise ValueError(f"sample {key!r}: text_emb {te.shape} / syn_text_emb {se.shape} must be [*, D] with one D")
        n_syn = se.shape[0]
        te = np.concatenate([te, se])
    if ie.ndim != 2 or te.ndim != 2 or ie.shape[1] != te.shape[1]:
        raise ValueError(f"sample {key!r}: image_emb {ie.shape} / text_emb {te.shape} must be [*, D] with one D")
    return ie, te, n_syn


def _parse_paug(b: bytes, key: str, hw: Tuple[int, int], grid: Tuple[int, int] = (224, 224),
                num_bins: int = 31) -> Tuple[np.ndarray, np.ndarray]:
    try:
        d = json.loads(b)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"sample {key!r}: paug.json is not JSON ({e})") from e
    if isinstance(d, dict):
        unknown = sorted(set(d) - {"param_aug", "params"})
        if unknown:
            raise ValueError(f"sample {key!r}: paug.json fields {unknown[:8]} are not understood (known: "
                             "param_aug, params)")
        d = d.get("param_aug", d.get("params"))
    if not isinstance(d, list) or not d:
        raise ValueError(f"sample {key!r}: paug.json must be a non-empty list of augmentations")
    from fastload.importers.mldr import ra_fields

    H, W = hw
    rec, ext = P.empty(len(d)), P.empty_ext(len(d))
    for n, a in enumerate(d):
        try:
            box, ops = a[0], (a[1] if len(a) > 1 else None)
            i, j, h, w = (int(v) for v in box)
        except (TypeError, ValueError, IndexError) as e:
            raise ValueError(f"sample {key!r}: augmentation {n} is not [[i, j, h, w], [[op, mag], ...]]") from e
        if not (0 <= i and 0 <= j and h >= 1 and w >= 1 and i + h <= H and j + w <= W):
            raise ValueError(f"sample {key!r}: crop {box} outside the {H}x{W} image")
        rec["crop"][n] = P.pixels_to_box(i, j, h, w, H, W)
        if ops is not None and not isinstance(ops, list):
            raise ValueError(f"sample {key!r}: augmentation {n}: RandAugment params must be a list or null")
        o, m, v, off = ra_fields(ops, grid, num_bins, f"sample {key!r}: augmentation {n}")
        rec["ra_ops"][n], rec["ra_mags"][n] = o, m
        if off:  # else the bins reproduce the values exactly
            ext["ra_vals"][n], ext["ext"][n] = v, P.EXT_RA_FLOAT
    return rec, ext


def _convert(key: str, parts: Dict[str, bytes], policy_size: Tuple[int, int], ra_num_bins: int,
             restart_markers: bool = False) -> Dict[str, Any]:
    """One staged sample (its reinforcement members, ``image`` and optional ``caption``) ->
    the row the shard stores; ValueError names what is wrong with it."""
    from PIL import Image

    img = parts["image"]
    try:
        im = Image.open(io.BytesIO(img))
        im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
        im.load()
    except Exception as e:  # any decode failure
        raise ValueError(f"cannot decode image {key!r}: {e}") from e
    w, h = Image.open(io.BytesIO(img)).size
    img = stored_image_bytes(img, f"image {key!r}", restart_markers=restart_markers)[0]  # losslessly
    ie, te, n_syn = _load_npz(parts["npz"], key)
    rec, ext = _parse_paug(parts["paug.json"], key, (h, w), policy_size, ra_num_bins)
    if len(rec) != len(ie):
        raise ValueError(f"sample {key!r}: {len(rec)} augmentations but {len(ie)} image embeddings")
    try:
        syn = json.loads(parts["syn.json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"sample {key!r}: syn.json is not JSON ({e})") from e
    syn = syn.get("syn_text", []) if isinstance(syn, dict) else syn
    if not isinstance(syn, list) or not all(isinstance(s, str) for s in syn):
        raise ValueError(f"sample {key!r}: syn.json must hold a list of captions")
    if n_syn is not None and n_syn != len(syn):
        raise ValueError(f"sample {key!r}: syn_text_emb holds {n_syn} embeddings, syn.json "
                         f"{len(syn)} captions")
    real = parts["caption"].decode("utf-8", "replace") if "caption" in parts else None
    return {"key": key, "image": img, "hw": (h, w), "augs": rec, "ext": ext, "ie": ie, "te": te,
            "real": [real] if real else [], "syn": syn,
            "shape": {"num_augmentations": len(rec), "embedding_dim": int(ie.shape[1]),
                      "num_captions": int(te.shape[0])}}


@dataclasses.dataclass
class _DCJob:
    """What converting one shard needs (sent to Ray tasks once, by reference)."""
    out: str
    stage: str
    shard_size: int
    policy_size: Tuple[int, int]
    ra_num_bins: int
    shape: Dict[str, int]
    on_error: str
    restart_markers: bool = True


def _import_shard(job: _DCJob, s: int) -> Dict[str, Any]:
    """Convert the staged samples of shard ``s`` and write its file; returns the shard's
    entry (with the samples skipped here, under ``on_error="skip"``)."""
    path = os.path.join(job.stage, f"{s:05d}.bin")
    staged = read_staged_parts(path)
    rows, skipped = [], []
    for i in sorted(staged):
        parts = staged[i]
        key = parts.pop("key").decode()
        try:
            r = _convert(key, parts, job.policy_size, job.ra_num_bins, job.restart_markers)
            if r["shape"] != job.shape:
                raise ValueError(f"sample {key!r}: shapes {r['shape']} differ from the first sample's {job.shape}")
        except ValueError as e:
            if job.on_error == "raise":
                raise
            skipped.append({"key": key, "error": str(e)})
            continue
        r["id"] = i
        rows.append(r)
    # no partner crops in DataCompDR: encode_augs needs no table of every row's size
    cols = {"id": [r["id"] for r in rows], "key": [r["key"] for r in rows],
            "hash": [hashlib.blake2b(r["image"], digest_size=16).digest() for r in rows],
            "orig_h": [r["hw"][0] for r in rows], "orig_w": [r["hw"][1] for r in rows],
            "src_h": [r["hw"][0] for r in rows], "src_w": [r["hw"][1] for r in rows],
            "label": [-1] * len(rows), "image": [r["image"] for r in rows],
            "augs": [encode_augs(r["augs"], r["hw"], job.policy_size) for r in rows],
            "image_emb": [encode_array(r["ie"]) for r in rows], "text_emb": [encode_array(r["te"]) for r in rows],
            "captions": [r["real"] for r in rows], "syn_captions": [r["syn"] for r in rows],
            "augs_ext": [encode_ext(r["ext"]) for r in rows]}
    info = write_shard_file(job.out, s, cols, "image_text")
    os.remove(path)
    return dict(info, skipped=skipped) if skipped else info


def _samples(tars: Sequence[str], index: "_ImageIndex", images: Sequence[str]):
    """(key, staged parts, error) per sample in tar order: the members the conversion needs,
    the image joined by key and the real caption; ``error`` when one is missing."""
    for t in tars:
        for key, parts in _iter_tar_samples(t):
            miss = [need for need in ("syn.json", "paug.json", "npz") if need not in parts]
            if miss:
                yield key, None, f"sample {key!r} in {t}: missing {miss[0]}"
                continue
            img, real = index.get(key)
            if img is None:
                yield key, None, f"sample {key!r}: no image with this key in {list(images)}"
                continue
            out = {"key": key.encode(), "syn.json": parts["syn.json"], "paug.json": parts["paug.json"],
                   "npz": parts["npz"], "image": img}
            if real:
                out["caption"] = real.encode("utf-8", "surrogatepass")
            yield key, out, None


def import_datacomp(tars: Sequence[str], out: str, images: Sequence[str], shard_size: int = 1000,
                    image_size: int = 224, on_error: str = "raise", progress: bool = True,
                    teachers: Optional[List[Dict[str, Any]]] = None, reinforce_size: int = 224,
                    ra_num_bins: int = 31, semantics: str = "pil", engine: str = "local",
                    workers: Optional[int] = None, restart_markers: bool = True) -> Dict[str, Any]:
    """Import DataCompDR-style shards ``tars`` (joined by key with ``images``) into ``out``.

    ``reinforce_size``: the crop size the augmentations were drawn on (DataCompDR: 224; the
    grid of float translations); ``image_size``: the replay output size. ``semantics``: the
    RandAugment arithmetic replay reproduces (the policy's ``randaugment_semantics``):
    ``"pil"`` (the default: DataCompDR ran torchvision's RandomResizedCrop and RandAugment on
    PIL images, for its teachers' embeddings and for training; the policy then also gets
    ``resize="pil"``: Pillow's ``Image.resize`` of the crop, byte for byte), or ``"v1"`` /
    ``"v2"`` (tensor ops, with torch's antialiased resize).
    ``engine``: ``"local"`` (this process) or ``"ray"``: this process streams the tars, joins
    the images and stages each shard's members; decoding, checking, converting and writing
    each shard are Ray tasks (``workers``: CPUs for a Ray started here; an initialized Ray is
    used as it is). Both write the same shards, as ml-dr's import does (``import_mldr``).
    Rerunning the same call resumes an interrupted import (finished shards are kept).
    Row ids are the samples' positions in the tars among those with all members and an
    image; a sample skipped at conversion (``on_error="skip"``) leaves its id unused.
    ``restart_markers`` (default True): JPEG images are stored losslessly transcoded with a
    restart marker every ~4 MCUs (:func:`fastload.format.images.with_restart_markers`): the
    same pixels, and the loader decodes only the part of each image around its crop (False:
    byte for byte, as the image tars hold them).

    Example:
        >>> import_datacomp(["dr/00000000.tar"], "datacompdr_fl/", images=["imgs/00000000.tar"])  # doctest: +SKIP
    """
    from fastload._progress import Progress
    from fastload.importers.shardjobs import Shards, checked_args
    from fastload.sample.policy import AugmentPolicy

    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    shard_size = checked_args(engine, shard_size)
    if not tars:
        raise ValueError("tars: give at least one DataCompDR shard")
    for t in tars:
        if not os.path.isfile(t):
            raise ValueError(f"tars: {t!r} does not exist")
    index = _ImageIndex(list(images))
    policy = AugmentPolicy(rrc=True, flip=False, randaugment=(2, 9), interpolation="bicubic",
                           size=(reinforce_size, reinforce_size), ra_num_bins=ra_num_bins,
                           randaugment_semantics=semantics, resize="pil" if semantics == "pil" else "torch")
    skipped: List[Dict[str, str]] = []
    # the dataset's shapes come from the first sample that converts (the header needs them
    # before any shard is written); every sample is checked against them in its shard
    meta: Dict[str, Any] = {}
    for key, parts, err in _samples(tars, index, images):
        if err is None:
            try:
                meta = _convert(key, dict(parts), policy.size, ra_num_bins)["shape"]  # no transcode: shapes only
                break
            except ValueError as e:
                err = str(e)
        if on_error == "raise":
            raise ValueError(err)
    if not meta:
        raise ValueError("no importable samples found")
    digest = hashlib.sha256()
    for t in tars:
        digest.update(f"{os.path.abspath(t)}:{os.path.getsize(t)}\n".encode())
    replay = {"image_size": [image_size, image_size], "box_grid": list(policy.size), "interpolation": "bicubic",
              "dct_scale": False,  # DataCompDR decoded at full size (PIL) before cropping
              "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "kernel": "fastload.replay.native"}
    header = {"kind": "image_text", "num_augmentations": meta["num_augmentations"], "topk": 0, "num_classes": None,
              "seeds": [], "policy": policy.to_dict(), "replay": replay,
              "teachers": teachers or [{"name": "DataCompDR teacher ensemble",
                                        "description": "embeddings imported from DataCompDR shards"}],
              "embedding_dim": meta["embedding_dim"], "num_captions": meta["num_captions"],
              "shard_size": shard_size, "images_stored": True, "source": "datacompdr", "skipped": [],
              "record_ext": True,
              "image_encoding": {"restart_markers": bool(restart_markers)}}
    fp = {"tars": digest.hexdigest(), "images": [os.path.abspath(p) for p in images], "shard_size": shard_size,
          "image_size": image_size, "reinforce_size": reinforce_size, "semantics": semantics, "on_error": on_error}
    w = DatasetWriter(out, header, fp, 0)  # the shard count is known once the tars are read
    done = w.done
    stage = os.path.join(out, ".datacomp-staging")
    shutil.rmtree(stage, ignore_errors=True)  # partial staging of an interrupted run: rebuilt
    os.makedirs(stage)
    job = _DCJob(out, stage, shard_size, tuple(policy.size), ra_num_bins, meta, on_error, bool(restart_markers))
    run = Shards(_import_shard, job, w, engine, workers)
    n = 0
    with Progress(0, f"import DataCompDR ({engine})", "samples", enabled=progress) as bar:
        for key, parts, err in _samples(tars, index, images):
            bar.update()
            if err is not None:
                if on_error == "raise":
                    # a bad sample before this one is the better error: finish the shards
                    # submitted, then check what the incomplete shard staged (this failure only)
                    run.collect(block=True)
                    path = os.path.join(stage, f"{n // shard_size:05d}.bin")
                    if os.path.exists(path):
                        for i, p in sorted(read_staged_parts(path).items()):
                            _convert(p.pop("key").decode(), p, job.policy_size, ra_num_bins)
                    raise ValueError(err)
                skipped.append({"key": key, "error": err})
                continue
            s = n // shard_size
            n += 1
            if s in done:
                continue
            stage_parts(os.path.join(stage, f"{s:05d}.bin"), n - 1, parts)
            if n % shard_size == 0:
                run.submit(s)  # complete: convert it (here, or in a Ray task)
            run.collect(block=False)
        num_shards = -(-n // shard_size)
        if n % shard_size and (num_shards - 1) not in done:
            run.submit(num_shards - 1)
        run.collect(block=True)
    shutil.rmtree(stage, ignore_errors=True)
    w.manifest["num_shards"] = num_shards
    for sh in w.manifest["shards"]:  # samples skipped at conversion, by shard (kept across resumes)
        skipped.extend(sh.get("skipped", []))
    return w.finish(skipped=skipped)


def main(argv=None) -> int:
    """``fastload import-datacomp SHARD.tar... --images TAR_OR_DIR... --out DIR``."""
    from fastload._cli import describe

    ap = argparse.ArgumentParser(prog="fastload import-datacomp", description=describe(__doc__))
    ap.add_argument("tars", nargs="+", help="DataCompDR WebDataset shards (syn.json, paug.json, npz)")
    ap.add_argument("--images", nargs="+", required=True, help="image tars or a folder, joined by key")
    ap.add_argument("--out", required=True)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--reinforce-size", type=int, default=224,
                    help="crop size the augmentations were drawn on (DataCompDR: 224)")
    ap.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    ap.add_argument("--semantics", choices=("pil", "v1", "v2"), default="pil",
                    help="augmentation arithmetic to replay: pil (DataCompDR's: torchvision on PIL images, "
                         "Pillow's crop resize and RandAugment; default) or v1/v2 (tensor ops, torch's resize)")
    from fastload.importers.shardjobs import add_engine_args

    add_engine_args(ap, "the tars")
    ap.add_argument("--no-restart-markers", action="store_true",
                    help="store JPEG images byte for byte (default: losslessly transcoded with a restart marker "
                         "every ~4 MCUs, the same pixels, so the loader decodes only around each crop)")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    try:
        m = import_datacomp(a.tars, a.out, a.images, shard_size=a.shard_size, image_size=a.image_size,
                            on_error=a.on_error, progress=not a.quiet, reinforce_size=a.reinforce_size,
                            semantics=a.semantics, engine=a.engine, workers=a.workers,
                            restart_markers=not a.no_restart_markers)
    except ValueError as e:
        print(f"fastload import-datacomp: error: {e}", file=sys.stderr)
        return 2
    print(f"imported {m['num_rows']} samples x {m['num_augmentations']} augmentations into {a.out} "
          f"({len(m['skipped'])} skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
