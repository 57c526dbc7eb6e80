"""Small demo datasets built from the photos that ship with scikit-image: no download.

Examples, tests and ``fastload bench`` build their data here:

- ``build_images``: an ImageFolder of ``n`` distinct JPEGs of about 500x375 (a quarter
  portrait), quality 90, one class per source photo. Image ``i`` depends only on
  ``(seed, i)``, so the first 200 images of a 2000-image set are the 200-image set.
- ``make_images``: a handful of smaller JPEG crops (``c<k>/<i>.jpg``) for unit tests.
- ``tiny_teacher`` / ``make_teacher``: small conv nets with fixed weights that stand
  in for a real teacher (their predictions are meaningless; the loader's work does not
  depend on them).
- ``build_reinforced`` / ``build_all``: the reinforced versions, cached.

The source photos are scikit-image's offline samples (``skimage.data``: astronaut, chelsea,
coffee, rocket, ...; scikit-learn's two sample photos too when it is installed), cropped,
rescaled, flipped and slightly re-toned deterministically. scikit-image comes with the
``bench`` and ``test`` extras.

Example::

    import tempfile
    from fastload.datasets import build_images

    with tempfile.TemporaryDirectory() as tmp:
        root = build_images(tmp, n=8, progress=False)   # ImageFolder with 8 JPEGs
"""
from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np

from fastload._progress import Progress

WIDTH, HEIGHT, QUALITY = 500, 375, 90
FORMAT_VERSION = 1  # bump when the generated images change

# skimage.data functions that load offline (the others need pooch and a download)
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina",
                  "immunohistochemistry", "stereo_motorcycle", "colorwheel", "camera", "brick",
                  "grass", "gravel", "coins", "moon", "clock")


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/fastload/bench`` (``~/.cache/fastload/bench`` when unset)."""
    from fastload._results import cache_home

    return os.path.join(cache_home(), "fastload", "bench")


def source_photos() -> list[tuple[str, np.ndarray]]:
    """(name, HxWx3 uint8) for every offline sample photo; raises if none can be loaded."""
    out = []
    try:
        import skimage.data as skd
    except ImportError as e:
        raise RuntimeError("fastload.datasets needs scikit-image for its embedded photos: "
                           "pip install 'fastload[bench]'") from e
    for name in SKIMAGE_PHOTOS:
        fn = getattr(skd, name, None)
        if fn is None:
            continue
        try:
            a = fn()
        except Exception:  # noqa: BLE001 - a photo that needs a download is skipped
            continue
        if isinstance(a, tuple):
            a = a[0]
        a = np.asarray(a)
        if a.dtype != np.uint8 or min(a.shape[:2]) < 150:
            continue
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        out.append((name, np.ascontiguousarray(a[:, :, :3])))
    try:
        from sklearn.datasets import load_sample_images

        for fname, a in zip(load_sample_images().filenames, load_sample_images().images):
            out.append(("sklearn_" + os.path.splitext(os.path.basename(fname))[0], np.asarray(a, np.uint8)))
    except Exception:  # noqa: BLE001 - scikit-learn is optional
        pass
    if not out:
        raise RuntimeError("no sample photo could be loaded from scikit-image")
    return out


def render(photo: np.ndarray, seed: int, index: int):
    """Image ``index``: a random crop of ``photo`` (35-100% of its side), rescaled to
    500x375 (or 375x500), maybe mirrored, with a small gamma and colour gain. PIL image."""
    from PIL import Image

    rng = np.random.default_rng([seed, index])
    portrait = rng.random() < 0.25
    ow, oh = (HEIGHT, WIDTH) if portrait else (WIDTH, HEIGHT)
    h, w = photo.shape[:2]
    ar = ow / oh
    # largest box of aspect ar inside the photo, then shrink it by a random factor
    bw, bh = (w, w / ar) if w / h < ar else (h * ar, h)
    f = rng.uniform(0.35, 1.0)
    bw, bh = max(8.0, bw * f), max(8.0, bh * f)
    x0 = rng.uniform(0, w - bw)
    y0 = rng.uniform(0, h - bh)
    img = Image.fromarray(photo).resize((ow, oh), Image.BICUBIC, box=(x0, y0, x0 + bw, y0 + bh))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    # gamma and per-channel gain through one 256-entry table per channel (cheap)
    x = np.arange(256, dtype=np.float64) / 255.0
    lut = np.clip((x[None, :] ** rng.uniform(0.8, 1.25)) * rng.uniform(0.9, 1.1, size=(3, 1)) * 255.0 + 0.5,
                  0, 255).astype(np.uint8)
    a = np.asarray(img)
    return Image.fromarray(np.stack([lut[c][a[:, :, c]] for c in range(3)], axis=2))


def _stamp(root: str) -> dict:
    try:
        with open(os.path.join(root, "fastload_bench.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def build_images(root: str, n: int = 2000, seed: int = 0, progress: bool = True) -> str:
    """Write (or reuse) the ImageFolder dataset of ``n`` JPEGs under ``root``; returns root.

    Example::

        root = build_images(tmp_dir, n=8)
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    meta = {"version": FORMAT_VERSION, "n": int(n), "seed": int(seed), "size": [WIDTH, HEIGHT],
            "quality": QUALITY}
    old = _stamp(root)
    if old and all(old.get(k) == v for k, v in meta.items()):
        return root
    photos = source_photos()
    classes = [name for name, _ in photos]
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
    bar = Progress(n, desc=f"bench data: {n} JPEGs", unit="img", enabled=progress)
    for i in range(n):
        k = i % len(photos)
        path = os.path.join(root, classes[k], f"{i:06d}.jpg")
        buf = io.BytesIO()
        render(photos[k][1], seed, i).save(buf, format="JPEG", quality=QUALITY)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
        bar.update()
    bar.close()
    with open(os.path.join(root, "fastload_bench.json"), "w") as f:
        json.dump({**meta, "classes": classes}, f)
    return root


