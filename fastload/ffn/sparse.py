"""Exact sparse execution of ReLU FFN blocks (``fastload.SparseReLUFFN``).

Why: after ReLU most FFN activations are exactly zero (>90% in ReLU LLMs). A zero
activation makes the matching row of ``W_down^T`` irrelevant, so in memory-bound decoding
the down-projection only has to read the active rows: speed-up ceiling ``1/u`` with ``u``
the active fraction (union over the batch).

How: the up (and gate) projection stays dense (``torch.nn.functional.linear``); the
down-projection weight is also kept transposed, ``[d_ff, d_model]`` row-major in the weight
dtype, so an active neuron is one contiguous row. On CPU the C++ library ``_sparse_ffn``
compacts the active set and FMA's the active rows into fp32 accumulators (dynamic column
tiles: deterministic, and a thread slowed by another process takes fewer tiles). On CUDA the
Triton kernel in ``fastload.kernels.sparse_ffn`` does the same on the device.

Dense fallback and crossover: by default the original ``W_down`` is kept as the parameter
(``keep_dense_weight=True``; reused, not copied, by ``from_dense``; the transposed copy is a
derived buffer), because torch's CPU product is fast only with that layout (transposed view:
~15% slower in fp32, ~30x in bf16, measured). The plan per (shape, dtype, batch bucket,
threads) comes from :func:`measure_plan`: the kernel time is linear in the active rows, so
one timing of the kernel with every row active and one of torch's dense product, both on a
slice of the weight (~16M multiply-adds, a few ms to ~0.1 s in all), give the crossover
``0.95 * t_dense / t_kernel_full``; when the kernel beats torch even with every row (as in
bf16 on AVX2 CPUs without native bf16 GEMM), the kernel always runs. The same timing picks 1
or N threads. Set ``crossover=`` to skip the measurement.

Autograd: when gradients are needed (grad mode on and the input or a weight requires grad)
the module runs the dense path, which is differentiable. The sparse path is for inference
(``torch.no_grad()`` / ``torch.inference_mode()``).
"""
from __future__ import annotations

import ctypes
import math
import statistics
import threading
import time
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# (d_ff, d_model, dtype, batch bucket, threads, device, dense weight kept) -> plan dict.
_CROSSOVER: dict = {}
_CROSSOVER_LOCK = threading.Lock()
# Slice estimates closer than this factor are re-timed at full size, within this budget
# (see measure_plan).
_REFINE_RATIO = 1.6
_FULL_BUDGET_S = 0.5


def _lib():
    from fastload import _native

    lib = _native.load("sparse_ffn")
    if not getattr(lib, "_fl_sffn_typed", False):
        lib.fl_sffn_down.restype = ctypes.c_int
        lib.fl_sffn_down.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                                     ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.POINTER(ctypes.c_long)]
        lib.fl_sffn_active.restype = ctypes.c_int
        lib.fl_sffn_active.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_int,
                                       ctypes.c_void_p, ctypes.c_long, ctypes.POINTER(ctypes.c_long)]
        lib._fl_sffn_typed = True
    return lib


def batch_bucket(n: int) -> int:
    """Power-of-two bucket of a batch size (1, 2, 4, ..., 128); the crossover is per bucket."""
    return min(128, 1 << max(0, int(n - 1).bit_length()))


