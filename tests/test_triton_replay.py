"""Triton replay kernel (kernels/replay.py) against the PyTorch reference
(fastload.replay.reference.render_reference), in the Triton interpreter on CPU.

Tolerance: the kernel fuses PyTorch's two separable antialias passes into one 2-D sum, so
float summation order differs; a resized value within float error of a .5 tie may round to
the neighbouring uint8 level. We therefore allow 1 uint8 level (1/255/std after
normalization) per element, and require >= 97% of elements to agree within 1e-5.
"""
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")

from fastload.replay.reference import render_reference  # noqa: E402
from fastload.sample import params as P  # noqa: E402
from fastload.kernels.replay import IMAGENET_MEAN, IMAGENET_STD, replay_batch  # noqa: E402

LEVEL = 1.0 / 255.0 / min(IMAGENET_STD)


def photo(h, w, seed):
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = [np.clip(120 + 70 * np.sin(g.uniform(0.1, 0.6) * x + c) * np.cos(g.uniform(0.1, 0.5) * y)
                     + g.normal(0, 12, (h, w)), 0, 255) for c in range(3)]
    return np.stack(chans, -1).astype(np.uint8)


def padded(imgs, hmax, wmax):
    out = np.zeros((len(imgs), hmax, wmax, 3), np.uint8)
    out[...] = 77  # padding must never be read
    for i, im in enumerate(imgs):
        out[i, :im.shape[0], :im.shape[1]] = im
    return torch.from_numpy(out), torch.tensor([im.shape[:2] for im in imgs], dtype=torch.int32)


def record(h, w, crop, flags=0, erase=None, pcrop=None, ph=None, pw=None, lam=None, cutmix=None,
           size=(16, 16)):
    r = P.empty(())
    r["crop"] = P.pixels_to_box(*crop, h, w)
    r["flags"] = flags
    if erase is not None:
        r["erase"] = P.pixels_to_box(*erase, *size)
    if pcrop is not None:
        r["pcrop"] = P.pixels_to_box(*pcrop, ph, pw)
    if lam is not None:
        r["mixup"] = int(round(lam * P.Q))
    if cutmix is not None:
        r["cutmix"] = P.pixels_to_box(*cutmix, *size)
    return r


def check(out, refs):
    for b, ref in enumerate(refs):
        d = (out[b].float() - ref).abs()
        assert float(d.max()) <= LEVEL * 1.001 + 1e-4, f"image {b}: max diff {float(d.max())}"
        close = float((d <= 1e-4).float().mean())
        assert close >= 0.97, f"image {b}: only {close:.3f} of the elements agree"


def test_crop_resize_flip_normalize():
    a, b = photo(40, 36, 1), photo(33, 29, 2)
    imgs, hw = padded([a, b], 45, 50)
    recs = np.stack([record(40, 36, (3, 5, 30, 28), flags=P.FLAG_FLIP),   # downscale, flipped
                     record(33, 29, (10, 4, 9, 12))])                      # upscale
    out = torch.empty(2, 3, 16, 16)
    replay_batch(imgs, hw, recs, out)
    check(out, [render_reference(a, recs[0], size=(16, 16)), render_reference(b, recs[1], size=(16, 16))])


def test_full_image_strong_downscale_and_nonsquare():
    a, b = photo(40, 36, 3), photo(21, 38, 4)
    imgs, hw = padded([a, b], 40, 38)
    recs = P.empty(2)  # full image
    recs[1]["flags"] = P.FLAG_FLIP
    out = torch.empty(2, 3, 7, 9)
    replay_batch(imgs, hw, recs, out)
    check(out, [render_reference(a, recs[0], size=(7, 9)), render_reference(b, recs[1], size=(7, 9))])


def test_erase_mixup_cutmix_with_partner():
    a, b = photo(40, 36, 5), photo(36, 40, 6)
    imgs, hw = padded([a, b], 40, 40)
    r0 = record(40, 36, (2, 2, 35, 30), flags=P.FLAG_FLIP | P.FLAG_MIXUP | P.FLAG_CUTMIX | P.FLAG_PARTNER_FLIP,
                erase=(1, 2, 5, 6), pcrop=(4, 3, 25, 33), ph=36, pw=40, lam=0.37, cutmix=(8, 9, 6, 5))
    r1 = record(36, 40, (0, 5, 30, 30), flags=P.FLAG_MIXUP, pcrop=(0, 0, 40, 36), ph=40, pw=36, lam=0.81)
    recs = np.stack([r0, r1])
    out = torch.empty(2, 3, 16, 16)
    replay_batch(imgs, hw, recs, out, partner_rows=torch.tensor([1, 0]))
    refs = [render_reference(a, r0, size=(16, 16), partner_img=b),
            render_reference(b, r1, size=(16, 16), partner_img=a)]
    check(out, refs)
    # erased and cut regions really took effect (not just within tolerance of something else)
    assert torch.count_nonzero(refs[0][:, 1:6, 2:8] - refs[0][:, 1:6, 2:8].mean()) > 0


def test_float16_output_and_custom_normalization():
    a = photo(40, 36, 7)
    imgs, hw = padded([a], 40, 36)
    rec = np.stack([record(40, 36, (5, 1, 31, 33), flags=P.FLAG_FLIP)])
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.5, 0.2)
    out = torch.empty(1, 3, 12, 10, dtype=torch.float16)
    replay_batch(imgs, hw, rec, out, mean=mean, std=std)
    ref = render_reference(a, rec[0], size=(12, 10), mean=mean, std=std)
    d = (out[0].float() - ref).abs()
    assert float(d.max()) <= 1 / 255 / 0.2 + 1e-2
    assert float((d <= 5e-3 * ref.abs().clamp(min=1)).float().mean()) >= 0.97


def test_bad_input():
    imgs, hw = padded([photo(10, 10, 0)], 10, 10)
    out = torch.empty(1, 3, 4, 4)
    with pytest.raises(ValueError, match="images"):
        replay_batch(imgs.float(), hw, P.empty(1), out)
    with pytest.raises(ValueError, match="hw"):
        replay_batch(imgs, torch.tensor([[11, 10]]), P.empty(1), out)
    rec = P.empty(1)
    rec["ra_ops"][0, 0] = 3
    with pytest.raises(ValueError, match="RandAugment"):
        replay_batch(imgs, hw, rec, out)
    rec = P.empty(1)
    rec["flags"] = P.FLAG_MIXUP
    with pytest.raises(ValueError, match="partner_rows"):
        replay_batch(imgs, hw, rec, out)
    with pytest.raises(ValueError, match="partner_rows"):
        replay_batch(imgs, hw, rec, out, partner_rows=torch.tensor([3]))
    with pytest.raises(ValueError, match="out"):
        replay_batch(imgs, hw, P.empty(1), torch.empty(1, 3, 4, 4, dtype=torch.int32))
