"""The pipelines ``fastload bench`` measures, and the runner that measures one of them.

Each pipeline runs in its own process (``python peers.py --pipeline NAME ...``), so its
peak RSS and CPU time are its own, and so a peer can live in another Python environment
(``fastload bench --python-peers /work/venv-tv/bin/python``). This file therefore imports
only the standard library at module level; torch, PIL, fastload, torchvision, FFCV and DALI
are imported inside the pipeline that needs them. The runner prints one line
``FASTLOAD_RESULT {json}``.

Pipelines (RandomResizedCrop 224 + horizontal flip + normalize, batch 64, unless stated):

- ``torchvision``: ImageFolder + PIL + torchvision.transforms in a torch DataLoader.
- ``torch_pil``: the same pipeline without torchvision (torchvision does not import beside
  every torch): PIL decode, RandomResizedCrop box sampled exactly as torchvision samples
  it, PIL crop+resize (bilinear, antialiased: what torchvision does for PIL images), PIL
  flip, ToTensor and Normalize as torch ops, in a torch DataLoader.
- ``fastload``: fastload.ReinforcedLoader over the reinforced dataset (stored augmentations).
- ``decode_scaled`` / ``decode_full``: the decode-only limit: libjpeg-turbo decoding the same
  files on all cores (fastload.replay.native.decode_batch) at the DCT scale the loader would
  use for a torchvision-sampled crop, and at full scale.
- ``decode_floor``: the decode floor of the stored crops: for each sample one of its stored
  crops (as the loader draws them), libjpeg-turbo skipping the rows above it
  (jpeg_skip_scanlines: entropy decoding only), cutting the columns outside it
  (jpeg_crop_scanline), decoding its rows at the loader's DCT scale and stopping after its last
  row (fastload.replay.native.crop_floor_batch): what any JPEG loader must decode for that crop.
- ``ffcv``, ``dali_cpu``, ``spdl``: the peers, when importable.
- ``torchvision_v2_ra`` / ``torch_ra_mix``: + RandAugment(2, 9) + MixUp/CutMix (alpha 1,
  one of them per batch), with torchvision.transforms.v2, or its torch-only stand-in.
- ``spdl_ra_mix``: SPDL's pipeline with torchvision v2's RandAugment(2, 9) in a thread stage and
  MixUp/CutMix on the batch.
- ``fastload_ra_mix``: ReinforcedLoader over the dataset reinforced with the same policy.

Every pipeline reports the settings it ran with (``settings`` in its result).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
LABELS = {
    "torchvision": "torchvision DataLoader (ImageFolder + PIL + transforms)",
    "torch_pil": "torch DataLoader + PIL, torchvision's RRC/flip/normalize rewritten with "
                 "PIL + torch ops (the stand-in where torchvision does not import)",
    "fastload": "fastload.ReinforcedLoader (stored augmentations)",
    "decode_scaled": "decode-only limit: libjpeg-turbo at the loader's DCT scale, all cores",
    "decode_full": "decode-only: libjpeg-turbo at full scale, all cores",
    "ffcv": "FFCV Loader (RandomResizedCropRGBImageDecoder + flip + normalize)",
    "dali_cpu": "DALI CPU pipeline (decoders.image_random_crop, resize, crop_mirror_normalize)",
    "torchvision_v2_ra": "torchvision.transforms.v2 DataLoader + RandAugment(2,9) + MixUp/CutMix",
    "torch_ra_mix": "torch DataLoader, torchvision v2's RRC/flip/RandAugment(2,9)/MixUp/CutMix "
                    "rewritten with torch ops (the stand-in where torchvision does not import)",
    "fastload_ra_mix": "fastload.ReinforcedLoader, stored RRC/flip/RandAugment(2,9)/MixUp/CutMix",
    "decode_floor": "decode floor: libjpeg-turbo decoding each sample's stored crop only (rows above skipped, "
                    "columns cut, stop after its last row), loader's DCT scale, all cores",
    "spdl": "SPDL pipeline (spdl.io FFmpeg decode with crop/scale/flip filter, per-stage thread concurrency)",
    "spdl_ra_mix": "SPDL pipeline + torchvision v2 RandAugment(2,9) stage + MixUp/CutMix",
}


# ----------------------------------------------------------------------------- measuring
def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out += [int(x) for x in f.read().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux /proc)."""
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.append(p)
            todo += _children(p)
    return seen


