"""Sparse ReLU FFN down-projection on the GPU (Triton): ``y = act @ W_down^T (+ bias)``
reading only the rows of ``W_down^T`` ([d_ff, d_model], row-major) whose neuron is non-zero
in some batch row (NaN counts as active).

Three launches, no host synchronization (the active count never leaves the device):

1. ``_count_kernel``: one program per block of neurons writes how many of its neurons are
   active (union over the batch).
2. ``_compact_kernel``: one program per block computes its offset as the sum of the counts of
   the blocks before it, then writes its active indices in ascending order (``tl.cumsum``
   inside the block). The active list is therefore sorted and identical run to run; the
   total count goes to ``count[0]``.
3. ``_gather_gemv_kernel``: grid (column blocks, SPLIT_K). Program (c, s) owns columns
   ``c*BLOCK_D...`` and the s-th slice of the active list; it loads BLOCK_K active indices,
   gathers ``act[:, idx]`` and the rows ``W_down^T[idx, cols]`` and accumulates in fp32.
   Programs whose slice starts past the active count exit at once without writing
   (masked early exit: at 90% sparsity 9 of 10 split-K programs touch no memory). Slices
   are short (64 active rows by default) so that the few programs with work are many
   enough to keep the memory system busy at batch 1.
4. ``_reduce_kernel``: sums, in a fixed order, the fp32 partials of the slices that had
   work (``cdiv(count, rows_per_split)``; the others are masked off, never read) and adds
   the bias. This is the deterministic two-pass split-K (no atomics): results are bitwise
   identical between runs, and the partial traffic scales with the active count.

Tested on CPU with ``TRITON_INTERPRET=1`` (fp32, fp16; the interpreter has no bf16). GPU
speed has not been measured here (no GPU in the session that wrote it).

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


@triton.jit
def _active_block(act_ptr, B, d_ff, offs, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    """1 where neuron offs[k] is non-zero in some batch row (NaN != 0: active), else 0."""
    rows = tl.arange(0, BLOCK_B)
    active = tl.zeros([BLOCK_N], dtype=tl.int32)
    for b0 in range(0, B, BLOCK_B):
        r = b0 + rows
        m = (r[:, None] < B) & (offs[None, :] < d_ff)
        a = tl.load(act_ptr + r[:, None] * d_ff + offs[None, :], mask=m, other=0.0)
        active = tl.maximum(active, tl.max(((a != 0.0) & m).to(tl.int32), axis=0))
    return active


@triton.jit
def _count_kernel(act_ptr, counts_ptr, B, d_ff, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    active = _active_block(act_ptr, B, d_ff, offs, BLOCK_N, BLOCK_B)
    tl.store(counts_ptr + pid, tl.sum(active, axis=0))


@triton.jit
def _compact_kernel(act_ptr, counts_ptr, idx_ptr, count_ptr, B, d_ff, n_blocks,
                    BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, BLOCKS_P2: tl.constexpr):
    pid = tl.program_id(0)
    blocks = tl.arange(0, BLOCKS_P2)
    cnt = tl.load(counts_ptr + blocks, mask=blocks < n_blocks, other=0)
    base = tl.sum(tl.where(blocks < pid, cnt, 0), axis=0)
    offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    active = _active_block(act_ptr, B, d_ff, offs, BLOCK_N, BLOCK_B)
    pos = base + tl.cumsum(active, axis=0) - 1
    tl.store(idx_ptr + pos, offs, mask=active != 0)
    if pid == 0:
        tl.store(count_ptr, tl.sum(cnt, axis=0))


@triton.jit
def _gather_gemv_kernel(act_ptr, wt_ptr, idx_ptr, count_ptr, part_ptr, B, d_ff, d_model,
                        k_per_split, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_active = tl.load(count_ptr)
    k_start = pid_s * k_per_split
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rows = tl.arange(0, BLOCK_B)
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    if k_start < n_active:  # masked early exit past the active count: no load, no store
        k_end = tl.minimum(k_start + k_per_split, n_active)
        for k0 in range(k_start, k_end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            km = ks < k_end
            idx = tl.load(idx_ptr + ks, mask=km, other=0)
            a = tl.load(act_ptr + rows[:, None] * d_ff + idx[None, :],
                        mask=(rows[:, None] < B) & km[None, :], other=0.0).to(tl.float32)
            w = tl.load(wt_ptr + idx[:, None].to(tl.int64) * d_model + cols[None, :],
                        mask=km[:, None] & (cols[None, :] < d_model), other=0.0).to(tl.float32)
            acc += tl.sum(a[:, :, None] * w[None, :, :], axis=1)
        out_m = (rows[:, None] < B) & (cols[None, :] < d_model)
        tl.store(part_ptr + (pid_s * B + rows[:, None]) * d_model + cols[None, :], acc, mask=out_m)


@triton.jit
def _reduce_kernel(part_ptr, bias_ptr, out_ptr, count_ptr, B, d_model, split_k, k_per_split,
                   HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    n = B * d_model
    m = offs < n
    n_used = (tl.load(count_ptr) + k_per_split - 1) // k_per_split  # slices that had work
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, split_k):  # fixed order: deterministic; idle slices masked, not read
        lim = tl.where(s < n_used, n, 0)
        acc += tl.load(part_ptr + s * n + offs, mask=offs < lim, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % d_model, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


def active_compact(act: torch.Tensor, block_n: int = 128):
    """Device-side compaction: ``(idx int32 [d_ff], count int32 [1])``, the first ``count``
    entries of ``idx`` being the ascending active neurons (union over the batch)."""
    B, d_ff = act.shape
    n_blocks = triton.cdiv(d_ff, block_n)
    block_b = min(16, triton.next_power_of_2(max(B, 1)))
    counts = torch.empty(n_blocks, dtype=torch.int32, device=act.device)
    idx = torch.zeros(d_ff, dtype=torch.int32, device=act.device)
    count = torch.zeros(1, dtype=torch.int32, device=act.device)
    _count_kernel[(n_blocks,)](act, counts, B, d_ff, BLOCK_N=block_n, BLOCK_B=block_b)
    _compact_kernel[(n_blocks,)](act, counts, idx, count, B, d_ff, n_blocks, BLOCK_N=block_n,
                                 BLOCK_B=block_b, BLOCKS_P2=triton.next_power_of_2(n_blocks))
    return idx, count


def _empty_partials(shape, device):
    # Only the slices that had work are written and read (tests fill this with NaN).
    return torch.empty(shape, dtype=torch.float32, device=device)


def sparse_down(act: torch.Tensor, w_t: torch.Tensor, bias: Optional[torch.Tensor] = None,
                split_k: Optional[int] = None, block_d: int = 128, block_k: int = 16,
                rows_per_split: int = 64) -> torch.Tensor:
    """``act @ w_t + bias`` reading only active rows of ``w_t`` (see the module docstring).

    ``act`` [B, d_ff] and ``w_t`` [d_ff, d_model] contiguous, same dtype (fp32/fp16/bf16);
    output in that dtype, fp32 accumulation. No host synchronization. Each split-K program
    takes ``rows_per_split`` consecutive active rows (rounded up to ``block_k``), or
    ``split_k`` slices cover ``d_ff`` when given.
    """
    if act.dim() != 2 or w_t.dim() != 2 or act.shape[1] != w_t.shape[0]:
        raise ValueError(f"act {tuple(act.shape)} and w_t {tuple(w_t.shape)} do not chain")
    if act.dtype != w_t.dtype:
        raise ValueError(f"act dtype {act.dtype} != w_t dtype {w_t.dtype}")
    act, w_t = act.contiguous(), w_t.contiguous()
    B, d_ff = act.shape
    d_model = w_t.shape[1]
    out = torch.empty(B, d_model, dtype=act.dtype, device=act.device)
    if B == 0:
        return out
    idx, count = active_compact(act)
    if split_k is None:
        if rows_per_split < 1:
            raise ValueError(f"rows_per_split must be >= 1, got {rows_per_split}")
        split_k = triton.cdiv(d_ff, rows_per_split)
    k_per_split = triton.cdiv(triton.cdiv(d_ff, split_k), block_k) * block_k
    split_k = triton.cdiv(d_ff, k_per_split)
    block_b = triton.next_power_of_2(B)
    if block_b > 16:  # keep the [B, K, D] product tile small
        block_d = min(block_d, 32)
    part = _empty_partials((split_k, B, d_model), act.device)
    grid = (triton.cdiv(d_model, block_d), split_k)
    _gather_gemv_kernel[grid](act, w_t, idx, count, part, B, d_ff, d_model, k_per_split,
                              BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_D=block_d)
    rblock = 1024
    _reduce_kernel[(triton.cdiv(B * d_model, rblock),)](
        part, bias if bias is not None else part, out, count, B, d_model, split_k, k_per_split,
        HAS_BIAS=bias is not None, BLOCK=rblock)
    return out
