"""Child process of tests/test_jpeg_fuzz.py: seeded JPEG mutations through the native decode
and render entry points. Each case must end in a result or a ValueError naming its sample;
a crash kills only this process, and the progress file names the case that was running.

    python tests/_jpeg_fuzz_worker.py SEED N PROGRESS_FILE [records]  -> one JSON summary line

"records" mode fuzzes the augmentation records instead: every byte of the 47-byte record
random (crop, flags, RandAugment ops and magnitudes, erase, partner, MixUp/CutMix boxes),
on raw and JPEG sources with and without partners.
"""
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _rss import vm_hwm_mib  # noqa: E402

from fastload.replay import native  # noqa: E402
from fastload.sample import params as P  # noqa: E402

# libjpeg's own SOF markers: baseline, extended, progressive, lossless are refused by the
# decoder; 9/10 = arithmetic sequential/progressive.
SOF = (0xC0, 0xC1, 0xC2, 0xC9, 0xCA)



def bases():
    """A small corpus of valid JPEGs: 4:2:0 / 4:4:4 RGB, grayscale, CMYK, progressive,
    arithmetic, progressive + arithmetic, at a few sizes."""
    rng = np.random.default_rng(1234)
    out = []
    for h, w in ((8, 8), (17, 23), (64, 48), (120, 90), (200, 256)):
        yy, xx = np.mgrid[0:h, 0:w]
        smooth = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), (xx + yy) % 256], -1)
        noisy = (smooth + rng.integers(0, 60, (h, w, 3))).clip(0, 255).astype(np.uint8)
        for prog, arith, sub in ((0, 0, 1), (0, 0, 0), (1, 0, 1), (0, 1, 1), (1, 1, 0)):
            out.append((f"rgb{h}x{w}p{prog}a{arith}s{sub}",
                        native._encode_jpeg(noisy, 85, bool(prog), bool(arith), bool(sub))))
        out.append((f"gray{h}x{w}", native._encode_jpeg(noisy[..., 0], 85)))
        out.append((f"gray{h}x{w}prog-arith", native._encode_jpeg(noisy[..., 1], 85, True, True)))
        cmyk = np.concatenate([noisy, noisy[..., :1]], -1)
        out.append((f"cmyk{h}x{w}", native._encode_jpeg(cmyk, 85)))
    # the same files with restart markers (fastload.replay.native.add_restarts): the loader
    # decodes slices of them
    out += [(f"{name}-rst", r) for name, b in list(out) for r in [native.add_restarts(b)] if r != b]
    return out


def find_sof(b):
    for i in range(len(b) - 9):
        if b[i] == 0xFF and b[i + 1] in SOF:
            return i
    return -1


def mutate(rng, name, data):
    b = bytearray(data)
    op = int(rng.integers(0, 8))
    desc = f"{name} op{op}"
    if op == 0:  # bit flips anywhere
        for _ in range(int(rng.integers(1, 17))):
            k = int(rng.integers(0, len(b)))
            b[k] ^= 1 << int(rng.integers(0, 8))
    elif op == 1:  # bit flips in the headers (tables, SOF, SOS)
        for _ in range(int(rng.integers(1, 5))):
            k = int(rng.integers(0, min(len(b), 700)))
            b[k] ^= 1 << int(rng.integers(0, 8))
    elif op == 2:  # truncation
        b = b[: int(rng.integers(0, len(b)))]
    elif op in (3, 4):  # declared size: huge, zero, tiny or moderate
        k = find_sof(b)
        if k >= 0:
            choice = int(rng.integers(0, 4))
            if choice == 0:
                hh, ww = int(rng.integers(4096, 65536)), int(rng.integers(4096, 65536))
            elif choice == 1:
                hh, ww = int(rng.integers(0, 2)), int(rng.integers(0, 3))
            elif choice == 2:
                hh, ww = int(rng.integers(1, 64)), int(rng.integers(1, 64))
            else:
                hh, ww = int(rng.integers(64, 1200)), int(rng.integers(64, 1200))
            b[k + 5:k + 9] = hh.to_bytes(2, "big") + ww.to_bytes(2, "big")
            desc += f" dims {hh}x{ww}"
            if op == 4:
                for _ in range(int(rng.integers(1, 5))):
                    j = int(rng.integers(0, len(b)))
                    b[j] ^= 1 << int(rng.integers(0, 8))
    elif op == 5:  # overwrite a span
        k = int(rng.integers(0, len(b)))
        n = int(rng.integers(1, 64))
        fill = rng.integers(0, 256, n).astype(np.uint8).tobytes() if rng.random() < 0.5 else bytes(n)
        b[k:k + n] = fill[: max(0, len(b) - k)]
    elif op == 6:  # insert or delete a span
        k = int(rng.integers(0, len(b)))
        n = int(rng.integers(1, 32))
        if rng.random() < 0.5:
            b[k:k] = rng.integers(0, 256, n).astype(np.uint8).tobytes()
        else:
            del b[k:k + n]
    # op 7: unchanged (valid input must decode)
    return desc, bytes(b)


