"""Render fastload's golden cases with the native library in FASTLOAD_NATIVE_DIR and write
the outputs' digests (one per case) to a JSON file. Used by .ci/march: the library built with
-march=native and with -march=x86-64 must give the same bytes on every case.

Cases: every RandAugment golden (tests/golden/ra_golden.npz and the sweep ra_sweep.npz, each
torchvision semantics, through fl_randaugment_u8; ra_timm.npz through fl_ra_timm_u8), and full replays (JPEG decode, crop, resize, flip,
RandAugment, erasing, MixUp/CutMix) of random records through render_batch.

Usage: FASTLOAD_NATIVE_DIR=DIR python .ci/march_outputs.py OUT.json
"""
import ctypes
import glob
import hashlib
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from fastload import _native  # noqa: E402
from fastload.replay.native import _encode_jpeg, have_jpeg, render_batch  # noqa: E402
from fastload.sample import params as P  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
SEMANTICS_FLAG = {"v1": 0, "v2": 1 << 8, "pil": 1 << 9}


def digest(a) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha256(a.tobytes() + str(a.shape).encode()).hexdigest()[:32]


def _golden_images(path, z):
    if "sizes" not in z:  # ra_golden.npz: the images are stored
        return {k: z[k] for k in sorted(z) if k.startswith("img")}
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_ra_golden import sweep_image  # the sweep's generator (checked there against digests)

    return {f"img{n}": sweep_image(int(h), int(w), n) for n, (h, w) in enumerate(z["sizes"])}


def ra_cases(out):
    lib = _native.load("replay")
    lib.fl_randaugment_u8.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                      ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.fl_randaugment_u8.restype = ctypes.c_int
    vp = ctypes.c_void_p
    lib.fl_ra_timm_u8.argtypes = [vp, ctypes.c_int, ctypes.c_int, vp, vp, vp, ctypes.c_int, vp]
    lib.fl_ra_timm_u8.restype = ctypes.c_int
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "golden", "ra_*.npz"))):
        with np.load(path) as f:
            z = {k: f[k] for k in f.files}
        imgs = _golden_images(path, z)
        if "levels" in z:  # ra_timm.npz: ops index its op_names, the timm family's ids
            from fastload.sample import schema as S

            ids = {i: S.RA_OP_ID["Timm" + str(n)] for i, n in enumerate(z["op_names"])}
            fill = np.ascontiguousarray(z["fill"], np.uint8)
            for name, img in imgs.items():
                for i in range(len(z["ops"])):
                    hwc = np.ascontiguousarray(np.transpose(img, (1, 2, 0)))
                    o = np.array([ids.get(int(k), S.RA_NONE) for k in z["ops"][i]], np.uint8)
                    m = np.ascontiguousarray(z["draws"][i], np.int8)
                    v = np.ascontiguousarray(z["levels"][i], np.float32)
                    st = lib.fl_ra_timm_u8(_native.ptr(hwc), hwc.shape[0], hwc.shape[1], _native.ptr(o),
                                           _native.ptr(m), _native.ptr(v), len(o), _native.ptr(fill))
                    _native.check(lib, st, "fl_ra_timm_u8")
                    out[f"{os.path.basename(path)}/timm/{name}/{i}"] = digest(hwc)
            continue
        for sem, flag in SEMANTICS_FLAG.items():
            for name, img in imgs.items():
                for i in range(len(z["ops"])):
                    hwc = np.ascontiguousarray(np.transpose(img, (1, 2, 0)))
                    o = np.ascontiguousarray(z["ops"][i], np.uint8)
                    m = np.ascontiguousarray(z["mags"][i], np.int8)
                    st = lib.fl_randaugment_u8(_native.ptr(hwc), hwc.shape[0], hwc.shape[1], _native.ptr(o),
                                               _native.ptr(m), len(o), int(z["num_bins"]) | flag)
                    _native.check(lib, st, "fl_randaugment_u8")
                    out[f"{os.path.basename(path)}/{sem}/{name}/{i}"] = digest(hwc)


