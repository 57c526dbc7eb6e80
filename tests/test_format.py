"""Reinforced format v1: blob codecs, reader, manifest validation, crash safety, inspect."""
import copy
import io
import json
import os
import pickle
import shutil

import numpy as np
import pytest

from fastload.datasets import make_images, make_teacher
from fastload.format import manifest as mf
from fastload.format.shards import (decode_array, decode_augs, decode_targets, encode_array, encode_augs,
                                    encode_targets)
from fastload.sample import params as P


def _random_records(rng, n, hw, all_hw, pixel=True):
    a = P.empty(n)
    H, W = hw
    for r in range(n):
        bh, bw = rng.integers(1, H + 1), rng.integers(1, W + 1)
        t, l = rng.integers(0, H - bh + 1), rng.integers(0, W - bw + 1)
        a["crop"][r] = P.pixels_to_box(t, l, bh, bw, H, W) if pixel else rng.integers(0, 65536, 4)
    a["flags"] = rng.integers(0, 16, n)
    a["ra_ops"][:, :2] = rng.integers(0, 14, (n, 2))
    a["ra_mags"][:, :2] = rng.integers(-30, 31, (n, 2))
    a["erase"] = np.where(rng.random((n, 1)) < 0.3, rng.integers(0, 65536, (n, 4)), 0)
    a["partner"] = np.where(rng.random(n) < 0.5, rng.integers(0, len(all_hw), n), -1)
    for r in range(n):
        if a["partner"][r] >= 0:
            ph, pw = all_hw[a["partner"][r]]
            a["pcrop"][r] = P.pixels_to_box(0, 1, ph // 2, pw - 1, ph, pw)
    a["mixup"] = rng.integers(0, 65536, n)
    a["cutmix"] = rng.integers(0, 65536, (n, 4))
    return a


@pytest.mark.parametrize("pixel", [True, False])
def test_augs_roundtrip_is_lossless(pixel):
    rng = np.random.default_rng(1)
    all_hw = rng.integers(20, 600, (50, 2))
    a = _random_records(rng, 300, (375, 500), all_hw, pixel)
    blob = encode_augs(a, (375, 500), (224, 224), all_hw)
    assert decode_augs(blob, (375, 500), (224, 224), all_hw).tobytes() == a.tobytes()
    assert len(blob) < a.nbytes  # compact


def test_targets_roundtrip_is_lossless_at_fp16():
    rng = np.random.default_rng(2)
    for n, k, classes in ((40, 10, 1000), (7, 5, 100000), (300, 3, 100000)):  # small/large vocab, ids >= 65536
        ids = rng.integers(0, classes, (n, k))
        probs = np.sort(rng.dirichlet(np.ones(k + 5), n)[:, :k], 1)[:, ::-1]
        got_ids, got_p = decode_targets(encode_targets(ids, probs), (n, k))
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(got_p, probs.astype(np.float16).astype(np.float32))


def test_embedding_roundtrip():
    e = np.random.default_rng(3).standard_normal((30, 64)).astype(np.float16)
    np.testing.assert_array_equal(decode_array(encode_array(e), e.shape), e)


def test_corrupt_blobs_are_rejected_with_bounded_output():
    rng = np.random.default_rng(4)
    blob = bytearray(encode_targets(rng.integers(0, 10, (50, 3)), np.full((50, 3), 0.1)))
    blob[4:8] = (10**6).to_bytes(4, "little")  # claims a huge n: bound no longer matches
    with pytest.raises(ValueError, match="corrupt"):
        decode_targets(bytes(blob))
    a = _random_records(rng, 20, (100, 100), np.array([[100, 100]]))
    b = encode_augs(a, (100, 100), (224, 224), np.array([[100, 100]]))
    with pytest.raises(ValueError, match="corrupt"):
        decode_augs(b[:-3], (100, 100), (224, 224), np.array([[100, 100]]))
    with pytest.raises(ValueError, match="manifest says"):
        decode_augs(b, (100, 100), (224, 224), np.array([[100, 100]]), expected_n=21)


# ---------------------------------------------------------------------------------------
# a generated dataset shared by the tests below

@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    import fastload
    from fastload.sample.policy import AugmentPolicy

    root = tmp_path_factory.mktemp("rf")
    imgs = str(root / "imgs")
    make_images(imgs, 12)
    kw = dict(teacher=make_teacher(20), num_classes=20, num_augmentations=6, topk=5, image_size=48, batch_size=32,
              shard_size=5, progress=False,
              policy=AugmentPolicy(randaugment=(2, 9), erase=0.25, mixup=1.0, cutmix=1.0, size=(48, 48)))
    out = str(root / "out")
    fastload.reinforce(imgs, out=out, **kw)
    return imgs, out, kw


def test_reader_layout_and_access(generated):
    from PIL import Image

    import fastload

    imgs, out, _ = generated
    ds = fastload.ReinforcedDataset(out)
    assert len(ds) == 12 and ds.num_augmentations == 6 and ds.topk == 5 and ds.num_classes == 20
    assert ds.kind == "classification" and ds.policy.mixup == 1.0
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(imgs) for f in fs)
    files.sort(key=lambda p: os.path.relpath(p, imgs))
    for i, path in enumerate(files):
        rel = os.path.relpath(path, imgs)
        assert ds.keys[i] == rel
        assert ds.labels[i] == int(rel.split(os.sep)[0][1:])
        # JPEG kept losslessly: the same pixels, with restart markers (tests/test_jpeg_restart.py)
        stored = Image.open(io.BytesIO(bytes(ds.image_bytes(i))))
        assert np.array_equal(np.asarray(stored), np.asarray(Image.open(path)))
        w, h = Image.open(path).size
        assert tuple(ds.source_hw[i]) == (h, w)
        ids, probs = ds._targets_row(i)
        assert ids.shape == (6, 5) and (np.diff(probs, axis=1) <= 0).all()
        assert ((ids >= 0) & (ids < 20)).all()
    assert isinstance(ds.image_bytes(0), memoryview)
    # gather == per-sample access
    idx, aug = np.array([0, 7, 11, 3]), np.array([5, 0, 2, 2])
    images, recs, ids, probs = ds.gather(idx, aug)
    for b, (i, j) in enumerate(zip(idx, aug)):
        assert bytes(images[b]) == bytes(ds.image_bytes(i))
        assert recs[b].tobytes() == ds.augs(i)[j].tobytes()
        ti, tp = ds.target(i, j)
        np.testing.assert_array_equal(ids[b], ti)
        np.testing.assert_array_equal(probs[b], tp)
    item = ds.record(3)
    assert item["key"] == ds.keys[3] and item["augs"].dtype == P.AUG_DTYPE
    # cheap pickle for DataLoader workers: no maps inside, same answers after (deepcopy goes
    # through the same __getstate__/__setstate__ path as a worker's pickle round trip)
    assert len(pickle.dumps(ds)) < 20000
    ds2 = copy.deepcopy(ds)
    _, recs2, ids2, probs2 = ds2.gather(idx, aug)
    assert recs2.tobytes() == recs.tobytes() and (ids2 == ids).all() and (probs2 == probs).all()
    with pytest.raises(IndexError):
        ds.augs(12)
    with pytest.raises(ValueError, match="aug_ids"):
        ds.gather([0], [6])