def sparse_down_cpu(act: torch.Tensor, w_t: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    max_active: Optional[int] = None, threads: Optional[int] = None):
    """``act @ w_t + bias`` reading only the rows of ``w_t`` whose neuron is active.

    ``act`` is ``[B, d_ff]``, ``w_t`` is ``[d_ff, d_model]`` (both contiguous, same dtype:
    fp32, bf16 or fp16). Returns ``(out, n_active)``; ``out`` is None when more than
    ``max_active`` neurons are active (the caller then runs the dense product).

    >>> import torch
    >>> a = torch.relu(torch.randn(2, 8)); w = torch.randn(8, 3)
    >>> out, n = sparse_down_cpu(a, w)
    >>> torch.allclose(out, a @ w, atol=1e-5)
    True
    """
    from fastload import _native

    if act.dim() != 2 or w_t.dim() != 2 or act.shape[1] != w_t.shape[0]:
        raise ValueError(f"act {tuple(act.shape)} and w_t {tuple(w_t.shape)} do not chain")
    if act.dtype != w_t.dtype or act.dtype not in _DTYPE_CODE:
        raise ValueError(f"act dtype {act.dtype} and w_t dtype {w_t.dtype} must match and be "
                         "float32, bfloat16 or float16")
    if act.device.type != "cpu" or w_t.device.type != "cpu":
        raise ValueError("sparse_down_cpu needs CPU tensors")
    if not w_t.is_contiguous():
        raise ValueError("w_t must be contiguous ([d_ff, d_model] row-major)")
    act = act.contiguous()
    B, d_ff = act.shape
    d_model = w_t.shape[1]
    if bias is not None:
        if bias.shape != (d_model,):
            raise ValueError(f"bias must have shape ({d_model},), got {tuple(bias.shape)}")
        bias = bias.to(act.dtype).contiguous()
    out = torch.empty(B, d_model, dtype=act.dtype)
    if max_active is None:
        max_active = d_ff
    n = ctypes.c_long(0)
    lib = _lib()
    st = lib.fl_sffn_down(act.data_ptr(), B, d_ff, w_t.data_ptr(), d_model, _DTYPE_CODE[act.dtype],
                          bias.data_ptr() if bias is not None else None, out.data_ptr(), out.numel(),
                          int(max_active), int(threads or torch.get_num_threads()), ctypes.byref(n))
    _native.check(lib, st, "sparse_down_cpu")
    return (out if n.value <= max_active else None), n.value


def active_indices(act: torch.Tensor) -> torch.Tensor:
    """Ascending indices of the neurons non-zero in some row of ``act`` ([B, d_ff], CPU).

    NaN counts as active (``ReLU(NaN) = NaN``).

    >>> active_indices(torch.tensor([[0., 1., 0.], [0., 0., 2.]])).tolist()
    [1, 2]
    """
    from fastload import _native

    act = act.reshape(-1, act.shape[-1]).contiguous()
    if act.dtype not in _DTYPE_CODE:
        act = act.float()
    idx = torch.empty(act.shape[1], dtype=torch.int32)
    n = ctypes.c_long(0)
    lib = _lib()
    _native.check(lib, lib.fl_sffn_active(act.data_ptr(), act.shape[0], act.shape[1],
                                          _DTYPE_CODE[act.dtype], idx.data_ptr(), idx.numel(), ctypes.byref(n)),
                  "active_indices")
    return idx[: n.value].long()


def _proxy_rows(d_ff: int, d_model: int, batch: int) -> int:
    # About 16M multiply-adds per timed call (a few ms), never fewer than 256 rows: both the
    # kernel and torch's product scale linearly in the number of rows, so a slice of W^T
    # predicts the full product at a fraction of its cost.
    k = (16 << 20) // max(1, batch * d_model)
    return int(min(d_ff, max(256, k)))


