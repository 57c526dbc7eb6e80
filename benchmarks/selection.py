"""Online batch selection overhead: time per kept batch of OnlineBatchSelector (full-resolution
scoring, and "render less": scoring at 112 then rendering the kept rows at 224) against a
plain ReinforcedLoader delivering the same kept batch size; the time of the selection rule
itself is measured apart. The student is a small conv net scored on the CPU.

    python benchmarks/selection.py   (not select.py: that name shadows the standard library's select) [--images 384] [--kept 32] [--keep 0.25] [--steps 12]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch


def _student(num_classes: int):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 7, stride=4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(16, num_classes)).eval()


def _run(it, steps, warmup=2):
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    return (time.perf_counter() - t0) / steps


def _cycle(make):
    while True:
        yield from make()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--kept", type=int, default=32, help="kept batch size B")
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out-dir", default="benchmarks/results")
    a = ap.parse_args(argv)
    from fastload.bench._common import write_result
    from fastload.bench.data import build_all
    from fastload.format.reader import ReinforcedDataset
    from fastload.loader.reinforced import ReinforcedLoader
    from fastload.select import OnlineBatchSelector, rules

    torch.set_num_threads(a.workers)
    ds = ReinforcedDataset(build_all(n=a.images, kinds=("crop",), progress=False)["crop"])
    model = _student(ds.num_classes)
    M = int(round(a.kept / a.keep))
    t_score, t_rule = [], []

    def score(batch):
        t0 = time.perf_counter()
        out = model(batch[0])
        t_score.append(time.perf_counter() - t0)
        return out

    orig = OnlineBatchSelector._select

    def timed_select(self, s, k, g):
        t0 = time.perf_counter()
        r = orig(self, s, k, g)
        t_rule.append(time.perf_counter() - t0)
        return r

    OnlineBatchSelector._select = timed_select
    mk = lambda bs, size: ReinforcedLoader(ds, batch_size=bs, shuffle=True, image_size=size, num_workers=a.workers,
                                           drop_last=True)
    res = {"load_average_at_start": list(os.getloadavg()),
           "note": ("2-core machine shared with other jobs while measured: absolute times are inflated; "
                    "compare the rows of this one run"),
           "settings": {"images": a.images, "kept_batch": a.kept, "keep": a.keep, "super_batch": M,
                        "steps": a.steps, "native_threads": a.workers, "student": "conv7x7/4 16ch + linear (CPU)"}}
    plain = _run(_cycle(lambda: iter(mk(a.kept, 224))), a.steps)
    res["plain_loader_224"] = {"s_per_batch": plain, "images_per_s": a.kept / plain}
    for name, size, render in [("select_full_res_224", 224, None), ("select_render_less_112_to_224", 112, 224)]:
        for method in ("topk", "sample"):
            t_score.clear(); t_rule.clear()
            sel = lambda: iter(OnlineBatchSelector(mk(M, size), score, keep=a.keep, score="learnability",
                                                   method=method, render_size=render))
            s = _run(_cycle(sel), a.steps)
            res[f"{name}_{method}"] = {"s_per_kept_batch": s, "kept_images_per_s": a.kept / s,
                                        "vs_plain": s / plain,
                                        "score_fn_s_per_batch": float(np.median(t_score)),
                                        # loader + lookup + rule + (render less) the kept rows' render
                                        "s_per_kept_batch_without_score_fn": s - float(np.median(t_score)),
                                        "selection_rule_ms": 1e3 * float(np.median(t_rule))}
    # the joint rule alone on a pairwise matrix of the same super-batch size
    g = torch.Generator().manual_seed(0)
    A = torch.randn(M, M, generator=g, dtype=torch.float64)
    t0 = time.perf_counter()
    for _ in range(20):
        rules.select_joint(A, a.kept, g, chunks=4)
    res["joint_rule_ms"] = 1e3 * (time.perf_counter() - t0) / 20
    res["load_average_at_end"] = list(os.getloadavg())
    for k, v in res.items():
        print(k, v)
    print("wrote", write_result("select", res, a.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
