"""The golden sweep's inputs and digests, numpy only: make_ra_golden.py (run where
torchvision is) and the tests (run where it is not) import this one definition."""
import hashlib

import numpy as np


def sweep_image(h, w, seed):
    """A deterministic photo-like image from integer arithmetic only (no RNG stream whose
    definition could change): gradients, a texture and a pseudo-random dither, each channel in
    a reduced range (so AutoContrast and Equalize have work). tests/test_ra_golden.py builds
    the same image and checks it against the stored digest."""
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    out = []
    for c in range(3):
        k = seed * 3 + c
        dither = ((x * 2654435761 + y * 40503 + k * 97) >> 7) % 23
        tex = ((x * (5 + k) + y * (3 + 2 * k)) % 37) + ((x * y + k) % 11)
        v = 30 + 10 * c + (x * (80 + k)) // max(w, 1) + (y * (60 - k)) // max(h, 1) + tex + dither
        out.append(np.clip(v, 0, 255))
    return np.stack(out).astype(np.uint8)


def digest(a) -> bytes:
    a = np.ascontiguousarray(a)
    return hashlib.sha256(a.tobytes()).digest()[:16]
