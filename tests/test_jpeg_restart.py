"""Restart-marker sources (fastload.replay.native.add_restarts) and the loader's slice decode
(csrc/replay/jpeg.cpp, build_slice): the transcode keeps every pixel, and a render that starts
decoding at the MCU row above its crop equals the render of the original file, byte for byte,
over crops, DCT scales, flips, filters, chroma subsamplings, partners and CutMix windows."""
import hashlib
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastload.replay import native
from fastload.sample import params as P
from fastload.sample.policy import AugmentPolicy, sample_params

pytestmark = pytest.mark.skipif(not native.have_jpeg(), reason="built without libjpeg")


def photo(h, w, seed):
    r = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 90 * np.sin(x / 7 + y / 19), 128 + 90 * np.cos(y / 5 - x / 23), (x * y) % 255], -1)
    img += r.normal(0, 18, img.shape)  # texture: entropy-coded data of a real size
    return np.clip(img, 0, 255).astype(np.uint8)


def pil_jpeg(img, subsampling, quality=90, **kw):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality, subsampling=subsampling, **kw)
    return buf.getvalue()


def decode(b):
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))


def restart_interval(b):
    """The DRI value of a JPEG (0: none), from its marker segments."""
    i = 2
    while i + 4 <= len(b) and b[i] == 0xFF:
        m, seg = b[i + 1], int.from_bytes(b[i + 2:i + 4], "big")
        if m == 0xDD:
            return int.from_bytes(b[i + 4:i + 6], "big")
        if m == 0xDA:
            return 0
        i += 2 + seg
    return 0


SOURCES = {  # (h, w, PIL subsampling): 4:2:0 (16-row MCUs), 4:2:2, 4:4:4 (8-row MCUs); rows of
    # 16, 26, 25 and 17 MCUs: intervals of 4, 2, 5 and (a prime row) 1 MCU
    "420": (333, 256, 2), "422": (301, 410, 1), "444": (260, 199, 0), "420_prime": (200, 257, 2),
}


@pytest.fixture(scope="module")
def files():
    out = {}
    for k, (h, w, sub) in SOURCES.items():
        b = pil_jpeg(photo(h, w, len(out)), sub)
        out[k] = (b, native.add_restarts(b, k))
    gray = np.asarray(Image.fromarray(photo(240, 192, 9)).convert("L"))
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, "JPEG", quality=85)
    out["gray"] = (buf.getvalue(), native.add_restarts(buf.getvalue(), "gray"))
    return out


def test_transcode_keeps_every_pixel_and_marks_every_row(files):
    for k, (orig, marked) in files.items():
        assert marked != orig and restart_interval(orig) == 0
        assert restart_interval(marked) > 0, k
        w = decode(orig).shape[1]
        mcu_w = 16 if k.startswith("42") else 8
        assert restart_interval(marked) < -(-w // mcu_w), k  # several intervals per MCU row
        assert np.array_equal(decode(orig), decode(marked)), k
        assert len(marked) < len(orig) * 1.02, k  # optimized tables pay for the markers


@pytest.mark.parametrize("per_row,interval", [(16, 4), (32, 4), (24, 4), (25, 5), (30, 5), (21, 7), (27, 3),
                                               (22, 2), (26, 2), (19, 1), (31, 1), (8, 8), (5, 5), (1, 1)])
def test_the_restart_interval_divides_the_row_into_4_to_8_mcus_or_fewer(per_row, interval):
    """A divisor of the MCU row (the slice cuts every row at the same boundaries): the first in
    [4, 8], else the largest below 4; rows of at most 8 MCUs are one interval. Before, the first
    divisor >= 4 however large: 22 MCUs got 11, a prime row none to cut at."""
    w = per_row * 16 - 5  # a partial last MCU counts
    b = native.add_restarts(pil_jpeg(photo(32, w, per_row), 2))
    assert restart_interval(b) == interval


def test_transcode_of_progressive_keeps_pixels():
    b = pil_jpeg(photo(200, 150, 3), 2, progressive=True)
    m = native.add_restarts(b)
    assert restart_interval(m) > 0 and np.array_equal(decode(b), decode(m))


def test_not_a_jpeg_or_already_marked_comes_back_unchanged(files):
    png = io.BytesIO()
    Image.fromarray(photo(20, 20, 1)).save(png, "PNG")
    assert native.add_restarts(png.getvalue()) == png.getvalue()
    marked = files["420"][1]
    assert native.add_restarts(marked) == marked


def test_corrupt_jpeg_is_an_error_naming_it():
    b = pil_jpeg(photo(64, 64, 2), 2)
    with pytest.raises(ValueError, match="img-7"):
        native.add_restarts(b[:200], what="img-7")


def test_exif_and_comment_are_kept():
    img = Image.fromarray(photo(64, 80, 4))
    exif = Image.Exif()
    exif[0x010E] = "a description"
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes(), comment=b"kept")
    m = Image.open(io.BytesIO(native.add_restarts(buf.getvalue())))
    assert m.getexif()[0x010E] == "a description" and m.info.get("comment") == b"kept"


