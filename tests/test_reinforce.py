"""fastload.reinforce: parity with a replay + teacher rerun, ensembles, bad input, merge, CLI, Ray."""
import hashlib
import json
import os
import sys

import numpy as np
import pytest
import torch

import fastload
from fastload.datasets import make_images, make_teacher
from fastload.sample.policy import AugmentPolicy

SIZE = 48
POLICY = AugmentPolicy(randaugment=(2, 9), erase=0.25, mixup=1.0, cutmix=1.0, size=(SIZE, SIZE))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("imgs") / "folder")
    make_images(root, 12)
    return root


def _rerun(ds, teachers, i, j_list):
    """Independent re-evaluation: render the stored records with the loader's kernel and
    run the teachers again (mean of softmax)."""
    from fastload.replay.native import render_batch

    recs = ds.augs(i)[j_list]
    srcs = [bytes(ds.image_bytes(i))] * len(j_list)
    partners = [bytes(ds.image_bytes(int(p))) if p >= 0 else None for p in recs["partner"]]
    out = torch.empty(len(j_list), 3, *ds.replay["image_size"])
    render_batch(srcs, recs, out, partner_sources=partners, mean=ds.replay["mean"], std=ds.replay["std"],
                 interpolation=ds.replay["interpolation"], dct_scale=ds.replay["dct_scale"],
                 ra_num_bins=ds.policy.ra_num_bins)
    with torch.no_grad():
        p = sum(torch.softmax(t(out), 1) for t in teachers) / len(teachers)
    return p


def test_parity_replay_reproduces_stored_targets(images, tmp_path):
    teacher = make_teacher(20, seed=0)
    out = str(tmp_path / "ds")
    fastload.reinforce(images, teacher, out, num_classes=20, num_augmentations=8, topk=5, policy=POLICY, image_size=SIZE,
                       batch_size=16, shard_size=5, seed=3, progress=False)
    ds = fastload.ReinforcedDataset(out, verify=True)
    assert len(ds) == 12
    recs = np.concatenate([ds.augs(i) for i in range(len(ds))])
    assert (recs["partner"] >= 0).any() and (recs["ra_ops"][:, 0] != 255).all()  # the policy was exercised
    for i in range(len(ds)):
        p = _rerun(ds, [teacher], i, np.arange(8))
        ids, probs = ds._targets_row(i)
        top_p, top_i = torch.topk(p, 5, dim=1)
        np.testing.assert_array_equal(ids, top_i.numpy())
        np.testing.assert_allclose(probs, top_p.numpy(), rtol=1e-3, atol=1e-5)  # fp16 storage
        # densified teacher targets match the full teacher distribution on the top-k
        np.testing.assert_allclose(np.take_along_axis(p.numpy(), ids, 1), probs, rtol=1e-3, atol=1e-5)


def test_ensemble_averages_probabilities_and_in_memory_dataset(tmp_path):
    import skimage.data as sd

    t1, t2 = make_teacher(10, seed=1), make_teacher(10, seed=2)
    photos = [sd.astronaut(), sd.chelsea(), sd.coffee()]
    data = [(photos[i % 3][i * 7:300 + i * 5, i * 3:280], i % 2) for i in range(5)]  # uint8 HWC arrays
    out = str(tmp_path / "ens")
    m = fastload.reinforce(data, [t1, t2], out, num_augmentations=4, topk=3, image_size=SIZE,
                           policy=AugmentPolicy(size=(SIZE, SIZE)), reencode_max_side=160, progress=False)
    assert len(m["teachers"]) == 2
    ds = fastload.ReinforcedDataset(out)
    assert ds.labels.tolist() == [0, 1, 0, 1, 0]
    assert (ds.source_hw.max(1) <= 160).all() and (ds.orig_hw.max(1) > 160).all()
    for i in range(len(ds)):
        assert bytes(ds.image_bytes(i))[:2] == b"\xff\xd8"  # arrays stored as JPEG
        # the row hash covers the stored (encoded) bytes: ranged partner reads check against it
        assert ds._hash[i].tobytes() == hashlib.blake2b(bytes(ds.image_bytes(i)), digest_size=16).digest()
        p = _rerun(ds, [t1, t2], i, np.arange(4))
        ids, probs = ds._targets_row(i)
        np.testing.assert_allclose(probs, np.take_along_axis(p.numpy(), ids, 1), rtol=1e-3, atol=1e-5)
        np.testing.assert_array_equal(ids, torch.topk(p, 3, 1).indices.numpy())


