"""ReinforcedLoader(replay="device") end to end in Triton's interpreter on CPU, against the
C++ path (replay="cpu"): same records, labels and targets; pixels within 1 uint8 level
(1/255/std after normalization), with DCT-domain downscaling (fractional crop windows) and
without, on the embedded photos reinforced with RandAugment + MixUp/CutMix; with v2
RandAugment semantics; on an imported ml-dr dataset (schema-v2 extension records), with
torchvision's and with the pil semantics (Pillow's RandAugment arithmetic); on a dataset
reinforced with timm's RandAugment; and the CPU fallback (one warning) of Pillow's resize,
which the kernel does not implement."""
import os
import warnings

import pytest
import torch

pytest.importorskip("triton")
os.environ.setdefault("TRITON_INTERPRET", "1")

import fastload  # noqa: E402
from fastload.kernels.replay import IMAGENET_STD  # noqa: E402
from fastload.sample import params as P  # noqa: E402

LEVEL = 1.0 / 255.0 / min(IMAGENET_STD)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    pytest.importorskip("skimage")
    from fastload.datasets import build_all
    from fastload.replay.native import have_jpeg

    if not have_jpeg():
        pytest.skip("native JPEG decoder not built")
    paths = build_all(str(tmp_path_factory.mktemp("dev")), n=8, num_augmentations=2,
                      kinds=("ra_mix",), progress=False)
    return fastload.ReinforcedDataset(paths["ra_mix"])


def _pairs(ds, **kw):
    base = dict(batch_size=4, shuffle=True, seed=3, num_workers=0, image_size=16, device="cpu",
                drop_last=True)
    base.update(kw)
    cpu = fastload.ReinforcedLoader(ds, **base)
    dev = fastload.ReinforcedLoader(ds, replay="device", **base)
    return cpu, dev


@pytest.mark.parametrize("dct_scale", [True, False])
def test_device_replay_matches_cpp_path(dataset, dct_scale):
    cpu, dev = _pairs(dataset, dct_scale=dct_scale)
    n = 0
    for (xa, ya, ta), (xb, yb, tb) in zip(cpu, dev):
        assert xb.shape == xa.shape and xb.dtype == xa.dtype
        assert torch.equal(ya, yb) and torch.equal(ta, tb)
        d = (xa - xb).abs() / LEVEL
        # within 1 level (RandAugment's threshold ops may turn a rare 1-level resize
        # difference into a jump at a pixel: allow a few such values, no more)
        assert float((d > 1.01).float().mean()) < 0.002, float(d.max())
        assert float((d > 0.01).float().mean()) < 0.2
        n += 1
    assert n == len(cpu) == 2


def test_device_replay_resumes_like_the_cpu_path(dataset):
    _, dev = _pairs(dataset)
    dev.set_epoch(1)
    it = iter(dev)
    next(it)
    state = dev.state_dict()
    want = next(it)[0]
    _, again = _pairs(dataset)
    again.load_state_dict(state)
    got = next(iter(again))[0]
    assert torch.equal(got, want)


def test_device_replay_arguments(dataset):
    with pytest.raises(ValueError, match="replay"):
        fastload.ReinforcedLoader(dataset, batch_size=2, replay="gpu")
    with pytest.raises(ValueError, match="device="):
        fastload.ReinforcedLoader(dataset, batch_size=2, replay="device")
    with pytest.raises(ValueError, match="float32 or float16"):
        fastload.ReinforcedLoader(dataset, batch_size=2, replay="device", device="cpu",
                                  dtype=torch.uint8)


def _spy(monkeypatch):
    """Record the RandAugment arguments the device path hands to prepare_replay."""
    from fastload.kernels import replay as R

    seen, real = [], R.prepare_replay

    def spy(*a, **kw):
        seen.append(kw)
        return real(*a, **kw)
    monkeypatch.setattr(R, "prepare_replay", spy)
    return seen


def _close(xa, xb):
    d = (xa - xb).abs() / LEVEL
    assert float((d > 1.01).float().mean()) < 0.002, float(d.max())
    assert float((d > 0.01).float().mean()) < 0.2


def test_device_semantics_table_matches_the_kernel():
    from fastload.kernels.replay import SEMANTICS
    from fastload.loader.render import DEVICE_SEMANTICS

    assert DEVICE_SEMANTICS == SEMANTICS


@pytest.mark.slow  # ~40 s in the interpreter
def test_device_replay_v2_semantics(dataset, monkeypatch):
    # a v2 dataset renders on the device (no CPU fallback) with the policy's semantics and
    # bins (the v2 arithmetic itself: tests/test_ra_golden_triton.py)
    ds = fastload.ReinforcedDataset(dataset.path)
    ds.manifest["policy"]["randaugment_semantics"] = "v2"
    assert ds.policy.randaugment_semantics == "v2"
    seen = _spy(monkeypatch)
    cpu, dev = _pairs(ds, dct_scale=False)
    (xa, ya, _), (xb, yb, _) = next(iter(cpu)), next(iter(dev))
    assert torch.equal(ya, yb)
    _close(xa, xb)
    assert len(seen) == 1
    assert all(kw["ra_semantics"] == "v2" and kw["ra_num_bins"] == ds.policy.ra_num_bins for kw in seen)


