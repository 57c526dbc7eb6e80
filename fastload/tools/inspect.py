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


def summarize(path: str, max_rows_for_entropy: int = 2000, progress: bool = False) -> Dict[str, Any]:
    """Counts, measured bytes per augmentation, classes, target entropy and checksum status.

    Checks what a loader would meet: every shard's size and sha256, the manifest's fields,
    each shard's structure, and every row's stored records and targets decoded (class ids
    inside ``num_classes``). A corrupt file raises :class:`CorruptDataError`; a dataset a
    loader cannot serve (incomplete, no rows) is listed in ``errors``.
    """
    from fastload.format.reader import ReinforcedDataset

    m = mf.read_manifest(path)
    shards = sorted(m["shards"], key=lambda s: s.get("index", 0))
    bad = []
    for s in shards:
        p = os.path.join(path, s["file"])
        if not os.path.isfile(p):
            bad.append({"file": s["file"], "problem": "missing"})
        elif os.path.getsize(p) != s["bytes"]:
            bad.append({"file": s["file"], "problem": f"size {os.path.getsize(p)} != {s['bytes']}"})
        elif mf.sha256_file(p) != s["sha256"]:
            bad.append({"file": s["file"], "problem": "sha256 mismatch"})
    teachers = m.get("teachers", [])
    out: Dict[str, Any] = {"path": path, "schema_version": m["schema_version"], "kind": m["kind"],
                           "complete": bool(m.get("complete")), "rows": m.get("num_rows"),
                           "num_augmentations": m["num_augmentations"], "topk": m.get("topk"),
                           "num_classes": m.get("num_classes"), "shards": len(shards),
                           "skipped": len(m.get("skipped", [])), "bad_shards": bad,
                           "teachers": [t.get("name") if isinstance(t, dict) else str(t) for t in teachers],
                           "errors": []}
    if bad:
        return out
    if not out["complete"]:
        out["errors"].append(f"incomplete ({len(shards)}/{m.get('num_shards')} shards written): "
                             "a loader refuses it; rerun the same `reinforce` call to resume it")
        return out
    ds = ReinforcedDataset(path, verify="off")  # hashed above; opening validates the rest
    if len(ds) == 0:
        out["errors"].append("no rows: a loader has nothing to serve")
    n_aug_total = 0
    aug_b = ext_b = tgt_b = emb_b = img_b = file_b = 0
    for pos, s in enumerate(ds._shards_meta):
        file_b += s["bytes"]
        b = ds._shard(pos).batch
        n_aug_total += b.num_rows * ds.num_augmentations
        aug_b += b.column("augs").nbytes
        if "augs_ext" in b.schema.names:  # schema v2 extension records (imports)
            ext_b += b.column("augs_ext").nbytes
        img_b += b.column("image").nbytes
        if ds.kind == "classification":
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
    # every row decoded as a loader would (records, targets inside num_classes, embeddings)
    from fastload._progress import Progress

    bar = Progress(len(ds), desc="inspect", unit="row", enabled=progress)
    for i in range(len(ds)):
        ds.augs(i)
        if ds.kind == "classification":
            ds._targets_row(i)
        else:
            ds.text_embeddings(i)
            ds.image_embedding(i, 0)
        bar.update()
    bar.close()
    labels = ds.labels
    out["classes_in_labels"] = int(len(np.unique(labels[labels >= 0])))
    classes = m.get("classes")
    out["class_names"] = [str(c) for c in classes[:20]] if isinstance(classes, list) else []
    if ds.kind == "classification" and len(ds):
        rows = np.unique(np.linspace(0, len(ds) - 1, min(len(ds), max_rows_for_entropy)).astype(np.int64))
        hs, seen, agree = [], set(), []
        for r in rows.tolist():
            ids, probs = ds._targets_row(r)
            hs.append(_target_entropy(ids, probs, int(ds.num_classes)))
            seen.update(np.unique(ids).tolist())
            if labels[r] >= 0 and ids.shape[1]:
                agree.append(int(ids[0, 0] == labels[r]))
        h = np.concatenate(hs)
        if h.size:
            out["target_entropy_nats"] = {"mean": float(h.mean()), "min": float(h.min()), "max": float(h.max()),
                                          "rows_sampled": int(len(rows))}
        out["classes_in_targets"] = len(seen)
        out["top1_agrees_with_label"] = float(np.mean(agree)) if agree else None
    return out


def main(argv=None) -> int:
    """``fastload inspect DIR [--json]``: exit 0 when a loader can serve the dataset, 1 on a
    bad checksum or size, 2 on a corrupt or unservable dataset (one line on stderr)."""
    ap = argparse.ArgumentParser(prog="fastload inspect", description=__doc__)
    ap.add_argument("path")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--export", metavar="FILE.parquet", default=None,
                    help="also write the stored augmentations and top-k targets as plain columns "
                         "(fastload.tools.export)")
    a = ap.parse_args(argv)
    if a.export:
        from fastload.tools.export import export_params

        try:
            rows = export_params(a.path, a.export, progress=not a.json)
        except ValueError as e:
            print(f"fastload inspect: error: {e}", file=sys.stderr)
            return 2
        print(f"exported {rows} rows (sample x augmentation) to {a.export}", file=sys.stderr)
    try:
        s = summarize(a.path, progress=not a.json)
    except ValueError as e:  # CorruptDataError included
        print(f"fastload inspect: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a check this module lacks: still one line, never a traceback
        print(f"fastload inspect: error: {a.path}: unreadable ({type(e).__name__}: {_one_line(e)})", file=sys.stderr)
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
    if s["bad_shards"]:
        return 1
    if s["errors"]:
        print(f"fastload inspect: error: {a.path}: {'; '.join(s['errors'])}", file=sys.stderr)
        return 2
    return 0


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:500]


if __name__ == "__main__":
    sys.exit(main())