def records(n, seed, hw, **policy):
    pol = AugmentPolicy(**policy)
    return sample_params(pol, np.random.default_rng(seed), [0, 1], np.array([hw, hw]), n).reshape(-1)


def render(srcs, rec, size, dtype=torch.uint8, **kw):
    out = torch.empty(len(rec), 3, *size, dtype=dtype)
    return native.render_batch(srcs, rec, out, **kw)


@pytest.mark.parametrize("kind", ["420", "422", "444", "gray", "420_prime"])
@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size,dct", [((64, 64), True), ((64, 64), False), ((160, 120), True), ((24, 32), "m8")])
def test_slice_render_equals_whole_render(files, kind, interp, size, dct):
    orig, marked = files[kind]
    h, w = decode(orig).shape[:2]
    rec = records(48, seed=len(kind) + size[0], hw=(h, w), rrc_scale=(0.05, 1.0))
    before = native.slice_count()
    a = render([orig] * len(rec), rec, size, interpolation=interp, dct_scale=dct)
    b = render([marked] * len(rec), rec, size, interpolation=interp, dct_scale=dct)
    sliced = native.slice_count() - before
    assert sliced >= len(rec) // 4, f"only {sliced} of {len(rec)} renders decoded a slice"
    for i in range(len(rec)):
        assert torch.equal(a[i], b[i]), f"{kind} record {i}: {rec[i]}"


def test_slice_render_with_partners_erase_and_float_output(files):
    orig, marked = files["420"]
    h, w = decode(orig).shape[:2]
    rec = records(16, seed=5, hw=(h, w), erase=0.5, mixup=1.0, cutmix=1.0, mix_p=1.0)
    n = len(rec)
    rec["partner"] = 1
    po, pm = files["422"]
    a = render([orig] * n, rec, (96, 96), torch.float32, partner_sources=[po] * n)
    b = render([marked] * n, rec, (96, 96), torch.float32, partner_sources=[pm] * n)
    assert torch.equal(a, b)


def test_slice_of_a_damaged_scan_is_an_error_not_pixels(files):
    orig, marked = files["420"]
    h, w = decode(orig).shape[:2]
    bad = bytearray(marked)
    # overwrite the entropy-coded bytes of the last third (rows any low crop needs) with noise
    bad[len(bad) * 2 // 3:-2] = np.random.default_rng(0).integers(0, 255, len(bad) - 2 - len(bad) * 2 // 3,
                                                                    dtype=np.uint8).tobytes()
    rec = P.empty(1)
    rec[0]["crop"] = (int(P.Q * 0.7), 0, int(P.Q * 0.3), P.Q)  # the bottom 30% of the image
    with pytest.raises(ValueError, match="sample 0"):
        render([bytes(bad)], rec, (32, 32))


def test_marked_file_with_markers_out_of_place_falls_back_to_the_whole_decode(files):
    orig, marked = files["444"]
    # renumber the first RST marker: the slice walk refuses the file, the whole decode (libjpeg)
    # then reports the broken sequence as corrupt data
    b = bytearray(marked)
    sos = b.index(b"\xff\xda")
    i = sos + 2
    while not (b[i] == 0xFF and 0xD0 <= b[i + 1] <= 0xD7):
        i += 1
    b[i + 1] = 0xD5
    rec = P.empty(1)
    rec[0]["crop"] = (int(P.Q * 0.6), 0, int(P.Q * 0.4), P.Q)
    before = native.slice_count()
    with pytest.raises(ValueError):
        render([bytes(b)], rec, (32, 32))
    assert native.slice_count() == before


