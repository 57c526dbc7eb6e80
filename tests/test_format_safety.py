"""Bad data at the edges (issue 10, items 3, 4, 6, 12, 13): bounded decompression, verified
reads by default, validated shards, one error type naming the file, inspect's exit codes,
decompose never deleting its input."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import tracemalloc
import warnings

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _corpus import flip_bit, make_dataset, read_everything  # noqa: E402

from fastload.format import manifest as mf  # noqa: E402
from fastload.format.manifest import CorruptDataError  # noqa: E402
from fastload.format.reader import ReinforcedDataset, _Shard  # noqa: E402
from fastload.format import shards as S  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("small") / "ds"))


def _copy(src, tmp_path, name="ds"):
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- item 3
def _forge_frame(payload: bytes, declared: int) -> bytes:
    """A real zstd frame of ``payload`` whose header declares ``declared`` content bytes."""
    import zstandard

    f = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(payload)
    fhd = f[4]
    single, did, fcs_flag = (fhd >> 5) & 1, fhd & 3, fhd >> 6
    hdr_len = 5 + (0 if single else 1) + (0, 1, 2, 4)[did] + ((1 if single else 0), 2, 4, 8)[fcs_flag]
    window = 0x28 if single else f[5]  # 2^15: a 32 KiB window, as the payload needs
    return (f[:4] + bytes([0xC0 | (fhd & 0x04), window]) + int(declared).to_bytes(8, "little") + f[hdr_len:])


def _peak_alloc(fn):
    tracemalloc.start()
    try:
        try:
            fn()
        except ValueError as e:
            err = e
        else:
            err = None
        return tracemalloc.get_traced_memory()[1], err
    finally:
        tracemalloc.stop()


def test_forged_zstd_frame_is_rejected_before_decompressing():
    import zstandard

    payload = np.random.default_rng(0).bytes(32 * 1024)
    frame = _forge_frame(payload, 1 << 30)
    assert zstandard.frame_content_size(frame) == 1 << 30 and len(frame) < 40 * 1024
    peak, err = _peak_alloc(lambda: S._decompress(S.CODEC_ZSTD, frame, 32 * 1024, "augs"))
    assert isinstance(err, CorruptDataError) and "declares 1073741824" in str(err)
    assert peak < 4 << 20, f"{peak} bytes allocated"
    # a frame that declares no size is refused too (the writer always declares it)
    nosize = zstandard.ZstdCompressor(write_content_size=False).compress(payload)
    with pytest.raises(CorruptDataError, match="declares no size"):
        S._decompress(S.CODEC_ZSTD, nosize, len(payload), "augs")


def test_forged_row_header_cannot_size_an_allocation():
    """The issue's case: a 32 KB augs blob whose header and part sizes announce 2^26 records
    (1 GiB for the first plane group) and whose frame declares that size."""
    frame = _forge_frame(np.random.default_rng(1).bytes(32 * 1024), 1 << 30)
    n = 1 << 26  # crop + pcrop: 16 bytes per record -> 1 GiB
    body = S._PART.pack(S.CODEC_ZSTD, 16 * n, len(frame)) + frame
    blob = S._AUG_HDR.pack(S.BLOB_VERSION, 0, 0, 0, n, len(body)) + body
    for expected_n in (None, 4):
        peak, err = _peak_alloc(lambda: S.decode_augs(blob, (10, 10), (8, 8), None, expected_n))
        assert isinstance(err, CorruptDataError), err
        assert peak < 4 << 20, f"{peak} bytes allocated (expected_n={expected_n})"
    peak, err = _peak_alloc(lambda: S.decode_augs_batch([blob], [0], np.array([[10, 10]]), (8, 8), None, 4))
    assert isinstance(err, CorruptDataError) and peak < 4 << 20
    # targets: a vocabulary longer than the n * k ids it indexes is refused before decompressing
    tb = bytearray(S.encode_targets(np.arange(12).reshape(4, 3), np.full((4, 3), 0.1)))
    tb[12:16] = (1 << 30).to_bytes(4, "little")  # vocabulary length field
    peak, err = _peak_alloc(lambda: S.decode_targets(bytes(tb)))
    assert isinstance(err, CorruptDataError) and peak < 4 << 20


# ----------------------------------------------------------------------------- item 4
def _label_offset(path: str, row: int) -> int:
    """File offset of the stored int64 label of ``row``."""
    import pyarrow as pa

    with open(path, "rb") as f:
        data = f.read()
    buf = pa.py_buffer(data)
    col = pa.ipc.open_file(pa.BufferReader(buf)).get_batch(0).column("label")
    return col.buffers()[1].address - buf.address + 8 * (col.offset + row)


def test_flipped_label_bit_is_an_error_by_default(small, tmp_path):
    ds0 = ReinforcedDataset(small)
    d = _copy(small, tmp_path)
    shard = os.path.join(d, "shard-00000.arrow")
    flip_bit(shard, _label_offset(shard, 1), 0)
    ds = ReinforcedDataset(d)  # opening reads the label column (range-checked only)
    assert ds.labels[1] != ds0.labels[1]  # the flipped label is in the array ...
    with pytest.raises(CorruptDataError, match="shard-00000.arrow.*sha256") as ei:
        ds.gather([1], [0])  # ... but no sample of that shard is ever served
    assert ei.value.path == shard
    with pytest.raises(CorruptDataError, match="shard-00000.arrow"):
        ds.record(1)
    assert ReinforcedDataset(d, verify="off").gather([1], [0])[1].shape == (1,)  # documented opt-out


@pytest.mark.parametrize("stride", [5])
def test_a_flipped_bit_anywhere_in_a_shard_is_an_error_naming_it(small, tmp_path, stride):
    d = _copy(small, tmp_path)
    shard = os.path.join(d, "shard-00000.arrow")
    orig = open(shard, "rb").read()
    for pos in range(0, len(orig), stride):
        bit = pos % 8
        with open(shard, "wb") as f:
            f.write(orig)
        flip_bit(shard, pos, bit)
        with pytest.raises(CorruptDataError) as ei:
            read_everything(ReinforcedDataset(d))
        assert ei.value.path == shard, (pos, bit, ei.value)


def test_verify_modes_hash_lazily_once_per_shard(small, monkeypatch):
    calls = []
    real = _Shard.sha256
    monkeypatch.setattr(_Shard, "sha256", lambda self: calls.append(os.path.basename(self.path)) or real(self))
    ds = ReinforcedDataset(small)
    assert ds.verify_mode == "lazy" and calls == []  # nothing hashed at open
    ds.gather([0, 1], [0, 0])
    assert calls == ["shard-00000.arrow"]
    ds.gather([0, 2, 4], [1, 1, 1])
    ds.record(3)
    assert calls == ["shard-00000.arrow", "shard-00001.arrow"]  # each shard once
    import copy

    ds2 = copy.deepcopy(ds)  # a DataLoader worker (same __getstate__) trusts what this process checked
    ds2.gather([0, 4], [0, 0])
    assert len(calls) == 2
    calls.clear()
    ReinforcedDataset(small, verify="open")
    assert sorted(calls) == ["shard-00000.arrow", "shard-00001.arrow"]
    calls.clear()
    ReinforcedDataset(small, verify=True)
    assert len(calls) == 2
    calls.clear()
    for off in ("off", False):
        read_everything(ReinforcedDataset(small, verify=off))
    assert calls == []
    with pytest.raises(ValueError, match="verify"):
        ReinforcedDataset(small, verify="sometimes")


def test_shard_size_is_checked_at_open(small, tmp_path):
    d = _copy(small, tmp_path)
    with open(os.path.join(d, "shard-00001.arrow"), "ab") as f:
        f.write(b"\0")
    with pytest.raises(CorruptDataError, match="shard-00001.arrow.*manifest says"):
        ReinforcedDataset(d, verify="off")


# ----------------------------------------------------------------------------- item 12
def _offsets_offset(path: str, column: str) -> int:
    import pyarrow as pa

    with open(path, "rb") as f:
        data = f.read()
    buf = pa.py_buffer(data)
    col = pa.ipc.open_file(pa.BufferReader(buf)).get_batch(0).column(column)
    return col.buffers()[1].address - buf.address


@pytest.mark.parametrize("column", ["key", "augs", "targets", "image"])
def test_corrupt_offsets_are_an_error_not_a_crash(small, tmp_path, column):
    """Bit flips and forged values in a column's offsets (verify off: the structure checks
    alone) end in CorruptDataError; run in a child so a segfault fails the test cleanly."""
    d = _copy(small, tmp_path)
    shard = os.path.join(d, "shard-00000.arrow")
    base = _offsets_offset(shard, column)
    script = textwrap.dedent(f"""
        import shutil, struct, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from _corpus import read_everything
        from fastload.format.reader import ReinforcedDataset
        from fastload.format.manifest import CorruptDataError
        shard, base = {shard!r}, {base}
        orig = open(shard, "rb").read()
        for slot in range(4):
            for value in (-1, 1, 7, 1 << 20, 1 << 40, -(1 << 62), 2**63 - 1):
                b = bytearray(orig)
                b[base + 8 * slot: base + 8 * slot + 8] = struct.pack("<q", value)
                open(shard, "wb").write(bytes(b))
                try:
                    read_everything(ReinforcedDataset({d!r}, verify="off"))
                    print(slot, value, "served")
                except CorruptDataError as e:
                    assert e.path == shard, e
                    print(slot, value, "corrupt")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = [line.split() for line in r.stdout.splitlines()]
    assert len(out) == 28
    # negative, decreasing or out-of-buffer offsets are always detected; small in-bounds
    # monotonic changes are valid Arrow (served as other bytes: what verify="off" accepts)
    assert all(o == "corrupt" for _, v, o in out if int(v) not in (1, 7)), out


