"""The record schema (fastload/sample/schema.py) and everything derived from it: the generated
C header, the layout hashes compared when the native library loads, the ctypes options
struct, the field-tagged extension storage (with the bounded codec), the manifest's op table."""
import ctypes
import io
import json
import os
import struct
import tracemalloc

import numpy as np
import pytest

from fastload.format.manifest import CorruptDataError
from fastload.sample import params as P
from fastload.sample import schema as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_committed_header_is_the_generated_one():
    with open(os.path.join(ROOT, S.HEADER)) as f:
        committed = f.read()
    assert committed == S.render_header(), \
        "csrc/include/fl_aug.h differs from the schema: run `python -m fastload.sample.schema --write`"
    assert "GENERATED" in committed.splitlines()[0]


def test_header_asserts_every_field_offset_and_size():
    text = S.render_header()
    for rec in S.RECORDS:
        offs = rec.offsets()
        for f in rec.fields:
            assert f"static_assert(offsetof({rec.cname}, {f.name}) == {offs[f.name]}," in text
        assert f"static_assert(sizeof({rec.cname}) == {rec.size}," in text
        assert f"k{rec.cname}LayoutHash = {rec.layout_hash()}ULL" in text


def test_check_mode_of_the_generator_reports_a_hand_edit(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "csrc" / "include"
    fake.mkdir(parents=True)
    (fake / "fl_aug.h").write_text(S.render_header().replace("kMaxRA = 4", "kMaxRA = 5"))
    monkeypatch.setattr(S, "_root", lambda: str(tmp_path))
    assert S.main([]) == 1 and "OUT OF DATE" in capsys.readouterr().out
    assert S.main(["--write"]) == 0 and S.main([]) == 0


def test_numpy_dtypes_are_the_schema_layout():
    # the on-disk sizes every existing dataset was written with
    assert P.AUG_DTYPE.itemsize == 47 and P.AUG_EXT_DTYPE.itemsize == 65
    for rec, dt in ((S.AUG, P.AUG_DTYPE), (S.AUG_EXT, P.AUG_EXT_DTYPE)):
        offs = rec.offsets()
        assert dt.names == tuple(f.name for f in rec.fields)
        for f in rec.fields:
            assert dt.fields[f.name][1] == offs[f.name]
    e = P.empty(2)
    assert e["crop"].tolist() == [[0, 0, S.Q, S.Q]] * 2 and (e["ra_ops"] == S.RA_NONE).all()
    assert (e["partner"] == -1).all() and (P.empty_ext(3)["pra_ops"] == S.RA_NONE).all()


def test_layout_hash_changes_with_any_layout_change():
    import dataclasses

    base = S.AUG_EXT.layout_hash()
    f = S.AUG_EXT.fields
    variants = [f[:-1], f + (S.Field("new", "u1"),), (dataclasses.replace(f[0], code="<u2"),) + f[1:],
                (dataclasses.replace(f[1], count=3),) + f[2:], (f[1], f[0]) + f[2:]]
    hashes = {dataclasses.replace(S.AUG_EXT, fields=v).layout_hash() for v in variants}
    assert base not in hashes and len(hashes) == len(variants)


def test_the_library_is_checked_for_every_record_kind():
    from fastload.replay import native

    lib = native._lib()  # loads and checks
    assert [lib.fl_replay_layout_hash(k) for k in range(len(S.RECORDS))] == [r.layout_hash() for r in S.RECORDS]
    assert lib.fl_replay_layout_hash(len(S.RECORDS)) == 0

    class Stale:
        _name = "/x/_replay.so"

        class fl_replay_layout_hash:  # noqa: N801 - stands in for the ctypes function
            argtypes = restype = None

            def __new__(cls, kind):
                return S.RECORDS[kind].layout_hash() + (kind == 1)

    with pytest.raises(ImportError, match=r"/x/_replay.so was built with another layout of AugExt"):
        native._check_layout(Stale)


def test_ctypes_options_struct_matches_the_schema():
    from fastload.replay import native

    offs = S.REPLAY_OPTIONS.offsets()
    assert ctypes.sizeof(native._Options) == S.REPLAY_OPTIONS.size
    for f in S.REPLAY_OPTIONS.fields:
        assert getattr(native._Options, f.name).offset == offs[f.name]
    bad = S.Record("replay_options", "X", False, (S.Field("a", "<i4"), S.Field("b", "<i8")))
    assert bad.offsets() == {"a": 0, "b": 8} and bad.size == 16  # natural alignment, as the C compiler


def test_options_are_validated_by_the_library():
    import torch

    from fastload.replay import native

    img = np.zeros((8, 8, 3), np.uint8)
    out = torch.empty(1, 3, 4, 4)
    for kw, msg in ((dict(ra_semantics="v9"), "ra_semantics"), (dict(_decoder_flags=64), "_decoder_flags")):
        with pytest.raises(ValueError, match=msg):
            native.render_batch([img], P.empty(1), out, **kw)
    lib = native._lib()
    keep = []
    desc = native._describe([img], keep, "sources")
    rec = P.empty(1)
    bad = ctypes.c_int64(-1)
    good = dict(out_bytes=out.numel() * 4, out_h=4, out_w=4, dct_rule=1, ra_num_bins=31, std=(1.0, 1.0, 1.0))
    for change, msg in ((dict(ra_semantics=7), b"semantics"), (dict(dct_rule=9), b"DCT rule"),
                        (dict(decoder_flags=16), b"decoder flags"), (dict(interpolation=3), b"interpolation"),
                        (dict(ra_num_bins=1), b"ra_num_bins"), (dict(std=(1.0, 0.0, 1.0)), b"std")):
        opt = native._Options(**{**good, **change})
        assert lib.fl_replay(desc.ctypes.data, None, rec.ctypes.data, None, 1, out.data_ptr(), ctypes.byref(opt),
                             ctypes.byref(bad)) != 0
        assert msg in lib.fl_last_error(), (change, lib.fl_last_error())
    opt = native._Options(**good)
    assert lib.fl_replay(desc.ctypes.data, None, rec.ctypes.data, None, 1, out.data_ptr(), ctypes.byref(opt),
                         ctypes.byref(bad)) == 0


def test_dequantization_rule_is_one_rule():
    from fastload.format import shards
    from fastload.tools import export

    rng = np.random.default_rng(0)
    q = rng.integers(0, S.Q + 1, 2000)
    n = rng.integers(1, 70000, 2000)
    want = [(int(a) * int(b) + S.Q // 2) // S.Q for a, b in zip(q, n)]
    assert [S.dq(a, b) for a, b in zip(q, n)] == want
    assert S.dq_array(q, n).tolist() == want and shards._dq(q, n).tolist() == want
    boxes = rng.integers(0, S.Q + 1, (50, 4)).astype(np.uint16)
    hw = rng.integers(1, 3000, (50, 2))
    got = np.stack(export._pixels(boxes.astype(np.int64), hw), 1)
    assert got.tolist() == [list(P.box_to_pixels(b, int(h), int(w))) for b, (h, w) in zip(boxes, hw)]


def test_derived_tables():
    from fastload.format import shards
    from fastload.kernels import replay as K

    assert shards._GROUPS == S.codec_groups() and sorted(shards._ORDER) == sorted(P.AUG_DTYPE.names)
    assert shards._BOX_FIELDS == ("crop", "erase", "pcrop", "cutmix")  # the pixel-mode bits of stored blobs
    assert P.RA_OPS[:14] == ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
                             "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
    assert S.family_ops("v1") == S.family_ops("v2") == tuple(range(14))
    prm, _ = K.pack_params(P.empty(1))
    assert prm.shape == (1, K.NPARAM) and prm[0, K._CROP:K._CROP + 4].tolist() == [0, 0, S.Q, S.Q]
    assert prm[0, K._PROW] == 0 and K._SROW == K.NPARAM - 1 and prm[0, K._PMID] == -1
    # the extension fields the kernel reads follow the base record's, at the schema's offsets
    assert K._EXT == K._CUTMIX + 4 and K._PERASE == K._EXT + 1 and K._PROW == K._PERASE + 4
    e = P.empty_ext(1)
    e["ext"], e["perase"] = P.EXT_PARTNER_AUG | P.EXT_ERASE_BLACK, (1, 2, 3, 4)
    x, _ = K._params_np(P.empty(1), None, ext=e)
    assert x[0, K._EXT] == e["ext"][0] and x[0, K._PERASE:K._PERASE + 4].tolist() == [1, 2, 3, 4]


# ------------------------------------------------------------------- augs_ext storage
def _ext_sample(n=6):
    e = P.empty_ext(n)
    e["ext"][1] = P.EXT_RA_FLOAT | P.EXT_PARTNER_AUG
    e["ra_vals"][1] = (0.5, -3.25, 7.0, 0)
    e["pra_ops"][1, :2] = (3, 9)
    e["pra_mags"][1, :2] = (-4, 20)
    e["perase"][4] = (100, 200, 3000, 4000)
    e["mixup_f"][2] = 0.123456789
    return e


def _encode_v1(ext):
    """The first release's augs_ext blob (frozen here: what datasets imported then hold)."""
    import zstandard

    n, size = len(ext), 65
    raw = np.ascontiguousarray(ext.view(np.uint8).reshape(n, size).T).tobytes()
    z = zstandard.ZstdCompressor(level=12, write_content_size=True).compress(raw)
    return struct.pack("<BBHII", 1, 1, 0, n, len(raw)) + z


def test_ext_blob_is_field_tagged_and_round_trips():
    from fastload.format.record_ext import decode_ext, encode_ext

    e = _ext_sample()
    blob = encode_ext(e)
    assert decode_ext(blob, expected_n=6).tobytes() == e.tobytes()
    # only the fields that differ from their default are stored
    assert b"ra_vals" in blob and b"mixup_f" in blob and b"cutmix_lam" not in blob
    assert encode_ext(P.empty_ext(4)) == b""
    # the first release's blobs still read, bit for bit
    assert decode_ext(_encode_v1(e), expected_n=6).tobytes() == e.tobytes()


def test_ext_blob_missing_and_unknown_fields():
    from fastload.format import record_ext as R

    e = _ext_sample()
    blob = R.encode_ext(e)
    # a blob without a field (an older writer) reads it as its default
    one = P.empty_ext(6)
    one["ra_vals"] = e["ra_vals"]
    assert R.decode_ext(R.encode_ext(one), 6).tobytes() == one.tobytes()
    # a field this fastload does not know is an error naming it
    forged = blob.replace(b"cutmix_lam", b"zz").replace(b"mixup_f", b"future!")
    with pytest.raises(CorruptDataError, match="'future!' is unknown"):
        R.decode_ext(forged, 6)
    wrong_type = blob.replace(b"\x07mixup_f\x03<f8", b"\x07mixup_f\x03<f4")
    with pytest.raises(CorruptDataError, match="stored as <f4"):
        R.decode_ext(wrong_type, 6)
    with pytest.raises(CorruptDataError, match="expected 5 records"):
        R.decode_ext(blob, expected_n=5)
    with pytest.raises(CorruptDataError, match="version 9"):
        R.decode_ext(b"\x09" + blob[1:], 6)
    for cut in (3, 12, 20, len(blob) - 1):
        with pytest.raises(CorruptDataError):
            R.decode_ext(blob[:cut], 6)


def _zeros_frame(nbytes: int) -> bytes:
    """A small zstd frame that declares (and holds) ``nbytes`` zeros."""
    import zstandard

    buf = io.BytesIO()
    with zstandard.ZstdCompressor(level=1).stream_writer(buf, size=nbytes, closefd=False) as w:
        chunk = bytes(1 << 22)
        for _ in range(nbytes // len(chunk)):
            w.write(chunk)
        w.write(bytes(nbytes % len(chunk)))
    return buf.getvalue()


@pytest.fixture(scope="module")
def gib_frame():
    return _zeros_frame(1 << 30)


def _peak_during(fn):
    tracemalloc.start()
    try:
        with pytest.raises(CorruptDataError) as ei:
            fn()
        return tracemalloc.get_traced_memory()[1], ei.value
    finally:
        tracemalloc.stop()


def test_forged_ext_blob_fails_without_allocating(gib_frame):
    # Issue 18: a few KB of augs_ext declared 1 GiB and zstandard allocated it (it ignores
    # max_output_size when the frame declares its size). Every form now fails bounded.
    from fastload.format.record_ext import decode_ext, encode_ext

    assert len(gib_frame) < 64 * 1024
    n_big = (1 << 30) // 65
    v1_big = struct.pack("<BBHII", 1, 1, 0, n_big, n_big * 65) + gib_frame
    v1_small = struct.pack("<BBHII", 1, 1, 0, 1000, 65000) + gib_frame  # a plausible count, a huge frame
    # field-tagged: one tag (ra_vals, <f4 x 4) whose part is the 1 GiB frame
    tag = b"\x07ra_vals\x03<f4\x04"
    body = tag + struct.pack("<BII", 1, 1000 * 16, len(gib_frame)) + gib_frame
    v2 = struct.pack("<BBHII", 2, 0, 1, 1000, len(body)) + body
    assert encode_ext(_ext_sample(1000)).count(tag) == 1  # the tag encode_ext writes
    for blob, n, msg in ((v1_big, None, "at most"), (v1_big, n_big, "at most"), (v1_small, 1000, "declares"),
                         (v2, 1000, "declares")):
        peak, err = _peak_during(lambda: decode_ext(blob, expected_n=n))
        assert peak < 16 << 20, (msg, peak)
        assert "augs_ext" in str(err) and msg in str(err), str(err)


# ------------------------------------------------------------------- manifest op table
def test_manifest_op_table_is_validated_on_open(tmp_path):
    import shutil

    from fastload.format.reader import ReinforcedDataset

    src = os.path.join(ROOT, "tests", "data", "v1_dataset")
    for name, change, msg in (("renamed", lambda ops: ops[:3] + ["Warp"] + ops[4:], "op 3 is 'Warp'"),
                              ("longer", lambda ops: list(S.RA_OPS) + ["PILSolarize"], "PILSolarize unknown"),
                              ("not-a-list", lambda ops: "Identity", "must be a list")):
        root = tmp_path / name
        shutil.copytree(src, root)
        m = json.loads((root / "manifest.json").read_text())
        m["ra_ops"] = change(list(m.get("ra_ops", S.RA_OPS)))
        (root / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(CorruptDataError, match=msg) as ei:
            ReinforcedDataset(str(root))
        assert str(root) in str(ei.value)
    # a dataset without the table, or with a prefix of it, reads
    for name, change in (("none", None), ("prefix", lambda ops: ops[:14])):
        root = tmp_path / name
        shutil.copytree(src, root)
        m = json.loads((root / "manifest.json").read_text())
        if change is None:
            m.pop("ra_ops", None)
        else:
            m["ra_ops"] = change(list(S.RA_OPS))
        (root / "manifest.json").write_text(json.dumps(m))
        assert len(ReinforcedDataset(str(root))) > 0


def test_producers_write_the_op_table_from_the_schema(tmp_path):
    from fastload.format.writer import DatasetWriter

    w = DatasetWriter(str(tmp_path / "d"), {"kind": "classification", "num_augmentations": 1}, {"x": 1}, 1)
    assert w.manifest["ra_ops"] == list(S.RA_OPS)
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert m["ra_ops"] == list(S.RA_OPS)


def _dataset_with_ext(root, blobs_fn):
    """tests/data/v1_dataset copied to ``root`` as a v2 dataset whose augs_ext column is
    ``blobs_fn(num_rows, num_augmentations)``."""
    import shutil

    import pyarrow as pa

    from fastload.format.reader import ReinforcedDataset
    from fastload.format.writer import write_shard_file

    shutil.copytree(os.path.join(ROOT, "tests", "data", "v1_dataset"), root)
    m = json.loads((root / "manifest.json").read_text())
    entry = m["shards"][0]
    with pa.memory_map(str(root / entry["file"])) as f:
        batch = pa.ipc.open_file(f).get_batch(0)
    cols = {name: batch.column(name).to_pylist() for name in batch.schema.names}
    cols["augs_ext"] = blobs_fn(batch.num_rows, m["num_augmentations"])
    (root / entry["file"]).unlink()
    m["shards"][0] = {**entry, **write_shard_file(str(root), 0, cols, m["kind"])}
    m["schema_version"] = 2
    (root / "manifest.json").write_text(json.dumps(m))
    return ReinforcedDataset(str(root)), entry["file"]


def test_forged_ext_blob_in_a_dataset_names_the_shard_and_row(tmp_path, gib_frame):
    """As a user meets it: a v2 dataset whose augs_ext cell is the forged blob."""
    ds, shard = _dataset_with_ext(tmp_path / "ds", lambda rows, n: [
        struct.pack("<BBHII", 1, 1, 0, n, n * 65) + gib_frame] + [b""] * (rows - 1))
    assert ds.has_ext and (ds.augs_ext(1)["pra_ops"] == S.RA_NONE).all()
    peak, err = _peak_during(lambda: ds.augs_ext(0))
    assert peak < 16 << 20, peak
    assert shard in str(err) and "row 0" in str(err) and "declares" in str(err), str(err)


def test_export_has_the_extension_columns(tmp_path):
    import pyarrow.parquet as pq

    from fastload.tools.export import export_params
    from fastload.format.record_ext import encode_ext

    def blobs(rows, n):
        out = []
        for r in range(rows):
            e = P.empty_ext(n)
            e["ext"][0] = P.EXT_RA_FLOAT | P.EXT_PARTNER_AUG | P.EXT_ERASE_BLACK
            e["ra_vals"][0] = (1.5, -2.5, 3.0, 4.0)
            e["pra_ops"][0, :2] = (3, 11)
            e["pra_mags"][0, :2] = (-7, 5)
            e["pra_vals"][0, :2] = (-0.25, 120.0)
            e["perase"][n - 1] = (0, 0, 30000, 20000)
            e["cutmix_lam"][:] = 0.25 + r
            out.append(encode_ext(e))
        return out

    ds, _ = _dataset_with_ext(tmp_path / "ds", blobs)
    out = str(tmp_path / "p.parquet")
    assert export_params(ds, out, progress=False) == len(ds) * ds.num_augmentations
    rows = pq.read_table(out).to_pylist()
    for r in rows:
        rec, e = ds.augs(r["id"])[r["aug"]], ds.augs_ext(r["id"])[r["aug"]]
        used = rec["ra_ops"] != S.RA_NONE
        assert r["cutmix_lambda"] == e["cutmix_lam"] == 0.25 + r["id"]
        assert r["erase_black"] == (r["aug"] == 0) and r["cutmix_empty"] is False
        if r["aug"] == 0:
            assert r["ra_values"] == [1.5, -2.5, 3.0, 4.0][:int(used.sum())]
            assert r["partner_ra_ops"] == ["TranslateX", "Solarize"] and r["partner_ra_magnitudes"] == [-7, 5]
            assert r["partner_ra_values"] == [-0.25, 120.0]
        else:
            assert r["ra_values"] is None and r["partner_ra_ops"] is None and r["partner_ra_values"] is None
        if r["aug"] == ds.num_augmentations - 1:
            assert r["partner_erase_height"] == pytest.approx(30000 / S.Q)
        else:
            assert r["partner_erase_height"] is None
    assert any(r["ra_values"] for r in rows)
