"""``ReinforcedLoader``: a drop-in ``torch.utils.data.DataLoader`` for reinforced datasets.

Per batch, one background Python thread gathers the stored records (vectorized NumPy over
index arrays) and calls the fused C++ kernel (``fastload.replay.native.render_batch``: decode
-> crop -> resize -> flip -> RandAugment -> normalize -> erase -> MixUp/CutMix, straight into
the batch buffer, GIL released, ``num_workers`` native threads). No per-sample Python runs
in the hot loop and no worker processes are forked.

Randomness. Everything random is a pure function of ``(seed, epoch, sample index, view)``
(and, for fresh augmentations, the step) through private generators: the shuffle order
(``fastload.batch.sharding``), which stored augmentation a view replays, the
``p_reinforced`` coin, the synthetic caption picked, and the fresh parameters of the
non-reinforced case. The same seed, epoch and world size give identical bytes whatever
``num_workers`` or ``prefetch_factor`` are.

Epochs. ``set_epoch(e)`` selects an epoch; a completed pass advances it by one on its own,
so a loop that never calls ``set_epoch`` still reshuffles every epoch (as DataLoader does).

Resume. ``state_dict()`` records the epoch and the number of batches handed to the user in
it; after ``load_state_dict`` the next iteration yields exactly the remaining batches. A new
``iter()`` without ``load_state_dict`` restarts the epoch (DataLoader semantics). User
samplers must be deterministic given ``set_epoch`` (resume re-iterates them and skips).

Buffers. With ``reuse_buffers=False`` (default) every yielded image tensor is the caller's
own: it comes from a small per-loader pool whose buffers are rendered into again only once
nothing refers to them any more (no tensor, view, numpy array or storage of them), which
saves the page faults of a fresh 38 MB batch per step. With ``reuse_buffers=True`` the
kernel renders into a ring of preallocated (pinned when ``pin_memory``) buffers, ``max(prefetch_factor - 1, 1) + 2`` per output shape; a yielded image
tensor stays valid until the next batch is requested (for the loop body that uses it), then
may be overwritten: ``clone()`` what you keep longer (FFCV's contract). With ``device`` set the yielded
tensors are device copies and are always the caller's own.

Errors. An exception in the background thread is raised in the training loop at the next
batch. A sample whose image cannot be decoded raises a ``RuntimeError`` naming the sample
id (``on_error="raise"``), or with ``on_error="skip"`` its rows are replaced by a copy of
the first good row of the same batch (image, label and target, so shapes never change and
distributed ranks stay in step); ``loader.skipped`` counts replaced rows and
``loader.skipped_ids`` lists the sample ids.
"""
from __future__ import annotations

import os
import queue
import threading
import warnings
import weakref
from typing import Any, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from fastload.batch.sharding import epoch_permutation, shard_indices
from fastload._dist import rank_world
from fastload.sample import params as P

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Stream tags: each random decision has its own stream so they never correlate.
_TAG_AUG, _TAG_COIN, _TAG_CAPTION, _TAG_FRESH = 0xA116, 0xC014, 0xCA97, 0xF2E5
_MASK64 = (1 << 64) - 1
_END = object()


class ImageTextBatch(NamedTuple):
    """One image-text batch (unpacks as a tuple).

    images: [B, 3, h, w]; captions / syn_captions: list of B strings, or the tokenizer's
    output; image_emb: [B, D] stored teacher embedding of the replayed augmentation;
    text_emb / syn_text_emb: [B, D] stored teacher embeddings of the two captions.
    """
    images: torch.Tensor
    captions: Any
    syn_captions: Any
    image_emb: torch.Tensor
    text_emb: torch.Tensor
    syn_text_emb: torch.Tensor


class _Error:
    def __init__(self, exc: BaseException):
        self.exc = exc


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


