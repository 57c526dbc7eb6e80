"""resize="pil": the replay's crop resize byte-exact with Pillow's Image.resize.

Pillow's resampling is integer fixed point (coefficients in IEEE double, then 22-bit
integers), so a live Pillow is a CPU-independent oracle: the installed Pillow is the reference
for the mode of its own pass order ("pil" for Pillow >= 13, "pil12" before); the other mode is
checked against the NumPy reference, and against the live Pillow where both orders agree."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from fastload.replay import reference_pil as RP
from fastload.replay.native import render_batch
from fastload.sample import params as P
from fastload.sample.policy import AugmentPolicy

_PIL13 = tuple(int(v) for v in Image.__version__.split(".")[:1])[0] >= 13
# the resize mode the installed Pillow is the live oracle of (its pass order)
_LIVE = "pil" if _PIL13 else "pil12"
_FILTER = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}

# (source h, w) x (output h, w): odd, non-square, up- and down-scaling, >= 512, extreme
# aspect, one axis unchanged (Pillow skips that pass), both passes skipped, tall crops
# (Pillow >= 13 runs the vertical pass first)
CASES = [((37, 53), (224, 224)), ((480, 640), (224, 224)), ((517, 389), (160, 96)), ((1023, 771), (512, 512)),
         ((3, 900), (224, 224)), ((900, 3), (64, 64)), ((224, 300), (224, 224)), ((300, 224), (224, 224)),
         ((224, 224), (224, 224)), ((2000, 90), (256, 256)), ((1, 1), (5, 7)), ((600, 500), (599, 601)),
         ((1200, 40), (224, 32)), ((33, 1500), (17, 700))]


def _image(h, w, seed):
    """Smooth structure plus noise: both the rounding and the large steps are exercised."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = 127 + 100 * np.sin(xx / 7.0 + seed)[..., None] * np.cos(yy / 11.0)[..., None] * np.array([1, -0.7, 0.4])
    return np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)


def _pillow(img, box, size, interp, flip):
    t, l, bh, bw = box
    p = Image.fromarray(img).crop((l, t, l + bw, t + bh)).resize((size[1], size[0]), _FILTER[interp])
    if flip:
        p = p.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(p).transpose(2, 0, 1)


def _records(boxes, hw, flips):
    rec = P.empty(len(boxes))
    for i, ((t, l, bh, bw), (h, w), f) in enumerate(zip(boxes, hw, flips)):
        rec["crop"][i] = P.pixels_to_box(t, l, bh, bw, h, w)
        rec["flags"][i] = P.FLAG_FLIP if f else 0
    return rec


def _cases(seed):
    """Per CASE: the full image and a random crop, each flipped or not."""
    rng = np.random.default_rng(seed)
    for k, ((h, w), size) in enumerate(CASES):
        img = _image(h, w, k)
        t, l = int(rng.integers(0, h)), int(rng.integers(0, w))
        crop = (t, l, int(rng.integers(1, h - t + 1)), int(rng.integers(1, w - l + 1)))
        for box in ((0, 0, h, w), crop):
            # the stored (quantized) box: the pixels both sides crop
            q = P.pixels_to_box(*box, h, w)
            yield img, tuple(int(v) for v in P.box_to_pixels(q, h, w)), size, bool(rng.integers(0, 2))


@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
def test_native_pil_resize_equals_pillow(interp):
    # the installed Pillow is the oracle of its own pass order: "pil" (>= 13) or "pil12"
    mode = _LIVE
    for img, box, size, flip in _cases(1):
        out = torch.empty(1, 3, *size, dtype=torch.uint8)
        render_batch([img], _records([box], [img.shape[:2]], [flip]), out, interpolation=interp, resize=mode)
        want = _pillow(img, box, size, interp, flip)
        assert np.array_equal(out[0].numpy(), want), (img.shape, box, size, interp, flip)


