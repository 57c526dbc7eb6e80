"""A writer of apple/ml-dr's reinforcement archive layout, for tests and the import benchmark.

Written from the layout's description (``reinforced_data/{id}.pth.tar`` holding
``torch.save((id, samples), pickle_protocol=4)`` or a zlib-compressed joblib pickle
``{id}.jb``, plus ``config.pth.tar``), not from ml-dr's code: it draws its own random
parameters with NumPy and stores them as ml-dr does, in the compressed list form
(``reinforce.compress: true``, the published archives) or the dict form. Parameter types
follow ml-dr's: Python ints/floats/bools from ``.tolist()``/``.item()``, the CutMix box as
numpy int64 scalars (``np.clip`` results), the top-k as ``(probs list, ids list)`` in
``argpartition`` order (not sorted).
"""
from __future__ import annotations

import io
import math
import os
import pickle
import tarfile
import zlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

RA_NAMES = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
            "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")

# The published ImageNet+ variants (configs/imagenet/reinforce/*.yaml): which transforms
VARIANTS = {
    "rrc": ("uint8", "random_resized_crop", "random_horizontal_flip", "to_tensor", "normalize"),
    "mix": ("uint8", "random_resized_crop", "random_horizontal_flip", "to_tensor", "normalize", "mixup", "cutmix"),
    "rare": ("uint8", "random_resized_crop", "random_horizontal_flip", "rand_augment", "to_tensor",
             "random_erase", "normalize"),
    "mix_rare": ("uint8", "random_resized_crop", "random_horizontal_flip", "rand_augment", "to_tensor",
                 "random_erase", "normalize", "mixup", "cutmix"),
}
ORDER = ("uint8", "random_resized_crop", "random_horizontal_flip", "rand_augment", "to_tensor", "random_erase",
         "normalize", "mixup", "cutmix")
NO_PARAM = ("uint8", "to_tensor", "normalize")


def make_config(variant: str, num_samples: int, topk: int, num_classes: int, size: int = 224,
                compress: bool = True, joblib: bool = False) -> Dict[str, Any]:
    aug: Dict[str, Any] = {}
    for t in VARIANTS[variant]:
        aug[t] = {"enable": True}
    aug["random_resized_crop"]["size"] = size
    aug["random_horizontal_flip"]["p"] = 0.5
    if "rand_augment" in aug:
        aug["rand_augment"]["p"] = 1.0
    if "random_erase" in aug:
        aug["random_erase"]["p"] = 0.25
    aug["normalize"].update(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    if "mixup" in aug:
        aug["mixup"].update(alpha=1.0, div_by=2.0, p=0.5)
        aug["cutmix"].update(alpha=1.0, p=0.5)
    aug["auto_augment"] = {"enable": False}  # a disabled entry: must be ignored
    return {"dataset": "imagenet", "num_classes": num_classes, "seed": None,
            "teacher": {"timm_ensemble": True, "name": "test-teacher"},
            "reinforce": {"num_samples": num_samples, "num_candidates": None, "topk": topk, "compress": compress,
                          "joblib": joblib, "gzip": False, "image_augmentation": aug}}


def _ra_table(op: str, bins: int, h: int, w: int):
    import torch

    if op in ("ShearX", "ShearY"):
        return torch.linspace(0.0, 0.3, bins)
    if op == "TranslateX":
        return torch.linspace(0.0, 150.0 / 331.0 * w, bins)
    if op == "TranslateY":
        return torch.linspace(0.0, 150.0 / 331.0 * h, bins)
    if op == "Rotate":
        return torch.linspace(0.0, 30.0, bins)
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        return torch.linspace(0.0, 0.9, bins)
    if op == "Posterize":
        return 8 - (torch.arange(bins) / ((bins - 1) / 4)).round().int()
    if op == "Solarize":
        return torch.linspace(255.0, 0.0, bins)
    return None


_SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}


