"""File-bytes input (ByteFormer): the native encoder (csrc/encode) decoded back with Pillow
(byte-exact pixels for PNG and TIFF, within JPEG tolerance), and BytesBatches around a
ReinforcedLoader on a real small reinforced dataset."""
from __future__ import annotations

import ctypes
import io

import numpy as np
import pytest
import torch
from PIL import Image

from fastload import _native
from fastload.replay import encode as E


def _decode(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)))


def _photo(h=37, w=53):
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[100:100 + h, 150:150 + w])


@pytest.mark.parametrize("fmt", ["png", "tiff"])
@pytest.mark.parametrize("c", [3, 1])
def test_lossless_roundtrip(fmt, c):
    rng = np.random.default_rng(c)
    x = rng.integers(0, 256, (4, 19, 31, c), dtype=np.uint8)
    x[1] = _photo(19, 31)[..., :c]
    x[2] = 0  # flat
    for level in ((0, 6, 9) if fmt == "png" else (6,)):
        blobs = E.encode_list(x, fmt, level=level, threads=2)
        for i, b in enumerate(blobs):
            assert len(b) <= E.encode_bound(fmt, 19, 31, c)
            img = Image.open(io.BytesIO(b))
            assert img.format == fmt.upper()
            got = np.asarray(img)
            assert np.array_equal(got.reshape(x[i].shape), x[i])
    # NCHW input (as the loader renders) gives the same bytes
    assert E.encode_list(x.transpose(0, 3, 1, 2), fmt, layout="nchw") == E.encode_list(x, fmt)
    if fmt == "png":  # deflate does compress a photo
        assert len(E.encode_list(x[1:2], "png")[0]) < 19 * 31 * c


@pytest.mark.parametrize("quality", [50, 90])
def test_jpeg_within_tolerance(quality):
    x = np.stack([_photo(), _photo()[::-1].copy()])
    tok, lengths = E.encode_batch(x, "jpeg", quality=quality)
    assert tok.dtype == torch.uint8 and tok.shape == (2, int(lengths.max()))
    for i in range(2):
        b = tok[i, :int(lengths[i])].numpy().tobytes()
        assert b[:2] == b"\xff\xd8" and b[-2:] == b"\xff\xd9"
        got = _decode(b).astype(np.float64)
        psnr = 10 * np.log10(255 ** 2 / np.mean((got - x[i]) ** 2))
        assert psnr > (26 if quality == 50 else 30)
        # libjpeg at the same quality as Pillow's (libjpeg too): close in size
        ref = io.BytesIO()
        Image.fromarray(x[i]).save(ref, format="JPEG", quality=quality)
        assert abs(len(b) - len(ref.getvalue())) < 0.25 * len(ref.getvalue())
    gray = E.encode_list(x[..., :1], "jpeg", quality=95)[0]
    assert _decode(gray).shape == x.shape[1:3]


def test_padding_and_threads():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 12, 12, 3), dtype=np.uint8)
    x[::2] = 7  # compressible rows: shorter
    tok, lengths = E.encode_batch(x, "png", pad_value=255)
    blobs = E.encode_list(x, "png")
    assert lengths.tolist() == [len(b) for b in blobs]
    for i, b in enumerate(blobs):
        assert tok[i, :len(b)].numpy().tobytes() == b
        assert (tok[i, len(b):] == 255).all()
    assert E.encode_list(x, "jpeg", threads=1) == E.encode_list(x, "jpeg", threads=3)


def test_bucket_groups():
    lengths = np.array([5, 9, 16, 17, 300, 3, 33])
    buf = np.arange(7 * 300, dtype=np.int64).reshape(7, 300).astype(np.uint8)
    groups = E.bucket_groups(buf, lengths)
    assert sorted(torch.cat([g.positions for g in groups]).tolist()) == list(range(7))
    for g in groups:
        L = g.lengths.numpy()
        assert (E.length_bucket(L) == g.bucket).all() and (L <= 2 ** g.bucket).all() and (L > 2 ** (g.bucket - 1)).all()
        assert g.tokens.shape == (len(L), L.max())
        for p, row in zip(g.positions.tolist(), g.tokens):
            assert np.array_equal(row[:lengths[p]].numpy(), buf[p, :lengths[p]])