# ----------------------------------------------------------------------------- item 13
def _manifest(d):
    with open(os.path.join(d, mf.MANIFEST)) as f:
        return json.load(f)


def _write(d, m):
    with open(os.path.join(d, mf.MANIFEST), "w") as f:
        json.dump(m, f)


MANIFEST_CASES = [
    ("num_augmentations", "x"), ("num_augmentations", 10**12), ("topk", None), ("num_rows", -3),
    ("shards", {"a": 1}), ("shards", [7]), ("replay", []), ("num_classes", "ten"), ("num_classes", 2),
    ("policy", 3), ("policy", {"nope": 1}), ("num_rows", 99), ("replay.image_size", [0, 32]),
    ("shards.0.rows", 2.5), ("shards.0.sha256", 5), ("shards.0.file", "../x"), ("shards.0.bytes", None),
    ("shards.0.first_row", 1), ("shards.1.index", 0), ("shards.0.file", "nope.arrow"),
    # a string is true in Python: what import-datacomp once wrote ("as ... render_batch")
    ("replay.dct_scale", "as fastload.replay.native.render_batch"), ("replay.dct_scale", 1),
]


@pytest.mark.parametrize("field,value", MANIFEST_CASES)
def test_every_manifest_corruption_is_one_error_type(small, tmp_path, field, value):
    d = _copy(small, tmp_path)
    m = _manifest(d)
    parts = field.split(".")
    tgt = m
    for p in parts[:-1]:
        tgt = tgt[int(p)] if isinstance(tgt, list) else tgt[p]
    tgt[int(parts[-1]) if isinstance(tgt, list) else parts[-1]] = value
    _write(d, m)
    with pytest.raises(CorruptDataError) as ei:
        ds = ReinforcedDataset(d)
        ds.policy
        read_everything(ds)
    assert os.path.basename(ei.value.path) in (mf.MANIFEST, "shard-00000.arrow", "nope.arrow"), ei.value


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", "null", "\xff\xfe", "[" * 100000],
                         ids=["empty", "open", "list", "null", "latin1", "deep"])
