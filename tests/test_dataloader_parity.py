"""DataLoader parity of ReinforcedLoader and ReinforcedDataset (issue 11, "Seen" list): every
torch.utils.data.DataLoader argument is honored or rejected with a message saying what to do,
a plain DataLoader over a ReinforcedDataset works, sizes and classes default to the data, and
a configuration with no step is an error."""
from __future__ import annotations

import multiprocessing
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from fastload.format.reader import ReinforcedDataset
from fastload.loader.reinforced import ReinforcedLoader

from _ddp_loader_worker import write_dataset


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("par") / "d"), n=13)


@pytest.fixture(scope="module")
def ds(path):
    return ReinforcedDataset(path)


def _rows(loader):
    return [tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in b) for b in loader]


def test_collate_fn_is_a_batch_hook(ds):
    seen = []

    def to_dict(batch):
        seen.append(len(batch))
        images, labels, targets = batch
        return {"pixel_values": images, "labels": labels, "targets": targets}

    plain = _rows(ReinforcedLoader(ds, batch_size=4))
    got = list(ReinforcedLoader(ds, batch_size=4, collate_fn=to_dict))
    assert seen == [3] * len(plain) and set(got[0]) == {"pixel_values", "labels", "targets"}
    for p, g in zip(plain, got):
        assert torch.equal(p[0], g["pixel_values"]) and torch.equal(p[1], g["labels"])
    # default_collate (what a DataLoader user passes explicitly) leaves batches as they are
    dc = _rows(ReinforcedLoader(ds, batch_size=4, collate_fn=default_collate))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(plain, dc))


def test_batch_size_none_yields_samples(ds):
    batched = _rows(ReinforcedLoader(ds, batch_size=1))
    single = _rows(ReinforcedLoader(ds, batch_size=None))
    assert len(single) == len(ds)
    img, label, target = single[0]
    assert img.shape == batched[0][0].shape[1:] and label.ndim == 0 and target.ndim == 1
    for b, s in zip(batched, single):
        assert torch.equal(b[0][0], s[0]) and int(b[1][0]) == int(s[1])


def test_accepted_dataloader_arguments(ds):
    ref = _rows(ReinforcedLoader(ds, batch_size=4, num_workers=2))
    got = _rows(ReinforcedLoader(ds, batch_size=4, num_workers=2, timeout=30,
                                 multiprocessing_context=multiprocessing.get_context("spawn"),
                                 in_order=False, pin_memory_device=""))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ref, got))
    ReinforcedLoader(ds, batch_size=4, multiprocessing_context="spawn", pin_memory_device="cuda")


@pytest.mark.parametrize("kw, match", [
    (dict(worker_init_fn=lambda w: None), "worker_init_fn.*seed= or generator="),
    (dict(timeout=-1), "timeout"),
    (dict(pin_memory_device="xpu"), "pin_memory_device.*device="),
    (dict(multiprocessing_context="nope"), "multiprocessing_context"),
    (dict(collate_fn=3), "collate_fn"),
    (dict(in_order="yes"), "in_order"),
])
def test_rejected_arguments_say_what_to_do(ds, kw, match):
    with pytest.raises(ValueError, match=match):
        ReinforcedLoader(ds, batch_size=4, **kw)


def test_timeout_raises_when_no_batch_arrives(ds, monkeypatch):
    import time

    L = ReinforcedLoader(ds, batch_size=4, num_workers=1, timeout=0.3)
    real = L._gather.prepare

    def slow(*a, **k):
        time.sleep(3)
        return real(*a, **k)

    monkeypatch.setattr(L._gather, "prepare", slow)  # the gather stage stalls
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="timed out after 0.3 seconds"):
        next(iter(L))
    assert time.perf_counter() - t0 < 2.5


def test_image_size_and_classes_default_to_the_manifest(ds):
    stored = tuple(ds.replay["image_size"]) if not isinstance(ds.replay["image_size"], int) \
        else (ds.replay["image_size"],) * 2
    L = ReinforcedLoader(ds, batch_size=4)
    assert L.image_size == stored and L.num_classes == ds.num_classes
    images, _, targets = next(iter(L))
    assert tuple(images.shape[2:]) == stored and targets.shape[1] == ds.num_classes
    other = (stored[0] // 2, stored[1] // 2)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ReinforcedLoader(ds, batch_size=4, image_size=other)
        ReinforcedLoader(ds, batch_size=4, image_size=other)
    notes = [x for x in w if "reinforced at" in str(x.message)]
    assert len(notes) == 1  # one-time note
    wide = ReinforcedLoader(ds, batch_size=4, num_classes=ds.num_classes + 3)
    assert next(iter(wide))[2].shape[1] == ds.num_classes + 3
    with pytest.raises(ValueError, match="num_classes"):
        ReinforcedLoader(ds, batch_size=4, num_classes=ds.num_classes - 1)


def test_zero_steps_is_an_error(ds):
    with pytest.raises(ValueError, match="0 steps.*batch_size=64.*drop_last"):
        ReinforcedLoader(ds, batch_size=64, drop_last=True)


@pytest.mark.parametrize("workers", [0, 2])
def test_plain_dataloader_over_reinforced_dataset(path, workers):
    ds = ReinforcedDataset(path).configure_items(seed=3)
    ref = _rows(ReinforcedLoader(ReinforcedDataset(path), batch_size=4, seed=3))
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        got = _rows(DataLoader(ds, batch_size=4, num_workers=workers))
        ref_l = ReinforcedLoader(ReinforcedDataset(path), batch_size=4, seed=3)
        ref_l.set_epoch(epoch)
        ref = _rows(ref_l)
        assert len(got) == len(ref)
        for g, r in zip(got, ref):
            assert torch.equal(g[0], r[0]) and torch.equal(g[1], r[1])
            torch.testing.assert_close(g[2], r[2])
    # deterministic per index and epoch, different across epochs
    ds.set_epoch(0)
    a = ds[5][0]
    ds.set_epoch(1)
    assert not torch.equal(a, ds[5][0])
    ds.set_epoch(0)
    assert torch.equal(a, ds[5][0])
    assert ds.record(5)["key"] == ds.keys[5]


def test_decomposition_loader_zero_steps_is_an_error(tmp_path):
    import fastload

    toks = np.random.default_rng(0).integers(0, 256, 20000).astype(np.int32)
    fastload.decompose((toks, np.arange(0, 20001, 400)), str(tmp_path), min_bucket=4, max_bucket=6,
                       vocab_size=257, eot_id=256, progress=False)
    assert len(fastload.DecompositionLoader(str(tmp_path), tokens_per_step=256)) > 0
    with pytest.raises(ValueError, match=r"0 steps.*tokens_per_step=524288.*Lower tokens_per_step"):
        fastload.DecompositionLoader(str(tmp_path), tokens_per_step=2**19)
