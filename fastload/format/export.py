"""Stored augmentations and teacher targets as plain columns (``fastload inspect --export
params.parquet``), for pyarrow, pandas, DuckDB or a spreadsheet: one row per (sample,
stored augmentation), nothing encoded.

Columns: ``id``, ``key``, ``label``, ``aug`` (augmentation index), ``src_h``/``src_w`` (the
stored image's size); ``crop_top``/``crop_left``/``crop_height``/``crop_width`` (the
RandomResizedCrop box in source pixels, the replay's integer rule); ``flip``;
``ra_ops`` (RandAugment op names in the order applied) and ``ra_magnitudes`` (their signed
magnitude bins); ``erase_top``/``erase_left``/``erase_height``/``erase_width`` (fractions of
the output, null when no erasing); ``mix_partner`` (dataset id, null when none),
``partner_flip``, ``partner_crop_*`` (the partner's box in its own source pixels);
``mixup_lambda`` (weight of this image, null without MixUp); ``cutmix_top/left/height/width``
(fractions of the output, null without CutMix); for classification datasets ``topk_ids`` and
``topk_probs`` (the teacher's top-k, probabilities as stored).

>>> import pyarrow.parquet as pq                              # doctest: +SKIP
>>> export_params("imagenet_plus/", "params.parquet")         # doctest: +SKIP
>>> pq.read_table("params.parquet").to_pandas().head()        # doctest: +SKIP
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from fastload.sample import params as P


def _pixels(q: np.ndarray, hw: np.ndarray):
    """Vectorized ``params.box_to_pixels``: quantized boxes [n, 4] in images hw [n, 2]."""
    q = q.astype(np.int64)
    h, w = hw[:, 0].astype(np.int64), hw[:, 1].astype(np.int64)
    dq = lambda v, n: (v * n + P.Q // 2) // P.Q  # noqa: E731 - the one rule of params.dq
    bh = np.minimum(h, np.maximum(1, dq(q[:, 2], h)))
    bw = np.minimum(w, np.maximum(1, dq(q[:, 3], w)))
    return np.minimum(dq(q[:, 0], h), h - bh), np.minimum(dq(q[:, 1], w), w - bw), bh, bw


def _frac(q: np.ndarray) -> np.ndarray:
    return q.astype(np.float64) / P.Q


def export_params(dataset, out: str, batch_rows: int = 2048, progress: bool = True) -> int:
    """Write ``out`` (Parquet); returns the number of rows written (samples x augmentations)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fastload._progress import Progress
    from fastload.format.reader import ReinforcedDataset

    ds = dataset if isinstance(dataset, ReinforcedDataset) else ReinforcedDataset(dataset)
    if not str(out).endswith(".parquet"):
        raise ValueError(f"--export: {out!r} must end in .parquet")
    n, N = len(ds), ds.num_augmentations
    cls = ds.kind == "classification"
    ops_table = np.array(list(P.RA_OPS) + [""], dtype=object)
    writer: Optional[pq.ParquetWriter] = None
    tmp = f"{out}.tmp-{os.getpid()}"
    total = 0
    try:
        with Progress(n, "export", "rows", enabled=progress) as bar:
            for a in range(0, n, batch_rows):
                rows = np.arange(a, min(n, a + batch_rows), dtype=np.int64)
                idx = np.repeat(rows, N)
                aug = np.tile(np.arange(N, dtype=np.int64), len(rows))
                _, recs, ids, probs = ds.gather(idx, aug)
                hw = ds.source_hw[idx]
                flags = recs["flags"].astype(np.int64)
                ct, cl, ch, cw = _pixels(recs["crop"], hw)
                partner = recs["partner"].astype(np.int64)
                has_p = partner >= 0
                phw = ds.source_hw[np.where(has_p, partner, 0)]
                pt, pl, ph, pw = _pixels(recs["pcrop"], phw)
                ops = recs["ra_ops"]
                used = ops != P.RA_NONE
                op_names = [ops_table[np.where(u, o, len(P.RA_OPS))][u].tolist() for o, u in zip(ops, used)]
                mags = [m[u].astype(int).tolist() for m, u in zip(recs["ra_mags"], used)]
                erase_on = recs["erase"][:, 3] > 0
                mix_on = (flags & P.FLAG_MIXUP) != 0
                cut_on = (flags & P.FLAG_CUTMIX) != 0

                def masked(values, on):
                    return pa.array(values, mask=~on)

                cols = {
                    "id": pa.array(idx), "key": pa.array([ds.keys[i] for i in idx.tolist()]),
                    "label": pa.array(ds.labels[idx]), "aug": pa.array(aug),
                    "src_h": pa.array(hw[:, 0].astype(np.int32)), "src_w": pa.array(hw[:, 1].astype(np.int32)),
                    "crop_top": pa.array(ct), "crop_left": pa.array(cl),
                    "crop_height": pa.array(ch), "crop_width": pa.array(cw),
                    "flip": pa.array((flags & P.FLAG_FLIP) != 0),
                    "ra_ops": pa.array(op_names, type=pa.list_(pa.string())),
                    "ra_magnitudes": pa.array(mags, type=pa.list_(pa.int8())),
                }
                for j, name in enumerate(("top", "left", "height", "width")):
                    cols[f"erase_{name}"] = masked(_frac(recs["erase"][:, j]), erase_on)
                cols["mix_partner"] = masked(partner, has_p)
                cols["partner_flip"] = masked((flags & P.FLAG_PARTNER_FLIP) != 0, has_p)
                for name, v in zip(("top", "left", "height", "width"), (pt, pl, ph, pw)):
                    cols[f"partner_crop_{name}"] = masked(v, has_p)
                cols["mixup_lambda"] = masked(_frac(recs["mixup"]), mix_on)
                for j, name in enumerate(("top", "left", "height", "width")):
                    cols[f"cutmix_{name}"] = masked(_frac(recs["cutmix"][:, j]), cut_on)
                if cls:
                    k = ids.shape[1]
                    cols["topk_ids"] = pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), k)
                    cols["topk_probs"] = pa.FixedSizeListArray.from_arrays(
                        pa.array(np.asarray(probs, np.float32).reshape(-1)), k)
                table = pa.table(cols)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
                total += table.num_rows
                bar.update(len(rows))
        if writer is not None:
            writer.close()
            writer = None
            os.replace(tmp, out)
    finally:
        if writer is not None:
            writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
    return total
