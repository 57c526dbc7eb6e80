"""DataLoader-parity argument handling of ``ReinforcedLoader`` (and the per-sample view of
``ReinforcedDataset``).

Every ``torch.utils.data.DataLoader`` argument is either honored or rejected with a message
that says what to do instead. Decisions, and why:

- ``collate_fn``: a *batch-level* hook. The fused kernel renders a whole batch into one
  tensor, so there is no list of samples to collate; ``collate_fn(batch)`` receives the
  finished batch (``(images, labels, targets)`` or an ``ImageTextBatch``) and what it
  returns is what the loop gets (move keys into a dict, add a field, cast...).
  ``torch.utils.data.default_collate`` (and ``None``) leave the batch as it is.
- ``batch_size=None`` (no automatic batching): each item is one sample, ``(image [3, h, w],
  label, target)``, exactly DataLoader's contract (rendered as batches of one).
- ``timeout``: seconds to wait for a batch from the background thread (``num_workers > 0``);
  past it a ``RuntimeError`` is raised, as DataLoader does. 0 waits forever.
- ``pin_memory_device``: "" or a CUDA device ("cuda", "cuda:1"); pinning is CUDA's.
- ``multiprocessing_context``: accepted and unused (no process is ever started, so every
  start method is satisfied); checked to be a start method name or a context.
- ``in_order``: batches are always delivered in order, which satisfies both values.
- ``worker_init_fn``: rejected. There are no worker processes: the render runs in native
  threads, and randomness is a pure function of ``(seed, epoch, index)`` (pass ``seed=`` or
  ``generator=``); per-worker seeding has nothing to seed and per-worker dataset setup has
  nowhere to run. Do that setup once before building the loader.
- ``image_size`` / ``num_classes``: default to the dataset's manifest (what the teacher
  scored). A different explicit ``image_size`` is allowed, with a one-time note.
"""
from __future__ import annotations

import multiprocessing
import warnings
from typing import Any, Callable, Optional

import torch

_NOTED: set = set()  # (dataset path, size) pairs already noted once in this process


def _is_default_collate(fn) -> bool:
    from torch.utils.data import _utils

    return fn is None or fn in (getattr(torch.utils.data, "default_collate", None),
                                _utils.collate.default_collate)


def manifest_image_size(dataset) -> Optional[tuple]:
    replay = getattr(dataset, "replay", None) or {}
    size = replay.get("image_size")
    if size is None:
        return None
    if isinstance(size, (int, float)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def resolve_image_size(dataset, image_size, pair) -> tuple:
    """The manifest's size unless given; an explicit different size gets a one-time note."""
    stored = manifest_image_size(dataset)
    if image_size is None:
        if stored is None:
            raise ValueError("image_size: the dataset's manifest has no replay image_size; pass "
                             "image_size=(h, w)")
        return stored
    size = pair(image_size, "image_size")
    if stored is not None and size != stored:
        key = (getattr(dataset, "path", id(dataset)), size)
        if key not in _NOTED:
            _NOTED.add(key)
            warnings.warn(f"image_size={size} differs from the {stored} the dataset was reinforced "
                          f"at (its manifest's replay.image_size): crops are replayed at {size}; "
                          "the teacher scored them at the stored size", UserWarning, stacklevel=4)
    return size


def resolve_num_classes(dataset, num_classes) -> int:
    stored = int(getattr(dataset, "num_classes", 0) or 0)
    if num_classes is None:
        return stored
    n = int(num_classes)
    if stored and n < stored:
        raise ValueError(f"num_classes={n} is smaller than the dataset's {stored} classes (its "
                         "manifest): dense targets would drop classes; omit num_classes")
    if n <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes!r}")
    return n


class _Hooks:
    """What the loader applies to each finished batch (``finish``) and its wait limit."""

    def __init__(self, unbatched: bool, collate_fn: Optional[Callable], timeout: float):
        self.unbatched = unbatched
        self.collate_fn = None if _is_default_collate(collate_fn) else collate_fn
        self.timeout = float(timeout)

    def finish(self, batch: Any) -> Any:
        if self.unbatched:
            batch = _first(batch)
        if self.collate_fn is not None:
            batch = self.collate_fn(batch)
        return batch


def _first(t):
    if isinstance(t, torch.Tensor):
        return t[0]
    if isinstance(t, tuple) and hasattr(t, "_fields"):  # ImageTextBatch
        return type(t)(*(_first(x) for x in t))
    if isinstance(t, tuple):
        return tuple(_first(x) for x in t)
    if isinstance(t, list):
        return t[0]
    if isinstance(t, dict):
        return {k: _first(v) for k, v in t.items()}
    return t


