"""``fastload bench --gpu``: every GPU figure of fastload in one short run (< 5 minutes on one
H100/H200-class GPU), written to one JSON after every section so that a run cut short still
leaves what it measured.

Sections, in order (each time-boxed; a section that fails records its error and the run
goes on):

1. ``env``: device name, multiprocessors, torch/triton versions, git commit, date.
2. ``bandwidth``: device-to-device copy bandwidth (read + write bytes / time), the ceiling
   the memory-bound figures below are quoted against.
3. ``ffn``: sparse ReLU down-projection (``fastload.kernels.sparse_ffn``) against the dense
   product (``torch.nn.functional.linear``, cuBLAS), d_model 4096 x d_ff 11008, fp16 and
   bf16, batch 1-64, sparsity 0-0.99 (independent random masks per row, so the union of
   active rows is ``1 - s^B``), timed with ``triton.testing.do_bench_cudagraph`` (median;
   launch overhead excluded, as in a captured decode step). Per point: the bytes the product
   actually needs (active rows of W^T + activations + output) / time, as GB/s and as % of
   the copy bandwidth.
4. ``replay``: the Triton replay kernel (``fastload.kernels.replay``), images/s for a batch
   of 256 decoded 375x500 images -> 224x224, record mixes ``plain``, ``ra`` (RandAugment,
   2 ops) and ``ra_mix`` (+ erasing, MixUp/CutMix); the host-side packing alone; and the
   device output checked against the CPU references (max uint8 level difference).
5. ``loader``: ``ReinforcedLoader`` on the embedded photos (``fastload.bench.data``, a small
   set), CPU replay + copy vs device replay (``replay="device"``, when this fastload has it).
6. ``dali``: DALI's GPU pipeline only if its wheel imports (else "not available").

``--dry-run`` runs every section on the CPU in Triton's interpreter at tiny shapes (the
timings are meaningless; it proves the script runs end to end) and is part of the tests.

Run from a source checkout on a GPU machine::

    PYTHONPATH=. python3 -m fastload.cli bench --gpu --out /tmp/gpu.json
"""
from __future__ import annotations

import argparse

from fastload.cli import describe
import contextlib
import datetime
import hashlib
import importlib.machinery
import importlib.util
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# seconds per section (the whole run stays under ~5 minutes even if each one uses all of it)
BUDGET = {"bandwidth": 15, "ffn": 110, "replay": 70, "loader": 80, "dali": 5}
TOTAL_BUDGET_S = 290


