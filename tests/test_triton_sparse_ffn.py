"""Triton sparse down-projection (kernels/sparse_ffn.py) in the interpreter vs the dense reference."""
import os

import pytest
import torch

pytest.importorskip("triton")
os.environ.setdefault("TRITON_INTERPRET", "1")
from fastload.kernels.sparse_ffn import plan, sparse_down  # noqa: E402


def reference(act, w_t, bias):
    out = act.double() @ w_t.double()
    return out + bias.double() if bias is not None else out


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-2)])
@pytest.mark.parametrize("batch,sparsity", [(1, 0.0), (1, 0.9), (3, 0.5), (20, 0.95), (2, 1.0),
                                            (40, 0.3)])
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


def test_active_rows_counted_per_batch_tile_union_nan_active():
    # active_out receives, per (batch tile, split), the rows of W^T read: the union over the
    # tile's batch rows, NaN counting as active
    act = torch.zeros(18, 200)
    act[0, [3, 150]] = 1.0
    act[1, [3, 77]] = -2.0
    act[1, 199] = float("nan")
    act[17, [5, 6]] = 1.0  # second batch tile (rows 16..31)
    w_t = torch.randn(200, 40)
    g = plan(18, 200, 40, act.dtype, act.device, split_k=3)
    cnt = torch.full((g["n_btiles"] * g["n_splits"],), -1, dtype=torch.int32)
    sparse_down(act, w_t, split_k=3, active_out=cnt)
    per_tile = cnt.view(g["n_btiles"], g["n_splits"]).sum(1).tolist()
    assert per_tile == [4, 2]


def test_counters_stay_zero_and_out_argument():
    from fastload.kernels import sparse_ffn as k
    act = torch.relu(torch.randn(3, 130))
    w_t = torch.randn(130, 33)
    out = torch.empty(3, 33)
    for _ in range(3):  # the last split of every tile resets its counter
        assert sparse_down(act, w_t, out=out, split_k=2) is out
        assert all(int(c.abs().sum()) == 0 for c in k._COUNTERS.values())
    assert torch.allclose(out.double(), reference(act, w_t, None), atol=1e-4)
    with pytest.raises(ValueError, match="out must be"):
        sparse_down(act, w_t, out=torch.empty(3, 32))


def test_nan_propagates_and_deterministic():
    g = torch.Generator().manual_seed(0)
    act = torch.relu(torch.randn(2, 100, generator=g))
    act[1, 5] = float("nan")
    w_t = torch.randn(100, 40, generator=g)
    a, b = sparse_down(act, w_t, split_k=4), sparse_down(act, w_t, split_k=4)
    c = sparse_down(act, w_t, split_k=1)  # another split count: same values within rounding
    assert torch.allclose(a[0], c[0], atol=1e-4)
    assert torch.isnan(a[1]).all() and torch.isfinite(a[0]).all()
    assert torch.equal(a[0], b[0])


@pytest.mark.parametrize("sparsity", [0.0, 0.8, 1.0])
@pytest.mark.parametrize("split_k", [1, 3, 32])
def test_every_partial_written_before_read(monkeypatch, sparsity, split_k):
    # Partials start as NaN: a split whose partial was summed before it was written (or not
    # written at all, e.g. an all-inactive range) would show up as NaN in the output.
    from fastload.kernels import sparse_ffn as k
    monkeypatch.setattr(k, "_empty_partials",
                        lambda shape, device: torch.full(shape, float("nan"), device=device))
    g = torch.Generator().manual_seed(3)
    act = torch.rand(2, 333, generator=g) + 0.1
    act[:, torch.rand(333, generator=g) < sparsity] = 0
    w_t = torch.randn(333, 50, generator=g)
    bias = torch.randn(50, generator=g)
    out = k.sparse_down(act, w_t, bias, split_k=split_k)
    ref = reference(act, w_t, bias)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.double(), ref, atol=1e-4 * float(ref.abs().max().clamp_min(1)), rtol=1e-4)


def test_module_device_path_decides_from_measured_activity():
    # SparseReLUFFN's device path (run here on CPU tensors in the interpreter): the first
    # call samples the active count (no host sync on a GPU: pinned copy + event), later
    # calls take the dense path when the measured union fraction exceeds the crossover,
    # and re-sample every _RESAMPLE_DENSE-th call.
    import torch.nn as nn

    from fastload.ffn import sparse as S

    g = torch.Generator().manual_seed(0)
    up, down = nn.Linear(16, 256), nn.Linear(256, 16)
    ffn = S.SparseReLUFFN.from_dense(up, down)
    act = torch.rand(2, 256, generator=g)
    act[:, :64] = 0  # union fraction 0.75
    ref = reference(act, ffn.down_t, ffn.down_bias)
    with torch.no_grad():
        out = ffn._device_down(act, crossover=0.5)
        assert out is not None and torch.allclose(out.double(), ref, atol=1e-4)
        assert ffn.last_active == 192 and ffn._dev_state["frac"] == 0.75
        outs = [ffn._device_down(act, crossover=0.5) for _ in range(S._RESAMPLE_DENSE - 1)]
        assert sum(o is None for o in outs) == S._RESAMPLE_DENSE - 2  # dense but the resample
        act[:, 64:128] = 0  # activity drops to 0.5: seen at the next resample, then sparse
        outs = [ffn._device_down(act, crossover=0.6) for _ in range(S._RESAMPLE_DENSE)]
        assert sum(o is not None for o in outs) == 1 and outs[-1] is not None
        assert ffn._dev_state["frac"] == 0.5
        assert all(ffn._device_down(act, crossover=0.6) is not None for _ in range(3))