@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
def test_numpy_reference_equals_pillow_and_native(interp):
    for img, box, size, flip in _cases(2):
        ref = torch.from_numpy(RP.crop_resize_flip_pil(img, P.pixels_to_box(*box, *img.shape[:2]), size, flip,
                                                       interp))
        ref12 = RP.crop_resize_flip_pil(img, P.pixels_to_box(*box, *img.shape[:2]), size, flip, interp,
                                        pillow13=False)
        live = ref.numpy() if _PIL13 else ref12  # the installed Pillow's own pass order
        assert np.array_equal(live, _pillow(img, box, size, interp, flip)), (img.shape, box, size)
        out = torch.empty(1, 3, *size, dtype=torch.uint8)
        render_batch([img], _records([box], [img.shape[:2]], [flip]), out, interpolation=interp, resize="pil12")
        assert np.array_equal(out[0].numpy(), ref12), (img.shape, box, size, "pil12")
        bh, bw = box[2:]
        if not (bh - size[0] > 0 and bh - size[0] > (bw - size[1]) * 2):  # both orders horizontal first
            assert np.array_equal(ref12, ref.numpy())


def test_pass_order_is_visible_and_pil12_differs_from_pil():
    """A tall crop: Pillow >= 13 resizes vertically first; the uint8 intermediate makes the two
    orders differ (so the pil12 check above is not vacuous)."""
    img = _image(700, 300, 5)
    box, size = (0, 0, 700, 300), (224, 224)
    rec = _records([box], [img.shape[:2]], [False])
    a, b = (torch.empty(1, 3, *size, dtype=torch.uint8) for _ in range(2))
    render_batch([img], rec, a, interpolation="bicubic", resize="pil")
    render_batch([img], rec, b, interpolation="bicubic", resize="pil12")
    assert not torch.equal(a, b)
    assert np.array_equal((a if _PIL13 else b)[0].numpy(), _pillow(img, box, size, "bicubic", False))


def test_torch_resize_is_not_pillow():
    """The check can fail: the default (torch) resize differs from Pillow on these cases."""
    differs = 0
    for img, box, size, flip in _cases(3):
        out = torch.empty(1, 3, *size, dtype=torch.uint8)
        render_batch([img], _records([box], [img.shape[:2]], [flip]), out, interpolation="bicubic")
        differs += not np.array_equal(out[0].numpy(), _pillow(img, box, size, "bicubic", flip))
    assert differs >= len(CASES) // 2


def test_float_output_is_the_normalized_pillow_image():
    img = _image(401, 333, 7)
    box, size = (13, 20, 300, 250), (96, 128)
    rec = _records([box], [img.shape[:2]], [True])
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = torch.empty(1, 3, *size)
    render_batch([img], rec, out, interpolation="bicubic", resize=_LIVE, mean=mean, std=std)
    m = torch.tensor(mean)[:, None, None]
    s = torch.tensor(std)[:, None, None]
    back = ((out[0] * s + m) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(back, _pillow(img, box, size, "bicubic", True))


def _jpeg(img, subsampling, quality=90):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality, subsampling=subsampling)
    return buf.getvalue()