def _rrc(rng, H, W, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    area = H * W
    for _ in range(10):
        ta = area * rng.uniform(*scale)
        ar = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(ta * ar)))
        h = int(round(math.sqrt(ta / ar)))
        if 0 < w <= W and 0 < h <= H:
            return int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1)), h, w
    return 0, 0, H, W


def _ra(rng, size, num_ops=2, magnitude=9, bins=31, float_mags=False):
    ops = []
    for _ in range(num_ops):
        k = int(rng.integers(0, len(RA_NAMES)))
        name = RA_NAMES[k]
        t = _ra_table(name, bins, size, size)
        mag = float(t[magnitude].item()) if t is not None else 0.0
        if float_mags and t is not None and name != "Posterize":
            mag = float(np.float32(mag * rng.uniform(0.5, 1.0)))  # off the bin grid
        if name in _SIGNED and rng.integers(0, 2):
            mag *= -1.0
        ops.append((k, mag))
    return ops


def _erase(rng, size, p=0.25):
    if rng.random() > p:
        return None
    area = size * size
    for _ in range(10):
        ea = area * rng.uniform(0.02, 0.33)
        ar = math.exp(rng.uniform(math.log(0.3), math.log(3.3)))
        h = int(round(math.sqrt(ea * ar)))
        w = int(round(math.sqrt(ea / ar)))
        if h < size and w < size:
            return int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1)), h, w
    return 0, 0, size, size


