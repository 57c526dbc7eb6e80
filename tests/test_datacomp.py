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


def _build(tmp_path, n=6, bf16_key=None, break_key=None, missing_image=None):
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
            else:
                npz = _npz(image_emb=ie, text_emb=te)
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
    from fastload.format.datacomp import main
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
    from fastload.format.datacomp import import_datacomp
    from fastload.format.reader import ReinforcedDataset

    dr, im, truth = _build(tmp_path, break_key="00000002", missing_image="00000004")
    with pytest.raises(ValueError, match="00000002"):
        import_datacomp([dr], str(tmp_path / "a"), [im], progress=False)
    m = import_datacomp([dr], str(tmp_path / "b"), [im], on_error="skip", progress=False)
    assert {s["key"] for s in m["skipped"]} == {"00000002", "00000004"}
    assert ReinforcedDataset(str(tmp_path / "b")).keys == ["00000000", "00000001", "00000003", "00000005"]


def test_inconsistent_augmentation_count(tmp_path):
    from fastload.format.datacomp import import_datacomp

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
