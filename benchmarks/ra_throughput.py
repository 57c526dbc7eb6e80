"""RandAugment throughput per semantics: fastload's C++ ops (one thread, the per-image entry
points fl_randaugment_u8 / fl_ra_timm_u8) vs the upstream library's own ops on the same
inputs and the same ops and magnitudes, in images/s, with how many outputs are byte-equal.

- v1: ``torchvision.transforms.autoaugment._apply_op`` on uint8 tensors (NEAREST, fill None);
- v2: ``torchvision.transforms.v2.RandAugment._apply_image_or_video_transform`` on tensors;
- pil: torchvision's ``_apply_op`` on PIL images (Pillow's ops);
- timm: timm's ``AugmentOp`` on PIL images (``rand-m9-mstd0.5-inc1`` draws).

Every semantics runs the same N images (HxW RGB, the golden sweep's generator) with 2 ops per
image drawn once (torchvision's op space at magnitude bin 9 of 31 for v1/v2/pil; fastload's own
sampler of timm's config for timm). The images are already decoded (tensors or PIL images,
converted before timing). The peers time their own ops only; fastload's timing includes the
copy into the HWC buffer the entry point works on in place.

Needs torchvision and timm (run it in an environment that has them; fastload's native library
is loaded from the checkout):

    PYTHONPATH=. /path/to/venv-with-torchvision-and-timm/bin/python benchmarks/ra_throughput.py

Writes ``benchmarks/results/ra_throughput.json`` (and a per-run copy).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "golden"))
os.environ.setdefault("MKL_ENABLE_INSTRUCTIONS", "AVX2")  # as the goldens (torch's affine at ties)


def _best_alternating(fns, repeats):
    """Best time of each function, the passes alternating (a shared machine's load drifts)."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64, help="images per semantics")
    ap.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"))
    ap.add_argument("--repeats", type=int, default=5, help="timed passes (alternating); the best is kept")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    a = ap.parse_args(argv)

    import torch
    from PIL import Image

    torch.set_num_threads(1)
    import make_ra_golden as G  # the golden script's upstream calls (torchvision, timm)

    from fastload import _native
    from fastload._results import write_result
    from fastload.sample import schema as S
    from fastload.sample.policy import _timm_draws, parse_timm_config

    lib = _native.load("replay")
    vp = ctypes.c_void_p
    lib.fl_randaugment_u8.argtypes = [vp, ctypes.c_int, ctypes.c_int, vp, vp, ctypes.c_int, ctypes.c_int]
    lib.fl_randaugment_u8.restype = ctypes.c_int
    lib.fl_ra_timm_u8.argtypes = [vp, ctypes.c_int, ctypes.c_int, vp, vp, vp, ctypes.c_int, vp]
    lib.fl_ra_timm_u8.restype = ctypes.c_int

    h, w = a.size
    imgs = [G.sweep_image(h, w, k) for k in range(a.n)]  # CHW uint8
    hwcs = [np.ascontiguousarray(x.transpose(1, 2, 0)) for x in imgs]
    g = np.random.default_rng(0)
    tv_ops = g.integers(0, len(G.OPS), (a.n, 2))
    tv_mags = np.where(np.isin(np.array(G.OPS)[tv_ops], list(G.SIGNED)) & (g.random((a.n, 2)) < 0.5), -9, 9)
    t_ops, t_mags, t_vals = _timm_draws(parse_timm_config("rand-m9-mstd0.5-inc1-p1.0"), g, a.n, "random")
    t_fill = np.array(G.TIMM_FILL, np.uint8)
    timm_name = {S.RA_OP_ID["Timm" + n]: n for n in G.TIMM_OPS}
    flags = {"v1": 0, "v2": 1 << 8, "pil": 1 << 9}

    def run_fastload(sem):
        outs = []
        for k, x in enumerate(hwcs):
            buf = x.copy()
            if sem == "timm":
                o = np.ascontiguousarray(t_ops[k], np.uint8)
                m = np.ascontiguousarray(t_mags[k], np.int8)
                v = np.ascontiguousarray(t_vals[k], np.float32)
                st = lib.fl_ra_timm_u8(_native.ptr(buf), h, w, _native.ptr(o), _native.ptr(m), _native.ptr(v),
                                       len(o), _native.ptr(t_fill))
            else:
                o = np.ascontiguousarray(tv_ops[k], np.uint8)
                m = np.ascontiguousarray(tv_mags[k], np.int8)
                st = lib.fl_randaugment_u8(_native.ptr(buf), h, w, _native.ptr(o), _native.ptr(m), 2,
                                           31 | flags[sem])
            _native.check(lib, st, "randaugment")
            outs.append(buf)
        return outs

    def peer_inputs(sem):
        if sem in ("v1", "v2"):
            return [torch.from_numpy(x.copy()) for x in imgs]
        return [Image.fromarray(x) for x in hwcs]

    def run_peer(sem, inputs):
        outs = []
        for k, x in enumerate(inputs):
            if sem == "timm":
                for s in range(S.MAX_RA):
                    if t_ops[k, s] != S.RA_NONE:
                        x = G.timm_apply(x, timm_name[int(t_ops[k, s])], float(t_vals[k, s]), t_mags[k, s] < 0,
                                         abs(int(t_mags[k, s])) == 2)
            else:
                fn = {"v1": G.v1_apply, "v2": G.v2_apply, "pil": G.pil_apply}[sem]
                for op, b in zip(tv_ops[k], tv_mags[k]):
                    x = fn(x, G.OPS[int(op)], int(b))
            outs.append(x)
        return outs

    def as_hwc(sem, x):
        return x.permute(1, 2, 0).numpy() if sem in ("v1", "v2") else np.asarray(x, np.uint8)

    rows = {}
    for sem in ("v1", "v2", "pil", "timm"):
        fl_out = run_fastload(sem)
        inputs = peer_inputs(sem)
        pe_out = run_peer(sem, inputs)
        equal = sum(np.array_equal(f, as_hwc(sem, p)) for f, p in zip(fl_out, pe_out))
        t_fl, t_pe = _best_alternating([lambda: run_fastload(sem), lambda: run_peer(sem, inputs)], a.repeats)
        peer = {"v1": "torchvision tensor", "v2": "torchvision.v2 tensor", "pil": "torchvision on PIL",
                "timm": "timm on PIL"}[sem]
        rows[sem] = {"peer": peer, "fastload_images_per_s": a.n / t_fl, "peer_images_per_s": a.n / t_pe,
                     "speedup": t_pe / t_fl, "byte_equal": f"{equal}/{a.n}"}
        print(f"{sem:5s} fastload {a.n / t_fl:9.1f} img/s  {peer:22s} {a.n / t_pe:9.1f} img/s  "
              f"x{t_pe / t_fl:5.2f}  equal {equal}/{a.n}", flush=True)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    import timm
    import torchvision

    path = write_result("ra_throughput", {
        "what": "RandAugment alone, 2 ops per image, one thread, decoded inputs; images/s (best of repeats, "
                "fastload and peer passes alternating)",
        "images": a.n, "size": [h, w], "repeats": a.repeats, "load_1min": load,
        "peer_versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                          "timm": timm.__version__, "pillow": Image.__version__},
        "semantics": rows}, a.out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
