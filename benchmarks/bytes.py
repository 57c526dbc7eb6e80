"""Bytes mode (ByteFormer input): tokens/s delivered, per format, by
``ReinforcedLoader(output="bytes")`` (encoding in the loader's render stage, on its render
thread) and by the ``BytesBatches`` wrapper around a uint8 loader (encoding on the caller's
thread), side by side in one run; the encode alone; and the padding fraction of the padded
batch with and without power-of-two length groups.

    python benchmarks/bytes.py [--images 384] [--batch 64] [--size 224] [--steps 10]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out-dir", default="benchmarks/results")
    a = ap.parse_args(argv)
    from fastload.bench._common import write_result
    from fastload.bench.data import build_all
    from fastload.bytes import BytesBatches
    from fastload.format.reader import ReinforcedDataset
    from fastload.loader.reinforced import ReinforcedLoader
    from fastload.replay import encode as E

    ds = ReinforcedDataset(build_all(n=a.images, kinds=("crop",), progress=False)["crop"])
    mk = lambda dtype=torch.uint8: ReinforcedLoader(ds, batch_size=a.batch, shuffle=True, image_size=a.size,
                                                    num_workers=a.workers, dtype=dtype, drop_last=True)
    res = {"load_average_at_start": list(os.getloadavg()),
           "note": ("2-core machine shared with other jobs while measured: rates are deflated; "
                    "padding fractions do not depend on the load"),
           "settings": {"images": a.images, "batch": a.batch, "image_size": a.size, "steps": a.steps,
                        "native_threads": a.workers, "policy": "RandomResizedCrop + flip (bench 'crop')"},
           "formats": {}}

    def cycle(make):
        while True:
            yield from make()

    it = cycle(lambda: iter(mk()))
    for _ in range(2):
        next(it)
    t0 = time.perf_counter()
    for _ in range(a.steps):
        next(it)
    render_s = (time.perf_counter() - t0) / a.steps
    res["render_only_uint8"] = {"s_per_batch": render_s, "images_per_s": a.batch / render_s}
    def in_loader(fmt, bucket, kw):  # encoded in the loader's render stage
        return ReinforcedLoader(ds, batch_size=a.batch, shuffle=True, image_size=a.size, num_workers=a.workers,
                                drop_last=True, output="bytes", encode=fmt, bucket=bucket,
                                quality=kw.get("quality", 90))

    def wrapper(fmt, bucket, kw):  # BytesBatches around an images-mode loader
        return BytesBatches(mk(torch.float32 if fmt == "stored" else torch.uint8), encode=fmt, bucket=bucket, **kw)

    res["settings"]["paths"] = {"loader": "ReinforcedLoader(output='bytes')", "wrapper": "BytesBatches(loader)"}
    for fmt, kw in [("jpeg", dict(quality=90)), ("png", {}), ("tiff", {}), ("stored", {})]:
        row = {}
        for path, make in (("loader", in_loader), ("wrapper", wrapper)):
            for bucket in (False, True):
                it = cycle(lambda: iter(make(fmt, bucket, kw)))
                for _ in range(2):
                    next(it)
                tokens = padded = 0
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    b = next(it)
                    tokens += int(b.lengths.sum())
                    padded += b.tokens.numel() if not bucket else sum(g.tokens.numel() for g in b.groups)
                s = (time.perf_counter() - t0) / a.steps
                row.setdefault(path, {})["bucketed" if bucket else "padded"] = {
                    "s_per_batch": s, "tokens_per_s": tokens / a.steps / s,
                    "mean_tokens_per_image": tokens / a.steps / a.batch, "padding_fraction": 1 - tokens / padded,
                    "groups_per_batch": None if not bucket else len(b.groups)}
        if fmt != "stored":
            images = next(iter(mk()))[0]
            t0 = time.perf_counter()
            for _ in range(5):
                E.encode_raw(images, fmt, layout="nchw", threads=a.workers, **kw)
            row["encode_only_images_per_s"] = 5 * a.batch / (time.perf_counter() - t0)
        res["formats"][fmt] = row
        print(fmt, row, flush=True)
    res["load_average_at_end"] = list(os.getloadavg())
    print("wrote", write_result("bytes", res, a.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
