"""Generation (`fastload.reinforce`): run a teacher once on N sampled augmentations of every image and
store the parameters with the teacher's top-k probabilities (Dataset Reinforcement).

The teacher sees exactly the pixels the loader will later produce: every augmented image is
rendered by ``fastload.replay.native.render_batch`` (the C++ kernel the loader uses) from
the same encoded bytes that are stored in the dataset.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from fastload.format.record_ext import encode_ext
from fastload.format.shards import encode_augs, encode_targets
from fastload.format.writer import DatasetWriter, merge, write_shard_file  # noqa: F401 (merge re-exported)
from fastload.errors import BadImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")
JPEG_QUALITY = 95


# ---------------------------------------------------------------------------------------
# sources


class _Sources:
    """Uniform access to a folder (ImageFolder or flat) or a map-style dataset of (image, label)."""

    def __init__(self, obj):
        self.dataset = None
        self.files: List[str] = []
        self.file_labels: List[int] = []
        self.classes: List[str] = []
        if isinstance(obj, (str, os.PathLike)):
            root = os.fspath(obj)
            if not os.path.isdir(root):
                raise ValueError(f"dataset_or_folder: {root!r} is not a directory")
            self.root = root
            subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
            if subdirs:  # ImageFolder: one class per subfolder
                self.classes = subdirs
                for c, d in enumerate(subdirs):
                    for dp, _, fs in sorted(os.walk(os.path.join(root, d))):
                        for f in sorted(fs):
                            if f.lower().endswith(_IMG_EXT):
                                self.files.append(os.path.relpath(os.path.join(dp, f), root))
                                self.file_labels.append(c)
            else:
                self.files = sorted(f for f in os.listdir(root) if f.lower().endswith(_IMG_EXT))
                self.file_labels = [-1] * len(self.files)
            if not self.files:
                raise ValueError(f"dataset_or_folder: no images found in {root!r}")
        else:
            if not hasattr(obj, "__getitem__") or not hasattr(obj, "__len__"):
                raise ValueError("dataset_or_folder must be a folder path or a map-style dataset of (image, label)")
            self.dataset = obj

    def __len__(self) -> int:
        return len(self.files) if self.dataset is None else len(self.dataset)

    def key(self, i: int) -> str:
        if self.dataset is None:
            return self.files[i]
        keys = getattr(self.dataset, "keys", None)
        return str(keys[i]) if isinstance(keys, (list, tuple)) else str(i)

    def load(self, i: int) -> Tuple[Any, int]:
        if self.dataset is None:
            with open(os.path.join(self.root, self.files[i]), "rb") as f:
                return f.read(), self.file_labels[i]
        item = self.dataset[i]
        if isinstance(item, (tuple, list)) and len(item) >= 2:
            img, label = item[0], item[1]
        else:
            img, label = item, -1
        return img, (-1 if label is None else int(label))


def _to_array(img) -> np.ndarray:
    """PIL image / HWC uint8 array / CHW uint8 tensor -> HWC uint8 RGB array."""
    if hasattr(img, "convert") and hasattr(img, "size"):  # PIL
        return np.asarray(img.convert("RGB"))
    if hasattr(img, "detach"):  # torch tensor: CHW (torchvision convention)
        t = img.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3):
            t = t.permute(1, 2, 0)
        img = t.numpy()
    a = np.asarray(img)
    if a.dtype != np.uint8:
        raise ValueError(f"array images must be uint8, got {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"array images must be HxWxC with C in (1, 3, 4), got shape {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        a = a[:, :, :3]
    return np.ascontiguousarray(a)


def _fit(h: int, w: int, max_side: Optional[int]) -> Tuple[int, int]:
    if not max_side or max(h, w) <= max_side:
        return h, w
    s = max_side / max(h, w)
    return max(1, int(round(h * s))), max(1, int(round(w * s)))


def _encode_jpeg(a: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _open_checked(b: bytes, key: str, full: bool):
    """Decode (at 1/8 scale unless ``full``) to detect corrupt or truncated files."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(b))
        size = im.size
        mode = im.mode
        fmt = im.format
        if not full:
            im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
        im.load()
    except Exception as e:  # PIL raises many types: all mean "cannot decode"
        raise BadImageError(f"cannot decode image {key!r}: {e}") from e
    return im, size, mode, fmt


@dataclasses.dataclass
class _Prepared:
    key: str
    label: int
    hash: bytes
    orig_hw: Tuple[int, int]
    src_hw: Tuple[int, int]
    render: Any  # JPEG bytes or HWC uint8 array: what render_batch (and later the loader) decodes
    stored: Optional[bytes]


