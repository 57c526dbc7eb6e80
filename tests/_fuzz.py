"""Seeded fuzzers of the stored formats (run by tests/test_fuzz_formats.py, in child processes).

Four input kinds: ``blobs`` (augmentation records, top-k targets and embedding blobs),
``shards`` (Arrow shard files: bit flips, truncation, forged offsets, overwritten ranges),
``manifests`` (field deletions, wrong types, huge numbers) and ``buckets`` (a decomposed
dataset's manifest.json and bucket .npy files). Case ``i`` of a kind is a pure function of
(kind, i): a failure prints the case to replay with ``python tests/_fuzz.py KIND i 1``.

Every case must end in a result or a documented exception naming the file
(:class:`CorruptDataError`; for manifests also the documented ``ValueError`` of an
incomplete, newer or empty dataset, naming the dataset); anything else, a crash of the
child, a hang (parent's timeout) or a peak RSS over the bound fails the run.

    python tests/_fuzz.py KIND START COUNT   # prints one JSON line of outcome counts
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile
import traceback
import warnings
from collections import Counter

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _corpus import make_dataset, mutate_blob, mutate_manifest, records  # noqa: E402
from _rss import vm_hwm_mib  # noqa: E402

from fastload.format import record_ext as R  # noqa: E402
from fastload.format import shards as S  # noqa: E402
from fastload.format.manifest import MANIFEST, CorruptDataError  # noqa: E402

RSS_BOUND_MIB = 1024  # documented bound: decoders allocate only what the manifest's shapes imply


class Bad(AssertionError):
    pass


def _rng(kind: str, i: int) -> np.random.Generator:
    return np.random.default_rng([sum(map(ord, kind)), i])


def _restore(work: str, files: dict) -> None:
    """Rewrite only the files a previous case changed (writes dominate a case's time)."""
    for f, data in files.items():
        p = os.path.join(work, f)
        try:
            if os.path.getsize(p) == len(data):
                with open(p, "rb") as fh:
                    if fh.read() == data:
                        continue
        except OSError:
            pass
        with open(p, "wb") as fh:
            fh.write(data)


# ----------------------------------------------------------------------------- blobs
def _ext_v1(ext) -> bytes:
    """An augs_ext blob as the first release wrote it (record bytes shuffled, one frame)."""
    import zstandard

    n = len(ext)
    raw = np.ascontiguousarray(np.asarray(ext).view(np.uint8).reshape(n, 65).T).tobytes()
    return struct.pack("<BBHII", 1, 1, 0, n, len(raw)) + zstandard.ZstdCompressor(write_content_size=True).compress(raw)


class _Blobs:
    def __init__(self):
        rng = np.random.default_rng(0)
        self.all_hw = rng.integers(8, 600, (50, 2))
        self.hw = (375, 500)
        self.n, self.k = 6, 5
        self.augs = [S.encode_augs(records(rng, self.n, self.hw, self.all_hw), self.hw, (224, 224), self.all_hw)]
        raw = P_empty = records(rng, self.n, self.hw, self.all_hw)
        raw["crop"] = rng.integers(0, 65536, (self.n, 4))  # non-pixel crops: raw mode
        self.augs.append(S.encode_augs(P_empty, self.hw, (224, 224), self.all_hw))
        ids = np.stack([rng.permutation(1000)[:self.k] for _ in range(self.n)])
        probs = np.sort(rng.dirichlet(np.ones(8), self.n)[:, :self.k], 1)[:, ::-1]
        self.targets = [S.encode_targets(ids, probs), S.encode_targets(ids * 97 + 70000, probs)]
        self.emb = S.encode_array(rng.standard_normal((self.n, 16)).astype(np.float16))
        self.emb_raw = S.encode_array(np.zeros((self.n, 16), np.float16) + np.float16(1.5))
        ext = R.empty_ext(self.n)
        ext["ext"] = rng.integers(0, 16, self.n)
        ext["ra_vals"] = rng.standard_normal((self.n, 4))
        ext["pra_ops"][:, :2] = rng.integers(0, 14, (self.n, 2))
        ext["perase"][::2] = rng.integers(0, 65536, (len(ext[::2]), 4))
        ext["mixup_f"] = rng.random(self.n)
        self.ext = [R.encode_ext(ext), _ext_v1(ext)]

    def case(self, i: int) -> str:
        rng = _rng("blobs", i)
        which = i % 4
        try:
            if which == 0:
                blob = mutate_blob(rng, self.augs[i // 4 % 2])
                exp = self.n if i % 3 else None
                out = S.decode_augs(blob, self.hw, (224, 224), self.all_hw, exp)
                S.decode_aug_at(blob, int(rng.integers(0, len(out))) if len(out) else 0, self.hw, (224, 224),
                                self.all_hw, exp) if len(out) else None
            elif which == 1:
                blob = mutate_blob(rng, self.augs[i // 4 % 2])
                S.decode_augs_batch([self.augs[0], blob], [0, self.n - 1], np.array([self.hw, self.hw]),
                                    (224, 224), self.all_hw, self.n)
            elif which == 2:
                blob = mutate_blob(rng, self.targets[i // 4 % 2])
                S.decode_targets(blob, (self.n, self.k) if i % 3 else None)
                S.decode_targets_batch([blob, self.targets[0]], [self.n - 1, 0], self.n, self.k)
            else:
                blob = mutate_blob(rng, self.emb if i % 8 < 4 else self.emb_raw)
                S.decode_array(blob, (self.n, 16))
            if i % 2:  # the augs_ext blobs (field-tagged, and the first release's layout)
                blob = mutate_blob(rng, self.ext[i // 2 % 2])
                R.decode_ext(blob, self.n if i % 3 else None)
            return "ok"
        except CorruptDataError as e:
            if e.path is not None:
                raise Bad(f"blob error names a file: {e}")
            return "corrupt"


# ----------------------------------------------------------------------------- reinforced datasets
def _read_all(ds):
    from _corpus import read_everything

    read_everything(ds)
    ds.policy


class _Dataset:
    def __init__(self, work: str):
        self.src = make_dataset(os.path.join(work, "src"), rows=(2, 1), n=3, k=2)
        self.work = os.path.join(work, "w")
        shutil.copytree(self.src, self.work)
        self.files = {f: open(os.path.join(self.src, f), "rb").read() for f in os.listdir(self.src)}
        self.offsets = {}
        import pyarrow as pa

        for f, data in self.files.items():
            if f.endswith(".arrow"):
                buf = pa.py_buffer(data)
                b = pa.ipc.open_file(pa.BufferReader(buf)).get_batch(0)
                self.offsets[f] = [c.buffers()[1].address - buf.address for c in b.columns
                                   if pa.types.is_large_binary(c.type) or pa.types.is_large_string(c.type)]

    def restore(self):
        _restore(self.work, self.files)

    def outcome(self, fn, allowed_paths) -> str:
        from fastload.format.reader import ReinforcedDataset  # noqa: F401

        try:
            fn()
            return "ok"
        except CorruptDataError as e:
            if e.path is None or os.path.dirname(os.path.abspath(e.path)) != os.path.abspath(self.work):
                raise Bad(f"error does not name a file of the dataset: {e!r}")
            return "corrupt"
        except ValueError as e:
            if ("incomplete" in str(e) or "newer" in str(e)) and self.work in str(e):
                return "refused"
            raise

    def shard_case(self, i: int) -> str:
        from fastload.format.reader import ReinforcedDataset

        rng = _rng("shards", i)
        self.restore()
        names = sorted(f for f in self.files if f.endswith(".arrow"))
        f = names[i % len(names)]
        b = bytearray(self.files[f])
        op = rng.integers(0, 6)
        if op <= 1:  # bit flips
            for _ in range(int(rng.integers(1, 4))):
                b[int(rng.integers(0, len(b)))] ^= 1 << int(rng.integers(0, 8))
        elif op == 2:  # truncation
            b = b[:int(rng.integers(0, len(b)))]
        elif op == 3:  # a forged offset
            base = self.offsets[f][int(rng.integers(0, len(self.offsets[f])))]
            slot = int(rng.integers(0, 3))
            v = int(rng.choice([-1, 0, 1, 7, 255, 1 << 20, 1 << 40, 2**63 - 1, -(2**63)]))
            b[base + 8 * slot: base + 8 * slot + 8] = struct.pack("<q", v)
        elif op == 4:  # a range overwritten with random bytes
            p = int(rng.integers(0, len(b)))
            chunk = rng.bytes(int(rng.integers(1, 32)))
            b[p:p + len(chunk)] = chunk
        else:  # a forged u32/u64 anywhere (lengths, counts in the IPC metadata)
            p = int(rng.integers(0, len(b) - 8))
            b[p:p + 4] = int(rng.choice([0, 1, 2**31 - 1, 2**32 - 1])).to_bytes(4, "little")
        with open(os.path.join(self.work, f), "wb") as fh:
            fh.write(bytes(b))
        verify = ("lazy", "off")[i % 2]
        out = self.outcome(lambda: _read_all(ReinforcedDataset(self.work, verify=verify)), {f})
        if verify == "lazy" and out != "corrupt" and bytes(b) != self.files[f]:
            raise Bad(f"a changed shard was served with verification on ({out})")
        return out

    def manifest_case(self, i: int) -> str:
        from fastload.format.reader import ReinforcedDataset

        rng = _rng("manifests", i)
        self.restore()
        m = json.loads(self.files[MANIFEST])
        if i % 10 == 9:  # raw-text damage as well as structural edits
            text = bytearray(self.files[MANIFEST])
            for _ in range(int(rng.integers(1, 4))):
                text[int(rng.integers(0, len(text)))] = int(rng.integers(0, 256))
            data = bytes(text)
        else:
            for _ in range(int(rng.integers(1, 3))):
                m = mutate_manifest(rng, m)
            data = json.dumps(m).encode()
        with open(os.path.join(self.work, MANIFEST), "wb") as fh:
            fh.write(data)
        allowed = set(self.files)
        return self.outcome(lambda: _read_all(ReinforcedDataset(self.work)), allowed)


# ----------------------------------------------------------------------------- token buckets
class _Buckets:
    def __init__(self, work: str):
        from fastload.tokens.decompose import decompose

        rng = np.random.default_rng(0)
        lens = rng.integers(10, 300, 20)
        toks = rng.integers(0, 256, int(lens.sum())).astype(np.int32)
        self.src = os.path.join(work, "dd")
        decompose((toks, np.concatenate([[0], np.cumsum(lens)])), self.src, min_bucket=3, max_bucket=6,
                  vocab_size=257, eot_id=256, progress=False)
        self.files = {f: open(os.path.join(self.src, f), "rb").read() for f in os.listdir(self.src)}
        self.work = os.path.join(work, "ddw")
        shutil.copytree(self.src, self.work)

    def case(self, i: int) -> str:
        from fastload.loader.decomposition import DecompositionLoader

        rng = _rng("buckets", i)
        _restore(self.work, self.files)
        if i % 2 == 0:
            m = json.loads(self.files["manifest.json"])
            targets = [(m, k) for k in m]
            for k, b in m["buckets"].items():
                targets += [(m["buckets"], k), (b, "rows"), (b, "files")]
                targets += [(f, key) for f in b["files"] for key in f]
            d, key = targets[int(rng.integers(0, len(targets)))]
            op = int(rng.integers(0, 3))
            if op == 0:
                del d[key]
            elif op == 1:
                d[key] = [None, -1, 2**40, 1.5, "x", [], {}, "../x.npy", "/etc/passwd"][int(rng.integers(0, 9))]
            else:
                v = d[key]
                d[key] = (v + int(rng.choice([-1, 1, 1000]))) if isinstance(v, int) and not isinstance(v, bool) else None
            with open(os.path.join(self.work, "manifest.json"), "w") as fh:
                json.dump(m, fh)
        else:
            names = sorted(f for f in self.files if f.endswith(".npy"))
            f = names[int(rng.integers(0, len(names)))]
            b = bytearray(self.files[f])
            op = int(rng.integers(0, 4))
            if op == 0:  # the .npy header (magic, version, dict)
                p = int(rng.integers(0, min(128, len(b))))
                b[p] = int(rng.integers(0, 256))
            elif op == 1:
                b = b[:int(rng.integers(0, len(b)))]
            elif op == 2:
                b += rng.bytes(int(rng.integers(1, 64)))
            else:  # token bytes: no checksum in this format, served as stored
                if len(b) > 128:
                    b[int(rng.integers(128, len(b)))] ^= 0xFF
            with open(os.path.join(self.work, f), "wb") as fh:
                fh.write(bytes(b))
        try:
            loader = DecompositionLoader(self.work, tokens_per_step=1024, seed=i)
            for _ in loader:
                pass
            return "ok"
        except CorruptDataError as e:
            if e.path is None or not os.path.abspath(e.path).startswith(self.work):
                raise Bad(f"error does not name a file of the dataset: {e!r}")
            return "corrupt"
        except ValueError as e:
            if self.work in str(e) and any(m in str(e) for m in ("no rows", "schema version", "0 steps")):
                return "refused"
            raise



# ----------------------------------------------------------------------------- driver
def run(kind: str, start: int, count: int) -> dict:
    warnings.simplefilter("error", RuntimeWarning)
    work = tempfile.mkdtemp(prefix=f"fuzz-{kind}-")
    try:
        if kind == "blobs":
            fn = _Blobs().case
        elif kind in ("shards", "manifests"):
            ds = _Dataset(work)
            fn = ds.shard_case if kind == "shards" else ds.manifest_case
        elif kind == "buckets":
            fn = _Buckets(work).case
        else:
            raise SystemExit(f"unknown kind {kind}")
        counts: Counter = Counter()
        for i in range(start, start + count):
            try:
                counts[fn(i)] += 1
            except Exception as e:  # a wrong error type or a wrong outcome: report the case
                tb = traceback.format_exc(limit=6)
                return {"kind": kind, "failed_case": i, "error": f"{type(e).__name__}: {e}"[:500], "traceback": tb,
                        "counts": dict(counts)}
        peak = vm_hwm_mib()
        return {"kind": kind, "start": start, "count": count, "counts": dict(counts), "peak_rss_mib": peak,
                "rss_bound_mib": RSS_BOUND_MIB}
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    kind, start, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(run(kind, start, count)))
