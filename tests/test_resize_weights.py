"""Resize weights of the C++ replay kernel (csrc/replay/resize.cpp, vectorized 4 and 8
outputs at a time) against a plain NumPy reference of the PIL / torch antialias rule."""
import ctypes
import math

import numpy as np
import pytest

from fastload.replay.native import _lib

K_ONE = 1 << 14  # the int16 weights' fixed point (replay_impl.h kOne)


def _filter(x, bicubic):
    x = np.abs(x)
    if not bicubic:
        return np.where(x < 1.0, 1.0 - x, 0.0)
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def reference(out, x0, length, lo, hi, bicubic):
    """(K, taps, w [out, K] float32, start, count): torch's antialias weights (float64 math,
    weights rounded to float32, normalized by the double sum), then every output padded to
    the widest tap count inside [lo, hi)."""
    interp = 4.0 if bicubic else 2.0
    scale = length / out
    support = interp * 0.5 * scale if scale >= 1.0 else interp * 0.5
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    K = int(math.ceil(support)) * 2 + 1
    w = np.zeros((out, K), np.float32)
    start = np.zeros(out, np.int64)
    count = np.zeros(out, np.int64)
    for i in range(out):
        center = x0 + scale * (i + 0.5)
        xmin = max(math.floor(center - support + 0.5), lo)
        xmax = min(math.floor(center + support + 0.5), hi)
        if xmax <= xmin:
            xmin = min(max(math.floor(center), lo), hi - 1)
            xmax = xmin + 1
        nn = min(xmax - xmin, K)
        wv = _filter((np.arange(nn) + xmin - center + 0.5) * invscale, bicubic)
        total = 0.0
        for v in wv:  # the kernel's summation order
            total += float(v)
        inv = 1.0 / total if total != 0.0 else 0.0
        w[i, :nn] = (wv.astype(np.float32).astype(np.float64) * inv).astype(np.float32)
        start[i], count[i] = xmin, nn
    kmax = int(count.max())
    taps = 0
    if kmax <= hi - lo:
        taps = kmax
        for i in range(out):
            if count[i] < kmax:
                s1 = min(start[i], hi - kmax)
                sh = start[i] - s1
                row = w[i, :count[i]].copy()
                w[i, :] = 0
                w[i, sh:sh + len(row)] = row
                start[i] = s1
            count[i] = kmax
    return K, taps, w, start, count


def int16_pairs(w, taps):
    """The horizontal pass's int16 weight pairs from the float weights (exact rule)."""
    kp = (taps + 1) // 2
    pairs = np.zeros((w.shape[0], kp), np.int32)
    for i in range(w.shape[0]):
        q = np.rint(w[i, :taps].astype(np.float64) * K_ONE).astype(np.int64).astype(np.int16).astype(np.int64)
        big = int(np.argmax(np.abs(q)))  # the first largest |q| absorbs the rounding
        q[big] = np.int16(q[big] + (K_ONE - int(q.sum())))
        q = np.concatenate([q, [0]])[: 2 * kp].astype(np.int16).view(np.uint16).astype(np.uint32)
        pairs[i] = (q[0::2] | (q[1::2] << 16)).view(np.int32)
    return pairs


def native(out, x0, length, lo, hi, bicubic, int16):
    lib = _lib()
    f = lib.fl_replay_axis_weights
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.c_int, ctypes.c_double, ctypes.c_double, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                  ctypes.c_int] + [ctypes.c_void_p] * 7
    sizes = np.zeros(3, np.int32)
    assert f(out, x0, length, lo, hi, int(bicubic), int(int16), sizes.ctypes.data, None, None, None, None, None,
             None) == 0
    K, taps, kp = (int(v) for v in sizes)
    w = np.zeros((out, K), np.float32)
    start = np.zeros(out, np.int32)
    count = np.zeros(out, np.int32)
    wpair = np.zeros((out, max(kp, 1)), np.int32)
    wvec = np.zeros(max(1, (out // 8) * 4 * kp * 8), np.int32)
    caps = np.array([w.size, start.size, count.size, wpair.size, wvec.size], np.int64)
    assert f(out, x0, length, lo, hi, int(bicubic), int(int16), sizes.ctypes.data, w.ctypes.data,
             start.ctypes.data, count.ctypes.data, wpair.ctypes.data, wvec.ctypes.data, caps.ctypes.data) == 0
    # A buffer one element short is refused (the entry point takes capacities).
    if K > 0:
        short = caps.copy()
        short[0] -= 1
        assert f(out, x0, length, lo, hi, int(bicubic), int(int16), sizes.ctypes.data, w.ctypes.data,
                 start.ctypes.data, count.ctypes.data, wpair.ctypes.data, wvec.ctypes.data, short.ctypes.data) != 0
    return K, taps, kp, w, start, count, wpair[:, :kp], wvec


@pytest.mark.parametrize("bicubic", [False, True])
@pytest.mark.parametrize("out", [1, 3, 7, 8, 9, 15, 64, 224, 225])
def test_axis_weights_match_reference(out, bicubic):
    rng = np.random.default_rng(out * 2 + bicubic)
    cases = [(out * f * (1 + 0.01 * rng.random()), 50 * rng.random())
             for f in (0.3, 0.77, 1.0, 1.5, 2.3, 3.9, 7.1, 12.0)]
    cases += [(float(out * f), float(x)) for f, x in ((0.5, 0), (2, 3), (3, 10), (4, 1))]  # symmetric taps: ties
    for length, x0 in cases:
        for lo, hi in ((math.floor(x0), math.ceil(x0 + length)), (0, math.ceil(x0 + length) + 40)):
            for int16 in (True, False):
                K, taps, kp, w, start, count, wpair, wvec = native(out, x0, length, lo, hi, bicubic, int16)
                rK, rtaps, rw, rstart, rcount = reference(out, x0, length, lo, hi, bicubic)
                where = f"out={out} len={length:.3f} x0={x0:.3f} lo={lo} hi={hi}"
                assert (K, taps) == (rK, rtaps), where
                assert np.array_equal(start, rstart) and np.array_equal(count, rcount), where
                np.testing.assert_allclose(w, rw, rtol=0, atol=1e-6, err_msg=where)
                if not int16 or taps == 0 or taps > 16:
                    assert kp == 0, where
                    continue
                assert kp == (taps + 1) // 2, where
                assert np.array_equal(wpair, int16_pairs(w, taps)), where
                # AVX2 layout (when built): per group of 8 outputs, per (j < 4, pair p), 8 int32 =
                # output 8g + j's pair x 4, then output 8g + j + 4's pair x 4.
                if (out // 8) and wvec.any():
                    v = wvec.reshape(out // 8, 4, kp, 2, 4)
                    for g in range(out // 8):
                        for j in range(4):
                            assert np.array_equal(v[g, j, :, 0, :], np.repeat(wpair[8 * g + j][:, None], 4, 1)), where
                            assert np.array_equal(v[g, j, :, 1, :], np.repeat(wpair[8 * g + j + 4][:, None], 4, 1)), where


def test_axis_weights_bad_axis_is_an_error():
    f = _lib().fl_replay_axis_weights
    f.restype = ctypes.c_int
    sizes = np.zeros(3, np.int32)
    assert f(0, ctypes.c_double(0.0), ctypes.c_double(10.0), 0, 10, 0, 1, ctypes.c_void_p(sizes.ctypes.data),
             None, None, None, None, None, None) != 0