def tree_cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of a process tree, its threads and live children included."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / tick


def tree_memory_mib(pid: int) -> dict:
    """Current RSS of a process tree (sum over processes; RssAnon and RssFile split)."""
    out = {"rss": 0.0, "anon": 0.0, "file": 0.0}
    keys = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file"}
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    k = keys.get(line.split(":", 1)[0] + ":")
                    if k:
                        out[k] += int(line.split()[1]) / 1024
        except (OSError, ValueError, IndexError):
            pass
    return out


# ----------------------------------------------------------------------------- RRC params
def rrc_params(height: int, width: int, rand, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision.transforms.RandomResizedCrop.get_params, with ``rand()`` in [0, 1) and
    ``randint(lo, hi)`` drawn from a private generator (``rand`` is an object with both).

    Example:
        >>> import random
        >>> top, left, h, w = rrc_params(375, 500, random.Random(0))
        >>> 0 <= top <= 375 - h and 0 <= left <= 500 - w
        True
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * rand.random())
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * rand.random())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rand.randint(0, height - h), rand.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def dct_denom(crop_h: int, crop_w: int, out_h: int, out_w: int) -> int:
    """The loader's DCT scale rule (csrc/replay/jpeg.cpp ``choose_denom``): the largest
    denominator d in {8, 4, 2} with the crop still covering the output at 1/d, else 1."""
    for d in (8, 4, 2):
        if crop_h >= out_h * d and crop_w >= out_w * d:
            return d
    return 1


# ----------------------------------------------------------------------------- RandAugment
RA_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
          "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")


def _ra_magnitude(op, magnitude, h, w, num_bins=31):
    """torchvision RandAugment._augmentation_space(num_bins, (h, w))[op][magnitude]."""
    lin = lambda a, b: a + (b - a) * magnitude / (num_bins - 1)  # noqa: E731
    return {"ShearX": lin(0, 0.3), "ShearY": lin(0, 0.3), "TranslateX": lin(0, 150 / 331 * w),
            "TranslateY": lin(0, 150 / 331 * h), "Rotate": lin(0, 30), "Brightness": lin(0, 0.9),
            "Color": lin(0, 0.9), "Contrast": lin(0, 0.9), "Sharpness": lin(0, 0.9),
            "Posterize": 8 - int(round(magnitude / ((num_bins - 1) / 4))), "Solarize": lin(255, 0)}.get(op, 0.0)


def _blend(a, b, f):
    import torch

    return torch.clamp(f * a.float() + (1 - f) * (b.float() if hasattr(b, "float") else b), 0, 255).to(torch.uint8)


def _gray(x):
    return (0.2989 * x[0].float() + 0.587 * x[1].float() + 0.114 * x[2].float())[None]


def _affine(x, matrix):
    """Nearest-neighbour inverse affine warp about the image centre, fill 0 (torchvision's
    tensor path goes through grid_sample as well)."""
    import torch

    _, h, w = x.shape
    theta = torch.tensor(matrix, dtype=torch.float32)[None]
    # pixel-space inverse map -> normalized grid
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32) - (h - 1) / 2,
                            torch.arange(w, dtype=torch.float32) - (w - 1) / 2, indexing="ij")
    pts = torch.stack([xs, ys, torch.ones_like(xs)], -1) @ theta[0].T
    grid = torch.stack([pts[..., 0] / ((w - 1) / 2), pts[..., 1] / ((h - 1) / 2)], -1)[None]
    out = torch.nn.functional.grid_sample(x[None].float(), grid, mode="nearest", padding_mode="zeros",
                                          align_corners=True)
    return out[0].round_().to(torch.uint8)


def _equalize(x):
    import torch

    out = []
    for c in x:
        hist = torch.bincount(c.flatten().long(), minlength=256)
        nz = hist[hist != 0]
        step = torch.div(nz[:-1].sum(), 255, rounding_mode="floor") if nz.numel() else torch.tensor(0)
        if step == 0:
            out.append(c)
            continue
        lut = torch.div(torch.cumsum(hist, 0) + torch.div(step, 2, rounding_mode="floor"), step,
                        rounding_mode="floor")
        lut = torch.nn.functional.pad(lut, [1, 0])[:-1].clamp_(0, 255)
        out.append(lut[c.long()].to(torch.uint8))
    return torch.stack(out)