def _bad_folder(tmp_path, images):
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(images, root)
    victim = sorted((root / "c1").iterdir())[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])  # truncated JPEG
    (root / "c2" / "zz_garbage.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    return str(root), {f"c1/{victim.name}", "c2/zz_garbage.jpg"}


def test_corrupt_images_raise_naming_the_key(images, tmp_path):
    root, bad = _bad_folder(tmp_path, images)
    with pytest.raises(ValueError) as e:
        fastload.reinforce(root, make_teacher(20), str(tmp_path / "o"), num_classes=20, num_augmentations=2, topk=3,
                           image_size=SIZE, policy=POLICY, progress=False)
    assert any(k in str(e.value) for k in bad)


def test_corrupt_images_skipped_and_recorded(images, tmp_path):
    root, bad = _bad_folder(tmp_path, images)
    out = str(tmp_path / "o")
    m = fastload.reinforce(root, make_teacher(20), out, num_classes=20, num_augmentations=3, topk=3, image_size=SIZE,
                           policy=POLICY, on_error="skip", progress=False)
    assert {s["key"] for s in m["skipped"]} == bad
    ds = fastload.ReinforcedDataset(out)
    assert len(ds) == 11 and not (set(ds.keys) & bad)  # 12 given + 1 garbage, 2 bad
    partners = np.concatenate([ds.augs(i)["partner"] for i in range(len(ds))])
    assert partners.max() < len(ds)


def test_teacher_with_wrong_number_of_classes(images, tmp_path):
    with pytest.raises(ValueError, match="outputs 20 classes but num_classes=10"):
        fastload.reinforce(images, make_teacher(20), str(tmp_path / "o"), num_classes=10, image_size=SIZE,
                           progress=False)
    with pytest.raises(ValueError, match="disagree"):
        fastload.reinforce(images, [make_teacher(20), make_teacher(10)], str(tmp_path / "o2"),
                           image_size=SIZE, progress=False)
    with pytest.raises(ValueError, match="topk"):
        fastload.reinforce(images, make_teacher(4), str(tmp_path / "o3"), topk=5, image_size=SIZE, progress=False)


def test_merge_grows_n(images, tmp_path):
    from fastload.format.writer import merge

    t = make_teacher(20)
    kw = dict(num_classes=20, num_augmentations=3, topk=4, image_size=SIZE, policy=POLICY, shard_size=5, progress=False)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    fastload.reinforce(images, t, a, seed=0, **kw)
    fastload.reinforce(images, t, b, seed=1, **kw)
    m = merge([a, b], str(tmp_path / "ab"), progress=False)
    assert m["num_augmentations"] == 6 and m["seeds"] == [0, 1]
    da, db, dm = (fastload.ReinforcedDataset(p) for p in (a, b, str(tmp_path / "ab")))
    for i in range(len(dm)):
        assert dm.augs(i).tobytes() == np.concatenate([da.augs(i), db.augs(i)]).tobytes()
        for j in range(6):
            src, jj = (da, j) if j < 3 else (db, j - 3)
            for x, y in zip(dm.target(i, j), src.target(i, jj)):
                np.testing.assert_array_equal(x, y)
        assert bytes(dm.image_bytes(i)) == bytes(da.image_bytes(i))
    with pytest.raises(ValueError, match="same seed"):
        merge([a, a], str(tmp_path / "aa"), progress=False)


def test_cli_with_torchscript_teacher_and_refused_pickle(images, tmp_path):
    from fastload.generate import main

    t = make_teacher(20)
    ts = str(tmp_path / "teacher.pt")
    torch.jit.save(torch.jit.trace(t, torch.zeros(2, 3, SIZE, SIZE)), ts)
    out = str(tmp_path / "cli")
    args = ["--images", images, "--out", out, "--num-classes", "20", "--num-augmentations", "2", "--topk", "3", "--image-size",
            str(SIZE), "--randaugment", "2", "9", "--quiet"]
    assert main(args + ["--teacher", ts]) == 0
    ds = fastload.ReinforcedDataset(out)
    p = _rerun(ds, [t], 4, np.arange(2))
    np.testing.assert_array_equal(ds._targets_row(4)[0], torch.topk(p, 3, 1).indices.numpy())
    pickled = str(tmp_path / "teacher_pickle.pt")
    torch.save(t, pickled)  # a pickle: must not be loaded
    assert main(args[:3] + [str(tmp_path / "cli3")] + args[4:] + ["--teacher", pickled]) == 2


@pytest.mark.slow
def test_cli_with_export_teacher(images, tmp_path):
    from fastload.generate import main

    t = make_teacher(20)
    args = ["--images", images, "--out", str(tmp_path / "cli2"), "--num-classes", "20", "--num-augmentations", "2", "--topk", "3",
            "--image-size", str(SIZE), "--quiet"]
    ep = str(tmp_path / "teacher.pt2")
    torch.export.save(torch.export.export(t, (torch.zeros(2, 3, SIZE, SIZE),),
                                                dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)), ep)
    assert main(args + ["--teacher", ep]) == 0
    ds = fastload.ReinforcedDataset(str(tmp_path / "cli2"))
    p = _rerun(ds, [t], 4, np.arange(2))
    np.testing.assert_array_equal(ds._targets_row(4)[0], torch.topk(p, 3, 1).indices.numpy())