@pytest.mark.parametrize("kind", ["420", "422", "444"])
@pytest.mark.parametrize("dct", [False, True])
def test_slice_edges_every_row(files, kind, dct):
    """Crop edges at every row and column near MCU and interval boundaries (the upsampling
    context rows and columns)."""
    orig, marked = files[kind]
    h, w = decode(orig).shape[:2]
    fr = np.linspace(0.02, 0.45, 160)
    rec = P.empty(2 * len(fr))
    rec["crop"][:len(fr)] = np.stack([fr * P.Q, 0 * fr, (0.3 + 0 * fr) * P.Q, 0 * fr + P.Q], 1).astype(np.uint16)
    rec["crop"][len(fr):] = np.stack([0 * fr + 0.1 * P.Q, 0.2 * P.Q + 0 * fr, fr * P.Q, 0 * fr + 0.5 * P.Q],
                                     1).astype(np.uint16)
    # and the same sweeps across: left edges, then right edges, at every column
    cols = P.empty(2 * len(fr))
    cols["crop"][:len(fr)] = np.stack([0 * fr + 0.2 * P.Q, fr * P.Q, 0 * fr + 0.5 * P.Q, 0 * fr + 0.3 * P.Q],
                                      1).astype(np.uint16)
    cols["crop"][len(fr):] = np.stack([0 * fr + 0.2 * P.Q, 0 * fr + 0.1 * P.Q, 0 * fr + 0.5 * P.Q, fr * P.Q],
                                      1).astype(np.uint16)
    rec = np.concatenate([rec, cols])
    size = (40, 40) if dct else (150, 150)
    before = native.slice_count()
    a = render([orig] * len(rec), rec, size, dct_scale=dct)
    b = render([marked] * len(rec), rec, size, dct_scale=dct)
    assert native.slice_count() - before >= len(fr) // 2
    bad = [i for i in range(len(rec)) if not torch.equal(a[i], b[i])]
    assert not bad, f"{len(bad)} differ, first {rec[bad[0]]}"


def test_reinforce_stores_marked_sources_with_the_same_pixels(tmp_path):
    import glob

    import fastload
    from fastload.datasets import make_images, make_teacher

    root = str(tmp_path / "imgs")
    make_images(root, 6)
    files = sorted(glob.glob(os.path.join(root, "*", "*.jpg")))
    teacher = make_teacher(3, seed=0)
    pol = AugmentPolicy(size=(32, 32))
    kw = dict(num_classes=3, num_augmentations=2, topk=2, policy=pol, image_size=32, progress=False)
    m = fastload.reinforce(root, teacher, str(tmp_path / "on"), **kw)
    assert m["image_encoding"]["restart_markers"] is True
    fastload.reinforce(root, teacher, str(tmp_path / "off"), restart_markers=False, **kw)
    on, off = fastload.ReinforcedDataset(str(tmp_path / "on")), fastload.ReinforcedDataset(str(tmp_path / "off"))
    raw = {open(f, "rb").read() for f in files}
    for i in range(len(on)):
        b_on, b_off = bytes(on.image_bytes(i)), bytes(off.image_bytes(i))
        assert b_off in raw and restart_interval(b_off) == 0  # byte for byte
        assert restart_interval(b_on) > 0 and np.array_equal(decode(b_on), decode(b_off))
        # the row hash is of the bytes stored, as for unmarked sources: a MixUp/CutMix partner
        # read by range checks against it (else remote datasets fall back to whole shards)
        for ds, b in ((on, b_on), (off, b_off)):
            assert ds._hash[i].tobytes() == hashlib.blake2b(b, digest_size=16).digest()
    # the same teacher targets: the teacher rendered the same pixels
    for i in range(len(on)):
        np.testing.assert_array_equal(on._targets_row(i)[0], off._targets_row(i)[0])
