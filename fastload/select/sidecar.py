"""Per-(row, stored augmentation) reference losses, computed once and stored beside the
dataset, so the reference term of a super-batch is a lookup at training time.

The file is a plain ``.npy`` (float32 ``[N, A]``, no pickle): the reinforced dataset itself is
not touched (its manifest and checksums stay valid). ``OnlineBatchSelector(reference=path)``
reads it.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np
import torch


def default_path(dataset) -> str:
    return os.fspath(dataset.path).rstrip("/\\") + ".reference.npy"


def score_reference(dataset, model: Callable, out: Optional[str] = None, batch_size: int = 64,
                    image_size=None, loss: Optional[Callable] = None, device=None,
                    num_workers: int = 0) -> str:
    """Render every stored augmentation of every row (classification) and store the reference
    model's per-example loss, ``loss(model(images), labels)`` (cross-entropy by default), as
    ``float32 [N, A]`` at ``out`` (default: ``<dataset>.reference.npy``). Returns the path.

    Augmentation ``a`` of every row is rendered by a ``ReinforcedLoader`` with
    ``aug_choice="epoch"`` at epoch ``a`` in dataset order, i.e. exactly the replay the
    training loader makes of it.
    """
    from fastload.format.reader import ReinforcedDataset
    from fastload.loader.reinforced import ReinforcedLoader

    if isinstance(dataset, (str, os.PathLike)):
        dataset = ReinforcedDataset(dataset)
    if getattr(dataset, "kind", "classification") != "classification":
        raise ValueError("score_reference is for classification datasets; an image-text dataset's "
                         "stored teacher embeddings already are its reference")
    loss = loss or (lambda logits, labels: torch.nn.functional.cross_entropy(logits, labels, reduction="none"))
    N, A = len(dataset), int(dataset.num_augmentations)
    table = np.zeros((N, A), dtype=np.float32)
    loader = ReinforcedLoader(dataset, batch_size=batch_size, shuffle=False, aug_choice="epoch",
                              image_size=image_size, device=device, num_workers=num_workers,
                              rank=0, world_size=1)
    with torch.no_grad():
        for a in range(A):
            loader.set_epoch(a)
            start = 0
            for images, labels, _ in loader:
                values = torch.as_tensor(loss(model(images), labels)).detach().float().cpu().reshape(-1)
                if len(values) != len(labels):
                    raise ValueError(f"loss returned {len(values)} values for a batch of {len(labels)}; "
                                     "it must return one loss per example (reduction='none')")
                table[start:start + len(values), a] = values.numpy()
                start += len(values)
    bad = ~np.isfinite(table)
    if bad.any():
        r, a = np.argwhere(bad)[0]
        raise ValueError(f"the reference model's loss is not finite at row {r}, augmentation {a}")
    out = os.fspath(out) if out is not None else default_path(dataset)
    tmp = out + ".tmp.npy"
    np.save(tmp, table, allow_pickle=False)
    os.replace(tmp, out)
    return out


def load_reference(dataset, path: Optional[str] = None) -> np.ndarray:
    """The stored table of ``score_reference`` (shape checked against the dataset)."""
    path = os.fspath(path) if path is not None else default_path(dataset)
    table = np.load(path, allow_pickle=False)
    want = (len(dataset), int(dataset.num_augmentations))
    if table.shape != want:
        raise ValueError(f"{path}: reference table of shape {table.shape}, the dataset needs {want}")
    return table
