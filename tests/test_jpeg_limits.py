"""Huge declared JPEG dimensions (issue 10, item 10): the decode work and memory of one image
are bounded (fastload.replay.native.set_decode_limits) and an image over a limit is a bad
sample like a corrupt one."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fastload.replay import native
from fastload.sample import params as P

pytestmark = pytest.mark.skipif(not native.have_jpeg(), reason="built without libjpeg: Pillow decodes")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def forge(jpg: bytes, h: int, w: int) -> bytes:
    """The same bytes with the frame header (SOF0/2/9/10) declaring h x w."""
    b = bytearray(jpg)
    for i in range(len(b) - 9):
        if b[i] == 0xFF and b[i + 1] in (0xC0, 0xC2, 0xC9, 0xCA):
            b[i + 5:i + 9] = h.to_bytes(2, "big") + w.to_bytes(2, "big")
            return bytes(b)
    raise AssertionError("no SOF marker")


def flat(h, w, progressive, arithmetic):
    return native._encode_jpeg(np.full((h, w, 3), 120, np.uint8), 90, progressive, arithmetic)


@pytest.mark.parametrize("side,rule", [(16384, "pixel limit"), (8000, "pixels per byte")])
@pytest.mark.parametrize("progressive,arithmetic", [(False, True), (True, False), (True, True)])
def test_small_file_declaring_a_huge_image_is_a_bad_sample(progressive, arithmetic, side, rule):
    # A few KB declaring 16384^2 (under the old 2^28-pixel cap) or 8000^2 pixels: before, the
    # arithmetic-coded one decoded garbage for seconds and returned it; the progressive one
    # held ~0.7 GB. Now the first is over max_pixels, the second over max_pixels_per_byte.
    bomb = forge(flat(256, 256, progressive, arithmetic), side, side)
    assert len(bomb) < 20_000
    good = flat(64, 64, progressive, arithmetic)
    out = torch.empty(3, 3, 32, 32)
    with pytest.raises(ValueError, match=rf"sample key-1 .*{side}x{side}.*{rule}"):
        native.render_batch([good, bomb, good], P.empty(3), out, sample_ids=["key-0", "key-1", "key-2"])
    with pytest.raises(ValueError, match=f"sample 0 .*{rule}"):
        native.decode_batch([bomb])


def test_legit_images_below_the_limits_decode():
    # 2048 x 2048 flat colour in arithmetic coding: a few hundred bytes, but within the
    # pixels a decode may cost without a density check (free_pixels).
    jpg = flat(2048, 2048, False, True)
    assert len(jpg) * native.decode_limits()["max_pixels_per_byte"] < 2048 * 2048
    out = torch.empty(1, 3, 16, 16, dtype=torch.uint8)
    native.render_batch([jpg], P.empty(1), out)
    assert (out.int() - 120).abs().max() <= 2


def test_max_pixels_and_max_bytes_are_adjustable():
    prog = native._encode_jpeg(np.random.default_rng(0).integers(0, 256, (512, 1024, 3), dtype=np.uint8), 90,
                               True, False, False)
    out = torch.empty(1, 3, 16, 16)
    old = native.set_decode_limits(max_bytes=1 << 20)  # 512x1024 4:4:4 coefficients: 3 MiB
    try:
        with pytest.raises(ValueError, match="sample 0"):
            native.render_batch([prog], P.empty(1), out)
        native.set_decode_limits(max_bytes=old["max_bytes"], max_pixels=1000)
        with pytest.raises(ValueError, match="pixel limit of 1000"):
            native.render_batch([prog], P.empty(1), out)
    finally:
        native.set_decode_limits(**old)
    assert native.decode_limits() == old
    native.render_batch([prog], P.empty(1), out)
    with pytest.raises(ValueError, match="max_pixels"):
        native.set_decode_limits(max_pixels=0)


def test_limits_from_the_environment():
    r = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import numpy as np, torch
        from fastload.replay import native
        from fastload.sample import params as P
        print(native.decode_limits())
        try:
            native.render_batch([native._encode_jpeg(np.zeros((64, 64, 3), np.uint8))], P.empty(1),
                                torch.empty(1, 3, 8, 8))
        except ValueError as e:
            print("ERROR", e)
    """)], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "FASTLOAD_MAX_DECODE_PIXELS": "1000", "FASTLOAD_MAX_DECODE_BYTES": "5000000"})
    assert r.returncode == 0, r.stderr
    assert "'max_pixels': 1000, 'max_bytes': 5000000" in r.stdout
    assert "ERROR" in r.stdout and "pixel limit of 1000" in r.stdout


