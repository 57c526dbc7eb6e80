"""The decode floor (fastload.replay.native.crop_floor_batch, the benchmark's decode_floor
pipeline) decodes only a crop's rows and columns; its pixels must be those of a plain full
decode at the same DCT scale, cut to the same region, or the floor would time less work than
a correct decoder does."""
import io

import numpy as np
import pytest

from fastload.replay import native
from fastload.sample import params as P

pytestmark = pytest.mark.skipif(not native._lib().fl_replay_have_jpeg(), reason="built without libjpeg")


def _photo(h, w, seed):
    """Smooth content with edges and noise (every chroma block differs)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // max(1, w - 1)), (y * 255 // max(1, h - 1)), ((x + y) * 3) % 256], -1)
    return np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)


def _sources():
    out = []
    for k, (h, w) in enumerate([(375, 500), (500, 375), (97, 131), (256, 256)]):
        px = _photo(h, w, k)
        out.append((f"420-{h}x{w}", native._encode_jpeg(px, 90, False, False, True), h, w))
        out.append((f"444-{h}x{w}", native._encode_jpeg(px, 90, False, False, False), h, w))
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_photo(200, 300, 9)).save(buf, "JPEG", quality=85)  # Pillow's encoder (4:2:0)
    out.append(("pil-200x300", buf.getvalue(), 200, 300))
    buf = io.BytesIO()
    Image.fromarray(_photo(120, 160, 10)).save(buf, "JPEG", quality=85, progressive=True)
    out.append(("pil-progressive-120x160", buf.getvalue(), 120, 160))
    return out


@pytest.mark.parametrize("out", [224, 64, 16])
def test_floor_region_equals_a_full_decode_cut_to_the_crop(out):
    rng = np.random.default_rng(out)
    srcs, crops, meta = [], [], []
    for name, jpeg, h, w in _sources():
        for _ in range(6):
            bh, bw = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
            top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
            srcs.append(jpeg)
            crops.append(P.pixels_to_box(top, left, bh, bw, h, w))
            meta.append((name, h, w, top, left, bh, bw))
        # whole image, and crops touching the bottom-right corner
        for top, left, bh, bw in ((0, 0, h, w), (h - 9, w - 9, 9, 9), (h // 2, 0, h - h // 2, w)):
            srcs.append(jpeg)
            crops.append(P.pixels_to_box(top, left, bh, bw, h, w))
            meta.append((name, h, w, top, left, bh, bw))
    crops = np.array(crops, np.uint16).reshape(-1, 4)
    res = native.crop_floor_batch(srcs, crops, (out, out), threads=2)
    for jpeg, box, (region, px), m in zip(srcs, crops, res, meta):
        name, h, w = m[:3]
        top, left, bh, bw = P.box_to_pixels(box, h, w)  # the box as the decoder dequantizes it
        # the reference: torchvision-free plain full decode at the loader's DCT scale
        d = next(d for d in (8, 4, 2, 1) if d == 1 or (bh >= out * d and bw >= out * d))
        full = native.decode_batch([jpeg], scale=d)[0]
        sh, sw = full.shape[:2]
        y0, x0, rh, rw = region
        # the region covers the crop at that scale (scaled pixel k covers source [k*d, (k+1)*d))
        assert y0 == top // d and x0 == left // d, (m, region, d)
        assert y0 + rh == min(sh, -(-(top + bh) // d)) and x0 + rw == min(sw, -(-(left + bw) // d)), (m, region, d)
        assert px.shape == (rh, rw, 3)
        np.testing.assert_array_equal(px, full[y0:y0 + rh, x0:x0 + rw], err_msg=str((m, region, d)))


def test_floor_without_pixels_and_its_errors():
    name, jpeg, h, w = _sources()[0]
    box = np.array([P.pixels_to_box(10, 20, 100, 150, h, w)], np.uint16)
    assert native.crop_floor_batch([jpeg], box, (32, 32), keep=False) is None
    with pytest.raises(ValueError, match="rows"):
        native.crop_floor_batch([jpeg, jpeg], box, (32, 32))
    with pytest.raises(ValueError, match="position 1"):
        native.crop_floor_batch([jpeg, jpeg[:200]], np.repeat(box, 2, 0), (32, 32))
    with pytest.raises(ValueError, match="positive"):
        native.crop_floor_batch([jpeg], box, (0, 32))
