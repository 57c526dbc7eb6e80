"""Triton sparse down-projection (kernels/sparse_ffn.py) in the interpreter vs the dense reference."""
import os

import pytest
import torch

pytest.importorskip("triton")
os.environ.setdefault("TRITON_INTERPRET", "1")
from fastload.kernels.sparse_ffn import active_compact, sparse_down  # noqa: E402


def reference(act, w_t, bias):
    out = act.double() @ w_t.double()
    return out + bias.double() if bias is not None else out


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-2)])
@pytest.mark.parametrize("batch,sparsity", [(1, 0.0), (1, 0.9), (3, 0.5), (20, 0.95), (2, 1.0)])
def test_sparse_down_matches_dense(dtype, tol, batch, sparsity):
    g = torch.Generator().manual_seed(batch)
    d_ff, d_model = 300, 70  # not multiples of the block sizes
    act = torch.rand(batch, d_ff, generator=g) + 0.1
    act[torch.rand(batch, d_ff, generator=g) < sparsity] = 0
    act = act.to(dtype)
    w_t = torch.randn(d_ff, d_model, generator=g).to(dtype)
    bias = torch.randn(d_model, generator=g).to(dtype) if batch != 2 else None
    out = sparse_down(act, w_t, bias)
    assert out.dtype == dtype and out.shape == (batch, d_model)
    ref = reference(act, w_t, bias)
    assert torch.allclose(out.double(), ref, atol=tol * float(ref.abs().max().clamp_min(1)), rtol=tol)


def test_compaction_sorted_union_nan_active():
    act = torch.zeros(2, 200)
    act[0, [3, 150]] = 1.0
    act[1, [3, 77]] = -2.0
    act[1, 199] = float("nan")
    idx, count = active_compact(act, block_n=64)
    n = int(count)
    assert idx[:n].tolist() == [3, 77, 150, 199]


def test_nan_propagates_and_deterministic():
    g = torch.Generator().manual_seed(0)
    act = torch.relu(torch.randn(2, 100, generator=g))
    act[1, 5] = float("nan")
    w_t = torch.randn(100, 40, generator=g)
    a, b = sparse_down(act, w_t, split_k=4), sparse_down(act, w_t, split_k=4)
    assert torch.isnan(a[1]).all() and torch.isfinite(a[0]).all()
    assert torch.equal(a[0], b[0])


@pytest.mark.parametrize("sparsity", [0.0, 0.8, 1.0])
@pytest.mark.parametrize("rows_per_split", [16, 40, 1000])
def test_idle_splits_neither_written_nor_read(monkeypatch, sparsity, rows_per_split):
    # Partials start as NaN: a slice past the active count that was read, or a slice with
    # work that was not written, would show up as NaN in the output.
    from fastload.kernels import sparse_ffn as k
    monkeypatch.setattr(k, "_empty_partials",
                        lambda shape, device: torch.full(shape, float("nan"), device=device))
    g = torch.Generator().manual_seed(3)
    act = torch.rand(2, 333, generator=g) + 0.1
    act[:, torch.rand(333, generator=g) < sparsity] = 0
    w_t = torch.randn(333, 50, generator=g)
    bias = torch.randn(50, generator=g)
    out = k.sparse_down(act, w_t, bias, rows_per_split=rows_per_split)
    ref = reference(act, w_t, bias)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.double(), ref, atol=1e-4 * float(ref.abs().max().clamp_min(1)), rtol=1e-4)
