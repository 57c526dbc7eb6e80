"""``fastload bench --ffn``: sparse ReLU FFN vs dense ``torch.nn.functional.linear`` on CPU.

Per (kind, dtype, batch, sparsity): the down-projection alone (random independent masks per
batch row, so the union fraction u grows with the batch) and the whole exact FFN
(SparseReLUFFN, crossover measured by the module, vs up/gate/down dense F.linear; the FFN's
activation pattern is set through the up (or gate) bias and is the same for every row, with
union fraction 1 - s^B as for independent neurons). Dense and sparse are timed interleaved,
medians reported, with the ceiling 1/u beside each speed-up and the achieved GB/s of the
sparse down-projection (bytes of the active rows) against the copy bandwidth measured in the
same run. Also: end-to-end tokens/s of a small relufied GPT-style decoder (KV cache), dense
vs sparsified. No masks from a real ReLU LLM are used (none is available offline).
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastload.bench._common import write_result
from fastload.ffn.relufy import activation_sparsity, sparsify_ffn
from fastload.ffn.sparse import SparseReLUFFN, sparse_down_cpu

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _interleaved(fns: dict, reps: int) -> dict:
    for f in fns.values():
        f()  # warm up
    ts = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def memory_bandwidth_gbs(mib: int = 256, reps: int = 5) -> float:
    """Copy bandwidth (read + write bytes / s) with torch's threads."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    t = _interleaved({"c": lambda: dst.copy_(src)}, reps)["c"]
    return 2 * src.numel() * 4 / t / 1e9


