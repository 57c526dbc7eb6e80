"""Importers store non-JPEG sources losslessly: a PNG as its own bytes (the replay decodes it
with Pillow), a CMYK JPEG as its own bytes (the native decoder converts CMYK as Pillow does),
other formats as a PNG of Pillow's convert("RGB") pixels; the replay gives the same pixels as a
render of those decoded pixels."""
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastload.format.images import stored_image_bytes, with_restart_markers
from fastload.replay import native
from fastload.sample import params as P


def _photo(h=41, w=57, seed=0):
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([(x * 4 + y) % 256, (y * 3 + 50) % 256, (x * y) % 256], -1)
    return np.clip(a + g.integers(-30, 31, a.shape), 0, 255).astype(np.uint8)


def _save(im, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _decoded(b):
    with Image.open(io.BytesIO(b)) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "LA", "I;16"])
def test_png_is_kept_as_its_bytes(mode):
    rgb = Image.fromarray(_photo())
    im = {"RGBA": lambda: rgb.convert("RGBA"), "P": lambda: rgb.convert("P"), "L": lambda: rgb.convert("L"),
          "LA": lambda: rgb.convert("LA"), "I;16": lambda: rgb.convert("L").convert("I;16")}.get(mode, lambda: rgb)()
    b = _save(im, "PNG")
    out, how = stored_image_bytes(b)
    assert out == b and how == "png"
    np.testing.assert_array_equal(native.decode_png(b), _decoded(b))


def test_jpeg_kept_others_become_png_of_pils_conversion():
    rgb = Image.fromarray(_photo())
    for im in (rgb, rgb.convert("L"), rgb.convert("CMYK")):
        b = _save(im, "JPEG", quality=90)
        assert stored_image_bytes(b) == (b, "jpeg")
        if im.mode == "CMYK":  # decoded natively as Pillow converts it: CMYK needs no re-encode
            np.testing.assert_array_equal(native.decode_batch([b])[0], _decoded(b))
    for im, fmt in ((rgb, "BMP"), (rgb, "TIFF"), (rgb.convert("P"), "GIF"),
                    (rgb, "WEBP"), (rgb.convert("CMYK"), "TIFF")):
        b = _save(im, fmt)
        out, how = stored_image_bytes(b, "x")
        assert how.startswith("png-from-") and out[:8] == native.PNG_SIGNATURE, how
        np.testing.assert_array_equal(_decoded(out), _decoded(b))  # Pillow's RGB pixels, losslessly
    with pytest.raises(ValueError, match="broken.jpg: cannot decode"):
        stored_image_bytes(_save(rgb, "PNG")[:200], "broken.jpg")


@pytest.mark.skipif(not native.have_jpeg(), reason="built without libjpeg")
def test_restart_markers_only_transcode_jpegs_losslessly():
    rgb = Image.fromarray(_photo(64, 96))
    for im in (rgb, rgb.convert("L"), rgb.convert("CMYK")):
        b = _save(im, "JPEG", quality=90)
        out, how = stored_image_bytes(b, "x", restart_markers=True)
        assert how == "jpeg" and b"\xff\xdd" not in b and b"\xff\xdd" in out, im.mode  # a DRI marker
        np.testing.assert_array_equal(_decoded(out), _decoded(b))  # the same pixels
        np.testing.assert_array_equal(native.decode_batch([out])[0], _decoded(b))
    for im, fmt in ((rgb, "PNG"), (rgb.convert("RGBA"), "PNG"), (rgb, "BMP")):  # kept or converted: as before
        b = _save(im, fmt)
        assert stored_image_bytes(b, "x", restart_markers=True) == stored_image_bytes(b, "x")
    # Pillow checks only a JPEG's header; a file libjpeg rejects is kept as it is
    cut = _save(rgb, "JPEG", quality=90)[:2000]
    with pytest.raises(ValueError):
        native.add_restarts(cut)
    assert with_restart_markers(cut) == cut and stored_image_bytes(cut, "x", restart_markers=True) == (cut, "jpeg")


