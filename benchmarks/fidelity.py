"""Replay fidelity against the recipes' own replay path: fastload's render (decode, crop,
resize, flip, RandAugment) vs the same records replayed the upstream way with real
torchvision on PIL images, as DataCompDR (ml-mobileclip) and ml-dr's training-time dataset do:
Pillow decodes, ``F.resized_crop`` (Pillow's resize), ``F.hflip``, then torchvision's
RandAugment ``_apply_op`` on the PIL image with the stored magnitudes.

Per record: exact (0 levels), within 1 level, and the largest difference, for fastload's
RandAugment semantics v1 (tensor ops: what fastload replayed before "pil"), v2 and pil, and for
the records without RandAugment (the crop/resize baseline every semantics shares: Pillow's
resize vs fastload's torch-style antialiased resize, within 1 level). A 1-level input
difference can become many levels after RandAugment (Solarize's threshold, Posterize's bit
boundaries, AutoContrast/Equalize's rescaling, a Rotate's pixel choice), so each semantics is
also measured on RandAugment alone: upstream's ops applied to fastload's own crop
("randaugment_given_same_crop"). With a fastload that has ``resize="pil"`` (Pillow's resize,
byte-exact), the whole records are also measured with it: ``pil_resize_pil`` (pil RandAugment)
and ``no_randaugment_resize_pil``; the rows above keep fastload's default torch-style resize
(the "before"). Run against an older checkout (PYTHONPATH) it measures what that one has.

Needs torchvision (run it in a separate environment that has it; fastload's native library is
loaded from the checkout):

    PYTHONPATH=. /path/to/venv-with-torchvision/bin/python benchmarks/fidelity.py --out-dir benchmarks/results

Writes ``<out-dir>/fidelity.json``.
"""
from __future__ import annotations

import argparse
import inspect
import io
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

RECIPES = {
    # DataCompDR: RandomResizedCrop(224, bicubic) + RandAugment(2, 9) on PIL, no flip
    "datacompdr": dict(interpolation="bicubic", flip=False),
    # ml-dr ImageNet+ training-time dataset: RandomResizedCrop(224, bilinear), flip, RandAugment on PIL
    "mldr_training": dict(interpolation="bilinear", flip=True),
}