def test_unparsable_manifest_is_corrupt_data(small, tmp_path, text):
    d = _copy(small, tmp_path)
    with open(os.path.join(d, mf.MANIFEST), "w", encoding="latin-1") as f:
        f.write(text)
    with pytest.raises(CorruptDataError, match="manifest.json"):
        ReinforcedDataset(d)


def test_corrupt_targets_never_reach_the_loss(tmp_path):
    """Quantized-probability decode: ids beyond num_classes and NaN/inf probabilities are
    errors naming the shard and row; no RuntimeWarning on any path."""
    d = make_dataset(str(tmp_path / "ds"), classes=40, label_classes=12)
    m = _manifest(d)
    m["num_classes"] = 12  # labels fit, stored target ids go up to 39
    _write(d, m)
    ds = ReinforcedDataset(d, verify="off")
    with pytest.raises(CorruptDataError, match="shard-00000.arrow: row 0: stored targets"):
        ds.gather([0], [0])
    with pytest.raises(CorruptDataError, match="shard-00001.arrow: row 1: stored targets"):
        ds.target(4, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        blob = S.encode_targets(np.array([[1, 2]]), np.array([[np.inf, np.nan]]))
        ids, probs = S.decode_targets(blob)  # the codec is lossless: the reader judges values
        ds = ReinforcedDataset(make_dataset(str(tmp_path / "ok")), verify="off")
        with pytest.raises(CorruptDataError, match="row 0"):
            ds._check_targets(ids, probs, lambda b: (ds._open.get(0) or ds._shard(0), b))


# ----------------------------------------------------------------------------- inspect
def _inspect(d):
    r = subprocess.run([sys.executable, "-m", "fastload.tools.inspect", d], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    return r.returncode, r.stdout, r.stderr


def test_inspect_fails_with_one_line_on_corrupt_and_unservable_data(small, tmp_path):
    assert _inspect(small)[0] == 0
    variants = {
        "num_classes=2": lambda d, m: m.update(num_classes=2),
        "complete=false": lambda d, m: m.update(complete=False),
        "num_rows=0": lambda d, m: (m.update(num_rows=0, shards=[]), os.remove(os.path.join(d, "shard-00000.arrow"))),
        "num_augmentations=5": lambda d, m: m.update(num_augmentations=5),
        "topk=2": lambda d, m: m.update(topk=2),
        "bad policy": lambda d, m: m.update(policy=[1]),
        "missing replay": lambda d, m: m.pop("replay"),
        "garbage": lambda d, m: open(os.path.join(d, mf.MANIFEST), "w").write("{]"),
    }
    for name, fn in variants.items():
        d = _copy(small, tmp_path, name.replace("=", "_").replace(" ", "_"))
        m = _manifest(d)
        fn(d, m)
        if name != "garbage":
            _write(d, m)
        code, out, err = _inspect(d)
        assert code != 0, (name, out, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (name, err)
    d = _copy(small, tmp_path, "flip")
    flip_bit(os.path.join(d, "shard-00001.arrow"), 100, 3)
    code, out, err = _inspect(d)
    assert code == 1 and "BAD SHARD shard-00001.arrow" in out


# ----------------------------------------------------------------------------- item 6
def test_decompose_text_overwrite_keeps_its_input(tmp_path):
    from fastload.tokens.decompose import decompose, main

    out = tmp_path / "out"
    texts = out / "texts"  # the input even lies inside the output folder
    texts.mkdir(parents=True)
    for i in range(5):
        (texts / f"{i}.txt").write_bytes(bytes(range(32, 120)) * (i + 3))
    args = [str(texts), str(out), "--text", "*.txt", "--min-bucket", "4", "--max-bucket", "7"]
    assert main(args) == 0
    first = json.loads((out / "manifest.json").read_text())
    assert main(args + ["--overwrite"]) == 0
    again = json.loads((out / "manifest.json").read_text())
    assert again["buckets"] == first["buckets"] and again["documents"] == 5
    assert sorted(os.listdir(texts)) == [f"{i}.txt" for i in range(5)]
    assert not [f for f in os.listdir(out) if f.startswith("_tokens")]  # temporary tokens removed
    # an input file inside the output folder survives an overwrite too
    toks = np.arange(400, dtype=np.int32) % 200
    np.savez(out / "in.npz", tokens=toks, offsets=np.array([0, 200, 400]))
    for _ in range(2):
        decompose(str(out / "in.npz"), str(out), 4, 7, vocab_size=257, eot_id=256, progress=False, overwrite=True)
    assert (out / "in.npz").exists() and sorted(os.listdir(texts)) == [f"{i}.txt" for i in range(5)]


def test_stored_pixel_outside_its_image_is_an_error_not_a_wrapped_value():
    """Found by the blob fuzzer: a pixel-mode box beyond its grid wrapped around in uint16
    (vectorized decoders) or raised OverflowError (single record)."""
    rng = np.random.default_rng(5)
    from _corpus import records

    a = records(rng, 8, (100, 100), np.array([[100, 100]]))
    blob = S.encode_augs(a, (100, 100), (32, 32), np.array([[100, 100]]))
    with pytest.raises(CorruptDataError, match="crop pixel outside"):
        S.decode_augs(blob, (10, 10), (32, 32), np.array([[100, 100]]))
    with pytest.raises(CorruptDataError, match="pixel outside"):
        for j in range(8):
            S.decode_aug_at(blob, j, (10, 10), (32, 32), np.array([[100, 100]]))
    with pytest.raises(CorruptDataError, match="pixel outside"):
        S.decode_augs_batch([blob] * 8, np.arange(8), np.full((8, 2), 10), (32, 32), np.array([[100, 100]]), 8)


def test_loader_never_serves_a_sample_of_a_changed_shard(tmp_path):
    """End to end: a flipped bit inside a stored JPEG (a valid image either way, often)
    stops ReinforcedLoader with the error naming the shard, with on_error="skip" too: a
    corrupt file is not a bad image to skip."""
    import fastload
    from fastload.datasets import make_images, make_teacher
    from fastload.sample.policy import AugmentPolicy

    imgs = str(tmp_path / "imgs")
    make_images(imgs, 6)
    out = str(tmp_path / "out")
    fastload.reinforce(imgs, out=out, teacher=make_teacher(5), num_classes=5, num_augmentations=2, topk=2, image_size=32,
                       batch_size=8, shard_size=3, progress=False, policy=AugmentPolicy(size=(32, 32)))
    shard = os.path.join(out, "shard-00001.arrow")
    flip_bit(shard, os.path.getsize(shard) // 2, 2)
    for on_error in ("raise", "skip"):
        loader = fastload.ReinforcedLoader(fastload.ReinforcedDataset(out), batch_size=2, image_size=32,
                                           on_error=on_error, shuffle=False)
        with pytest.raises(CorruptDataError, match="shard-00001.arrow"):
            for _ in loader:
                pass
