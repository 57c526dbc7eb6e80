"""SparseReLUFFN and the C++ sparse down-projection against the dense PyTorch reference."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastload.ffn.sparse import SparseReLUFFN, active_indices, sparse_down_cpu

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@torch.no_grad()
def dense_ref(x, up, down, gate=None):
    """The dense block in fp64 (the reference)."""
    x = x.double()
    h = F.linear(x, up.weight.double(), None if up.bias is None else up.bias.double())
    act = torch.relu(F.linear(x, gate.weight.double(), None if gate.bias is None else gate.bias.double())) * h \
        if gate is not None else torch.relu(h)
    return F.linear(act, down.weight.double(), None if down.bias is None else down.bias.double()), act


def make(d_model, d_ff, gated, bias, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    def lin(i, o):
        m = nn.Linear(i, o, bias=bias)
        with torch.no_grad():
            m.weight.copy_(torch.randn(o, i, generator=g) / math.sqrt(i))
            if bias:
                m.bias.copy_(torch.randn(o, generator=g) * 0.1)
        return m.to(dtype)
    return lin(d_model, d_ff), lin(d_ff, d_model), (lin(d_model, d_ff) if gated else None)


def check(out, ref, dtype):
    scale = float(ref.abs().max().clamp_min(1.0))
    err = float((out.double() - ref).abs().max())
    assert err <= TOL[dtype] * scale * 4, f"max err {err} (scale {scale})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("batch", [1, 3, 17, 64])
def test_module_matches_dense(dtype, gated, bias, batch):
    d_model, d_ff = 37, 101  # multiples of no block size
    up, down, gate = make(d_model, d_ff, gated, bias, dtype)
    ffn = SparseReLUFFN.from_dense(up, down, gate=gate, crossover=1.0)
    x = torch.randn(batch, d_model, generator=torch.Generator().manual_seed(batch)).to(dtype)
    with torch.no_grad():
        out = ffn(x)
    assert out.dtype == dtype and out.shape == (batch, d_model)
    assert ffn.last_active is not None  # the sparse kernel ran
    ref, _ = dense_ref(x, up, down, gate)
    check(out, ref, dtype)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.7, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("batch", [1, 5, 64])
@pytest.mark.parametrize("pattern", ["random", "identical", "disjoint"])
def test_kernel_sparsity_sweep(sparsity, batch, pattern):
    g = torch.Generator().manual_seed(7)
    d_ff, d_model = 203, 75
    act = torch.rand(batch, d_ff, generator=g) + 0.1
    if pattern == "random":
        act[torch.rand(batch, d_ff, generator=g) < sparsity] = 0
    elif pattern == "identical":
        act[:, torch.rand(d_ff, generator=g) < sparsity] = 0
    else:  # each row its own slice of neurons
        keep = torch.zeros(batch, d_ff, dtype=torch.bool)
        n_on = int(round((1 - sparsity) * d_ff / batch))
        for b in range(batch):
            keep[b, b * n_on:(b + 1) * n_on] = True
        act[~keep] = 0
    w_t = torch.randn(d_ff, d_model, generator=g)
    bias = torch.randn(d_model, generator=g)
    out, n = sparse_down_cpu(act, w_t, bias)
    assert n == int((act != 0).any(0).sum())
    ref = act.double() @ w_t.double() + bias.double()
    assert torch.allclose(out.double(), ref, atol=1e-4, rtol=1e-5)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d_model", [1, 15, 16, 17, 75, 300, 4100])
@pytest.mark.parametrize("batch", [1, 3, 9])
def test_kernel_dtypes_widths_threads(dtype, d_model, batch):
    # Widths around the vector blocks (8 columns; 16 for bf16, stored even/odd inside a
    # block) and past one tile (4096 columns), neuron counts that leave every group path a
    # remainder; one thread and two must agree bit for bit (fixed sum order per column).
    g = torch.Generator().manual_seed(d_model * 100 + batch)
    d_ff = 45
    act = torch.rand(batch, d_ff, generator=g) + 0.1
    act[torch.rand(batch, d_ff, generator=g) < 0.5] = 0
    act = act.to(dtype)
    w_t = torch.randn(d_ff, d_model, generator=g).to(dtype)
    bias = torch.randn(d_model, generator=g).to(dtype)
    out1, n = sparse_down_cpu(act, w_t, bias, threads=1)
    out2, _ = sparse_down_cpu(act, w_t, bias, threads=2)
    assert out1.dtype == dtype and torch.equal(out1, out2)
    assert n == int((act != 0).any(0).sum())
    ref = act.double() @ w_t.double() + bias.double()
    # fp32 accumulation, one rounding to the output dtype
    eps = {torch.float32: 1e-6, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    tol = eps * ref.abs() + 1e-5 * float(ref.abs().max().clamp_min(1.0))
    assert bool(((out1.double() - ref).abs() <= tol).all()), float((out1.double() - ref).abs().max())

def test_all_zero_input_and_all_inactive():
    up, down, _ = make(16, 40, False, True, torch.float32)
    ffn = SparseReLUFFN.from_dense(up, down, crossover=1.0)
    with torch.no_grad():
        up.bias.fill_(-1.0)  # relu(up(0)) == 0 everywhere
        out = ffn(torch.zeros(4, 16))
    assert ffn.last_active == 0
    assert torch.equal(out, down.bias.detach().expand(4, 16))


def test_fallback_above_crossover_and_measured_crossover():
    up, down, _ = make(16, 40, False, True, torch.float32)
    ffn = SparseReLUFFN.from_dense(up, down, crossover=0.0)
    x = torch.randn(2, 16)
    with torch.no_grad():
        out = ffn(x)
    assert ffn.last_active is None  # dense path
    check(out, dense_ref(x, up, down)[0], torch.float32)
    ffn.crossover = None  # measured once per (shape, dtype, bucket) and cached
    with torch.no_grad():
        out2 = ffn(x)
    check(out2, dense_ref(x, up, down)[0], torch.float32)
    from fastload.ffn import sparse
    assert any(k[:2] == (40, 16) for k in sparse._CROSSOVER)


def test_deterministic_and_leading_dims():
    up, down, gate = make(33, 70, True, True, torch.float32)
    ffn = SparseReLUFFN.from_dense(up, down, gate=gate, crossover=1.0)
    x = torch.randn(2, 3, 33)
    with torch.no_grad():
        a, b = ffn(x), ffn(x)
    assert torch.equal(a, b) and a.shape == (2, 3, 33)
    check(a.reshape(6, 33), dense_ref(x.reshape(6, 33), up, down, gate)[0], torch.float32)


def test_autograd_uses_dense_path():
    up, down, _ = make(12, 30, False, True, torch.float32)
    ffn = SparseReLUFFN.from_dense(up, down, crossover=1.0)
    x = torch.randn(3, 12, requires_grad=True)
    ffn(x).sum().backward()
    assert ffn.last_active is None
    assert x.grad is not None and ffn.down_weight.grad is not None and up.weight.grad is not None
    x2 = x.detach().clone().requires_grad_(True)
    ref = down(torch.relu(up(x2)))
    ref.sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)


def test_nan_inf_propagate_like_dense():
    up, down, _ = make(10, 50, False, False, torch.float32)
    ffn = SparseReLUFFN.from_dense(up, down, crossover=1.0)
    x = torch.randn(3, 10)
    x[1, 2] = float("nan")
    x[2, 4] = float("inf")
    with torch.no_grad():
        out = ffn(x)
        ref = down(torch.relu(up(x)))
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    fin = torch.isfinite(ref)
    assert torch.allclose(out[fin], ref[fin], atol=1e-5)
    # A NaN activation counts as active (ReLU(NaN) = NaN, not 0).
    act = torch.zeros(1, 50)
    act[0, 7] = float("nan")
    assert active_indices(act).tolist() == [7]
    out, n = sparse_down_cpu(act, torch.randn(50, 4))
    assert n == 1 and torch.isnan(out).all()


def test_nonfinite_weights_force_dense():
    up, down, _ = make(10, 50, False, False, torch.float32)
    with torch.no_grad():
        down.weight[3, 5] = float("inf")
    ffn = SparseReLUFFN.from_dense(up, down, crossover=1.0)
    x = torch.randn(2, 10)
    with torch.no_grad():
        out, ref = ffn(x), down(torch.relu(up(x)))
    assert ffn.last_active is None
    assert torch.equal(torch.isnan(out), torch.isnan(ref))


def test_bad_input():
    up, down, _ = make(10, 50, False, True, torch.float32)
    with pytest.raises(ValueError, match="not ReLU"):
        SparseReLUFFN.from_dense(up, down, activation=nn.GELU())
    with pytest.raises(ValueError, match="down weight"):
        SparseReLUFFN.from_dense(up, nn.Linear(49, 10))
    with pytest.raises(ValueError, match="gate"):
        SparseReLUFFN.from_dense(up, down, gate=nn.Linear(10, 51))
    with pytest.raises(ValueError, match="activation"):
        SparseReLUFFN(10, 50, activation="gelu")
    ffn = SparseReLUFFN.from_dense(up, down, crossover=1.0)
    with pytest.raises(ValueError, match="d_model"):
        ffn(torch.randn(2, 11))
    with pytest.raises(ValueError, match="floating"):
        ffn(torch.ones(2, 10, dtype=torch.int64))
    # Non-contiguous and other-dtype inputs are converted.
    x = torch.randn(10, 4).t()
    with torch.no_grad():
        check(ffn(x), dense_ref(x, up, down)[0], torch.float32)
        check(ffn(x.double()), dense_ref(x, up, down)[0], torch.float32)
    with pytest.raises(ValueError, match="must match"):
        sparse_down_cpu(torch.zeros(1, 4), torch.zeros(4, 3, dtype=torch.float16))


def test_constructor_module():
    ffn = SparseReLUFFN(24, 80, gated=True, bias=False, dtype=torch.bfloat16, crossover=1.0)
    x = torch.randn(5, 24).bfloat16()
    with torch.no_grad():
        out = ffn(x)
        ref = (torch.relu(ffn.gate(x).float()) * ffn.up(x).float()).bfloat16().float() @ ffn.down_t.float()
    assert torch.allclose(out.float(), ref, atol=5e-2, rtol=2e-2)


def test_approx_mode_reports_recall_and_error():
    up, down, _ = make(16, 64, False, True, torch.float32)
    ffn = SparseReLUFFN.from_dense(up, down, crossover=1.0, approx_window=4, approx_refresh=4)
    base = torch.randn(1, 16)
    xs = [base + 0.05 * torch.randn(1, 16) for _ in range(8)]
    rep = ffn.approx_report(xs)
    assert 0.0 <= rep["recall_min"] <= rep["recall_mean"] <= 1.0 and rep["steps"] == 8
    assert rep["recall_mean"] > 0.5 and rep["rel_error_mean"] < 0.5


@pytest.mark.parametrize("keep", [True, False])
def test_dense_weight_kept_or_dropped(keep):
    """keep_dense_weight: the trainable weight is W_down (dense path F.linear with it) and
    down_t follows it after in-place updates; without it down_t is the only copy."""
    up, down, _ = make(20, 50, False, True, torch.float32)
    ffn = SparseReLUFFN.from_dense(up, down, crossover=1.0, keep_dense_weight=keep)
    assert (ffn.down_weight is not None) == keep
    x = torch.randn(4, 20)
    ffn(x).sum().backward()  # training path: dense, differentiable
    assert (ffn.down_weight if keep else ffn.down_t).grad is not None
    with torch.no_grad():
        if keep:
            ffn.down_weight.mul_(-2.0)  # an optimizer step in place
            down.weight.copy_(ffn.down_weight)
        else:
            ffn.down_t.mul_(-2.0)
            down.weight.copy_(ffn.down_t.t())
        out = ffn(x)
    assert ffn.last_active is not None
    check(out, dense_ref(x, up, down)[0], torch.float32)


def test_plan_cheap_and_sane():
    from fastload.ffn.sparse import measure_plan
    w_t = torch.randn(300, 64)
    plan = measure_plan(w_t, 4, threads=2, reps=2, w_dense=w_t.t().contiguous())
    assert 0.0 <= plan["crossover"] <= 1.0 and plan["threads"] in (1, 2)
    assert plan["proxy_rows"] == 300  # never more rows than d_ff


@pytest.mark.parametrize("ratio", [0.0, 1e9])
def test_plan_full_size_retiming_when_close(monkeypatch, ratio):
    # A close call between the slice estimates (ratio 1e9: always "close") re-times both
    # paths at full size; ratio 0 never does.
    from fastload.ffn import sparse
    monkeypatch.setattr(sparse, "_REFINE_RATIO", ratio)
    w_t = torch.randn(600, 1024)  # batch 64: the slice is 256 of the 600 rows
    plan = sparse.measure_plan(w_t, 64, threads=1, reps=2, w_dense=w_t.t().contiguous())
    assert plan["proxy_rows"] == 256
    assert plan["full_size_timed"] is (ratio > 0)
    assert plan["t_kernel_full_s"] > 0 and plan["t_torch_s"] > 0
    assert 0.0 < plan["crossover"] <= 1.0