def list_images(root: str) -> tuple[list[str], list[int], list[str]]:
    """ImageFolder order (classes sorted, files sorted): (paths, labels, classes)."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    paths, labels = [], []
    for ci, c in enumerate(classes):
        for fn in sorted(os.listdir(os.path.join(root, c))):
            if fn.lower().endswith((".jpg", ".jpeg")):
                paths.append(os.path.join(root, c, fn))
                labels.append(ci)
    if not paths:
        raise ValueError(f"no JPEG found under {root!r}")
    return paths, labels, classes


def tiny_teacher(num_classes: int, seed: int = 0):
    """A small conv net with fixed weights drawn from a private generator (no global RNG).
    It stands in for a real teacher: the loader's work does not depend on its quality."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        nn.AvgPool2d(4), nn.Conv2d(3, 16, 5, stride=2, padding=2), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))
    with torch.no_grad():
        for p in net.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else max(1, p.numel())
            p.copy_(torch.randn(p.shape, generator=g) * (2.0 / fan_in) ** 0.5)
    return net.eval()


def policy(kind: str):
    """The two augmentation policies the bench replays: "crop" (RandomResizedCrop + flip)
    and "ra_mix" (+ RandAugment(2, 9) + MixUp/CutMix)."""
    import fastload

    if kind == "crop":
        return fastload.AugmentPolicy(rrc=True, flip=True, randaugment=None, erase=0.0,
                                      mixup=0.0, cutmix=0.0)
    if kind == "ra_mix":
        return fastload.AugmentPolicy(rrc=True, flip=True, randaugment=(2, 9), erase=0.0,
                                      mixup=1.0, cutmix=1.0, mix_p=0.5)
    raise ValueError(f"unknown policy kind {kind!r}")


def _readable(path: str) -> bool:
    """A cached reinforced dataset that this fastload still reads (first and last rows)."""
    try:
        ds = fastload_reader(path)
        for i in (0, len(ds) - 1):
            ds.augs(i)
            ds.target(i, 0)
            ds.image_bytes(i)
        return True
    except Exception:  # noqa: BLE001 - anything unreadable is rebuilt
        return False


