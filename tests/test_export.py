"""`fastload inspect --export params.parquet` (issue 11, "Seen": augs/targets were opaque
blobs): every stored augmentation and top-k target as plain columns, checked field by field
against the dataset's own decoding, read back with pyarrow and pandas."""
import numpy as np
import pytest

import fastload
from fastload.datasets import make_images, make_teacher
from fastload.sample import params as P
from fastload.sample.policy import AugmentPolicy


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    make_images(str(root / "imgs"), 9, classes=3)
    fastload.reinforce(str(root / "imgs"), make_teacher(3), str(root / "plus"), num_augmentations=5, topk=2,
                       image_size=32, progress=False,
                       policy=AugmentPolicy(randaugment=(2, 9), erase=0.5, mixup=1.0, cutmix=1.0, size=(32, 32)))
    return fastload.ReinforcedDataset(str(root / "plus"))


def test_export_columns_match_the_stored_records(ds, tmp_path):
    import pyarrow.parquet as pq

    from fastload.tools.inspect import main

    out = str(tmp_path / "params.parquet")
    assert main([ds.path, "--export", out]) == 0
    from types import SimpleNamespace

    table = pq.read_table(out)
    assert len(table) == len(ds) * ds.num_augmentations
    seen = {"mix": 0, "cut": 0, "erase": 0, "ra": 0}
    for r in (SimpleNamespace(**d) for d in table.to_pylist()):
        rec = ds.augs(r.id)[r.aug]
        h, w = ds.source_hw[r.id]
        assert (r.crop_top, r.crop_left, r.crop_height, r.crop_width) == P.box_to_pixels(rec["crop"], h, w)
        assert r.flip == bool(rec["flags"] & P.FLAG_FLIP)
        used = rec["ra_ops"] != P.RA_NONE
        assert list(r.ra_ops) == [P.RA_OPS[o] for o in rec["ra_ops"][used]]
        assert list(r.ra_magnitudes) == rec["ra_mags"][used].tolist()
        seen["ra"] += bool(used.any())
        if rec["partner"] >= 0:
            ph, pw = ds.source_hw[rec["partner"]]
            assert r.mix_partner == rec["partner"]
            assert (r.partner_crop_top, r.partner_crop_left, r.partner_crop_height,
                    r.partner_crop_width) == P.box_to_pixels(rec["pcrop"], ph, pw)
        else:
            assert r.mix_partner is None
        if rec["flags"] & P.FLAG_MIXUP:
            assert r.mixup_lambda == pytest.approx(rec["mixup"] / P.Q)
            seen["mix"] += 1
        else:
            assert r.mixup_lambda is None
        if rec["flags"] & P.FLAG_CUTMIX:
            assert r.cutmix_width == pytest.approx(rec["cutmix"][3] / P.Q)
            seen["cut"] += 1
        if rec["erase"][3]:
            assert r.erase_height == pytest.approx(rec["erase"][2] / P.Q)
            seen["erase"] += 1
        else:
            assert r.erase_top is None
        ids, probs = ds.target(r.id, r.aug)
        assert list(r.topk_ids) == ids.tolist()
        np.testing.assert_allclose(r.topk_probs, probs, rtol=1e-6)
        assert r.label == ds.labels[r.id] and r.key == ds.keys[r.id]
    assert all(seen.values()), seen  # every kind of field was exercised


def test_export_needs_parquet_name(ds, tmp_path, capsys):
    from fastload.tools.inspect import main

    assert main([ds.path, "--export", str(tmp_path / "p.csv")]) == 2
    assert "--export" in capsys.readouterr().err


def test_export_reads_in_pandas(ds, tmp_path):
    pd = pytest.importorskip("pandas")
    from fastload.tools.export import export_params

    out = str(tmp_path / "p.parquet")
    export_params(ds, out, progress=False)
    df = pd.read_parquet(out)
    assert len(df) == len(ds) * ds.num_augmentations and df["crop_width"].dtype.kind == "i"