def test_bad_input():
    x = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="4-D"):
        E.encode_batch(x[0], "png")
    with pytest.raises(ValueError, match="1 or 3 channels"):
        E.encode_batch(np.zeros((2, 8, 8, 4), np.uint8), "png")
    with pytest.raises(ValueError, match="uint8"):
        E.encode_batch(x.astype(np.float32), "png")
    with pytest.raises(ValueError, match="encode must be one of"):
        E.encode_batch(x, "webp")
    with pytest.raises(ValueError, match="quality"):
        E.encode_batch(x, "jpeg", quality=0)
    with pytest.raises(ValueError, match="layout"):
        E.encode_batch(x, "png", layout="hwc")
    # a slot too small: an error naming the image, nothing written past the slot
    lib = E._lib()
    out = np.full((2, 64 + 16), 0xAB, dtype=np.uint8)
    lengths = np.zeros(2, np.int64)
    view = out[:, :64]
    st = lib.fl_encode_batch(_native.ptr(x), 2, 8, 8, 3, 0, 2, 90, 6, _native.ptr(out), 80, _native.ptr(lengths), 1)
    with pytest.raises(RuntimeError, match="image 0 does not fit the output capacity of 80 bytes"):
        _native.check(lib, st, "encode")
    assert view.shape == (2, 64)
    for fmt in (0, 1):  # JPEG and PNG overflow the same way
        st = lib.fl_encode_batch(_native.ptr(x), 2, 8, 8, 3, 0, fmt, 90, 6, _native.ptr(out), 40, _native.ptr(lengths), 2)
        with pytest.raises(RuntimeError, match="does not fit"):
            _native.check(lib, st, "encode")
        assert (out[1, 40:] == 0xAB).all()


# ------------------------------------------------------------------ around the loader
@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    from fastload.format.reader import ReinforcedDataset
    from _ddp_loader_worker import write_dataset

    return ReinforcedDataset(write_dataset(str(tmp_path_factory.mktemp("bytes") / "d"), n=13))


def _loader(ds, **kw):
    from fastload.loader.reinforced import ReinforcedLoader

    kw.setdefault("dtype", torch.uint8)
    return ReinforcedLoader(ds, batch_size=5, shuffle=True, image_size=24, seed=2, **kw)


@pytest.mark.parametrize("fmt", ["png", "tiff", "jpeg"])
def test_bytes_batches_decode_to_the_replayed_images(ds, fmt):
    from fastload.bytes import BytesBatches

    bb = BytesBatches(_loader(ds), encode=fmt, quality=95)
    n = 0
    for out, plain in zip(bb, _loader(ds)):
        images = plain[0]
        assert torch.equal(out.batch[1], plain[1])
        for i in range(len(images)):
            got = _decode(out.tokens[i, :int(out.lengths[i])].numpy().tobytes()).astype(np.int64)
            want = images[i].permute(1, 2, 0).numpy().astype(np.int64)
            if fmt == "jpeg":  # tiny augmented crops: as close as Pillow's libjpeg at the same quality
                ref = io.BytesIO()
                Image.fromarray(want.astype(np.uint8)).save(ref, format="JPEG", quality=95)
                ref_err = np.abs(_decode(ref.getvalue()).astype(np.int64) - want).mean()
                assert np.abs(got - want).mean() <= 1.1 * ref_err + 0.5
            else:
                assert np.array_equal(got, want)
        n += 1
    assert n == len(bb) == 3


def test_bytes_batches_bucketed_and_resume(ds):
    from fastload.bytes import BytesBatches

    flat = list(BytesBatches(_loader(ds), encode="png"))
    bb = BytesBatches(_loader(ds), encode="png", bucket=True)
    for f, b in zip(flat, bb):
        assert b.tokens is None and torch.equal(b.lengths, f.lengths)
        for g in b.groups:
            for p, row in zip(g.positions.tolist(), g.tokens):
                L = int(f.lengths[p])
                assert torch.equal(row[:L], f.tokens[p, :L])
    a = BytesBatches(_loader(ds), encode="png")
    it = iter(a)
    next(it)
    st = a.state_dict()
    b = BytesBatches(_loader(ds), encode="png")
    b.load_state_dict(st)
    rest = list(b)
    assert len(rest) == 2 and all(torch.equal(x.tokens, y.tokens) for x, y in zip(rest, flat[1:]))


