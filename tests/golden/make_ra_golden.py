"""Generate tests/golden/ra_golden.npz (RandAugment outputs of real torchvision, v1 and v2,
on small images) and tests/golden/ra_sweep.npz (every op x every bin x 5 image sizes x the
semantics v1, v2 and pil: torchvision's RandAugment on PIL images, i.e. Pillow's ops) and, with
the ``timm`` argument, tests/golden/ra_timm.npz (timm's RandAugment ops: see timm_sweep).

Run once, in an environment that has torchvision (never fastload's own):

    python3 -m venv /work/venv-tv && /work/venv-tv/bin/pip install torch==2.14.1 torchvision==0.29.1 pillow numpy
    /work/venv-tv/bin/python tests/golden/make_ra_golden.py          # both files
    /work/venv-tv/bin/python tests/golden/make_ra_golden.py sweep    # ra_sweep.npz only
    /work/venv-tv/bin/pip install timm   # then:
    /work/venv-tv/bin/python tests/golden/make_ra_golden.py timm     # ra_timm.npz only

MKL is pinned to its AVX2 kernels (set below, before torch starts): torch's bmm, which
torchvision's tensor affine uses, rounds differently on AVX-512 hosts (docs/guide/fidelity.md).

The tests (tests/test_ra_golden.py) read the arrays and need no torchvision. Each case is a
chain of at most two ops, stored as fastload records store them: op ids in RA_OPS order and
signed magnitude bins (the bin of the op's magnitude table for 31 bins and the current image
size; negative = the sign torchvision draws). Outputs come from each version's own code path:

- v1: ``torchvision.transforms.RandAugment._augmentation_space`` for the magnitude and
  ``torchvision.transforms.autoaugment._apply_op`` (NEAREST, fill None) for the op;
- v2: ``torchvision.transforms.v2.RandAugment._AUGMENTATION_SPACE`` and its
  ``_apply_image_or_video_transform`` (its default interpolation and fill).

This script does not import fastload (it runs beside another torch); the op order below is
checked against ``fastload.sample.params.RA_OPS`` by the test.
"""
import os
import sys

os.environ["MKL_ENABLE_INSTRUCTIONS"] = "AVX2"  # before torch: see the docstring

import numpy as np
import PIL
import torch
import torchvision
from torchvision.transforms import InterpolationMode
from torchvision.transforms import RandAugment as RAv1
from torchvision.transforms.autoaugment import _apply_op
from torchvision.transforms.v2 import RandAugment as RAv2

from sweep_input import digest, sweep_image  # noqa: E402 - numpy only, shared with the tests

OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
       "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
          "Contrast", "Sharpness"}
NONE = 255
NUM_BINS = 31


def images():
    """Small images that reach each op's edge cases: a narrow value range per channel (so
    AutoContrast rescales), a smooth gradient with noise, a flat channel, odd sizes, and one
    wide enough for the kernel's 16-pixel vector paths."""
    rng = np.random.default_rng(13)
    out = []
    a = np.stack([rng.integers(lo, hi, (13, 17)) for lo, hi in ((30, 200), (5, 120), (90, 251))])
    out.append(a)
    yy, xx = np.mgrid[0:20, 0:37]
    g = np.stack([(yy * 11 + xx * 5) % 256, (xx * 7 + 40) % 256, 255 - yy * 9]).astype(np.int64)
    b = np.clip(g + rng.integers(-12, 13, g.shape), 3, 247)
    out.append(b)
    c = np.stack([np.full((9, 8), 77), rng.integers(0, 256, (9, 8)), rng.integers(100, 140, (9, 8))])
    out.append(c)
    d = np.stack([rng.integers(0, 256, (6, 31)), rng.integers(60, 70, (6, 31)), rng.integers(0, 30, (6, 31))])
    out.append(d)
    return [torch.from_numpy(x.astype(np.uint8)).contiguous() for x in out]