def test_png_sources_replay_as_their_pixels():
    a = _photo(53, 71, 1)
    png = _save(Image.fromarray(a).convert("RGBA"), "PNG")
    jpg = _save(Image.fromarray(_photo(44, 60, 2)), "JPEG", quality=92)
    rec = P.empty(3)
    rec["crop"] = [(1000, 3000, 50000, 40000), (0, 0, P.Q, P.Q), (5000, 0, 30000, 60000)]
    rec["flags"][0] = P.FLAG_FLIP
    rec["ra_ops"][2, :2] = (5, 8)
    rec["ra_mags"][2, :2] = (-9, 12)
    rec["partner"][1] = 0
    rec["pcrop"][1] = (0, 0, P.Q, P.Q)
    rec["flags"][1] |= P.FLAG_MIXUP
    rec["mixup"][1] = P.Q // 3
    for dtype in (torch.uint8, torch.float32):
        got = native.render_batch([png, jpg, png], rec, torch.empty(3, 3, 24, 32, dtype=dtype), threads=1,
                                  partner_sources=[None, png, None])
        dec = _decoded(png)
        want = native.render_batch([dec, jpg, dec], rec, torch.empty(3, 3, 24, 32, dtype=dtype), threads=1,
                                   partner_sources=[None, dec, None])
        assert torch.equal(got, want)
    arrs = native.decode_batch([png, jpg], scale=1)
    np.testing.assert_array_equal(arrs[0], _decoded(png))
    assert arrs[1].shape == (44, 60, 3)
    assert native.decode_batch([png, jpg], keep=False) is None
    with pytest.raises(ValueError, match="sample 7 .*bad PNG"):
        native.render_batch([png[:100]], P.empty(1), torch.empty(1, 3, 8, 8), sample_ids=[7])


def test_import_mldr_stores_png_and_cmyk_as_their_bytes(tmp_path):
    from fastload.bench import mldr_layout as L
    from fastload.importers import mldr
    from fastload.format.reader import ReinforcedDataset
    from fastload.loader.reinforced import ReinforcedLoader

    imgs = str(tmp_path / "imgs")
    hw = L.write_image_folder(imgs, 5, classes=5, seed=0)
    cfg = L.make_config("mix_rare", 2, 3, 5, size=32)
    arch = str(tmp_path / "a.tar")
    L.write_archive(arch, hw, cfg, seed=0, fmt="tar")
    files, _, _ = mldr.image_folder(imgs)
    # ImageNet has a PNG and 22 CMYK JPEGs named .JPEG: same names, other content, same sizes
    p0, p1 = (os.path.join(imgs, files[i]) for i in (0, 1))
    png = _save(Image.open(p0).convert("RGBA"), "PNG")
    cmyk = _save(Image.open(p1).convert("CMYK"), "JPEG", quality=95)
    open(p0, "wb").write(png)
    open(p1, "wb").write(cmyk)
    # byte for byte, so the stored bytes can be compared with the files (restart markers, the
    # default, are tested in test_mldr.py)
    mldr.import_mldr(arch, imgs, str(tmp_path / "out"), progress=False, restart_markers=False)
    ds = ReinforcedDataset(str(tmp_path / "out"), verify=True)
    assert bytes(ds.image_bytes(0)) == png
    assert bytes(ds.image_bytes(1)) == cmyk  # no JPEG q95 re-encode: decoded as Pillow converts it
    assert bytes(ds.image_bytes(2)) == open(os.path.join(imgs, files[2]), "rb").read()
    # the loader renders them (PNG through Pillow) exactly as a render of the decoded pixels
    loader = ReinforcedLoader(str(tmp_path / "out"), batch_size=5, shuffle=False, aug_choice="epoch",
                              image_size=32, dtype=torch.uint8)
    x = next(iter(loader))[0]
    rows = np.arange(5)
    recs = np.concatenate([ds.augs(i)[:1] for i in rows])
    ext = np.concatenate([ds.augs_ext(i)[:1] for i in rows])
    srcs = [_decoded(bytes(ds.image_bytes(i))) if i < 2 else bytes(ds.image_bytes(i)) for i in rows]
    partners = [_decoded(bytes(ds.image_bytes(int(p)))) if 0 <= p < 2 else
                (bytes(ds.image_bytes(int(p))) if p >= 0 else None) for p in recs["partner"]]
    want = native.render_batch(srcs, recs, torch.empty(5, 3, 32, 32, dtype=torch.uint8), partner_sources=partners,
                               ext=ext, box_grid=(32, 32), interpolation=loader.interpolation,
                               dct_scale=loader.dct_scale, resize=ds.policy.resize)
    assert torch.equal(x, want)


def test_import_datacomp_keeps_png_bytes(tmp_path):
    from test_datacomp import _build_real

    from fastload.importers.datacomp import import_datacomp
    from fastload.format.reader import ReinforcedDataset

    dr, im, truth = _build_real(tmp_path, n=3)
    import_datacomp([dr], str(tmp_path / "out"), [im], progress=False)
    ds = ReinforcedDataset(str(tmp_path / "out"))
    for i, key in enumerate(sorted(truth)):
        b = bytes(ds.image_bytes(i))
        assert b[:8] == native.PNG_SIGNATURE  # the archive's PNG, not a JPEG q95 of it
        np.testing.assert_array_equal(native.decode_png(b), truth[key]["img"])
