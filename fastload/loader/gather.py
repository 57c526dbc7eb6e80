"""Stage 2 of ``ReinforcedLoader``: gather. For the planned rows of one step: the stored
augmentation records (or fresh ones), the encoded image bytes and MixUp/CutMix partners,
labels and targets (dense or top-k, or the image-text side), vectorized NumPy over index
arrays; no per-sample Python on the image path.

Randomness is a pure function of ``(seed, epoch, sample index, view)`` (and, for fresh
augmentations, the global step) through private generators: which stored augmentation a
view replays, the ``p_reinforced`` coin, the caption picked, and the fresh parameters
(drawn for the whole global batch, then sliced, so a global batch is the same bytes at any
world size)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence, Tuple

import numpy as np
import torch

from fastload.sample import params as P

# Stream tags: each random decision has its own stream so they never correlate.
_TAG_AUG, _TAG_COIN, _TAG_CAPTION, _TAG_FRESH = 0xA116, 0xC014, 0xCA97, 0xF2E5
_MASK64 = (1 << 64) - 1


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hash(keys: Sequence[int], *arrays: np.ndarray) -> np.ndarray:
    """A 64-bit hash of scalar keys and per-row integer arrays (vectorized splitmix64)."""
    with np.errstate(over="ignore"):
        h = np.zeros(1, dtype=np.uint64)
        for k in keys:
            h = _splitmix(h ^ np.uint64(int(k) & _MASK64))
        for a in arrays:
            h = _splitmix(h ^ np.asarray(a).astype(np.int64).view(np.uint64))
    return h


def _uniform(h: np.ndarray) -> np.ndarray:
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class GatherConfig:
    seed: int
    kind: str  # "classification" or "image_text"
    views: int
    num_augmentations: int
    aug_choice: str
    p_reinforced: float
    num_classes: int
    target_format: str
    target_mode: str
    tokenizer: Any = None


class Gather:
    """``dataset``: the reinforced dataset; ``labels``: its labels (classification);
    ``plan``: the loader's :class:`~fastload.loader.plan.Plan` (fresh augmentations of the
    global batch); ``ranks()``: (rank, world size) of the running iteration."""

    def __init__(self, cfg: GatherConfig, dataset, labels, plan, ranks: Callable[[], Tuple[int, int]]):
        self.cfg, self.dataset, self.labels, self.plan, self.ranks = cfg, dataset, labels, plan, ranks
        self.seed = cfg.seed

    def aug_ids(self, epoch: int, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
        n = self.cfg.num_augmentations
        if self.cfg.aug_choice == "epoch":
            return ((epoch * self.cfg.views + views) % n).astype(np.int64)
        base = _hash((self.seed, epoch, _TAG_AUG), rows) % np.uint64(n)
        return ((base.astype(np.int64) + views) % n).astype(np.int64)

    def rows_of(self, epoch: int, idx: np.ndarray):
        """(rows, views, aug, fresh) of a batch of samples ``idx``: each sample repeated per
        view, the stored augmentation each row replays, and the rows that replay a fresh
        augmentation instead (``p_reinforced < 1``; all False otherwise). The one place both
        ``prepare`` and ``ReinforcedLoader.batch_plan`` take them from."""
        V = self.cfg.views
        rows = np.repeat(np.asarray(idx, dtype=np.int64), V)
        views = np.tile(np.arange(V, dtype=np.int64), len(idx))
        aug = self.aug_ids(epoch, rows, views)
        fresh = np.zeros(len(rows), dtype=bool)
        if self.cfg.p_reinforced < 1.0:
            fresh = _uniform(_hash((self.seed, epoch, _TAG_COIN), rows, views)) >= self.cfg.p_reinforced
        return rows, views, aug, fresh

    def _fresh(self, epoch: int, step: int, rows: np.ndarray) -> np.ndarray:
        """Fresh augmentation records (mixing removed: the target stays one-hot)."""
        from fastload.sample.policy import sample_params

        hw = np.asarray(self.dataset.source_hw)
        if self.plan.elastic:
            # drawn for the fresh rows of the whole global batch, then this rank's taken: the
            # global batch is the same bytes whatever the world size
            rank, world = self.ranks()
            gidx, off = self.plan.global_batch(epoch, step, rank, world)
            V = self.cfg.views
            grows = np.repeat(gidx, V)
            gviews = np.tile(np.arange(V, dtype=np.int64), len(gidx))
            gfresh = np.flatnonzero(_uniform(_hash((self.seed, epoch, _TAG_COIN), grows, gviews))
                                    >= self.cfg.p_reinforced)
            b = len(gidx) // world
            mine = (gfresh >= off * V) & (gfresh < (off + b) * V)
            ss = np.random.SeedSequence([self.seed & _MASK64, epoch, step, _TAG_FRESH])
            rng = np.random.Generator(np.random.PCG64(ss))
            recs = np.asarray(sample_params(self.dataset.policy, rng, grows[gfresh], hw, 1)).reshape(-1)[mine]
        else:
            ss = np.random.SeedSequence([self.seed & _MASK64, epoch, self.ranks()[0], step, _TAG_FRESH])
            rng = np.random.Generator(np.random.PCG64(ss))
            recs = np.asarray(sample_params(self.dataset.policy, rng, rows, hw, 1)).reshape(-1)
        recs = recs.astype(P.AUG_DTYPE, copy=True)
        recs["partner"] = -1
        recs["flags"] &= np.uint8(~(P.FLAG_MIXUP | P.FLAG_CUTMIX | P.FLAG_PARTNER_FLIP) & 0xFF)
        return recs

    def _one_hot_topk(self, labels: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        ids = (labels[:, None] + np.arange(k)[None, :]) % max(self.cfg.num_classes, 1)
        probs = np.zeros((len(labels), k), dtype=np.float32)
        probs[:, 0] = 1.0
        return ids.astype(np.int64), probs

    def prepare(self, epoch: int, step: int, idx: np.ndarray, hw: Tuple[int, int],
                fresh_ok: bool = True) -> dict:
        """Records, sources, labels and targets of one batch.
        ``fresh_ok=False`` replays stored augmentations only (a substitute row)."""
        ds = self.dataset
        rows, views, aug, fresh = self.rows_of(epoch, idx)
        sources, recs, ids, probs = ds.gather(rows, aug)
        recs = np.array(recs, dtype=P.AUG_DTYPE, copy=True).reshape(-1)
        if not fresh_ok or not fresh.any():
            fresh = None
        else:
            recs[fresh] = self._fresh(epoch, step, rows[fresh])
        ext = None
        if getattr(ds, "has_ext", False):  # schema-v2 extension records (imported ml-dr data)
            ext = np.concatenate([ds.augs_ext(int(r))[int(a):int(a) + 1] for r, a in zip(rows, aug)])
            if fresh is not None and fresh.any():
                ext[fresh] = P.empty_ext(int(fresh.sum()))
        partners = None
        if (recs["partner"] >= 0).any():
            has = np.flatnonzero(recs["partner"] >= 0)
            read = ds.partner_images(recs["partner"][has]) if hasattr(ds, "partner_images") else \
                [ds.image_bytes(int(p)) for p in recs["partner"][has]]
            partners = [None] * len(recs)
            for k, b in zip(has.tolist(), read):
                partners[k] = b
        if self.cfg.kind == "classification":
            labels = self.labels[rows].astype(np.int64)
            tgt = self._targets(ids, probs, labels, fresh)
        else:
            labels, tgt = None, self._text_side(epoch, rows, views, aug)
        return dict(rows=rows, sources=list(sources), recs=recs, partners=partners, hw=hw,
                    labels=labels, tgt=tgt, ext=ext, epoch=epoch, step=step)

    def _targets(self, ids, probs, labels, fresh):
        ids = np.asarray(ids, dtype=np.int64)
        probs = np.asarray(probs, dtype=np.float32)
        if fresh is not None and fresh.any():
            ids, probs = ids.copy(), probs.copy()
            ids[fresh], probs[fresh] = self._one_hot_topk(labels[fresh], ids.shape[1])
        if self.cfg.target_format == "topk":
            return torch.from_numpy(ids), torch.from_numpy(probs)
        from fastload.losses import densify

        dense = torch.as_tensor(densify(ids, probs, self.cfg.num_classes, self.cfg.target_mode),
                                dtype=torch.float32)
        if fresh is not None and fresh.any():
            fi = torch.from_numpy(np.flatnonzero(fresh))
            dense[fi] = 0.0
            dense[fi, torch.from_numpy(labels[fresh])] = 1.0
        return dense

    def _text_side(self, epoch, rows, views, aug):
        ds = self.dataset
        img_emb = np.stack([np.asarray(ds.image_embedding(int(i), int(j)), dtype=np.float32)
                            for i, j in zip(rows, aug)])
        h = _hash((self.seed, epoch, _TAG_CAPTION), rows, views)
        h2 = _hash((self.seed, epoch, _TAG_CAPTION + 1), rows, views)
        caps, syn, t_emb, s_emb = [], [], [], []
        for r, i in enumerate(rows.tolist()):
            real, synthetic = ds.captions(i)
            e = ds.text_embeddings(i)  # real caption(s) first, then the synthetic ones
            if not real or not synthetic:
                raise ValueError(f"sample {i} has {len(real)} real and {len(synthetic)} synthetic "
                                 "captions; the loader needs at least one of each")
            a = int(h2[r] % np.uint64(len(real)))
            s = int(h[r] % np.uint64(len(synthetic)))
            caps.append(real[a])
            syn.append(synthetic[s])
            t_emb.append(e[a])
            s_emb.append(e[len(real) + s])
        t_emb = np.asarray(np.stack(t_emb), dtype=np.float32)
        s_emb = np.asarray(np.stack(s_emb), dtype=np.float32)
        if self.cfg.tokenizer is not None:
            caps, syn = self.cfg.tokenizer(caps), self.cfg.tokenizer(syn)
        return (caps, syn, torch.from_numpy(img_emb), torch.from_numpy(t_emb), torch.from_numpy(s_emb))