def fastload_reader(path: str):
    from fastload.format.reader import ReinforcedDataset

    return ReinforcedDataset(path)


def build_reinforced(images_root: str, out: str, kind: str = "crop", num_augmentations: int = 4,
                     seed: int = 0, image_size: int = 224, progress: bool = True,
                     restart_markers: bool = True) -> str:
    """Write (or reuse) the reinforced version of ``images_root`` under ``out``
    (``restart_markers``: as :func:`fastload.reinforce`'s)."""
    import fastload

    key = {"images": os.path.abspath(images_root), "images_stamp": _stamp(images_root), "kind": kind,
           "N": int(num_augmentations), "seed": int(seed), "image_size": int(image_size),
           "version": FORMAT_VERSION, "restart_markers": "every 4 MCUs" if restart_markers else None}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()
    stamp = os.path.join(out, "fastload_bench_key.txt")
    if os.path.exists(stamp) and open(stamp).read().strip() == digest and _readable(out):
        return out
    _, _, classes = list_images(images_root)
    teacher = tiny_teacher(len(classes), seed)
    if progress:
        print(f"bench data: reinforcing {images_root} -> {out} (policy {kind}, N={num_augmentations}, "
              "tiny fixed teacher: the bench measures loader speed, not accuracy)", flush=True)
    import shutil

    if os.path.exists(out):
        shutil.rmtree(out)
    fastload.reinforce(images_root, teacher, out, num_augmentations=num_augmentations, topk=5,
                       policy=policy(kind), batch_size=64, image_size=image_size, seed=seed,
                       restart_markers=restart_markers)
    with open(stamp, "w") as f:
        f.write(digest + "\n")
    return out


def build_all(cache_dir: str | None = None, n: int = 2000, seed: int = 0, num_augmentations: int = 4,
              kinds=("crop", "ra_mix"), progress: bool = True, tolerant: bool = False) -> dict:
    """Images and their reinforced versions, cached under ``cache_dir``; returns their paths
    (with ``tolerant``, a reinforced version that fails is None and its error is kept)."""
    cache_dir = cache_dir or default_cache_dir()
    images = build_images(os.path.join(cache_dir, f"jpeg-{n}-s{seed}"), n=n, seed=seed, progress=progress)
    out = {"images": images, "errors": {}}
    for kind in kinds:
        try:
            out[kind] = build_reinforced(
                images, os.path.join(cache_dir, f"reinforced-{kind}-{n}-s{seed}-N{num_augmentations}"),
                kind=kind, num_augmentations=num_augmentations, seed=seed, progress=progress)
        except Exception as e:  # noqa: BLE001 - the baselines still run; the error is reported
            if not tolerant:
                raise
            out[kind] = None
            out["errors"][kind] = f"{type(e).__name__}: {e}"
            print(f"bench data: could not build the reinforced dataset ({kind}): {out['errors'][kind]}", flush=True)
    return out


def make_images(root: str, n: int = 12, classes: int = 3, seed: int = 0, quality: int = 90) -> list[str]:
    """Write ``n`` JPEG crops of scikit-image photos as an ImageFolder (``c<k>/<i>.jpg``)."""
    import skimage.data as sd
    from PIL import Image

    photos = [sd.astronaut(), sd.chelsea(), sd.coffee(), sd.rocket()]
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = photos[i % len(photos)]
        h, w = p.shape[:2]
        f = rng.uniform(0.5, 0.9)
        ch, cw = int(h * f), int(w * rng.uniform(0.5, 0.9))
        t, l = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        d = os.path.join(root, f"c{i % classes}")
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"{i:04d}.jpg")
        Image.fromarray(np.ascontiguousarray(p[t:t + ch, l:l + cw])).save(path, quality=quality)
        paths.append(path)
    return paths


def make_teacher(num_classes: int = 20, seed: int = 0, sharpness: float = 8.0):
    """A tiny deterministic conv net (fixed seed), logits scaled so the softmax is peaked."""
    import torch

    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32, num_classes))
    with torch.no_grad():
        for prm in net.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.5)
        net[-1].weight.mul_(sharpness)
    return net.eval()
