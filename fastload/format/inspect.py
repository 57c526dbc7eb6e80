"""``fastload inspect DIR``: summarize a reinforced dataset and validate every shard's checksum."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict

import numpy as np

from fastload.format import manifest as mf


def _target_entropy(ids: np.ndarray, probs: np.ndarray, num_classes: int) -> np.ndarray:
    """Entropy (nats) of the "smooth"-densified targets, computed from the sparse form."""
    p = probs.astype(np.float64).clip(1e-12, None)
    rest = np.clip(1.0 - probs.astype(np.float64).sum(-1), 0, None)
    others = max(num_classes - probs.shape[-1], 1)
    h = -(p * np.log(p)).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        h += np.where(rest > 0, -rest * np.log(np.where(rest > 0, rest, 1) / others), 0.0)
    return h


def summarize(path: str, max_rows_for_entropy: int = 2000) -> Dict[str, Any]:
    """Counts, measured bytes per augmentation, classes, target entropy and checksum status."""
    import pyarrow as pa

    m = mf.read_manifest(path)
    shards = sorted(m["shards"], key=lambda s: s["index"])
    bad = []
    for s in shards:
        p = os.path.join(path, s["file"])
        if not os.path.isfile(p):
            bad.append({"file": s["file"], "problem": "missing"})
        elif os.path.getsize(p) != s["bytes"]:
            bad.append({"file": s["file"], "problem": f"size {os.path.getsize(p)} != {s['bytes']}"})
        elif mf.sha256_file(p) != s["sha256"]:
            bad.append({"file": s["file"], "problem": "sha256 mismatch"})
    out: Dict[str, Any] = {"path": path, "schema_version": m["schema_version"], "kind": m["kind"],
                           "complete": bool(m.get("complete")), "rows": m.get("num_rows"),
                           "num_augmentations": m["num_augmentations"], "topk": m.get("topk"),
                           "num_classes": m.get("num_classes"), "shards": len(shards),
                           "skipped": len(m.get("skipped", [])), "bad_shards": bad,
                           "teachers": [t.get("name") for t in m.get("teachers", [])]}
    if bad:
        return out
    n_aug_total = 0
    aug_b = ext_b = tgt_b = emb_b = img_b = file_b = 0
    for s in shards:
        p = os.path.join(path, s["file"])
        file_b += os.path.getsize(p)
        with pa.memory_map(p, "r") as mm:
            b = pa.ipc.open_file(mm).get_batch(0)
            n_aug_total += b.num_rows * m["num_augmentations"]
            aug_b += b.column("augs").nbytes
            if "augs_ext" in b.schema.names:  # schema v2 extension records (imports)
                ext_b += b.column("augs_ext").nbytes
            img_b += b.column("image").nbytes
            if m["kind"] == "classification":
                tgt_b += b.column("targets").nbytes
            else:
                emb_b += b.column("image_emb").nbytes + b.column("text_emb").nbytes
    n = max(n_aug_total, 1)
    out["bytes"] = {"files": file_b, "images": img_b, "augs": aug_b, "augs_ext": ext_b, "targets": tgt_b,
                    "embeddings": emb_b}
    out["bytes_per_augmentation"] = {
        "params": (aug_b + ext_b) / n,
        "params_ext": ext_b / n,
        "targets": tgt_b / n,
        "params_plus_targets": (aug_b + ext_b + tgt_b) / n,
        "embeddings": emb_b / n,
        "all_but_images": (file_b - img_b) / n,
    }
    if out["complete"] and m.get("num_rows"):
        from fastload.format.reader import ReinforcedDataset

        ds = ReinforcedDataset(path)
        labels = ds.labels
        out["classes_in_labels"] = int(len(np.unique(labels[labels >= 0])))
        out["class_names"] = (m.get("classes") or [])[:20]
        if ds.kind == "classification":
            rows = np.linspace(0, len(ds) - 1, min(len(ds), max_rows_for_entropy)).astype(np.int64)
            hs = []
            seen = set()
            for r in np.unique(rows):
                ids, probs = ds._targets_row(int(r))
                hs.append(_target_entropy(ids, probs, int(ds.num_classes)))
                seen.update(np.unique(ids).tolist())
            h = np.concatenate(hs)
            out["target_entropy_nats"] = {"mean": float(h.mean()), "min": float(h.min()), "max": float(h.max()),
                                          "rows_sampled": int(len(np.unique(rows)))}
            out["classes_in_targets"] = len(seen)
            out["top1_agrees_with_label"] = None
            if (labels >= 0).any():
                agree = [int(ds._targets_row(int(r))[0][0, 0] == labels[r]) for r in np.unique(rows) if labels[r] >= 0]
                out["top1_agrees_with_label"] = float(np.mean(agree)) if agree else None
    return out


def main(argv=None) -> int:
    """``fastload inspect DIR [--json]``: exit 1 on a bad checksum, 2 on an unreadable dataset."""
    ap = argparse.ArgumentParser(prog="fastload inspect", description=__doc__)
    ap.add_argument("path")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--export", metavar="FILE.parquet", default=None,
                    help="also write the stored augmentations and top-k targets as plain columns "
                         "(fastload.format.export)")
    a = ap.parse_args(argv)
    if a.export:
        from fastload.format.export import export_params

        try:
            rows = export_params(a.path, a.export, progress=not a.json)
        except ValueError as e:
            print(f"fastload inspect: error: {e}", file=sys.stderr)
            return 2
        print(f"exported {rows} rows (sample x augmentation) to {a.export}", file=sys.stderr)
    try:
        s = summarize(a.path)
    except ValueError as e:
        print(f"fastload inspect: error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(s, indent=1))
    else:
        print(f"{s['path']}: {s['kind']} dataset, schema v{s['schema_version']}, "
              f"{'complete' if s['complete'] else 'INCOMPLETE'}")
        print(f"  rows {s['rows']}  augmentations/row {s['num_augmentations']}  top-k {s['topk']}  "
              f"classes {s['num_classes']}  shards {s['shards']}  skipped {s['skipped']}")
        print(f"  teachers: {', '.join(map(str, s['teachers'])) or '-'}")
        if "bytes_per_augmentation" in s:
            b = s["bytes_per_augmentation"]
            print(f"  bytes per augmentation: {b['params_plus_targets']:.2f} (params {b['params']:.2f} + "
                  f"targets {b['targets']:.2f}); {b['all_but_images']:.2f} with row metadata")
            if b["params_ext"]:
                print(f"  of the params, extension records (schema v2): {b['params_ext']:.2f}")
            if s["kind"] == "image_text":
                print(f"  embedding bytes per augmentation (image + caption embeddings, fp16): {b['embeddings']:.1f}")
            print(f"  total {s['bytes']['files']:,} bytes, images {s['bytes']['images']:,}")
        if "target_entropy_nats" in s:
            e = s["target_entropy_nats"]
            print(f"  teacher-target entropy: mean {e['mean']:.3f} nats (min {e['min']:.3f}, max {e['max']:.3f}); "
                  f"classes seen in targets {s['classes_in_targets']}, in labels {s['classes_in_labels']}")
        if s["bad_shards"]:
            for b in s["bad_shards"]:
                print(f"  BAD SHARD {b['file']}: {b['problem']}")
        else:
            print(f"  checksums: all {s['shards']} shards OK")
    return 1 if s["bad_shards"] else 0


if __name__ == "__main__":
    sys.exit(main())