def _ensure_kernels() -> None:
    """``fastload.kernels`` is the top-level ``kernels/`` folder, mapped by setup.py: in a
    source checkout run with ``PYTHONPATH=.`` (no install) map it here the same way."""
    try:
        import fastload.kernels  # noqa: F401
        return
    except ImportError:
        pass
    init = os.path.join(_ROOT, "kernels", "__init__.py")
    spec = importlib.util.spec_from_file_location(
        "fastload.kernels", init, submodule_search_locations=[os.path.dirname(init)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fastload.kernels"] = mod
    spec.loader.exec_module(mod)
    import fastload

    fastload.kernels = mod


def _ensure_native() -> str:
    """The C libraries are plain C-ABI objects (ctypes, no Python API): a build made for
    another CPython tag loads as well. Let ``_native.load`` find ``_<name>.cpython-3XX-...so``
    built for another version (a checkout built on one machine, run on another)."""
    import glob

    here = os.path.join(_ROOT, "fastload")
    sfx = set(importlib.machinery.EXTENSION_SUFFIXES)
    found = []
    for p in glob.glob(os.path.join(here, "_*.so")):
        name = os.path.basename(p)
        tail = name[name.index("."):]
        found.append(name)
        if tail not in sfx:
            importlib.machinery.EXTENSION_SUFFIXES.append(tail)
            sfx.add(tail)
    return ", ".join(sorted(found)) or "none"


class Run:
    """The result document, its deadline and its timer."""

    def __init__(self, out: str, dry: bool, commit: str | None):
        import torch

        self.out, self.dry = out, dry
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + TOTAL_BUDGET_S
        self.dev = "cuda" if (torch.cuda.is_available() and not dry) else "cpu"
        self.doc = {"benchmark": "gpu", "dry_run": dry,
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
                    "git_commit": commit or _git_commit(), "source_sha1": _source_sha1(),
                    "sections": {}}
        self.timing_notes = []

    # -- bookkeeping -------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def save(self) -> None:
        self.doc["elapsed_s"] = round(self.elapsed(), 2)
        d = os.path.dirname(os.path.abspath(self.out))
        os.makedirs(d, exist_ok=True)
        tmp = self.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.doc, f, indent=2, default=_jsonable)
            f.write("\n")
        os.replace(tmp, self.out)

    @contextlib.contextmanager
    def section(self, name: str):
        """Time-boxed section: yields (result dict, section deadline); errors are recorded."""
        res = {"status": "running"}
        self.doc["sections"][name] = res
        t = time.perf_counter()
        deadline = min(self.deadline, t + BUDGET.get(name, 30))
        print(f"[{self.elapsed():6.1f}s] {name} ...", flush=True)
        try:
            yield res, deadline
            res["status"] = "ok" if res.get("status") == "running" else res["status"]
        except Exception as e:  # noqa: BLE001 - one failing section must not lose the others
            res["status"] = "error"
            res["error"] = f"{type(e).__name__}: {e}"
            res["traceback"] = traceback.format_exc()[-3000:]
            print(f"  {name}: ERROR {res['error']}", flush=True)
        res["seconds"] = round(time.perf_counter() - t, 2)
        self.save()
        print(f"[{self.elapsed():6.1f}s] {name}: {res['status']} in {res['seconds']} s", flush=True)

    # -- timing --------------------------------------------------------------------------
    def bench(self, fn, graph: bool = True, rep: int = 10) -> float:
        """Median milliseconds of ``fn``: CUDA graph replay (launch overhead excluded) or
        CUDA events around eager calls; in a dry run a few wall-clock calls."""
        if self.dry:
            ts = []
            for _ in range(2):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            return statistics.median(ts) * 1e3
        import triton.testing as tt

        if graph:
            kw = _kwargs(tt.do_bench_cudagraph, rep=rep, return_mode="median")
            try:
                return _ms(tt.do_bench_cudagraph(fn, **kw))
            except Exception as e:  # noqa: BLE001 - fall back to events, and say so
                note = f"do_bench_cudagraph failed ({type(e).__name__}: {e}); eager do_bench used"
                if note not in self.timing_notes:
                    self.timing_notes.append(note)
                    print("  " + note, flush=True)
                import torch

                torch.cuda.synchronize()
        kw = _kwargs(tt.do_bench, warmup=max(5, rep // 4), rep=rep, return_mode="median")
        return _ms(tt.do_bench(fn, **kw))

    def sync(self):
        if self.dev == "cuda":
            import torch

            torch.cuda.synchronize()


def _kwargs(fn, **want):
    """Only the keyword arguments this Triton's function takes (3.6 .. 3.9 differ a little)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    return {k: v for k, v in want.items() if k in params}


def _ms(v) -> float:
    if isinstance(v, (list, tuple)):
        v = statistics.median(v)
    return float(v)


def _jsonable(o):
    try:
        return float(o)
    except (TypeError, ValueError):
        return str(o)


def _git_commit():
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_ROOT, capture_output=True, text=True,
                           timeout=5)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _source_sha1() -> str:
    """Hash of the GPU code measured (identifies it where the checkout has no .git)."""
    h = hashlib.sha1()
    for rel in ("kernels/sparse_ffn.py", "kernels/replay.py", "fastload/ffn/sparse.py",
                "fastload/bench/gpu.py", "fastload/loader/device_replay.py"):
        p = os.path.join(_ROOT, rel)
        if os.path.exists(p):
            with open(p, "rb") as f:
                h.update(rel.encode() + b"\0" + f.read())
    return h.hexdigest()


# --------------------------------------------------------------------------- sections
def section_env(run: Run, res: dict) -> None:
    import numpy
    import torch
    import triton

    res.update(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
               numpy=numpy.__version__, cuda=torch.version.cuda, device_type=run.dev,
               cpu_cores=os.cpu_count(), native_libraries=_ensure_native(),
               triton_interpret=os.environ.get("TRITON_INTERPRET", ""))
    if run.dev == "cuda":
        p = torch.cuda.get_device_properties(0)
        res.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                   multiprocessors=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                   l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
    else:
        res["device"] = "cpu (dry run: Triton interpreter, timings meaningless)"
    run.doc["device"] = res["device"]
    print(f"  device: {res['device']}; torch {torch.__version__}, triton {triton.__version__}", flush=True)


def section_bandwidth(run: Run, res: dict, deadline: float) -> None:
    import torch

    n = (1 << 30) if not run.dry else (1 << 20)  # 1 GiB: many times the 60 MB L2
    src = torch.ones(n // 4, dtype=torch.float32, device=run.dev)
    dst = torch.empty_like(src)
    ms = run.bench(lambda: dst.copy_(src), graph=False, rep=50)
    gbs = 2 * n / (ms * 1e-3) / 1e9
    res.update(bytes_copied=n, copy_ms=ms, copy_gbs=gbs, counting="read + write bytes")
    run.doc["copy_gbs"] = gbs
    del src, dst
    print(f"  copy bandwidth {gbs:,.0f} GB/s", flush=True)


def _masked_act(B, d_ff, s, dtype, dev, gen):
    import torch

    v = torch.rand(B, d_ff, generator=gen) + 0.25
    keep = torch.rand(B, d_ff, generator=gen) >= s
    return (v * keep).to(dtype).to(dev)


def section_ffn(run: Run, res: dict, deadline: float) -> None:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    _ensure_kernels()
    from fastload.ffn.sparse import SparseReLUFFN
    from fastload.kernels.sparse_ffn import sparse_down

    if run.dry:
        d_model, d_ff, batches, sps = 64, 176, [1, 4], [0.0, 0.9]
        dtypes = {"fp16": torch.float16, "fp32": torch.float32}  # the interpreter has no bf16
    else:
        d_model, d_ff, batches, sps = 4096, 11008, [1, 4, 16, 64], [0.0, 0.5, 0.9, 0.99]
        dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    copy_gbs = run.doc.get("copy_gbs")
    res.update(d_model=d_model, d_ff=d_ff, timing="do_bench_cudagraph median (ms)",
               masks="independent per row: union fraction 1 - s^B",
               bytes_needed="active rows of W^T + activations + output",
               ceiling="device-to-device copy bandwidth measured in this run", rows=[])
    gen = torch.Generator().manual_seed(0)
    for dname, dt in dtypes.items():
        up = nn.Linear(d_model, d_ff, bias=False, device=run.dev, dtype=dt)
        down = nn.Linear(d_ff, d_model, bias=False, device=run.dev, dtype=dt)
        ffn = SparseReLUFFN.from_dense(up, down).eval()
        w_t = ffn.down_t
        w = down.weight.detach()
        elt = torch.finfo(dt).bits // 8
        for B in batches:
            if time.perf_counter() > deadline:
                res["status"] = "partial (time box)"
                return
            dense_ms = None
            for s in sps:
                if time.perf_counter() > deadline:
                    res["status"] = "partial (time box)"
                    return
                act = _masked_act(B, d_ff, s, dt, run.dev, gen)
                n_act = int((act != 0).any(0).sum())
                with torch.no_grad():
                    ref = F.linear(act.float(), w.float())
                    got = sparse_down(act, w_t)
                    err = float((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
                    if dense_ms is None:
                        dense_ms = run.bench(lambda: F.linear(act, w))
                    t_sp = run.bench(lambda: sparse_down(act, w_t))
                    t_eager = run.bench(lambda: sparse_down(act, w_t), graph=False) if B == 1 else None
                    try:  # the module (crossover, sampling); its failure keeps the kernel rows
                        mod = ffn.down_proj(act)
                        err_mod = float((mod.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
                        t_mod = run.bench(lambda: ffn.down_proj(act))
                    except Exception as e:  # noqa: BLE001 - recorded in the row
                        err_mod, t_mod = None, None
                        res.setdefault("module_errors", []).append(f"{dname} B={B} s={s}: "
                                                                   f"{type(e).__name__}: {e}")
                io = (B * d_ff + B * d_model) * elt
                need = n_act * d_model * elt + io
                dense_bytes = d_ff * d_model * elt + io
                row = {"dtype": dname, "batch": B, "sparsity": s, "union_active_frac": n_act / d_ff,
                       "sparse_ms": t_sp, "module_ms": t_mod, "dense_ms": dense_ms,
                       "speedup_vs_dense": dense_ms / t_sp,
                       "module_speedup_vs_dense": None if t_mod is None else dense_ms / t_mod,
                       "ceiling_speedup": dense_bytes / need,
                       "sparse_gbs": need / (t_sp * 1e-3) / 1e9, "dense_gbs": dense_bytes / (dense_ms * 1e-3) / 1e9,
                       "max_rel_err": err, "module_max_rel_err": err_mod}
                if t_eager is not None:
                    row["sparse_eager_ms"] = t_eager
                if copy_gbs:
                    row["sparse_pct_of_copy_bw"] = 100 * row["sparse_gbs"] / copy_gbs
                    row["dense_pct_of_copy_bw"] = 100 * row["dense_gbs"] / copy_gbs
                res["rows"].append(row)
                pct = row.get("sparse_pct_of_copy_bw")
                print(f"  {dname} B={B:<3} s={s:<4} u={n_act / d_ff:.3f} sparse {t_sp * 1e3:8.1f} us "
                      f"dense {dense_ms * 1e3:8.1f} us x{row['speedup_vs_dense']:.2f} "
                      f"{'' if pct is None else f'{pct:.0f}% of copy bw'}", flush=True)
            run.save()
        del up, down, ffn, w_t, w
    if run.timing_notes:
        res["timing_notes"] = list(run.timing_notes)


def section_replay(run: Run, res: dict, deadline: float) -> None:
    import torch

    _ensure_kernels()
    from fastload.bench.triton_replay import _records, torch_baseline
    from fastload.kernels import replay as R

    if run.dry:
        B, size, (H, W) = 2, 8, (12, 10)
    else:
        B, size, (H, W) = 256, 224, (375, 500)
    res.update(batch=B, size=[size, size], src=[H, W], rows={})
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (B, H, W, 3), dtype=torch.uint8, generator=g).to(run.dev)
    hw = torch.tensor([[H, W]] * B, dtype=torch.int32)  # host: no device sync per call
    partners = torch.roll(torch.arange(B), 1)
    out = torch.empty(B, 3, size, size, device=run.dev)

    # correctness first: plain records against torch on the device, RandAugment records
    # against the CPU reference (a few images: the reference is slow)
    rec = _records(B, H, W, "plain")
    R.replay_batch(images, hw, rec, out)
    nchk = min(B, 16)
    ref = torch_baseline(images[:nchk], rec[:nchk], (size, size), R.IMAGENET_MEAN, R.IMAGENET_STD)
    level = 1 / 255 / min(R.IMAGENET_STD)
    res["check_plain_max_levels"] = float((out[:nchk] - ref).abs().max()) / level
    res.update(_check_ra(run, R, images, rec_size=(size, size), H=H, W=W))
    print(f"  checks: plain {res['check_plain_max_levels']:.2f} levels, RandAugment "
          f"{res.get('check_ra_max_levels')} levels", flush=True)
    run.save()

    for mode in ("plain", "ra", "ra_mix"):
        if time.perf_counter() > deadline:
            res["status"] = "partial (time box)"
            return
        rec = _records(B, H, W, mode, seed=1)
        fn = lambda: R.replay_batch(images, hw, rec, out, partner_rows=partners)  # noqa: E731
        fn()
        run.sync()
        ms = run.bench(fn, graph=False, rep=200)
        row = {"ms_per_batch": ms, "images_per_s": B / ms * 1e3,
               "timing": "do_bench median (CUDA events), whole replay_batch call incl. host packing"}
        prep = getattr(R, "prepare_replay", None)
        if prep is not None:
            plan = prep(rec, hw, (size, size), partner_rows=partners, device=images.device)
            run_fn = lambda: R.launch_replay(images, plan, out)  # noqa: E731
            row["kernels_ms"] = run.bench(run_fn, graph=True, rep=50)
            row["kernels_images_per_s"] = B / row["kernels_ms"] * 1e3
        t = time.perf_counter()
        n = 0
        while n < 5 or time.perf_counter() - t < 0.2:
            if prep is not None:
                prep(rec, hw, (size, size), partner_rows=partners, device=images.device)
            else:
                R.pack_params(rec, partners, "cpu")
                if mode != "plain":
                    R.pack_ra(rec, (size, size))
            n += 1
            if run.dry and n >= 2:
                break
        row["host_pack_ms"] = (time.perf_counter() - t) / n * 1e3
        res["rows"][mode] = row
        print(f"  {mode}: {row['images_per_s']:,.0f} img/s end to end "
              f"({ms:.2f} ms/batch of {B}); kernels {row.get('kernels_images_per_s', float('nan')):,.0f} "
              f"img/s; host packing {row['host_pack_ms']:.2f} ms", flush=True)
        run.save()
    del images, out


def _check_ra(run, R, images, rec_size, H, W):
    """RandAugment on the device vs the CPU reference: max level difference and the
    fraction of differing values, over a few images with every op drawn."""
    import numpy as np
    import torch

    from fastload.bench.triton_replay import _records
    from fastload.replay.reference import reference_uint8

    n = min(4, images.shape[0])
    sz = (min(rec_size[0], 64), min(rec_size[1], 64))
    rec = _records(n, H, W, "ra", seed=7)
    # every op once across the checked images
    ops = np.arange(14)
    for i in range(n):
        rec[i]["ra_ops"][:2] = (ops[(2 * i) % 14], ops[(2 * i + 1) % 14])
    got = R.render_uint8(images[:n], torch.tensor([[H, W]] * n), rec, sz).cpu()
    host = images[:n].cpu().numpy()
    ref = torch.stack([reference_uint8(host[i], rec[i], size=sz) for i in range(n)])
    d = (got.int() - ref.int()).abs()
    return {"check_ra_max_levels": int(d.max()), "check_ra_frac_differ": float((d > 0).float().mean()),
            "check_ra_size": list(sz), "check_ra_images": n}


def section_loader(run: Run, res: dict, deadline: float) -> None:
    import fastload
    from fastload.bench.data import build_all

    _ensure_kernels()
    _ensure_native()
    n = 8 if run.dry else 512
    bs = 4 if run.dry else 128
    size = 16 if run.dry else 224
    cache = os.path.join(tempfile.gettempdir(), "fastload_gpu_bench")
    t = time.perf_counter()
    paths = build_all(cache, n=n, num_augmentations=2, kinds=("ra_mix",), progress=False)
    res.update(images=n, batch=bs, size=size, build_s=round(time.perf_counter() - t, 2),
               policy="RRC + flip + RandAugment(2, 9) + MixUp/CutMix", rows={})
    print(f"  dataset of {n} photos ready in {res['build_s']} s", flush=True)
    ds = fastload.ReinforcedDataset(paths["ra_mix"])
    workers = min(8, os.cpu_count() or 1) if not run.dry else 0
    dev = run.dev
    has_device_replay = "replay" in inspect.signature(fastload.ReinforcedLoader.__init__).parameters
    variants = {"cpu_replay": {}}
    if has_device_replay:
        variants["device_replay"] = {"replay": "device"}
    else:
        res["device_replay"] = "not available in this fastload (no replay= argument)"
    first = {}
    for name, extra in variants.items():
        if time.perf_counter() > deadline:
            res["status"] = "partial (time box)"
            break
        kw = dict(batch_size=bs, shuffle=True, seed=0, num_workers=workers, image_size=size,
                  device=dev, pin_memory=dev == "cuda", drop_last=True)
        kw.update(extra)
        loader = fastload.ReinforcedLoader(ds, **kw)
        loader.set_epoch(0)
        for i, (x, _y, _t) in enumerate(loader):  # warm-up epoch (compiles, caches)
            if i == 0:
                first[name] = x[: min(8, bs)].float().cpu()
        run.sync()
        epochs, imgs, t = 0, 0, time.perf_counter()
        while True:
            loader.set_epoch(1 + epochs)
            for x, _y, _t in loader:
                imgs += x.shape[0]
            run.sync()
            epochs += 1
            el = time.perf_counter() - t
            if el > (0.05 if run.dry else 3.0) or time.perf_counter() > deadline:
                break
        res["rows"][name] = {"images_per_s": imgs / el, "epochs": epochs, "images": imgs,
                             "workers": workers, "seconds": el}
        print(f"  {name}: {imgs / el:,.0f} img/s ({imgs} images, {workers} workers)", flush=True)
        run.save()
    if "device_replay" in first and "cpu_replay" in first:
        from fastload.kernels.replay import IMAGENET_STD

        level = 1 / 255 / min(IMAGENET_STD)
        res["device_vs_cpu_first_batch_max_levels"] = float(
            (first["device_replay"] - first["cpu_replay"]).abs().max()) / level


def section_dali(run: Run, res: dict, deadline: float) -> None:
    try:
        import nvidia.dali as dali  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        res["status"] = "not available"
        res["reason"] = f"{type(e).__name__}: {e}"
        return
    res["status"] = "available, not measured"
    res["version"] = getattr(dali, "__version__", "?")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fastload bench --gpu", description=describe(__doc__))
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "gpu.json"))
    ap.add_argument("--dry-run", action="store_true",
                    help="run every section on the CPU in Triton's interpreter at tiny shapes")
    ap.add_argument("--commit", default=None, help="git commit to record (when the checkout has no .git)")
    ap.add_argument("--sections", nargs="+", default=["bandwidth", "ffn", "replay", "loader", "dali"],
                    choices=["bandwidth", "ffn", "replay", "loader", "dali"])
    args = ap.parse_args(argv)
    if args.dry_run:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("fastload bench --gpu --dry-run: set TRITON_INTERPRET=1 before Triton is imported",
                  file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        import torch

        if not torch.cuda.is_available():
            print("fastload bench --gpu: no CUDA device (use --dry-run to test the script on CPU)",
                  file=sys.stderr)
            return 2
    _ensure_native()
    run = Run(args.out, args.dry_run, args.commit)
    with run.section("env") as (res, _):
        section_env(run, res)
    fns = {"bandwidth": section_bandwidth, "ffn": section_ffn, "replay": section_replay,
           "loader": section_loader, "dali": section_dali}
    for name in args.sections:
        if time.perf_counter() > run.deadline:
            run.doc["sections"][name] = {"status": "skipped (total time box)"}
            run.save()
            continue
        with run.section(name) as (res, deadline):
            fns[name](run, res, deadline)
    run.doc["status"] = "done"
    run.save()
    bad = [k for k, v in run.doc["sections"].items() if v.get("status") == "error"]
    print(f"wrote {args.out} in {run.elapsed():.0f} s" + (f"; errors in {bad}" if bad else ""), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
