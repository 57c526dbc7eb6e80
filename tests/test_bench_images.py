"""fastload bench (images): the embedded dataset, the baseline pipelines, and a --quick run on
a tiny dataset (shapes and values only, never speed)."""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from fastload import datasets as bench_data
from fastload.bench import peers

pytest.importorskip("skimage")


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bench") / "jpeg")
    return bench_data.build_images(root, n=24, seed=3, progress=False)


def test_dataset_builder_makes_distinct_valid_jpegs(tiny_images, tmp_path):
    paths, labels, classes = bench_data.list_images(tiny_images)
    assert len(paths) == 24
    assert len(classes) >= 3 and len(set(labels)) == min(24, len(classes))
    digests, pixels = set(), set()
    for p in paths:
        raw = open(p, "rb").read()
        assert raw[:3] == b"\xff\xd8\xff"  # JPEG SOI
        digests.add(hashlib.sha1(raw).hexdigest())
        im = Image.open(io.BytesIO(raw))
        assert im.format == "JPEG" and im.mode == "RGB"
        assert im.size in ((500, 375), (375, 500))
        a = np.asarray(im.convert("RGB"))
        assert a.std() > 5  # a photo, not a flat image
        pixels.add(hashlib.sha1(a.tobytes()).hexdigest())
        # quality 90: the luminance table PIL writes for quality 90 has small steps
        assert max(im.quantization[0]) <= 40
    assert len(digests) == 24 and len(pixels) == 24
    # deterministic and prefix-stable: the first 10 images of (seed 3) are the same files
    again = bench_data.build_images(str(tmp_path / "again"), n=10, seed=3, progress=False)
    p2, _, _ = bench_data.list_images(again)
    by_name = {os.path.basename(p): open(p, "rb").read() for p in paths}
    for p in p2:
        assert open(p, "rb").read() == by_name[os.path.basename(p)]


def test_dataset_builder_rejects_bad_n(tmp_path):
    with pytest.raises(ValueError, match="n must be positive"):
        bench_data.build_images(str(tmp_path), n=0)


def test_rrc_params_follow_torchvision_rule():
    rng = random.Random(0)
    for h, w in ((375, 500), (500, 375), (224, 224), (40, 400)):
        for _ in range(300):
            top, left, bh, bw = peers.rrc_params(h, w, rng)
            assert 0 <= top and top + bh <= h and 0 <= left and left + bw <= w and bh > 0 and bw > 0
            if (h, w) != (40, 400):  # no fallback possible for these shapes... except rarely
                area = bh * bw / (h * w)
                assert 0.07 <= area <= 1.0 + 1e-9
    # the extreme aspect falls back to the central crop of ratio 4/3
    fallback = [peers.rrc_params(4, 400, random.Random(s)) for s in range(20)]
    assert all(b == (0, 197, 4, 5) for b in fallback)


def test_dct_denom_matches_loader_rule():
    assert peers.dct_denom(375, 500, 224, 224) == 1
    assert peers.dct_denom(448, 448, 224, 224) == 2
    assert peers.dct_denom(1800, 1800, 224, 224) == 8
    assert peers.dct_denom(900, 2000, 224, 224) == 4


def test_pil_baseline_matches_plain_reference(tiny_images):
    """The torchvision stand-in == crop + bilinear resize + flip + ToTensor + Normalize done
    by hand from the same sampled box."""
    ds = peers.PilRRCDataset(tiny_images, size=32)
    ds._rng = random.Random(7)
    x, label = ds[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    rng = random.Random(7)
    path, lab = ds.items[5]
    img = Image.open(path).convert("RGB")
    top, left, h, w = peers.rrc_params(img.height, img.width, rng)
    ref = img.crop((left, top, left + w, top + h)).resize((32, 32), Image.BILINEAR)
    if rng.random() < 0.5:
        ref = ref.transpose(Image.FLIP_LEFT_RIGHT)
    ref = torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1).float() / 255
    ref = (ref - torch.tensor(peers.MEAN).view(3, 1, 1)) / torch.tensor(peers.STD).view(3, 1, 1)
    assert label == lab
    assert torch.allclose(x, ref, atol=1e-6)