def apply_ra_op(x, op, mag):
    """One RandAugment op on a uint8 CHW tensor, as torchvision's _apply_op (tensor path)."""
    import torch

    if op == "Identity":
        return x
    if op in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
        if op == "ShearX":
            m = [[1, mag, 0], [0, 1, 0]]
        elif op == "ShearY":
            m = [[1, 0, 0], [mag, 1, 0]]
        elif op == "TranslateX":
            m = [[1, 0, -mag], [0, 1, 0]]
        elif op == "TranslateY":
            m = [[1, 0, 0], [0, 1, -mag]]
        else:
            a = math.radians(mag)
            m = [[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0]]
        return _affine(x, m)
    if op == "Brightness":
        return _blend(x, 0.0, 1 + mag)
    if op == "Color":
        return _blend(x, _gray(x), 1 + mag)
    if op == "Contrast":
        return _blend(x, _gray(x).mean(), 1 + mag)
    if op == "Sharpness":
        k = torch.ones(3, 1, 3, 3) / 13.0
        k[:, :, 1, 1] = 5.0 / 13.0
        blur = torch.nn.functional.conv2d(x[None].float(), k, groups=3)[0].round_()
        degen = x.float().clone()
        degen[:, 1:-1, 1:-1] = blur
        return _blend(x, degen, 1 + mag)
    if op == "Posterize":
        return x & (0xFF ^ ((1 << (8 - int(mag))) - 1))
    if op == "Solarize":
        return torch.where(x >= mag, 255 - x, x)
    if op == "AutoContrast":
        lo = x.amin(dim=(1, 2), keepdim=True).float()
        hi = x.amax(dim=(1, 2), keepdim=True).float()
        scale = torch.where(hi > lo, 255.0 / (hi - lo), torch.ones_like(hi))
        lo = torch.where(hi > lo, lo, torch.zeros_like(lo))
        return ((x.float() - lo) * scale).clamp_(0, 255).to(torch.uint8)
    if op == "Equalize":
        return _equalize(x)
    raise ValueError(f"unknown RandAugment op {op!r}")


def rand_augment(x, num_ops, magnitude, rng):
    """torchvision RandAugment(num_ops, magnitude) on a uint8 CHW tensor; ``rng`` a private
    random.Random."""
    _, h, w = x.shape
    for _ in range(num_ops):
        op = RA_OPS[rng.randrange(len(RA_OPS))]
        mag = _ra_magnitude(op, magnitude, h, w)
        if op in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
                  "Contrast", "Sharpness") and rng.random() < 0.5:
            mag = -mag
        x = apply_ra_op(x, op, mag)
    return x


# ----------------------------------------------------------------------------- pipelines
def _image_folder(root):
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    items = []
    for ci, c in enumerate(classes):
        for fn in sorted(os.listdir(os.path.join(root, c))):
            if fn.lower().endswith((".jpg", ".jpeg")):
                items.append((os.path.join(root, c, fn), ci))
    if not items:
        raise ValueError(f"no JPEG found under {root!r}")
    return items, classes


def _worker_rng():
    """A private generator per DataLoader worker, seeded from the loader's worker seed."""
    import random

    import torch

    info = torch.utils.data.get_worker_info()
    return random.Random(info.seed if info is not None else torch.initial_seed())


class _FolderDataset:
    """ImageFolder items, decoded with PIL, and a per-worker RNG for the transforms."""

    def __init__(self, root, size=224):
        self.items, self.classes = _image_folder(root)
        self.size = size
        self._rng = None

    def __len__(self):
        return len(self.items)

    def _open(self, i):
        from PIL import Image

        if self._rng is None:
            self._rng = _worker_rng()
        path, label = self.items[i]
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB"), label

    @staticmethod
    def _normalize(x):
        import torch

        x = x.float().div_(255)
        return x.sub_(torch.tensor(MEAN).view(3, 1, 1)).div_(torch.tensor(STD).view(3, 1, 1))


class PilRRCDataset(_FolderDataset):
    """torchvision's RandomResizedCrop(size) + RandomHorizontalFlip + ToTensor + Normalize on
    PIL images, written with PIL + torch ops (the torchvision code path for PIL inputs)."""

    def __getitem__(self, i):
        import numpy as np
        import torch
        from PIL import Image

        img, label = self._open(i)
        top, left, h, w = rrc_params(img.height, img.width, self._rng)
        # torchvision's F.resized_crop on PIL: crop, then resize (bilinear, antialiased by PIL)
        img = img.crop((left, top, left + w, top + h)).resize((self.size, self.size), Image.BILINEAR)
        if self._rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        # ToTensor (copies, as torchvision) + Normalize
        return self._normalize(torch.from_numpy(np.array(img)).permute(2, 0, 1)), label


