"""``ReinforcedLoader``: a drop-in ``torch.utils.data.DataLoader`` for reinforced datasets.

The loader composes four stages, each a module taking a plain config:
``fastload.loader.plan`` (global order, elastic slicing, sampler driving, predownload plan;
no I/O) -> ``gather`` (records, targets, bytes) -> ``render`` (the fused C++ kernel or the
device replay, capability fallback, error recovery) -> ``deliver`` (buffers, pinning and
device copy, collate hook, counters). With ``num_workers > 0`` plan + gather run on one
background thread and render on a second (the native render releases the GIL, so the gather
of the next batch overlaps it); deliver runs on the caller's thread, as do all collectives.
No per-sample Python runs in the hot loop and no worker processes are forked.
``loader.stats()`` reports the time and batches per stage and the queue depths.

Randomness is a pure function of ``(seed, epoch, sample index, view)`` (``gather``); with the
built-in order (no ``sampler``/``batch_sampler``, or a sampler with ``global_order``) the same
seed and epoch give the same global batches bit for bit whatever ``num_workers``,
``prefetch_factor`` and the world size are (see "Elastic" in the class docstring).

Epochs and resume (``fastload._state.StepIterable``). The loader keeps a position (epoch,
step = global batches handed to the user in the epoch, the same on every rank). A complete
pass moves to (epoch + 1, 0); ``set_epoch(e)`` keeps the position when ``e`` is the current
epoch and otherwise moves to (e, 0). ``iter()`` starts at the position; one iterator is live
at a time: a newer ``iter()``, ``load_state_dict`` or ``set_epoch`` to another epoch
supersedes the old one, whose prefetch threads stop and whose ``next()`` raises
``SupersededError``. ``state_dict()`` is plain types and nests the state of a fastload
sampler or batch sampler. A plain user batch sampler is re-iterated from its start and
skipped to the position, so it must be deterministic given ``set_epoch``.

Errors and buffers: see ``fastload.loader.render`` and ``fastload.loader.deliver``.
``loader.skipped`` counts the rows replaced under ``on_error="skip"`` (exactly once each, when
the batch is consumed) and ``loader.skipped_ids`` lists each failing sample id once; both are
this rank's counters, not part of ``state_dict()``.
"""
from __future__ import annotations

import os
import warnings
import weakref
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from fastload._dist import DistributedArgs
from fastload._state import StepIterable, SupersededError  # noqa: F401  (SupersededError: re-export)
from fastload.loader.deliver import (Deliver, DeliverConfig, ImageTextBatch, LoaderStats,  # noqa: F401
                                     new_stage_stats)
from fastload.loader.gather import Gather, GatherConfig
from fastload.loader.plan import Plan, PlanConfig, pair as _pair
from fastload.loader.render import Render, RenderConfig
from fastload.loader.pipeline import Iteration

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = ["ReinforcedLoader", "BatchPlan", "ImageTextBatch", "IMAGENET_MEAN", "IMAGENET_STD"]


class BatchPlan(NamedTuple):
    """``ReinforcedLoader.batch_plan(epoch, step)``: per row of the batch (int64 / bool
    arrays of ``batch_size * views_per_decode``), the dataset row, its view, the stored
    augmentation it replays, and whether a fresh augmentation replaces it."""
    indices: np.ndarray
    views: np.ndarray
    aug_ids: np.ndarray
    fresh: np.ndarray