@pytest.mark.parametrize("op", peers.RA_OPS)
def test_ra_ops_keep_uint8_and_match_simple_references(op):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8, generator=g)
    mag = peers._ra_magnitude(op, 9, 20, 24)
    y = peers.apply_ra_op(x, op, mag)
    assert y.shape == x.shape and y.dtype == torch.uint8
    xi = x.numpy().astype(np.int64)
    if op == "Identity":
        assert torch.equal(x, y)
    elif op == "Posterize":
        assert mag == 7
        assert np.array_equal(y.numpy(), (xi & 0xFE).astype(np.uint8))
    elif op == "Solarize":
        assert np.array_equal(y.numpy(), np.where(xi >= mag, 255 - xi, xi).astype(np.uint8))
    elif op == "Brightness":
        ref = np.clip(xi * (1 + mag), 0, 255).astype(np.uint8)
        assert np.abs(y.numpy().astype(int) - ref.astype(int)).max() <= 1
    elif op == "AutoContrast":
        lo = xi.min(axis=(1, 2), keepdims=True)
        hi = xi.max(axis=(1, 2), keepdims=True)
        ref = np.clip((xi - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)
        assert np.abs(y.numpy().astype(int) - ref.astype(int)).max() <= 1
    elif op == "TranslateX":
        t = int(round(mag))
        assert torch.equal(y[:, :, t:], x[:, :, :-t]) and int(y[:, :, :t].max()) == 0


def test_mix_collate_mixes_images_and_targets_consistently():
    collate = peers._mix_collate(num_classes=5, seed=1)
    batch = [(torch.full((3, 8, 8), float(i)), i % 5) for i in range(4)]
    for _ in range(6):
        x, y = collate(batch)
        assert x.shape == (4, 3, 8, 8) and y.shape == (4, 5)
        assert torch.allclose(y.sum(1), torch.ones(4))
        # image k mixes itself with image k-1: its mean equals the target's weighted class mix
        lam = y[1, 1].item()
        assert math.isclose(x[1].mean().item(), lam * 1 + (1 - lam) * 0, abs_tol=1e-5)


def test_process_tree_measures():
    me = os.getpid()
    assert me in peers.process_tree(me)
    assert peers.tree_cpu_seconds(me) > 0
    m = peers.tree_memory_mib(me)
    assert m["rss"] > 10 and m["anon"] > 0


def _cfg(images, **kw):
    return {"images": images, "image_size": 48, "batch_size": 4, "workers": 0, "threads": 1, "seed": 0,
            "warmup": 1, "max_batches": 2, "seconds": 30, **kw}


def test_baseline_and_reinforced_loader_batches_in_process(tiny_images, tmp_path):
    """The runner on the torch_pil baseline and ReinforcedLoader (no subprocess)."""
    base = peers.run({**_cfg(tiny_images), "pipeline": "torch_pil"})
    imgs, labels = base["batches_desc"]
    assert imgs["shape"] == [4, 3, 48, 48] and imgs["dtype"] == "float32"
    assert -2.2 < imgs["min"] < 0 < imgs["max"] < 2.7
    assert labels["shape"] == [4] and base["images"] == 8 and base["cpu_s_per_image"] > 0
    rpath = bench_data.build_reinforced(tiny_images, str(tmp_path / "r"), kind="crop", num_augmentations=2,
                                        image_size=48, progress=False)
    ours = peers.run({**_cfg(tiny_images, workers=1), "reinforced": rpath, "pipeline": "fastload"})
    imgs, labels, targets = ours["batches_desc"]
    assert imgs["shape"] == [4, 3, 48, 48] and imgs["dtype"] == "float32"
    assert -2.2 < imgs["min"] < 0 < imgs["max"] < 2.7
    assert labels["shape"] == [4] and labels["dtype"] == "int64"
    n_classes = len(bench_data.list_images(tiny_images)[2])
    assert targets["shape"] == [4, n_classes] and targets["min"] >= 0 and targets["max"] <= 1
    assert ours["images"] == 8
    # loader.stats() over the timed batches: every stage saw them, none took negative time
    assert list(ours["stages"]) == ["plan", "gather", "render", "deliver"]
    assert ours["stages"]["deliver"]["batches"] == 2  # the caller-side stage; the others run ahead
    assert all(v["seconds"] >= 0 for v in ours["stages"].values())
    assert "stages" not in base


def test_decode_floor_pipeline_counts_every_image_in_process(tiny_images, tmp_path):
    """The decode_floor pipeline: one stored crop per sample, its settings reported."""
    from fastload.replay import native

    if not native._lib().fl_replay_have_jpeg():
        pytest.skip("built without libjpeg")
    rpath = bench_data.build_reinforced(tiny_images, str(tmp_path / "r"), kind="crop", num_augmentations=2,
                                        image_size=48, progress=False)
    res = peers.run({**_cfg(tiny_images), "reinforced": rpath, "pipeline": "decode_floor"})
    assert res["batches_desc"] == [{"count": 4}] and res["images"] == 8
    assert res["settings"]["dct_rule"] == "pow2" and res["settings"]["threads"] == 1


@pytest.mark.slow
def test_quick_run_batches_have_the_right_shapes(tmp_path, capsys):
    """A --quick run on a tiny dataset: the baseline and ReinforcedLoader produce batches of
    the right shape and range; the result file and its tables are written."""
    from fastload.bench import images

    out = tmp_path / "res"
    rc = images.main(["--quick", "--data-dir", str(tmp_path / "data"), "--num-images", "40",
                      "--batch-size", "8", "--image-size", "64", "--augmentations", "2",
                      "--pipelines", "torch_pil,fastload,decode_full", "--seconds", "0.2",
                      "--max-batches", "2", "--warmup", "1", "--workers", "2", "--rss-epochs", "2",
                      "--out-dir", str(out), "--no-chart"])
    assert rc == 0
    doc = json.load(open(out / "images.json"))
    res = doc["results"]
    for name in ("torch_pil", "fastload"):
        assert "error" not in res[name], res[name].get("error")
        images_d, labels_d = res[name]["batches_desc"][:2]
        assert images_d["shape"] == [8, 3, 64, 64] and images_d["dtype"] == "float32"
        # normalized pixels of real photos: within the ImageNet-normalized range, not flat
        assert -2.2 < images_d["min"] < 0 < images_d["max"] < 2.7
        assert labels_d["shape"] == [8] and labels_d["dtype"] == "int64"
        assert 0 <= labels_d["min"] and labels_d["max"] < 16
        assert res[name]["images"] >= 8 and res[name]["images_per_s"] > 0
        assert res[name]["peak_rss_mib"] > 0
    targets_d = res["fastload"]["batches_desc"][2]
    assert targets_d["shape"][0] == 8 and 0 <= targets_d["min"] and targets_d["max"] <= 1
    assert res["decode_full"]["batches_desc"] == [{"count": 8}]
    # the ratio is named after what ran (the stand-in), never after torchvision
    assert doc["ratios"]["baseline"] == "torch_pil" and doc["ratios"]["fastload_vs_torch_pil"] > 0
    assert not any("torchvision" in k for k in doc["ratios"]) and "targets_met" not in doc
    assert doc["stable_ratio"] in ("images_per_s", "per_cpu_second")
    runs = [f for f in os.listdir(out) if f.startswith("images-") and f.endswith("Z.json")]
    assert len(runs) == 1 and json.load(open(out / runs[0])) == doc  # per-run file + latest copy
    assert [r["pipeline"] for r in doc["table_rrc_flip"]] == ["torch_pil", "fastload", "decode_full"]
    mem = doc["memory"]
    assert len(mem["epochs"]["rss_per_epoch_mib"]) == 2 and mem["peak_rss_large_mib"] > 0
    assert set(res["fastload"]["stages"]) == {"plan", "gather", "render", "deliver"}
    assert "loader.stats() of fastload: ms per batch by stage" in capsys.readouterr().out


def _ratio_fns(ips, cpu):
    def ratio(a, b):
        return ips[a] / ips[b] if ips.get(a) and ips.get(b) else None

    def cpu_ratio(a, b):
        return cpu[b] / cpu[a] if cpu.get(a) and cpu.get(b) else None
    return ratio, cpu_ratio


def test_ratios_are_named_after_what_was_measured():
    from fastload.bench import images

    ips = {"fastload": 900.0, "torch_pil": 300.0, "decode_scaled": 1000.0}
    cpu = {"fastload": 0.001, "torch_pil": 0.004, "decode_scaled": 0.0008}
    ratios, per_cpu = images.named_ratios(*_ratio_fns(ips, cpu), "torch_pil", "torch_ra_mix")
    assert set(ratios) == {"fastload_vs_torch_pil", "fastload_of_decode_limit"}
    assert ratios["fastload_vs_torch_pil"] == 3.0 and per_cpu["fastload_vs_torch_pil"] == 4.0
    # quiet machine: targets appear as information, only for ratios against the real peer
    quiet = "\n".join(images.ratio_lines(ratios, per_cpu, max_load=0.5, cores=2))
    assert "fastload_vs_torch_pil: 3.00x images/s, 4.00x images per CPU-second" in quiet
    assert "torchvision" not in quiet and "MISSED" not in quiet and "met" not in quiet.split()
    assert "design target >= 0.75x, information only" in quiet  # decode limit is measured
    assert "issue" not in quiet.lower()
    # SPDL and the decode floor, when they ran
    ips.update(spdl=450.0, decode_floor=1200.0, fastload_ra_mix=300.0, spdl_ra_mix=100.0)
    cpu.update(spdl=0.003, decode_floor=0.0006, fastload_ra_mix=0.002, spdl_ra_mix=0.008)
    ratios, per_cpu = images.named_ratios(*_ratio_fns(ips, cpu), "torch_pil", "torch_ra_mix")
    assert ratios["fastload_vs_spdl"] == 2.0 and per_cpu["fastload_vs_spdl"] == 3.0
    assert ratios["fastload_of_decode_floor"] == 0.75 and per_cpu["fastload_of_decode_floor"] == 0.6
    assert ratios["ra_mix_fastload_vs_spdl_ra_mix"] == 3.0 and per_cpu["ra_mix_fastload_vs_spdl_ra_mix"] == 4.0


def test_loaded_machine_reports_per_cpu_ratios_and_no_target():
    from fastload.bench import images

    ips = {"fastload": 900.0, "torchvision": 300.0}
    cpu = {"fastload": 0.001, "torchvision": 0.0025}
    ratios, per_cpu = images.named_ratios(*_ratio_fns(ips, cpu), "torchvision", "torchvision_v2_ra")
    text = "\n".join(images.ratio_lines(ratios, per_cpu, max_load=7.3, cores=2))
    assert "fastload_vs_torchvision: 3.00x images/s, 2.50x images per CPU-second" in text
    assert "per-CPU-second ratios are the stable figure" in text and "7.3 on 2 cores" in text
    assert "target" not in text.replace("No target is shown", "")
    # too short to measure CPU time: no per-CPU ratio, and the run says so instead
    short = "\n".join(images.ratio_lines(ratios, {k: None for k in per_cpu}, max_load=7.3, cores=2))
    assert "too short to measure CPU time" in short and "stable figure of this run" not in short


def test_data_dir_only_where_told(tmp_path, capsys):
    from fastload.bench import images

    busy = tmp_path / "my_photos"
    busy.mkdir()
    (busy / "holiday.jpg").write_bytes(b"x")
    assert images.main(["--data-dir", str(busy), "--no-chart"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not empty and is not a fastload bench cache" in err
    assert sorted(os.listdir(busy)) == ["holiday.jpg"]  # nothing written there
    images.check_data_dir(str(tmp_path / "new"))  # a new folder is fine
    (tmp_path / "owned").mkdir()
    (tmp_path / "owned" / images.CACHE_MARKER).write_text("{}")
    (tmp_path / "owned" / "jpeg-24-s0").mkdir()
    images.check_data_dir(str(tmp_path / "owned"))  # one it wrote before is fine


def test_write_result_keeps_every_run(tmp_path):
    from fastload._results import write_result

    a = write_result("demo", {"x": 1}, str(tmp_path), stamp="20261207T013000Z")
    b = write_result("demo", {"x": 2}, str(tmp_path), stamp="20261207T013100Z")
    assert os.path.basename(a) == "demo-20261207T013000Z.json" and json.load(open(a))["x"] == 1
    assert json.load(open(b))["x"] == 2 and json.load(open(tmp_path / "demo.json"))["x"] == 2
    assert sorted(os.listdir(tmp_path)) == ["demo-20261207T013000Z.json", "demo-20261207T013100Z.json",
                                            "demo.json"]


def test_install_system_packages_only_with_peers_auto(capsys):
    from fastload.bench import images

    assert images.main(["--install-system-packages"]) == 2
    assert "use it with --peers auto" in capsys.readouterr().err