def test_loader_skips_and_names_a_forged_image(tmp_path, monkeypatch):
    # The loader's on_error path treats an image over the limits like any bad image.
    import _ddp_loader_worker as W
    from fastload.format.reader import ReinforcedDataset
    from fastload.loader.reinforced import ReinforcedLoader

    real = W.make_jpegs

    def make_jpegs(n, seed):
        jpegs, hw = real(n, seed)
        jpegs[3] = forge(flat(256, 256, True, True), 16384, 16384)
        return jpegs, hw

    monkeypatch.setattr(W, "make_jpegs", make_jpegs)
    ds = ReinforcedDataset(W.write_dataset(str(tmp_path / "d"), n=8))
    with pytest.raises(RuntimeError, match=r"sample id\(s\) \[3\]"):
        for _ in ReinforcedLoader(ds, image_size=16, batch_size=4):
            pass
    L = ReinforcedLoader(ds, image_size=16, batch_size=4, on_error="skip")
    for _ in L:
        pass
    assert set(L.skipped_ids) == {3}


def _with_comment(jpg: bytes, total: int) -> bytes:
    """``jpg`` with COM segments after SOI padding it to ``total`` bytes."""
    pad, out = total - len(jpg), bytearray(jpg[:2])
    while pad > 4:
        n = min(pad - 4, 65533)
        out += b"\xff\xfe" + (n + 2).to_bytes(2, "big") + b"c" * n
        pad -= n + 4
    return bytes(out + jpg[2:])


@pytest.mark.parametrize("arithmetic", [True, False])
def test_a_comment_padded_forged_header_is_refused_quickly(arithmetic):
    """A 160 px photo (noise: real entropy) with its header patched to 8000x8000 and a
    comment padding it to 22 KB: the comment bought pixel budget, and the arithmetic-coded
    one rendered as garbage in ~2 s (libjpeg zero-fills an arithmetic scan past its data,
    no warning). Comments and APPn segments carry no pixels: refused before any decoding."""
    import time

    rng = np.random.default_rng(0)
    photo = native._encode_jpeg(rng.integers(0, 256, (160, 160, 3), dtype=np.uint8), 75, False, arithmetic)
    bomb = _with_comment(forge(photo, 8000, 8000), 22_000)
    assert len(bomb) >= 22_000 and 8000 * 8000 / len(bomb) < native.decode_limits()["max_pixels_per_byte"]
    out = torch.empty(1, 3, 32, 32)
    t0 = time.monotonic()
    # arithmetic: refused by the density check; Huffman (16 KB of data, under the density
    # limit): libjpeg's premature-end warning, an error here
    why = r"8000x8000.*pixels per byte" if arithmetic else r"premature end of data"
    with pytest.raises(ValueError, match=rf"sample key-7 .*{why}"):
        native.render_batch([bomb], P.empty(1), out, sample_ids=["key-7"])
    assert time.monotonic() - t0 < 0.5
    # the same photo with the same comment, header untouched, still decodes
    native.render_batch([_with_comment(photo, 22_000)], P.empty(1), out)


def test_truncated_data_is_a_bad_sample_naming_it():
    """Premature end of the entropy-coded data (libjpeg's JWRN_JPEG_EOF warning) is corrupt
    data, never a sample with its missing part filled in."""
    rng = np.random.default_rng(1)
    photo = native._encode_jpeg(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8), 90, False, False)
    out = torch.empty(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"sample cut-0 .*(Premature end|premature end|Corrupt)"):
        native.render_batch([photo[:len(photo) * 2 // 3]], P.empty(1), out, sample_ids=["cut-0"])
