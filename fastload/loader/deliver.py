"""Stage 4 of ``ReinforcedLoader``: deliver. Output buffers (caller-owned pooled tensors or
a ring with ``reuse_buffers``), pinning and the device copy, the collate hook, the batch's
final form and the per-rank counters of replaced rows.

Buffers. With ``reuse_buffers=False`` (default) every yielded image tensor is the caller's
own: it comes from a small per-loader pool whose buffers are rendered into again only once
nothing refers to them any more (no tensor, view, numpy array or storage of them), which
saves the page faults of a fresh 38 MB batch per step. With ``reuse_buffers=True`` the
kernel renders into a ring of preallocated (pinned when ``pin_memory``) buffers,
``max(prefetch_factor - 1, 1) + 3`` per output shape; a yielded image tensor stays valid
until the next batch is requested, then may be overwritten: ``clone()`` what you keep longer
(FFCV's contract). With ``device`` set the yielded tensors are device copies and are always
the caller's own."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, List, NamedTuple, Optional

import torch


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



@dataclass(frozen=True)
class DeliverConfig:
    kind: str
    dtype: torch.dtype
    pin_memory: bool
    reuse_buffers: bool
    prefetch_factor: int
    device: Optional[torch.device] = None
    encode: Any = None  # fastload.replay.encode.BytesConfig with output="bytes"


class Deliver:
    """Host batch -> what the user gets. ``hooks``: the DataLoader-compatible hooks
    (``collate_fn``); ``device_replay``: finishes a batch rendered on the device."""

    def __init__(self, cfg: DeliverConfig, hooks, device_replay=None):
        self.cfg, self.hooks, self.device_replay = cfg, hooks, device_replay
        self.skipped = 0
        self.skipped_ids: List[int] = []
        self._skipped_set: set = set()
        self.copy_events: dict = {}  # ring slot data_ptr -> CUDA event of its async copy
        self.pool: Optional[_Pool] = None  # caller-owned output buffers, one pool per loader

    def buffers(self) -> "Buffers":
        return Buffers(self)

    def __call__(self, host):
        """Host batch -> what the user gets (device copy when a device is set). Counts the
        rows replaced under on_error="skip" here, at consumption (exactly once each)."""
        out, labels, tgt, culprits = host[:4]
        enc = host[4] if len(host) > 4 else None  # output="bytes": (buffer, lengths)
        if culprits:
            self.skipped += len(culprits)  # rows replaced
            for c in culprits:  # distinct samples that failed, in the order first seen
                if c not in self._skipped_set:
                    self._skipped_set.add(c)
                    self.skipped_ids.append(c)
        if labels is not None:
            labels = torch.from_numpy(labels)
        if self.device_replay is not None:
            out = self.device_replay.finish(out)
        if self.cfg.device is not None:
            nb = self.cfg.pin_memory
            host_out = out
            out = out.to(self.cfg.device, non_blocking=nb) if out is not None else None
            labels = labels.to(self.cfg.device, non_blocking=nb) if labels is not None else None
            tgt = to_device(tgt, self.cfg.device, nb)
            if nb and self.cfg.reuse_buffers and self.cfg.device.type == "cuda" and out is not None:
                # the ring slot may be rewritten only once this async copy has completed
                ev = torch.cuda.Event()
                ev.record()
                self.copy_events[host_out.data_ptr()] = ev
        if self.cfg.kind == "classification":
            batch = (out, labels, tgt)
        else:
            caps, syn, ie, te, se = tgt
            batch = ImageTextBatch(out, caps, syn, ie, te, se)
        if enc is not None:
            batch = self._bytes(enc, batch)
        return self.hooks.finish(batch)

    def _bytes(self, enc, batch):
        """output="bytes": the padded token batch with lengths (or length-bucket groups)."""
        from fastload.replay.encode import bytes_batch

        b = bytes_batch(enc[0], enc[1], batch, self.cfg.encode)
        if self.cfg.device is None:
            return b
        dev, nb = self.cfg.device, self.cfg.pin_memory
        groups = None if b.groups is None else [g._replace(tokens=g.tokens.to(dev), lengths=g.lengths.to(dev))
                                                for g in b.groups]
        return b._replace(tokens=None if b.tokens is None else b.tokens.to(dev, non_blocking=nb),
                          lengths=b.lengths.to(dev), groups=groups)


def to_device(t, device, nb):
    if isinstance(t, torch.Tensor):
        return t.to(device, non_blocking=nb)
    if isinstance(t, tuple):
        return tuple(to_device(x, device, nb) for x in t)
    if isinstance(t, dict):
        return {k: to_device(v, device, nb) for k, v in t.items()}
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


class Buffers:
    """Output buffers: caller-owned tensors (pooled, ``_Pool``), or a ring per shape
    (reuse_buffers)."""

    def __init__(self, deliver: "Deliver"):
        cfg = deliver.cfg
        self.dtype, self.pin = cfg.dtype, cfg.pin_memory
        self.events = deliver.copy_events
        self.reuse = cfg.reuse_buffers
        self.ring_size = max(cfg.prefetch_factor - 1, 1) + 3
        self.rings: dict = {}
        self.turn: dict = {}
        # in flight at most: prefetch queue + the two batches in the render stage (one
        # rendering, the next queued behind it: pipeline._render_stage) + the caller's current
        # one; the pool (below) also covers the caller's previous batch (a `for` loop drops the
        # old one only after `next`)
        if deliver.pool is None:
            deliver.pool = _Pool(self.dtype, self.pin, cap=self.ring_size + 2)
        self.pool = deliver.pool

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


@dataclass
class StageStats:
    seconds: float = 0.0  # wall time spent in the stage (its own thread's time when prefetching)
    items: int = 0  # batches through the stage

    @property
    def ms_per_item(self) -> float:
        return 1e3 * self.seconds / self.items if self.items else 0.0


@dataclass
class LoaderStats:
    """``loader.stats()``: per stage, the time spent and batches through it since the loader
    was built (or ``reset_stats()``), and the prefetch queues' depths now (batches waiting,
    capacity). A stage much slower per batch than the others is the bottleneck; a full
    render queue means the training step is slower than the loader."""

    stages: dict  # "plan" | "gather" | "render" | "deliver" -> StageStats
    queues: dict  # "gathered" | "rendered" -> (depth, capacity); empty without prefetch threads

    def __str__(self) -> str:
        lines = [f"{'stage':<8} {'batches':>8} {'seconds':>9} {'ms/batch':>9}"]
        for name, s in self.stages.items():
            lines.append(f"{name:<8} {s.items:>8} {s.seconds:>9.3f} {s.ms_per_item:>9.2f}")
        for name, (depth, cap) in self.queues.items():
            lines.append(f"queue {name}: {depth}/{cap}")
        return "\n".join(lines)


def new_stage_stats() -> dict:
    return {name: StageStats() for name in ("plan", "gather", "render", "deliver")}
