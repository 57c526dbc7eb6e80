"""Sparse ReLU FFN down-projection on the GPU (Triton): ``y = act @ W_down^T (+ bias)``
reading only the rows of ``W_down^T`` ([d_ff, d_model], row-major) whose neuron is non-zero
in some batch row (NaN counts as active).

One launch, no host synchronization, no allocation that depends on the data, so the decode
step can be captured in a CUDA graph:

- grid (batch tiles of 16 rows, column blocks of ``BLOCK_D``, ``n_splits`` slices of d_ff);
  program (b, c, s) owns a fixed range of ``chunks_per_split * BLOCK_K`` neurons. Per chunk
  it loads its batch tile's activations ``[16, BLOCK_K]`` (one load), derives which neurons
  are active (union over the tile's rows), and loads the ``[BLOCK_K, BLOCK_D]`` tile of
  ``W^T`` with the inactive rows masked off: a masked-off row issues no memory request, so
  the traffic is the active rows only, without any compaction pass. The product runs on
  the tensor cores (``tl.dot``, fp32 accumulation; IEEE fp32 products for fp32 weights);
  the 16-row tile is padded with masked rows at batch < 16 (the arithmetic is free, the
  loads of padded rows are masked).
- each program writes its fp32 partial ``[rows, BLOCK_D]``, then takes a ticket on the
  tile's counter; the last of the ``n_splits`` programs of a tile sums the partials in a
  fixed order, adds the bias, writes the output and resets the counter to 0 (so the counter
  buffer, zeroed once, stays zero between calls and graph replays). Results are bitwise
  identical between runs: the split ranges, the tile shapes and the summation order do not
  depend on scheduling.
- ``n_splits`` aims at ~8 programs per multiprocessor (at batch 1 every multiprocessor has
  several chunks of loads in flight) and bounds the partials to ``_PARTIAL_CAP`` floats.

Why not a compacted active list: compaction costs two launches and a pass over the
activations before the first weight byte moves, and leaves most split programs idle at high
sparsity; masking rows of a statically split range gives the same weight traffic.

Tested on CPU with ``TRITON_INTERPRET=1`` (fp32, fp16; the interpreter has no bf16) and
compiled for sm_80/sm_90 by ``fastload.kernels.aot_check``. GPU speed: ``fastload bench --gpu``.

>>> import torch                                                   # doctest: +SKIP
>>> act = torch.relu(torch.randn(2, 300, device="cuda"))
>>> w_t = torch.randn(300, 70, device="cuda")
>>> torch.allclose(sparse_down(act, w_t), act @ w_t, atol=1e-4)
True
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


_PARTIAL_CAP = 1 << 23  # fp32 partial values at most (32 MiB)
_BLOCK_B = 16          # batch rows per tile (tl.dot needs >= 16)
_PROGRAMS_PER_SM = 8
_COUNTERS: dict = {}   # (device, stream) -> int32 tile counters, zero between calls


@triton.jit
def _sparse_down_kernel(act_ptr, wt_ptr, bias_ptr, part_ptr, cnt_ptr, nact_ptr, out_ptr,
                        B, d_ff, d_model, chunks_per_split, n_splits,
                        HAS_BIAS: tl.constexpr, COUNT: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                        SPLITS_P2: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d_model
    arow = act_ptr + rows[:, None].to(tl.int64) * d_ff
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    n_act = 0
    k0 = pid_s * chunks_per_split * BLOCK_K
    for c in range(0, chunks_per_split):
        ks = k0 + c * BLOCK_K + tl.arange(0, BLOCK_K)
        a = tl.load(arow + ks[None, :], mask=rmask[:, None] & (ks[None, :] < d_ff), other=0.0)
        active = tl.max((a != 0.0).to(tl.int32), axis=0) != 0  # NaN != 0: active
        # inactive rows are masked off: no memory request for them
        w = tl.load(wt_ptr + ks[:, None].to(tl.int64) * d_model + cols[None, :],
                    mask=active[:, None] & cmask[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        if COUNT:
            n_act += tl.sum(active.to(tl.int32), axis=0)
    if COUNT:
        if pid_d == 0:
            tl.store(nact_ptr + pid_b * n_splits + pid_s, n_act)
    out_m = rmask[:, None] & cmask[None, :]
    tl.store(part_ptr + (pid_s * B + rows[:, None]).to(tl.int64) * d_model + cols[None, :], acc,
             mask=out_m)
    tl.debug_barrier()
    tile = pid_b * tl.num_programs(1) + pid_d
    ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
    if ticket == n_splits - 1:
        # the last split of this tile: fixed-order sum of every split's partial
        sp = tl.arange(0, SPLITS_P2)
        pm = (sp[:, None] < n_splits) & cmask[None, :]
        n_rows = tl.minimum(B - pid_b * BLOCK_B, BLOCK_B)
        for r in range(0, n_rows):
            row = pid_b * BLOCK_B + r
            p = tl.load(part_ptr + (sp[:, None] * B + row).to(tl.int64) * d_model + cols[None, :],
                        mask=pm, other=0.0, cache_modifier=".cg")
            y = tl.sum(p, axis=0)
            if HAS_BIAS:
                y += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            tl.store(out_ptr + row.to(tl.int64) * d_model + cols, y.to(out_ptr.dtype.element_ty),
                     mask=cmask)
        tl.atomic_xchg(cnt_ptr + tile, 0)  # zero again for the next call / graph replay


def _empty_partials(shape, device):
    # Every split writes its partial before the last one reads them all (tests fill NaN).
    return torch.empty(shape, dtype=torch.float32, device=device)


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # an H100/H200 (what the interpreter and the compile check plan for)


def _counters(device, n: int) -> torch.Tensor:
    """Zeroed tile counters for this device and stream (the kernel leaves them zero; one
    buffer per stream, so that launches on concurrent streams never share a counter). First
    made inside a CUDA graph capture, the zeroing is a node of that graph."""
    sid = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), sid)
    c = _COUNTERS.get(key)
    if c is None or c.numel() < n:
        c = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = c
    return c


def plan(B: int, d_ff: int, d_model: int, dtype, device, split_k: Optional[int] = None,
         block_d: int = 128) -> dict:
    """Launch geometry of :func:`sparse_down` (pure function of the shapes)."""
    block_k = 32 if dtype == torch.float32 else 128  # fp32: IEEE dot on FMAs (no spills on sm_80)
    block_d = max(16, min(int(block_d), triton.next_power_of_2(d_model)))
    n_btiles = triton.cdiv(B, _BLOCK_B)
    n_cols = triton.cdiv(d_model, block_d)
    n_chunks = triton.cdiv(d_ff, block_k)
    if split_k is None:
        split_k = triton.cdiv(_PROGRAMS_PER_SM * _num_sms(device), n_btiles * n_cols)
    split_k = max(1, min(int(split_k), 32, n_chunks, max(1, _PARTIAL_CAP // max(1, B * d_model))))
    cps = triton.cdiv(n_chunks, split_k)
    n_splits = triton.cdiv(n_chunks, cps)
    return {"BLOCK_K": block_k, "BLOCK_D": block_d, "n_btiles": n_btiles, "n_cols": n_cols,
            "chunks_per_split": cps, "n_splits": n_splits}


def sparse_down(act: torch.Tensor, w_t: torch.Tensor, bias: Optional[torch.Tensor] = None,
                split_k: Optional[int] = None, block_d: int = 128, out: Optional[torch.Tensor] = None,
                active_out: Optional[torch.Tensor] = None,
                counters: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``act @ w_t + bias`` reading only active rows of ``w_t`` (see the module docstring).

    ``act`` [B, d_ff] and ``w_t`` [d_ff, d_model] contiguous, same dtype (fp32/fp16/bf16);
    output in that dtype (``out`` if given), fp32 accumulation. One launch, no host
    synchronization. ``split_k`` overrides the number of d_ff slices. ``active_out`` (int32,
    at least ``n_btiles * n_splits`` of :func:`plan`) receives each slice's count of rows
    read per batch tile: their sum is the weight rows actually fetched. ``counters``: the
    caller's own zeroed int32 buffer (>= ``n_btiles * n_cols``; the kernel leaves it zero),
    else one per device and stream is kept here.
    """
    if act.dim() != 2 or w_t.dim() != 2 or act.shape[1] != w_t.shape[0]:
        raise ValueError(f"act {tuple(act.shape)} and w_t {tuple(w_t.shape)} do not chain")
    if act.dtype != w_t.dtype:
        raise ValueError(f"act dtype {act.dtype} != w_t dtype {w_t.dtype}")
    if act.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {act.dtype}")
    act, w_t = act.contiguous(), w_t.contiguous()
    B, d_ff = act.shape
    d_model = w_t.shape[1]
    if bias is not None and bias.shape != (d_model,):
        raise ValueError(f"bias must have shape ({d_model},), got {tuple(bias.shape)}")
    if out is None:
        out = torch.empty(B, d_model, dtype=act.dtype, device=act.device)
    elif out.shape != (B, d_model) or out.dtype != act.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {act.dtype} tensor of shape ({B}, {d_model})")
    if B == 0:
        return out
    g = plan(B, d_ff, d_model, act.dtype, act.device, split_k, block_d)
    n_tiles = g["n_btiles"] * g["n_cols"]
    if counters is not None:
        if counters.dtype != torch.int32 or counters.numel() < n_tiles or counters.device != act.device:
            raise ValueError(f"counters must be a zeroed int32 tensor of >= {n_tiles} entries on {act.device}")
        cnt = counters
    else:
        cnt = _counters(act.device, n_tiles)
    part = _empty_partials((g["n_splits"], B, d_model), act.device)
    if active_out is not None and (active_out.dtype != torch.int32
                                   or active_out.numel() < g["n_btiles"] * g["n_splits"]):
        raise ValueError(f"active_out must be int32 with >= {g['n_btiles'] * g['n_splits']} entries")
    grid = (g["n_btiles"], g["n_cols"], g["n_splits"])
    _sparse_down_kernel[grid](
        act, w_t, bias if bias is not None else act, part, cnt,
        active_out if active_out is not None else cnt, out,
        B, d_ff, d_model, g["chunks_per_split"], g["n_splits"],
        HAS_BIAS=bias is not None, COUNT=active_out is not None, IEEE=act.dtype == torch.float32,
        BLOCK_B=_BLOCK_B, BLOCK_K=g["BLOCK_K"], BLOCK_D=g["BLOCK_D"],
        SPLITS_P2=max(2, triton.next_power_of_2(g["n_splits"])),
        num_warps=4, num_stages=3, enable_fp_fusion=True)
    return out