def test_stored_bytes_served_as_they_are(ds):
    from fastload.bytes import BytesBatches

    L = _loader(ds, dtype=torch.float32)
    for t, out in enumerate(BytesBatches(L, encode="stored")):
        rows = L.batch_plan(0, t).indices
        for i, r in enumerate(rows):
            assert out.tokens[i, :int(out.lengths[i])].numpy().tobytes() == bytes(ds.image_bytes(int(r)))


def test_bytes_batches_bad_arguments(ds):
    from fastload.bytes import BytesBatches

    with pytest.raises(ValueError, match="dtype=torch.uint8"):
        BytesBatches(_loader(ds, dtype=torch.float32), encode="png")
    with pytest.raises(ValueError, match="encode must be one of"):
        BytesBatches(_loader(ds), encode="gif")
    with pytest.raises(ValueError, match="quality"):
        BytesBatches(_loader(ds), encode="jpeg", quality=101)


# ------------------------------------------------------------------ in the loader (output="bytes")
def _bytes_loader(ds, **kw):
    from fastload.loader.reinforced import ReinforcedLoader

    return ReinforcedLoader(ds, batch_size=5, shuffle=True, image_size=24, seed=2, output="bytes", **kw)


def _check_decodes(tokens, lengths, images, fmt, quality=95):
    for i in range(len(images)):
        got = _decode(tokens[i, :int(lengths[i])].numpy().tobytes()).astype(np.int64)
        want = images[i].permute(1, 2, 0).numpy().astype(np.int64)
        if fmt == "jpeg":  # as close as Pillow's libjpeg at the same quality
            ref = io.BytesIO()
            Image.fromarray(want.astype(np.uint8)).save(ref, format="JPEG", quality=quality)
            ref_err = np.abs(_decode(ref.getvalue()).astype(np.int64) - want).mean()
            assert np.abs(got - want).mean() <= 1.1 * ref_err + 0.5
        else:
            assert np.array_equal(got, want)
        assert (tokens[i, int(lengths[i]):] == 0).all()  # zero padding past the end


@pytest.mark.parametrize("fmt", ["png", "tiff", "jpeg"])
@pytest.mark.parametrize("workers", [0, 2])
def test_loader_bytes_decode_to_the_replayed_images(ds, fmt, workers):
    """The render stage re-encodes the replayed image: decoding the tokens gives the pixels
    the images-mode loader (same seed) renders, byte-exact for PNG/TIFF."""
    L = _bytes_loader(ds, encode=fmt, quality=95, num_workers=workers)
    n = 0
    for out, plain in zip(L, _loader(ds)):
        assert out.tokens.dtype == torch.uint8 and out.lengths.dtype == torch.int64
        assert out.tokens.shape == (5 if n < 2 else 3, int(out.lengths.max()))
        assert torch.equal(out.batch[0], plain[0]) and torch.equal(out.batch[1], plain[1])
        assert torch.equal(out.batch[2], plain[2])
        _check_decodes(out.tokens, out.lengths, plain[0], fmt)
        n += 1
    assert n == len(L) == 3
    # the same function as the BytesBatches wrapper: identical tokens
    from fastload.bytes import BytesBatches

    for a, b in zip(_bytes_loader(ds, encode=fmt, quality=95), BytesBatches(_loader(ds), encode=fmt, quality=95)):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)


def test_loader_bytes_stored_bucketed_and_resume(ds):
    # encode="stored": the stored file bytes as they are, nothing rendered
    L = _bytes_loader(ds, encode="stored")
    for t, out in enumerate(L):
        assert out.batch[0] is None
        for i, r in enumerate(L.batch_plan(0, t).indices):
            assert out.tokens[i, :int(out.lengths[i])].numpy().tobytes() == bytes(ds.image_bytes(int(r)))
    # bucket=True: groups padded to their own longest row, the same bytes
    flat = list(_bytes_loader(ds, encode="png"))
    for f, b in zip(flat, _bytes_loader(ds, encode="png", bucket=True)):
        assert b.tokens is None and torch.equal(b.lengths, f.lengths)
        assert sorted(p for g in b.groups for p in g.positions.tolist()) == list(range(len(f.lengths)))
        for g in b.groups:
            assert g.tokens.shape[1] == int(g.lengths.max())
            for p, row in zip(g.positions.tolist(), g.tokens):
                n = int(f.lengths[p])
                assert torch.equal(row[:n], f.tokens[p, :n])
    # exact resume, and across epochs
    for workers in (0, 2):
        a = _bytes_loader(ds, encode="jpeg", quality=80, num_workers=workers)
        a.set_epoch(1)
        it = iter(a)
        next(it)
        st = a.state_dict()
        want = list(it)
        b = _bytes_loader(ds, encode="jpeg", quality=80)
        b.load_state_dict(st)
        got = list(b)
        assert len(got) == len(want) == 2
        assert all(torch.equal(x.tokens, y.tokens) and torch.equal(x.batch[1], y.batch[1])
                   for x, y in zip(got, want))