def dataloader_args(batch_size, batch_sampler, num_workers, collate_fn, worker_init_fn, timeout,
                    pin_memory_device, multiprocessing_context, in_order):
    """Validate the DataLoader-only arguments; returns (batch_size to use, hooks)."""
    if worker_init_fn is not None:
        raise ValueError(
            "worker_init_fn: ReinforcedLoader starts no worker processes (the render runs in "
            "native threads) and its randomness is a function of (seed, epoch, index): pass "
            "seed= or generator= for reproducibility, and do per-worker setup once before "
            "building the loader; then drop worker_init_fn")
    if collate_fn is not None and not callable(collate_fn):
        raise ValueError(f"collate_fn must be callable, got {collate_fn!r}")
    try:
        timeout = float(timeout)
    except (TypeError, ValueError):
        raise ValueError(f"timeout must be a number of seconds, got {timeout!r}") from None
    if timeout < 0:
        raise ValueError(f"timeout option should be non-negative, got {timeout}")
    dev = str(pin_memory_device or "")
    if dev and torch.device(dev).type != "cuda":
        raise ValueError(f"pin_memory_device={dev!r}: fastload pins host memory for CUDA only; "
                         "pass pin_memory_device='cuda' (or leave it empty) and device= to move "
                         "batches to another device")
    if multiprocessing_context is not None:
        ok = (isinstance(multiprocessing_context, str)
              and multiprocessing_context in multiprocessing.get_all_start_methods())
        if not ok and not hasattr(multiprocessing_context, "Process"):
            raise ValueError(f"multiprocessing_context must be one of "
                             f"{multiprocessing.get_all_start_methods()} or a context, got "
                             f"{multiprocessing_context!r} (fastload starts no processes, so "
                             "any valid value works)")
    if in_order not in (True, False):
        raise ValueError(f"in_order must be True or False, got {in_order!r}")
    unbatched = batch_size is None and batch_sampler is None
    if unbatched:
        batch_size = 1
    return batch_size, _Hooks(unbatched, collate_fn, timeout)


def loader_scalars(kind, num_workers, prefetch_factor, dtype, mean, std, p_reinforced, target_format,
                   views_per_decode, aug_choice, on_error) -> dict:
    """``ReinforcedLoader``'s scalar arguments, checked (a ValueError naming the argument) and
    normalized; the keys are the loader's attribute names."""
    if int(num_workers) < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    prefetch_factor = 2 if prefetch_factor is None else prefetch_factor
    if int(prefetch_factor) < 1:
        raise ValueError(f"prefetch_factor must be >= 1, got {prefetch_factor}")
    if dtype not in (torch.float32, torch.float16, torch.uint8):
        raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.uint8, got {dtype}")
    m, s = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(m) != 3 or len(s) != 3 or min(s) <= 0:
        raise ValueError(f"mean and std must have 3 values, std > 0; got {mean}, {std}")
    if not 0.0 <= float(p_reinforced) <= 1.0:
        raise ValueError(f"p_reinforced must be in [0, 1], got {p_reinforced}")
    if kind == "image_text" and float(p_reinforced) != 1.0:
        raise ValueError("p_reinforced must be 1.0 for image-text datasets (a fresh "
                         "augmentation has no stored teacher embedding)")
    if target_format not in ("dense", "topk"):
        raise ValueError(f"target_format must be 'dense' or 'topk', got {target_format!r}")
    if int(views_per_decode) < 1:
        raise ValueError(f"views_per_decode must be >= 1, got {views_per_decode}")
    if aug_choice not in ("random", "epoch"):
        raise ValueError(f"aug_choice must be 'random' or 'epoch', got {aug_choice!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    return {"num_workers": int(num_workers), "prefetch_factor": int(prefetch_factor), "dtype": dtype, "mean": m,
            "std": s, "p_reinforced": float(p_reinforced), "target_format": target_format,
            "views": int(views_per_decode), "aug_choice": aug_choice, "on_error": on_error}


def check_nonempty(steps: int, what: str, why: str) -> None:
    """A configuration that yields no step is a mistake: say why instead of looping 0 times."""
    if steps <= 0:
        raise ValueError(f"{what} yields 0 steps per epoch: {why}")


def decomposition_why(sampler) -> str:
    """Why a bucket sampler has no step: each bucket's rows against one step's rows."""
    s = sampler
    parts = [f"bucket {k} (length {1 << k}) has {int(r)} rows, a step needs "
             f"{int(b) * s.world_size}" for k, r, b in zip(s.buckets, s.rows, s.batch_size)]
    best = max((int(r) << k) // s.world_size for k, r in zip(s.buckets, s.rows))
    return (f"tokens_per_step={s.tokens_per_step} takes tokens_per_step / 2^k rows of bucket k per "
            f"rank and step over world_size={s.world_size}, and " + "; ".join(parts)
            + f". Lower tokens_per_step (at most about {best} here, a multiple of the longest "
            "bucket's length) or add data")