def record(rng):
    r = P.empty(1)
    h, w = rng.integers(1, 65536, 2)
    r["crop"] = [[int(rng.integers(0, 65536 - h + 1)), int(rng.integers(0, 65536 - w + 1)), int(h), int(w)]]
    r["flags"] = int(rng.integers(0, 2))
    if rng.random() < 0.3:
        r["erase"] = [rng.integers(0, 65536, 4)]
    return r


def main(seed, n, progress):
    corpus = bases()
    rng = np.random.default_rng(seed)
    rss0 = vm_hwm_mib()
    stats = {"cases": 0, "ok": 0, "errors": 0, "wrong": [], "slowest_s": 0.0, "slowest": ""}
    outs = {s: torch.empty(1, 3, s[0], s[1]) for s in ((16, 16), (24, 40), (64, 64))}
    with open(progress, "w") as prog:
        for i in range(n):
            name, data = corpus[int(rng.integers(0, len(corpus)))]
            desc, b = mutate(rng, name, data)
            sid = f"case{i}"
            prog.write(f"{i} {seed} {desc}\n")
            prog.flush()
            t0 = time.perf_counter()
            for call in ("render", "decode", "restarts"):
                try:
                    if call == "render":
                        out = list(outs.values())[int(rng.integers(0, len(outs)))]
                        dct = [True, False, "m8"][int(rng.integers(0, 3))]
                        native.render_batch([b], record(rng), out, sample_ids=[sid], threads=1, dct_scale=dct)
                    elif call == "decode":
                        native.decode_batch([b], scale=int(rng.choice([1, 2, 4, 8])), threads=1, sample_ids=[sid])
                    else:
                        native.add_restarts(b, what=sid)
                    stats["ok"] += 1
                except ValueError as e:
                    if desc.endswith("op7"):
                        stats["wrong"].append(f"{desc}: {call}: a valid JPEG failed: {e}")
                    if sid not in str(e):
                        stats["wrong"].append(f"{desc}: {call}: error without the sample name: {e}")
                    stats["errors"] += 1
                except Exception as e:  # noqa: BLE001 - any other type is a finding
                    stats["wrong"].append(f"{desc}: {call}: {type(e).__name__}: {e}")
            dt = time.perf_counter() - t0
            if dt > stats["slowest_s"]:
                stats["slowest_s"], stats["slowest"] = dt, desc
            stats["cases"] += 1
    stats["max_rss_growth_mb"] = vm_hwm_mib() - rss0
    stats["limits"] = native.decode_limits()
    print(json.dumps(stats))


def main_records(seed, n, progress):
    rng = np.random.default_rng(seed)
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((1, 1), (3, 70), (33, 47), (96, 64))]
    jpg = native._encode_jpeg(imgs[3], 90)
    srcs = imgs + [jpg]
    stats = {"cases": 0, "ok": 0, "errors": 0, "wrong": [], "slowest_s": 0.0, "slowest": ""}
    rss0 = vm_hwm_mib()
    with open(progress, "w") as prog:
        for i in range(n):
            raw = rng.integers(0, 256, P.AUG_DTYPE.itemsize, dtype=np.uint8)
            if rng.random() < 0.8:  # mostly valid RandAugment ops, so that the ops themselves run
                raw[9:13] = np.where(rng.random(4) < 0.8, rng.integers(0, len(P.RA_OPS), 4), 255)
                raw[13:17] = rng.integers(-30, 31, 4).astype(np.int8).view(np.uint8)
            rec = raw.view(P.AUG_DTYPE).copy()
            src = srcs[int(rng.integers(0, len(srcs)))]
            partner = [srcs[int(rng.integers(0, len(srcs)))]] if rng.random() < 0.7 else None
            dtype = [torch.float32, torch.float16, torch.uint8][int(rng.integers(0, 3))]
            oh, ow = int(rng.integers(1, 40)), int(rng.integers(1, 40))
            out = torch.empty(1, 3, oh, ow, dtype=dtype)
            sid = f"rec{i}"
            prog.write(f"{i} {seed} record {raw.tobytes().hex()} out {oh}x{ow} {dtype}\n")
            prog.flush()
            t0 = time.perf_counter()
            try:
                native.render_batch([src], rec, out, partner_sources=partner, sample_ids=[sid], threads=1,
                                    interpolation=["bilinear", "bicubic"][int(rng.integers(0, 2))])
                if dtype != torch.uint8 and not torch.isfinite(out.float()).all():
                    stats["wrong"].append(f"{sid}: non-finite output")
                stats["ok"] += 1
            except ValueError as e:
                if sid not in str(e):
                    stats["wrong"].append(f"{sid}: error without the sample name: {e}")
                stats["errors"] += 1
            except Exception as e:  # noqa: BLE001 - any other type is a finding
                stats["wrong"].append(f"{sid}: {type(e).__name__}: {e}")
            dt = time.perf_counter() - t0
            if dt > stats["slowest_s"]:
                stats["slowest_s"], stats["slowest"] = dt, sid
            stats["cases"] += 1
    stats["max_rss_growth_mb"] = vm_hwm_mib() - rss0
    stats["limits"] = native.decode_limits()
    print(json.dumps(stats))


if __name__ == "__main__":
    if len(sys.argv) > 4 and sys.argv[4] == "records":
        main_records(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
    else:
        main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