def cases():
    rng = np.random.default_rng(7)
    single = []
    for op in OPS:
        if op in ("Identity", "AutoContrast", "Equalize"):
            bins = [0]
        elif op == "Solarize":
            bins = list(range(NUM_BINS))
        elif op in ("Color", "Sharpness", "Brightness", "Contrast"):
            bins = [1, 3, 5, 9, 14, 17, 22, 27, 30]
        else:
            bins = [0, 3, 9, 17, 30]
        for b in bins:
            single.append([(OPS.index(op), b)])
            if op in SIGNED and b:
                single.append([(OPS.index(op), -b)])
    chains = []
    for _ in range(48):
        chain = []
        for _ in range(2):
            k = int(rng.integers(0, len(OPS)))
            b = int(rng.integers(0, NUM_BINS))
            if OPS[k] in SIGNED and rng.random() < 0.5:
                b = -b
            chain.append((k, b))
        chains.append(chain)
    return single + chains


def v1_apply(img, op, b):
    _, h, w = img.shape
    table, signed = RAv1(num_magnitude_bins=NUM_BINS)._augmentation_space(NUM_BINS, (h, w))[op]
    mag = float(table[abs(b)].item()) if table.ndim > 0 else 0.0
    if signed and b < 0:
        mag = -mag
    return _apply_op(img, op, mag, interpolation=InterpolationMode.NEAREST, fill=None)


def v2_apply(img, op, b):
    _, h, w = img.shape
    ra = RAv2(num_magnitude_bins=NUM_BINS)
    fn, signed = ra._AUGMENTATION_SPACE[op]
    table = fn(NUM_BINS, h, w)
    mag = float(table[abs(b)]) if table is not None else 0.0
    if signed and b < 0:
        mag *= -1
    return ra._apply_image_or_video_transform(img, op, mag, interpolation=ra.interpolation, fill=ra._fill)


def main(path):
    imgs, cs = images(), cases()
    ops = np.full((len(cs), 2), NONE, np.uint8)
    mags = np.zeros((len(cs), 2), np.int8)
    for i, c in enumerate(cs):
        for j, (k, b) in enumerate(c):
            ops[i, j], mags[i, j] = k, b
    arrays = {"ops": ops, "mags": mags, "op_names": np.array(OPS), "num_bins": np.int64(NUM_BINS),
              "versions": np.array([torch.__version__, torchvision.__version__])}
    for n, img in enumerate(imgs):
        arrays[f"img{n}"] = img.numpy()
        for ver, fn in (("v1", v1_apply), ("v2", v2_apply)):
            outs = []
            for c in cs:
                x = img.clone()
                for k, b in c:
                    x = fn(x, OPS[k], b)
                outs.append(x.numpy())
            arrays[f"{ver}_{n}"] = np.stack(outs)
    np.savez_compressed(path, **arrays)
    diff = sum(int((arrays[f"v1_{n}"] != arrays[f"v2_{n}"]).any(axis=(1, 2, 3)).sum()) for n in range(len(imgs)))
    print(f"{path}: {len(cs)} cases x {len(imgs)} images; v1 != v2 in {diff}")


# ----------------------------------------------------------------------------- the sweep

SWEEP_SIZES = ((13, 17), (37, 64), (131, 97), (224, 224), (512, 683))  # odd, non-square, >= 512
FULL_ARRAYS = (0,)  # images whose every output is stored
SAMPLED = (1,)  # images with every SAMPLE_EVERY-th output stored; the others: digests only
SAMPLE_EVERY = 23  # (the file stays < 2 MB: outputs of dithered images hardly compress)


def sweep_cases():
    """Every op x every bin of 31 (both signs of the signed ops), then 40 random chains."""
    single = []
    for k, op in enumerate(OPS):
        if op in ("Identity", "AutoContrast", "Equalize"):
            bins = [0]
        elif op in SIGNED:
            bins = list(range(-(NUM_BINS - 1), NUM_BINS))
        else:
            bins = list(range(NUM_BINS))
        single += [[(k, b)] for b in bins]
    rng = np.random.default_rng(11)
    chains = []
    for _ in range(40):
        chain = []
        for _ in range(2):
            k = int(rng.integers(0, len(OPS)))
            b = int(rng.integers(0, NUM_BINS))
            chain.append((k, -b if OPS[k] in SIGNED and rng.random() < 0.5 else b))
        chains.append(chain)
    return single + chains


def pil_apply(pil_img, op, b):
    """torchvision's v1 RandAugment path on a PIL image: its magnitude, then _apply_op (NEAREST,
    fill None), which calls Pillow through torchvision.transforms.functional."""
    w, h = pil_img.size
    table, signed = RAv1(num_magnitude_bins=NUM_BINS)._augmentation_space(NUM_BINS, (h, w))[op]
    mag = float(table[abs(b)].item()) if table.ndim > 0 else 0.0
    if signed and b < 0:
        mag = -mag
    return _apply_op(pil_img, op, mag, interpolation=InterpolationMode.NEAREST, fill=None)