def test_loader_bytes_bad_arguments(ds):
    from fastload.loader.reinforced import ReinforcedLoader

    with pytest.raises(ValueError, match="output must be"):
        ReinforcedLoader(ds, batch_size=2, image_size=24, output="tokens")
    with pytest.raises(ValueError, match="needs encode="):
        _bytes_loader(ds)
    with pytest.raises(ValueError, match="encode must be one of"):
        _bytes_loader(ds, encode="gif")
    with pytest.raises(ValueError, match="quality must be an int in"):
        _bytes_loader(ds, encode="jpeg", quality=0)
    with pytest.raises(ValueError, match="uint8 pixels"):
        _bytes_loader(ds, encode="png", dtype=torch.float32)
    with pytest.raises(ValueError, match="replay='cpu'"):
        _bytes_loader(ds, encode="png", replay="device")
    with pytest.raises(ValueError, match="apply to output='bytes'"):
        _loader(ds, encode="png")
    with pytest.raises(ValueError, match="bucket must be"):
        _bytes_loader(ds, encode="png", bucket="yes")


def test_loader_bytes_image_text(tmp_path):
    """Image-text data: the bytes come with the ImageTextBatch (captions, stored embeddings)."""
    from fastload.format.reader import ReinforcedDataset
    from fastload.loader.reinforced import ImageTextBatch, ReinforcedLoader
    from _ddp_loader_worker import write_dataset

    tds = ReinforcedDataset(write_dataset(str(tmp_path / "t"), n=7, kind="image_text"))
    kw = dict(batch_size=3, shuffle=True, seed=1, image_size=16)
    for out, plain in zip(ReinforcedLoader(tds, output="bytes", encode="tiff", **kw),
                          ReinforcedLoader(tds, dtype=torch.uint8, **kw)):
        assert isinstance(out.batch, ImageTextBatch) and out.batch.captions == plain.captions
        assert torch.equal(out.batch.image_emb, plain.image_emb)
        _check_decodes(out.tokens, out.lengths, plain.images, "tiff")


_DDP_WORKER = r'''
import json, os, sys
import torch, torch.distributed as dist
from fastload.format.reader import ReinforcedDataset
from fastload.loader.reinforced import ReinforcedLoader
rank, path, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
L = ReinforcedLoader(ReinforcedDataset(path), batch_size=3, shuffle=True, seed=2, image_size=24, num_workers=2,
                     output="bytes", encode="png", check_ranks=True)
res = [dict(lengths=b.lengths.tolist(), width=b.tokens.shape[1], labels=b.batch[1].tolist()) for b in L]
json.dump(res, open(out, "w"))
dist.destroy_process_group()
'''


@pytest.mark.slow  # two spawned gloo processes
def test_loader_bytes_two_gloo_ranks_with_check_ranks(ds, tmp_path):
    """Under DDP with check_ranks=True the ranks agree on (step, rows) although their token
    widths differ; each rank's bytes are those of its elastic slice."""
    import json
    import os
    import socket
    import subprocess
    import sys

    from fastload.loader.reinforced import ReinforcedLoader

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "w.py"
    script.write_text(_DDP_WORKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                       os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, str(script), str(r), ds.path, str(port),
                               str(tmp_path / f"r{r}.json")], env=env) for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    res = [json.load(open(tmp_path / f"r{r}.json")) for r in range(2)]
    widths = set()
    for r in range(2):
        want = [dict(lengths=b.lengths.tolist(), width=b.tokens.shape[1], labels=b.batch[1].tolist())
                for b in ReinforcedLoader(ds, batch_size=3, shuffle=True, seed=2, image_size=24, rank=r,
                                          world_size=2, output="bytes", encode="png")]
        assert res[r] == want
        widths.add(tuple(b["width"] for b in want))
    assert len(widths) == 2  # the ranks' padded widths differ, and check_ranks did not object