def test_newer_schema_version_is_refused(generated, tmp_path):
    import fastload

    _, out, _ = generated
    dst = tmp_path / "copy"
    shutil.copytree(out, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["schema_version"] = mf.SCHEMA_VERSION + 1
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="newer"):
        fastload.ReinforcedDataset(str(dst))


def test_checksum_mismatch_detected(generated, tmp_path, capsys):
    import fastload
    from fastload.tools.inspect import main

    _, out, _ = generated
    dst = tmp_path / "copy"
    shutil.copytree(out, dst)
    assert main([str(dst)]) == 0
    shard = dst / "shard-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert fastload.ReinforcedDataset(str(dst)).verify() == ["shard-00001.arrow"]
    with pytest.raises(ValueError, match="checksum"):
        fastload.ReinforcedDataset(str(dst), verify=True)
    capsys.readouterr()
    assert main([str(dst)]) == 1
    assert "BAD SHARD shard-00001.arrow" in capsys.readouterr().out


def test_inspect_reports_measured_bytes(generated, capsys):
    import pyarrow as pa

    from fastload.tools.inspect import main, summarize

    _, out, _ = generated
    assert main([out]) == 0
    text = capsys.readouterr().out
    assert "bytes per augmentation" in text and "checksums: all 3 shards OK" in text
    total = 0
    for f in sorted(os.listdir(out)):
        if f.endswith(".arrow"):
            with pa.memory_map(os.path.join(out, f)) as mm:
                b = pa.ipc.open_file(mm).get_batch(0)
                total += b.column("augs").nbytes + b.column("targets").nbytes
    s = summarize(out)
    assert s["bytes_per_augmentation"]["params_plus_targets"] == pytest.approx(total / (12 * 6))
    assert f"{total / 72:.2f}" in text
    assert 0 < s["target_entropy_nats"]["mean"] < np.log(20)