def measure_plan(w_t: torch.Tensor, batch: int, threads: Optional[int] = None,
                 reps: int = 5, w_dense: Optional[torch.Tensor] = None) -> dict:
    """Crossover and thread count for the CPU down-projection at this shape and batch bucket.

    Cheap by construction (a few ms to ~0.1 s): the sparse kernel is timed with *every*
    neuron active on a slice of ``w_t`` (``_proxy_rows`` rows), because its time is linear in
    the active rows (``t(u) = u * t_full``, memory-bound at small batch, FMA-bound at large),
    so one point gives the whole line. The dense fallback is ``F.linear(act, w_t.t())`` (the
    transposed view of the one stored copy); it is timed on the same slice only for fp32:
    in bf16/fp16 torch's CPU product with that layout is ~30x slower than with the original
    layout (measured), so the kernel with all rows is the dense path there. The crossover is
    ``0.95 * t_torch / t_kernel_full`` (5% margin, capped at 1.0: when the kernel with every
    row beats torch, the kernel always runs). With ``w_dense`` (the original ``W_down``,
    ``[d_model, d_ff]``) torch is timed with that layout in every dtype instead. The thread
    count (1 or ``threads``) is the faster one by median in the same interleaved timing (the
    crossover uses the fastest of ``reps``): on a loaded machine a second thread whose
    wake-up is delayed stalls the pool barrier, and for a memory-bound GEMV one core often
    already streams near the bandwidth bound.

    When the two slice estimates are within a factor ``_REFINE_RATIO`` (1.6) of each other,
    the decision is close and a slice can mislead (torch picks its kernel by shape: the
    strided bf16 slice at batch 1 predicted 9.8 ms for a product that takes 8.2 ms,
    measured), so both paths are then timed again at full size (>= 2 interleaved reps,
    ~0.5 s budget; at batch 1 for 4096 x 11008, ~0.1 s).

    Returns ``{"crossover": float, "threads": int, "t_kernel_full_s": ..., "t_torch_s": ...,
    "full_size_timed": bool}`` (slice times extrapolated to the full ``d_ff``).
    """
    d_ff, d_model = w_t.shape
    threads = int(threads or torch.get_num_threads())
    k = _proxy_rows(d_ff, d_model, batch)
    w = w_t[:k]  # first k rows of a row-major tensor: contiguous
    g = torch.Generator().manual_seed(1234)
    act = (torch.rand(batch, k, generator=g) + 0.5).to(w_t.dtype)
    fns = {1: lambda: sparse_down_cpu(act, w, None, None, 1)}
    if threads > 1:
        fns[threads] = lambda: sparse_down_cpu(act, w, None, None, threads)
    if w_dense is not None:
        wd = w_dense[:, :k]  # strided slice: same bytes per row-chunk as the full product
        fns["torch"] = lambda: F.linear(act, wd)
    elif w_t.dtype == torch.float32:
        fns["torch"] = lambda: F.linear(act, w.t())
    for f in fns.values():
        f()  # warm up
    ts = round_robin(fns, reps)
    # Fastest of the repetitions: other processes only ever add time, so the minimum is
    # the least noisy estimate of what each path can do on this machine.
    med = {name: min(v) * d_ff / k for name, v in ts.items()}
    # Threads by the median: a second thread that is often late (pool barrier) should lose.
    best_threads = min((n for n in fns if n != "torch"), key=lambda n: statistics.median(ts[n]))
    t_kernel = med[best_threads]
    t_torch = med.get("torch")
    full_timed = False
    if t_torch is not None and k < d_ff and t_torch < _REFINE_RATIO * t_kernel:
        # Close call: a slice predicts torch's full product only within ~1.2-1.9x (its
        # kernel choice depends on the shape; bf16 at batch 1 was misjudged by 20%,
        # measured), so both paths are re-timed at full size, within a time budget.
        t_kernel, t_torch = _time_full(w_t, w_dense, batch, int(best_threads), reps)
        full_timed = True
    frac = 1.0 if t_torch is None else min(1.0, 0.95 * t_torch / t_kernel)
    return {"crossover": frac, "threads": int(best_threads), "t_kernel_full_s": t_kernel,
            "t_torch_s": t_torch, "proxy_rows": k, "full_size_timed": full_timed}


def _time_full(w_t, w_dense, batch, threads, reps):
    """Fastest of up to ``reps`` interleaved full-size timings (>= 2, ~0.5 s budget)."""
    d_ff = w_t.shape[0]
    g = torch.Generator().manual_seed(4321)
    act = (torch.rand(batch, d_ff, generator=g) + 0.5).to(w_t.dtype)
    wd = w_t.t() if w_dense is None else w_dense
    fns = {"kernel": lambda: sparse_down_cpu(act, w_t, None, None, threads),
           "torch": lambda: F.linear(act, wd)}
    for f in fns.values():
        f()
    ts = round_robin(fns, max(2, reps), budget_s=_FULL_BUDGET_S)
    return min(ts["kernel"]), min(ts["torch"])