def _with_restarts(b: bytes, key: str) -> bytes:
    """``b`` with restart markers, or ``b`` itself (fastload.format.images.with_restart_markers)."""
    from fastload.format.images import with_restart_markers

    return with_restart_markers(b, f"image {key!r}")


def _stored_hash(b: bytes) -> bytes:
    """The row hash of a stored image: the blake2b-128 of its stored bytes (transcoded with
    restart markers or re-encoded), as for a file stored as it was. A MixUp/CutMix partner
    read by range is served only when its bytes match it; a hash of the source would send
    every such read to the whole shard."""
    return hashlib.blake2b(b, digest_size=16).digest()


def _prepare(src: _Sources, i: int, store: bool, max_side: Optional[int], scan: bool = False,
             restarts: bool = False) -> _Prepared:
    key = src.key(i)
    try:
        payload, label = src.load(i)
    except Exception as e:  # a dataset's own loader failing on a bad file
        raise BadImageError(f"cannot load image {key!r}: {e}") from e
    if isinstance(payload, (bytes, bytearray, memoryview)):
        b = bytes(payload)
        im, (w, h), mode, fmt = _open_checked(b, key, full=not scan)
        is_jpeg = fmt == "JPEG" and mode in ("RGB", "L") and b[:2] == b"\xff\xd8"
        nh, nw = _fit(h, w, max_side)
        if scan:
            return _Prepared(key, label, b"", (h, w), (nh, nw), None, None)
        digest = hashlib.blake2b(b, digest_size=16).digest()
        if is_jpeg and (nh, nw) == (h, w):
            if restarts:  # lossless: the same pixels, decodable from any MCU row
                b = _with_restarts(b, key)
                if store:  # the row hash covers the bytes stored (see _stored_hash)
                    digest = _stored_hash(b)
            return _Prepared(key, label, digest, (h, w), (h, w), b, b if store else None)
        arr = np.asarray(im.convert("RGB"))
    else:
        try:
            arr = _to_array(payload)
        except ValueError as e:
            raise BadImageError(f"image {key!r}: {e}") from e
        h, w = arr.shape[:2]
        nh, nw = _fit(h, w, max_side)
        if scan:
            return _Prepared(key, label, b"", (h, w), (nh, nw), None, None)
        digest = hashlib.blake2b(arr.tobytes() + bytes(f"{h}x{w}", "ascii"), digest_size=16).digest()
    if (nh, nw) != (h, w):
        from PIL import Image

        arr = np.asarray(Image.fromarray(arr).resize((nw, nh), Image.BICUBIC, reducing_gap=3.0))
    if not store:
        return _Prepared(key, label, digest, (h, w), (nh, nw), np.ascontiguousarray(arr), None)
    enc = _encode_jpeg(arr)  # stored as JPEG: the teacher renders from exactly these bytes
    if restarts:
        enc = _with_restarts(enc, key)
    return _Prepared(key, label, _stored_hash(enc), (h, w), (nh, nw), enc, enc)


# ---------------------------------------------------------------------------------------
# teachers


def _teacher_list(teacher) -> list:
    if teacher is None:
        raise ValueError("teacher: give an nn.Module, a list of them, or a TorchScript/torch.export file")
    ts = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
    if not ts:
        raise ValueError("teacher: empty ensemble")
    out = []
    for t in ts:
        if isinstance(t, (str, os.PathLike)):
            t = load_teacher(t)
        if not callable(t):
            raise ValueError(f"teacher: {type(t).__name__} is not callable")
        out.append(t)
    return out


_JIT_NOTED = False

_HOW_TO_EXPORT = ("export it with fastload.export_teacher(model, image_size, 'teacher.pt2'), "
                  "which gives the program a dynamic batch dimension")


def export_teacher(model, image_size, path: str, device: str = "cpu") -> str:
    """Save ``model`` as a ``torch.export`` program with a dynamic batch dimension, the teacher
    file ``fastload reinforce --teacher`` and ``fastload.reinforce`` read.

    ``image_size`` is the side (or ``(h, w)``) of the crops the teacher will score: the
    program is specialized to it, but not to the batch size, so it accepts the last, smaller
    batch of a shard as well as a full one. The model is put in eval mode first. Returns
    ``path``.

    Example:
        >>> import torch, fastload
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
        ...                           torch.nn.Flatten(), torch.nn.Linear(4, 10))
        >>> fastload.export_teacher(net, 64, "teacher.pt2")  # doctest: +SKIP
        'teacher.pt2'
    """
    import torch

    size = (int(image_size), int(image_size)) if np.isscalar(image_size) else tuple(int(v) for v in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be an int or (h, w), got {image_size!r}")
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = model.eval()
    # an example batch of 2: torch.export specializes sizes 0 and 1, so a dynamic batch needs
    # an example of at least 2
    example = torch.zeros((2, 3) + size, device=device)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        ep = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.export.save(ep, tmp)
    os.replace(tmp, path)
    return path


def _static_batch(ep):
    """The fixed batch size of an exported program's first input, or None if it is dynamic."""
    try:
        name = ep.graph_signature.user_inputs[0]
        node = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == name)
        b = node.meta["val"].shape[0]
    except (AttributeError, IndexError, KeyError, StopIteration):
        return None  # not a shape we can read: let the probe decide
    return b if isinstance(b, int) else None