def test_local_engine_does_not_import_ray(images, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # any `import ray` now raises ImportError
    m = fastload.reinforce(images, make_teacher(20), str(tmp_path / "o"), num_classes=20, num_augmentations=1, topk=2,
                           image_size=32, progress=False)
    assert m["complete"]


def test_bad_arguments(images, tmp_path):
    with pytest.raises(ValueError, match="engine"):
        fastload.reinforce(images, make_teacher(20), str(tmp_path / "o"), engine="spark")
    with pytest.raises(ValueError, match="on_error"):
        fastload.reinforce(images, make_teacher(20), str(tmp_path / "o"), on_error="ignore")
    with pytest.raises(ValueError, match="not a directory"):
        fastload.reinforce(str(tmp_path / "missing"), make_teacher(20), str(tmp_path / "o"), image_size=SIZE)


@pytest.mark.slow
def test_ray_engine_writes_and_resumes(images, tmp_path):
    ray = pytest.importorskip("ray")
    t = make_teacher(20)
    kw = dict(num_classes=20, num_augmentations=3, topk=4, image_size=SIZE, policy=POLICY, shard_size=4, progress=False)
    local = str(tmp_path / "local")
    fastload.reinforce(images, t, local, **kw)
    out = str(tmp_path / "ray")
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        fastload.reinforce(images, t, out, engine="ray", **kw)
        # a rerun after losing a listed shard's manifest entry redoes only that shard
        m = json.load(open(os.path.join(out, "manifest.json")))
        keep = {s["file"]: os.stat(os.path.join(out, s["file"])).st_mtime_ns for s in m["shards"][1:]}
        m["shards"] = m["shards"][1:]
        m["complete"] = False
        from fastload.format.manifest import write_manifest

        write_manifest(out, m)
        fastload.reinforce(images, t, out, engine="ray", **kw)
    finally:
        ray.shutdown()
    for f, mt in keep.items():
        assert os.stat(os.path.join(out, f)).st_mtime_ns == mt
    a, b = fastload.ReinforcedDataset(local), fastload.ReinforcedDataset(out, verify=True)
    for i in range(len(a)):  # same seeds per shard: the engines agree exactly
        assert a.augs(i).tobytes() == b.augs(i).tobytes()
        np.testing.assert_array_equal(a._targets_row(i)[0], b._targets_row(i)[0])


def test_reference_model_losses_stored_for_selection(images, tmp_path):
    """reinforce(reference=model) stores the reference's per-example loss of every stored
    augmentation; the selector's reference term is then a lookup of it."""
    from fastload.select import OnlineBatchSelector
    from fastload.select.reference import reference_topk

    torch.manual_seed(0)
    ref_model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 20))
    plain = POLICY.__class__(size=(SIZE, SIZE))
    out = str(tmp_path / "ds")
    m = fastload.reinforce(images, make_teacher(20, seed=0), out, num_classes=20, num_augmentations=3, topk=4,
                           policy=plain, image_size=SIZE, batch_size=5, seed=1, progress=False, reference=ref_model)
    ds = fastload.ReinforcedDataset(out)
    table = np.load(m["reference"])
    assert table.shape == (12, 3) and table.dtype == np.float32
    for a in range(3):  # augmentation a of every row, as the training loader replays it
        L = fastload.ReinforcedLoader(ds, batch_size=12, aug_choice="epoch")
        L.set_epoch(a)
        images_a, labels, _ = next(iter(L))
        with torch.no_grad():
            want = torch.nn.functional.cross_entropy(ref_model(images_a), labels, reduction="none")
        np.testing.assert_allclose(table[:, a], want.numpy(), rtol=1e-5, atol=1e-5)
    # the selector looks each super-batch row's (row, stored augmentation) entry up
    L = fastload.ReinforcedLoader(ds, batch_size=6, shuffle=True, seed=4)
    sel = OnlineBatchSelector(L, None, keep=0.5, score="easy", reference=m["reference"])
    for t, out_b in enumerate(sel):
        rows, _, aug, _ = L.batch_plan(0, t)
        assert out_b.positions.tolist() == reference_topk([-float(table[r, a]) for r, a in zip(rows, aug)], 3)
    with pytest.raises(ValueError, match="reference must be a model"):
        fastload.reinforce(images, make_teacher(20, seed=0), str(tmp_path / "x"), num_classes=20,
                           policy=plain, image_size=SIZE, progress=False, reference="model.pt")