def make_samples(rng, i: int, hw: Sequence[Tuple[int, int]], config: Dict[str, Any], float_mags: bool = False,
                 empty_cutmix: bool = False) -> List[Dict[str, Any]]:
    """One image's ``samples`` list as ml-dr stores it."""
    r = config["reinforce"]
    aug = {k: v for k, v in r["image_augmentation"].items() if v.get("enable", True)}
    names = [t for t in ORDER if t in aug]
    size = int(aug["random_resized_crop"]["size"])
    C, k = int(config["num_classes"]), int(r["topk"])
    mixing = "mixup" in aug or "cutmix" in aug
    # a teacher's outputs concentrate on a few classes per image: one profile per image,
    # perturbed per augmentation
    base = np.zeros(C)
    base[rng.choice(C, size=min(C, 5), replace=False)] = rng.uniform(4, 9, size=min(C, 5))
    out = []
    for _ in range(int(r["num_samples"])):
        i2 = int(rng.integers(0, len(hw)))
        pair: Dict[str, Tuple[Any, Any]] = {}
        pair["random_resized_crop"] = (_rrc(rng, *hw[i]), _rrc(rng, *hw[i2]))
        pair["random_horizontal_flip"] = (bool(rng.random() < 0.5), bool(rng.random() < 0.5))
        if "rand_augment" in aug:
            pair["rand_augment"] = (_ra(rng, size, float_mags=float_mags), _ra(rng, size, float_mags=float_mags))
        if "random_erase" in aug:
            pair["random_erase"] = (_erase(rng, size), _erase(rng, size))
        mix = cut = None
        if "mixup" in aug and rng.random() < 0.5:
            mix = float(rng.beta(1.0, 1.0)) / 2.0
        if "cutmix" in aug and (rng.random() < 0.5 or empty_cutmix):
            lam = float(rng.beta(1.0, 1.0))
            if empty_cutmix:
                lam = 1.0  # cut size 0: an empty box
            cut_h, cut_w = int(size * math.sqrt(1 - lam)), int(size * math.sqrt(1 - lam))
            cx, cy = int(rng.integers(0, size)), int(rng.integers(0, size))
            box = (np.clip(cx - cut_h // 2, 0, size), np.clip(cy - cut_w // 2, 0, size),
                   np.clip(cx + cut_h // 2, 0, size), np.clip(cy + cut_w // 2, 0, size))
            cut = (lam, box)
        paired = mix is not None or cut is not None
        logits = base + rng.normal(size=C)
        p = np.exp(logits - logits.max())
        p = (p / p.sum()).astype(np.float32)
        ids = np.argpartition(p, -k)[-k:]
        prob = (p[ids].tolist(), ids.tolist())
        if r.get("compress", True):
            params: Any = [i2 if paired else None] if mixing else []
            for t in names:
                if t in NO_PARAM:
                    continue
                if t == "mixup":
                    params.append(mix)
                elif t == "cutmix":
                    params.append(None if cut is None else [cut[0]] + list(cut[1]))
                else:
                    a, b = pair[t]
                    params.append([a, b] if paired else a)
        else:
            params = {t: ((), ()) for t in names if t in NO_PARAM}
            for t in names:
                if t == "mixup":
                    params[t] = mix
                elif t == "cutmix":
                    params[t] = cut
                elif t not in NO_PARAM:
                    a, b = pair[t]
                    if t == "rand_augment":
                        a = [(RA_NAMES[o], m) for o, m in a]
                        b = [(RA_NAMES[o], m) for o, m in b]
                    params[t] = (a, b)
            if mixing:
                params["id2"] = i2
        out.append({"params": params, "prob": prob})
    return out


def torch_bytes(obj, protocol: Optional[int] = 4) -> bytes:
    import torch

    b = io.BytesIO()
    if protocol is None:
        torch.save(obj, b)
    else:
        torch.save(obj, b, pickle_protocol=protocol)
    return b.getvalue()


def joblib_bytes(obj) -> bytes:
    """joblib's ``compress=True`` file: a zlib stream (level 3) of a pickle."""
    return zlib.compress(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), 3)


def write_archive(path: str, hw: Sequence[Tuple[int, int]], config: Dict[str, Any], seed: int = 0,
                  fmt: str = "tar", float_mags: bool = False, empty_cutmix_ids=(), ids=None) -> Dict[int, Any]:
    """Write an archive (``fmt``: "tar", "tar.gz" or "dir"); returns {id: samples} written.
    Members are shuffled (ml-dr's tar follows directory order), config in the middle."""
    rng = np.random.default_rng(seed)
    jb = bool(config["reinforce"].get("joblib"))
    ids = list(range(len(hw))) if ids is None else list(ids)
    written = {i: make_samples(rng, i, hw, config, float_mags, i in set(empty_cutmix_ids)) for i in ids}
    members = [(f"reinforced_data/{i}.{'jb' if jb else 'pth.tar'}",
                joblib_bytes((i, written[i])) if jb else torch_bytes((i, written[i]))) for i in ids]
    order = list(rng.permutation(len(members)))
    members = [members[j] for j in order]
    members.insert(len(members) // 2, ("reinforced_data/config.pth.tar", torch_bytes(config, None)))
    if fmt == "dir":
        os.makedirs(os.path.join(path, "reinforced_data"), exist_ok=True)
        for name, data in members:
            with open(os.path.join(path, name), "wb") as f:
                f.write(data)
    else:
        with tarfile.open(path, "w:gz" if fmt == "tar.gz" else "w") as tf:
            d = tarfile.TarInfo("reinforced_data")
            d.type = tarfile.DIRTYPE
            tf.addfile(d)
            for name, data in members:
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return written


def write_image_folder(root: str, n: int, classes: int = 2, seed: int = 0, sizes=((40, 56), (48, 40), (33, 45))):
    """An ImageFolder of ``n`` JPEGs; returns their (h, w) in ImageFolder order."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    hw = []
    for i in range(n):
        c = i % classes
        d = os.path.join(root, f"class{c:02d}")
        os.makedirs(d, exist_ok=True)
        h, w = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)),
                        rng.integers(0, 256, (h, w))], -1).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(d, f"img{i:04d}.jpg"), quality=95)
    from fastload.importers.mldr import image_folder

    files, _, _ = image_folder(root)
    out = []
    for f in files:
        with Image.open(os.path.join(root, f)) as im:
            out.append((im.size[1], im.size[0]))
    return out
