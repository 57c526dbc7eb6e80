"""Per-sample replay behind ``ReinforcedDataset.__getitem__``, for users who keep their own
``torch.utils.data.DataLoader`` (its workers, sampler and collate) instead of
``ReinforcedLoader``.

``ds[i]`` renders one stored augmentation of sample ``i`` with the same kernel, the same
augmentation choice and the same targets as row ``i`` of a ``ReinforcedLoader`` with equal
settings and seed: ``(image float32[3, h, w], label int, target float32[C])`` for
classification (``target`` is ``(ids int64[k], probs float32[k])`` with
``target_format="topk"``), an ``ImageTextBatch`` of one sample for image-text data. It is a
pure function of ``(settings, seed, epoch, i)``: ``ds.set_epoch(e)`` picks the epoch (call it
before each epoch's ``iter()``; with ``persistent_workers=True`` workers keep the epoch they
were started with, so leave that off). Per-sample rendering gives up the batched kernel's
speed: ``ReinforcedLoader`` is the fast path.
"""
from __future__ import annotations

from typing import Any, Dict

import numpy as np
import torch

# ReinforcedLoader arguments that change what one sample looks like
ITEM_OPTIONS = ("image_size", "mean", "std", "dtype", "p_reinforced", "target_format", "target_mode",
                "aug_choice", "interpolation", "dct_scale", "seed", "num_classes", "tokenizer")


class ItemRenderer:
    def __init__(self, dataset, options: Dict[str, Any]):
        from fastload.loader.reinforced import ReinforcedLoader

        bad = sorted(set(options) - set(ITEM_OPTIONS))
        if bad:
            raise ValueError(f"configure_items: unknown option(s) {bad}; accepted: {list(ITEM_OPTIONS)}")
        # rank 0 of 1: a DataLoader's own sampler decides which rank sees which index
        self.loader = ReinforcedLoader(dataset, batch_size=1, num_workers=0, rank=0, world_size=1,
                                       **options)

    def __call__(self, i: int, epoch: int):
        L = self.loader
        n = L.num_samples
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} rows")
        out, labels, tgt, _ = L._make(int(epoch), 0, np.array([i], dtype=np.int64), L.image_size,
                                      lambda shape: torch.empty(shape, dtype=L.dtype))
        if L.kind == "classification":
            target = tuple(t[0] for t in tgt) if isinstance(tgt, tuple) else tgt[0]
            return out[0], int(labels[0]), target
        from fastload.loader.reinforced import ImageTextBatch

        caps, syn, ie, te, se = tgt
        first = (lambda c: c[0]) if isinstance(caps, list) else (lambda c: c)
        return ImageTextBatch(out[0], first(caps), first(syn), ie[0], te[0], se[0])
