"""Online batch selection (fastload.select): the rules against the plain reference written
from the papers' formulas, and the selector on real small reinforced datasets (real JPEGs,
the real replay kernel)."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastload.format.reader import ReinforcedDataset
from fastload.loader.reinforced import ReinforcedLoader
from fastload.select import OnlineBatchSelector, rules, score_reference
from fastload.select import reference as R

from _ddp_loader_worker import write_dataset

S = 16


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return ReinforcedDataset(write_dataset(str(tmp_path_factory.mktemp("sel") / "d"), n=23))


@pytest.fixture(scope="module")
def text_ds(tmp_path_factory):
    return ReinforcedDataset(write_dataset(str(tmp_path_factory.mktemp("seltxt") / "d"), n=14,
                                           kind="image_text"))


# ---------------------------------------------------------------- rules vs reference
@pytest.mark.parametrize("seed", range(5))
def test_topk_and_sample_match_reference(seed):
    g = torch.Generator().manual_seed(seed)
    st, ref = torch.randn(40, generator=g), torch.randn(40, generator=g)
    st[3] = st[7]  # a tie
    for score in rules.SCORES:
        s = rules.combine(st.double(), ref.double(), score)
        r = R.reference_scores(st.tolist(), ref.tolist(), score)
        assert np.allclose(s.numpy(), r)
        assert rules.select_topk(s, 9).tolist() == R.reference_topk(r, 9)
        for T in (0.5, 2.0):
            a = rules.select_sample(s, 9, torch.Generator().manual_seed(seed + 10), T)
            b = R.reference_sample(r, 9, torch.Generator().manual_seed(seed + 10), T)
            assert a.tolist() == b
            assert len(set(a.tolist())) == 9


@pytest.mark.parametrize("seed,chunks", [(0, 1), (1, 3), (2, 4), (3, 12)])
def test_joint_matches_reference(seed, chunks):
    g = torch.Generator().manual_seed(seed)
    img, txt = torch.randn(24, 8, generator=g), torch.randn(24, 8, generator=g)
    ref_img = img + 0.3 * torch.randn(24, 8, generator=g)
    A_st = rules.sigmoid_pair_losses(img, txt, 10.0, -10.0)
    assert torch.allclose(A_st, R.reference_sigmoid_pairs(img, txt, 10.0, -10.0), atol=1e-9)
    A = rules.combine(A_st, rules.sigmoid_pair_losses(ref_img, txt), "learnability")
    a = rules.select_joint(A, 12, torch.Generator().manual_seed(seed), chunks, 0.7)
    b = R.reference_joint(A, 12, torch.Generator().manual_seed(seed), chunks, 0.7)
    assert a.tolist() == b and len(set(b)) == 12


def test_sample_follows_softmax_law():
    # one draw of 1 from 3 candidates: frequencies follow softmax(scores)
    s = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    counts = np.bincount([int(rules.select_sample(s, 1, g)[0]) for _ in range(6000)], minlength=3)
    p = torch.softmax(s, 0).numpy()
    assert np.allclose(counts / 6000, p, atol=0.03)


# ---------------------------------------------------------------- selector on a dataset
def _mean_score(batch):
    return batch[0].float().mean(dim=(1, 2, 3))


def _loader(ds, **kw):
    kw.setdefault("image_size", S)
    kw.setdefault("batch_size", 10)
    kw.setdefault("shuffle", True)
    kw.setdefault("seed", 3)
    return ReinforcedLoader(ds, **kw)


def test_batch_plan_rows_match_the_loader(ds):
    for w, r in [(1, 0), (2, 1), (3, 2)]:
        L = _loader(ds, rank=r, world_size=w, batch_size=4)
        L.set_epoch(1)
        plan = [idx for _, idx, _ in L._plan(1, 0)]
        assert [L.batch_plan(1, t).indices.tolist() for t in range(len(plan))] == [p.tolist() for p in plan]
    L = _loader(ds)
    for t, (images, labels, _) in enumerate(L):
        assert labels.tolist() == np.asarray(ds.labels)[L.batch_plan(0, t).indices].tolist()


def test_batch_plan_is_what_the_loader_renders(ds):
    """batch_plan's rows, views and augmentations are the gather's: the stored records it
    names are the ones the batch replays (views_per_decode=2, some fresh rows)."""
    L = _loader(ds, batch_size=4, views_per_decode=2, p_reinforced=0.5, rank=1, world_size=2)
    for t in range(len(L)):
        p = L.batch_plan(1, t)
        idx = [i for s, i, _ in L._plan(1, t)][0]
        prep = L._prepare(1, t, idx, L.image_size)
        assert p.indices.tolist() == prep["rows"].tolist() == np.repeat(idx, 2).tolist()
        assert p.views.tolist() == [0, 1] * len(idx)
        stored = np.asarray(ds.gather(p.indices, p.aug_ids)[1]).reshape(-1)
        assert (prep["recs"][~p.fresh] == stored[~p.fresh]).all()
    assert any(L.batch_plan(1, t).fresh.any() for t in range(len(L)))
    with pytest.raises(IndexError, match="outside"):
        L.batch_plan(0, len(L))
    bs = ReinforcedLoader(ds, batch_sampler=[[0, 1], [2, 3]], image_size=S)
    with pytest.raises(ValueError, match="batch_plan needs"):
        bs.batch_plan(0, 0)


@pytest.mark.parametrize("method", ["topk", "sample"])
def test_selector_keeps_the_reference_indices(ds, method):
    ref = np.random.default_rng(0).standard_normal(len(ds))
    sel = OnlineBatchSelector(_loader(ds), _mean_score, keep=0.3, method=method, reference=ref,
                              seed=5, temperature=0.5)
    plain = _loader(ds)
    for t, (out, full) in enumerate(zip(sel, plain)):
        rows = plain.batch_plan(0, t).indices
        st = _mean_score(full).double()
        r = R.reference_scores(st.tolist(), ref[rows].tolist(), "learnability")
        k = max(1, round(len(rows) * 0.3))
        if method == "topk":
            want = R.reference_topk(r, k)
        else:
            want = R.reference_sample(r, k, sel._generator(0, t, 0), 0.5)
        assert out.positions.tolist() == want
        assert out.indices.tolist() == rows[want].tolist()
        images, labels, targets = out.batch
        assert torch.equal(images, full[0][want]) and torch.equal(targets, full[2][want])
        assert labels.tolist() == np.asarray(ds.labels)[rows[want]].tolist()


def test_default_reference_is_the_stored_teacher_loss(ds):
    for fmt in ("dense", "topk"):
        sel = OnlineBatchSelector(_loader(ds, target_format=fmt), None, keep=0.5, score="easy")
        plain = _loader(ds, target_format="dense")
        out, full = next(iter(sel)), next(iter(plain))
        images, labels, targets = full
        r = [-np.log(max(float(targets[i, labels[i]]), 1e-6)) for i in range(len(labels))]
        want = R.reference_topk([-x for x in r], 5)
        if fmt == "dense":
            assert out.positions.tolist() == want
        else:  # top-k targets: the label's stored probability without smoothing
            ids, probs = next(iter(_loader(ds, target_format="topk")))[2]
            p = [float(probs[i][ids[i] == labels[i]].sum()) for i in range(len(labels))]
            want = R.reference_topk([np.log(max(x, 1e-6)) for x in p], 5)
            assert out.positions.tolist() == want


def test_render_less_renders_the_kept_rows_at_full_size(ds):
    low = _loader(ds, image_size=8, num_workers=2)
    sel = OnlineBatchSelector(low, _mean_score, keep=0.4, score="hard", render_size=S)
    plain = _loader(ds, image_size=S)
    n = 0
    for out, full, small in zip(sel, plain, _loader(ds, image_size=8)):
        want = R.reference_topk(_mean_score(small).tolist(), max(1, round(len(small[1]) * 0.4)))
        assert out.positions.tolist() == want
        images, labels, targets = out.batch
        assert images.shape[-2:] == (S, S)
        assert torch.equal(images, full[0][want])
        assert torch.equal(labels, full[1][want]) and torch.equal(targets, full[2][want])
        n += 1
    assert n == len(plain)


def test_exact_resume(ds):
    def run(sel, steps=None):
        out = []
        for b in sel:
            out.append(b.indices.tolist())
            if steps is not None and len(out) == steps:
                break
        return out

    make = lambda: OnlineBatchSelector(_loader(ds, batch_size=5), _mean_score, keep=0.4,
                                       method="sample", reference=np.arange(len(ds), dtype=float), seed=1)
    full = run(make())
    a = make()
    head = run(a, 2)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    st = torch.load(buf, weights_only=True)
    assert st["last_kept"] == head[-1] and st["loader"]["step"] == 2
    b = make()
    b.load_state_dict(st)
    assert head + run(b) == full
    c = OnlineBatchSelector(_loader(ds, batch_size=5), _mean_score, keep=0.5)
    with pytest.raises(ValueError, match="keep"):
        c.load_state_dict(st)


def test_image_text_joint_with_stored_embeddings(text_ds):
    proj = torch.randn(3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def student(batch):  # a stand-in student: image features, and the stored text embedding
        f = batch.images.double().mean(dim=(2, 3)) @ proj
        return f, batch.text_emb.double() + 0.1

    L = _loader(text_ds, batch_size=12, shuffle=False)
    sel = OnlineBatchSelector(L, student, keep=0.5, method="joint", chunks=3, seed=2)
    out = next(iter(sel))
    full = next(iter(_loader(text_ds, batch_size=12, shuffle=False)))
    ie, te = student(full)
    A = R.reference_sigmoid_pairs(ie, te, 10.0, -10.0) - R.reference_sigmoid_pairs(full.image_emb, full.text_emb, 10.0, -10.0)
    want = R.reference_joint(A, 6, sel._generator(0, 0, 0), 3, 1.0)
    assert out.positions.tolist() == want
    assert out.batch.captions == [full.captions[i] for i in want]
    assert torch.equal(out.batch.image_emb, full.image_emb[want])


def test_score_reference_sidecar(ds, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * S * S, 10))
    path = score_reference(ds, model, out=str(tmp_path / "ref.npy"), batch_size=7, image_size=S)
    table = np.load(path)
    assert table.shape == (len(ds), ds.num_augmentations)
    # augmentation a of row i, rendered by a loader that replays it (aug_choice="epoch")
    L = ReinforcedLoader(ds, batch_size=len(ds), aug_choice="epoch", image_size=S)
    L.set_epoch(2)
    images, labels, _ = next(iter(L))
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(model(images), labels, reduction="none")
    assert np.allclose(table[:, 2], want.numpy(), atol=1e-5)
    # the selector looks the per-augmentation entry up
    sel = OnlineBatchSelector(_loader(ds), None, keep=0.3, score="easy", reference=path)
    plain = _loader(ds)
    out = next(iter(sel))
    rows, _, aug, _ = plain.batch_plan(0, 0)
    assert out.positions.tolist() == R.reference_topk([-float(table[r, a]) for r, a in zip(rows, aug)], 3)


def test_bad_input(ds):
    L = _loader(ds)
    for keep in (0, 1.5, -0.1, "x"):
        with pytest.raises(ValueError, match="keep"):
            OnlineBatchSelector(L, _mean_score, keep=keep)
    with pytest.raises(ValueError, match=r"reference must have shape \[23\]"):
        OnlineBatchSelector(L, _mean_score, reference=np.zeros(22))
    with pytest.raises(ValueError, match="reference has NaN"):
        OnlineBatchSelector(L, _mean_score, reference=np.full(23, np.nan))
    with pytest.raises(ValueError, match="score_fn returned shape"):
        next(iter(OnlineBatchSelector(L, lambda b: torch.zeros(3))))
    with pytest.raises(ValueError, match="score_fn's output has NaN"):
        next(iter(OnlineBatchSelector(L, lambda b: torch.full((10,), float("nan")))))
    with pytest.raises(ValueError, match="score_fn returned shape"):
        next(iter(OnlineBatchSelector(L, lambda b: torch.zeros(10), method="joint",
                                      reference=lambda b: torch.zeros(10, 10))))
    with pytest.raises(ValueError, match="method"):
        OnlineBatchSelector(L, _mean_score, method="greedy")
    with pytest.raises(ValueError, match="needs score_fn"):
        OnlineBatchSelector(L, None)
    with pytest.raises(ValueError, match="global"):
        OnlineBatchSelector(L, _mean_score, method="joint", scope="global")


# ---------------------------------------------------------------- DDP global selection
_WORKER = r'''
import os, sys, json
import numpy as np, torch, torch.distributed as dist
sys.path.insert(0, os.environ["TESTS_DIR"])
from fastload.format.reader import ReinforcedDataset
from fastload.loader.reinforced import ReinforcedLoader
from fastload.select import OnlineBatchSelector
rank, path, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
ds = ReinforcedDataset(path)
L = ReinforcedLoader(ds, batch_size=6, shuffle=True, seed=4, image_size=8)
sel = OnlineBatchSelector(L, lambda b: b[0].float().mean(dim=(1, 2, 3)), keep=0.5, score="hard",
                          method="sample", scope="global", render_size=16, seed=9)
res = [dict(idx=b.indices.tolist(), labels=b.batch[1].tolist(), shape=list(b.batch[0].shape))
       for b in sel]
json.dump(res, open(out, "w"))
dist.destroy_process_group()
'''


@pytest.mark.slow  # two spawned processes: ~11 s on a loaded 2-core machine
def test_global_selection_two_gloo_ranks(ds, tmp_path):
    import json
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "w.py"
    script.write_text(_WORKER)
    env = dict(os.environ, TESTS_DIR=os.path.dirname(__file__),
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                           os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, str(script), str(r), ds.path, str(port),
                               str(tmp_path / f"r{r}.json")], env=env) for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    res = [json.load(open(tmp_path / f"r{r}.json")) for r in range(2)]
    # the same selection recomputed here from both ranks' low-resolution scores
    Ls = [ReinforcedLoader(ds, batch_size=6, shuffle=True, seed=4, image_size=8, rank=r, world_size=2)
          for r in range(2)]
    sel = OnlineBatchSelector(Ls[0], _mean_score, keep=0.5, score="hard", method="sample", seed=9)
    labels = np.asarray(ds.labels)
    assert len(res[0]) == len(res[1]) == len(Ls[0])
    for t, (b0, b1) in enumerate(zip(*Ls)):
        s = torch.cat([_mean_score(b0), _mean_score(b1)]).double()
        rows = np.concatenate([Ls[0].batch_plan(0, t).indices, Ls[1].batch_plan(0, t).indices])
        k = max(1, round(len(b0[1]) * 0.5))
        pos = R.reference_sample(s.tolist(), 2 * k, sel._generator(0, t, -1))
        want = rows[pos].tolist()
        assert res[0][t]["idx"] + res[1][t]["idx"] == want
        for r in range(2):
            assert res[r][t]["labels"] == labels[res[r][t]["idx"]].tolist()
            assert res[r][t]["shape"][-2:] == [16, 16]


def test_datacompdr_import_is_a_reference_as_is(tmp_path):
    """A DataCompDR import (the layout of tests/test_datacomp.py): its stored teacher
    embeddings are the reference of the joint rule, and the pool of fastload.curate."""
    pytest.importorskip("skimage")
    from fastload.importers.datacomp import main
    from test_datacomp import _build

    dr, im, _ = _build(tmp_path, n=6)
    out = str(tmp_path / "out")
    assert main([dr, "--images", im, "--out", out, "--shard-size", "4", "--quiet"]) == 0
    ds = ReinforcedDataset(out)
    L = ReinforcedLoader(ds, batch_size=6, image_size=S)
    proj = torch.randn(3, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    student = lambda b: (b.images.double().mean(dim=(2, 3)) @ proj, b.text_emb.double())
    sel = OnlineBatchSelector(L, student, keep=0.5, method="joint", chunks=2, seed=4)
    out_b = next(iter(sel))
    full = next(iter(ReinforcedLoader(ds, batch_size=6, image_size=S)))
    # the stored embeddings of each row's replayed augmentation, read from the dataset
    rows, _, aug, _ = L.batch_plan(0, 0)
    ref_ie = torch.stack([torch.from_numpy(np.float32(ds.image_embedding(int(r), int(a)))) for r, a in zip(rows, aug)])
    assert torch.equal(full.image_emb.float(), ref_ie)
    ie, te = student(full)
    A = R.reference_sigmoid_pairs(ie, te, 10.0, -10.0) - R.reference_sigmoid_pairs(ref_ie, full.text_emb, 10.0, -10.0)
    assert out_b.positions.tolist() == R.reference_joint(A, 3, sel._generator(0, 0, 0), 2, 1.0)
    pytest.importorskip("faiss")
    from fastload.curate import curate, pool_embeddings

    emb = pool_embeddings(ds)
    ts = curate(out, emb[:2], k=2)
    assert emb.shape == (6, 24) and {0, 1} <= set(ts.indices.tolist())
