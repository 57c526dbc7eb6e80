"""``fastload bench --ffn``: sparse ReLU FFN vs dense ``torch.nn.functional.linear`` on CPU.

Per (dtype, batch) group, round-robin in every repetition (medians reported): the dense
baselines (down-projection ``F.linear(act, W_down)``; whole plain / gated FFN with dense
``F.linear`` for every projection) once, and every sparse variant of the group: the
down-projection through ``SparseReLUFFN.down_proj`` (random independent masks per batch
row, so the union fraction u grows with the batch; above the measured crossover it takes
the dense fallback, as the module does) and the whole exact FFN (``SparseReLUFFN``; the
activation pattern is set through the up (or gate) bias, the same for every row, union
fraction 1 - s^B as for independent neurons). The dense time does not depend on the
sparsity, so timing it once per repetition per group keeps the full grid affordable while
staying side by side. Each row carries the ceiling (1/u for the down-projection, the
byte ratio for the FFN) and, for the down-projection, the achieved GB/s (bytes of the
active rows / time) next to the dense product's GB/s and the copy bandwidth measured in the
same run. End to end: decode tokens/s of a relufied GPT whose FFN dominates the weights
(d_model 2048, d_ff 8192, 2 layers, fp32), dense vs sparsified, prefill excluded.
No masks from a real ReLU LLM are used (none is available offline).

``--quick``: batch 1 and 4, sparsity 0 and 0.9, fp32, 8 decoded tokens (about a minute).
"""
from __future__ import annotations

import argparse