def load_teacher(path: str):
    """Load a ``torch.export`` program (``torch.export.save``, ``.pt2``: the recommended
    format) or a TorchScript one (``torch.jit.save``: still read; TorchScript is deprecated in
    recent torch, so its warnings are replaced by one note); never a pickle. A file that is
    neither gets our error alone (torch's loaders log tracebacks on failure: silenced)."""
    import logging
    import warnings
    import zipfile

    import torch

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"teacher file {path!r} does not exist")
    how_to = _HOW_TO_EXPORT
    if not zipfile.is_zipfile(path):
        raise ValueError(f"teacher file {path!r} is not a model program (torch.export and TorchScript "
                         f"files are zip archives; this is not one): {how_to}")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    if not any("/code/" in n or n.endswith(("/constants.pkl", ".json")) or "/models/" in n for n in names):
        raise ValueError(f"teacher file {path!r} looks like a torch.save() pickle, which is never "
                         f"loaded (it can run arbitrary code): {how_to}")
    errors = []
    fixed = None
    loggers = [logging.getLogger(n) for n in ("torch.export", "torch._export", "torch.export.pt2_archive")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        for how in ("export", "jit"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if how == "export":
                        ep = torch.export.load(path)
                        fixed = _static_batch(ep)
                        if fixed is None:
                            return ep.module()
                    t = torch.jit.load(path, map_location="cpu")
                global _JIT_NOTED
                if not _JIT_NOTED:
                    _JIT_NOTED = True
                    warnings.warn(f"teacher {path!r} is TorchScript, deprecated in torch "
                                  f"{torch.__version__.split('+')[0]}; it still works, but "
                                  f"prefer a torch.export program: {how_to}", FutureWarning, stacklevel=3)
                return t
            except Exception as e:  # try the other program format
                errors.append(f"{how}: {str(e).splitlines()[0][:120] if str(e) else type(e).__name__}")
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
    if fixed is not None:
        raise ValueError(f"teacher file {path!r} was exported with a static batch of {fixed} images, "
                         f"but reinforce scores batches of several sizes: {how_to}")
    raise ValueError(f"teacher file {path!r} is neither a torch.export nor a TorchScript program "
                     f"({'; '.join(errors)}): {how_to}")


def _eval(t):
    try:
        t.eval()
    except (AttributeError, NotImplementedError, RuntimeError):
        pass  # torch.export modules may refuse eval(); they were exported in the mode wanted
    return t


def _describe(t, i: int) -> Dict[str, Any]:
    name = getattr(t, "original_name", None) or type(t).__name__
    h = hashlib.sha256()
    n = 0
    try:
        for k, v in sorted(t.state_dict().items()):
            h.update(k.encode())
            a = v.detach().cpu().contiguous()
            h.update(a.view(-1).view(__import__("torch").uint8).numpy().tobytes() if a.numel() else b"")
            n += a.numel()
    except Exception:  # noqa: BLE001 - a callable without a state_dict
        h.update(repr(t).encode())
    return {"name": f"{i}:{name}", "description": repr(t).splitlines()[0][:200], "parameters": int(n),
            "weights_sha256": h.hexdigest()}


def _teacher_probs(teachers, x, num_classes: Optional[int]):
    """Mean of the members' softmax probabilities (float32 [B, C])."""
    import torch

    acc = None
    for i, t in enumerate(teachers):
        y = t(x.to(_device(t), non_blocking=True))
        if isinstance(y, (tuple, list)):
            y = y[0]
        if not torch.is_tensor(y) or y.ndim != 2 or y.shape[0] != x.shape[0]:
            raise ValueError(f"teacher {i} must return logits [batch, classes], got "
                             f"{tuple(y.shape) if torch.is_tensor(y) else type(y).__name__}")
        if num_classes is not None and y.shape[1] != num_classes:
            raise ValueError(f"teacher {i} outputs {y.shape[1]} classes but num_classes={num_classes}")
        p = torch.softmax(y.float(), dim=1).cpu()
        acc = p if acc is None else acc + p
    return acc / len(teachers)


def _device(t):
    """The device of a teacher's first parameter (CPU for parameterless callables)."""
    try:
        return next(t.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return "cpu"


# ---------------------------------------------------------------------------------------
# generation


@dataclasses.dataclass
class _Job:
    sources: _Sources
    rows: np.ndarray  # row -> source index (the valid sources, in order)
    all_hw: np.ndarray  # [rows, 2] rendered pixel size
    teachers: list
    policy: Any
    out: str
    n_aug: int
    topk: int
    num_classes: int
    seed: int
    shard_size: int
    batch_size: int
    image_size: Tuple[int, int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    store: bool
    max_side: Optional[int]
    threads: Optional[int]
    restarts: bool = True

    def shard_rows(self, s: int) -> np.ndarray:
        return np.arange(s * self.shard_size, min((s + 1) * self.shard_size, len(self.rows)))


def _render(job: _Job, renders: list, partners: list, params: np.ndarray, out, ids, ext=None) -> None:
    from fastload.replay.native import render_batch

    has_partner = any(p is not None for p in partners)
    render_batch(renders, params, out, partner_sources=partners if has_partner else None,
                 mean=job.mean, std=job.std, interpolation=job.policy.interpolation, dct_scale=True,
                 threads=job.threads, sample_ids=ids, ra_num_bins=job.policy.ra_num_bins,
                 ra_semantics=job.policy.randaugment_semantics, ext=ext,
                 ra_fill=getattr(job.policy, "timm_fill", (124, 116, 104)), resize=job.policy.resize)


def _make_shard(job: _Job, s: int, progress=None) -> Dict[str, Any]:
    """Sample, render, run the teachers and write shard ``s``; returns its manifest entry."""
    import torch

    from fastload.sample.policy import sample_records

    rows = job.shard_rows(s)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(job.seed), int(s)])))
    # ext: the extension records where the policy draws what the base record cannot hold
    # (timm RandAugment levels), else None
    params, ext = sample_records(job.policy, rng, rows, job.all_hw, job.n_aug)  # [R, N]
    prep = {int(r): _prepare(job.sources, int(job.rows[r]), job.store, job.max_side, restarts=job.restarts)
            for r in rows}
    for r in rows:  # what the sampler assumed must be what is rendered
        if tuple(prep[int(r)].src_hw) != tuple(job.all_hw[r]):
            raise RuntimeError(f"image {prep[int(r)].key!r} changed size between scan and generation")
    partner_cache: Dict[int, Any] = {}

    def partner_src(p: int):
        if p < 0:
            return None
        if p in prep:
            return prep[p].render
        if p not in partner_cache:
            partner_cache[p] = _prepare(job.sources, int(job.rows[p]), job.store, job.max_side,
                                        restarts=job.restarts).render
        return partner_cache[p]

    R, N = params.shape
    flat = params.reshape(-1)
    flat_ext = None if ext is None else ext.reshape(-1)
    ids_all = np.zeros((R * N, job.topk), np.int64)
    probs_all = np.zeros((R * N, job.topk), np.float16)
    h, w = job.image_size
    buf = torch.empty((job.batch_size, 3, h, w), dtype=torch.float32)
    with torch.no_grad():
        for b0 in range(0, R * N, job.batch_size):
            b1 = min(R * N, b0 + job.batch_size)
            owner = rows[np.arange(b0, b1) // N]
            renders = [prep[int(r)].render for r in owner]
            partners = [partner_src(int(p)) for p in flat[b0:b1]["partner"]]
            x = buf[: b1 - b0]
            try:
                _render(job, renders, partners, np.ascontiguousarray(flat[b0:b1]), x,
                        [repr(prep[int(r)].key) for r in owner],
                        None if flat_ext is None else np.ascontiguousarray(flat_ext[b0:b1]))
            except Exception as e:
                keys = sorted({prep[int(r)].key for r in owner})
                raise BadImageError(f"rendering failed for a batch holding {keys[:8]}: {e}") from e
            p = _teacher_probs(job.teachers, x, job.num_classes)
            tp, ti = torch.topk(p, job.topk, dim=1)
            ids_all[b0:b1] = ti.numpy()
            probs_all[b0:b1] = tp.numpy().astype(np.float16)
            if progress is not None:
                progress.update(b1 - b0)
    ids_all = ids_all.reshape(R, N, job.topk)
    probs_all = probs_all.reshape(R, N, job.topk)
    cols: Dict[str, list] = {k: [] for k in ("id", "key", "hash", "orig_h", "orig_w", "src_h", "src_w",
                                             "label", "image", "augs", "targets")}
    if ext is not None:
        cols["augs_ext"] = []
    for a, r in enumerate(rows):
        pr = prep[int(r)]
        cols["id"].append(int(r))
        cols["key"].append(pr.key)
        cols["hash"].append(pr.hash)
        cols["orig_h"].append(pr.orig_hw[0])
        cols["orig_w"].append(pr.orig_hw[1])
        cols["src_h"].append(pr.src_hw[0])
        cols["src_w"].append(pr.src_hw[1])
        cols["label"].append(pr.label)
        cols["image"].append(pr.stored)
        cols["augs"].append(encode_augs(params[a], pr.src_hw, tuple(job.policy.size), job.all_hw))
        cols["targets"].append(encode_targets(ids_all[a], probs_all[a]))
        if ext is not None:
            cols["augs_ext"].append(encode_ext(ext[a]))
    return write_shard_file(job.out, s, cols, "classification")


def _ray_shard(job: _Job, s: int) -> Dict[str, Any]:
    for t in job.teachers:
        _eval(t)
    return _make_shard(job, s)


def _scan(src: _Sources, max_side, on_error: str, threads: int, progress: bool):
    from fastload._progress import Progress

    hw = np.zeros((len(src), 2), np.int64)
    ok = np.ones(len(src), bool)
    skipped = []

    def one(i):
        try:
            p = _prepare(src, i, False, max_side, scan=True)
            return i, p.src_hw, p.label, None
        except BadImageError as e:
            return i, None, None, e

    labels = np.full(len(src), -1, np.int64)
    with Progress(len(src), "scan", "img", enabled=progress) as bar, ThreadPoolExecutor(max(1, threads)) as ex:
        for i, shw, label, err in ex.map(one, range(len(src)), chunksize=16):
            bar.update()
            if err is not None:
                if on_error == "raise":
                    raise err
                ok[i] = False
                skipped.append({"key": src.key(i), "error": str(err)})
                continue
            hw[i] = shw
            labels[i] = label
    return hw, ok, labels, skipped


def reinforce(dataset_or_folder, teacher, out: str, num_augmentations: int = 10, topk: Optional[int] = None,
              policy=None, batch_size: int = 64, image_size=224, num_classes: Optional[int] = None,
              seed: int = 0, engine: str = "local", shard_size: int = 1000, on_error: str = "raise",
              reencode_max_side: Optional[int] = None, progress: bool = True, store_images: bool = True,
              restart_markers: bool = True, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
              threads: Optional[int] = None, reference=None,
              reference_loss: Optional[Callable] = None) -> Dict[str, Any]:
    """Create (or resume) a reinforced classification dataset in ``out``; returns the manifest.

    ``restart_markers`` (default True): stored JPEGs are losslessly transcoded with a restart
    marker opening every MCU row and optimized Huffman tables
    (:func:`fastload.replay.native.add_restarts`): the same pixels for every decoder, usually
    a few % fewer bytes, and the loader starts decoding a crop at the MCU row above it instead
    of entropy-decoding every row above. False stores JPEG sources byte for byte.

    ``reference``: a reference model (same input as the teacher) for online batch selection.
    Once the dataset is written, every stored augmentation of every row is replayed and the
    reference's per-example loss stored, ``reference_loss(logits, labels)`` (cross-entropy by
    default), as ``float32 [N, A]`` beside the dataset (``fastload.select.score_reference``;
    the returned manifest's ``"reference"`` is its path). ``OnlineBatchSelector(reference=
    path)`` then looks the reference term of each super-batch up instead of running the model.

    ``teacher`` is an ``nn.Module`` (or a list: an ensemble averaging softmax probabilities)
    taking normalized float images [B, 3, h, w] and returning logits [B, num_classes].
    ``topk`` (teacher probabilities stored per augmentation) defaults to min(10, classes).
    An ImageFolder's class count must equal the teacher's width (its labels index the
    teacher's classes); a wider teacher is accepted only with ``num_classes`` set to its width.

    Example:
        >>> import torch, fastload
        >>> teacher = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        ...                               torch.nn.Linear(3, 10))
        >>> fastload.reinforce("photos/", teacher, "photos_plus/", num_augmentations=8,
        ...                    topk=5, image_size=64)  # doctest: +SKIP
    """
    import torch

    from fastload.sample.policy import AugmentPolicy

    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    for name, v in (("num_augmentations", num_augmentations), ("topk", 1 if topk is None else topk),
                    ("batch_size", batch_size),
                    ("shard_size", shard_size)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if num_augmentations >= 2**31:
        raise ValueError("num_augmentations too large")
    if reencode_max_side is not None and reencode_max_side < 8:
        raise ValueError(f"reencode_max_side must be >= 8, got {reencode_max_side}")
    size = (int(image_size), int(image_size)) if np.isscalar(image_size) else tuple(int(v) for v in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be an int or (h, w), got {image_size!r}")
    if policy is None:
        policy = AugmentPolicy(size=size)
    elif isinstance(policy, dict):
        policy = AugmentPolicy.from_dict(policy)
    elif not isinstance(policy, AugmentPolicy):
        raise ValueError(f"policy must be an AugmentPolicy or its dict, got {type(policy).__name__}")
    teachers = [_eval(t) for t in _teacher_list(teacher)]
    threads = int(threads or min(8, os.cpu_count() or 1))
    if reference is not None and not callable(reference):
        raise ValueError(f"reference must be a model (a callable returning logits), got {type(reference).__name__}")
    if reference_loss is not None and not callable(reference_loss):
        raise ValueError(f"reference_loss must be callable (logits, labels) -> [B] losses, got {reference_loss!r}")

    # output width: probe once so a wrong teacher fails before any work. The probe's batch
    # (batch_size + 1) is one the run never uses (its batches hold at most batch_size images),
    # so a program that only accepts the run's batch size fails here, not in the first shard.
    probe = int(batch_size) + 1
    with torch.no_grad():
        widths = []
        for i, t in enumerate(teachers):
            try:
                y = t(torch.zeros((probe, 3) + size, device=_device(t)))
            except Exception as e:  # an exported program's guard, a shape error, ...
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise ValueError(f"teacher {i} fails on a [{probe}, 3, {size[0]}, {size[1]}] batch "
                                 f"(image_size={size[0]}): {first}; the teacher must take any batch "
                                 f"size at image_size={size[0]}: {_HOW_TO_EXPORT}") from None
            y = y[0] if isinstance(y, (tuple, list)) else y
            widths.append(int(y.shape[-1]))
    if len(set(widths)) != 1:
        raise ValueError(f"teachers disagree on the number of classes: {widths}")
    if num_classes is not None and widths[0] != num_classes:
        raise ValueError(f"teacher outputs {widths[0]} classes but num_classes={num_classes}")
    explicit_classes = num_classes is not None
    num_classes = widths[0]
    if topk is None:
        topk = min(10, num_classes)
    if topk > num_classes:
        raise ValueError(f"topk={topk} exceeds the teacher's {num_classes} classes; use topk <= {num_classes}")

    src = _Sources(dataset_or_folder)
    if src.classes and len(src.classes) != num_classes and not (explicit_classes and len(src.classes) < num_classes):
        raise ValueError(
            f"the image folder has {len(src.classes)} class subfolders but the teacher outputs "
            f"{num_classes} classes: labels would not index the teacher's classes. Use a teacher with "
            f"{len(src.classes)} outputs" + (f", or pass num_classes={num_classes} if the sorted "
                                             f"subfolders are the teacher's first {len(src.classes)} classes"
                                             if len(src.classes) < num_classes else ""))
    if len(src) == 0:
        raise ValueError("dataset_or_folder is empty")
    hw, ok, labels, skipped = _scan(src, reencode_max_side, on_error, threads, progress)
    rows = np.flatnonzero(ok)
    if len(rows) < (2 if policy.mixing else 1):
        raise ValueError(f"only {len(rows)} decodable images: not enough to reinforce")
    all_hw = hw[rows]
    num_shards = -(-len(rows) // shard_size)

    keys_digest = hashlib.sha256("\n".join(src.key(i) for i in range(len(src))).encode()).hexdigest()
    tdesc = [_describe(t, i) for i, t in enumerate(teachers)]
    replay = {"image_size": list(size), "box_grid": list(policy.size), "interpolation": policy.interpolation,
              "dct_scale": True,
              "dct_scale_rule": ("the JPEG decoder downscales in the DCT domain (1/2, 1/4, 1/8) when the crop "
                                 "is at least twice the output, as fastload.replay.native.render_batch"),
              "mean": [float(v) for v in mean], "std": [float(v) for v in std], "kernel": "fastload.replay.native"}
    fingerprint = {"sources": len(src), "keys_sha256": keys_digest, "num_augmentations": int(num_augmentations),
                   "topk": int(topk), "seed": int(seed), "policy": policy.to_dict(), "replay": replay,
                   "teachers": [t["weights_sha256"] for t in tdesc], "num_classes": num_classes,
                   "shard_size": int(shard_size), "reencode_max_side": reencode_max_side,
                   "store_images": bool(store_images), "on_error": on_error}
    header = {"kind": "classification", "num_augmentations": int(num_augmentations), "topk": int(topk),
              "num_classes": int(num_classes), "seeds": [int(seed)], "policy": policy.to_dict(),
              "replay": replay, "teachers": tdesc, "shard_size": int(shard_size),
              "classes": src.classes or None, "images_stored": bool(store_images),
              "image_encoding": {"kept_if_jpeg": True, "reencode_max_side": reencode_max_side,
                                 "jpeg_quality": JPEG_QUALITY, "restart_markers": bool(restart_markers)},
              "skipped": skipped}
    fresh = not os.path.exists(out) or not os.listdir(out)
    writer = DatasetWriter(out, header, fingerprint, num_shards)
    job = _Job(src, rows, all_hw, teachers, policy, out, int(num_augmentations), int(topk), num_classes,
               int(seed), int(shard_size), int(batch_size), size, tuple(mean), tuple(std), bool(store_images),
               reencode_max_side, threads, bool(restart_markers))
    todo = [s for s in range(num_shards) if s not in writer.done]
    from fastload._progress import Progress

    total = sum(len(job.shard_rows(s)) for s in todo) * num_augmentations
    try:
        if engine == "local":
            with Progress(total, "reinforce", "aug", enabled=progress) as bar:
                for s in todo:
                    writer.add_shard(_make_shard(job, s, bar))
        else:
            _run_ray(job, todo, writer, progress)
    except BaseException as e:
        _after_failure(out, writer, fresh, num_shards, e)
        raise
    manifest = writer.finish(skipped=skipped)
    if reference is not None:  # the reference term of online batch selection, stored once
        from fastload.select.sidecar import score_reference

        ref = _eval(reference)
        dev = _device(ref)
        manifest = dict(manifest, reference=score_reference(
            out, ref, batch_size=int(batch_size), loss=reference_loss,
            device=None if str(dev) == "cpu" else dev))
    return manifest


def _after_failure(out: str, writer: DatasetWriter, fresh: bool, num_shards: int, exc: BaseException) -> None:
    """A run that fails leaves no half-written dataset: a folder this run created with no
    finished shard is removed; finished shards are kept (listed in an incomplete manifest, which
    readers refuse) and the error says that rerunning the same call resumes from them."""
    import shutil

    note = getattr(exc, "add_note", lambda msg: None)
    if fresh and not writer.done:
        shutil.rmtree(out, ignore_errors=True)
        note(f"fastload.reinforce: nothing was finished; the output folder {out!r} was removed")
    else:
        note(f"fastload.reinforce: {out!r} is incomplete ({len(writer.done)} of {num_shards} shards "
                     "finished); rerun the same command to resume, or delete the folder")


def _run_ray(job: _Job, todo: List[int], writer: DatasetWriter, progress: bool) -> None:
    try:
        import ray
    except ImportError as e:
        raise ImportError("engine='ray' needs Ray installed (pip install ray)") from e
    from fastload._progress import Progress

    if not ray.is_initialized():
        ray.init()
    task = ray.remote(_ray_shard)
    job_ref = ray.put(job)
    pending = {task.remote(job_ref, s): s for s in todo}
    with Progress(len(todo), "reinforce (ray)", "shards", enabled=progress) as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            pending.pop(ref)
            writer.add_shard(ray.get(ref))  # the task renamed its shard into place already
            bar.update()


# ---------------------------------------------------------------------------------------
# CLI


def main(argv=None) -> int:
    """``fastload reinforce IMAGES --teacher FILE --out DIR [options]``."""
    from fastload._cli import DefaultsFormatter, flag_error
    from fastload.sample.policy import AugmentPolicy

    ap = argparse.ArgumentParser(
        prog="fastload reinforce", formatter_class=DefaultsFormatter,
        description="Run a teacher once on N sampled augmentations of every image and store the "
                    "augmentation parameters with the teacher's top-k probabilities (Dataset "
                    "Reinforcement); train later with fastload.ReinforcedLoader, no teacher needed.",
        epilog="example: fastload reinforce photos/ --teacher teacher.pt2 --out photos_plus/ "
               "--num-augmentations 10 --image-size 224")
    ap.add_argument("images", nargs="?", default=None,
                    help="image folder: one subfolder per class (ImageFolder), or a flat folder (no labels)")
    ap.add_argument("--images", dest="images_flag", default=None, metavar="DIR",
                    help="the same as the positional IMAGES (older form, deprecated)")
    ap.add_argument("--teacher", required=True, action="append", metavar="FILE",
                    help="teacher program: torch.export (.pt2, preferred) or TorchScript; repeat the "
                         "flag for an ensemble (probabilities averaged)")
    ap.add_argument("--out", required=True, metavar="DIR",
                    help="output dataset folder (rerunning the same command resumes it)")
    ap.add_argument("--num-augmentations", type=int, default=10,
                    help="augmentations sampled and scored per image")
    ap.add_argument("--topk", type=int, default=None,
                    help="teacher probabilities stored per augmentation (default: min(10, classes))")
    ap.add_argument("--batch-size", type=int, default=64, help="images per teacher forward pass")
    ap.add_argument("--image-size", type=int, default=224,
                    help="side of the square crops the teacher scores (the loader's default size)")
    ap.add_argument("--num-classes", type=int, default=None,
                    help="expected teacher width (default: read from the teacher); set it to use a "
                         "teacher wider than the folder's classes")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampled augmentations")
    ap.add_argument("--engine", choices=("local", "ray"), default="local",
                    help="run shards in this process, or as Ray tasks")
    ap.add_argument("--shard-size", type=int, default=1000, help="images per output shard")
    ap.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                    help="an undecodable image stops the run, or is skipped and listed in the manifest")
    ap.add_argument("--reencode-max-side", type=int, default=None,
                    help="re-encode images larger than this many pixels on their long side (default: keep)")
    ap.add_argument("--no-store-images", action="store_true",
                    help="store only parameters and targets, not the images (the loader then needs them elsewhere)")
    ap.add_argument("--no-rrc", action="store_true", help="no RandomResizedCrop (center crop instead)")
    ap.add_argument("--no-flip", action="store_true", help="no random horizontal flip")
    ap.add_argument("--randaugment", type=int, nargs=2, metavar=("NUM_OPS", "MAGNITUDE"), default=None,
                    help="RandAugment with NUM_OPS operations at MAGNITUDE (0-30); default: off")
    ap.add_argument("--randaugment-semantics", choices=("v1", "v2", "pil"), default="v1",
                    help="whose RandAugment --randaugment replays: torchvision tensor v1 (default), v2, or on "
                         "PIL images")
    ap.add_argument("--timm-randaugment", default=None, metavar="CONFIG",
                    help="timm's RandAugment from its config string (e.g. rand-m9-mstd0.5-inc1; instead of "
                         "--randaugment)")
    ap.add_argument("--erase", type=float, default=0.0, help="random erasing probability")
    ap.add_argument("--mixup", type=float, default=0.0, help="MixUp alpha (0: off)")
    ap.add_argument("--cutmix", type=float, default=0.0, help="CutMix alpha (0: off)")
    ap.add_argument("--interpolation", choices=("bilinear", "bicubic"), default="bilinear",
                    help="resize filter of the replay")
    ap.add_argument("--no-restart-markers", action="store_true",
                    help="store JPEG sources byte for byte (default: losslessly transcoded with a restart marker "
                         "per MCU row, which lets the loader skip the rows above a crop)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    if a.images and a.images_flag and a.images != a.images_flag:
        ap.error("give the image folder once: IMAGES or --images")
    images = a.images or a.images_flag
    if a.images_flag and not a.images:
        print("fastload reinforce: note: --images DIR is deprecated; give the folder first, as the "
              "other commands take their input: fastload reinforce DIR --teacher FILE --out DIR",
              file=sys.stderr)
    if images is None:
        ap.error("the image folder is required: fastload reinforce IMAGES --teacher FILE --out DIR")
    try:
        timm = a.timm_randaugment is not None
        if timm and a.randaugment is not None:
            ap.error("give --randaugment (torchvision's) or --timm-randaugment, not both")
        policy = AugmentPolicy(rrc=not a.no_rrc, flip=not a.no_flip, randaugment=a.randaugment, erase=a.erase,
                               mixup=a.mixup, cutmix=a.cutmix, interpolation=a.interpolation,
                               size=(a.image_size, a.image_size),
                               randaugment_semantics="timm" if timm else a.randaugment_semantics,
                               timm_config=a.timm_randaugment)
        m = reinforce(images, a.teacher, a.out, num_augmentations=a.num_augmentations, topk=a.topk,
                      policy=policy, batch_size=a.batch_size, image_size=a.image_size,
                      num_classes=a.num_classes, seed=a.seed, engine=a.engine, shard_size=a.shard_size,
                      on_error=a.on_error, reencode_max_side=a.reencode_max_side,
                      progress=not a.quiet, store_images=not a.no_store_images,
                      restart_markers=not a.no_restart_markers)
    except ValueError as e:
        return flag_error("fastload reinforce", e, ap, {"dataset_or_folder": "IMAGES"})
    except (RuntimeError, OSError) as e:  # e.g. the teacher fails in a shard: one line, and what became of --out
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        notes = " ".join(getattr(e, "__notes__", []))
        print(f"fastload reinforce: error: {type(e).__name__}: {first}" + (f" ({notes})" if notes else ""),
              file=sys.stderr)
        return 2
    print(f"wrote {m['num_rows']} rows x {m['num_augmentations']} augmentations to {a.out} "
          f"({len(m['skipped'])} skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