def _cpu_and_device(ds, **kw):
    """The first batch of the same loader on the CPU path and with replay="device" (taken with
    warnings as errors: the device path must not fall back)."""
    cpu = fastload.ReinforcedLoader(ds, **kw)
    dev = fastload.ReinforcedLoader(ds, replay="device", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xb = next(iter(dev))[0]
    return next(iter(cpu))[0], xb


def _mldr_dataset(tmp_path, semantics):
    pytest.importorskip("PIL")
    from fastload.importers import mldr
    from test_mldr import SIZE, _setup

    imgs, _, _, arch, _ = _setup(tmp_path, "mix_rare", "tar", n=6, num_samples=2, float_mags=True)
    mldr.import_mldr(arch, imgs, str(tmp_path / "out"), progress=False, semantics=semantics)
    return fastload.ReinforcedDataset(str(tmp_path / "out")), SIZE


def test_device_replay_extension_records(tmp_path, monkeypatch):
    # an imported ml-dr dataset (schema-v2 extension records: float magnitudes, black
    # erasing, the partner's own RandAugment and erasing) renders on the device like the
    # C++ path renders it
    ds, size = _mldr_dataset(tmp_path, "generation")
    assert ds.has_ext
    # the import resizes as Pillow does (resize="pil"), which the Triton replay leaves to the
    # CPU path; the extension records are compared under torch's resize, which it implements
    monkeypatch.setitem(ds.manifest["policy"], "resize", "torch")
    assert ds.policy.resize == "torch"
    seen = _spy(monkeypatch)
    kw = dict(batch_size=6, shuffle=False, aug_choice="epoch", image_size=size, target_mode="mldr",
              num_workers=0, device="cpu")
    cpu = fastload.ReinforcedLoader(ds, **kw)
    dev = fastload.ReinforcedLoader(ds, replay="device", **kw)
    xa, xb = next(iter(cpu))[0], next(iter(dev))[0]
    e = seen[0]["ext"] if len(seen) == 1 else None
    assert e is not None and (e["ext"] & P.EXT_RA_FLOAT).any() and (e["ext"] & P.EXT_ERASE_BLACK).any()
    assert ((e["ext"] & P.EXT_PARTNER_AUG) != 0).any() and (e["pra_ops"] != P.RA_NONE).any()
    assert tuple(seen[0]["box_grid"]) == tuple(ds.replay["box_grid"])
    _close(xa, xb)


def test_device_replay_pil_semantics(tmp_path, monkeypatch):
    # an ml-dr "training" import (randaugment_semantics="pil", extension records with float
    # magnitudes), with torch's resize instead of its Pillow resize, renders on the device, no
    # CPU fallback, like the C++ path renders it (the pil arithmetic itself:
    # tests/test_ra_golden_triton_pil.py)
    ds, size = _mldr_dataset(tmp_path, "training")
    ds.manifest["policy"]["resize"] = "torch"
    assert ds.policy.randaugment_semantics == "pil" and ds.policy.resize == "torch" and ds.has_ext
    seen = _spy(monkeypatch)
    kw = dict(batch_size=6, shuffle=False, aug_choice="epoch", image_size=size, target_mode="mldr",
              num_workers=0, device="cpu")
    xa, xb = _cpu_and_device(ds, **kw)
    assert len(seen) == 1 and seen[0]["ra_semantics"] == "pil"
    e = seen[0]["ext"]
    assert e is not None and (e["ext"] & P.EXT_RA_FLOAT).any()
    _close(xa, xb)


def test_device_replay_pil_resize_falls_back_with_one_warning(tmp_path, monkeypatch):
    ds, size = _mldr_dataset(tmp_path, "training")  # randaugment_semantics="pil"
    assert ds.policy.randaugment_semantics == "pil" and ds.policy.resize == "pil"
    seen = _spy(monkeypatch)
    kw = dict(batch_size=3, shuffle=False, aug_choice="epoch", image_size=size, target_mode="mldr",
              num_workers=0, device="cpu")
    cpu = fastload.ReinforcedLoader(ds, **kw)
    dev = fastload.ReinforcedLoader(ds, replay="device", **kw)
    with pytest.warns(UserWarning, match="does not implement randaugment_semantics='pil' with resize='pil'") as rec:
        got = [b[0] for b in dev]
    assert len([w for w in rec if "randaugment_semantics" in str(w.message)]) == 1 and not seen
    for xa, xb in zip([b[0] for b in cpu], got):
        assert torch.equal(xa, xb)


def test_device_replay_timm_semantics(tmp_path, monkeypatch):
    # a dataset reinforced with timm's RandAugment (levels and draws in the extension records,
    # a fill colour of its own) renders on the device, no CPU fallback, with the policy's fill,
    # like the C++ path renders it (the timm arithmetic itself: tests/test_ra_golden_triton_timm.py)
    from test_ra_timm import timm_dataset

    _, out = timm_dataset(tmp_path, "rand-m9-mstd0.5-inc1-p1.0", 24, 2)
    ds = fastload.ReinforcedDataset(out)
    assert ds.policy.randaugment_semantics == "timm" and ds.has_ext
    seen = _spy(monkeypatch)
    from fastload.kernels import replay as R

    launched, real_launch = [], R.launch_replay

    def launch(images, plan, *a, **k):  # (a ValueError in the device path falls back silently)
        launched.append((plan.semantics, plan.fill, plan.S))
        return real_launch(images, plan, *a, **k)
    monkeypatch.setattr(R, "launch_replay", launch)
    kw = dict(batch_size=6, shuffle=False, num_workers=0, image_size=24, device="cpu")
    xa, xb = _cpu_and_device(ds, **kw)
    assert len(seen) == 1 and seen[0]["ra_semantics"] == "timm" and tuple(seen[0]["ra_fill"]) == (10, 200, 30)
    assert launched == [("timm", (10.0, 200.0, 30.0), 2)]
    e = seen[0]["ext"]
    assert e is not None and (e["ext"] & P.EXT_RA_FLOAT).any()
    _close(xa, xb)
