"""Stage 3 of ``ReinforcedLoader``: render. The fused C++ kernel (decode -> crop -> resize
-> flip -> RandAugment -> normalize -> erase -> MixUp/CutMix, straight into the output buffer,
GIL released, ``threads`` native threads), or the Triton replay on the device with a CPU
fallback for what it cannot render (Pillow's resize: a one-time warning), and error
recovery.

Errors. A sample whose image cannot be decoded raises a ``RuntimeError`` naming the sample
id (``on_error="raise"``), or with ``on_error="skip"`` every row it breaks (its own rows and
the rows that use it as MixUp/CutMix partner) is replaced by a copy of the first good row of
the same batch (image, label and target, so shapes never change and distributed ranks stay
in step). When no row of a batch renders, the rows are copies of the first sample
``(first id + k) % N`` (k = 1, 2, ..., at most 64 tried) that renders with a stored
augmentation: deterministic, so resume and ranks stay exact."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Tuple

import numpy as np
import torch

from fastload.sample import params as P

# the RandAugment semantics the Triton replay implements (fastload.kernels.replay.SEMANTICS;
# not imported from there: this module must load without Triton)
DEVICE_SEMANTICS = ("v1", "v2", "pil", "timm")


@dataclass(frozen=True)
class RenderConfig:
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    interpolation: str
    dct_scale: bool
    threads: int
    views: int
    on_error: str
    dtype: torch.dtype
    num_samples: int
    encode: Any = None  # fastload.replay.encode.BytesConfig with output="bytes", else None


class Render:
    """``dataset``: where the policy and replay settings come from; ``gather``: the gather
    stage (a substitute sample of a batch whose every row failed); ``device_replay``: the
    Triton replay (``replay="device"``) or None."""

    def __init__(self, cfg: RenderConfig, dataset, gather, device_replay=None):
        self.cfg, self.dataset, self.gather, self.device_replay = cfg, dataset, gather, device_replay
        self._warned = False  # the CPU fallback of replay="device" (see __call__)
        self._kw = None  # render_batch's keyword arguments (_kwargs)

    def __call__(self, prep: dict, out_fn):
        """Render one gathered batch (native, GIL released; or on the device with replay="device").
        With output="bytes" the host batch gets a fifth entry, (buffer, lengths) of the file
        bytes: the rendered pixels encoded in the native encoder (GIL released, ``threads``
        threads), or with encode="stored" the stored source bytes, nothing rendered."""
        enc = self.cfg.encode
        if enc is not None:
            from fastload.replay.encode import encode_rows

            if enc.fmt == "stored":  # no augmentation: the stored file bytes as they are
                return (None, prep["labels"], prep["tgt"], [],
                        encode_rows(None, enc, sources=prep["sources"]))
            out, labels, tgt, culprits = self.host(prep, out_fn)
            return out, labels, tgt, culprits, encode_rows(out, enc, self.cfg.threads)
        if self.device_replay is not None:
            pol = getattr(self.dataset, "policy", None)
            sem, resize = getattr(pol, "randaugment_semantics", "v1"), getattr(pol, "resize", "torch")
            # The Triton replay implements torchvision's tensor RandAugment (v1, v2), its
            # RandAugment on PIL images (pil: Pillow's arithmetic), timm's RandAugment (timm),
            # torch's resize and the schema-v2 extension records; Pillow's resize
            # (resize="pil"/"pil12") it does not: such batches render on the CPU path, then are
            # uploaded (warned once per loader).
            if sem in DEVICE_SEMANTICS and resize == "torch":
                ext = prep.get("ext")
                ra = dict(ra_num_bins=getattr(pol, "ra_num_bins", 31), ra_semantics=sem,
                          box_grid=self.dataset.replay.get("box_grid") if ext is not None else None)
                if sem == "timm":  # the geometric ops' fill colour, as the C++ path's ra_fill
                    ra["ra_fill"] = pol.timm_fill
                return self.device_replay.render(prep, lambda: self.host(prep, out_fn), ra)
            if not self._warned:
                self._warned = True
                warnings.warn(f'replay="device": the Triton replay does not implement randaugment_semantics='
                              f'{sem!r} with resize={resize!r} (only {DEVICE_SEMANTICS} with "torch"); this '
                              'dataset renders on the CPU path and is uploaded', stacklevel=2)
        return self.host(prep, out_fn)

    def host(self, prep: dict, out_fn):
        rows, hw = prep["rows"], prep["hw"]
        out = out_fn((len(rows), 3, hw[0], hw[1]))
        bad, culprits = self._render(prep["sources"], prep["recs"], out, prep["partners"], rows, prep.get("ext"))
        return self._finish(prep, out, bad, culprits)

    def submit(self, prep: dict, out_fn):
        """Start rendering a gathered batch; returns a handle whose ``result()`` is what
        ``self(prep, out_fn)`` returns. Plain CPU batches are queued on the native runner
        (``render_batch_async``), so the render stage can submit the next batch before it
        waits for this one and the native threads never idle while Python holds the GIL;
        every other kind (device replay, views, encoded output) renders now."""
        if self.cfg.encode is not None or self.device_replay is not None or self.cfg.views > 1:
            return _Done(self(prep, out_fn))
        from fastload.replay.native import render_batch_async

        rows, hw = prep["rows"], prep["hw"]
        out = out_fn((len(rows), 3, hw[0], hw[1]))
        kw, ek = self._kwargs(prep.get("ext"))
        try:
            pending = render_batch_async(prep["sources"], prep["recs"], out, partner_sources=prep["partners"],
                                         sample_ids=rows, **kw, **ek(slice(None)))
        except (RuntimeError, ValueError) as exc:
            pending = exc
        return _Queued(self, prep, out, pending)

    def _finish(self, prep: dict, out, bad, culprits):
        labels, tgt = prep["labels"], prep["tgt"]
        if bad is not None:  # on_error="skip": copy the first good row over every bad one
            bi = np.flatnonzero(bad)
            if bad.all():  # no good row in the batch: borrow one (see the module docstring)
                s_out, s_labels, s_tgt, good = self._substitute(prep)
            else:
                s_out, s_labels, s_tgt, good = out, labels, tgt, int(np.flatnonzero(~bad)[0])
            out[torch.as_tensor(bi)] = s_out[good].clone()
            if labels is not None:
                labels[bi] = s_labels[good]
            tgt = copy_rows(tgt, bi, s_tgt, good)
        return out, labels, tgt, culprits

    def _substitute(self, prep: dict, tries: int = 64):
        """A batch whose every row failed (on_error="skip"): the rows of the first sample
        ``(first id + k) % N``, k = 1, 2, ..., that renders with a stored augmentation.
        Deterministic (a function of the batch), so resume and ranks stay exact."""
        rows, hw = prep["rows"], prep["hw"]
        first = int(rows[0])
        for k in range(1, min(tries, self.cfg.num_samples - 1) + 1):
            cand = np.array([(first + k) % self.cfg.num_samples], dtype=np.int64)
            sub = self.gather.prepare(prep["epoch"], prep["step"], cand, hw, fresh_ok=False)
            out = torch.empty((len(sub["rows"]), 3, hw[0], hw[1]), dtype=self.cfg.dtype)
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

    def _kwargs(self, ext):
        """render_batch's keyword arguments for this dataset, and ``ek(pos)``: the rows'
        schema-v2 extension records, when the dataset has them."""
        kw = self._kw
        if kw is None:  # once per loader: the dataset's policy is parsed from its manifest
            pol = getattr(self.dataset, "policy", None)  # replay RandAugment as the dataset was made
            kw = dict(mean=self.cfg.mean, std=self.cfg.std, interpolation=self.cfg.interpolation,
                      dct_scale=self.cfg.dct_scale, threads=self.cfg.threads,
                      ra_num_bins=getattr(pol, "ra_num_bins", 31),
                      ra_semantics=getattr(pol, "randaugment_semantics", "v1"), resize=getattr(pol, "resize", "torch"))
            if kw["ra_semantics"] == "timm":
                kw["ra_fill"] = pol.timm_fill
            self._kw = kw
        grid = self.dataset.replay.get("box_grid") if ext is not None else None

        def ek(pos):
            return {} if ext is None else dict(ext=ext[pos], box_grid=grid)
        return kw, ek

    def _render(self, sources, recs, out, partners, rows, ext=None):
        """Render; returns (None, []) or, under on_error="skip", (bad-row mask, culprit ids)."""
        from fastload.replay.native import render_batch

        threads = self.cfg.threads
        kw, ek = self._kwargs(ext)
        try:
            src = sources
            if self.cfg.views > 1:
                # FKD-style: decode each image once (native pool, full resolution) and replay
                # its V views from the pixels instead of decoding V times
                from fastload.replay.native import decode_batch

                pixels = decode_batch(sources[::self.cfg.views], scale=1, threads=threads)
                src = [pixels[r // self.cfg.views] for r in range(len(sources))]
            render_batch(src, recs, out, partner_sources=partners, sample_ids=rows, **kw, **ek(slice(None)))
            return None, []
        except (RuntimeError, ValueError) as exc:
            return self._render_rows(sources, recs, out, partners, rows, ext, exc)

    def _render_rows(self, sources, recs, out, partners, rows, ext, first_exc):
        """After a failed batch: render row by row to find the culprits."""
        from fastload.replay.native import render_batch

        kw, ek = self._kwargs(ext)
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
        if self.cfg.on_error == "raise":
            users = sorted(set(rows[bad].tolist()) - set(ids))
            note = f" (also breaking samples {users} that mix with it)" if users else ""
            raise RuntimeError(f"cannot render sample id(s) {ids}{note}: {msgs[ids[0]]}; pass "
                               "on_error='skip' to replace such rows and count them") from first_exc
        return bad, [int(c) for c in culprit[bad]]


class _Done:
    """A batch rendered at submission."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class _Queued:
    """A batch queued on the native runner: ``result()`` waits for it, then recovers and
    finishes as ``Render.host`` does."""

    __slots__ = ("render", "prep", "out", "pending")

    def __init__(self, render: Render, prep: dict, out, pending):
        self.render, self.prep, self.out, self.pending = render, prep, out, pending

    def result(self):
        r, prep, out = self.render, self.prep, self.out
        try:
            if isinstance(self.pending, BaseException):
                raise self.pending
            self.pending.wait()
            bad, culprits = None, []
        except (RuntimeError, ValueError) as exc:
            bad, culprits = r._render_rows(prep["sources"], prep["recs"], out, prep["partners"], prep["rows"],
                                           prep.get("ext"), exc)
        return r._finish(prep, out, bad, culprits)


def copy_rows(t, rows, src, good):
    """Rows ``rows`` of ``t`` become copies of row ``good`` of ``src`` (same structure)."""
    if isinstance(t, torch.Tensor):
        t[torch.as_tensor(rows)] = src[good].clone()
        return t
    if isinstance(t, tuple):
        return tuple(copy_rows(x, rows, y, good) for x, y in zip(t, src))
    if isinstance(t, list):
        for r in rows:
            t[r] = src[good]
        return t
    if isinstance(t, dict):  # tokenizer output
        return {k: copy_rows(v, rows, src[k], good) for k, v in t.items()}
    return t