from fastload.cli import describe
import copy
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastload.bench._common import write_result
from fastload.ffn.relufy import activation_sparsity, sparsify_ffn
from fastload.ffn.sparse import SparseReLUFFN, round_robin, sparse_down_cpu

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _interleaved(fns: dict, reps: int, warm_below_s: float = 0.2,
                 budget_s: float = float("inf")) -> dict:
    """Median seconds per function, the functions run round-robin (side by side in time).

    A call slower than ``warm_below_s`` is not warmed up twice. The number of repetitions is
    cut (never below 1) so that the timed round-robins fit in ``budget_s``, estimated from
    the warm-up pass: groups of calls lasting seconds (batch 64, torch's bf16 GEMM) average
    over scheduler noise within one call, and this keeps the default sweep affordable.
    """
    t_round = 0.0
    for f in fns.values():
        t0 = time.perf_counter()
        f()
        dt = time.perf_counter() - t0
        if dt < warm_below_s:
            t0 = time.perf_counter()
            f()
            dt = time.perf_counter() - t0
        t_round += dt
    if math.isfinite(budget_s):
        reps = max(1, min(reps, int(budget_s // max(t_round, 1e-9))))
    return {k: statistics.median(v) for k, v in round_robin(fns, reps).items()}


def memory_bandwidth_gbs(mib: int = 256, reps: int = 5) -> float:
    """Copy bandwidth (read + write bytes / s) with torch's threads."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    t = _interleaved({"c": lambda: dst.copy_(src)}, reps)["c"]
    return 2 * src.numel() * 4 / t / 1e9


def read_bandwidth_gbs(mib: int = 256, reps: int = 5) -> float:
    """Read-only streaming bandwidth (bytes / s) of a sum over a large fp32 tensor."""
    src = torch.ones(mib * 2**20 // 4)
    t = _interleaved({"s": lambda: src.sum()}, reps)["s"]
    return src.numel() * 4 / t / 1e9


def _variant(ffn: SparseReLUFFN, name: str, lin: nn.Linear, bias: torch.Tensor) -> SparseReLUFFN:
    """Shallow copy of ``ffn`` whose ``name`` projection has its own bias (same weight)."""
    new = copy.copy(ffn)
    new._modules = dict(ffn._modules)
    shifted = nn.Linear(lin.in_features, lin.out_features, bias=True, device="meta")
    shifted.weight = lin.weight
    shifted.bias = nn.Parameter(bias, requires_grad=False)
    new._modules[name] = shifted
    return new


def sweep(d_model, d_ff, kinds, dtypes, batches, sparsities, reps, bw, log, budget_s=float("inf")):
    """Per (dtype, batch) group the dense baselines run once per repetition, round-robin with
    every sparse variant of the group (the dense time does not depend on the sparsity)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for dname in dtypes:
        dt = DT[dname]
        esz = torch.finfo(dt).bits // 8
        up = nn.Linear(d_model, d_ff, dtype=dt)
        gate = nn.Linear(d_model, d_ff, dtype=dt)
        down = nn.Linear(d_ff, d_model, dtype=dt)
        for m in (up, gate, down):
            m.requires_grad_(False)
            with torch.no_grad():
                m.weight.normal_(0, 1 / math.sqrt(m.in_features), generator=g)
                m.bias.zero_()
        ffn_plain = SparseReLUFFN.from_dense(up, down)
        ffn_gated = SparseReLUFFN.from_dense(up, down, gate=gate)
        for B in batches:
            x = torch.randn(B, d_model, generator=g).to(dt)
            fns, meta = {}, {}
            fns["down/dense"] = lambda: F.linear(act0, down.weight)
            act0 = torch.rand(B, d_ff, generator=g).to(dt)
            for s in sparsities:
                # Down-projection alone, independent random masks per row.
                act = torch.rand(B, d_ff, generator=g) + 0.1
                act[torch.rand(B, d_ff, generator=g) < s] = 0
                act = act.to(dt)
                n_act = int((act != 0).any(0).sum())
                fns[f"down/{s}"] = (lambda a: lambda: ffn_plain.down_proj(a))(act)
                with torch.no_grad():
                    ffn_plain.down_proj(act)
                meta[("down", s)] = {"u": n_act / d_ff, "n_active": n_act,
                                     "sparse_path": ffn_plain.last_active is not None}
            for kind in kinds:
                base = ffn_gated if kind == "gated" else ffn_plain

                def dense_ffn(kind=kind):
                    h = F.linear(x, up.weight, up.bias)
                    a = torch.relu(F.linear(x, gate.weight, gate.bias)) * h if kind == "gated" else torch.relu(h)
                    return F.linear(a, down.weight, down.bias)
                fns[f"ffn_{kind}/dense"] = dense_ffn
                for s in sparsities:
                    # The pattern is set through the up (gate) bias, the same for every row,
                    # with union fraction 1 - s^B as for independent neurons.
                    u_ffn = 1 - s ** B
                    k = int(round(u_ffn * d_ff))
                    on = torch.zeros(d_ff, dtype=torch.bool)
                    on[torch.randperm(d_ff, generator=g)[:k]] = True
                    shift = torch.where(on, 20.0, -20.0).to(dt)
                    if kind == "gated":
                        v = _variant(base, "gate", gate, shift)
                        v = _variant(v, "up", up, torch.full((d_ff,), 20.0, dtype=dt))
                    else:
                        v = _variant(base, "up", up, shift)
                    with torch.no_grad():
                        v(x)  # plan measured (once per dtype / batch bucket) outside timing
                    fns[f"ffn_{kind}/{s}"] = (lambda m: lambda: m(x))(v)
                    meta[(f"ffn_{kind}", s)] = {"u": u_ffn, "module": v}
            with torch.no_grad():
                t0 = time.perf_counter()
                t = _interleaved(fns, reps, budget_s=budget_s)
                print(f"group {dname} batch {B}: {time.perf_counter() - t0:.1f} s", flush=True)
            for s in sparsities:
                m = meta[("down", s)]
                ts, td = t[f"down/{s}"], t["down/dense"]
                row = {"dtype": dname, "batch": B, "sparsity": s, "part": "down", "u": m["u"],
                       "ceiling": (1 / m["u"]) if m["u"] > 0 else None, "dense_ms": td * 1e3,
                       "sparse_ms": ts * 1e3, "speedup": td / ts,
                       "sparse_gbs": m["n_active"] * d_model * esz / ts / 1e9,
                       "dense_gbs": d_ff * d_model * esz / td / 1e9, "bandwidth_gbs": bw,
                       "threads": _threads(ffn_plain, B), "sparse_path": m["sparse_path"]}
                rows.append(row)
                log(row)
                for kind in kinds:
                    m = meta[(f"ffn_{kind}", s)]
                    ts, td = t[f"ffn_{kind}/{s}"], t[f"ffn_{kind}/dense"]
                    n_proj = 3 if kind == "gated" else 2
                    row = {"dtype": dname, "batch": B, "sparsity": s, "part": f"ffn_{kind}",
                           "u": m["u"], "ceiling": n_proj / (n_proj - 1 + m["u"]),
                           "dense_ms": td * 1e3, "sparse_ms": ts * 1e3, "speedup": td / ts,
                           "sparse_path": m["module"].last_active is not None}
                    rows.append(row)
                    log(row)
    return rows


def _threads(ffn: SparseReLUFFN, B: int):
    """Thread count of the module's own plan for this batch (measured on first use)."""
    return ffn._plan(B)["threads"]


class _Attn(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.qkv, self.proj, self.h = nn.Linear(d, 3 * d), nn.Linear(d, d), heads

    def forward(self, x, cache):
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        if cache:
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        cache[:] = [k, v]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


class _Block(nn.Module):
    def __init__(self, d, h, heads):
        super().__init__()
        self.ln1, self.ln2, self.attn = nn.LayerNorm(d), nn.LayerNorm(d), _Attn(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d))

    def forward(self, x, cache):
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A GPT-style decoder with ReLU MLPs (already relufied) and a KV cache."""

    def __init__(self, vocab=1000, d=2048, h=8192, layers=2, heads=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([_Block(d, h, heads) for _ in range(layers)])
        self.head = nn.Linear(d, vocab)

    def forward(self, ids, caches):
        x = self.emb(ids)
        for b, c in zip(self.blocks, caches):
            x = b(x, c)
        return self.head(x)


def decode_tokens_per_s(model, prompt, n_new, reps):
    """A function that prefills ``prompt`` (untimed) and returns (tokens, decode seconds)."""
    @torch.no_grad()  # on run itself: a decorator on the factory would not cover the calls
    def run():
        caches = [[] for _ in model.blocks]
        logits = model(prompt, caches)
        ids = logits[:, -1:].argmax(-1)
        out = []
        t0 = time.perf_counter()
        for _ in range(n_new):
            logits = model(ids, caches)
            ids = logits[:, -1:].argmax(-1)
            out.append(ids)
        return torch.cat(out, 1), time.perf_counter() - t0
    return run


def e2e(reps, n_new, sparsity_bias, log, d=2048, layers=2):
    """Decode tokens/s, dense vs sparsified, of a GPT whose FFN dominates decode time.

    d_ff = 4 d: per layer the FFN holds 8 d^2 weights against 4 d^2 in attention (2/3 of
    the bytes read per token), as in real LLMs; the vocabulary is small so the head does
    not dominate. At FFN sparsity s the ceiling is 12 / (4 + 4 + 4 (1 - s)) per layer.
    """
    torch.manual_seed(0)
    model = TinyGPT(d=d, h=4 * d, layers=layers, heads=max(1, d // 128)).eval()
    with torch.no_grad():
        for b in model.blocks:  # shift the up bias so ~90% of the ReLU outputs are zero
            b.mlp[0].bias.fill_(-sparsity_bias)
    prompt = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    sp = activation_sparsity(model, prompt, forward=lambda m, x: m(x, [[] for _ in m.blocks]))
    sparse_model = sparsify_ffn(copy.deepcopy(model))
    dense_run = decode_tokens_per_s(model, prompt, n_new, reps)
    sparse_run = decode_tokens_per_s(sparse_model, prompt, n_new, reps)
    same = torch.equal(dense_run()[0], sparse_run()[0])  # also the warm-up
    ts = {"dense": [], "sparse": []}
    for _ in range(reps):  # interleaved; only the decode steps are timed (prefill excluded)
        ts["dense"].append(dense_run()[1])
        ts["sparse"].append(sparse_run()[1])
    t = {k: statistics.median(v) for k, v in ts.items()}
    s_mean = statistics.mean(s["sparsity"] for s in sp.values())
    row = {"model": f"TinyGPT d={d} ffn={4 * d} layers={layers} fp32 (random weights, up bias shifted)",
           "ceiling": 12 / (8 + 4 * (1 - s_mean)),
           "ffn_sparsity": statistics.mean(s["sparsity"] for s in sp.values()),
           "new_tokens": n_new, "dense_tokens_per_s": n_new / t["dense"],
           "sparse_tokens_per_s": n_new / t["sparse"], "speedup": t["dense"] / t["sparse"],
           "same_tokens": same}
    log(row)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastload bench --ffn", description=describe(__doc__))
    p.add_argument("--d-model", type=int, default=4096)
    p.add_argument("--d-ff", type=int, default=11008)
    p.add_argument("--kinds", default="plain,gated")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--batches", default="1,4,16,64")
    p.add_argument("--sparsity", default="0,0.5,0.7,0.9,0.95,0.99")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--group-budget-s", type=float, default=12.0,
                   help="fewer repetitions (>= 1) for a (dtype, batch) group whose one round "
                        "of calls would not fit reps times in this many seconds")
    p.add_argument("--quick", action="store_true",
                   help="batch 1,4, sparsity 0,0.9, fp32, e2e with 8 tokens (about a minute)")
    p.add_argument("--e2e-tokens", type=int, default=32)
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--out-dir", default="benchmarks/results")
    a = p.parse_args(argv)
    if a.quick:
        a.batches, a.sparsity, a.dtypes, a.e2e_tokens = "1,4", "0,0.9", "fp32", 8
    log = lambda r: print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    bw = memory_bandwidth_gbs()
    rbw = read_bandwidth_gbs()
    print(f"copy bandwidth {bw:.1f} GB/s, read {rbw:.1f} GB/s, threads {torch.get_num_threads()}",
          flush=True)
    rows = sweep(a.d_model, a.d_ff, a.kinds.split(","), a.dtypes.split(","),
                 [int(b) for b in a.batches.split(",")], [float(s) for s in a.sparsity.split(",")],
                 a.reps, bw, log, a.group_budget_s)
    e2e_row = None if a.skip_e2e else e2e(a.reps, a.e2e_tokens, 0.74, log)
    from fastload.ffn import sparse
    path = write_result("ffn", {"d_model": a.d_model, "d_ff": a.d_ff, "threads": torch.get_num_threads(),
                                "bandwidth_gbs": bw, "read_bandwidth_gbs": rbw, "rows": rows, "e2e": e2e_row,
                                "plans": {str(k): v for k, v in sparse._CROSSOVER.items()},
                                "quick": a.quick, "reps": a.reps, "group_budget_s": a.group_budget_s,
                                "wall_s": time.perf_counter() - t_start,
                                "gpu": "not measured (no GPU in this run)"}, a.out_dir)
    print("wrote", path)
    return 0
