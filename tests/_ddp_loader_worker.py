"""Helpers for the ReinforcedLoader tests: a small real reinforced dataset written with the
format's writer (real JPEGs cut from scikit-image's sample photos), and the body of the
spawned gloo processes of the DDP test."""
from __future__ import annotations

import io
import hashlib
import os

import numpy as np

from fastload.format.shards import encode_array, encode_augs, encode_targets
from fastload.format.writer import DatasetWriter, write_shard_file
from fastload.sample.policy import AugmentPolicy, sample_params


def _photos():
    from skimage import data

    return [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]


def make_jpegs(n: int, seed: int = 0):
    """n distinct JPEGs (quality 90) of varied small sizes, cut from real photos."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = _photos()
    out, hw = [], []
    for i in range(n):
        p = photos[i % len(photos)]
        h, w = int(rng.integers(40, 72)), int(rng.integers(40, 72))
        ch, cw = int(rng.integers(h, p.shape[0] // 2)), int(rng.integers(w, p.shape[1] // 2))
        t, l = int(rng.integers(0, p.shape[0] - ch)), int(rng.integers(0, p.shape[1] - cw))
        img = Image.fromarray(p[t:t + ch, l:l + cw]).resize((w, h), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
        hw.append((h, w))
    return out, np.array(hw, np.int32)


def write_dataset(root: str, n: int = 24, n_aug: int = 6, num_classes: int = 10, k: int = 3,
                  kind: str = "classification", policy: AugmentPolicy = None, corrupt=(),
                  shard_size: int = 10, seed: int = 0, emb_dim: int = 8, n_syn: int = 3,
                  content_hash: bool = False) -> str:
    """Write a reinforced dataset with the format's writer. Targets come from a tiny fixed
    'teacher' (a seeded random top-k per augmentation); rows in ``corrupt`` get bytes that
    are not a JPEG. ``content_hash``: the ``hash`` column is the blake2b-128 of the stored
    image (as ``reinforce`` writes for JPEG sources kept as they are), else the row index."""
    rng = np.random.default_rng(seed)
    policy = policy or AugmentPolicy(randaugment=(2, 9), erase=0.25, mixup=1.0, cutmix=1.0,
                                     size=(32, 32))
    jpegs, hw = make_jpegs(n, seed)
    for c in corrupt:
        jpegs[c] = b"this is not a JPEG file" * 4
    augs = sample_params(policy, rng, np.arange(n), hw, n_aug)
    labels = rng.integers(0, num_classes, n)
    render_hw = tuple(policy.size)
    header = {"kind": kind, "num_augmentations": n_aug, "topk": k if kind == "classification" else 0,
              "num_classes": num_classes if kind == "classification" else None, "seeds": [seed],
              "policy": policy.to_dict(),
              "replay": {"image_size": list(render_hw), "interpolation": policy.interpolation,
                         "dct_scale": True, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
              "teachers": [{"name": "tiny", "description": "seeded random top-k"}],
              "shard_size": shard_size}
    if kind == "image_text":
        header.update(embedding_dim=emb_dim, num_captions=1 + n_syn)
    n_shards = -(-n // shard_size)
    w = DatasetWriter(root, header, {"test": seed, "n": n, "kind": kind}, num_shards=n_shards)
    for s in range(n_shards):
        rows = range(s * shard_size, min(n, (s + 1) * shard_size))
        cols = {name: [] for name in ("id", "key", "hash", "orig_h", "orig_w", "src_h", "src_w",
                                      "label", "image", "augs", "targets", "image_emb", "text_emb",
                                      "captions", "syn_captions")}
        for i in rows:
            cols["id"].append(i)
            cols["key"].append(f"img{i:05d}")
            cols["hash"].append(hashlib.blake2b(jpegs[i], digest_size=16).digest() if content_hash
                                else int(i).to_bytes(16, "little"))
            for a in ("orig", "src"):
                cols[f"{a}_h"].append(int(hw[i, 0]))
                cols[f"{a}_w"].append(int(hw[i, 1]))
            cols["label"].append(int(labels[i]))
            cols["image"].append(jpegs[i])
            cols["augs"].append(encode_augs(augs[i], tuple(hw[i]), render_hw, hw))
            if kind == "classification":
                ids = np.stack([rng.permutation(num_classes)[:k] for _ in range(n_aug)])
                p = np.sort(rng.dirichlet(np.ones(k + 2), n_aug)[:, :k], axis=1)[:, ::-1]
                cols["targets"].append(encode_targets(ids, p))
            else:
                cols["image_emb"].append(encode_array(rng.standard_normal((n_aug, emb_dim))))
                cols["text_emb"].append(encode_array(rng.standard_normal((1 + n_syn, emb_dim))))
                cols["captions"].append([f"a photo number {i}"])
                cols["syn_captions"].append([f"synthetic caption {c} of image {i}" for c in range(n_syn)])
        w.add_shard(write_shard_file(root, s, cols, kind))
    w.finish()
    return root


# ---------------------------------------------------------------------------------------
# DDP worker (spawned by tests/test_loader_ddp.py)


def ddp_worker(rank: int, world: int, port: int, root: str, out_dir: str, batch_size: int,
               drop_last: bool) -> None:
    import torch
    import torch.distributed as dist

    from fastload.loader.reinforced import ReinforcedLoader
    from fastload.format.reader import ReinforcedDataset

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ds = ReinforcedDataset(root)
        loader = ReinforcedLoader(ds, batch_size=batch_size, shuffle=True, seed=5, num_workers=1,
                                  image_size=16, drop_last=drop_last, check_ranks=True)
        assert (loader.rank, loader.world_size) == (rank, world)
        loader.set_epoch(1)
        rows, shapes = [], []
        for images, labels, targets in loader:
            # every step must be a collective that all ranks reach with the same shape
            t = torch.tensor([images.shape[0]], dtype=torch.int64)
            gathered = [torch.zeros_like(t) for _ in range(world)]
            dist.all_gather(gathered, t)
            shapes.append([int(g) for g in gathered])
            rows.append(labels.numpy())
        steps = torch.tensor([len(shapes)])
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        # which sample ids this rank saw: recomputed from the loader's plan for the check
        ids = np.concatenate([idx for _, idx, _ in loader._plan(1, 0)]) if len(loader) else np.zeros(0)
        seen = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        assert np.array_equal(seen, ds.labels[ids]), "yielded labels differ from the plan's samples"
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), ids=ids, shapes=np.array(shapes),
                 steps=len(shapes), max_steps=int(steps), n_batches=len(loader))
        # a rank-dependent batch_sampler: the check raises instead of hanging
        bs = [[0, 1]] if rank == 0 else [[0, 1, 2]]
        bad = ReinforcedLoader(ds, batch_sampler=bs, image_size=16, check_ranks=True)
        try:
            next(iter(bad))
            raise AssertionError("check_ranks did not detect different shapes")
        except RuntimeError as e:
            assert "ranks disagree" in str(e)
    finally:
        dist.destroy_process_group()
