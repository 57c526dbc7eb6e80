"""Replay on the GPU inside ``ReinforcedLoader`` (``replay="device"``).

The CPU path decodes, resizes, augments and normalizes every image in C++ and copies the
float batch to the device (4 bytes per output value). Here the CPU threads only decode: each
record's image (and its MixUp/CutMix partner) is decoded at the DCT scale the C++ path picks
for that crop (libjpeg-turbo's 1/2, 1/4, 1/8 IDCTs, rule "pow2", or none with
``dct_scale=False``) and only the pixels of the stored crop window are copied into one pinned
uint8 staging batch (1 byte per source value, the crop only), uploaded once. The Triton
kernel (``fastload.kernels.replay``) then does the resize, RandAugment (the policy's bins,
torchvision v1 or v2 semantics or pil (Pillow's arithmetic); the render stage sends timm
datasets and Pillow's resize to the CPU path),
normalization, erasing and MixUp/CutMix, schema-v2 extension records included (float
magnitudes, the partner's own RandAugment and erase box, black erasing), on a side CUDA
stream; the consumer's stream waits on an event before the batch is handed out.

Same records, same order, same crops as the CPU path (the records come from the loader's
own ``_prepare``), so determinism, resume and ``state_dict`` are the loader's: only the
pixels' origin changes. The crop geometry is the C++ path's: in a decode at scale M/8 the
crop starts at ``left * M / 8`` and spans ``width * M / 8`` scaled pixels, fractional, and
the taps stay inside the integer window ``[left * M // 8, ceil((left + width) * M / 8))``:
the kernel receives exactly that window and the fractional offsets. Outputs agree with the
C++ path within 1 uint8 level nearly everywhere (float32 here, double weights there; a
value within rounding of a .5 tie may land on the other level; RandAugment ops with a
threshold, Solarize and Posterize, can turn such a level into a larger jump at a few pixels).

A batch whose decode fails falls back to the CPU path for that batch, so ``on_error``
(raise or skip-and-count) behaves exactly as without ``replay="device"``.

Known limit: the whole JPEG is decoded at the chosen scale and the window cut out of it on
the host (the C++ path decodes only the rows and iMCU columns of the window; a region
decode needs a native export). Tested on CPU in Triton's interpreter against the C++ path
(tests/test_device_replay.py); speed is measured by ``fastload bench --gpu``.
"""
from __future__ import annotations

import ctypes
import threading

import numpy as np
import torch

from fastload.sample import params as P
from fastload.sample.schema import box_to_pixels_array

_MIX = P.FLAG_MIXUP | P.FLAG_CUTMIX