def photos(n: int, seed: int):
    """JPEG photos (q90) of varied sizes: smooth gradients, texture and noise."""
    from PIL import Image

    g = np.random.default_rng(seed)
    out = []
    for k in range(n):
        h, w = int(g.integers(240, 520)), int(g.integers(240, 640))
        y, x = np.mgrid[0:h, 0:w].astype(np.float64)
        ch = []
        for c in range(3):
            a, b, p = g.uniform(0.01, 0.08, 3)
            v = 110 + 60 * np.sin(a * x + p) + 50 * np.cos(b * y + c) + g.normal(0, 10, (h, w))
            ch.append(np.clip(v, 0, 255))
        buf = io.BytesIO()
        Image.fromarray(np.stack(ch, -1).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def records(srcs, n: int, seed: int, flip: bool):
    from PIL import Image

    from fastload.sample import params as P

    g = np.random.default_rng(seed)
    rec = P.empty(n)
    src_of = []
    boxes = []
    for r in range(n):
        s = int(g.integers(0, len(srcs)))
        W, H = Image.open(io.BytesIO(srcs[s])).size
        scale, ratio = g.uniform(0.08, 1.0), np.exp(g.uniform(np.log(3 / 4), np.log(4 / 3)))
        bw = int(min(W, max(8, round(np.sqrt(scale * W * H * ratio)))))
        bh = int(min(H, max(8, round(np.sqrt(scale * W * H / ratio)))))
        i, j = int(g.integers(0, H - bh + 1)), int(g.integers(0, W - bw + 1))
        rec["crop"][r] = P.pixels_to_box(i, j, bh, bw, H, W)
        assert P.box_to_pixels(rec["crop"][r], H, W) == (i, j, bh, bw)
        if flip and g.random() < 0.5:
            rec["flags"][r] |= P.FLAG_FLIP
        if r % 6:  # 1 in 6 without RandAugment: the crop/resize baseline
            for s_ in range(2):
                op = int(g.integers(0, len(P.RA_OPS)))
                rec["ra_ops"][r, s_] = op
                rec["ra_mags"][r, s_] = -9 if P.RA_OPS[op] in P.RA_SIGNED and g.random() < 0.5 else 9
        src_of.append(s)
        boxes.append((i, j, bh, bw))
    return rec, src_of, boxes


def upstream(src: bytes, box, rec, interpolation: str, size: int):
    """The record replayed as the recipes do, with real torchvision on a PIL image."""
    import torchvision.transforms.functional as F
    from PIL import Image
    from torchvision.transforms import InterpolationMode

    from fastload.sample import params as P

    img = Image.open(io.BytesIO(src)).convert("RGB")
    i, j, h, w = box
    mode = InterpolationMode.BICUBIC if interpolation == "bicubic" else InterpolationMode.BILINEAR
    img = F.resized_crop(img, i, j, h, w, [size, size], mode)
    if rec["flags"] & P.FLAG_FLIP:
        img = F.hflip(img)
    return upstream_ra(img, rec, size)


def upstream_ra(img, rec, size: int):
    """torchvision's RandAugment ops of the record on a PIL image (or a [3, H, W] uint8 array)."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode, RandAugment
    from torchvision.transforms.autoaugment import _apply_op

    from fastload.sample import params as P

    if isinstance(img, np.ndarray):
        img = Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0)), "RGB")
    ra = RandAugment(num_magnitude_bins=31)
    for op, b in zip(rec["ra_ops"], rec["ra_mags"]):
        if op == P.RA_NONE:
            continue
        name = P.RA_OPS[int(op)]
        table, signed = ra._augmentation_space(31, (size, size))[name]
        mag = float(table[abs(int(b))].item()) if table.ndim > 0 else 0.0
        if signed and b < 0:
            mag = -mag
        img = _apply_op(img, name, mag, interpolation=InterpolationMode.NEAREST, fill=None)
    return np.asarray(img, np.uint8).transpose(2, 0, 1)


def main(argv=None) -> int:
    import torch

    from fastload.bench._common import write_result
    from fastload.replay.native import render_batch
    from fastload.sample import params as P

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=300)
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--out-dir", default=None)
    a = ap.parse_args(argv)
    srcs = photos(a.images, 0)
    results = {}
    for name, cfg in RECIPES.items():
        rec, src_of, boxes = records(srcs, a.records, 1, cfg["flip"])
        want = [upstream(srcs[src_of[r]], boxes[r], rec[r], cfg["interpolation"], a.size) for r in range(a.records)]
        has_ra = (rec["ra_ops"] != P.RA_NONE).any(1)
        per = {}
        plain = rec.copy()
        plain["ra_ops"] = P.RA_NONE
        crop = torch.empty(a.records, 3, a.size, a.size, dtype=torch.uint8)
        render_batch([srcs[s] for s in src_of], plain, crop, interpolation=cfg["interpolation"], dct_scale=False,
                     threads=1)
        # RandAugment alone: upstream's ops applied to fastload's own crop (the same input pixels)
        want_ra = [upstream_ra(crop[r].numpy(), rec[r], a.size) for r in range(a.records)]
        for sem in ("v1", "v2", "pil"):
            out = torch.empty(a.records, 3, a.size, a.size, dtype=torch.uint8)
            render_batch([srcs[s] for s in src_of], rec, out, interpolation=cfg["interpolation"], dct_scale=False,
                         threads=1, ra_semantics=sem)
            d = np.array([int(np.abs(out[r].numpy().astype(int) - want[r].astype(int)).max())
                          for r in range(a.records)])
            dr = np.array([int(np.abs(out[r].numpy().astype(int) - want_ra[r].astype(int)).max())
                           for r in range(a.records)])
            per[sem] = {"records": int(has_ra.sum()), "exact": int((d[has_ra] == 0).sum()),
                        "within_1": int((d[has_ra] <= 1).sum()), "max": int(d[has_ra].max()),
                        "over_1_by_op": _over_by_op(rec, d, has_ra),
                        "randaugment_given_same_crop": {"exact": int((dr[has_ra] == 0).sum()),
                                                        "within_1": int((dr[has_ra] <= 1).sum()),
                                                        "max": int(dr[has_ra].max())}}
            if sem == "v1":
                per["no_randaugment"] = {"records": int((~has_ra).sum()), "exact": int((d[~has_ra] == 0).sum()),
                                         "within_1": int((d[~has_ra] <= 1).sum()), "max": int(d[~has_ra].max())}
        if "resize" in inspect.signature(render_batch).parameters:  # fastload with Pillow's resize
            out = torch.empty(a.records, 3, a.size, a.size, dtype=torch.uint8)
            render_batch([srcs[s] for s in src_of], rec, out, interpolation=cfg["interpolation"], dct_scale=False,
                         threads=1, ra_semantics="pil", resize="pil")
            d = np.array([int(np.abs(out[r].numpy().astype(int) - want[r].astype(int)).max())
                          for r in range(a.records)])
            per["pil_resize_pil"] = {"records": int(has_ra.sum()), "exact": int((d[has_ra] == 0).sum()),
                                     "within_1": int((d[has_ra] <= 1).sum()), "max": int(d[has_ra].max()),
                                     "over_1_by_op": _over_by_op(rec, d, has_ra)}
            per["no_randaugment_resize_pil"] = {"records": int((~has_ra).sum()),
                                                "exact": int((d[~has_ra] == 0).sum()),
                                                "within_1": int((d[~has_ra] <= 1).sum()),
                                                "max": int(d[~has_ra].max())}
        results[name] = {"interpolation": cfg["interpolation"], "flip": cfg["flip"], **per}
        print(name, {k: (v["exact"], v["within_1"], v["records"], v["max"], v.get("randaugment_given_same_crop"))
                     for k, v in per.items()}, flush=True)
    path = write_result("fidelity", {
        "description": ("records exact / within 1 level / max difference of fastload's replay vs the upstream "
                        "replay (real torchvision on PIL images after Pillow's decode and resized_crop), per "
                        "RandAugment semantics; records with RandAugment (2 ops, magnitude 9) and without; "
                        "randaugment_given_same_crop: upstream's RandAugment applied to fastload's own crop; "
                        "v1/v2/pil/no_randaugment with fastload's default torch-style crop resize, "
                        "pil_resize_pil/no_randaugment_resize_pil with resize='pil' (Pillow's Image.resize)"),
        "records": a.records, "images": a.images, "size": a.size, "results": results}, a.out_dir)
    print(path)
    return 0


def _over_by_op(rec, d, has_ra) -> dict:
    from fastload.sample import params as P

    out: dict = {}
    for r in np.nonzero(has_ra & (d > 1))[0]:
        for op in rec["ra_ops"][r]:
            if op != P.RA_NONE:
                out[P.RA_OPS[int(op)]] = out.get(P.RA_OPS[int(op)], 0) + 1
    return out


if __name__ == "__main__":
    sys.exit(main())