def round_robin(fns: dict, reps: int, budget_s: float = math.inf) -> dict:
    """Seconds of each call, the functions run in turn ``reps`` times (side by side in time,
    so they see the same machine state); stops early past ``budget_s`` after 2 rounds."""
    ts = {name: [] for name in fns}
    start = time.perf_counter()
    for rep in range(reps):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[name].append(time.perf_counter() - t0)
        if rep >= 1 and time.perf_counter() - start > budget_s:
            break
    return ts


def measure_crossover(w_t: torch.Tensor, batch: int, threads: Optional[int] = None, reps: int = 5,
                      bias: Optional[torch.Tensor] = None) -> float:
    """Largest active fraction at which the sparse down-projection is used (see measure_plan)."""
    return measure_plan(w_t, batch, threads, reps)["crossover"]


_SAMPLE_EVERY = 8      # device path: measure the active count every 8th call ...
_RESAMPLE_DENSE = 32   # ... and run the kernel every 32nd call while dense is chosen


def _capturing(device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def measure_plan_device(w_t: torch.Tensor, batch: int, reps: int = 5,
                        w_dense: Optional[torch.Tensor] = None) -> dict:
    """Crossover of the device kernel (``fastload.kernels.sparse_ffn``) at this shape and
    batch bucket: its time with every row active against torch's dense product (CUDA events,
    fastest of ``reps`` interleaved runs after a warm-up; a few ms in all). The kernel's
    time is linear in the rows read, so ``0.95 * t_dense / t_kernel_full`` (capped at 1) is
    the active fraction below which it wins."""
    from fastload.kernels.sparse_ffn import sparse_down

    d_ff = w_t.shape[0]
    g = torch.Generator(device=w_t.device).manual_seed(1234)
    act = (torch.rand(batch, d_ff, generator=g, device=w_t.device) + 0.5).to(w_t.dtype)
    wd = w_t.t() if w_dense is None else w_dense
    fns = {"kernel": lambda: sparse_down(act, w_t), "torch": lambda: F.linear(act, wd)}
    ts = {k: [] for k in fns}
    for f in fns.values():
        f()
        f()
    for _ in range(reps):
        for name, f in fns.items():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            f()
            b.record()
            b.synchronize()
            ts[name].append(a.elapsed_time(b) * 1e-3)
    t_k, t_t = min(ts["kernel"]), min(ts["torch"])
    return {"crossover": min(1.0, 0.95 * t_t / t_k), "threads": None, "t_kernel_full_s": t_k,
            "t_torch_s": t_t, "full_size_timed": True}


def _dense_down(act, w_t, bias):
    # The transposed view of W_down^T is W_down: F.linear with it is torch's fast layout in
    # fp32 (as fast as F.linear with the original weight, measured).
    return F.linear(act, w_t.t(), bias)


class SparseReLUFFN(nn.Module):
    """ReLU FFN block with an exact sparse down-projection for inference.

    Plain: ``y = down(relu(up(x)))``; gated: ``y = down(relu(gate(x)) * up(x))``. Weights in
    fp32, bf16 or fp16, with or without bias. ``up``/``gate`` are ``nn.Linear`` modules
    (reused, not copied, by :meth:`from_dense`); the down-projection is stored once as
    ``down_t = W_down^T`` (``[d_ff, d_model]`` row-major, the weight dtype) with
    ``down_bias``. Under ``torch.no_grad()`` on CPU (C++) or CUDA (Triton) only the rows of
    ``down_t`` of active neurons (union over the batch) are read; above the crossover
    fraction (``crossover=`` or measured once per shape/dtype/batch bucket and cached) the
    dense product runs. With gradients required the dense path runs (it is the training
    path). Inputs of another floating dtype are converted to the weight dtype.

    Approximate mode (``approx_window > 0``, plain FFN only): the up-projection is computed
    only for the neurons active in the last ``approx_window`` calls (aggregated sparsity,
    plus a full refresh every ``approx_refresh`` calls); see :meth:`approx_report`.

    >>> import torch, torch.nn as nn
    >>> up, down = nn.Linear(16, 64), nn.Linear(64, 16)
    >>> ffn = SparseReLUFFN.from_dense(up, down)
    >>> x = torch.randn(3, 16)
    >>> with torch.no_grad():
    ...     torch.allclose(ffn(x), down(torch.relu(up(x))), atol=1e-5)
    True
    """

    def __init__(self, d_model: int, d_ff: int, gated: bool = False, bias: bool = True,
                 dtype: torch.dtype = torch.float32, crossover: Optional[float] = None,
                 activation: str = "relu", approx_window: int = 0, approx_refresh: int = 16,
                 keep_dense_weight: bool = True):
        super().__init__()
        if activation != "relu":
            raise ValueError(f"activation={activation!r}: the exact sparse path needs ReLU "
                             "(convert the model with fastload.relufy first)")
        if dtype not in _DTYPE_CODE:
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        if d_model <= 0 or d_ff <= 0:
            raise ValueError(f"d_model and d_ff must be positive, got {d_model}, {d_ff}")
        if crossover is not None and not 0.0 <= crossover <= 1.0:
            raise ValueError(f"crossover must be in [0, 1], got {crossover}")
        self.d_model, self.d_ff, self.gated = d_model, d_ff, gated
        self.crossover = crossover
        self.up = nn.Linear(d_model, d_ff, bias=bias, dtype=dtype)
        self.gate = nn.Linear(d_model, d_ff, bias=bias, dtype=dtype) if gated else None
        down = nn.Linear(d_ff, d_model, bias=bias, dtype=dtype)
        self._set_down(down.weight, bool(keep_dense_weight))
        self.down_bias = nn.Parameter(down.bias.detach()) if bias else None
        self.approx_window, self.approx_refresh = int(approx_window), int(approx_refresh)
        self._finite_checked = None  # data_ptr/version of down_t when last checked finite
        self._finite = True
        self.last_active = None  # active count of the last sparse call (None: dense ran)
        self._probe = None  # set by activation_sparsity
        self._approx_state = None
        self._dev_state = None  # device path: sampled active fraction (see _device_down)

    @classmethod
    def from_dense(cls, up: nn.Linear, down: nn.Linear, gate: Optional[nn.Linear] = None,
                   activation=None, crossover: Optional[float] = None, **kwargs) -> "SparseReLUFFN":
        """Build from the dense block's ``nn.Linear`` modules (``up``/``gate`` are reused).

        ``activation`` (optional) is the module or name the dense block used; anything but
        ReLU is refused, since the exact path relies on exact zeros.

        >>> import torch.nn as nn
        >>> ffn = SparseReLUFFN.from_dense(nn.Linear(8, 32), nn.Linear(32, 8), gate=nn.Linear(8, 32))
        >>> ffn.gated, tuple(ffn.down_t.shape)
        (True, (32, 8))
        """
        if activation is not None:
            name = activation if isinstance(activation, str) else type(activation).__name__
            if str(name).lower() not in ("relu", "relu()"):
                raise ValueError(f"activation {name!r} is not ReLU: the exact sparse path needs "
                                 "ReLU (convert the model with fastload.relufy first)")
        for nm, m in (("up", up), ("down", down), ("gate", gate)):
            if m is not None and not isinstance(m, nn.Linear):
                raise ValueError(f"{nm} must be an nn.Linear, got {type(m).__name__}")
        d_ff, d_model = up.weight.shape
        if down.weight.shape != (d_model, d_ff):
            raise ValueError(f"down weight has shape {tuple(down.weight.shape)}, expected "
                             f"({d_model}, {d_ff}) to match up {tuple(up.weight.shape)}")
        if gate is not None and gate.weight.shape != up.weight.shape:
            raise ValueError(f"gate weight {tuple(gate.weight.shape)} != up weight {tuple(up.weight.shape)}")
        dtype = up.weight.dtype
        for nm, m in (("down", down), ("gate", gate)):
            if m is not None and m.weight.dtype != dtype:
                raise ValueError(f"{nm} weight dtype {m.weight.dtype} != up weight dtype {dtype}")
        has_bias = down.bias is not None
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        if dtype not in _DTYPE_CODE:
            raise ValueError(f"weight dtype must be float32, bfloat16 or float16, got {dtype}")
        self.d_model, self.d_ff, self.gated = d_model, d_ff, gate is not None
        if crossover is not None and not 0.0 <= crossover <= 1.0:
            raise ValueError(f"crossover must be in [0, 1], got {crossover}")
        self.crossover = crossover
        self.up, self.gate = up, gate
        self._set_down(down.weight, bool(kwargs.pop("keep_dense_weight", True)))
        self.down_bias = down.bias if has_bias else None
        self.approx_window = int(kwargs.pop("approx_window", 0))
        self.approx_refresh = int(kwargs.pop("approx_refresh", 16))
        if kwargs:
            raise ValueError(f"unknown arguments {sorted(kwargs)}")
        self._finite_checked, self._finite = None, True
        self.last_active, self._probe, self._approx_state = None, None, None
        self._dev_state = None
        return self

    def _set_down(self, weight: torch.Tensor, keep: bool) -> None:
        # W_down^T, row-major, so an active neuron is one contiguous row. With keep (default)
        # the original W_down ([d_model, d_ff], reused, not copied) stays the parameter: the
        # dense / training path runs F.linear with it (torch's fast layout in every dtype;
        # with the transposed view it is ~15% slower in fp32 and ~30x slower in bf16 on
        # CPU, measured) and down_t is a derived buffer, re-made when the weight changes.
        # Cost: one more d_ff x d_model copy. Without keep, down_t is the only copy.
        if keep:
            self.down_weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
            self.register_buffer("down_t", weight.detach().t().contiguous(), persistent=False)
            self._down_t_of = (weight.data_ptr(), weight._version)
        else:
            self.down_weight = None
            self.down_t = nn.Parameter(weight.detach().t().contiguous(),
                                       requires_grad=weight.requires_grad)
            self._down_t_of = None

    def _sync_down_t(self) -> None:
        """Re-make the derived ``down_t`` if ``down_weight`` was changed (trained, loaded)."""
        w = self.down_weight
        if w is None:
            return
        key = (w.data_ptr(), w._version)
        if key != self._down_t_of:
            with torch.no_grad():
                if self.down_t.shape == (w.shape[1], w.shape[0]) and self.down_t.dtype == w.dtype \
                        and self.down_t.device == w.device:
                    self.down_t.copy_(w.t())
                else:
                    self.down_t = w.detach().t().contiguous()
            self._down_t_of = key

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, gated={self.gated}, "
                f"dtype={self.down_t.dtype}, crossover={self.crossover}")

    # -- helpers ---------------------------------------------------------------------------
    def _weights_finite(self) -> bool:
        # 0 * inf = NaN in the dense product, but a skipped row contributes nothing: with
        # non-finite weights only the dense path is exact. Checked once per weight version.
        self._sync_down_t()
        key = (self.down_t.data_ptr(), self.down_t._version)
        if self._finite_checked != key:
            self._finite = bool(torch.isfinite(self.down_t).all())
            self._finite_checked = key
        return self._finite

    def _plan(self, batch: int) -> dict:
        if self.crossover is not None:
            return {"crossover": self.crossover, "threads": None}
        key = (self.d_ff, self.d_model, self.down_t.dtype, batch_bucket(batch),
               torch.get_num_threads(), self.down_t.device.type, self.down_weight is not None)
        plan = _CROSSOVER.get(key)
        if plan is None:
            with _CROSSOVER_LOCK:
                plan = _CROSSOVER.get(key)
                if plan is None:
                    if self.down_t.device.type == "cpu":
                        plan = measure_plan(self.down_t.detach(), batch_bucket(batch),
                                            w_dense=None if self.down_weight is None
                                            else self.down_weight.detach())
                    elif _capturing(self.down_t.device):
                        # no timing (it synchronizes) inside a CUDA graph capture: the
                        # captured step runs the kernel; measured on the next eager call
                        return {"crossover": 1.0, "threads": None}
                    else:
                        plan = measure_plan_device(self.down_t.detach(), batch_bucket(batch),
                                                   w_dense=None if self.down_weight is None
                                                   else self.down_weight.detach())
                    _CROSSOVER[key] = plan
        return plan

    def _activation(self, x):
        if self.approx_window > 0 and not self.gated and not torch.is_grad_enabled():
            return self._approx_activation(x)
        h = F.linear(x, self.up.weight, self.up.bias)
        if self.gated:
            return torch.relu(F.linear(x, self.gate.weight, self.gate.bias)) * h
        return torch.relu(h)

    def _down_dense(self, act):
        if self.down_weight is not None:
            return F.linear(act, self.down_weight, self.down_bias)
        return _dense_down(act, self.down_t, self.down_bias)

    def down_proj(self, act: torch.Tensor, needs_grad: bool = False) -> torch.Tensor:
        """Down-projection of ``act`` ([N, d_ff], weight dtype): sparse kernel below the
        crossover, dense fallback above it (or when gradients are needed / weights non-finite).
        Sets ``last_active`` (None when the dense path ran; on CUDA, the rows read at the
        last sampled call, read back asynchronously).

        >>> import torch, torch.nn as nn
        >>> ffn = SparseReLUFFN.from_dense(nn.Linear(4, 16), nn.Linear(16, 4), crossover=1.0)
        >>> a = torch.relu(torch.randn(2, 16))
        >>> with torch.no_grad():
        ...     torch.allclose(ffn.down_proj(a), ffn._down_dense(a), atol=1e-5)
        True
        """
        out = None
        if act.device.type != "cuda":
            self.last_active = None
        if not needs_grad and act.shape[0] > 0 and self._weights_finite():
            plan = self._plan(act.shape[0])
            max_active = int(math.floor(plan["crossover"] * self.d_ff))
            if max_active > 0:
                if act.device.type == "cpu":
                    out, n = sparse_down_cpu(act, self.down_t, self.down_bias, max_active,
                                             plan["threads"])
                    self.last_active = n if out is not None else None
                elif act.device.type == "cuda":
                    out = self._device_down(act, plan["crossover"])
        if out is None:
            out = self._down_dense(act)
        return out

    def _device_down(self, act: torch.Tensor, crossover: float):
        """The Triton kernel on the device, or None for the dense path. The decision uses
        the union active fraction measured on earlier calls, read back asynchronously (a
        pinned copy and an event polled without waiting), so there is no host
        synchronization: every ``_SAMPLE_EVERY``-th call (every ``_RESAMPLE_DENSE``-th while
        the dense path is chosen) the kernel also writes its per-slice active counts. Inside
        a CUDA graph capture nothing is sampled: the graph keeps the path of the last eager
        measurement (the kernel when none was made yet)."""
        from fastload.kernels.sparse_ffn import plan as kplan
        from fastload.kernels.sparse_ffn import sparse_down

        act = act.contiguous()
        st = self._dev_state
        g = kplan(act.shape[0], self.d_ff, self.d_model, act.dtype, act.device)
        n_tiles = g["n_btiles"] * g["n_cols"]
        cnt = None if st is None else st.get("cnt")
        if _capturing(act.device):
            # no event, copy or query inside a capture: the graph keeps the path the last
            # eager measurement chose
            if st is not None and st["frac"] is not None and st["frac"] > crossover:
                return None
            ok = cnt is not None and cnt.numel() >= n_tiles and cnt.device == act.device
            return sparse_down(act, self.down_t, self.down_bias, counters=cnt if ok else None)
        if st is None:
            st = self._dev_state = {"calls": 0, "frac": None, "pending": None}
        if cnt is None or cnt.numel() < n_tiles or cnt.device != act.device:
            # the module's own tile counters (zero between calls): no stream-keyed lookup
            cnt = st["cnt"] = torch.zeros(max(n_tiles, 64), dtype=torch.int32, device=act.device)
        self._poll_activity()
        st["calls"] += 1
        frac = st["frac"]
        dense = frac is not None and frac > crossover
        if dense and st["calls"] % _RESAMPLE_DENSE != 0:
            return None
        sample = st["pending"] is None and (frac is None or dense or st["calls"] % _SAMPLE_EVERY == 0)
        if not sample:
            return sparse_down(act, self.down_t, self.down_bias, counters=cnt)
        n = g["n_btiles"] * g["n_splits"]
        buf = st.get("buf")
        if buf is None or buf.numel() < n or buf.device != act.device:
            buf = st["buf"] = torch.zeros(max(n, 64), dtype=torch.int32, device=act.device)
            st["host"] = torch.zeros(buf.numel(), dtype=torch.int32,
                                     pin_memory=act.device.type == "cuda")
        out = sparse_down(act, self.down_t, self.down_bias, active_out=buf, counters=cnt)
        st["host"][:n].copy_(buf[:n], non_blocking=True)
        ev = None
        if act.device.type == "cuda":
            ev = torch.cuda.Event()
            ev.record()
        st["pending"] = (ev, n, self.d_ff * g["n_btiles"])
        self._poll_activity()
        return out

    def _poll_activity(self) -> None:
        st = self._dev_state
        if st is None or st["pending"] is None:
            return
        ev, n, rows = st["pending"]
        if ev is not None and not ev.query():
            return  # not landed yet: decide with the previous measurement
        read = int(st["host"][:n].sum())
        st["frac"] = read / max(1, rows)
        st["pending"] = None
        self.last_active = read

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a tensor, got {type(x).__name__}")
        if x.shape[-1:] != (self.d_model,):
            raise ValueError(f"x has last dimension {tuple(x.shape)[-1:]} but d_model is {self.d_model}")
        if not x.is_floating_point():
            raise ValueError(f"x must be floating point, got {x.dtype}")
        dtype = self.down_t.dtype
        if x.dtype != dtype:
            x = x.to(dtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.d_model)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters()))
        act = self._activation(x2)
        if self._probe is not None:
            self._probe(self, act)
        out = self.down_proj(act, needs_grad)
        return out.reshape(*lead, self.d_model)

    # -- approximate mode ------------------------------------------------------------------
    def _approx_activation(self, x):
        """Aggregated sparsity: compute the up rows of neurons active in the recent window."""
        st = self._approx_state
        if st is None:
            st = self._approx_state = {"calls": 0, "recent": [], "set": None,
                                       "recall_sum": 0.0, "checked": 0}
        st["calls"] += 1
        refresh = st["set"] is None or (st["calls"] % max(1, self.approx_refresh) == 0)
        if refresh:
            act = torch.relu(F.linear(x, self.up.weight, self.up.bias))
        else:
            idx = st["set"]
            w = self.up.weight.index_select(0, idx)
            b = self.up.bias.index_select(0, idx) if self.up.bias is not None else None
            act = x.new_zeros(x.shape[0], self.d_ff)
            act[:, idx] = torch.relu(F.linear(x, w, b))
        cur = active_indices(act) if act.device.type == "cpu" else \
            (act != 0).any(0).nonzero().flatten()
        st["recent"] = (st["recent"] + [cur])[-self.approx_window:]
        st["set"] = torch.unique(torch.cat(st["recent"]))
        return act

    @torch.no_grad()
    def approx_report(self, xs) -> dict:
        """Recall of the true active set and relative output error of approximate mode.

        Runs the sequence of inputs ``xs`` (e.g. one tensor per decoded token) through the
        approximate path and, side by side, through the exact path.
        """
        if self.approx_window <= 0 or self.gated:
            raise ValueError("approx_report needs a plain FFN built with approx_window > 0")
        saved = self._approx_state
        self._approx_state = None
        recalls, errs = [], []
        for x in xs:
            x2 = x.reshape(-1, self.d_model).to(self.down_t.dtype)
            true_act = torch.relu(F.linear(x2, self.up.weight, self.up.bias))
            true_set = set(active_indices(true_act).tolist())
            approx_act = self._approx_activation(x2)
            got = set(active_indices(approx_act).tolist())
            recalls.append(len(true_set & got) / max(1, len(true_set)))
            ref = self._down_dense(true_act)
            err = (self._down_dense(approx_act) - ref).norm() / ref.norm().clamp_min(1e-30)
            errs.append(float(err))
        self._approx_state = saved
        return {"recall_mean": sum(recalls) / len(recalls), "recall_min": min(recalls),
                "rel_error_mean": sum(errs) / len(errs), "rel_error_max": max(errs),
                "steps": len(recalls)}
