"""Small reinforced datasets and token buckets built without a teacher, plus the mutations
the format-safety tests and fuzzers apply to them (seeded: every case is reproducible)."""
from __future__ import annotations

import json
import os

import numpy as np

from fastload.format import manifest as mf
from fastload.format.shards import encode_augs, encode_targets
from fastload.format.writer import write_shard_file
from fastload.sample import params as P
from fastload.sample.policy import AugmentPolicy


def records(rng, n, hw, all_hw):
    a = P.empty(n)
    H, W = hw
    for r in range(n):
        bh, bw = rng.integers(1, H + 1), rng.integers(1, W + 1)
        a["crop"][r] = P.pixels_to_box(rng.integers(0, H - bh + 1), rng.integers(0, W - bw + 1), bh, bw, H, W)
    a["flags"] = rng.integers(0, 16, n)
    a["ra_ops"][:, :2] = rng.integers(0, 14, (n, 2))
    a["ra_mags"][:, :2] = rng.integers(-30, 31, (n, 2))
    a["partner"] = np.where(rng.random(n) < 0.5, rng.integers(0, len(all_hw), n), -1)
    a["mixup"] = rng.integers(0, 65536, n)
    return a


def make_dataset(root: str, rows=(3, 2), n: int = 4, k: int = 3, classes: int = 10, seed: int = 0,
                 image_bytes: int = 8, label_classes: int = 0) -> str:
    """A complete classification dataset (tiny fake images: the reader never decodes them)."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    total = sum(rows)
    all_hw = rng.integers(8, 60, (total, 2))
    shards, first = [], 0
    for index, nr in enumerate(rows):
        cols = {name: [] for name in ("id", "key", "hash", "orig_h", "orig_w", "src_h", "src_w", "label",
                                      "image", "augs", "targets")}
        for r in range(first, first + nr):
            h, w = (int(v) for v in all_hw[r])
            ids = np.stack([rng.permutation(classes)[:k] for _ in range(n)])
            probs = np.sort(rng.dirichlet(np.ones(k + 2), n)[:, :k], 1)[:, ::-1]
            cols["id"].append(r)
            cols["key"].append(f"c{r % 3}/{r}.jpg")
            cols["hash"].append(rng.bytes(16))
            cols["orig_h"].append(h)
            cols["orig_w"].append(w)
            cols["src_h"].append(h)
            cols["src_w"].append(w)
            cols["label"].append(int(rng.integers(0, label_classes or classes)))
            cols["image"].append(rng.bytes(image_bytes))
            cols["augs"].append(encode_augs(records(rng, n, (h, w), all_hw), (h, w), (32, 32), all_hw))
            cols["targets"].append(encode_targets(ids, probs))
        info = write_shard_file(root, index, cols, "classification")
        info["first_row"] = first
        shards.append(info)
        first += nr
    m = {"format": mf.FORMAT_NAME, "schema_version": mf.SCHEMA_VERSION, "kind": "classification",
         "num_rows": total, "num_augmentations": n, "topk": k, "num_classes": classes, "seeds": [seed],
         "policy": AugmentPolicy(size=(32, 32)).to_dict(), "replay": {"image_size": [32, 32], "box_grid": [32, 32]},
         "teachers": [{"name": "t"}], "num_shards": len(rows), "complete": True, "shards": shards, "skipped": []}
    mf.write_manifest(root, m)
    return root


def flip_bit(path: str, pos: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([b ^ (1 << bit)]))


def read_everything(ds) -> None:
    """Every accessor a loader or user calls, over every row."""
    N = len(ds)
    idx = np.arange(N)
    ds.gather(idx, np.arange(N) % ds.num_augmentations)
    for i in range(N):
        ds.record(i)
        ds.target(i, ds.num_augmentations - 1)


def mutate_blob(rng, blob: bytes) -> bytes:
    """One random corruption of a stored blob: bit flips, truncation, splice, forged u32."""
    b = bytearray(blob)
    kind = rng.integers(0, 5)
    if kind == 0 and b:
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(0, len(b)))] ^= 1 << int(rng.integers(0, 8))
    elif kind == 1:
        b = b[:int(rng.integers(0, len(b) + 1))]
    elif kind == 2 and len(b) > 4:
        p = int(rng.integers(0, len(b) - 4))
        b[p:p + 4] = int(rng.choice([0, 1, 2**31 - 1, 2**32 - 1, int(rng.integers(0, 2**32))])).to_bytes(4, "little")
    elif kind == 3:
        p = int(rng.integers(0, len(b) + 1))
        b = b[:p] + bytearray(rng.bytes(int(rng.integers(1, 16)))) + b[p:]
    else:
        b = bytearray(rng.bytes(int(rng.integers(0, 64))))
    return bytes(b)


_BAD_VALUES = [None, True, -1, 0, 2**31, 10**30, 1.5, float("nan"), "x", [], {}, [1, 2, 3], {"a": 1}]


def mutate_manifest(rng, m: dict) -> dict:
    """One random corruption of a manifest dict: deleted field, wrong type, huge number."""
    m = json.loads(json.dumps(m))
    targets = [(m, key) for key in m]
    for s in m.get("shards") if isinstance(m.get("shards"), list) else []:
        if isinstance(s, dict):
            targets += [(s, key) for key in s]
    for key in m["replay"] if isinstance(m.get("replay"), dict) else []:
        targets.append((m["replay"], key))
    if not targets:
        return {"format": m.get("format")}
    d, key = targets[int(rng.integers(0, len(targets)))]
    op = rng.integers(0, 3)
    if op == 0:
        del d[key]
    elif op == 1:
        d[key] = _BAD_VALUES[int(rng.integers(0, len(_BAD_VALUES)))]
    else:
        v = d[key]
        if isinstance(v, bool):
            d[key] = not v
        elif isinstance(v, int):
            d[key] = v + [-1, 1, 2**40, -(2**40), 7][int(rng.integers(0, 5))]
        elif isinstance(v, str) and v:
            d[key] = v[:-1]
        elif isinstance(v, list) and v:
            d[key] = v[:-1]
        else:
            d[key] = None
    return m
