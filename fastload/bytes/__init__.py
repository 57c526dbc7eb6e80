"""File-bytes batches for ByteFormer-style models (RECIPES.md section 8).

The loader does this itself: ``ReinforcedLoader(output="bytes", encode=..., quality=...,
bucket=...)`` re-encodes each replayed image in its render stage (on the render thread, GIL
released) and delivers ``BytesBatch(tokens, lengths, batch, groups)``. ``BytesBatches`` is the
same encoding as a wrapper around an images-mode ``ReinforcedLoader`` rendering
``dtype=torch.uint8`` (it encodes on the caller's thread, after the loader's batch), for code
that already holds such a loader; both go through ``fastload.replay.encode`` (``encode_rows``,
``bytes_batch``), so the tokens are identical. ``encode="stored"`` serves the dataset's stored
source file bytes as they are (no augmentation; the loader's rows, from its ``batch_plan``).

State: the wrapper has none of its own; ``state_dict`` / ``load_state_dict`` / ``set_epoch``
are the loader's (the encoding is a pure function of the rendered pixels).
"""
from __future__ import annotations

from typing import Optional

import torch

from fastload.replay import encode as E
from fastload.replay.encode import BytesBatch  # noqa: F401  (re-export)


class BytesBatches:
    def __init__(self, loader, encode: str = "jpeg", quality: int = 90, level: int = 6,
                 bucket: bool = False, pad_value: int = 0, threads: Optional[int] = None):
        self.cfg = E.bytes_config(encode, quality, level, bucket, pad_value)
        if getattr(loader, "output", "images") != "images":
            raise ValueError("BytesBatches wraps an images-mode loader; this loader already "
                             "delivers bytes (output='bytes')")
        if encode != "stored":
            if loader.dtype != torch.uint8:
                raise ValueError(f"BytesBatches(encode={encode!r}) needs a loader with dtype=torch.uint8 "
                                 f"(pixels to encode), got {loader.dtype}")
            if getattr(loader, "device", None) is not None:
                raise ValueError("BytesBatches encodes on the CPU: build the loader without device=")
        self.loader, self.encode, self.quality, self.level = loader, encode, int(quality), int(level)
        self.bucket, self.pad_value = bool(bucket), int(pad_value)
        self.threads = int(threads) if threads is not None else max(1, loader.num_workers)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def __iter__(self):
        L = self.loader
        it = iter(L)
        while True:
            st = L.state_dict() if self.encode == "stored" else None
            try:
                batch = next(it)
            except StopIteration:
                return
            if self.encode == "stored":
                rows = L.batch_plan(int(st["epoch"]), int(st["step"])).indices
                buf, lengths = E.encode_rows(None, self.cfg, sources=[L.dataset.image_bytes(int(r)) for r in rows])
            else:
                images = batch[0] if isinstance(batch, tuple) else batch
                buf, lengths = E.encode_rows(images, self.cfg, self.threads)
            yield E.bytes_batch(buf, lengths, batch, self.cfg)