def _dataloader(ds, cfg, collate_fn=None):
    import torch

    return torch.utils.data.DataLoader(
        ds, batch_size=cfg["batch_size"], shuffle=True, num_workers=cfg["workers"], drop_last=True,
        persistent_workers=cfg["workers"] > 0, generator=torch.Generator().manual_seed(cfg["seed"]),
        collate_fn=collate_fn)


def _epochs(make_epoch):
    """Endless iterator of batches over successive epochs."""
    epoch = 0
    while True:
        n = 0
        for b in make_epoch(epoch):
            n += 1
            yield b
        if n == 0:
            raise ValueError("the pipeline yields no batch: dataset smaller than one batch?")
        epoch += 1


def _dataloader_settings(cfg, **more):
    return {"batch_size": cfg["batch_size"], "num_workers": cfg["workers"], "persistent_workers": cfg["workers"] > 0,
            "shuffle": True, "drop_last": True, **more}


def pipe_torch_pil(cfg):
    _EXTRA["settings"] = _dataloader_settings(cfg, decode="PIL", interpolation="bilinear (PIL, antialiased)")
    dl = _dataloader(PilRRCDataset(cfg["images"], cfg["image_size"]), cfg)
    return _epochs(lambda e: dl)


def pipe_torchvision(cfg):
    from torchvision import datasets, transforms

    _EXTRA["settings"] = _dataloader_settings(cfg, dataset="torchvision.datasets.ImageFolder (PIL decode)",
                                              transforms="RandomResizedCrop, RandomHorizontalFlip, ToTensor, Normalize")
    tf = transforms.Compose([transforms.RandomResizedCrop(cfg["image_size"]), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    dl = _dataloader(datasets.ImageFolder(cfg["images"], transform=tf), cfg)
    # torchvision samples from torch's RNG, which DataLoader seeds per worker from `generator`
    return _epochs(lambda e: dl)


def _mix_collate(num_classes, seed, torchvision_v2=False):
    """Collate, then MixUp or CutMix (alpha 1, one of them per batch, as torchvision's
    RandomChoice([MixUp, CutMix]) does), labels made one-hot and mixed."""
    import torch

    if torchvision_v2:
        from torchvision.transforms import v2

        mix = v2.RandomChoice([v2.MixUp(num_classes=num_classes), v2.CutMix(num_classes=num_classes)])

        def collate(batch):
            return mix(*torch.utils.data.default_collate(batch))

        return collate
    state = {}

    def collate(batch):
        if "g" not in state:
            info = torch.utils.data.get_worker_info()
            state["g"] = torch.Generator().manual_seed(info.seed if info else seed)
        g = state["g"]
        x, y = torch.utils.data.default_collate(batch)
        y = torch.nn.functional.one_hot(y, num_classes).float()
        # Beta(1, 1) is uniform
        lam = float(torch.rand((), generator=g))
        if torch.rand((), generator=g) < 0.5:  # MixUp
            x = x.mul(lam).add_(x.roll(1, 0).mul_(1 - lam))
        else:  # CutMix: box of area (1 - lam), clamped, lam recomputed from the box
            H, W = x.shape[-2:]
            cy, cx = int(torch.randint(H, (), generator=g)), int(torch.randint(W, (), generator=g))
            rh, rw = int(0.5 * H * math.sqrt(1 - lam)), int(0.5 * W * math.sqrt(1 - lam))
            y0, y1, x0, x1 = max(cy - rh, 0), min(cy + rh, H), max(cx - rw, 0), min(cx + rw, W)
            x = x.clone()
            x[..., y0:y1, x0:x1] = x.roll(1, 0)[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)
        return x, y.mul(lam).add_(y.roll(1, 0).mul_(1 - lam))

    return collate


class TorchRAMixDataset(_FolderDataset):
    """torchvision v2 on uint8 tensors (its fast path): decode, RandomResizedCrop (bilinear,
    antialias), flip, RandAugment(2, 9) (torchvision's 14 ops and magnitudes), ToDtype,
    Normalize, written with torch ops. MixUp/CutMix runs in the collate function."""

    def __getitem__(self, i):
        import numpy as np
        import torch

        pil, label = self._open(i)
        img = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
        top, left, h, w = rrc_params(img.shape[1], img.shape[2], self._rng)
        x = torch.nn.functional.interpolate(img[None, :, top:top + h, left:left + w], size=(self.size, self.size),
                                            mode="bilinear", antialias=True, align_corners=False)[0]
        if self._rng.random() < 0.5:
            x = x.flip(-1)
        x = rand_augment(x, 2, 9, self._rng)
        return self._normalize(x), label


def pipe_torch_ra_mix(cfg):
    _EXTRA["settings"] = _dataloader_settings(cfg, decode="PIL", collate="MixUp/CutMix (torch ops)")
    ds = TorchRAMixDataset(cfg["images"], cfg["image_size"])
    dl = _dataloader(ds, cfg, collate_fn=_mix_collate(len(ds.classes), cfg["seed"]))
    return _epochs(lambda e: dl)


def pipe_torchvision_v2_ra(cfg):
    import torch
    from torchvision import datasets
    from torchvision.transforms import v2

    _EXTRA["settings"] = _dataloader_settings(
        cfg, dataset="torchvision.datasets.ImageFolder (PIL decode)",
        transforms="v2: PILToTensor, RandomResizedCrop(antialias), RandomHorizontalFlip, RandAugment(2, 9), "
                   "ToDtype, Normalize; collate: RandomChoice([MixUp, CutMix])")
    tf = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(cfg["image_size"], antialias=True),
                     v2.RandomHorizontalFlip(), v2.RandAugment(2, 9), v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize(MEAN, STD)])
    ds = datasets.ImageFolder(cfg["images"], transform=tf)
    dl = _dataloader(ds, cfg, collate_fn=_mix_collate(len(ds.classes), cfg["seed"], torchvision_v2=True))
    return _epochs(lambda e: dl)


