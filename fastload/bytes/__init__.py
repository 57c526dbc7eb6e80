"""File-bytes batches for ByteFormer-style models (RECIPES.md section 8).

``BytesBatches(loader, encode="jpeg" | "png" | "tiff" | "stored")`` wraps a
``ReinforcedLoader`` rendering ``dtype=torch.uint8`` batches: each replayed (augmented) image
is encoded to file bytes in the native encoder (``fastload.replay.encode``; the augmentation
happens on the pixels, before encoding, as in ByteFormer) and delivered as a padded uint8
token batch with the lengths. ``encode="stored"`` serves the dataset's stored source file
bytes as they are (no augmentation; the loader's rows, its render unused).

``bucket=True`` delivers each batch as groups of rows by power-of-two length bucket, each
padded only to its own longest row (``BytesBatch.groups``), so padding stays low; the step's
rows and their order across ranks are unchanged (the loader's elastic batches), so ranks stay
in step whatever the lengths.

State: the wrapper has none of its own; ``state_dict`` / ``load_state_dict`` / ``set_epoch``
are the loader's (the encoding is a pure function of the rendered pixels).
"""
from __future__ import annotations

from typing import Any, List, NamedTuple, Optional

import numpy as np
import torch

from fastload.replay import encode as E


class BytesBatch(NamedTuple):
    """tokens: uint8 [B, max_len] (None with bucket=True); lengths: int64 [B]; batch: the
    loader's batch (labels, targets, ... and its rendered images); groups: the
    ``BucketGroup`` list with bucket=True, else None."""
    tokens: Optional[torch.Tensor]
    lengths: torch.Tensor
    batch: Any
    groups: Optional[List[E.BucketGroup]]


class BytesBatches:
    def __init__(self, loader, encode: str = "jpeg", quality: int = 90, level: int = 6,
                 bucket: bool = False, pad_value: int = 0, threads: Optional[int] = None):
        if encode != "stored":
            E._format(encode)
            if loader.dtype != torch.uint8:
                raise ValueError(f"BytesBatches(encode={encode!r}) needs a loader with dtype=torch.uint8 "
                                 f"(pixels to encode), got {loader.dtype}")
            if getattr(loader, "device", None) is not None:
                raise ValueError("BytesBatches encodes on the CPU: build the loader without device=")
        if not 0 <= int(pad_value) <= 255:
            raise ValueError(f"pad_value must be in [0, 255], got {pad_value}")
        if not isinstance(quality, (int, np.integer)) or not 1 <= quality <= 100:
            raise ValueError(f"quality must be an int in [1, 100], got {quality!r}")
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

    def _stored(self, epoch: int, step: int):
        from fastload.select.selector import batch_rows

        rows = batch_rows(self.loader, epoch, step)
        blobs = [bytes(self.loader.dataset.image_bytes(int(r))) for r in rows]
        lengths = np.array([len(b) for b in blobs], dtype=np.int64)
        buf = np.zeros((len(blobs), int(lengths.max())), dtype=np.uint8)
        for i, b in enumerate(blobs):
            buf[i, :len(b)] = np.frombuffer(b, dtype=np.uint8)
        return buf, lengths

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
                buf, lengths = self._stored(int(st["epoch"]), int(st["step"]))
            else:
                images = batch[0] if isinstance(batch, tuple) else batch
                buf, lengths = E.encode_raw(images, self.encode, self.quality, self.level, "nchw", self.threads)
            if self.bucket:
                yield BytesBatch(None, torch.from_numpy(lengths), batch,
                                 E.bucket_groups(buf, lengths, self.pad_value))
            else:
                yield BytesBatch(E.pad(buf, lengths, self.pad_value), torch.from_numpy(lengths), batch, None)