def replay_cases(out):
    g = np.random.default_rng(11)
    srcs = []
    for k, (h, w) in enumerate(((97, 131), (240, 320), (333, 517), (64, 64))):
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([(x * 3 + y) % 256, (y * 5 + 17) % 256, (x * y) % 256], -1).astype(np.int64)
        img = np.clip(img + g.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
        srcs.append(img)
        if have_jpeg():
            srcs.append(_encode_jpeg(img, quality=90 - 5 * k))
    n = 64
    rec = P.empty(n)
    for i in range(n):
        rec["crop"][i] = (g.integers(0, 20000), g.integers(0, 20000), g.integers(20000, 45000), g.integers(20000, 45000))
        rec["flags"][i] = P.FLAG_FLIP if g.random() < 0.5 else 0
        k = int(g.integers(0, P.MAX_RA + 1))
        rec["ra_ops"][i, :k] = g.integers(0, len(P.RA_OPS), k)
        rec["ra_mags"][i, :k] = g.integers(-30, 31, k)
        if g.random() < 0.3:
            rec["erase"][i] = (g.integers(0, 30000), g.integers(0, 30000), 12000, 9000)
        if g.random() < 0.4:
            rec["partner"][i] = int(g.integers(0, n))
            rec["pcrop"][i] = (0, 0, P.Q, P.Q)
            if g.random() < 0.5:
                rec["flags"][i] |= P.FLAG_MIXUP
                rec["mixup"][i] = int(g.integers(0, P.Q))
            else:
                rec["flags"][i] |= P.FLAG_CUTMIX
                rec["cutmix"][i] = (10000, 10000, 20000, 25000)
    sources = [srcs[i % len(srcs)] for i in range(n)]
    partners = [srcs[int(rec["partner"][i]) % len(srcs)] if rec["partner"][i] >= 0 else None for i in range(n)]
    for sem in SEMANTICS_FLAG:
        for dtype, interp, dct in ((torch.uint8, "bilinear", True), (torch.float32, "bicubic", False)):
            o = torch.empty(n, 3, 96, 112, dtype=dtype)
            render_batch(sources, rec, o, partner_sources=partners, threads=1, ra_semantics=sem,
                         interpolation=interp, dct_scale=dct)
            for i in range(n):
                out[f"render/{sem}/{dtype}/{interp}/{i}"] = digest(o[i].numpy())
    # Pillow's resize (resize="pil"/"pil12"): double weights turned into fixed point, integer
    # passes, no contraction (resize_pil.cpp): required identical on every build, the no-FMA
    # baseline included (uint8 output: Normalize's float arithmetic is the resize's own)
    for resize in ("pil", "pil12"):
        for interp in ("bilinear", "bicubic"):
            o = torch.empty(n, 3, 96, 112, dtype=torch.uint8)
            render_batch(sources, rec, o, partner_sources=partners, threads=1, ra_semantics="pil",
                         interpolation=interp, resize=resize)
            for i in range(n):
                out[f"resize_{resize}/{interp}/{i}"] = digest(o[i].numpy())
    # timm records: the same crops, timm's draws in the records and their levels in the extension
    from fastload.sample.policy import AugmentPolicy, _timm_draws, parse_timm_config

    trec, ext = rec.copy(), P.empty_ext(n)
    trec["ra_ops"], trec["ra_mags"], ext["ra_vals"] = _timm_draws(parse_timm_config("rand-m9-mstd0.5-inc1-n3-p0.8"),
                                                                  g, n, "random")
    ext["ext"] = P.EXT_RA_FLOAT
    fill = AugmentPolicy().timm_fill
    for dtype, interp, dct in ((torch.uint8, "bilinear", True), (torch.float32, "bicubic", False)):
        o = torch.empty(n, 3, 96, 112, dtype=dtype)
        render_batch(sources, trec, o, partner_sources=partners, threads=1, ra_semantics="timm", ext=ext,
                     ra_fill=fill, interpolation=interp, dct_scale=dct)
        for i in range(n):
            out[f"render/timm/{dtype}/{interp}/{i}"] = digest(o[i].numpy())


def main(path):
    out = {}
    ra_cases(out)
    replay_cases(out)
    with open(path, "w") as f:
        json.dump({"native_dir": os.environ.get("FASTLOAD_NATIVE_DIR"), "cases": out}, f, indent=0, sort_keys=True)
    print(f"{path}: {len(out)} cases")


if __name__ == "__main__":
    main(sys.argv[1])
