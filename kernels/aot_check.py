"""Ahead-of-time compile check of every Triton kernel for sm_80 and sm_90, no GPU needed
(``python -m fastload.kernels.aot_check [--out PATH]``; run by tests/test_triton_compile.py).

The interpreter tests never run Triton's compiler, so a kernel can pass them and still fail
to compile, or compile into something that spills registers to local memory. Here each
launcher (``sparse_down``, ``replay_batch``, ``render_uint8``) runs on
``meta`` tensors with the kernels replaced by recorders; every recorded launch is
specialized exactly as the JIT would specialize it (``create_function_from_signature`` +
``JITFunction._pack_args``: constexprs, integer-1 specialization, 16-byte divisibility) and
compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` and
Triton's bundled ptxas, whose ``-v`` log gives registers and spills. Problems reported: a
compile error, spill traffic above ``SPILL_BOUND`` bytes per thread, a launch that leaves
``enable_fp_fusion`` to Triton's default (which changes between versions).

Needs the compiler, not the interpreter: run with ``TRITON_INTERPRET`` unset. Written
against Triton 3.9 (the version setup.py pins for tests); the JIT internals it uses are
private and may move in other versions.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
import time

import numpy as np
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from fastload.sample import params as P
from fastload.sample import schema as _S

SPILL_BOUND = 0  # bytes of spill stores + loads per thread
TARGETS = (90, 80)
D_FF, D_MODEL = 11008, 4096


class _Recorder:
    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.kernel, grid, args, kwargs))


@contextlib.contextmanager
def recording(module):
    """Replace every JIT kernel of ``module`` by a recorder; yields the launch log."""
    log, saved = [], {}
    for name, obj in list(vars(module).items()):
        if isinstance(obj, JITFunction):
            saved[name] = obj
            setattr(module, name, _Recorder(obj, log))
    try:
        yield log
    finally:
        for name, obj in saved.items():
            setattr(module, name, obj)


def _ffn_launches():
    from fastload.kernels import sparse_ffn as S

    out = []
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for B in (1, 4, 16, 64, 256):
            for bias in (False, True):
                act = torch.empty(B, D_FF, dtype=dt, device="meta")
                w_t = torch.empty(D_FF, D_MODEL, dtype=dt, device="meta")
                b = torch.empty(D_MODEL, dtype=dt, device="meta") if bias else None
                with recording(S) as log:
                    S.sparse_down(act, w_t, b, active_out=torch.empty(4096, dtype=torch.int32,
                                                                     device="meta") if bias else None)
                out += [(f"{dt}".replace("torch.", "") + f" B={B} bias={bias}", *x) for x in log]
    return out


def _records(n, ra: bool, mix: bool):
    rec = P.empty(n)
    rec["crop"] = (1000, 2000, 40000, 50000)
    rec["flags"] = P.FLAG_FLIP
    if ra:  # every op, including the three that need whole-image statistics
        for i in range(n):
            k = len(P.RA_OPS)
            rec[i]["ra_ops"][:2] = ((2 * i) % k, (2 * i + 1) % k)
            rec[i]["ra_mags"][:2] = (9, -9)
    if mix:
        rec["flags"] |= P.FLAG_MIXUP
        rec["mixup"] = P.Q // 3
        rec["erase"] = (1000, 1000, 9000, 9000)
    return rec


def _replay_launches():
    from fastload.kernels import replay as R

    out = []
    B, H, W = 14, 375, 500
    images = torch.empty(B, H, W, 3, dtype=torch.uint8, device="meta")
    hw = torch.tensor([[H, W]] * B, dtype=torch.int32)
    partners = torch.roll(torch.arange(B), 1)
    for interp in ("bilinear", "bicubic"):
        for odt in (torch.float32, torch.float16):
            for ra, mix in ((False, False), (True, True)):
                outt = torch.empty(B, 3, 224, 224, dtype=odt, device="meta")
                with recording(R) as log:
                    R.replay_batch(images, hw, _records(B, ra, mix), outt, partner_rows=partners,
                                   interpolation=interp)
                    if ra:
                        R.render_uint8(images, hw, _records(B, ra, False), (224, 224),
                                       interpolation=interp)
                out += [(f"{interp} {odt} ra={ra}".replace("torch.", ""), *x) for x in log]
        # v2 RandAugment semantics with extension records (float magnitudes, the partners'
        # own RandAugment rows and erase boxes, black erasing)
        ext = P.empty_ext(B)
        ext["ext"] = P.EXT_RA_FLOAT | P.EXT_PARTNER_AUG | P.EXT_ERASE_BLACK
        ext["ra_vals"][:, :2] = (0.3, -0.2)
        ext["pra_ops"][:, :2] = (P.RA_OPS.index("Contrast"), P.RA_OPS.index("Rotate"))
        ext["pra_vals"][:, :2] = (0.4, 10.0)
        ext["perase"] = (2000, 2000, 9000, 9000)
        outt = torch.empty(B, 3, 224, 224, dtype=torch.float32, device="meta")
        with recording(R) as log:
            R.replay_batch(images, hw, _records(B, True, True), outt, partner_rows=partners,
                           interpolation=interp, ra_semantics="v2", ext=ext)
        out += [(f"{interp} v2+ext ra=True", *x) for x in log]
        # pil RandAugment semantics (kernels/ra_pil.py): Pillow's arithmetic, with and without
        # the extension records' float magnitudes
        for ex in (None, ext):
            with recording(R) as log:
                R.replay_batch(images, hw, _records(B, True, True), outt, partner_rows=partners,
                               interpolation=interp, ra_semantics="pil", ext=ex)
            out += [(f"{interp} pil{'+ext' if ex is not None else ''} ra=True", *x) for x in log]
        # timm RandAugment semantics (kernels/ra_timm.py): every timm op (levels in the
        # extension records), BICUBIC and BILINEAR, negated and not
        timm_ids = list(_S.family_ops("timm"))
        trec = _records(B, False, True)
        text = P.empty_ext(B)
        text["ext"] = P.EXT_RA_FLOAT
        for i in range(B):
            trec[i]["ra_ops"][:2] = (timm_ids[(2 * i) % len(timm_ids)], timm_ids[(2 * i + 1) % len(timm_ids)])
            trec[i]["ra_mags"][:2] = (2, -1)
            text[i]["ra_vals"][:2] = (7.0, 4.5)
        with recording(R) as log:
            R.replay_batch(images, hw, trec, outt, partner_rows=partners, interpolation=interp,
                           ra_semantics="timm", ext=text, ra_fill=(124, 116, 104))
        out += [(f"{interp} timm+ext ra=True", *x) for x in log]
        # the loader's device replay: crop windows of DCT-scaled decodes, partners after the
        # records (fractional crops, FRAC=True)
        outt = torch.empty(B, 3, 224, 224, dtype=torch.float32, device="meta")
        imgs = torch.empty(2 * B, 120, 160, 3, dtype=torch.uint8, device="meta")
        frac = np.tile(np.array([0.25, 100.5, 0.5, 150.0] * 2, np.float32), (B, 1))
        for ra, ex in ((False, None), (True, None), (True, ext)):
            with recording(R) as log:
                plan = R.prepare_replay(_records(B, ra, True), torch.tensor([[120, 160]] * (2 * B)),
                                        (224, 224), partner_rows=torch.arange(B, 2 * B),
                                        device="meta", interpolation=interp, frac=frac, ext=ex)
                R.launch_replay(imgs, plan, outt)
            out += [(f"{interp} device-replay ra={ra}{' ext' if ex is not None else ''}", *x) for x in log]
    return out


def _spec(kernel, args, kwargs, backend):
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, sig, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
    return options, sig, constexprs, attrs


_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _compile_all(launches):
    rows, seen = [], set()
    for cc in TARGETS:
        target = GPUTarget("cuda", cc, 32)
        backend = make_backend(target)
        for label, kernel, grid, args, kwargs in launches:
            options, sig, constexprs, attrs = _spec(kernel, args, dict(kwargs), backend)
            key = (cc, kernel.__name__, repr(sorted(sig.items())), repr(sorted(constexprs.items())),
                   repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
            if key in seen:
                continue
            seen.add(key)
            buf = io.StringIO()
            t = time.perf_counter()
            with contextlib.redirect_stdout(buf):
                ck = triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=target,
                                    options=options.__dict__)
            log = buf.getvalue()
            regs = _RE_REGS.search(log)
            sp = _RE_SPILL.search(log)
            assert regs and sp, f"no ptxas report for {kernel.__name__}: {log[-500:]}"
            rows.append({
                "kernel": kernel.__name__, "sm": cc, "config": label,
                "constexprs": {str(sig_k): v for sig_k, v in
                               zip([list(sig)[p[0]] for p in constexprs], constexprs.values())},
                "grid": [int(g) for g in grid] if isinstance(grid, tuple) else str(grid),
                "num_warps": options.num_warps, "num_stages": options.num_stages,
                "enable_fp_fusion": options.enable_fp_fusion,
                "registers": int(regs.group(1)), "stack_frame_bytes": int(sp.group(1)),
                "spill_store_bytes": int(sp.group(2)), "spill_load_bytes": int(sp.group(3)),
                "shared_bytes": int(ck.metadata.shared), "compile_s": round(time.perf_counter() - t, 3)})
    return rows


def check() -> dict:
    """Record, compile and summarize; returns the result document (``problems`` empty when
    everything compiled within the bounds)."""
    from triton import knobs

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("aot_check needs Triton's compiler: unset TRITON_INTERPRET")
    launches = _ffn_launches() + _replay_launches()
    old = knobs.nvidia.dump_ptxas_log, os.environ.get("TRITON_CACHE_DIR")
    knobs.nvidia.dump_ptxas_log = True
    with tempfile.TemporaryDirectory() as cache:
        # a fresh cache: a cached kernel skips ptxas, and its log is the figure we want
        os.environ["TRITON_CACHE_DIR"] = cache
        try:
            t = time.perf_counter()
            rows = _compile_all(launches)
            seconds = time.perf_counter() - t
        finally:
            knobs.nvidia.dump_ptxas_log = old[0]
            if old[1] is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = old[1]
    problems = []
    for name in sorted({k.__name__ for _, k, _, _, kw in launches if "enable_fp_fusion" not in kw}):
        problems.append(f"{name}: launched without an explicit enable_fp_fusion")
    for r in rows:
        spill = r["spill_store_bytes"] + r["spill_load_bytes"]
        if spill > SPILL_BOUND:
            problems.append(f"{r['kernel']} sm_{r['sm']} [{r['config']}]: {spill} bytes of spills")
    return {"triton": triton.__version__, "targets": [f"sm_{c}" for c in TARGETS],
            "spill_bound_bytes": SPILL_BOUND, "compiles": len(rows), "launches_recorded": len(launches),
            "compile_seconds": round(seconds, 1),
            "method": "launchers run on meta tensors, launches specialized as the JIT does, "
                      "triton.compile(ASTSource) for GPUTarget('cuda', cc, 32), ptxas -v log",
            "problems": problems, "kernels": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=os.path.join("benchmarks", "results"))
    args = ap.parse_args(argv)
    from fastload._results import write_result

    doc = check()
    path = write_result("triton_compile", doc, args.out_dir)
    by = {}
    for r in doc["kernels"]:
        k = (r["kernel"], r["sm"])
        by[k] = max(by.get(k, 0), r["registers"])
    for (k, sm), regs in sorted(by.items()):
        print(f"{k:<24} sm_{sm}: up to {regs} registers")
    print(f"{doc['compiles']} compiles in {doc['compile_seconds']} s; wrote {path}")
    for p in doc["problems"]:
        print("PROBLEM:", p)
    return 1 if doc["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())