def _reinforced_loader(path, cfg):
    import fastload

    kw = dict(batch_size=cfg["batch_size"], shuffle=True, num_workers=cfg["workers"],
              image_size=cfg["image_size"], drop_last=True, seed=cfg["seed"], p_reinforced=1.0)
    _EXTRA["settings"] = {k: v for k, v in kw.items() if k != "seed"}
    loader = fastload.ReinforcedLoader(fastload.ReinforcedDataset(path), **kw)
    _STAGED.append(loader)  # run() reads its per-stage statistics over the timed batches

    def epoch(e):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(e)
        return loader

    return _epochs(epoch)


def pipe_fastload(cfg):
    return _reinforced_loader(cfg["reinforced"], cfg)


def pipe_fastload_ra_mix(cfg):
    return _reinforced_loader(cfg["reinforced_ra_mix"], cfg)


def _decode(cfg, scaled):
    """Decode batches of the same files on all cores; the batch is the list of per-image
    outputs the native call returns (their count is what is measured)."""
    import random

    from fastload.replay import native

    items, _ = _image_folder(cfg["images"])
    blobs = []
    for path, _ in items:
        with open(path, "rb") as f:
            blobs.append(f.read())
    rng = random.Random(cfg["seed"])
    threads = cfg["threads"]
    _EXTRA["native_jpeg"] = bool(native._lib().fl_replay_have_jpeg())
    _EXTRA["settings"] = {"threads": threads, "batch_size": cfg["batch_size"],
                          "scale": "loader's DCT rule per image" if scaled else "full"}
    bs = cfg["batch_size"]
    size = cfg["image_size"]
    scales = [1] * len(blobs)  # DCT denominators
    if scaled:
        from PIL import Image

        for k, (path, _) in enumerate(items):
            with Image.open(path) as im:
                w, h = im.size
            _, _, ch, cw = rrc_params(h, w, rng)
            scales[k] = dct_denom(ch, cw, size, size)
        _EXTRA["dct_denominators"] = {str(d): scales.count(d) for d in sorted(set(scales))}

    def epoch(e):
        order = list(range(len(blobs)))
        random.Random(cfg["seed"] * 1000003 + e).shuffle(order)
        for s in range(0, len(order) - bs + 1, bs):
            idx = order[s:s + bs]
            # one call per DCT scale present in the batch (a call takes one scale); the
            # pixels go to per-thread scratch (keep=False): decoding is all that is timed
            for d in sorted({scales[k] for k in idx}):
                _decode_call(native, [blobs[k] for k in idx if scales[k] == d], d, threads)
            yield len(idx)

    return _epochs(epoch)