def _bytes_args(output, encode, quality, bucket, replay, dtype, batch_size, batch_sampler):
    """The checked bytes settings (``fastload.replay.encode.BytesConfig``), or None for
    output="images"."""
    if output not in ("images", "bytes"):
        raise ValueError(f'output must be "images" or "bytes", got {output!r}')
    if output == "images":
        if encode is not None or bucket:
            raise ValueError(f"encode={encode!r} / bucket={bucket!r} apply to output='bytes'; pass "
                             "output='bytes' (or drop them)")
        return None
    from fastload.replay.encode import bytes_config

    if encode is None:
        raise ValueError("output='bytes' needs encode='jpeg', 'png', 'tiff' (the replayed image "
                         "re-encoded) or 'stored' (the stored file bytes, no augmentation)")
    cfg = bytes_config(encode, quality, bucket=bucket)
    if replay != "cpu":
        raise ValueError("output='bytes' encodes on the CPU: use replay='cpu'")
    if batch_size is None and batch_sampler is None:
        raise ValueError("output='bytes' delivers batches: pass a batch_size (batch_size=None "
                         "would leave one padded row)")
    if cfg.fmt != "stored" and dtype not in (None, torch.uint8):
        raise ValueError(f"output='bytes' with encode={encode!r} renders uint8 pixels for the "
                         f"encoder; drop dtype={dtype} (or pass torch.uint8)")
    return cfg


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
    - ``mean`` / ``std`` (0-1 scale), ``dtype``: float32 (default) or float16 normalized
      output, or uint8 unnormalized pixels (normalize on the GPU; the default with
      ``output="bytes"``).
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
    - ``output="bytes"``, ``encode``, ``quality``, ``bucket`` (ByteFormer input): each batch
      is a ``BytesBatch(tokens, lengths, batch, groups)``: the replayed (augmented) image
      re-encoded in the render stage by the native encoder (``encode`` "jpeg" with
      ``quality``, lossless "png" or "tiff"; pixels rendered as uint8), ``tokens`` uint8
      ``[B, max_len]`` zero-padded past ``lengths`` int64 ``[B]``; ``batch`` is the images-mode
      batch (its rendered images, labels, targets). ``encode="stored"`` serves the stored
      source file bytes as they are (no augmentation, nothing rendered: ``batch``'s images
      are None). ``bucket=True`` gives ``groups``, rows split by power-of-two length, each
      padded to its own longest row (``tokens`` None). State and resume as images mode.
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
                 dtype: Optional[torch.dtype] = None, device=None,
                 p_reinforced: float = 1.0, target_format: str = "dense",
                 target_mode: str = "smooth", views_per_decode: int = 1,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 tokenizer=None, aug_choice: str = "random", interpolation: Optional[str] = None,
                 on_error: str = "raise", reuse_buffers: bool = False, dct_scale: Optional[bool] = None,
                 check_ranks: bool = False, collate_fn=None, worker_init_fn=None,
                 timeout: float = 0, multiprocessing_context=None, pin_memory_device: str = "",
                 in_order: bool = True, num_classes: Optional[int] = None, replay: str = "cpu",
                 output: str = "images", encode: Optional[str] = None, quality: int = 90,
                 bucket: bool = False):
        if replay not in ("cpu", "device"):
            raise ValueError(f'replay must be "cpu" or "device", got {replay!r}')
        self.replay = replay
        self.output, self.encode, self.quality, self.bucket = output, encode, quality, bucket
        self._bytes = _bytes_args(output, encode, quality, bucket, replay, dtype, batch_size, batch_sampler)
        if dtype is None:  # bytes: the encoder reads unnormalized pixels
            dtype = torch.uint8 if self._bytes is not None else torch.float32
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
        # the scalar arguments, checked (each error names its argument) and normalized
        vars(self).update(_args.loader_scalars(self.kind, num_workers, prefetch_factor, dtype, mean, std,
                                               p_reinforced, target_format, views_per_decode, aug_choice, on_error))
        self.persistent_workers, self.target_mode = bool(persistent_workers), target_mode
        self.seed = int(generator.initial_seed()) if generator is not None else int(seed)
        self.image_size = _args.resolve_image_size(dataset, image_size, _pair)
        self.device = torch.device(device) if device is not None else None
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        if pin_memory and not self.pin_memory:
            warnings.warn("pin_memory=True but no CUDA device is available: not pinning", stacklevel=2)
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
        self._active = None  # weakref to the live iterator
        self._device_replay = None
        if self.replay == "device":
            from fastload.loader.device_replay import DeviceReplay

            self._device_replay = DeviceReplay(self)
        self._planner = Plan(PlanConfig(self.num_samples, self.seed, self.shuffle, self.batch_size, self.drop_last,
                                      self.image_size, sampler, batch_sampler),
                           cache=getattr(dataset, "remote", None), shard_starts=getattr(dataset, "_starts", None))
        self._gather = Gather(GatherConfig(self.seed, self.kind, self.views, self.num_augmentations, self.aug_choice,
                                           self.p_reinforced, self.num_classes, self.target_format,
                                           self.target_mode, tokenizer),
                              dataset, self._labels, self._planner, lambda: (self.rank, self.world_size))
        self._render = Render(RenderConfig(self.mean, self.std, self.interpolation, self.dct_scale,
                                           max(1, self.num_workers), self.views, self.on_error, self.dtype,
                                           self.num_samples, self._bytes),
                              dataset, self._gather, self._device_replay)
        self._deliver = Deliver(DeliverConfig(self.kind, self.dtype, self.pin_memory, self.reuse_buffers,
                                              self.prefetch_factor, self.device, self._bytes), self._hooks,
                                 self._device_replay)
        self._stats = new_stage_stats()
        self._check_nonempty()

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
        return self._planner.elastic

    def _order_len(self) -> int:
        return self._planner.order_len(self._pos.epoch)

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        if self.batch_sampler is not None:
            bs = self.batch_sampler
            if isinstance(bs, StepIterable) and bs.epoch != self._pos.epoch:
                bs.set_epoch(self._pos.epoch)  # its length at the loader's epoch (it drives it)
            return len(bs)
        return self._planner.num_steps(self._pos.epoch, self.world_size)

    def _num_steps(self, epoch: int) -> Optional[int]:
        """Batches of ``epoch`` (None when a plain batch sampler has no length)."""
        return self._planner.num_steps(epoch, self.world_size)

    def _fingerprint(self, epoch: Optional[int] = None) -> dict:
        if self._elastic:  # the world size is free: the state resumes elastically
            n = self._order_len() if epoch is None else self._planner.order_len(epoch)
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
        self._planner.forget_order()  # a nested sampler's loaded state may change its order
        self._drop_superseded()

    def _drop_superseded(self) -> None:
        """Stop the prefetch threads of an iterator that is no longer the live one."""
        old = self._active() if self._active is not None else None
        if old is not None and not self._pos.is_live(old.token):
            old.close()

    # ------------------------------------------------------------------ stages
    def _plan(self, epoch: int, start: int):
        """(step, this rank's indices int64[b], (h, w)) from batch ``start`` of ``epoch``."""
        return self._planner.steps(epoch, start, self.rank, self.world_size)

    def _aug_ids(self, epoch: int, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
        return self._gather.aug_ids(epoch, rows, views)

    def batch_plan(self, epoch: int, step: int) -> "BatchPlan":
        """What batch ``step`` of ``epoch`` holds on this rank, without rendering it: the
        dataset rows (each sample repeated ``views_per_decode`` times, the batch's row
        order), the view of each row, the stored augmentation each row replays and the rows
        that replay a fresh augmentation instead (``p_reinforced < 1``). Computed by the
        same plan and gather code the iteration runs, so row ``i`` of the yielded batch is
        ``indices[i]`` replaying ``aug_ids[i]``. Needs the built-in order or a sampler with
        ``global_order`` (a batch sampler's or plain sampler's batches are only known by
        iterating them)."""
        if not self._elastic:
            raise ValueError("batch_plan needs the loader's built-in order or a sampler with "
                             "global_order(epoch); a batch_sampler or plain sampler yields its "
                             "batches only when iterated")
        epoch, step = int(epoch), int(step)
        world = self.world_size
        n = self._planner.num_steps(epoch, world)
        if not 0 <= step < n:
            raise IndexError(f"step {step} is outside epoch {epoch}'s {n} batches")
        gidx, off = self._planner.global_batch(epoch, step, self.rank, world)
        b = len(gidx) // world
        rows, views, aug, fresh = self._gather.rows_of(epoch, gidx[off:off + b])
        return BatchPlan(rows, views, aug, fresh)

    def _prepare(self, epoch: int, step: int, idx: np.ndarray, hw: Tuple[int, int]) -> dict:
        return self._gather.prepare(epoch, step, idx, hw)

    def _make(self, epoch: int, step: int, idx: np.ndarray, hw: Tuple[int, int], out_fn):
        """Gather and render one batch; returns the (host) batch."""
        return self._render(self._gather.prepare(epoch, step, idx, hw), out_fn)

    @property
    def skipped(self) -> int:
        return self._deliver.skipped

    @property
    def skipped_ids(self) -> List[int]:
        return self._deliver.skipped_ids

    def stats(self) -> LoaderStats:
        """Time and batches per stage (plan, gather, render, deliver) since the loader was
        built or ``reset_stats()``, and the live iterator's queue depths; ``print`` it."""
        it = self._active() if self._active is not None else None
        queues = {}
        if it is not None and it.thread is not None:
            queues = {"gathered": (it.mid.qsize(), it.mid.maxsize), "rendered": (it.q.qsize(), it.q.maxsize)}
        return LoaderStats({k: type(v)(v.seconds, v.items) for k, v in self._stats.items()}, queues)

    def reset_stats(self) -> None:
        for s in self._stats.values():  # in place: the prefetch threads hold this dict
            s.seconds, s.items = 0.0, 0

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        # rank and world size are read now, not at construction (the loader may be built
        # before init_process_group); unknowable ones (WORLD_SIZE > 1, no group) raise
        self._bind_ranks()
        self._check_nonempty()
        token = self._pos.begin()  # supersedes the previous iterator (fastload._state)
        self._drop_superseded()
        it = Iteration(self, token, self._pos.epoch, self._pos.step)
        self._active = weakref.ref(it)
        return it
