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
``topk_probs`` (the teacher's top-k, probabilities as stored). Datasets with extension records
(ml-dr imports) add ``erase_black``, ``cutmix_empty``, ``ra_values`` / ``partner_ra_values``
(float magnitudes), ``partner_ra_ops`` / ``partner_ra_magnitudes``, ``partner_erase_*``,
``mixup_lambda_exact`` and ``cutmix_lambda``. The record columns are derived from
``fastload.sample.schema`` (each field's export name, box grid and presence rule).

>>> import pyarrow.parquet as pq                              # doctest: +SKIP
>>> export_params("imagenet_plus/", "params.parquet")         # doctest: +SKIP
>>> pq.read_table("params.parquet").to_pandas().head()        # doctest: +SKIP
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from fastload.sample import schema as S


def _pixels(q: np.ndarray, hw: np.ndarray):
    """Vectorized ``params.box_to_pixels``: quantized boxes [n, 4] in images hw [n, 2]."""
    return S.box_to_pixels_array(q, hw[:, 0], hw[:, 1])


def _frac(q: np.ndarray) -> np.ndarray:
    return q.astype(np.float64) / S.Q


_BOX_PARTS = ("top", "left", "height", "width")


def _record_columns(rec: S.Record, recs: np.ndarray, hw: np.ndarray, source_hw: np.ndarray,
                    base: Optional[np.ndarray] = None) -> dict:
    """The export columns of ``recs`` (records of ``rec``), derived from the schema's field
    declarations; ``base``: the base records of extension records (flags, partner, ops)."""
    import pyarrow as pa

    ops_table = np.array(list(S.RA_OPS) + [""], dtype=object)
    base = recs if base is None else base
    partner = base["partner"].astype(np.int64)
    flags = base["flags"].astype(np.int64)
    ext = recs["ext"].astype(np.int64) if "ext" in recs.dtype.names else None

    def present(cond, v) -> Optional[np.ndarray]:
        if cond is None:
            return None
        if cond[0] == "partner":
            return partner >= 0
        if cond[0] == "flag":
            return (flags & S.bit(S.AUG, "flags", cond[1])) != 0
        if cond[0] == "ext":
            return (ext & S.bit(S.AUG_EXT, "ext", cond[1])) != 0
        if cond[0] == "nonzero":
            return v[:, cond[1]] > 0
        raise ValueError(f"unknown presence rule {cond}")

    def col(values, on, type=None):
        return pa.array(values, type=type) if on is None else pa.array(values, mask=~on, type=type)

    def slots(f):  # the used slots of the op id field a per-slot field belongs to
        ops = recs[f.of] if f.of in recs.dtype.names else base[f.of]
        return ops != S.RA_NONE

    cols = {}
    for f in rec.fields:
        v = recs[f.name]
        on = present(f.present, v)
        for value, _, name, cond in f.bits:
            if name:
                cols[name] = col((v.astype(np.int64) & value) != 0, present(cond, v))
        if not f.export:
            continue
        if f.box in ("source", "partner"):
            grid = hw if f.box == "source" else source_hw[np.where(partner >= 0, partner, 0)]
            for part, x in zip(_BOX_PARTS, _pixels(v, grid)):
                cols[f"{f.export}_{part}"] = col(x, on)
        elif f.box == "output":
            for j, part in enumerate(_BOX_PARTS):
                cols[f"{f.export}_{part}"] = col(_frac(v[:, j]), on)
        elif f.role == "op_ids":
            used = v != S.RA_NONE
            names = [ops_table[np.where(u, o, len(S.RA_OPS))][u].tolist() for o, u in zip(v, used)]
            cols[f.export] = col(names, on, pa.list_(pa.string()))
        elif f.role in ("op_bins", "op_values"):
            t, conv = (pa.int8(), int) if f.role == "op_bins" else (pa.float32(), float)
            cols[f.export] = col([[conv(x) for x in m[u]] for m, u in zip(v, slots(f))], on, pa.list_(t))
        elif f.quant == "fraction":
            cols[f.export] = col(_frac(v), on)
        elif f.dtype.kind == "f":
            cols[f.export] = col(v.astype(np.float64), on)
        else:
            cols[f.export] = col(v.astype(np.int64), on)
    return cols


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
                cols = {
                    "id": pa.array(idx), "key": pa.array([ds.keys[i] for i in idx.tolist()]),
                    "label": pa.array(ds.labels[idx]), "aug": pa.array(aug),
                    "src_h": pa.array(hw[:, 0].astype(np.int32)), "src_w": pa.array(hw[:, 1].astype(np.int32)),
                }
                cols.update(_record_columns(S.AUG, recs, hw, ds.source_hw))
                if ds.has_ext:  # the extension's fields too (one decode per row)
                    exts = np.concatenate([ds.augs_ext(int(r)) for r in rows])
                    cols.update(_record_columns(S.AUG_EXT, exts, hw, ds.source_hw, base=recs))
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