def _decode_call(native, blobs, denom, threads):
    """Decode ``blobs`` at scale 1/denom on ``threads`` native threads."""
    return native.decode_batch(blobs, scale=denom, threads=threads, keep=False)


def pipe_decode_scaled(cfg):
    return _decode(cfg, True)


def pipe_decode_full(cfg):
    return _decode(cfg, False)


def pipe_decode_floor(cfg):
    """Decode floor of each sample's stored crop (see the module docstring)."""
    import random

    import numpy as np

    import fastload
    from fastload.replay import native

    ds = fastload.ReinforcedDataset(cfg["reinforced"])
    n = len(ds)
    blobs = [bytes(ds.image_bytes(i)) for i in range(n)]
    crops = np.stack([ds.augs(i)["crop"] for i in range(n)])  # (n, N, 4) quantized boxes
    dct = ds.replay.get("dct_scale", True)
    rule = "pow2" if dct is True else dct
    threads, bs, size = cfg["threads"], cfg["batch_size"], cfg["image_size"]
    _EXTRA["settings"] = {"threads": threads, "batch_size": bs, "dct_rule": str(rule),
                          "crop": "one stored crop per sample, drawn uniformly per epoch"}

    def epoch(e):
        rng = random.Random(cfg["seed"] * 1000003 + e)
        order = list(range(n))
        rng.shuffle(order)
        for s0 in range(0, n - bs + 1, bs):
            idx = order[s0:s0 + bs]
            boxes = np.stack([crops[k, rng.randrange(crops.shape[1])] for k in idx])
            native.crop_floor_batch([blobs[k] for k in idx], boxes, (size, size), dct_scale=dct, threads=threads,
                                    keep=False)
            yield len(idx)

    return _epochs(epoch)


def _spdl(cfg, ra_mix: bool):
    """SPDL's pipeline (spdl.pipeline.PipelineBuilder): a source thread draws the order and the
    RandomResizedCrop box/flip (torchvision's sampling rule); a stage of ``threads`` concurrent
    tasks decodes each file with spdl.io (FFmpeg, single-threaded decoder per task, SPDL's
    default) through an FFmpeg filter doing the crop, bilinear resize and flip; [RandAugment
    stage]; batches of ``batch_size``; a collate stage stacks and normalizes (and MixUp/CutMix)."""
    import random

    import numpy as np
    import spdl.io
    import torch
    from PIL import Image
    from spdl.pipeline import PipelineBuilder

    items, classes = _image_folder(cfg["images"])
    sizes = []
    for path, _ in items:
        with Image.open(path) as im:  # header only
            sizes.append((im.height, im.width))
    threads, bs, size = cfg["threads"], cfg["batch_size"], cfg["image_size"]
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255

    def source():
        e = 0
        while True:
            rng = random.Random(cfg["seed"] * 1000003 + e)
            order = list(range(len(items)))
            rng.shuffle(order)
            for k in order:
                h, w = sizes[k]
                yield items[k][0], items[k][1], rrc_params(h, w, rng), rng.random() < 0.5
            e += 1

    def decode(item):
        path, label, (top, left, h, w), flip = item
        fd = f"crop=w={w}:h={h}:x={left}:y={top},scale=w={size}:h={size}:flags=bilinear"
        fd += ",hflip" if flip else ""
        buf = spdl.io.load_image(path, filter_desc=fd + ",format=pix_fmts=rgb24")
        return torch.from_numpy(spdl.io.to_numpy(buf)).permute(2, 0, 1), label  # uint8 CHW

    settings = {"num_threads": threads, "decode_concurrency": threads, "batch_size": bs,
                "decode": "spdl.io.load_image (FFmpeg mjpeg, single-threaded decoder per task) with filter "
                          "crop, scale (bilinear), hflip, format=rgb24",
                "collate_concurrency": 1, "sink_buffer": 3}
    b = PipelineBuilder().add_source(source()).pipe(decode, concurrency=threads)
    mix = None
    if ra_mix:
        from torchvision.transforms import v2

        ra = v2.RandAugment(2, 9)
        b = b.pipe(lambda xy: (ra(xy[0]), xy[1]), concurrency=threads)
        mix = v2.RandomChoice([v2.MixUp(num_classes=len(classes)), v2.CutMix(num_classes=len(classes))])
        settings.update(randaugment="torchvision.transforms.v2.RandAugment(2, 9) on uint8 CHW tensors",
                        randaugment_concurrency=threads, mix="torchvision v2 RandomChoice([MixUp, CutMix]) per batch")

    def collate(batch):
        x = torch.stack([t for t, _ in batch]).float().sub_(mean).div_(std)
        y = torch.tensor([lab for _, lab in batch])
        return mix(x, y) if mix is not None else (x, y)

    b = b.aggregate(bs, drop_last=True).pipe(collate, concurrency=1).add_sink(3)
    _EXTRA["settings"] = settings
    pipeline = b.build(num_threads=threads)
    pipeline.start()

    def gen():
        try:
            while True:
                yield pipeline.get_item(timeout=600)
        finally:
            pipeline.stop()

    return gen()


