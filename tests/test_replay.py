"""The fused C++ replay kernel (fastload/replay/native.py) against the PyTorch reference
(fastload/replay/reference.py), one op at a time, on raw and JPEG sources."""
import ctypes
import io

import numpy as np
import pytest
import torch
from PIL import Image

from fastload.replay import native
from fastload.replay.reference import IMAGENET_STD, reference_uint8, render_reference
from fastload.sample import params as P
from fastload.sample.policy import AugmentPolicy, sample_params

# One uint8 level after normalization, with room for float rounding.
LEVEL = 1.0 / (255 * min(IMAGENET_STD)) + 1e-4


def synth(h, w, seed=0):
    """Smooth gradients + sinusoids + a noisy textured patch."""
    r = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 100 * np.sin(x / 11 + y / 23), 128 + 100 * np.cos(y / 9 - x / 31),
                    (x + y) * 255 / (h + w)], -1)
    img[h // 4:h // 2, w // 3:2 * w // 3] += r.normal(0, 40, (h // 2 - h // 4, 2 * w // 3 - w // 3, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg(img, quality=90):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def pil_decode(b):
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))


IMG = synth(90, 120)
IMG2 = synth(70, 100, seed=1)
JPG = jpeg(synth(150, 200, seed=2))
JPG2 = jpeg(synth(160, 130, seed=3))


def records(n, seed=0, hw=(90, 120), **policy):
    pol = AugmentPolicy(**policy)
    rec = sample_params(pol, np.random.default_rng(seed), [0, 1], np.array([hw, hw]), n)
    return rec.reshape(-1)


def render(srcs, rec, size, dtype=torch.float32, **kw):
    out = torch.empty(len(rec), 3, *size, dtype=dtype)
    return native.render_batch(srcs, rec, out, **kw)


def max_u8_diff(a, b):
    return (a.int() - b.int()).abs().max().item()


@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [(24, 32), (160, 150)])  # down- and up-scale
def test_crop_resize_flip_raw_within_one_level(interp, size):
    rec = records(12, seed=1)
    rec["flags"][::3] &= ~np.uint8(P.FLAG_FLIP)
    rec[0]["crop"] = (0, 0, P.Q, P.Q)
    out = render([IMG] * len(rec), rec, size, torch.uint8, interpolation=interp)
    for i, a in enumerate(rec):
        assert max_u8_diff(out[i], reference_uint8(IMG, a, size, interp)) <= 1


