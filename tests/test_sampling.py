"""Sampling of augmentation records (fastload/sample/policy.py) against torchvision's algorithms."""
import math

import numpy as np
import pytest

from fastload.sample import params as P
from fastload.sample.policy import AugmentPolicy, sample_params


def tv_rrc(rng, H, W, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision RandomResizedCrop.get_params, one image at a time (the reference)."""
    area = H * W
    lr = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        ta = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(lr[0], lr[1]))
        w = int(round(math.sqrt(ta * ar)))
        h = int(round(math.sqrt(ta / ar)))
        if 0 < w <= W and 0 < h <= H:
            return int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1)), h, w
    in_ratio = W / H
    if in_ratio < min(ratio):
        w, h = W, int(round(W / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = H, int(round(H * max(ratio)))
    else:
        w, h = W, H
    return (H - h) // 2, (W - w) // 2, h, w


def boxes_px(rec_crop, hw):
    return np.array([P.box_to_pixels(q, int(h), int(w)) for q, (h, w) in zip(rec_crop, hw)])


def test_quantization_round_trip(rng):
    for _ in range(2000):
        H, W = (int(x) for x in rng.integers(1, 5000, 2))
        bh, bw = int(rng.integers(1, H + 1)), int(rng.integers(1, W + 1))
        t, l = int(rng.integers(0, H - bh + 1)), int(rng.integers(0, W - bw + 1))
        assert P.box_to_pixels(P.pixels_to_box(t, l, bh, bw, H, W), H, W) == (t, l, bh, bw)


def test_rrc_distribution_matches_torchvision():
    H, W = 375, 500
    n = 6000
    rec = sample_params(AugmentPolicy(flip=False), np.random.default_rng(1), [0], np.array([[H, W]]), n)[0]
    ours = boxes_px(rec["crop"], [(H, W)] * n)
    r = np.random.default_rng(2)
    ref = np.array([tv_rrc(r, H, W) for _ in range(n)])
    for k, name in enumerate(["top", "left", "height", "width"]):
        a, b = np.sort(ours[:, k]), np.sort(ref[:, k])
        # two-sample Kolmogorov-Smirnov statistic; 1.95 * sqrt(2/n) is the 0.1% level
        grid = np.union1d(a, b)
        ks = np.abs(np.searchsorted(a, grid, "right") / n - np.searchsorted(b, grid, "right") / n).max()
        assert ks < 1.95 * math.sqrt(2 / n), (name, ks)
    area = ours[:, 2] * ours[:, 3] / (H * W)
    assert area.min() >= 0.07 and area.max() <= 1.0
    ar = ours[:, 3] / ours[:, 2]
    assert ar.min() > 0.7 and ar.max() < 1.4


def test_rrc_fallback_is_torchvision_central_crop():
    # Very wide images at scale ~1 can never fit a ratio <= 4/3 box: always the fallback.
    pol = AugmentPolicy(rrc_scale=(0.99, 1.0), flip=False)
    for H, W in [(10, 1000), (1000, 10), (20, 61)]:
        rec = sample_params(pol, np.random.default_rng(0), [0], np.array([[H, W]]), 5)[0]
        want = tv_rrc(np.random.default_rng(0), H, W, scale=(0.99, 1.0))
        assert want[2] * want[3] < H * W  # it is the fallback
        for q in rec["crop"]:
            assert P.box_to_pixels(q, H, W) == want


def test_boxes_inside_image_and_determinism(rng):
    hw = rng.integers(20, 900, size=(50, 2))
    pol = AugmentPolicy(randaugment=(2, 9), erase=0.25, mixup=1.0, cutmix=1.0)
    a = sample_params(pol, np.random.default_rng(7), np.arange(50), hw, 8)
    b = sample_params(pol, np.random.default_rng(7), np.arange(50), hw, 8)
    c = sample_params(pol, np.random.default_rng(8), np.arange(50), hw, 8)
    assert a.dtype == P.AUG_DTYPE and a.shape == (50, 8)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()
    for i in range(50):
        H, W = hw[i]
        for r in a[i]:
            t, l, bh, bw = P.box_to_pixels(r["crop"], H, W)
            assert 0 <= t and t + bh <= H and 0 <= l and l + bw <= W
            if r["partner"] >= 0:
                pH, pW = hw[r["partner"]]
                t, l, bh, bw = P.box_to_pixels(r["pcrop"], pH, pW)
                assert 0 <= t and t + bh <= pH and 0 <= l and l + bw <= pW


def test_flip_randaugment_erase_frequencies():
    n = 4000
    pol = AugmentPolicy(randaugment=(2, 9), erase=0.25)
    rec = sample_params(pol, np.random.default_rng(3), [0], np.array([[300, 400]]), n)[0]
    assert abs((rec["flags"] & P.FLAG_FLIP).astype(bool).mean() - 0.5) < 0.04
    ops = rec["ra_ops"][:, :2].reshape(-1)
    mags = rec["ra_mags"][:, :2].reshape(-1)
    assert (rec["ra_ops"][:, 2:] == P.RA_NONE).all()
    counts = np.bincount(ops, minlength=14)
    assert counts.size == 14 and counts.min() > 0.7 * len(ops) / 14
    signed = np.array([P.RA_OPS[o] in P.RA_SIGNED for o in ops])
    assert (np.abs(mags) == 9).all()
    assert (mags[~signed] == 9).all()
    assert abs((mags[signed] < 0).mean() - 0.5) < 0.05
    erased = rec["erase"][:, 3] > 0
    assert abs(erased.mean() - 0.25) < 0.04
    oh, ow = pol.size
    areas = []
    for q in rec["erase"][erased]:
        t, l, h, w = P.box_to_pixels(q, oh, ow)
        assert t + h <= oh and l + w <= ow and h < oh and w < ow
        areas.append(h * w / (oh * ow))
    assert 0.015 < min(areas) and max(areas) < 0.34 and abs(np.mean(areas) - 0.175) < 0.02


def test_mixup_cutmix_sampling():
    n = 4000
    N = 10
    hw = np.tile([[200, 300]], (N, 1))
    pol = AugmentPolicy(mixup=1.0, cutmix=1.0, mix_p=0.5)
    rec = sample_params(pol, np.random.default_rng(4), np.arange(N), hw, n // N).reshape(-1)
    owner = np.repeat(np.arange(N), n // N)
    mix = (rec["flags"] & P.FLAG_MIXUP) > 0
    cut = (rec["flags"] & P.FLAG_CUTMIX) > 0
    assert abs(mix.mean() - 0.5) < 0.04 and abs(cut.mean() - 0.5) < 0.05
    used = mix | cut
    assert ((rec["partner"] >= 0) == used).all()
    assert (rec["partner"][used] != owner[used]).all() and rec["partner"].max() < N
    lam = rec["mixup"][mix] / P.Q
    assert abs(lam.mean() - 0.5) < 0.03 and abs(lam.var() - 1 / 12) < 0.01  # Beta(1, 1)
    oh, ow = pol.size
    frac = []
    for q in rec["cutmix"][cut]:
        t, l, h, w = P.box_to_pixels(q, oh, ow)
        assert t + h <= oh and l + w <= ow
        frac.append(h * w / (oh * ow))
    # v2 CutMix: unclipped box area fraction is 1 - lam ~ U(0, 1); clipping only shrinks it.
    assert 0.15 < np.mean(frac) < 0.5
    assert ((rec["flags"][~used] & P.FLAG_PARTNER_FLIP) == 0).all()


def test_policy_dict_round_trip_and_validation():
    p = AugmentPolicy(randaugment=(2, 9), erase=0.25, mixup=1.0, cutmix=1.0, interpolation="bicubic")
    d = p.to_dict()
    import json

    assert AugmentPolicy.from_dict(json.loads(json.dumps(d))) == p
    with pytest.raises(ValueError, match="unknown keys.*bogus"):
        AugmentPolicy.from_dict({**d, "bogus": 1})
    for kw, word in [({"rrc_scale": (0.5, 0.1)}, "rrc_scale"), ({"randaugment": (5, 9)}, "num_ops"),
                     ({"randaugment": (2, 31)}, "magnitude"), ({"erase": 1.5}, "erase"),
                     ({"mixup": -1}, "mixup"), ({"interpolation": "nearest"}, "interpolation"),
                     ({"mix_p": 2}, "mix_p"), ({"size": (0, 4)}, "size")]:
        with pytest.raises(ValueError, match=word):
            AugmentPolicy(**kw)
    with pytest.raises(ValueError, match="indices"):
        sample_params(p, np.random.default_rng(0), [3], np.array([[10, 10]]), 2)
    with pytest.raises(ValueError, match="all_hw"):
        sample_params(p, np.random.default_rng(0), [0], np.array([10, 10]), 2)
