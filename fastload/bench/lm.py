"""``fastload bench --lm``: Dataset Decomposition vs concat-and-chunk vs packing on real text.

Corpus: the Python standard library's own ``.py`` files (one file = one document, real
long-tailed lengths), byte-level tokens (vocabulary 257, EOT 256). For each maximum length
(8192 and 2048 by default) it reports padding, cross-document attention, the attention cost
at equal tokens, training FLOPs per token for a stated model, and the rates of the
decomposition kernel, the loader and the sampler (one thread), next to the machine's memcpy
bandwidth measured in the same run. Writes ``benchmarks/results/lm.json`` and a PNG.
"""
from __future__ import annotations

import argparse

from fastload.cli import describe
import glob
import os
import shutil
import sysconfig
import tempfile
import time

import numpy as np

from ._common import Timer, write_result

# Stated model (OpenLM-1B-like): non-embedding params N = 12 * layers * d^2.
MODEL = {"name": "1B (24 layers, d_model 2048)", "layers": 24, "d_model": 2048}


def stdlib_corpus(limit_files=None):
    d = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in glob.glob(os.path.join(d, "**", "*.py"), recursive=True)
                   if "site-packages" not in f)[:limit_files]
    docs = []
    for f in files:
        with open(f, "rb") as fh:
            docs.append(np.frombuffer(fh.read(), np.uint8))
    lens = np.array([len(x) for x in docs], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    return np.concatenate(docs).astype(np.int32), offsets, d


def flops_per_token(ctx_eff: float) -> float:
    """Training FLOPs/token: 6N + 6 * layers * ctx * d (Kaplan et al. attention term, fwd+bwd)."""
    n = 12 * MODEL["layers"] * MODEL["d_model"] ** 2
    return 6 * n + 6 * MODEL["layers"] * ctx_eff * MODEL["d_model"]


def memcpy_bandwidth(lib, nbytes=256 << 20, reps=5, cpu=False):
    """Bytes/s of a one-thread memcpy (best of reps): wall clock, or CPU time with cpu=True
    (on a shared, loaded machine the wall clock also counts time spent waiting for a core)."""
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    lib.fl_dd_memcpy(dst.ctypes.data, dst.nbytes, src.ctypes.data, nbytes, 1)  # fault the pages in
    clock = time.process_time if cpu else time.perf_counter
    best = 1e9
    for _ in range(reps):
        t = clock()
        lib.fl_dd_memcpy(dst.ctypes.data, dst.nbytes, src.ctypes.data, nbytes, 1)
        best = max(min(best, clock() - t), 1e-9)
    return nbytes / best  # bytes/s, one thread


def run_case(tokens, offsets, max_k, tokens_per_step, work, min_k=8, cycles=1, seed=0):
    from fastload.batch.buckets import BucketBatchSampler
    from fastload.batch.packing import concat_and_chunk, cross_document_fraction, pack_documents
    from fastload.tokens.decompose import decompose
    from fastload.loader.decomposition import DecompositionLoader
    import torch

    L = 1 << max_k
    out = os.path.join(work, f"dd{max_k}")
    n_tok = int(tokens.size + offsets.size - 1)
    dec = {"wall": [], "cpu": [], "wall_fsync": []}
    for rep in range(3):  # alternate: without / with fsync (the rows forced to disk)
        for fsync in (False, True) if rep < 2 else (False,):
            tmp = f"{out}.{rep}{int(fsync)}"  # a fresh folder: deleting the last one is not timed
            c0 = time.process_time()
            with Timer() as t_dec:
                m = decompose((tokens, offsets), tmp, min_k, max_k, randomize=True, seed=seed, vocab_size=257,
                              eot_id=256, num_threads=1, progress=False, fsync=fsync)
            if os.path.isdir(out):
                shutil.rmtree(out)
            os.replace(tmp, out)
            if fsync:
                dec["wall_fsync"].append(t_dec.seconds)
            else:
                dec["wall"].append(t_dec.seconds)
                dec["cpu"].append(time.process_time() - c0)
    rows = {int(k): b["rows"] for k, b in m["buckets"].items()}
    kept = sum(r << k for k, r in rows.items())  # input tokens (targets excluded)
    dd_cost_per_token = sum(r * 4.0 ** k for k, r in rows.items()) / kept  # = token-weighted mean length
    # Baselines on the same documents.
    cc = concat_and_chunk(tokens, offsets, L, 256)
    cc_cross = cross_document_fraction(offsets, L)
    pk = pack_documents(tokens, offsets, L, 256)
    seg = pk["segment_lengths"].astype(np.float64)
    pk_cost_per_token = float((seg ** 2).sum() / seg.sum())  # varlen attention: sum s^2
    # Loader rate (one thread), int64 and int32 outputs, one full epoch each.
    rates, rates_cpu, wall_all, cpu_all = {}, {}, {}, {}
    for rep in range(3):  # interleaved rounds, medians
        for dt in (torch.int64, torch.int32):
            for reuse in (0, 2):
                loader = DecompositionLoader(out, tokens_per_step, cycles=cycles, seed=seed + rep, dtype=dt,
                                             num_threads=1, reuse_buffers=reuse)
                ntok = 0
                t, c = time.perf_counter(), time.process_time()
                for x, _ in loader:
                    ntok += x.numel()
                name = str(dt).replace("torch.", "") + ("_reuse_buffers" if reuse else "_fresh_tensors")
                wall_all.setdefault(name, []).append(ntok / (time.perf_counter() - t))
                cpu_all.setdefault(name, []).append(ntok / max(time.process_time() - c, 1e-9))
    for name in wall_all:
        rates[name], rates_cpu[name] = float(np.median(wall_all[name])), float(np.median(cpu_all[name]))
    # Sampler alone: per batch, the epoch plan included (several epochs, median).
    s = BucketBatchSampler(rows, tokens_per_step, cycles=cycles, seed=seed + 1)
    sw, sc = [], []
    for rep in range(5):
        s.set_epoch(rep)
        t, c = time.perf_counter(), time.process_time()
        nb = sum(1 for _ in s)
        sw.append((time.perf_counter() - t) / max(nb, 1) * 1e6)
        sc.append((time.process_time() - c) / max(nb, 1) * 1e6)
    sampler_us, sampler_cpu_us = float(np.median(sw)), float(np.median(sc))
    loader = DecompositionLoader(out, tokens_per_step, cycles=cycles, seed=seed)
    return {
        "max_length": L, "buckets": [min_k, max_k], "tokens_per_step": tokens_per_step,
        "rows_per_bucket": rows,
        "tokens_per_bucket": {k: r << k for k, r in rows.items()},
        "steps_per_epoch": len(loader), "schedule": loader.schedule().tolist(),
        "dropped_tokens": m["dropped_tokens"], "dropped_fraction": m["dropped_tokens"] / n_tok,
        "padding_fraction": {"decomposition": 0.0, "concat_chunk": 0.0,
                             "packing": pk["padding"] / pk["input_ids"].size},
        "cross_document_attention_fraction": {"decomposition": 0.0, "concat_chunk": cc_cross, "packing": 0.0},
        "attention_cost_per_token": {"decomposition": dd_cost_per_token, "concat_chunk": float(L),
                                     "packing_varlen": pk_cost_per_token},
        "attention_cost_ratio_dd_vs_cc": dd_cost_per_token / L,
        "flops_per_token": {"decomposition": flops_per_token(dd_cost_per_token),
                            "concat_chunk": flops_per_token(L),
                            "packing_varlen": flops_per_token(pk_cost_per_token)},
        "flops_ratio_dd_vs_cc": flops_per_token(dd_cost_per_token) / flops_per_token(L),
        "concat_chunk_rows": int(cc["rows"].shape[0]),
        "decompose_tokens_per_s": n_tok / float(np.median(dec["wall"])),
        "decompose_tokens_per_s_cpu": n_tok / float(np.median(dec["cpu"])),
        "decompose_tokens_per_s_with_fsync": n_tok / float(np.median(dec["wall_fsync"])),
        "loader_tokens_per_s": rates,
        "loader_tokens_per_s_cpu": rates_cpu,
        "sampler_us_per_batch": sampler_us,
        "sampler_cpu_us_per_batch": sampler_cpu_us,
    }


def plot(res, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return None
    cases = res["cases"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for c in cases:
        ks = sorted(int(k) for k in c["tokens_per_bucket"])
        ax[0].bar([k + (0.2 if c["max_length"] == 2048 else -0.2) for k in ks],
                  [c["tokens_per_bucket"][k] / 1e6 for k in ks], width=0.4, label=f"max {c['max_length']}")
    ax[0].set_xlabel("bucket k (length 2^k)")
    ax[0].set_ylabel("tokens (M)")
    ax[0].set_title("Decomposed stdlib corpus")
    ax[0].legend()
    for c in cases:
        sched = np.array(c["schedule"])
        w = max(1, len(sched) // 50)
        smooth = np.convolve(2.0 ** sched, np.ones(w) / w, mode="valid")
        ax[1].plot(smooth, label=f"pow2, max {c['max_length']}, cycles {res['cycles']}")
    ax[1].set_yscale("log", base=2)
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("sequence length (moving mean)")
    ax[1].set_title("Curriculum")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fastload bench --lm", description=describe(__doc__))
    ap.add_argument("--max-buckets", type=int, nargs="+", default=[13, 11], help="log2 of max lengths")
    ap.add_argument("--tokens-per-step", type=int, default=1 << 16)
    ap.add_argument("--cycles", type=int, default=1)
    ap.add_argument("--limit-files", type=int, default=None, help="use the first N stdlib files (quick runs)")
    ap.add_argument("--out-dir", default="benchmarks/results")
    a = ap.parse_args(argv)
    from fastload.tokens.decompose import _lib

    tokens, offsets, root = stdlib_corpus(a.limit_files)
    lens = np.diff(offsets)
    bw = memcpy_bandwidth(_lib())
    bw_cpu = memcpy_bandwidth(_lib(), cpu=True)
    res = {"corpus": {"source": root + "/**/*.py", "documents": int(lens.size), "tokens": int(tokens.size),
                      "tokenizer": "byte-level (vocab 257, EOT 256)",
                      "length_percentiles": {p: float(np.percentile(lens, p)) for p in (10, 50, 90, 99)}},
           "model": dict(MODEL, params_non_embedding=12 * MODEL["layers"] * MODEL["d_model"] ** 2),
           "flops_formula": "6N + 6 * layers * ctx_eff * d_model; ctx_eff = token-weighted mean sequence length "
                            "(decomposition: sum n_i 4^i / sum n_i 2^i; concat-chunk: L; packing: sum s^2 / sum s)",
           "cycles": a.cycles, "threads": 1,
           "memcpy_bytes_per_s_one_thread": bw,
           "memcpy_bytes_per_s_one_thread_cpu": bw_cpu,
           "timing_note": "rates are medians of interleaved rounds; *_cpu use CPU time (process_time), the "
                          "others wall time, which on a loaded shared machine includes waiting for a core; "
                          "decomposition is without fsync unless named (files left to the kernel's write-back)",
           "loader_bytes_per_token": {"int64": 4 + 16, "int32": 4 + 8},
           "load_average_at_start": os.getloadavg(),
           "targets": {"loader_tokens_per_s": 1e8, "decompose_tokens_per_s": 5e7, "sampler_us_per_batch": 20},
           "cases": []}
    with tempfile.TemporaryDirectory() as work:
        for mk in a.max_buckets:
            res["cases"].append(run_case(tokens, offsets, mk, max(a.tokens_per_step, 1 << mk), work,
                                         cycles=a.cycles))
    res["load_average_at_end"] = os.getloadavg()
    os.makedirs(a.out_dir, exist_ok=True)
    png = plot(res, os.path.join(a.out_dir, "lm.png"))
    res["plot"] = png
    path = write_result("lm", res, a.out_dir)
    for c in res["cases"]:
        print(f"max {c['max_length']}: attention cost DD/C&C {c['attention_cost_ratio_dd_vs_cc']:.3f}, "
              f"FLOPs/token DD/C&C {c['flops_ratio_dd_vs_cc']:.3f}, C&C cross-doc "
              f"{c['cross_document_attention_fraction']['concat_chunk']:.3f}, packing padding "
              f"{c['padding_fraction']['packing']:.3f}, dropped {c['dropped_fraction']:.4f}")
        lr = ", ".join(f"{k} {v / 1e6:.0f} ({c['loader_tokens_per_s_cpu'][k] / 1e6:.0f} CPU)"
                       for k, v in c["loader_tokens_per_s"].items())
        print(f"  decompose {c['decompose_tokens_per_s'] / 1e6:.1f} M tok/s wall, "
              f"{c['decompose_tokens_per_s_cpu'] / 1e6:.1f} CPU, {c['decompose_tokens_per_s_with_fsync'] / 1e6:.1f} "
              f"wall with fsync; loader M tok/s: {lr}; sampler {c['sampler_us_per_batch']:.1f} us/batch wall, "
              f"{c['sampler_cpu_us_per_batch']:.1f} CPU")
    print(f"memcpy (1 thread) {bw / 1e9:.2f} GB/s wall, {bw_cpu / 1e9:.2f} CPU; wrote {path}" +
          (f" and {png}" if png else ""))
    return 0