def _pair(v, name: str) -> Tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        v = (int(v), int(v))
    try:
        h, w = (int(x) for x in v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or an (h, w) pair, got {v!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{name} must be positive, got {v!r}")
    return h, w


class ReinforcedLoader:
    """Iterate a reinforced dataset as ``(images, labels, targets)`` batches.

    Arguments as ``torch.utils.data.DataLoader`` (``num_workers`` is the number of native
    threads of the replay kernel: 0 renders in the calling thread with one thread, > 0 adds a
    background thread that prefetches ``prefetch_factor`` batches; ``persistent_workers`` is
    accepted and has nothing to keep alive), plus:

    - ``image_size``: int or (h, w) output size (ignored for batches from a ``batch_sampler``
      yielding ``(index, h, w)`` tuples, which are rendered at their own size).
    - ``mean`` / ``std`` (0-1 scale), ``dtype``: float32 or float16 normalized output, or
      uint8 unnormalized pixels (normalize on the GPU).
    - ``device``: move every batch there (non-blocking from pinned memory).
    - ``replay``: "cpu" (default: C++ render, then copy) or "device": the CPU threads only
      decode the crop windows, the GPU renders them with the Triton kernel on a side stream
      (``fastload.loader.device_replay``; needs ``device``, float output).
    - ``p_reinforced``: probability that a view replays a stored augmentation with its
      teacher target; otherwise a fresh augmentation from the dataset's policy (mixing
      removed) and a one-hot target.
    - ``aug_choice``: "random" (uniform over the N stored augmentations) or "epoch"
      (augmentation ``(epoch * views + view) % N``, the MobileCLIP option).
    - ``target_format``: "dense" ([B, C] probabilities, ``fastload.densify`` with
      ``target_mode``) or "topk" (a pair ``(ids int64[B,k], probs float32[B,k])``; a
      one-hot row has ids ``label, label+1, ...`` mod C and probs ``1, 0, ...``).
    - ``views_per_decode``: V stored augmentations of each decoded image, consecutive rows
      of the batch: a batch holds ``batch_size * V`` rows (FKD's multi-crop). With V > 1
      each image is decoded once at full resolution and its V views replayed from the pixels
      (no DCT-domain downscaling then).
    - ``rank`` / ``world_size``: sharding (default: torch.distributed when initialized).
      See ``fastload.batch.sharding`` for the padding rule; every rank gets the same number
      of batches of the same sizes.
    - ``tokenizer``: for image-text datasets, a callable applied to each batch's list of
      captions.
    - ``on_error``: "raise" or "skip" for undecodable samples (see the module docstring).
    - ``reuse_buffers``: render into a ring of preallocated buffers (module docstring).
    - ``interpolation`` / ``dct_scale``: replay settings; default to the dataset manifest's
      ``replay`` entry (what the teacher saw).
    - ``check_ranks``: under torch.distributed, all-reduce every batch's (step, shape) and
      raise a clear error if ranks disagree (one small collective per step; a debugging aid
      for custom samplers: the built-in sharding already guarantees agreement).
    - ``dataset`` may also be a path, opened with ``fastload.ReinforcedDataset``;
      ``generator``: a ``torch.Generator`` whose ``initial_seed()`` replaces ``seed``.

    For image-text datasets each batch is an ``ImageTextBatch`` (images, captions,
    syn_captions, image_emb, text_emb, syn_text_emb).

    Example:
        >>> import fastload
        >>> ds = fastload.ReinforcedDataset("imagenet_plus/")          # doctest: +SKIP
        >>> loader = fastload.ReinforcedLoader(ds, batch_size=256, shuffle=True,
        ...                                    num_workers=8, image_size=224, drop_last=True)
        >>> for epoch in range(2):                                       # doctest: +SKIP
        ...     loader.set_epoch(epoch)
        ...     for images, labels, targets in loader:
        ...         loss = fastload.kd_loss(model(images), targets)
    """

    def __init__(self, dataset, batch_size: Optional[int] = 1, shuffle: bool = False,
                 sampler=None, batch_sampler=None, num_workers: int = 0,
                 pin_memory: bool = False, drop_last: bool = False,
                 generator: Optional[torch.Generator] = None, seed: int = 0,
                 persistent_workers: bool = False, prefetch_factor: Optional[int] = 2,
                 image_size: Union[int, Tuple[int, int]] = 224,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 dtype: torch.dtype = torch.float32, device=None,
                 p_reinforced: float = 1.0, target_format: str = "dense",
                 target_mode: str = "smooth", views_per_decode: int = 1,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 tokenizer=None, aug_choice: str = "random", interpolation: Optional[str] = None,
                 on_error: str = "raise", reuse_buffers: bool = False, dct_scale: Optional[bool] = None,
                 check_ranks: bool = False, replay: str = "cpu"):
        if replay not in ("cpu", "device"):
            raise ValueError(f'replay must be "cpu" or "device", got {replay!r}')
        self.replay = replay
        if isinstance(dataset, (str, os.PathLike)):
            from fastload.format.reader import ReinforcedDataset

            dataset = ReinforcedDataset(dataset)
        self.dataset = dataset
        self.kind = getattr(dataset, "kind", "classification")
        if self.kind not in ("classification", "image_text"):
            raise ValueError(f"dataset.kind must be 'classification' or 'image_text', got {self.kind!r}")
        if batch_sampler is not None:
            if batch_size not in (None, 1) or shuffle or sampler is not None or drop_last:
                raise ValueError("batch_sampler is mutually exclusive with batch_size, shuffle, "
                                 "sampler and drop_last")
            batch_size = None
        else:
            if batch_size is None or int(batch_size) <= 0:
                raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
            batch_size = int(batch_size)
            if sampler is not None and shuffle:
                raise ValueError("sampler is mutually exclusive with shuffle")
        self.batch_size, self.shuffle, self.drop_last = batch_size, bool(shuffle), bool(drop_last)
        self.sampler, self.batch_sampler = sampler, batch_sampler
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.num_workers = int(num_workers)
        if prefetch_factor is None:
            prefetch_factor = 2
        if int(prefetch_factor) < 1:
            raise ValueError(f"prefetch_factor must be >= 1, got {prefetch_factor}")
        self.prefetch_factor = int(prefetch_factor)
        self.persistent_workers = bool(persistent_workers)
        self.seed = int(generator.initial_seed()) if generator is not None else int(seed)
        self.image_size = _pair(image_size, "image_size")
        if dtype not in (torch.float32, torch.float16, torch.uint8):
            raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.uint8, got {dtype}")
        self.dtype = dtype
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std must have 3 values, std > 0; got {mean}, {std}")
        self.device = torch.device(device) if device is not None else None
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        if pin_memory and not self.pin_memory:
            warnings.warn("pin_memory=True but no CUDA device is available: not pinning", stacklevel=2)
        if not 0.0 <= float(p_reinforced) <= 1.0:
            raise ValueError(f"p_reinforced must be in [0, 1], got {p_reinforced}")
        self.p_reinforced = float(p_reinforced)
        if self.kind == "image_text" and self.p_reinforced != 1.0:
            raise ValueError("p_reinforced must be 1.0 for image-text datasets (a fresh "
                             "augmentation has no stored teacher embedding)")
        if target_format not in ("dense", "topk"):
            raise ValueError(f"target_format must be 'dense' or 'topk', got {target_format!r}")
        self.target_format, self.target_mode = target_format, target_mode
        if int(views_per_decode) < 1:
            raise ValueError(f"views_per_decode must be >= 1, got {views_per_decode}")
        self.views = int(views_per_decode)
        if aug_choice not in ("random", "epoch"):
            raise ValueError(f"aug_choice must be 'random' or 'epoch', got {aug_choice!r}")
        self.aug_choice = aug_choice
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.tokenizer = tokenizer
        # replay settings default to those the teacher saw (the manifest's "replay" entry)
        replay = getattr(dataset, "replay", None) or {}
        self.interpolation = (interpolation or replay.get("interpolation")
                              or getattr(getattr(dataset, "policy", None), "interpolation", None) or "bilinear")
        self.reuse_buffers = bool(reuse_buffers)
        self.check_ranks = bool(check_ranks)
        self.dct_scale = bool(replay.get("dct_scale", True) if dct_scale is None else dct_scale)
        self.rank, self.world_size = rank_world(rank, world_size)
        self.num_samples = len(dataset)
        self.num_augmentations = int(dataset.num_augmentations)
        if self.views > self.num_augmentations:
            raise ValueError(f"views_per_decode={self.views} exceeds the dataset's "
                             f"{self.num_augmentations} stored augmentations")
        self.num_classes = int(getattr(dataset, "num_classes", 0) or 0)
        self._labels = np.asarray(dataset.labels) if self.kind == "classification" else None

        self._epoch = 0
        self._batches_done = 0
        self._resume: Optional[int] = None
        self.skipped = 0
        self.skipped_ids: List[int] = []
        self._copy_events: dict = {}  # ring slot data_ptr -> CUDA event of its async copy
        self._active = None  # weakref to the live iterator
        self._pool: Optional[_Pool] = None  # caller-owned output buffers (see _Pool)
        self._device_replay = None
        if self.replay == "device":
            from fastload.loader.device_replay import DeviceReplay

            self._device_replay = DeviceReplay(self)

    # ------------------------------------------------------------------ epochs and state
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (call before iterating, as with DistributedSampler)."""
        epoch = int(epoch)
        if epoch != self._epoch:
            self._resume = None
            self._batches_done = 0
        self._epoch = epoch

    @property
    def epoch(self) -> int:
        return self._epoch

    def _per_rank(self) -> int:
        n, w = self.num_samples, self.world_size
        return -(-n // w)  # pad rule of fastload.batch.sharding

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        if self.batch_sampler is not None:
            return len(self.batch_sampler)
        n = len(self.sampler) if self.sampler is not None else self._per_rank()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def state_dict(self) -> dict:
        """Epoch and batches consumed in it (exact mid-epoch resume), plus the skip count."""
        return {"epoch": self._epoch, "batches_done": self._batches_done, "seed": self.seed,
                "world_size": self.world_size, "rank": self.rank, "skipped": self.skipped,
                "skipped_ids": list(self.skipped_ids)}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"state_dict seed {state['seed']} differs from the loader's seed {self.seed}")
        if int(state.get("world_size", self.world_size)) != self.world_size:
            raise ValueError(f"state_dict world_size {state['world_size']} differs from the "
                             f"loader's world_size {self.world_size}: the order would change")
        self._epoch = int(state["epoch"])
        self._batches_done = int(state["batches_done"])
        self._resume = self._batches_done
        self.skipped = int(state.get("skipped", 0))
        self.skipped_ids = list(state.get("skipped_ids", []))

    # ------------------------------------------------------------------ batch plan
    def _check_range(self, idx: np.ndarray, what: str) -> None:
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_samples):
            bad = idx[(idx < 0) | (idx >= self.num_samples)][0]
            raise ValueError(f"{what} yielded index {int(bad)}, outside [0, {self.num_samples})")

    def _plan(self, epoch: int, start: int) -> Iterator[Tuple[int, np.ndarray, Tuple[int, int]]]:
        """Yield (step, indices int64[b], (h, w)) from batch ``start`` of ``epoch``."""
        size = self.image_size
        if self.batch_sampler is not None:
            bs = self.batch_sampler
            if hasattr(bs, "set_epoch"):
                bs.set_epoch(epoch)
            # Samplers that can yield (indices array, h, w) skip building a tuple per sample.
            arrays = hasattr(bs, "iter_arrays")
            for step, batch in enumerate(bs.iter_arrays() if arrays else bs):
                if step < start:
                    continue
                if arrays:
                    idx, h, w = batch
                    idx = np.asarray(idx, dtype=np.int64)
                    hw = _pair((h, w), "batch_sampler (h, w)")
                    self._check_range(idx, "batch_sampler")
                    yield step, idx, hw
                    continue
                batch = list(batch)
                if batch and isinstance(batch[0], (tuple, list)):
                    arr = np.asarray(batch, dtype=np.int64)
                    if arr.ndim != 2 or arr.shape[1] != 3 or not (arr[:, 1:] == arr[0, 1:]).all():
                        raise ValueError("batch_sampler must yield lists of ints or of (index, h, w) "
                                         f"tuples sharing one (h, w); got {batch[:4]}...")
                    idx, hw = arr[:, 0], _pair((arr[0, 1], arr[0, 2]), "batch_sampler (h, w)")
                else:
                    idx, hw = np.asarray(batch, dtype=np.int64).reshape(-1), size
                self._check_range(idx, "batch_sampler")
                yield step, idx, hw
            return
        if self.sampler is not None:
            if hasattr(self.sampler, "set_epoch"):
                self.sampler.set_epoch(epoch)
            idx = np.fromiter((int(i) for i in self.sampler), dtype=np.int64)
            self._check_range(idx, "sampler")
        else:
            order = epoch_permutation(self.num_samples, self.seed, epoch, self.shuffle)
            idx = shard_indices(order, self.rank, self.world_size, pad=True)
        n, b = len(idx), self.batch_size
        nb = n // b if self.drop_last else -(-n // b)
        for step in range(start, nb):
            yield step, idx[step * b:(step + 1) * b], size

    # ------------------------------------------------------------------ one batch
    def _aug_ids(self, epoch: int, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
        n = self.num_augmentations
        if self.aug_choice == "epoch":
            return ((epoch * self.views + views) % n).astype(np.int64)
        base = _hash((self.seed, epoch, _TAG_AUG), rows) % np.uint64(n)
        return ((base.astype(np.int64) + views) % n).astype(np.int64)

    def _fresh(self, epoch: int, step: int, rows: np.ndarray) -> np.ndarray:
        """Fresh augmentation records (mixing removed: the target stays one-hot)."""
        from fastload.sample.policy import sample_params

        ss = np.random.SeedSequence([self.seed & _MASK64, epoch, self.rank, step, _TAG_FRESH])
        rng = np.random.Generator(np.random.PCG64(ss))
        recs = np.asarray(sample_params(self.dataset.policy, rng, rows,
                                        np.asarray(self.dataset.source_hw), 1)).reshape(-1)
        recs = recs.astype(P.AUG_DTYPE, copy=True)
        recs["partner"] = -1
        recs["flags"] &= np.uint8(~(P.FLAG_MIXUP | P.FLAG_CUTMIX | P.FLAG_PARTNER_FLIP) & 0xFF)
        return recs

    def _one_hot_topk(self, labels: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        ids = (labels[:, None] + np.arange(k)[None, :]) % max(self.num_classes, 1)
        probs = np.zeros((len(labels), k), dtype=np.float32)
        probs[:, 0] = 1.0
        return ids.astype(np.int64), probs

    def _prepare(self, epoch: int, step: int, idx: np.ndarray, hw: Tuple[int, int]) -> dict:
        """Stage 1 (Python, vectorized): records, sources, labels and targets of one batch."""
        ds, V = self.dataset, self.views
        rows = np.repeat(idx, V)
        views = np.tile(np.arange(V, dtype=np.int64), len(idx))
        aug = self._aug_ids(epoch, rows, views)
        sources, recs, ids, probs = ds.gather(rows, aug)
        recs = np.array(recs, dtype=P.AUG_DTYPE, copy=True).reshape(-1)
        fresh = None
        if self.p_reinforced < 1.0:
            coin = _uniform(_hash((self.seed, epoch, _TAG_COIN), rows, views))
            fresh = coin >= self.p_reinforced
            if fresh.any():
                recs[fresh] = self._fresh(epoch, step, rows[fresh])
        partners = None
        if (recs["partner"] >= 0).any():
            partners = [ds.image_bytes(int(p)) if p >= 0 else None for p in recs["partner"]]
        if self.kind == "classification":
            labels = self._labels[rows].astype(np.int64)
            tgt = self._targets(ids, probs, labels, fresh)
        else:
            labels, tgt = None, self._text_side(epoch, rows, views, aug)
        return dict(rows=rows, sources=list(sources), recs=recs, partners=partners, hw=hw,
                    labels=labels, tgt=tgt)

    def _render_prepared(self, prep: dict, out_fn):
        """Stage 2: render (native, GIL released; or on the device with replay="device")."""
        if self._device_replay is not None:
            return self._device_replay.render(prep, lambda: self._render_prepared_host(prep, out_fn))
        return self._render_prepared_host(prep, out_fn)

    def _render_prepared_host(self, prep: dict, out_fn):
        rows, labels, tgt, hw = prep["rows"], prep["labels"], prep["tgt"], prep["hw"]
        out = out_fn((len(rows), 3, hw[0], hw[1]))
        bad, culprits = self._render(prep["sources"], prep["recs"], out, prep["partners"], rows)
        if bad is not None:  # on_error="skip": copy the first good row over every bad one
            good = int(np.flatnonzero(~bad)[0])
            bi = np.flatnonzero(bad)
            out[torch.as_tensor(bi)] = out[good].clone()
            if labels is not None:
                labels[bi] = labels[good]
            tgt = _copy_rows(tgt, bi, good)
        return out, labels, tgt, culprits

    def _make(self, epoch: int, step: int, idx: np.ndarray, hw: Tuple[int, int], out_fn):
        """Gather and render one batch; returns the (host) batch."""
        return self._render_prepared(self._prepare(epoch, step, idx, hw), out_fn)

    def _render(self, sources, recs, out, partners, rows):
        """Render; returns (None, []) or, under on_error="skip", (bad-row mask, culprit ids)."""
        from fastload.replay.native import render_batch

        threads = max(1, self.num_workers)
        kw = dict(mean=self.mean, std=self.std, interpolation=self.interpolation,
                  dct_scale=self.dct_scale, threads=threads)
        try:
            src = sources
            if self.views > 1:
                # FKD-style: decode each image once (native pool, full resolution) and replay
                # its V views from the pixels instead of decoding V times
                from fastload.replay.native import decode_batch

                pixels = decode_batch(sources[::self.views], scale=1, threads=threads)
                src = [pixels[r // self.views] for r in range(len(sources))]
            render_batch(src, recs, out, partner_sources=partners, sample_ids=rows, **kw)
            return None, []
        except (RuntimeError, ValueError) as exc:
            first_exc = exc
        # Slow path, only on error: render row by row to find the culprits (the row's own
        # image, or its MixUp/CutMix partner).
        bad = np.zeros(len(rows), dtype=bool)
        culprit = np.full(len(rows), -1, dtype=np.int64)
        msgs = {}
        one = dict(kw, threads=1)
        for r in range(len(rows)):
            p = None if partners is None else partners[r:r + 1]
            try:
                render_batch(sources[r:r + 1], recs[r:r + 1], out[r:r + 1], partner_sources=p,
                             sample_ids=rows[r:r + 1], **one)
                continue
            except (RuntimeError, ValueError) as exc:
                bad[r] = True
                msg = str(exc)
            own = recs[r:r + 1].copy()
            own["partner"] = -1
            own["flags"] &= np.uint8(~(P.FLAG_MIXUP | P.FLAG_CUTMIX | P.FLAG_PARTNER_FLIP) & 0xFF)
            try:
                render_batch(sources[r:r + 1], own, out[r:r + 1], sample_ids=rows[r:r + 1], **one)
                culprit[r] = int(recs["partner"][r]) if recs["partner"][r] >= 0 else int(rows[r])
            except (RuntimeError, ValueError) as exc:
                culprit[r] = int(rows[r])
                msg = str(exc)
            msgs.setdefault(int(culprit[r]), msg)
        if not bad.any():  # the failure did not reproduce row by row: surface it as is
            raise first_exc
        ids = sorted(msgs)
        if self.on_error == "raise" or bad.all():
            users = sorted(set(rows[bad].tolist()) - set(ids))
            note = f" (also breaking samples {users} that mix with it)" if users else ""
            raise RuntimeError(f"cannot render sample id(s) {ids}{note}: {msgs[ids[0]]}; pass "
                               "on_error='skip' to replace such rows and count them") from first_exc
        return bad, [int(c) for c in culprit[bad]]

    def _targets(self, ids, probs, labels, fresh):
        ids = np.asarray(ids, dtype=np.int64)
        probs = np.asarray(probs, dtype=np.float32)
        if fresh is not None and fresh.any():
            ids, probs = ids.copy(), probs.copy()
            ids[fresh], probs[fresh] = self._one_hot_topk(labels[fresh], ids.shape[1])
        if self.target_format == "topk":
            return torch.from_numpy(ids), torch.from_numpy(probs)
        from fastload.losses import densify

        dense = torch.as_tensor(densify(ids, probs, self.num_classes, self.target_mode),
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
        if self.tokenizer is not None:
            caps, syn = self.tokenizer(caps), self.tokenizer(syn)
        return (caps, syn, torch.from_numpy(img_emb), torch.from_numpy(t_emb), torch.from_numpy(s_emb))

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        if self._active is not None:
            old = self._active()
            if old is not None:
                old.close()
        start = self._resume if self._resume is not None else 0
        self._resume = None
        self._batches_done = start
        it = _Iter(self, self._epoch, start)
        self._active = weakref.ref(it)
        return it

    def _finish(self, host):
        """Host batch -> what the user gets (device copy when a device is set). Counts the
        rows replaced under on_error="skip" here, at consumption, so state_dict is exact."""
        out, labels, tgt, culprits = host
        if culprits:
            self.skipped += len(culprits)
            self.skipped_ids.extend(culprits)
        if labels is not None:
            labels = torch.from_numpy(labels)
        if self._device_replay is not None:
            out = self._device_replay.finish(out)
        if self.device is not None:
            nb = self.pin_memory
            host_out = out
            out = out.to(self.device, non_blocking=nb)
            labels = labels.to(self.device, non_blocking=nb) if labels is not None else None
            tgt = _to_device(tgt, self.device, nb)
            if nb and self.reuse_buffers and self.device.type == "cuda":
                # the ring slot may be rewritten only once this async copy has completed
                ev = torch.cuda.Event()
                ev.record()
                self._copy_events[host_out.data_ptr()] = ev
        if self.kind == "classification":
            return out, labels, tgt
        caps, syn, ie, te, se = tgt
        return ImageTextBatch(out, caps, syn, ie, te, se)


def _copy_rows(t, rows, good):
    if isinstance(t, torch.Tensor):
        t[torch.as_tensor(rows)] = t[good].clone()
        return t
    if isinstance(t, tuple):
        return tuple(_copy_rows(x, rows, good) for x in t)
    if isinstance(t, list):
        for r in rows:
            t[r] = t[good]
        return t
    if isinstance(t, dict):  # tokenizer output
        return {k: _copy_rows(v, rows, good) for k, v in t.items()}
    return t


def _to_device(t, device, nb):
    if isinstance(t, torch.Tensor):
        return t.to(device, non_blocking=nb)
    if isinstance(t, tuple):
        return tuple(_to_device(x, device, nb) for x in t)
    if isinstance(t, dict):
        return {k: _to_device(v, device, nb) for k, v in t.items()}
    return t


# A private torch function: without it (another torch release) the pool is off and every
# batch is a fresh tensor (correct, only slower).
_HAVE_USE_COUNT = hasattr(torch._C, "_storage_Use_Count")


def _storage_refs(t: torch.Tensor) -> int:
    """Owners of ``t``'s storage (tensors and views on it, numpy arrays, storage objects)."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class _Pool:
    """Caller-owned output buffers without a page fault per batch.

    A fresh 38 MB batch is a fresh ``mmap`` from the allocator: the kernel's first write
    faults in and zeroes every page (measured ~0.45 CPU ms/image at 224, batch 64, ~30% of
    the render). Instead each shape keeps up to ``cap`` base tensors; a batch gets a new
    view of a base nobody else holds any more (the storage's use count is back to the pool's
    own), so a yielded tensor is never rewritten while the caller, a view of it, a numpy
    array on it or a queued batch still refers to it. Pinned buffers keep ``torch.empty``:
    torch's caching host allocator already reuses them and tracks async copies.
    """

    def __init__(self, dtype: torch.dtype, pin: bool, cap: int):
        self.dtype, self.pin, self.cap = dtype, pin, cap
        self.bases: dict = {}  # shape -> [(base tensor, its use count when free)]
        # one pool per loader, across epochs: a closing iterator's thread may still take a
        # buffer while the next epoch's starts
        self.lock = threading.Lock()

    def __call__(self, shape):
        if not _HAVE_USE_COUNT:
            return torch.empty(shape, dtype=self.dtype, pin_memory=self.pin)
        if self.pin:
            return torch.empty(shape, dtype=self.dtype, pin_memory=True)
        with self.lock:
            bases = self.bases.setdefault(shape, [])
            for base, free in bases:
                if _storage_refs(base) == free:
                    return base.view(shape)  # the view makes it busy before the lock is let go
            base = torch.empty(shape, dtype=self.dtype)
            if sum(map(len, self.bases.values())) >= self.cap:
                # at most `cap` buffers in all (a variable-resolution sampler has many shapes):
                # evict a free one of another shape, else hand out an untracked tensor
                for other in self.bases.values():
                    free_at = [k for k, (b, f) in enumerate(other) if _storage_refs(b) == f]
                    if free_at:
                        del other[free_at[0]]
                        break
                else:
                    return base  # the caller keeps many batches
            bases.append((base, _storage_refs(base)))
            return base.view(shape)


class _Buffers:
    """Output buffers: caller-owned tensors (pooled, ``_Pool``), or a ring per shape
    (reuse_buffers)."""

    def __init__(self, loader: ReinforcedLoader):
        self.dtype, self.pin = loader.dtype, loader.pin_memory
        self.events = loader._copy_events
        self.reuse = loader.reuse_buffers
        self.ring_size = max(loader.prefetch_factor - 1, 1) + 2
        self.rings: dict = {}
        self.turn: dict = {}
        # in flight at most: prefetch queue + the batch being rendered + the caller's current
        # and previous batch (a `for` loop drops the old one only after `next`)
        if loader._pool is None:
            loader._pool = _Pool(self.dtype, self.pin, cap=self.ring_size + 2)
        self.pool = loader._pool

    def __call__(self, shape):
        if not self.reuse:
            return self.pool(shape)
        ring = self.rings.get(shape)
        if ring is None:
            ring = self.rings[shape] = [None] * self.ring_size
            self.turn[shape] = 0
        k = self.turn[shape]
        self.turn[shape] = (k + 1) % self.ring_size
        if ring[k] is None:
            ring[k] = torch.empty(shape, dtype=self.dtype, pin_memory=self.pin)
        else:
            ev = self.events.pop(ring[k].data_ptr(), None)
            if ev is not None:  # an async host->device copy still reads this slot
                ev.synchronize()
        return ring[k]


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event):
    while not stop.is_set():
        try:
            return q.get(timeout=0.05)
        except queue.Empty:
            continue
    return _END


def _prepare_stage(loader: ReinforcedLoader, epoch: int, start: int, q: queue.Queue,
                   stop: threading.Event) -> None:
    """Thread 1: batch plan + gather (Python). Runs while thread 2's native render of the
    previous batch holds no GIL, so the native pool never waits for the gather."""
    try:
        for step, idx, hw in loader._plan(epoch, start):
            if stop.is_set():
                return
            if not _put(q, loader._prepare(epoch, step, idx, hw), stop):
                return
        _put(q, _END, stop)
    except BaseException as exc:  # surfaces in the training loop
        _put(q, _Error(exc), stop)


def _render_stage(loader: ReinforcedLoader, src: queue.Queue, q: queue.Queue,
                  stop: threading.Event) -> None:
    """Thread 2: render prepared batches into output buffers. Neither thread holds a
    reference to the iterator, so an abandoned iterator is collected and stops them."""
    try:
        bufs = _Buffers(loader)
        while True:
            prep = _get(src, stop)
            if prep is _END or isinstance(prep, _Error):
                _put(q, prep, stop)
                return
            if not _put(q, loader._render_prepared(prep, bufs), stop):
                return
    except BaseException as exc:
        _put(q, _Error(exc), stop)


class _Iter:
    def __init__(self, loader: ReinforcedLoader, epoch: int, start: int):
        self.loader, self.epoch = loader, epoch
        self.done = False
        if loader.num_workers == 0:
            self.thread = None
            self.bufs = _Buffers(loader)
            self.plan = loader._plan(epoch, start)
        else:
            qsize = max(loader.prefetch_factor - 1, 1)
            self.q: queue.Queue = queue.Queue(maxsize=qsize)
            mid: queue.Queue = queue.Queue(maxsize=1)
            self.stop = threading.Event()
            self.prep_thread = threading.Thread(target=_prepare_stage, args=(loader, epoch, start, mid, self.stop),
                                                name="fastload-prefetch", daemon=True)
            self.thread = threading.Thread(target=_render_stage, args=(loader, mid, self.q, self.stop),
                                           name="fastload-prefetch", daemon=True)
            self.prep_thread.start()
            self.thread.start()

    def __iter__(self):
        return self

    def __len__(self):
        return len(self.loader) - self.loader._batches_done

    def _get(self):
        while True:
            try:
                return self.q.get(timeout=0.5)
            except queue.Empty:
                if not self.thread.is_alive():
                    try:
                        return self.q.get_nowait()
                    except queue.Empty:
                        raise RuntimeError("fastload prefetch thread exited without a result") from None

    def __next__(self):
        if self.done:
            raise StopIteration
        L = self.loader
        if self.thread is None:
            try:
                step, idx, hw = next(self.plan)
            except StopIteration:
                self._end()
                raise
            host = L._make(self.epoch, step, idx, hw, self.bufs)
        else:
            item = self._get()
            if item is _END:
                self._end()
                raise StopIteration
            if isinstance(item, _Error):
                self.close()
                raise item.exc
            host = item
        batch = L._finish(host)
        if L.check_ranks:
            from fastload._dist import check_same_across_ranks

            check_same_across_ranks([L._batches_done, *batch[0].shape], "the step and batch shape")
        L._batches_done += 1
        return batch

    def _end(self):
        self.done = True
        L = self.loader
        if L._active is not None and L._active() is self:
            L._epoch = self.epoch + 1
            L._batches_done = 0
        self.close()

    def close(self):
        self.done = True
        if self.thread is not None:
            self.stop.set()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
