"""``ReinforcedLoader``: a drop-in ``torch.utils.data.DataLoader`` for reinforced datasets.

Per batch, one background Python thread gathers the stored records (vectorized NumPy over
index arrays) and calls the fused C++ kernel (``fastload.replay.native.render_batch``: decode
-> crop -> resize -> flip -> RandAugment -> normalize -> erase -> MixUp/CutMix, straight into
the batch buffer, GIL released, ``num_workers`` native threads). No per-sample Python runs
in the hot loop and no worker processes are forked.

Randomness. Everything random is a pure function of ``(seed, epoch, sample index, view)``
(and, for fresh augmentations, the global step) through private generators: the shuffle
order (``fastload.batch.sharding.epoch_permutation``), which stored augmentation a view
replays, the ``p_reinforced`` coin, the synthetic caption picked, and the fresh parameters
of the non-reinforced case (drawn for the whole global batch, then sliced). With the built-in
order (no ``sampler``/``batch_sampler``, or a sampler with ``global_order``) the same seed and
epoch give the same global batches bit for bit whatever ``num_workers``,
``prefetch_factor`` and the world size are (see "Elastic" in the class docstring).

Epochs and resume (``fastload._state``). The loader keeps a position (epoch, step = global
batches handed to the user in the epoch, the same on every rank). A complete pass moves to
(epoch + 1, 0), so a loop that never calls ``set_epoch`` still reshuffles every epoch;
``set_epoch(e)`` keeps the position when ``e`` is the current epoch (so ``load_state_dict``
then the usual ``set_epoch`` at the top of the epoch loop resumes mid-epoch) and otherwise
moves to (e, 0). ``iter()`` starts at the position; one iterator is live at a time: a newer
``iter()``, ``load_state_dict`` or ``set_epoch`` to another epoch supersedes the old one,
whose prefetch threads stop and whose ``next()`` raises ``SupersededError`` (so
``zip(loader, loader)`` is an error, not a silent empty loop). ``state_dict()`` is plain types
(``torch.save`` / ``torch.load(weights_only=True)``), the protocol of torchdata's
``StatefulDataLoader``. A plain user batch sampler is re-iterated from its start and skipped
to the position, so it must be deterministic given ``set_epoch``.

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
id (``on_error="raise"``), or with ``on_error="skip"`` every row it breaks (its own rows and
the rows that use it as MixUp/CutMix partner) is replaced by a copy of the first good row of
the same batch (image, label and target, so shapes never change and distributed ranks stay
in step). When no row of a batch renders, the rows are copies of the first sample
``(first id + k) % N`` (k = 1, 2, ..., at most 64 tried) that renders with a stored
augmentation: the batch is kept, not dropped, so every rank keeps the same steps, and the
choice is deterministic (resume stays exact). ``loader.skipped`` counts the rows replaced
(exactly once each, when the batch is consumed) and ``loader.skipped_ids`` lists each failing
sample id once, in the order first seen. Both are this rank's counters, not part of
``state_dict()``.
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

from fastload.batch.sharding import epoch_permutation
from fastload._dist import DistributedArgs, check_epoch_end, check_same_across_ranks
from fastload._state import StepIterable, SupersededError
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


class ReinforcedLoader(StepIterable, DistributedArgs):
    """Iterate a reinforced dataset as ``(images, labels, targets)`` batches.

    Arguments as ``torch.utils.data.DataLoader`` (``num_workers`` is the number of native
    threads of the replay kernel: 0 renders in the calling thread with one thread, > 0 adds a
    background thread that prefetches ``prefetch_factor`` batches; ``persistent_workers`` is
    accepted and has nothing to keep alive), plus:

    - ``image_size``: int or (h, w) output size; default: the size the dataset was reinforced
      at (its manifest), a different one is allowed with a one-time note (ignored for batches
      from a ``batch_sampler`` yielding ``(index, h, w)`` tuples, rendered at their own size).
    - ``num_classes``: width of dense targets; default: the manifest's class count.
    - ``collate_fn`` (a batch-level hook: it receives the finished batch), ``batch_size=None``
      (one sample per item), ``timeout``, ``pin_memory_device``, ``multiprocessing_context``,
      ``in_order`` as DataLoader; ``worker_init_fn`` is rejected (no worker processes). The
      reasons are in ``fastload.loader._args``.
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
    - ``rank`` / ``world_size``: default torch.distributed when initialized. Elastic rule
      below; with a plain ``sampler`` (no ``global_order``) it shards by itself and each rank
      batches its indices; a ``batch_sampler`` gives this rank's batches.
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

    Elastic determinism (the built-in order, or a ``sampler`` with ``global_order``): the
    epoch's global order is ``epoch_permutation(len(dataset), seed, epoch, shuffle)``, a
    function of (seed, epoch) only. Global batch t is samples ``[t G, (t + 1) G)`` of it with
    ``G = batch_size * world_size``, and rank r takes its slice ``[r B, (r + 1) B)``. The
    last, partial global batch of ``m < G`` samples is dropped with ``drop_last=True``; else
    it is padded by wrapping to the start of the order up to ``W * ceil(m / W)`` samples, each
    rank taking ``ceil(m / W)`` (at most ``W - 1`` samples seen twice; with W = 1 it is the
    usual short last batch). All ranks thus have the same steps and shapes. ``state_dict()``
    describes the global position and is identical on every rank: any rank's state resumes
    every rank of another world size, provided ``batch_size * world_size`` is the same (e.g.
    global 256 as 4 x 64 then 8 x 32); a state of another dataset size, seed, global batch
    size, shuffle or drop_last raises ``ValueError`` naming the field.

    Order hook: if ``sampler`` has a method ``global_order(epoch) -> np.ndarray[int64]`` (the
    epoch's order of sample indices, identical on every rank, e.g. a shard-aware shuffle),
    the loader uses it instead of the permutation, under the same elastic rules (its length
    is the epoch size); the sampler is not iterated.

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
                 image_size: Union[int, Tuple[int, int], None] = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 dtype: torch.dtype = torch.float32, device=None,
                 p_reinforced: float = 1.0, target_format: str = "dense",
                 target_mode: str = "smooth", views_per_decode: int = 1,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 tokenizer=None, aug_choice: str = "random", interpolation: Optional[str] = None,
                 on_error: str = "raise", reuse_buffers: bool = False, dct_scale: Optional[bool] = None,
                 check_ranks: bool = False, collate_fn=None, worker_init_fn=None,
                 timeout: float = 0, multiprocessing_context=None, pin_memory_device: str = "",
                 in_order: bool = True, num_classes: Optional[int] = None, replay: str = "cpu"):
        if replay not in ("cpu", "device"):
            raise ValueError(f'replay must be "cpu" or "device", got {replay!r}')
        self.replay = replay
        if isinstance(dataset, (str, os.PathLike)):
            from fastload.format.reader import ReinforcedDataset

            dataset = ReinforcedDataset(dataset)
        from fastload.loader import _args

        batch_size, self._hooks = _args.dataloader_args(
            batch_size, batch_sampler, num_workers, collate_fn, worker_init_fn, timeout,
            pin_memory_device, multiprocessing_context, in_order)
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
        self.image_size = _args.resolve_image_size(dataset, image_size, _pair)
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
        self._init_ranks(rank, world_size)  # read when used (fastload._dist.DistributedArgs)
        self.num_samples = len(dataset)
        self.num_augmentations = int(dataset.num_augmentations)
        if self.views > self.num_augmentations:
            raise ValueError(f"views_per_decode={self.views} exceeds the dataset's "
                             f"{self.num_augmentations} stored augmentations")
        self.num_classes = _args.resolve_num_classes(dataset, num_classes)
        self._labels = np.asarray(dataset.labels) if self.kind == "classification" else None

        self._init_position()
        self._order_cache: Tuple[int, Optional[np.ndarray]] = (-1, None)
        self.skipped = 0
        self.skipped_ids: List[int] = []
        self._skipped_set: set = set()
        self._copy_events: dict = {}  # ring slot data_ptr -> CUDA event of its async copy
        self._active = None  # weakref to the live iterator
        self._pool: Optional[_Pool] = None  # caller-owned output buffers (see _Pool)
        self._check_nonempty()
        self._device_replay = None
        if self.replay == "device":
            from fastload.loader.device_replay import DeviceReplay

            self._device_replay = DeviceReplay(self)

    def _check_nonempty(self) -> None:
        if self.sampler is None and self.batch_sampler is None:
            from fastload.loader import _args

            _args.check_nonempty(len(self), "ReinforcedLoader", (
                f"the global batch (batch_size={self.batch_size} x world_size={self.world_size}) "
                f"with drop_last=True exceeds the {self._order_len()} samples of an epoch; lower "
                f"batch_size or pass drop_last=False"))

    # ------------------------------------------------------------------ epochs and state
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; the current epoch keeps its position (a loaded state resumes
        mid-epoch); another epoch starts at its first batch and ends a live iterator."""
        self._pos.set_epoch(epoch)
        self._drop_superseded()

    @property
    def _elastic(self) -> bool:
        """The order is a global one cut into global batches (see the class docstring)."""
        return self.batch_sampler is None and (self.sampler is None or hasattr(self.sampler, "global_order"))

    def _global_order(self, epoch: int) -> np.ndarray:
        """The epoch's global sample order: a function of (seed, epoch) only (or the
        sampler's ``global_order(epoch)``), never of the world size or num_workers."""
        cached = self._order_cache
        if cached[0] == epoch:
            return cached[1]
        if self.sampler is not None:
            order = np.asarray(self.sampler.global_order(epoch))
            if order.ndim != 1 or order.dtype.kind not in "iu":
                raise ValueError(f"sampler.global_order({epoch}) must return a 1-D integer array, "
                                 f"got {order.dtype} of shape {order.shape}")
            order = order.astype(np.int64, copy=False)
            self._check_range(order, "sampler.global_order")
        else:
            order = epoch_permutation(self.num_samples, self.seed, epoch, self.shuffle)
        self._order_cache = (epoch, order)
        return order

    def _order_len(self) -> int:
        if self.sampler is not None:
            return len(self._global_order(self._pos.epoch))
        return self.num_samples

    def _global_steps(self, n: int) -> Tuple[int, int]:
        """(steps, this rank's size of the last batch) for a global order of n samples."""
        G = self.batch_size * self.world_size
        full, rem = divmod(n, G)
        if rem == 0 or self.drop_last:
            return full, self.batch_size
        return full + 1, -(-rem // self.world_size)

    def _global_batch(self, epoch: int, step: int) -> Tuple[np.ndarray, int]:
        """(global batch ``step`` of ``epoch``, this rank's offset in it)."""
        order = self._global_order(epoch)
        n, G = len(order), self.batch_size * self.world_size
        if (step + 1) * G <= n:
            return order[step * G:(step + 1) * G], self.rank * self.batch_size
        # the last, partial global batch: wrapped around to ceil(rem / W) rows per rank
        last = self._global_steps(n)[1]
        pos = np.arange(step * G, step * G + last * self.world_size) % max(n, 1)
        return order[pos], self.rank * last

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        if self.batch_sampler is not None:
            bs = self.batch_sampler
            if isinstance(bs, StepIterable) and bs.epoch != self._pos.epoch:
                bs.set_epoch(self._pos.epoch)  # its length at the loader's epoch (it drives it)
            return len(bs)
        if self._elastic:
            return self._global_steps(self._order_len())[0]
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _num_steps(self, epoch: int) -> Optional[int]:
        """Batches of ``epoch`` (None when a plain batch sampler has no length)."""
        bs = self.batch_sampler
        if bs is not None:
            if isinstance(bs, StepIterable):
                return bs._num_steps(epoch)
            try:
                return len(bs)
            except TypeError:
                return None
        if self._elastic:
            return self._global_steps(len(self._global_order(epoch)))[0]
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _fingerprint(self, epoch: Optional[int] = None) -> dict:
        if self._elastic:  # the world size is free: the state resumes elastically
            n = self._order_len() if epoch is None or self.sampler is None else len(self._global_order(epoch))
            return {"num_samples": n, "seed": self.seed,
                    "global_batch_size": self.batch_size * self.world_size, "shuffle": self.shuffle,
                    "drop_last": self.drop_last,
                    "order": "sampler.global_order" if self.sampler is not None else "permutation"}
        fp = {"num_samples": self.num_samples, "seed": self.seed, "world_size": self.world_size,
              "order": "batch_sampler" if self.batch_sampler is not None else "sampler"}
        if self.batch_size is not None:
            fp["batch_size"] = self.batch_size
        return fp

    def _state_children(self) -> dict:
        """A fastload sampler's state nests in the loader's (a StreamMixer's proportions, a
        variable-resolution sampler's configuration): one state_dict restores both."""
        return {name: obj for name, obj in (("sampler", self.sampler), ("batch_sampler", self.batch_sampler))
                if isinstance(obj, StepIterable)}

    def _upgrade_state(self, state):
        if "fingerprint" not in state:
            # saved before the contract: seed and world size at the top level
            legacy = {k: state[k] for k in ("seed", "world_size") if k in state}
            if self._elastic and "world_size" in legacy:
                legacy["global_batch_size"] = int(legacy.pop("world_size")) * self.batch_size
            self._legacy_fields = True
            state = {**state, "fingerprint": legacy}
        return state

    def _after_load(self) -> None:
        self._order_cache = (-1, None)  # a nested sampler's loaded state may change its order
        self._drop_superseded()

    def _drop_superseded(self) -> None:
        """Stop the prefetch threads of an iterator that is no longer the live one."""
        old = self._active() if self._active is not None else None
        if old is not None and not self._pos.is_live(old.token):
            old.close()

    # ------------------------------------------------------------------ batch plan
    def _check_range(self, idx: np.ndarray, what: str) -> None:
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_samples):
            bad = idx[(idx < 0) | (idx >= self.num_samples)][0]
            raise ValueError(f"{what} yielded index {int(bad)}, outside [0, {self.num_samples})")

    def _plan(self, epoch: int, start: int) -> Iterator[Tuple[int, np.ndarray, Tuple[int, int]]]:
        """Yield (step, this rank's indices int64[b], (h, w)) from batch ``start`` of ``epoch``.

        Samplers are set up now, in the calling thread (a contract sampler is placed at the
        loader's position and its iterator taken here); the returned generator may run in
        the prefetch thread."""
        size = self.image_size
        if self.batch_sampler is not None:
            bs = self.batch_sampler
            arrays = hasattr(bs, "iter_arrays")
            if isinstance(bs, StepIterable):
                bs.seek(epoch, start)  # the sampler starts at the loader's position
                first = start
            else:
                if hasattr(bs, "set_epoch"):
                    bs.set_epoch(epoch)
                first = 0  # a plain batch sampler restarts: skip to the position
            it = bs.iter_arrays() if arrays else iter(bs)
            return self._batch_sampler_plan(it, arrays, first, start, size)
        if not self._elastic:
            if isinstance(self.sampler, StepIterable):
                self.sampler.seek(epoch, 0)  # the loader counts batches, not the sampler
            elif hasattr(self.sampler, "set_epoch"):
                self.sampler.set_epoch(epoch)
            idx = np.fromiter((int(i) for i in self.sampler), dtype=np.int64)
            self._check_range(idx, "sampler")
            b = self.batch_size
            nb = len(idx) // b if self.drop_last else -(-len(idx) // b)
            return self._predownload((step, idx[step * b:(step + 1) * b], size) for step in range(start, nb))
        steps = self._global_steps(len(self._global_order(epoch)))[0]
        return self._predownload(self._elastic_plan(epoch, start, steps, size))

    def _predownload(self, plan: Iterator[Tuple[int, np.ndarray, Tuple[int, int]]]):
        """A remote dataset's cache gets this rank's shards for the rest of the epoch, step
        by step (predownload ahead, eviction by next use); the plan then tells it each step
        as the step is read. A local dataset's plan stays a lazy generator."""
        cache = getattr(self.dataset, "remote", None)
        if cache is None:
            return plan
        plan = list(plan)
        starts = self.dataset._starts
        cache.plan_steps([np.unique(np.searchsorted(starts, idx, side="right") - 1) for _, idx, _ in plan])

        def steps():
            for k, item in enumerate(plan):
                cache.at_step(k)
                yield item

        return steps()

    def _elastic_plan(self, epoch, start, steps, size):
        for step in range(start, steps):
            gidx, off = self._global_batch(epoch, step)
            b = len(gidx) // self.world_size
            yield step, gidx[off:off + b], size

    def _batch_sampler_plan(self, it, arrays, first, start, size):
        for step, batch in enumerate(it, first):
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

        hw = np.asarray(self.dataset.source_hw)
        if self._elastic:
            # drawn for the fresh rows of the whole global batch, then this rank's taken: the
            # global batch is the same bytes whatever the world size
            gidx, off = self._global_batch(epoch, step)
            V = self.views
            grows = np.repeat(gidx, V)
            gviews = np.tile(np.arange(V, dtype=np.int64), len(gidx))
            gfresh = np.flatnonzero(_uniform(_hash((self.seed, epoch, _TAG_COIN), grows, gviews))
                                    >= self.p_reinforced)
            b = len(gidx) // self.world_size
            mine = (gfresh >= off * V) & (gfresh < (off + b) * V)
            ss = np.random.SeedSequence([self.seed & _MASK64, epoch, step, _TAG_FRESH])
            rng = np.random.Generator(np.random.PCG64(ss))
            recs = np.asarray(sample_params(self.dataset.policy, rng, grows[gfresh], hw, 1)).reshape(-1)[mine]
        else:
            ss = np.random.SeedSequence([self.seed & _MASK64, epoch, self.rank, step, _TAG_FRESH])
            rng = np.random.Generator(np.random.PCG64(ss))
            recs = np.asarray(sample_params(self.dataset.policy, rng, rows, hw, 1)).reshape(-1)
        recs = recs.astype(P.AUG_DTYPE, copy=True)
        recs["partner"] = -1
        recs["flags"] &= np.uint8(~(P.FLAG_MIXUP | P.FLAG_CUTMIX | P.FLAG_PARTNER_FLIP) & 0xFF)
        return recs

    def _one_hot_topk(self, labels: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        ids = (labels[:, None] + np.arange(k)[None, :]) % max(self.num_classes, 1)
        probs = np.zeros((len(labels), k), dtype=np.float32)
        probs[:, 0] = 1.0
        return ids.astype(np.int64), probs

    def _prepare(self, epoch: int, step: int, idx: np.ndarray, hw: Tuple[int, int],
                 fresh_ok: bool = True) -> dict:
        """Stage 1 (Python, vectorized): records, sources, labels and targets of one batch.
        ``fresh_ok=False`` replays stored augmentations only (a substitute row)."""
        ds, V = self.dataset, self.views
        rows = np.repeat(idx, V)
        views = np.tile(np.arange(V, dtype=np.int64), len(idx))
        aug = self._aug_ids(epoch, rows, views)
        sources, recs, ids, probs = ds.gather(rows, aug)
        recs = np.array(recs, dtype=P.AUG_DTYPE, copy=True).reshape(-1)
        fresh = None
        if self.p_reinforced < 1.0 and fresh_ok:
            coin = _uniform(_hash((self.seed, epoch, _TAG_COIN), rows, views))
            fresh = coin >= self.p_reinforced
            if fresh.any():
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
        if self.kind == "classification":
            labels = self._labels[rows].astype(np.int64)
            tgt = self._targets(ids, probs, labels, fresh)
        else:
            labels, tgt = None, self._text_side(epoch, rows, views, aug)
        return dict(rows=rows, sources=list(sources), recs=recs, partners=partners, hw=hw,
                    labels=labels, tgt=tgt, ext=ext, epoch=epoch, step=step)

    def _render_prepared(self, prep: dict, out_fn):
        """Stage 2: render (native, GIL released; or on the device with replay="device")."""
        # the Triton replay knows neither schema-v2 extension records (imports) nor torchvision
        # v2 RandAugment semantics: such batches render on the CPU path (then are uploaded)
        pol = getattr(self.dataset, "policy", None)
        if (self._device_replay is not None and prep.get("ext") is None
                and getattr(pol, "randaugment_semantics", "v1") == "v1"):
            return self._device_replay.render(prep, lambda: self._render_prepared_host(prep, out_fn))
        return self._render_prepared_host(prep, out_fn)

    def _render_prepared_host(self, prep: dict, out_fn):
        rows, labels, tgt, hw = prep["rows"], prep["labels"], prep["tgt"], prep["hw"]
        out = out_fn((len(rows), 3, hw[0], hw[1]))
        bad, culprits = self._render(prep["sources"], prep["recs"], out, prep["partners"], rows, prep.get("ext"))
        if bad is not None:  # on_error="skip": copy the first good row over every bad one
            bi = np.flatnonzero(bad)
            if bad.all():  # no good row in the batch: borrow one (see the module docstring)
                s_out, s_labels, s_tgt, good = self._substitute(prep)
            else:
                s_out, s_labels, s_tgt, good = out, labels, tgt, int(np.flatnonzero(~bad)[0])
            out[torch.as_tensor(bi)] = s_out[good].clone()
            if labels is not None:
                labels[bi] = s_labels[good]
            tgt = _copy_from(tgt, bi, s_tgt, good)
        return out, labels, tgt, culprits

    def _substitute(self, prep: dict, tries: int = 64):
        """A batch whose every row failed (on_error="skip"): the rows of the first sample
        ``(first id + k) % N``, k = 1, 2, ..., that renders with a stored augmentation.
        Deterministic (a function of the batch), so resume and ranks stay exact."""
        rows, hw = prep["rows"], prep["hw"]
        first = int(rows[0])
        for k in range(1, min(tries, self.num_samples - 1) + 1):
            cand = np.array([(first + k) % self.num_samples], dtype=np.int64)
            sub = self._prepare(prep["epoch"], prep["step"], cand, hw, fresh_ok=False)
            out = torch.empty((len(sub["rows"]), 3, hw[0], hw[1]), dtype=self.dtype)
            try:
                bad, _ = self._render(sub["sources"], sub["recs"], out, sub["partners"], sub["rows"], sub.get("ext"))
            except (RuntimeError, ValueError):
                continue
            if bad is None or not bad.all():
                good = 0 if bad is None else int(np.flatnonzero(~bad)[0])
                return out, sub["labels"], sub["tgt"], good
        raise RuntimeError(f"on_error='skip': every row of a batch failed (sample ids "
                           f"{sorted(set(rows.tolist()))}) and none of the next {tries} samples "
                           "renders either; the dataset looks broken")

    def _make(self, epoch: int, step: int, idx: np.ndarray, hw: Tuple[int, int], out_fn):
        """Gather and render one batch; returns the (host) batch."""
        return self._render_prepared(self._prepare(epoch, step, idx, hw), out_fn)

    def _render(self, sources, recs, out, partners, rows, ext=None):
        """Render; returns (None, []) or, under on_error="skip", (bad-row mask, culprit ids)."""
        from fastload.replay.native import render_batch

        threads = max(1, self.num_workers)
        pol = getattr(self.dataset, "policy", None)  # replay RandAugment as the dataset was made
        kw = dict(mean=self.mean, std=self.std, interpolation=self.interpolation,
                  dct_scale=self.dct_scale, threads=threads, ra_num_bins=getattr(pol, "ra_num_bins", 31),
                  ra_semantics=getattr(pol, "randaugment_semantics", "v1"))
        grid = self.dataset.replay.get("box_grid") if ext is not None else None

        def ek(pos):  # the rows' schema-v2 extension records, when the dataset has them
            return {} if ext is None else dict(ext=ext[pos], box_grid=grid)
        try:
            src = sources
            if self.views > 1:
                # FKD-style: decode each image once (native pool, full resolution) and replay
                # its V views from the pixels instead of decoding V times
                from fastload.replay.native import decode_batch

                pixels = decode_batch(sources[::self.views], scale=1, threads=threads)
                src = [pixels[r // self.views] for r in range(len(sources))]
            render_batch(src, recs, out, partner_sources=partners, sample_ids=rows, **kw, **ek(slice(None)))
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
                             sample_ids=rows[r:r + 1], **one, **ek(slice(r, r + 1)))
                continue
            except (RuntimeError, ValueError) as exc:
                bad[r] = True
                msg = str(exc)
            own = recs[r:r + 1].copy()
            own["partner"] = -1
            own["flags"] &= np.uint8(~(P.FLAG_MIXUP | P.FLAG_CUTMIX | P.FLAG_PARTNER_FLIP) & 0xFF)
            try:
                render_batch(sources[r:r + 1], own, out[r:r + 1], sample_ids=rows[r:r + 1], **one,
                             **ek(slice(r, r + 1)))
                culprit[r] = int(recs["partner"][r]) if recs["partner"][r] >= 0 else int(rows[r])
            except (RuntimeError, ValueError) as exc:
                culprit[r] = int(rows[r])
                msg = str(exc)
            msgs.setdefault(int(culprit[r]), msg)
        if not bad.any():  # the failure did not reproduce row by row: surface it as is
            raise first_exc
        ids = sorted(msgs)
        if self.on_error == "raise":
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
        # rank and world size are read now, not at construction (the loader may be built
        # before init_process_group); unknowable ones (WORLD_SIZE > 1, no group) raise
        self._bind_ranks()
        self._check_nonempty()
        token = self._pos.begin()  # supersedes the previous iterator (fastload._state)
        self._drop_superseded()
        it = _Iter(self, token, self._pos.epoch, self._pos.step)
        self._active = weakref.ref(it)
        return it

    def _finish(self, host):
        """Host batch -> what the user gets (device copy when a device is set). Counts the
        rows replaced under on_error="skip" here, at consumption, so state_dict is exact."""
        out, labels, tgt, culprits = host
        if culprits:
            self.skipped += len(culprits)  # rows replaced
            for c in culprits:  # distinct samples that failed, in the order first seen
                if c not in self._skipped_set:
                    self._skipped_set.add(c)
                    self.skipped_ids.append(c)
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
            return self._hooks.finish((out, labels, tgt))
        caps, syn, ie, te, se = tgt
        return self._hooks.finish(ImageTextBatch(out, caps, syn, ie, te, se))


def _copy_from(t, rows, src, good):
    """Rows ``rows`` of ``t`` become copies of row ``good`` of ``src`` (same structure)."""
    if isinstance(t, torch.Tensor):
        t[torch.as_tensor(rows)] = src[good].clone()
        return t
    if isinstance(t, tuple):
        return tuple(_copy_from(x, rows, y, good) for x, y in zip(t, src))
    if isinstance(t, list):
        for r in rows:
            t[r] = src[good]
        return t
    if isinstance(t, dict):  # tokenizer output
        return {k: _copy_from(v, rows, src[k], good) for k, v in t.items()}
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


def _start_thread(target, args, stop: threading.Event) -> threading.Thread:
    from fastload._threads import start_thread

    return start_thread(target, args, stop, name="fastload-prefetch")


def _prepare_stage(plan, loader: ReinforcedLoader, epoch: int, q: queue.Queue,
                   stop: threading.Event) -> None:
    """Thread 1: batch plan + gather (Python). Runs while thread 2's native render of the
    previous batch holds no GIL, so the native pool never waits for the gather."""
    try:
        for step, idx, hw in plan:
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
            if prep is _END or isinstance(prep, _Error) or stop.is_set():
                _put(q, prep, stop)
                return
            if not _put(q, loader._render_prepared(prep, bufs), stop):
                return
    except BaseException as exc:
        _put(q, _Error(exc), stop)


class _Iter:
    def __init__(self, loader: ReinforcedLoader, token: int, epoch: int, start: int):
        self.loader, self.token, self.epoch = loader, token, epoch
        self.done = self.finished = self.last_out = False
        # batches in the epoch, when known exactly (built-in plans and fastload samplers)
        bs = loader.batch_sampler
        self.total = len(loader) if bs is None or isinstance(bs, StepIterable) else None
        self.thread = None
        plan = loader._plan(epoch, start)  # samplers set up here, in the caller's thread
        if loader.num_workers == 0:
            self.bufs = _Buffers(loader)
            self.plan = plan
        else:
            qsize = max(loader.prefetch_factor - 1, 1)
            self.q: queue.Queue = queue.Queue(maxsize=qsize)
            mid: queue.Queue = queue.Queue(maxsize=1)
            self.stop = threading.Event()
            self.prep_thread = _start_thread(_prepare_stage, (plan, loader, epoch, mid, self.stop), self.stop)
            self.thread = _start_thread(_render_stage, (loader, mid, self.q, self.stop), self.stop)

    def __iter__(self):
        return self

    def __len__(self):
        L = self.loader
        return max(len(L) - L._pos.step, 0) if L._pos.is_live(self.token) else 0

    def _get(self):
        limit = self.loader._hooks.timeout
        waited = 0.0
        while True:
            try:
                return self.q.get(timeout=0.5 if not limit else min(0.5, limit - waited))
            except queue.Empty:
                waited += 0.5 if not limit else min(0.5, limit - waited)
                if limit and waited >= limit:
                    raise RuntimeError(f"ReinforcedLoader timed out after {limit} seconds waiting "
                                       "for a batch (timeout=)")
                if not self.thread.is_alive():
                    try:
                        return self.q.get_nowait()
                    except queue.Empty:
                        raise RuntimeError("fastload prefetch thread exited without a result") from None

    def __next__(self):
        L = self.loader
        if self.finished:
            raise StopIteration
        if self.last_out:  # the epoch already moved on when its last batch went out
            self._end()
            raise StopIteration
        if not L._pos.is_live(self.token):
            self.close()
            L._pos.check(self.token)  # raises SupersededError
        if self.done:  # closed after an error
            raise StopIteration
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
            check_same_across_ranks([L._pos.step, *batch[0].shape], "the step and batch shape")
        L._pos.advance(self.token)
        if self.total is not None and L._pos.step >= self.total:
            # the pass is complete with its last batch: trainers (Lightning) stop after
            # len(loader) batches without asking for the StopIteration
            self.last_out = True
            L._pos.finish(self.token)
        return batch

    def _end(self):
        self.done = self.finished = True
        L = self.loader
        self.close()
        if L.check_ranks:  # a rank with more batches meets this sentinel instead of hanging
            check_epoch_end(5, "the step and batch shape")
        L._pos.finish(self.token)  # no-op when the last batch already finished the pass

    def close(self):
        self.done = True
        if self.thread is not None:
            self.stop.set()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
