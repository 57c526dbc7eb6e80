"""Import of DataCompDR-style WebDataset shards (built here per RECIPES.md section 2)."""
import io
import json
import tarfile

import numpy as np
import pytest

from fastload.sample import params as P

N_AUG, D = 5, 24


def _add(tf, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _build(tmp_path, n=6, bf16_key=None, break_key=None, missing_image=None, syn_split=False, extra_npz=None):
    """DataCompDR layout: reinforcement tar (syn.json, paug.json, npz) + image tar (jpg, txt)."""
    import skimage.data as sd
    from PIL import Image

    rng = np.random.default_rng(0)
    photos = [sd.astronaut(), sd.coffee(), sd.chelsea()]
    truth = {}
    dr, im = tmp_path / "dr-00000.tar", tmp_path / "img-00000.tar"
    with tarfile.open(dr, "w") as tdr, tarfile.open(im, "w") as tim:
        for s in range(n):
            key = f"{s:08d}"
            img = photos[s % 3][: 200 + 10 * s, : 180 + 7 * s]
            h, w = img.shape[:2]
            paug = []
            for _ in range(N_AUG):
                bh, bw = int(rng.integers(20, h)), int(rng.integers(20, w))
                i, j = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
                ops = [[P.RA_OPS[int(rng.integers(0, 14))], int(rng.integers(-9, 10))],
                       [int(rng.integers(0, 14)), int(rng.integers(-9, 10))]]
                paug.append([[i, j, bh, bw], ops])
            ie = rng.standard_normal((N_AUG, D)).astype(np.float32)
            te = rng.standard_normal((6, D)).astype(np.float32)
            syn = [f"synthetic caption {s}.{c}" for c in range(5)]
            truth[key] = dict(paug=paug, ie=ie, te=te, syn=syn, real=f"real caption {s}", hw=(h, w))
            if key == bf16_key:  # the bf16 variant: bit patterns stored as uint16
                npz = _npz(image_emb=(ie.view(np.uint32) >> 16).astype(np.uint16),
                           text_emb=(te.view(np.uint32) >> 16).astype(np.uint16))
                truth[key]["ie"] = ((ie.view(np.uint32) >> 16) << 16).view(np.float32)
                truth[key]["te"] = ((te.view(np.uint32) >> 16) << 16).view(np.float32)
            elif syn_split:  # the newer ml-mobileclip layout: synthetic captions' embeddings apart
                npz = _npz(image_emb=ie, text_emb=te[:1], syn_text_emb=te[1:], **(extra_npz or {}))
            else:
                npz = _npz(image_emb=ie, text_emb=te, **(extra_npz or {}))
            _add(tdr, f"{key}.syn.json", json.dumps({"syn_text": syn}).encode())
            _add(tdr, f"{key}.paug.json", json.dumps({"param_aug": paug} if s % 2 else paug).encode())
            _add(tdr, f"{key}.npz", npz[: len(npz) // 2] if key == break_key else npz)
            if key != missing_image:
                buf = io.BytesIO()
                Image.fromarray(np.ascontiguousarray(img)).save(buf, format="JPEG", quality=90)
                _add(tim, f"{key}.jpg", buf.getvalue())
                _add(tim, f"{key}.txt", truth[key]["real"].encode())
    return str(dr), str(im), truth


def test_import_roundtrip(tmp_path):
    from fastload.importers.datacomp import main
    from fastload.format.reader import ReinforcedDataset

    dr, im, truth = _build(tmp_path, bf16_key="00000003")
    out = str(tmp_path / "out")
    assert main([dr, "--images", im, "--out", out, "--shard-size", "4", "--quiet"]) == 0
    ds = ReinforcedDataset(out, verify=True)
    assert ds.kind == "image_text" and len(ds) == 6 and ds.num_augmentations == N_AUG
    for i, key in enumerate(sorted(truth)):
        t = truth[key]
        assert ds.keys[i] == key and tuple(ds.source_hw[i]) == t["hw"]
        recs = ds.augs(i)
        for j, (box, ops) in enumerate(t["paug"]):
            assert P.box_to_pixels(recs["crop"][j], *t["hw"]) == tuple(box)
            for s, (op, mag) in enumerate(ops):
                assert recs["ra_ops"][j, s] == (P.RA_OPS.index(op) if isinstance(op, str) else op)
                assert recs["ra_mags"][j, s] == mag
            np.testing.assert_array_equal(ds.image_embedding(i, j), t["ie"][j].astype(np.float16))
        np.testing.assert_array_equal(ds.text_embeddings(i), t["te"].astype(np.float16))
        assert ds.captions(i) == ([t["real"]], t["syn"])
        assert bytes(ds.image_bytes(i))[:2] == b"\xff\xd8"
        item = ds.record(i)
        assert item["image_emb"].shape == (N_AUG, D) and item["syn_captions"] == t["syn"]


def test_corrupt_npz_and_missing_image(tmp_path):
    from fastload.importers.datacomp import import_datacomp
    from fastload.format.reader import ReinforcedDataset

    dr, im, truth = _build(tmp_path, break_key="00000002", missing_image="00000004")
    with pytest.raises(ValueError, match="00000002"):
        import_datacomp([dr], str(tmp_path / "a"), [im], progress=False)
    m = import_datacomp([dr], str(tmp_path / "b"), [im], on_error="skip", progress=False)
    assert {s["key"] for s in m["skipped"]} == {"00000002", "00000004"}
    assert ReinforcedDataset(str(tmp_path / "b")).keys == ["00000000", "00000001", "00000003", "00000005"]


def test_inconsistent_augmentation_count(tmp_path):
    from fastload.importers.datacomp import import_datacomp

    dr, im, _ = _build(tmp_path, n=2)
    bad = tmp_path / "bad.tar"
    with tarfile.open(dr) as src, tarfile.open(bad, "w") as dst:
        for m in src:
            data = src.extractfile(m).read()
            if m.name == "00000001.paug.json":
                data = json.dumps(json.loads(data)["param_aug"][:2]).encode()
            _add(dst, m.name, data)
    with pytest.raises(ValueError, match="2 augmentations but 5 image embeddings"):
        import_datacomp([str(bad)], str(tmp_path / "o"), [im], progress=False)


def _ra_value(name, k, size=224, bins=31):
    """A magnitude as DataCompDR stores it: torchvision's table entry (float32) as a float."""
    from fastload.replay.reference_ra import magnitude_table

    t = magnitude_table(name, bins, size, size)
    return 0.0 if t is None else float(t[k].item())


def _build_real(tmp_path, n=4, off_grid_key=None):
    """The DataCompDR-12M layout: per sample url.txt, syn.json {"syn_text"}, paug.json
    {"param_aug": [ml-dr compressed params: [[i, j, h, w], [[op index, float mag], ...]]]},
    npz (image_emb [30-like N, D], text_emb [1 + S, D]) and json (metadata); images apart."""
    from PIL import Image

    rng = np.random.default_rng(3)
    truth = {}
    dr, im = tmp_path / "real-00000.tar", tmp_path / "realimg-00000.tar"
    with tarfile.open(dr, "w") as tdr, tarfile.open(im, "w") as tim:
        for s in range(n):
            key = f"{s:09d}"
            h, w = 60 + 5 * s, 70 + 3 * s
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            paug = []
            for a in range(N_AUG):
                bh, bw = int(rng.integers(20, h)), int(rng.integers(20, w))
                i, j = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
                ops = []
                for _ in range(2):
                    o = int(rng.integers(0, 14))
                    v = _ra_value(P.RA_OPS[o], 9)
                    if P.RA_OPS[o] in P.RA_SIGNED and rng.integers(0, 2):
                        v = -v
                    if key == off_grid_key and P.RA_OPS[o] in ("Rotate", "TranslateX", "Brightness"):
                        v = float(np.float32(v * 0.77))
                    ops.append([o, v])
                paug.append([[i, j, bh, bw], ops if a != 1 else None])
            ie = rng.standard_normal((N_AUG, D)).astype(np.float32)
            te = rng.standard_normal((1 + 3, D)).astype(np.float32)
            syn = [f"syn {s}.{c}" for c in range(3)]
            truth[key] = dict(paug=paug, hw=(h, w), img=img)
            _add(tdr, f"{key}.url.txt", f"https://example.invalid/{key}.jpg".encode())
            _add(tdr, f"{key}.syn.json", json.dumps({"syn_text": syn}).encode())
            _add(tdr, f"{key}.paug.json", json.dumps({"param_aug": paug}).encode())
            _add(tdr, f"{key}.npz", _npz(image_emb=ie, text_emb=te))
            _add(tdr, f"{key}.json", json.dumps({"uid": key, "sha256": "0" * 64}).encode())
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")  # lossless: the test replays exact pixels
            _add(tim, f"{key}.png", buf.getvalue())
            _add(tim, f"{key}.txt", f"real {s}".encode())
    return str(dr), str(im), truth


def test_real_datacompdr_layout_with_float_magnitudes(tmp_path):
    from fastload.importers.datacomp import import_datacomp
    from fastload.format.reader import ReinforcedDataset

    dr, im, truth = _build_real(tmp_path, off_grid_key="000000002")
    m = import_datacomp([dr], str(tmp_path / "out"), [im], progress=False)
    assert m["schema_version"] == 2
    ds = ReinforcedDataset(str(tmp_path / "out"))
    assert ds.has_ext and ds.manifest["num_captions"] == 4
    off_seen = 0
    for i, key in enumerate(sorted(truth)):
        t = truth[key]
        recs, ext = ds.augs(i), ds.augs_ext(i)
        for a, (box, ops) in enumerate(t["paug"]):
            assert P.box_to_pixels(recs[a]["crop"], *t["hw"]) == tuple(box)
            if ops is None:
                assert (recs[a]["ra_ops"] == P.RA_NONE).all()
                continue
            assert recs[a]["ra_ops"][:2].tolist() == [o for o, _ in ops]
            off = any(abs(v) != abs(_ra_value(P.RA_OPS[o], 9)) for o, v in ops)
            assert bool(ext[a]["ext"] & P.EXT_RA_FLOAT) == off
            if off:
                assert ext[a]["ra_vals"][:2].tolist() == [float(np.float32(v)) for _, v in ops]
            off_seen += off
            if not off:  # on the bin grid: the 47-byte record alone is exact
                for (o, v), mag in zip(ops, recs[a]["ra_mags"][:2]):
                    from fastload.replay.reference_ra import magnitude_value

                    assert magnitude_value(P.RA_OPS[o], int(mag), 31, 224, 224) == v
    assert off_seen > 0


def test_float_magnitudes_replay_as_stored(tmp_path):
    """The kernel replays the stored floats (given the same 224 crop) as torchvision's
    _apply_op semantics with that value (the reference's apply_op)."""
    import torch

    from fastload.importers.datacomp import import_datacomp
    from fastload.format.reader import ReinforcedDataset
    from fastload.replay import native
    from fastload.replay.reference import crop_resize_flip
    from fastload.replay.reference_ra import apply_op

    dr, im, truth = _build_real(tmp_path, n=3, off_grid_key="000000001")
    import_datacomp([dr], str(tmp_path / "out"), [im], progress=False)
    ds = ReinforcedDataset(str(tmp_path / "out"))
    for i, key in enumerate(sorted(truth)):
        t = truth[key]
        recs, ext = ds.augs(i), ds.augs_ext(i)
        crops = [crop_resize_flip(t["img"], r["crop"], (224, 224), False, "bicubic") for r in recs]
        full = recs.copy()
        full["crop"] = (0, 0, P.Q, P.Q)
        out = torch.empty(len(recs), 3, 224, 224, dtype=torch.uint8)
        native.render_batch([c.permute(1, 2, 0).contiguous().numpy() for c in crops], full, out, ext=ext,
                            box_grid=(224, 224), interpolation="bicubic")
        for a, (box, ops) in enumerate(t["paug"]):
            want = crops[a]
            for o, v in ops or []:
                want = apply_op(want, P.RA_OPS[o], v)
            assert torch.equal(out[a], want), (key, a)


def test_dct_scale_is_false_and_a_boolean(tmp_path):
    # DataCompDR decoded at full size: a string here used to read as true (DCT-scaled decode)
    from fastload.importers.datacomp import import_datacomp
    from fastload.format.reader import ReinforcedDataset

    dr, im, _ = _build(tmp_path, n=2)
    m = import_datacomp([dr], str(tmp_path / "o"), [im], progress=False)
    assert m["replay"]["dct_scale"] is False
    assert ReinforcedDataset(str(tmp_path / "o")).replay["dct_scale"] is False


def test_separate_syn_text_emb_layout(tmp_path):
    from fastload.importers.datacomp import import_datacomp
    from fastload.format.reader import ReinforcedDataset

    dr, im, truth = _build(tmp_path, n=3, syn_split=True)
    import_datacomp([dr], str(tmp_path / "o"), [im], progress=False)
    ds = ReinforcedDataset(str(tmp_path / "o"))
    assert ds.manifest["num_captions"] == 6
    for i, key in enumerate(sorted(truth)):
        # real caption first, then the 5 synthetic ones: none dropped
        np.testing.assert_array_equal(ds.text_embeddings(i), truth[key]["te"].astype(np.float16))
        assert len(ds.captions(i)[1]) == 5


def test_npz_field_not_understood_is_an_error(tmp_path):
    from fastload.importers.datacomp import import_datacomp

    dr, im, _ = _build(tmp_path, n=2, extra_npz={"syn_image_emb": np.zeros((2, D), np.float32)})
    with pytest.raises(ValueError, match=r"npz fields \['syn_image_emb'\] are not understood"):
        import_datacomp([dr], str(tmp_path / "o"), [im], progress=False)
    with pytest.raises(ValueError, match="paug.json fields"):
        from fastload.importers.datacomp import _parse_paug
        _parse_paug(b'{"param_aug": [[[0, 0, 4, 4], null]], "extra": 1}', "k", (8, 8))


def test_semantics_default_pil(tmp_path):
    # DataCompDR ran torchvision's RandAugment on PIL images (teachers and training)
    from fastload.importers.datacomp import import_datacomp, main
    from fastload.format.reader import ReinforcedDataset

    dr, im, _ = _build(tmp_path, n=2)
    import_datacomp([dr], str(tmp_path / "a"), [im], progress=False)
    pol = ReinforcedDataset(str(tmp_path / "a")).policy
    assert pol.randaugment_semantics == "pil" and pol.resize == "pil"  # Pillow's crop resize too
    assert main([dr, "--images", im, "--out", str(tmp_path / "b"), "--quiet", "--semantics", "v1"]) == 0
    pol = ReinforcedDataset(str(tmp_path / "b")).policy
    assert pol.randaugment_semantics == "v1" and pol.resize == "torch"


def _digests(manifest):
    return {s["index"]: s["sha256"] for s in manifest["shards"]}


def test_shards_resume_and_skips_are_kept(tmp_path):
    """Several shards: a rerun after a lost shard rewrites only that one; samples skipped at
    conversion stay listed (they are kept with their shard's entry) and leave their id unused."""
    import os

    from fastload.importers.datacomp import import_datacomp
    from fastload.format.reader import ReinforcedDataset

    dr, im, _ = _build(tmp_path, n=7, break_key="00000002", missing_image="00000004")
    out = str(tmp_path / "o")
    m = import_datacomp([dr], out, [im], shard_size=2, on_error="skip", progress=False)
    assert m["num_shards"] == 3 and [s["rows"] for s in m["shards"]] == [2, 1, 2]
    assert {s["key"] for s in m["skipped"]} == {"00000002", "00000004"}
    assert ReinforcedDataset(out).keys == ["00000000", "00000001", "00000003", "00000005", "00000006"]
    kept = {s["index"]: os.path.getmtime(os.path.join(out, s["file"])) for s in m["shards"] if s["index"] != 1}
    os.remove(os.path.join(out, m["shards"][1]["file"]))
    m2 = import_datacomp([dr], out, [im], shard_size=2, on_error="skip", progress=False)
    assert _digests(m2) == _digests(m) and {s["key"] for s in m2["skipped"]} == {"00000002", "00000004"}
    assert all(os.path.getmtime(os.path.join(out, s["file"])) == kept[s["index"]]
               for s in m2["shards"] if s["index"] != 1)
    assert not os.path.exists(os.path.join(out, ".datacomp-staging"))


@pytest.mark.slow
def test_ray_engine_writes_the_local_shards_and_resumes(tmp_path):
    """engine="ray": this process streams the tars and stages members; Ray tasks decode,
    convert and write each shard. Same shards byte for byte; a rerun redoes only what is missing."""
    import os

    ray = pytest.importorskip("ray")
    from fastload.importers.datacomp import import_datacomp, main

    dr, im, _ = _build(tmp_path, n=8)
    local = import_datacomp([dr], str(tmp_path / "local"), [im], shard_size=3, progress=False)
    out = str(tmp_path / "ray")
    assert main([dr, "--images", im, "--out", out, "--shard-size", "3", "--engine", "ray", "--workers", "2",
                 "--quiet"]) == 0
    ray.shutdown()
    from fastload.format.manifest import read_manifest

    m = read_manifest(out)
    assert m["complete"] and _digests(m) == _digests(local)
    assert not os.path.exists(os.path.join(out, ".datacomp-staging"))
    kept = {s["index"]: os.path.getmtime(os.path.join(out, s["file"])) for s in m["shards"] if s["index"] != 1}
    os.remove(os.path.join(out, next(s["file"] for s in m["shards"] if s["index"] == 1)))
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        m2 = import_datacomp([dr], out, [im], shard_size=3, progress=False, engine="ray")
    finally:
        ray.shutdown()
    assert _digests(m2) == _digests(local)
    assert all(os.path.getmtime(os.path.join(out, s["file"])) == kept[s["index"]]
               for s in m2["shards"] if s["index"] != 1)


def test_engine_is_checked(tmp_path):
    from fastload.importers.datacomp import import_datacomp

    dr, im, _ = _build(tmp_path, n=2)
    with pytest.raises(ValueError, match="engine must be 'local' or 'ray', got 'spark'"):
        import_datacomp([dr], str(tmp_path / "o"), [im], progress=False, engine="spark")


def test_jpeg_images_stored_with_restart_markers(tmp_path):
    """By default the JPEG images are stored with restart markers: the same pixels, the same
    rendered samples as the images stored byte for byte (restart_markers=False, or the CLI's
    --no-restart-markers)."""
    import torch
    from PIL import Image

    from fastload.format.reader import ReinforcedDataset
    from fastload.importers.datacomp import _ImageIndex, import_datacomp, main
    from fastload.replay import native

    if not native.have_jpeg():
        pytest.skip("built without libjpeg")
    dr, im, truth = _build(tmp_path, n=3)
    on = import_datacomp([dr], str(tmp_path / "on"), [im], progress=False)
    off = import_datacomp([dr], str(tmp_path / "off"), [im], progress=False, restart_markers=False)
    assert on["image_encoding"]["restart_markers"] is True and off["image_encoding"]["restart_markers"] is False
    assert main([dr, "--images", im, "--out", str(tmp_path / "cli"), "--quiet", "--no-restart-markers"]) == 0
    on, off = ReinforcedDataset(str(tmp_path / "on"), verify=True), ReinforcedDataset(str(tmp_path / "off"))
    cli = ReinforcedDataset(str(tmp_path / "cli"))
    assert cli.manifest["image_encoding"]["restart_markers"] is False
    index = _ImageIndex([im])
    slices = native.slice_count()
    for i, key in enumerate(sorted(truth)):
        src = index.get(key)[0]
        b_on, b_off = bytes(on.image_bytes(i)), bytes(off.image_bytes(i))
        assert b_off == src and bytes(cli.image_bytes(i)) == src and b"\xff\xdd" not in src
        assert b"\xff\xdd" in b_on  # a DRI marker
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(b_on)).convert("RGB")),
                                      np.asarray(Image.open(io.BytesIO(src)).convert("RGB")))
        a, b = on[i], off[i]
        assert torch.equal(a.images, b.images)
    assert native.slice_count() > slices  # the marked images were decoded by slice