def pipe_spdl(cfg):
    return _spdl(cfg, False)


def pipe_spdl_ra_mix(cfg):
    return _spdl(cfg, True)


def pipe_dali_cpu(cfg):
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    @pipeline_def(batch_size=cfg["batch_size"], num_threads=cfg["threads"], device_id=None, seed=cfg["seed"])
    def pipe():
        jpegs, labels = fn.readers.file(file_root=cfg["images"], random_shuffle=True, name="r")
        images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB)
        images = fn.resize(images, resize_x=cfg["image_size"], resize_y=cfg["image_size"])
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                          mean=[m * 255 for m in MEAN], std=[s * 255 for s in STD],
                                          mirror=fn.random.coin_flip())
        return images, labels

    _EXTRA["settings"] = {"num_threads": cfg["threads"], "batch_size": cfg["batch_size"], "device": "cpu",
                          "decoder": "fn.decoders.image_random_crop (fused ROI decode)", "resize": "fn.resize",
                          "normalize": "fn.crop_mirror_normalize (mirror=coin_flip)"}
    p = pipe()
    p.build()
    it = DALIGenericIterator([p], ["x", "y"], reader_name="r", auto_reset=True)

    def epoch(e):
        for d in it:
            yield d[0]["x"], d[0]["y"]

    return _epochs(epoch)


def _ffcv_beton(cfg):
    """Write the same JPEG files into an FFCV .beton once (kept beside the images)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    path = os.path.join(cfg["images"].rstrip("/") + ".beton")
    if os.path.exists(path):
        return path
    items, _ = _image_folder(cfg["images"])

    class DS:
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            from PIL import Image

            return Image.open(items[i][0]).convert("RGB"), items[i][1]

    DatasetWriter(path + ".tmp", {"image": RGBImageField(write_mode="jpg", jpeg_quality=90),
                                  "label": IntField()}, num_workers=cfg["threads"]).from_indexed_dataset(DS())
    os.replace(path + ".tmp", path)
    return path


def pipe_ffcv(cfg):
    import numpy as np
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, ToTensor, ToTorchImage

    path = _ffcv_beton(cfg)
    size = cfg["image_size"]
    _EXTRA["settings"] = {"num_workers": cfg["threads"], "batch_size": cfg["batch_size"], "order": "RANDOM",
                          "decoder": "RandomResizedCropRGBImageDecoder",
                          "beton": "RGBImageField(write_mode='jpg', jpeg_quality=90), max_resolution not set "
                                   "(sources at full size, as the other pipelines read them)"}
    loader = Loader(path, batch_size=cfg["batch_size"], num_workers=cfg["threads"], order=OrderOption.RANDOM,
                    drop_last=True, seed=cfg["seed"], pipelines={
                        "image": [RandomResizedCropRGBImageDecoder((size, size)), RandomHorizontalFlip(),
                                  NormalizeImage(np.array(MEAN) * 255, np.array(STD) * 255, np.float32),
                                  ToTensor(), ToTorchImage()],
                        "label": [IntDecoder(), ToTensor()]})
    return _epochs(lambda e: loader)


_EXTRA: dict = {}  # what a pipeline reports besides speed
_STAGED: list = []  # the ReinforcedLoader a fastload pipeline built (this process runs one pipeline)
PIPELINES = {name[5:]: fn for name, fn in globals().items() if name.startswith("pipe_")}


# ----------------------------------------------------------------------------- runner
def _describe(batch):
    """Shape/dtype/range of a batch's first two members (images, labels)."""
    def one(t):
        try:
            return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                    "min": float(t.min()), "max": float(t.max()), "mean": float(t.float().mean())}
        except Exception:  # noqa: BLE001 - decode outputs are lists of arrays
            return {"type": type(t).__name__}

    if isinstance(batch, (list, tuple)) and len(batch) and not hasattr(batch[0], "__array_interface__") \
            and hasattr(batch[0], "shape") and hasattr(batch[0], "dtype"):
        return [one(t) for t in batch[:3]]
    if isinstance(batch, int):
        return [{"count": batch}]
    if isinstance(batch, (list, tuple)):
        return [{"count": len(batch), "first_shape": list(getattr(batch[0], "shape", []))}] if len(batch) else []
    return [one(batch)]