def sweep(path):
    from PIL import Image

    cs = sweep_cases()
    ops = np.full((len(cs), 2), NONE, np.uint8)
    mags = np.zeros((len(cs), 2), np.int8)
    for i, c in enumerate(cs):
        for j, (k, b) in enumerate(c):
            ops[i, j], mags[i, j] = k, b
    arrays = {"ops": ops, "mags": mags, "op_names": np.array(OPS), "num_bins": np.int64(NUM_BINS),
              "sizes": np.array(SWEEP_SIZES, np.int64), "sample_every": np.int64(SAMPLE_EVERY),
              "versions": np.array([torch.__version__, torchvision.__version__, PIL.__version__])}
    fns = {"v1": lambda x, op, b: v1_apply(x, op, b), "v2": lambda x, op, b: v2_apply(x, op, b)}
    for n, (h, w) in enumerate(SWEEP_SIZES):
        img = sweep_image(h, w, n)
        arrays[f"input_digest{n}"] = np.frombuffer(digest(img), np.uint8)
        if n in FULL_ARRAYS:
            arrays[f"img{n}"] = img
        for sem in ("v1", "v2", "pil"):
            dig = np.zeros((len(cs), 16), np.uint8)
            outs = []
            for i, c in enumerate(cs):
                if sem == "pil":
                    x = Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0)), "RGB")
                    for k, b in c:
                        x = pil_apply(x, OPS[k], b)
                    out = np.asarray(x, np.uint8).transpose(2, 0, 1)
                else:
                    x = torch.from_numpy(img).clone()
                    for k, b in c:
                        x = fns[sem](x, OPS[k], b)
                    out = x.numpy()
                dig[i] = np.frombuffer(digest(out), np.uint8)
                if n in FULL_ARRAYS or (n in SAMPLED and i % SAMPLE_EVERY == 0):
                    outs.append(np.ascontiguousarray(out))
            arrays[f"{sem}_digest{n}"] = dig
            if outs:
                arrays[f"{sem}_{'out' if n in FULL_ARRAYS else 'sample'}{n}"] = np.stack(outs)
        print(f"size {h}x{w}: {len(cs)} cases x 3 semantics", flush=True)
    np.savez_compressed(path, **arrays)
    print(f"{path}: {os.path.getsize(path)} bytes")


# ----------------------------------------------------------------------------- timm

# timm.data.auto_augment's op names (fastload's op ids are "Timm" + name, in this order)
TIMM_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "PosterizeIncreasing", "Solarize",
            "SolarizeIncreasing", "SolarizeAdd", "Color", "ColorIncreasing", "Contrast", "ContrastIncreasing",
            "Brightness", "BrightnessIncreasing", "Sharpness", "SharpnessIncreasing", "ShearX", "ShearY",
            "TranslateXRel", "TranslateYRel")