def _scale_num(bh, bw, oh, ow, dct: bool):
    """M of the DCT scale M/8 the C++ path uses (``choose_scale_num``, rule "pow2")."""
    m = np.full(bh.shape, 8, dtype=np.int64)
    if dct:
        for d in (2, 4, 8):  # ascending: the largest d that fits wins
            m = np.where((bh >= oh * d) & (bw >= ow * d), 8 // d, m)
    return m


def _jpeg_dims(sources, threads: int):
    """(H, W) of each JPEG from its header (native, parallel)."""
    from fastload.replay import native

    lib = native._lib()
    hold: list = []
    desc = native._describe(sources, hold, "sources")
    n = len(sources)
    hw = np.zeros((n, 2), np.int32)
    bad = ctypes.c_int64(-1)
    st = lib.fl_jpeg_dims_batch(desc.ctypes.data, n, 1, hw.ctypes.data, hw.size, int(threads), ctypes.byref(bad))
    if st != 0:
        raise ValueError(f"device replay: {lib.fl_last_error().decode('utf-8', 'replace')}")
    return hw[:, 0].astype(np.int64), hw[:, 1].astype(np.int64)


class _Ring:
    """Pinned uint8 staging buffers, each reused only after the upload that read it."""

    def __init__(self, pin: bool, slots: int = 3):
        self.pin, self.slots, self.i = pin, [None] * slots, 0
        self.lock = threading.Lock()

    def get(self, nbytes: int):
        with self.lock:
            i = self.i
            self.i = (i + 1) % len(self.slots)
        slot = self.slots[i]
        if slot is not None and slot[1] is not None:
            slot[1].synchronize()
        if slot is None or slot[0].numel() < nbytes:
            slot = [torch.empty(int(nbytes * 1.25) + 1, dtype=torch.uint8, pin_memory=self.pin), None]
            self.slots[i] = slot
        return slot


class DeviceReplay:
    """The loader's render stage for ``replay="device"`` (see the module docstring)."""

    def __init__(self, loader):
        self.loader = loader
        dev = loader.device
        if dev is None:
            raise ValueError('replay="device" needs device= (e.g. device="cuda")')
        if loader.dtype not in (torch.float32, torch.float16):
            raise ValueError(f'replay="device" renders float32 or float16, got dtype={loader.dtype}')
        if loader.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f'replay="device" supports bilinear and bicubic, got '
                             f'interpolation={loader.interpolation!r}')
        from fastload.replay.native import have_jpeg

        if not have_jpeg():
            raise ValueError('replay="device" needs the native JPEG decoder (fastload._replay '
                             'built with libjpeg)')
        self.device = dev
        self.cuda = dev.type == "cuda"
        self.stream = torch.cuda.Stream(dev) if self.cuda else None
        self.ring = _Ring(pin=self.cuda)
        self.events: dict = {}
        self.lock = threading.Lock()

    # -- host side ---------------------------------------------------------------------------
    def _decode(self, sources, q, oh, ow, threads):
        """Decode each source at its crop's DCT scale; returns (windows, frac [N, 4])."""
        from fastload.replay.native import decode_batch

        n = len(sources)
        H = np.zeros(n, np.int64)
        W = np.zeros(n, np.int64)
        is_arr = np.array([isinstance(s, np.ndarray) for s in sources], dtype=bool)
        for i in np.flatnonzero(is_arr):
            H[i], W[i] = sources[i].shape[:2]
        js = np.flatnonzero(~is_arr)
        if js.size:
            H[js], W[js] = _jpeg_dims([sources[i] for i in js], threads)
        top, left, bh, bw = box_to_pixels_array(q, H, W)  # the schema's one dequantization rule
        M = _scale_num(bh, bw, oh, ow, bool(self.loader.dct_scale))
        M[is_arr] = 8
        arrs = [None] * n
        for i in np.flatnonzero(is_arr):
            arrs[i] = sources[i]
        for m in np.unique(M[~is_arr]):
            idx = [int(i) for i in js if M[i] == m]
            for i, a in zip(idx, decode_batch([sources[i] for i in idx], scale=int(8 // m),
                                              threads=threads)):
                arrs[i] = a
        SH = np.array([a.shape[0] for a in arrs], np.int64)
        SW = np.array([a.shape[1] for a in arrs], np.int64)
        ylo, xlo = top * M // 8, left * M // 8
        yhi = np.minimum(SH, ((top + bh) * M + 7) // 8)
        xhi = np.minimum(SW, ((left + bw) * M + 7) // 8)
        wins = [arrs[i][ylo[i]:yhi[i], xlo[i]:xhi[i]] for i in range(n)]
        frac = np.stack([top * M / 8.0 - ylo, bh * M / 8.0, left * M / 8.0 - xlo, bw * M / 8.0], 1)
        return wins, frac

    def _render(self, prep, ra=None):
        from fastload.kernels.replay import launch_replay, prepare_replay

        ld = self.loader
        recs, sources, partners = prep["recs"], prep["sources"], prep["partners"]
        oh, ow = prep["hw"]
        B = len(recs)
        threads = max(1, ld.num_workers)
        mix = (recs["flags"] & _MIX) != 0
        if partners is not None:
            mix &= np.array([p is not None for p in partners], dtype=bool)
        else:
            mix[:] = False
        pidx = np.flatnonzero(mix)
        srcs = list(sources) + [partners[i] for i in pidx]
        q = np.concatenate([recs["crop"], recs["pcrop"][pidx]]).astype(np.int64)
        wins, fr = self._decode(srcs, q, oh, ow, threads)
        frac = np.zeros((B, 8), np.float32)
        frac[:, :4] = fr[:B]
        frac[pidx, 4:] = fr[B:]
        prow = np.zeros(B, np.int64)
        prow[pidx] = B + np.arange(pidx.size)
        recs = recs.copy()
        recs["flags"] &= np.where(mix, 0xFF, ~_MIX & 0xFF).astype(recs["flags"].dtype)
        N = len(wins)
        hw = np.array([w.shape[:2] for w in wins], np.int32).reshape(N, 2)
        Hm, Wm = int(hw[:, 0].max()), int(hw[:, 1].max())
        slot = self.ring.get(N * Hm * Wm * 3)
        stage = slot[0][:N * Hm * Wm * 3].view(N, Hm, Wm, 3)
        st_np = stage.numpy()
        for i, w in enumerate(wins):
            st_np[i, :w.shape[0], :w.shape[1]] = w
        out_dtype = ld.dtype
        # RandAugment's bins, semantics and the extension records (float magnitudes, the
        # partner's own RandAugment and erasing, black erasing) as the CPU path reads them
        kw = dict(ra or {}, ext=prep.get("ext"))
        if self.cuda:
            with torch.cuda.stream(self.stream):
                imgs = stage.to(self.device, non_blocking=True)
                ev_copy = torch.cuda.Event()
                ev_copy.record(self.stream)
                slot[1] = ev_copy
                plan = prepare_replay(recs, hw, (oh, ow), partner_rows=prow, device=self.device,
                                      interpolation=ld.interpolation, frac=frac, **kw)
                out = torch.empty(B, 3, oh, ow, dtype=out_dtype, device=self.device)
                launch_replay(imgs, plan, out, ld.mean, ld.std)
                ev = torch.cuda.Event()
                ev.record(self.stream)
            imgs.record_stream(self.stream)
            with self.lock:
                self.events[out.data_ptr()] = ev
        else:
            plan = prepare_replay(recs, hw, (oh, ow), partner_rows=prow, device=self.device,
                                  interpolation=ld.interpolation, frac=frac, **kw)
            out = torch.empty(B, 3, oh, ow, dtype=out_dtype, device=self.device)
            launch_replay(stage.to(self.device).clone(), plan, out, ld.mean, ld.std)
        return out

    # -- the loader's hooks ------------------------------------------------------------------
    def render(self, prep, cpu_render, ra=None):
        """``_render_prepared`` for device replay: (out on the device, labels, tgt,
        culprits). A batch whose decode fails is rendered by the CPU path (``cpu_render``),
        which applies ``on_error`` and names the culprit; its result is then uploaded.
        ``ra``: the dataset's RandAugment settings (``ra_num_bins``, ``ra_semantics``,
        ``box_grid``) for :func:`fastload.kernels.replay.prepare_replay`."""
        try:
            out = self._render(prep, ra)
        except (ValueError, RuntimeError):
            return cpu_render()
        return out, prep["labels"], prep["tgt"], []

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        """Make the consumer's stream wait for the batch's kernels (no host sync)."""
        if not self.cuda or out.device.type != "cuda":
            return out
        with self.lock:
            ev = self.events.pop(out.data_ptr(), None)
        if ev is not None:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(ev)
            out.record_stream(cur)
        return out