def test_identity_crop_is_exact():
    out = render([IMG], P.empty(1), IMG.shape[:2], torch.uint8)
    assert torch.equal(out[0], torch.from_numpy(IMG).permute(2, 0, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_normalize_erase_mixup_cutmix(dtype):
    rec = records(16, seed=2, erase=0.7, mixup=1.0, cutmix=1.0, mix_p=0.7)
    flags = rec["flags"]
    assert (rec["erase"][:, 3] > 0).any() and (flags & P.FLAG_MIXUP).any() and (flags & P.FLAG_CUTMIX).any()
    size = (40, 48)
    partners = [IMG2 if r["partner"] >= 0 else None for r in rec]
    out = render([IMG] * len(rec), rec, size, dtype, partner_sources=partners)
    tol = LEVEL if dtype == torch.float32 else LEVEL + 2.2 / 1024 * 2.7  # + fp16 rounding at |x| <= 2.7
    for i, a in enumerate(rec):
        ref = render_reference(IMG, a, size, partner_img=IMG2)
        assert (out[i].float() - ref).abs().max().item() <= tol, i


def test_uint8_output_erase_is_mean_colour():
    rec = P.empty(1)
    rec[0]["erase"] = P.pixels_to_box(2, 3, 5, 6, 20, 20)
    out = render([IMG], rec, (20, 20), torch.uint8, mean=(0.5, 0.25, 0.0), std=(1, 1, 1))
    assert out[0, :, 2:7, 3:9].reshape(3, -1).unique(dim=1).tolist() == [[128], [64], [0]]
    ref = reference_uint8(IMG, rec[0], (20, 20))
    mask = torch.ones(20, 20, dtype=torch.bool)
    mask[2:7, 3:9] = False
    assert max_u8_diff(out[0][:, mask], ref[:, mask]) <= 1


@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
def test_jpeg_without_dct_scaling_matches_reference(interp):
    dec = pil_decode(JPG)
    rec = records(16, seed=3, hw=dec.shape[:2])
    for size in [(32, 32), (180, 170)]:
        out = render([JPG] * len(rec), rec, size, torch.uint8, dct_scale=False, interpolation=interp)
        for i, a in enumerate(rec):
            assert max_u8_diff(out[i], reference_uint8(dec, a, size, interp)) <= 1


@pytest.mark.parametrize("writer", ["pillow", "libjpeg"])
def test_cmyk_jpeg_matches_pillow_conversion(writer):
    # Adobe CMYK JPEGs (a few in ImageNet) decode natively to Pillow's convert("RGB"):
    # before, libjpeg-turbo refused the CMYK -> RGB conversion and the image was a bad sample.
    cmyk = np.concatenate([synth(90, 120, seed=5), synth(90, 120, seed=6)[..., :1]], -1)
    if writer == "pillow":
        buf = io.BytesIO()
        Image.fromarray(cmyk, "CMYK").save(buf, "JPEG", quality=90)
        jpg = buf.getvalue()
    else:
        jpg = native._encode_jpeg(cmyk, 90)
    dec = pil_decode(jpg)
    assert np.array_equal(native.decode_batch([jpg])[0], dec)
    rec = records(8, seed=7, hw=dec.shape[:2])
    out = render([jpg] * len(rec), rec, (32, 32), torch.uint8, dct_scale=False)
    for i, a in enumerate(rec):
        assert max_u8_diff(out[i], reference_uint8(dec, a, (32, 32), "bilinear")) <= 1


def test_jpeg_with_dct_scaling_close_to_full_decode():
    # DCT-domain downscaling (decode at 1/2, 1/4, 1/8 when the crop covers >= 2x, 4x, 8x
    # the output) is a different low-pass filter than decode + antialiased resize: pixels
    # differ by a few levels on texture, not on average. Measured here: mean |diff| 1.0
    # level overall (0.65 on a blurred image), worst image 2.4, 0.2% of values > 8 levels.
    # Tolerance: mean <= 1.5 overall and <= 3 per image, fewer than 1% of values > 8 levels.
    dec = pil_decode(JPG)
    rec = records(24, seed=4, hw=dec.shape[:2])
    size = (24, 24)
    full = render([JPG] * len(rec), rec, size, torch.uint8, dct_scale=False)
    fast = render([JPG] * len(rec), rec, size, torch.uint8, dct_scale=True)
    d = (full.int() - fast.int()).abs().float()
    assert d.mean().item() <= 1.5
    assert d.mean(dim=(1, 2, 3)).max().item() <= 3.0
    assert (d > 8).float().mean().item() < 0.01
    assert not torch.equal(full, fast)  # the scaled path was taken


def test_determinism_and_thread_count_independence():
    rec = records(16, seed=5, erase=0.5, mixup=1.0, cutmix=1.0)
    partners = [IMG2] * len(rec)
    a = render([IMG, JPG] * 16, rec, (48, 40), partner_sources=partners, threads=1)
    b = render([IMG, JPG] * 16, rec, (48, 40), partner_sources=partners, threads=2)
    c = render([IMG, JPG] * 16, rec, (48, 40), partner_sources=partners, threads=2)
    assert torch.equal(a, b) and torch.equal(b, c)


def test_queued_batches_equal_synchronous_ones_in_any_wait_order():
    """render_batch_async: batches queued behind each other render what render_batch does,
    whatever order they are waited in; every ticket is released."""
    lib = native._lib()
    rec = records(16, seed=5, erase=0.5, mixup=1.0, cutmix=1.0)
    partners = [IMG2, JPG2] * 16
    srcs = [IMG, JPG] * 16
    want = render(srcs, rec, (48, 40), partner_sources=partners)
    outs = [torch.full((32, 3, 48, 40), float("nan")) for _ in range(5)]
    pend = [native.render_batch_async(srcs, rec, o, partner_sources=partners, threads=2) for o in outs]
    for k in (3, 0, 4, 1, 2):
        assert pend[k].wait() is outs[k]
        assert torch.equal(outs[k], want)
    assert pend[3].wait() is outs[3]  # waiting again returns the result, no second native wait
    assert lib.fl_replay_pending() == 0
    # an unwaited batch is waited when it is dropped: its buffers outlive the native work
    native.render_batch_async(srcs, rec, torch.empty(32, 3, 48, 40), partner_sources=partners)
    import gc

    gc.collect()
    assert lib.fl_replay_pending() == 0
    bad = ctypes.c_int64(0)
    assert lib.fl_replay_wait(123456789, ctypes.byref(bad)) != 0
    assert b"unknown" in lib.fl_last_error()


def test_queued_batch_errors_name_the_sample():
    rec = P.empty(3)
    trunc = JPG[: len(JPG) // 2]
    ok = native.render_batch_async([JPG] * 3, rec, torch.empty(3, 3, 16, 16))
    p = native.render_batch_async([JPG, trunc, JPG], rec, torch.empty(3, 3, 16, 16), sample_ids=["a", "b", "c"])
    with pytest.raises(ValueError, match="sample b \\(position 1\\)"):
        p.wait()
    with pytest.raises(ValueError, match="sample b"):  # the same error every time it is asked
        p.wait()
    assert ok.wait().isfinite().all()  # a failed batch does not disturb the one before it
    with pytest.raises(ValueError, match="out"):  # arguments are checked at submission
        native.render_batch_async([IMG], P.empty(1), torch.empty(1, 3, 8))
    assert native._lib().fl_replay_pending() == 0


@pytest.mark.skipif(not native._lib().fl_replay_have_randaugment(), reason="RandAugment not built")
def test_randaugment_through_fused_kernel():
    rec = records(28, seed=6, randaugment=(2, 9))
    rec["ra_ops"][:14, 0] = np.arange(14)  # every op at least once
    size = (32, 36)
    out = render([IMG] * len(rec), rec, size, torch.uint8)
    for i, a in enumerate(rec):
        ref = reference_uint8(IMG, a, size)
        d = (out[i].int() - ref.int()).abs()
        # resize may differ by 1 level, which ops like Posterize/Equalize can amplify locally
        assert (d <= 1).float().mean().item() >= 0.97, (i, a["ra_ops"])


def test_decode_batch_equals_pillow():
    gray = jpeg(synth(50, 60)[:, :, 0].copy())
    srcs = [JPG, JPG2, gray]
    for got, b in zip(native.decode_batch(srcs, scale=1), srcs):
        want = pil_decode(b)
        assert got.shape == want.shape
        assert np.abs(got.astype(int) - want).max() <= 1  # Pillow bundles its own libjpeg-turbo
    # DCT-scaled decode equals Pillow's draft mode (the same libjpeg scaling).
    im = Image.open(io.BytesIO(JPG))
    im.draft("RGB", (100, 75))
    half = native.decode_batch([JPG], scale=2)[0]
    assert half.shape == (75, 100, 3)
    assert np.abs(half.astype(int) - np.asarray(im.convert("RGB"))).max() <= 1
    assert native.decode_batch(srcs, scale=4, keep=False) is None


def test_corrupt_and_truncated_jpeg_raise_naming_the_sample():
    rec = P.empty(3)
    bad = bytearray(JPG)
    bad[len(bad) // 3:len(bad) // 3 + 400] = bytes(400)  # scribble over entropy-coded data
    trunc = JPG[: len(JPG) // 2]
    for src in [bytes(bad), trunc, b"not a jpeg at all", b""]:
        with pytest.raises(ValueError, match="sample key-1"):
            render([JPG, src, JPG], rec, (16, 16), sample_ids=["key-0", "key-1", "key-2"])
    with pytest.raises(ValueError, match="sample 0"):
        native.decode_batch([trunc])
    # a header claiming 60000 x 60000 pixels is refused before any allocation
    bomb = bytearray(jpeg(np.zeros((16, 16, 3), np.uint8)))
    k = bomb.find(b"\xff\xc0")
    bomb[k + 5:k + 9] = (60000).to_bytes(2, "big") + (60000).to_bytes(2, "big")
    with pytest.raises(ValueError, match="pixel limit"):
        native.decode_batch([bytes(bomb)])
    with pytest.raises(ValueError, match="sample 0.*pixel limit"):
        render([bytes(bomb)], P.empty(1), (8, 8))
    # the process is still fine afterwards
    assert render([JPG], P.empty(1), (8, 8)).isfinite().all()


def test_bad_arguments():
    rec = P.empty(1)
    with pytest.raises(ValueError, match="out"):
        native.render_batch([IMG], rec, torch.empty(1, 3, 8))
    with pytest.raises(ValueError, match="dtype"):
        native.render_batch([IMG], rec, torch.empty(1, 3, 8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="AUG_DTYPE"):
        native.render_batch([IMG], np.zeros(1, np.int64), torch.empty(1, 3, 8, 8))
    with pytest.raises(ValueError, match="sources\\[0\\]"):
        native.render_batch([IMG[:, :, :2].copy()], rec, torch.empty(1, 3, 8, 8))
    with pytest.raises(ValueError, match="interpolation"):
        native.render_batch([IMG], rec, torch.empty(1, 3, 8, 8), interpolation="nearest")
    mixed = records(4, seed=7, mixup=1.0, mix_p=1.0)[:1]
    with pytest.raises(ValueError, match="partner"):
        native.render_batch([IMG], mixed, torch.empty(1, 3, 8, 8))


@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
def test_extreme_geometry(interp):
    # 1-pixel and very thin sources, huge downscale (wide filters: generic paths), upscale.
    r = np.random.default_rng(9)
    cases = [((1, 1), (7, 5)), ((3, 500), (8, 8)), ((500, 3), (9, 6)), ((400, 400), (5, 6)),
             ((40, 40), (300, 260)), ((2, 2), (33, 31))]
    for (h, w), size in cases:
        img = r.integers(0, 256, (h, w, 3), dtype=np.uint8)
        rec = P.empty(3)
        rec[1]["flags"] = P.FLAG_FLIP
        rec[2]["crop"] = P.pixels_to_box(h // 3, w // 4, max(1, h // 2), max(1, w // 2), h, w)
        out = render([img] * 3, rec, size, torch.uint8, interpolation=interp)
        for i, a in enumerate(rec):
            assert max_u8_diff(out[i], reference_uint8(img, a, size, interp)) <= 1, ((h, w), size, i)


@pytest.mark.parametrize("enc", [dict(progressive=True), dict(subsampling=0), dict(subsampling=1)])
def test_jpeg_encodings_region_decode_exact(enc):
    # Region decoding (crop_scanline + skip_scanlines) must not change pixels for progressive
    # and 4:4:4 / 4:2:2 files either.
    buf = io.BytesIO()
    Image.fromarray(synth(150, 200, seed=2)).save(buf, "JPEG", quality=85, **enc)
    jb = buf.getvalue()
    dec = pil_decode(jb)
    rec = records(8, seed=3, hw=dec.shape[:2])
    out = render([jb] * len(rec), rec, (40, 40), torch.uint8, dct_scale=False)
    for i, a in enumerate(rec):
        assert max_u8_diff(out[i], reference_uint8(dec, a, (40, 40))) <= 1
    assert np.abs(native.decode_batch([jb])[0].astype(int) - dec).max() <= 1


def _smooth_jpeg(h, w):
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 90 * np.sin(x / 37 + y / 53), 128 + 90 * np.cos(y / 29 - x / 61), (x + y) * 255 / (h + w)], -1)
    return jpeg(np.clip(img, 0, 255).astype(np.uint8), quality=95)


@pytest.mark.parametrize("size", [(24, 24), (64, 64)])
def test_jpeg_m8_dct_scaling_close_to_full_decode(size):
    # The "m8" rule decodes at M/8 (M = 1..8, the smallest keeping the scaled crop >= the
    # output), so the resize after it is close to 1:1. Measured on this textured image:
    # mean |diff| 0.9-1.1 levels, worst image 2.4, 0.3-1.6% of values > 8 levels (more than
    # "pow2", which scales less often). Tolerance: mean <= 1.5, worst image <= 3,
    # fewer than 2.5% of values > 8 levels. On a smooth image, where a geometric offset
    # (not the filter) would show as a bias of several levels, measured mean 0.3-0.5, max 6
    # (pow2: the same): mean <= 0.6, max <= 8, fewer than 2% of values > 2 levels.
    dec = pil_decode(JPG)
    rec = records(24, seed=4, hw=dec.shape[:2])
    full = render([JPG] * len(rec), rec, size, torch.uint8, dct_scale=False)
    m8 = render([JPG] * len(rec), rec, size, torch.uint8, dct_scale="m8")
    d = (full.int() - m8.int()).abs().float()
    assert d.mean().item() <= 1.5
    assert d.mean(dim=(1, 2, 3)).max().item() <= 3.0
    assert (d > 8).float().mean().item() < 0.025
    assert not torch.equal(full, m8)
    assert not torch.equal(m8, render([JPG] * len(rec), rec, size, torch.uint8, dct_scale=True))
    smooth = _smooth_jpeg(300, 400)
    rec = records(16, seed=5, hw=(300, 400))
    full = render([smooth] * len(rec), rec, size, torch.uint8, dct_scale=False)
    m8 = render([smooth] * len(rec), rec, size, torch.uint8, dct_scale="m8")
    d = (full.int() - m8.int()).abs().float()
    assert d.mean().item() <= 0.6 and d.max().item() <= 8, (d.mean().item(), d.max().item())
    assert (d > 2).float().mean().item() < 0.02


def test_dct_scale_true_is_the_pow2_rule_and_bad_values_raise():
    # Datasets recorded as dct_scale=True replay with the rule they were generated with.
    rec = records(8, seed=4, hw=pil_decode(JPG).shape[:2])
    a = render([JPG] * len(rec), rec, (24, 24), torch.uint8, dct_scale=True)
    b = render([JPG] * len(rec), rec, (24, 24), torch.uint8, dct_scale="pow2")
    c = render([JPG] * len(rec), rec, (24, 24), torch.uint8, dct_scale="off")
    assert torch.equal(a, b)
    assert torch.equal(c, render([JPG] * len(rec), rec, (24, 24), torch.uint8, dct_scale=False))
    with pytest.raises(ValueError, match="dct_scale"):
        render([JPG], rec[:1], (8, 8), dct_scale="m4")


def test_bytes_and_buffer_sources_agree():
    # bytes take a bulk address path; memoryviews, bytearrays and read-only/writable arrays
    # the per-source ones: same pixels from all.
    rec = records(2, seed=8, hw=pil_decode(JPG).shape[:2])
    want = render([JPG] * 4, rec, (20, 20), torch.uint8)
    for conv in (memoryview, bytearray):
        got = render([conv(JPG) if i % 2 else JPG for i in range(4)], rec, (20, 20), torch.uint8)
        assert torch.equal(got, want)
    ro = np.asarray(Image.open(io.BytesIO(JPG)).convert("RGB"))
    rw = ro.copy()
    ro.setflags(write=False)
    assert torch.equal(render([ro] * 4, rec, (20, 20), torch.uint8), render([rw] * 4, rec, (20, 20), torch.uint8))


def test_decoder_measurement_switches_stay_close():
    # IFAST IDCT and non-fancy (merged) chroma upsampling are benchmark switches only: they
    # run, change pixels (so they are not the default), and stay near the exact decode.
    # Measured on the benchmark photos: mean 0.94 (ifast) / 0.16 (no fancy) levels.
    dec = pil_decode(JPG)
    rec = records(8, seed=3, hw=dec.shape[:2])
    exact = render([JPG] * len(rec), rec, (40, 40), torch.uint8, dct_scale=False)
    for flags in (native.DECODER_IFAST, native.DECODER_NO_FANCY, native.DECODER_IFAST | native.DECODER_NO_FANCY):
        got = render([JPG] * len(rec), rec, (40, 40), torch.uint8, dct_scale=False, _decoder_flags=flags)
        d = (got.int() - exact.int()).abs().float()
        assert not torch.equal(got, exact) and d.mean().item() <= 1.5, (flags, d.mean().item())


@pytest.mark.parametrize("enc", [dict(), dict(progressive=True), dict(subsampling=0), dict(subsampling=1), None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_cutmix_only_partner_region_equals_full_partner_render(enc, dtype):
    # A CutMix-only record decodes and resizes only the partner rows inside the box. The same
    # record with MixUp at lambda = 1 (v = 1 * v + 0 * p: exact) renders the whole partner;
    # both must give the very same output, for JPEG (DCT-scaled or not) and raw partners.
    if enc is None:
        partner = synth(160, 130, seed=3)
    else:
        buf = io.BytesIO()
        Image.fromarray(synth(160, 130, seed=3)).save(buf, "JPEG", quality=85, **enc)
        partner = buf.getvalue()
    rec = records(24, seed=11, mixup=0.0, cutmix=1.0, mix_p=1.0)
    rec["flags"] = (rec["flags"] & ~np.uint8(P.FLAG_MIXUP)) | np.uint8(P.FLAG_CUTMIX)
    rec["partner"] = 1
    assert (rec["cutmix"][:, 3] > 0).all()
    full = rec.copy()
    full["flags"] |= np.uint8(P.FLAG_MIXUP)  # MixUp with lambda = 1: forces the full partner render
    full["mixup"] = 65535
    for dct in (True, False):
        kw = dict(partner_sources=[partner] * len(rec), dct_scale=dct)
        a = render([JPG] * len(rec), rec, (56, 48), dtype, **kw)
        b = render([JPG] * len(rec), full, (56, 48), dtype, **kw)
        assert torch.equal(a, b)
        # and the box really holds partner pixels: rendering without a partner differs there
        plain = rec.copy()
        plain["flags"] &= ~np.uint8(P.FLAG_MIXUP | P.FLAG_CUTMIX)
        c = render([JPG] * len(rec), plain, (56, 48), dtype)
        assert not torch.equal(a, c)