def _count(batch) -> int:
    if isinstance(batch, int):  # the decode-only pipelines yield their image count
        return batch
    if isinstance(batch, (list, tuple)) and batch and hasattr(batch[0], "shape") and len(batch) <= 3 \
            and hasattr(batch[0], "dim") and batch[0].dim() == 4:
        return int(batch[0].shape[0])
    return len(batch)


def run(cfg) -> dict:
    """Measure one pipeline: warm-up batches (excluded), then batches until ``max_batches`` or
    ``seconds``.

    Example (a tiny ImageFolder from fastload.bench.data.build_images)::

        run({"pipeline": "torch_pil", "images": "/tmp/fl_demo", "image_size": 64, "batch_size": 4,
             "workers": 0, "threads": 1, "seed": 0, "warmup": 1, "max_batches": 2, "seconds": 10})
    """
    name = cfg["pipeline"]
    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; known: {sorted(PIPELINES)}")
    me = os.getpid()
    t_start = time.perf_counter()
    _STAGED.clear()
    it = PIPELINES[name](cfg)
    first = next(it)
    desc = _describe(first)
    for _ in range(max(0, cfg["warmup"] - 1)):
        next(it)
    out = {"pipeline": name, "label": LABELS.get(name, name), "batches_desc": desc,
           "startup_s": time.perf_counter() - t_start, "loadavg_before": os.getloadavg()[0]}
    out.update(_EXTRA)
    for loader in _STAGED:
        loader.reset_stats()
    c0, t0 = tree_cpu_seconds(me), time.perf_counter()
    n_img = n_batch = 0
    while n_batch < cfg["max_batches"] and time.perf_counter() - t0 < cfg["seconds"]:
        n_img += _count(next(it))
        n_batch += 1
    dt, dc = time.perf_counter() - t0, tree_cpu_seconds(me) - c0
    if _STAGED:  # ReinforcedLoader.stats(): where the timed batches' time went, per stage
        st = _STAGED[-1].stats()
        out["stages"] = {k: {"batches": v.items, "seconds": v.seconds, "ms_per_batch": v.ms_per_item}
                         for k, v in st.stages.items()}
    out.update(images=n_img, batches=n_batch, seconds=dt, images_per_s=n_img / dt,
               cpu_s_per_image=dc / max(1, n_img), processes=len(process_tree(me)))
    out["rss_end_mib"] = tree_memory_mib(me)
    out["loadavg_after"] = os.getloadavg()[0]
    return out


def run_epochs_rss(cfg) -> dict:
    """Tree RSS after each full epoch (for the RSS-growth figure)."""
    name = cfg["pipeline"]
    me = os.getpid()
    import itertools

    per_epoch = cfg["epoch_batches"]
    it = PIPELINES[name](cfg)
    rss = []
    for _ in range(cfg["epochs_rss"]):
        for _ in itertools.islice(it, per_epoch):
            pass
        rss.append(tree_memory_mib(me))
    return {"pipeline": name, "rss_per_epoch_mib": rss}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="JSON object with the run's settings")
    args = ap.parse_args(argv)
    cfg = json.loads(args.config)
    if cfg.get("torch_threads"):
        import torch

        torch.set_num_threads(int(cfg["torch_threads"]))
    res = run_epochs_rss(cfg) if cfg.get("epochs_rss") else run(cfg)
    print("FASTLOAD_RESULT " + json.dumps(res), flush=True)
    sys.stdout.flush()
    os._exit(0)  # skip slow teardown of worker pools; the result is printed


if __name__ == "__main__":
    sys.exit(main())