def test_out_dir_with_other_dataset_is_refused(generated, tmp_path):
    import fastload

    imgs, out, kw = generated
    with pytest.raises(ValueError, match="different dataset.*seed"):
        fastload.reinforce(imgs, out=out, **dict(kw, seed=1))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        fastload.reinforce(imgs, out=str(other), **kw)


def test_rerun_skips_complete_shards(generated):
    import fastload

    imgs, out, kw = generated
    before = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out) if f.endswith(".arrow")}
    fastload.reinforce(imgs, out=out, **kw)
    after = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out) if f.endswith(".arrow")}
    assert before == after


def test_crash_between_shard_rename_and_manifest_update(generated, tmp_path, monkeypatch):
    import fastload
    from fastload.format import writer

    imgs, ref_out, kw = generated
    out = str(tmp_path / "crashy")
    real = writer.DatasetWriter.add_shard
    calls = []

    def crash_on_second(self, info):
        calls.append(info["index"])
        if len(calls) == 2:  # shard 1 is renamed into place, the manifest not yet updated
            raise KeyboardInterrupt("simulated kill")
        return real(self, info)

    monkeypatch.setattr(writer.DatasetWriter, "add_shard", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        fastload.reinforce(imgs, out=out, **kw)
    monkeypatch.setattr(writer.DatasetWriter, "add_shard", real)
    m = json.loads(open(os.path.join(out, "manifest.json")).read())
    assert [s["index"] for s in m["shards"]] == [0] and not m["complete"]
    assert os.path.exists(os.path.join(out, "shard-00001.arrow"))  # on disk, but not listed
    listed = m["shards"][0]
    assert mf.sha256_file(os.path.join(out, listed["file"])) == listed["sha256"]  # nothing listed lost
    with pytest.raises(ValueError, match="incomplete"):
        fastload.ReinforcedDataset(out)
    open(os.path.join(out, "shard-00002.arrow.tmp-999"), "wb").write(b"half")  # a torn write
    fastload.reinforce(imgs, out=out, **kw)  # resume
    assert not any(".tmp-" in f for f in os.listdir(out))
    a, b = fastload.ReinforcedDataset(out), fastload.ReinforcedDataset(ref_out)
    for i in range(len(b)):
        assert a.augs(i).tobytes() == b.augs(i).tobytes()
        for x, y in zip(a._targets_row(i), b._targets_row(i)):
            np.testing.assert_array_equal(x, y)


def test_batched_decoders_match_full_row_decode():
    from fastload.format.shards import decode_augs_batch, decode_targets_batch

    rng = np.random.default_rng(5)
    rows, n, k = 9, 40, 6
    all_hw = rng.integers(20, 600, (rows, 2))
    recs = [_random_records(rng, n, tuple(all_hw[r]), all_hw, pixel=r % 3 != 0) for r in range(rows)]
    ablobs = [encode_augs(recs[r], tuple(all_hw[r]), (224, 224), all_hw) for r in range(rows)]
    ids = rng.integers(0, 300, (rows, n, k))
    ids[4] = rng.integers(0, 90000, (n, k))  # > 256 distinct classes and ids >= 65536: the per-row path
    probs = np.sort(rng.dirichlet(np.ones(k + 3), (rows, n))[..., :k], -1)[..., ::-1]
    tblobs = [encode_targets(ids[r], probs[r]) for r in range(rows)]
    ri, js = rng.integers(0, rows, 50), rng.integers(0, n, 50)
    got = decode_augs_batch([ablobs[r] for r in ri], js, all_hw[ri], (224, 224), all_hw, n)
    assert got.tobytes() == np.stack([recs[r][j] for r, j in zip(ri, js)]).tobytes()
    gi, gp = decode_targets_batch([tblobs[r] for r in ri], js, n, k)
    np.testing.assert_array_equal(gi, ids[ri, js])
    np.testing.assert_array_equal(gp, probs[ri, js].astype(np.float16).astype(np.float32))
    with pytest.raises(ValueError, match="manifest says"):
        decode_targets_batch([tblobs[0]], [0], n + 1, k)


def test_release_pages_bounds_resident_mapping(generated):
    """Mapped pages read through gather are dropped once the budget is exceeded; data stays
    readable and identical afterwards."""
    import fastload

    _, out, _ = generated
    ds = fastload.ReinforcedDataset(out, max_resident_mib=0)  # release after every gather
    idx = np.arange(len(ds))
    before = [bytes(b) for b in ds.gather(idx, np.zeros(len(ds), np.int64))[0]]
    assert ds._touched == 0  # released
    after = [bytes(b) for b in ds.gather(idx, np.zeros(len(ds), np.int64))[0]]
    assert before == after and all(len(b) > 0 for b in before)