def sweep(d_model, d_ff, kinds, dtypes, batches, sparsities, reps, bw, log):
    g = torch.Generator().manual_seed(0)
    rows = []
    for dname in dtypes:
        dt = DT[dname]
        up = nn.Linear(d_model, d_ff, dtype=dt)
        gate = nn.Linear(d_model, d_ff, dtype=dt)
        down = nn.Linear(d_ff, d_model, dtype=dt)
        for m in (up, gate, down):
            m.requires_grad_(False)
            with torch.no_grad():
                m.weight.normal_(0, 1 / math.sqrt(m.in_features), generator=g)
        ffn_plain = SparseReLUFFN.from_dense(up, down)
        ffn_gated = SparseReLUFFN.from_dense(up, down, gate=gate)
        w_t, esz = ffn_plain.down_t, torch.finfo(dt).bits // 8
        for B in batches:
            x = torch.randn(B, d_model, generator=g).to(dt)
            for s in sparsities:
                # Down-projection alone, independent random masks per row.
                act = (torch.rand(B, d_ff, generator=g) + 0.1)
                act[torch.rand(B, d_ff, generator=g) < s] = 0
                act = act.to(dt)
                u = float((act != 0).any(0).float().mean())
                t = _interleaved({"dense": lambda: F.linear(act, down.weight),
                                  "sparse": lambda: sparse_down_cpu(act, w_t)}, reps)
                n_act = int((act != 0).any(0).sum())
                row = {"dtype": dname, "batch": B, "sparsity": s, "part": "down", "u": u,
                       "ceiling": (1 / u) if u > 0 else None, "dense_ms": t["dense"] * 1e3,
                       "sparse_ms": t["sparse"] * 1e3, "speedup": t["dense"] / t["sparse"],
                       "sparse_gbs": n_act * d_model * esz / t["sparse"] / 1e9,
                       "dense_gbs": d_ff * d_model * esz / t["dense"] / 1e9, "bandwidth_gbs": bw}
                rows.append(row)
                log(row)
                for kind in kinds:
                    ffn = ffn_gated if kind == "gated" else ffn_plain
                    u_ffn = 1 - s ** B
                    k = int(round(u_ffn * d_ff))
                    on = torch.zeros(d_ff, dtype=torch.bool)
                    on[torch.randperm(d_ff, generator=g)[:k]] = True
                    shift = (gate if kind == "gated" else up)
                    with torch.no_grad():
                        shift.bias.copy_(torch.where(on, 20.0, -20.0).to(dt))
                        if kind == "gated":
                            up.bias.fill_(20.0)  # so up(x) is never exactly zero

                    def dense_ffn():
                        h = F.linear(x, up.weight, up.bias)
                        a = torch.relu(F.linear(x, gate.weight, gate.bias)) * h if kind == "gated" else torch.relu(h)
                        return F.linear(a, down.weight, down.bias)

                    with torch.no_grad():
                        ffn(x)  # crossover measured (once per dtype / batch bucket) outside timing
                        t = _interleaved({"dense": dense_ffn, "sparse": lambda: ffn(x)}, reps)
                    n_proj = 3 if kind == "gated" else 2
                    ceil = n_proj / (n_proj - 1 + u_ffn)
                    row = {"dtype": dname, "batch": B, "sparsity": s, "part": f"ffn_{kind}", "u": u_ffn,
                           "ceiling": ceil, "dense_ms": t["dense"] * 1e3, "sparse_ms": t["sparse"] * 1e3,
                           "speedup": t["dense"] / t["sparse"], "sparse_path": ffn.last_active is not None}
                    rows.append(row)
                    log(row)
                with torch.no_grad():
                    up.bias.zero_()
                    gate.bias.zero_()
    return rows


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

    def __init__(self, vocab=1000, d=1024, h=4096, layers=4, heads=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([_Block(d, h, heads) for _ in range(layers)])
        self.head = nn.Linear(d, vocab)

    def forward(self, ids, caches):
        x = self.emb(ids)
        for b, c in zip(self.blocks, caches):
            x = b(x, c)
        return self.head(x)


@torch.no_grad()
def decode_tokens_per_s(model, prompt, n_new, reps):
    def run():
        caches = [[] for _ in model.blocks]
        logits = model(prompt, caches)
        ids = logits[:, -1:].argmax(-1)
        out = []
        for _ in range(n_new):
            logits = model(ids, caches)
            ids = logits[:, -1:].argmax(-1)
            out.append(ids)
        return torch.cat(out, 1)
    return run


def e2e(reps, n_new, sparsity_bias, log):
    torch.manual_seed(0)
    model = TinyGPT().eval()
    with torch.no_grad():
        for b in model.blocks:  # shift the up bias so ~90% of the ReLU outputs are zero
            b.mlp[0].bias.fill_(-sparsity_bias)
    prompt = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    sp = activation_sparsity(model, prompt, forward=lambda m, x: m(x, [[] for _ in m.blocks]))
    sparse_model = sparsify_ffn(copy.deepcopy(model))
    dense_run = decode_tokens_per_s(model, prompt, n_new, reps)
    sparse_run = decode_tokens_per_s(sparse_model, prompt, n_new, reps)
    same = torch.equal(dense_run(), sparse_run())
    t = _interleaved({"dense": dense_run, "sparse": sparse_run}, reps)
    row = {"model": "TinyGPT d=1024 ffn=4096 layers=4 (random weights, up bias shifted)",
           "ffn_sparsity": statistics.mean(s["sparsity"] for s in sp.values()),
           "new_tokens": n_new, "dense_tokens_per_s": n_new / t["dense"],
           "sparse_tokens_per_s": n_new / t["sparse"], "speedup": t["dense"] / t["sparse"],
           "same_tokens": same}
    log(row)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastload bench --ffn", description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=4096)
    p.add_argument("--d-ff", type=int, default=11008)
    p.add_argument("--kinds", default="plain,gated")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--batches", default="1,4,16,64")
    p.add_argument("--sparsity", default="0,0.5,0.7,0.9,0.95,0.99")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--e2e-tokens", type=int, default=32)
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--out-dir", default="benchmarks/results")
    a = p.parse_args(argv)
    log = lambda r: print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)  # noqa: E731
    bw = memory_bandwidth_gbs()
    print(f"copy bandwidth {bw:.1f} GB/s, threads {torch.get_num_threads()}", flush=True)
    rows = sweep(a.d_model, a.d_ff, a.kinds.split(","), a.dtypes.split(","),
                 [int(b) for b in a.batches.split(",")], [float(s) for s in a.sparsity.split(",")],
                 a.reps, bw, log)
    e2e_row = None if a.skip_e2e else e2e(a.reps, a.e2e_tokens, 0.74, log)
    from fastload.ffn import sparse
    path = write_result("ffn", {"d_model": a.d_model, "d_ff": a.d_ff, "threads": torch.get_num_threads(),
                                "bandwidth_gbs": bw, "rows": rows, "e2e": e2e_row,
                                "crossovers": {str(k): v for k, v in sparse._CROSSOVER.items()},
                                "gpu": "not measured (no GPU in this run)"}, a.out_dir)
    print("wrote", path)
    return 0