TIMM_NO_LEVEL = {"AutoContrast", "Equalize", "Invert"}
TIMM_NEGATED = {"Rotate", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
TIMM_GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
# levels (timm's magnitude after noise and clipping) as records store them: float32 values
TIMM_LEVELS = tuple(float(np.float32(v)) for v in (0, 1, 2.5, 4, 5, 6.2, 7, 8.6, 9, 9.37, 10))
TIMM_FILL = (124, 116, 104)  # timm's create_transform: round(255 * IMAGENET_DEFAULT_MEAN)


def timm_cases():
    """Every timm op x every level of TIMM_LEVELS x its draws (negation where timm draws it,
    BILINEAR/BICUBIC for the geometric ops), Rotate at 90/180/270 degrees (levels 30 and 60,
    past timm's default clip: Pillow's transposes), then 48 random chains of 2-3 ops.
    A case is a list of (op index in TIMM_OPS, level, negate, bicubic)."""
    single = []
    for k, op in enumerate(TIMM_OPS):
        levels = (0.0,) if op in TIMM_NO_LEVEL else TIMM_LEVELS + ((30.0, 60.0) if op == "Rotate" else ())
        for lv in levels:
            for neg in ((False, True) if op in TIMM_NEGATED else (False,)):
                for cub in ((False, True) if op in TIMM_GEOMETRIC else (False,)):
                    single.append([(k, lv, neg, cub)])
    rng = np.random.default_rng(19)
    chains = []
    for _ in range(48):
        chain = []
        for _ in range(int(rng.integers(2, 4))):
            k = int(rng.integers(0, len(TIMM_OPS)))
            lv = float(np.float32(np.clip(rng.normal(9, 0.5), 0, 10)))
            neg = TIMM_OPS[k] in TIMM_NEGATED and bool(rng.random() < 0.5)
            cub = TIMM_OPS[k] in TIMM_GEOMETRIC and bool(rng.random() < 0.5)
            chain.append((k, lv, neg, cub))
        chains.append(chain)
    return single + chains


def timm_apply(pil_img, op, level, negate, bicubic):
    """timm's own AugmentOp (prob 1, no magnitude noise: the level is the drawn one), its
    random negation fixed to the recorded draw, its resampling the recorded one."""
    from PIL import Image
    import timm.data.auto_augment as aa

    hp = dict(aa._HPARAMS_DEFAULT, img_mean=TIMM_FILL, magnitude_max=100,
              interpolation=Image.BICUBIC if bicubic else Image.BILINEAR)
    saved = aa._randomly_negate
    aa._randomly_negate = lambda v: -v if negate else v
    try:
        return aa.AugmentOp(op, prob=1.0, magnitude=level, hparams=hp)(pil_img)
    finally:
        aa._randomly_negate = saved


def timm_sweep(path):
    from PIL import Image
    import timm

    cs = timm_cases()
    L = max(len(c) for c in cs)
    ops = np.full((len(cs), L), NONE, np.uint8)
    levels = np.zeros((len(cs), L), np.float32)
    draws = np.zeros((len(cs), L), np.int8)  # fastload's ra_mags: sign = negate, |2| = bicubic
    for i, c in enumerate(cs):
        for j, (k, lv, neg, cub) in enumerate(c):
            ops[i, j], levels[i, j], draws[i, j] = k, lv, (-1 if neg else 1) * (2 if cub else 1)
    arrays = {"ops": ops, "levels": levels, "draws": draws, "op_names": np.array(TIMM_OPS),
              "fill": np.array(TIMM_FILL, np.uint8), "sizes": np.array(SWEEP_SIZES, np.int64),
              "sample_every": np.int64(SAMPLE_EVERY),
              "versions": np.array([timm.__version__, PIL.__version__])}
    for n, (h, w) in enumerate(SWEEP_SIZES):
        img = sweep_image(h, w, n)
        arrays[f"input_digest{n}"] = np.frombuffer(digest(img), np.uint8)
        if n in FULL_ARRAYS:
            arrays[f"img{n}"] = img
        dig = np.zeros((len(cs), 16), np.uint8)
        raised = np.zeros(len(cs), bool)
        outs = []
        for i, c in enumerate(cs):
            x = Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0)), "RGB")
            try:
                for k, lv, neg, cub in c:
                    x = timm_apply(x, TIMM_OPS[k], lv, neg, cub)
            except ValueError as e:  # Pillow >= 11 refuses posterize(0) (older ones cleared the image)
                assert "bits" in str(e), e
                raised[i] = True
                x = Image.new("RGB", x.size)
            out = np.asarray(x, np.uint8).transpose(2, 0, 1)
            dig[i] = np.frombuffer(digest(out), np.uint8)
            if n in FULL_ARRAYS or (n in SAMPLED and i % SAMPLE_EVERY == 0):
                outs.append(np.ascontiguousarray(out))
        arrays[f"timm_digest{n}"] = dig
        arrays[f"timm_raised{n}"] = raised
        if outs:
            arrays[f"timm_{'out' if n in FULL_ARRAYS else 'sample'}{n}"] = np.stack(outs)
        print(f"size {h}x{w}: {len(cs)} timm cases", flush=True)
    np.savez_compressed(path, **arrays)
    print(f"{path}: {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    if sys.argv[1:2] == ["timm"]:
        timm_sweep(sys.argv[2] if len(sys.argv) > 2 else "tests/golden/ra_timm.npz")
    elif sys.argv[1:2] == ["sweep"]:
        sweep(sys.argv[2] if len(sys.argv) > 2 else "tests/golden/ra_sweep.npz")
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else "tests/golden/ra_golden.npz")
        sweep("tests/golden/ra_sweep.npz")