@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
def test_jpeg_end_to_end_equals_pillow_with_pil_randaugment(interp):
    """Real decoded JPEGs (4:2:0, 4:4:4, 4:2:2), sampled records with RandAugment: the replay
    equals Pillow's decode -> crop -> resize -> flip -> torchvision's RandAugment on PIL images
    (reference_ra's "pil" semantics calls Pillow), whatever the DCT rule asks for."""
    from fastload.replay.reference_ra import apply_ra
    from fastload.sample.policy import sample_params

    rng = np.random.default_rng(11)
    shapes = [(375, 500), (517, 389), (1024, 683), (240, 1100), (64, 48)]
    jpgs, decoded = [], []
    for k, (h, w) in enumerate(shapes):
        b = _jpeg(_image(h, w, 20 + k), (2, 0, 1)[k % 3])
        jpgs.append(b)
        decoded.append(np.asarray(Image.open(io.BytesIO(b)).convert("RGB")))
    hw = np.array(shapes)
    pol = AugmentPolicy(randaugment=(2, 9), interpolation=interp, randaugment_semantics="pil", resize="pil",
                        size=(224, 224))
    rec = sample_params(pol, rng, np.arange(len(shapes)), hw, 3).reshape(-1)
    src = [jpgs[i // 3] for i in range(len(rec))]
    out = torch.empty(len(rec), 3, 224, 224, dtype=torch.uint8)
    render_batch(src, rec, out, interpolation=interp, ra_semantics="pil", resize=_LIVE, dct_scale=True)
    for i, r in enumerate(rec):
        img = decoded[i // 3]
        box = tuple(int(v) for v in P.box_to_pixels(r["crop"], *img.shape[:2]))
        y = torch.from_numpy(_pillow(img, box, (224, 224), interp, bool(r["flags"] & P.FLAG_FLIP)).copy())
        keep = [j for j, o in enumerate(r["ra_ops"]) if o != P.RA_NONE]
        y = apply_ra(y, [int(r["ra_ops"][j]) for j in keep], [int(r["ra_mags"][j]) for j in keep], num_bins=31,
                     semantics="pil")
        assert torch.equal(out[i], y), (i, shapes[i // 3], box)


def test_cutmix_partner_window_and_reference():
    """CutMix-only partners render just the box's rows (a row window): same pixels as the
    reference replay with resize="pil" (float output, mixing and erasing included)."""
    from fastload.replay.reference import render_reference
    from fastload.sample.policy import sample_params

    shapes = [(300, 400), (257, 199), (520, 610)]
    imgs = [_image(h, w, 30 + k) for k, (h, w) in enumerate(shapes)]
    pol = AugmentPolicy(cutmix=1.0, mixup=1.0, mix_p=0.7, erase=0.3, resize="pil", size=(64, 80))
    rec = sample_params(pol, np.random.default_rng(3), np.arange(3), np.array(shapes), 6).reshape(-1)
    cut_only = (rec["flags"] & P.FLAG_CUTMIX) & ~(rec["flags"] & P.FLAG_MIXUP)
    assert cut_only.any() and (rec["flags"] & P.FLAG_MIXUP).any()  # both partner paths run
    owner = np.repeat(np.arange(3), 6)
    parts = [imgs[p] if p >= 0 else None for p in rec["partner"]]
    out = torch.empty(len(rec), 3, 64, 80)
    render_batch([imgs[o] for o in owner], rec, out, partner_sources=parts, interpolation="bicubic", resize="pil")
    for i, r in enumerate(rec):
        want = render_reference(imgs[owner[i]], r, (64, 80), partner_img=parts[i], interpolation="bicubic",
                                resize="pil")
        assert torch.allclose(out[i], want, atol=1e-5), i


def test_policy_resize_field():
    assert AugmentPolicy().resize == "torch"
    assert "resize" not in AugmentPolicy().to_dict()  # manifests stay readable by older fastload
    p = AugmentPolicy(resize="pil")
    assert p.to_dict()["resize"] == "pil" and AugmentPolicy.from_dict(p.to_dict()) == p
    old = AugmentPolicy().to_dict()
    assert AugmentPolicy.from_dict(old).resize == "torch"
    with pytest.raises(ValueError, match="resize"):
        AugmentPolicy(resize="PIL")
    with pytest.raises(ValueError, match="resize"):
        render_batch([_image(8, 8, 0)], P.empty(1), torch.empty(1, 3, 4, 4), resize="lanczos")


def test_device_replay_leaves_pil_resize_to_the_cpu():
    """The Triton replay resizes with torch's weights: a dataset with resize="pil" renders on
    the CPU path even when a device replay is configured."""
    from types import SimpleNamespace

    from fastload.loader.render import Render

    calls = []
    dev = SimpleNamespace(render=lambda prep, host, ra: calls.append("device"))
    for resize, want in (("torch", ["device"]), ("pil", ["host"])):
        calls.clear()
        ds = SimpleNamespace(policy=AugmentPolicy(resize=resize), replay={})
        r = Render(SimpleNamespace(encode=None), ds, None, dev)
        r.host = lambda prep, out_fn: calls.append("host")
        if resize == "torch":
            r({"ext": None}, None)
        else:
            with pytest.warns(UserWarning, match="resize='pil'"):
                r({"ext": None}, None)
        assert calls == want, resize
