"""Replay fidelity on archives made by the upstreams' own code: apple/ml-dr's ``reinforce.py``
(its ``reinforce()`` loop, ``transform_batch``, ``dr.transforms`` and ``dr.data`` datasets, run
unmodified from a snapshot of the repository) writes reinforcement archives for the four
ImageNet+ configs of ``configs/imagenet/reinforce/`` (cropflip = rrc, mixing, randaug = rare,
randaug_mixing = mix+rare) on a small generated ImageFolder with a tiny teacher built here
(ml-dr's published teachers need GPUs and downloads). Each archive is imported with
``fastload import-mldr`` (``--semantics generation`` and ``training``) and every record
(image x augmentation) is replayed by fastload's native kernel and by ml-dr's training-time
``ReinforcedDataset.__getitem__`` (the augmentation it would draw fixed to each one in turn).
The ``training`` import (whose policy has ``resize="pil"``, Pillow's ``Image.resize``) is
replayed three times, the records being the same: with ``"pil"`` (``training_resize_pil``),
with torch's antialiased resize (``training_resize_torch``, fastload before it had Pillow's) and
with ``"pil12"`` (Pillow <= 12's pass order; the upstream environment's Pillow is recorded).
The ``generation`` import is also replayed with ``"pil"`` (``generation_resize_pil``):
``reinforce.py`` crops the PIL image too, before its tensor steps.
``crop_flip_byte_exact``: the records whose crop + flip alone (and the mixing partner's)
fastload renders byte for byte as ml-dr's ``RandomResizedCrop`` + ``RandomHorizontalFlip`` on
the PIL image, per resize; ``where_the_crop_matches``: each row counted on the records whose
crop + flip is byte-exact with ``"pil"`` (the same box and decode as ml-dr's).

Per config and semantics: records exact / within 1 level / over 1, and the largest
difference, in 8-bit levels of the denormalized output (x * std + mean) * 255 (MixUp blends
two images, so its records are compared as floats in the same units). Also: ``vs_generation``,
the same against the pixels ml-dr's ``reinforce()`` gave the teacher (captured at the teacher's
input), and ``given_the_same_crop``: ml-dr's own reapply of RandAugment, erasing and
normalization on fastload's crop + flip of each non-mixing record (PIL input for
``training``, with that row's resize; the loader's float tensor for ``generation``), which
separates the crop resize from what RandAugment does with it.

Two environments: this script runs in fastload's environment (``PYTHONPATH`` at the
checkout) and runs itself with ``--upstream`` in one that has ml-dr's requirements
(torch, torchvision, timm, joblib, pyyaml); fastload's code never imports ml-dr's.

    PYTHONPATH=. python benchmarks/fidelity_upstream.py --mldr-repo /path/to/ml-dr \\
        --upstream-python /path/to/venv/bin/python

Adds ``upstream_archives`` to ``benchmarks/results/fidelity.json`` (its other entries are kept)
and writes the run on its own as ``fidelity_upstream-<stamp>.json``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np

CONFIGS = {"rrc": "cropflip", "mix": "mixing", "rare": "randaug", "mix_rare": "randaug_mixing"}


def _photos(root: str, n: int, classes: int, seed: int = 0) -> None:
    """An ImageFolder of smooth textured JPEGs (q90) of varied sizes."""
    from PIL import Image

    g = np.random.default_rng(seed)
    for k in range(n):
        d = os.path.join(root, f"c{k % classes:02d}")
        os.makedirs(d, exist_ok=True)
        h, w = int(g.integers(240, 520)), int(g.integers(240, 640))
        y, x = np.mgrid[0:h, 0:w].astype(np.float64)
        ch = [np.clip(110 + 60 * np.sin(g.uniform(0.01, 0.08) * x + c) + 50 * np.cos(g.uniform(0.01, 0.08) * y + c)
                      + g.normal(0, 10, (h, w)), 0, 255) for c in range(3)]
        Image.fromarray(np.stack(ch, -1).astype(np.uint8)).save(os.path.join(d, f"img{k:04d}.jpg"), quality=90)


# ---------------------------------------------------------------------------------------
# upstream side (ml-dr's environment)


def upstream(repo: str, work: str, n_images: int, num_samples: int, seed: int) -> None:
    import random
    import types

    import torch
    import yaml

    shim = os.path.join(work, "shim", "internal")  # reinforce.py imports an `internal` package that
    os.makedirs(shim, exist_ok=True)  # is not in the public repository (and not used by reinforce())
    for f in ("__init__.py", "hooks.py", "data.py"):
        open(os.path.join(shim, f), "a").close()
    sys.path[:0] = [repo, os.path.dirname(shim)]
    # models.py does not parse at the snapshot used (an indentation error in load_model); reinforce()
    # does not use it (main_worker loads the teacher): an empty module stands in for the import
    sys.modules.setdefault("models", types.SimpleNamespace(load_model=None))
    import data as mldr_data
    import dr.data as dr_data
    import reinforce as R
    from dr.data import DatasetWithParameters, IndexedDataset, ReinforcedDataset
    import dr.transforms as T_dr

    root = os.path.join(work, "imagenet")
    _photos(os.path.join(root, "training"), n_images, 4)
    _photos(os.path.join(root, "validation"), 4, 4, seed=1)

    class Teacher(torch.nn.Module):  # tiny: pooled colour statistics -> 1000 logits
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.w = torch.nn.Parameter(torch.randn(12, 1000, generator=g) * 3)

        def forward(self, x, return_prob=False):
            f = torch.cat([x.mean((2, 3)), x.std((2, 3)), x[:, :, ::2].mean((2, 3)), x[:, :, :, ::2].std((2, 3))], 1)
            z = f @ self.w
            return z.softmax(1) if return_prob else z

    for name, cfg_name in CONFIGS.items():
        with open(os.path.join(repo, "configs", "imagenet", "reinforce", f"{cfg_name}.yaml")) as f:
            config = yaml.safe_load(f)["parameters"]
        config.update(data_path=root, seed=seed, gpu=None, workers=0, batch_size=4, distributed=False,
                      multiprocessing_distributed=False, artifact_path=os.path.join(work, name))
        config["reinforce"]["num_samples"] = num_samples
        config["num_classes"] = mldr_data.get_dataset_num_classes(config["dataset"])
        random.seed(seed)  # what reinforce.py's main() seeds
        torch.manual_seed(seed)
        # its MixUp/CutMix (transforms.py) draw from NumPy's global generator, which main() does
        # not seed: seeded here so that a rerun writes the same mixing archives
        np.random.seed(seed)
        # main_worker's dataset and loader (it also moves the teacher to CUDA, which is skipped here)
        config["image_augmentation"] = {"train": {}, "val": {}}
        train_dataset, _ = mldr_data.get_dataset(config)
        train_dataset.transform = None
        tr = T_dr.compose_from_config(T_dr.before_collate_config(config["reinforce"]["image_augmentation"]))
        train_dataset = IndexedDataset(DatasetWithParameters(train_dataset, transform=tr, num_samples=num_samples))
        loader = torch.utils.data.DataLoader(train_dataset, batch_size=config["batch_size"], shuffle=True,
                                             drop_last=False, num_workers=0)
        out = os.path.join(work, name, "reinforced_data")
        os.makedirs(out, exist_ok=True)
        # reinforce() writes to the fixed path /mnt/reinforced_data: pointed at this run's folder
        real_os = R.os
        R.os = types.SimpleNamespace(**{k: getattr(real_os, k) for k in ("makedirs",)})
        R.os.path = types.SimpleNamespace(join=lambda *p: out if p == ("/mnt/reinforced_data",) else
                                          real_os.path.join(*p), exists=real_os.path.exists)
        # the pixels the teacher scored (ml-dr's generation-time replay), kept by id
        gen = np.zeros((n_images, num_samples, 3, 224, 224), np.float32)
        cur: list = []

        class Loader:  # the same loader, noting each batch's ids
            def __len__(self):
                return len(loader)

            def __iter__(self):
                for batch in loader:
                    cur[:] = batch[0].tolist()
                    yield batch

        teacher = Teacher().eval()
        scored = teacher.forward

        def forward(x, return_prob=False):
            for j, i in enumerate(cur):
                gen[i] = x.reshape(len(cur), num_samples, *x.shape[1:])[j].numpy()
            return scored(x, return_prob)

        teacher.forward = forward
        try:
            R.reinforce(Loader(), teacher, config)
        finally:
            R.os = real_os
        np.save(os.path.join(work, name, "upstream_generation.npy"), gen)
        torch.save(config, os.path.join(out, "config.pth.tar"))  # as reinforce.py's main() then does
        os.system(f"tar czf {os.path.join(work, name, 'reinforced_data.tar.gz')} -C {os.path.join(work, name)} "
                  "reinforced_data")
        # ml-dr's training-time replay of every record: ReinforcedDataset.__getitem__ with its
        # random choices fixed (replay with probability 1, augmentation k)
        ds = torch.utils.data.Dataset.__new__(ReinforcedDataset)
        import torchvision.datasets as tvd

        ds.__init__(tvd.ImageFolder(os.path.join(root, "training")), [out], {"densify": "smooth"}, 1000)
        real_random = dr_data.random
        imgs = np.zeros((len(ds), num_samples, 3, 224, 224), np.float32)
        try:
            for k in range(num_samples):
                dr_data.random = types.SimpleNamespace(random=lambda: 0.0, randint=lambda a, b, k=k: k if b == num_samples - 1 else a)
                for i in range(len(ds)):
                    imgs[i, k] = ds[i][0].numpy()
        finally:
            dr_data.random = real_random
        np.save(os.path.join(work, name, "upstream_training.npy"), imgs)
        print(f"upstream {name}: archive and {imgs.shape[0] * imgs.shape[1]} training-time replays", flush=True)


def upstream_given_crop(repo: str, work: str) -> None:
    """ml-dr's own reapply of every non-mixing record's RandAugment, erasing and normalization
    on fastload's crop + flip of that record (``fastload_crops_<resize>.npy``): the differences
    that remain are RandAugment's (and erasing's), not the crop resize's. Also ml-dr's own crop +
    flip of every record (and of its mixing partner): which records fastload crops byte-exactly."""
    import torch
    import torchvision.datasets as tvd

    sys.path[:0] = [repo, os.path.join(work, "shim")]
    sys.modules.setdefault("models", __import__("types").SimpleNamespace(load_model=None))
    import dr.transforms as T_dr
    import torchvision.transforms.functional as TF
    from dr.data import ReinforceMetadata
    from PIL import Image

    folder = tvd.ImageFolder(os.path.join(work, "imagenet", "training"))  # ReinforcedDataset's images
    for name in CONFIGS:
        crops = {r: np.load(os.path.join(work, name, f"fastload_crops_{r}.npy")) for r in ("torch", "pil")}
        meta = ReinforceMetadata([os.path.join(work, name, "reinforced_data")])
        tr = T_dr.compose_from_config(meta.rconfig["reinforce"]["image_augmentation"])
        shape = crops["pil"].shape
        res = {(u, r): np.full(shape, np.nan, np.float32) for u in ("training", "generation") for r in crops}
        up_crops = np.zeros(shape, np.uint8)  # ml-dr's crop + flip of the image
        up_pcrops = np.zeros(shape, np.uint8)  # and of its mixing partner (zeros: none)
        for i in range(shape[0]):
            samples = meta[i][1]
            for k in range(shape[1]):
                params = samples[k]["params"]
                params = tr.decompress(params) if isinstance(params, list) else dict(params)
                geo = [t for t in ("random_resized_crop", "random_horizontal_flip") if t in params]
                own = {t: (params[t][0], None) for t in geo}
                up_crops[i, k] = np.asarray(tr.reapply(folder[i][0], own)[0]).transpose(2, 0, 1)
                if "mixup" in params or "cutmix" in params:
                    theirs = {t: (params[t][1], None) for t in geo}
                    up_pcrops[i, k] = np.asarray(tr.reapply(folder[params["id2"]][0], theirs)[0]).transpose(2, 0, 1)
                    continue
                rest = {t: v for t, v in params.items() if t not in geo}
                for r, c in crops.items():
                    img = Image.fromarray(np.ascontiguousarray(c[i, k].transpose(1, 2, 0)), "RGB")
                    # training: the crop as a PIL image; generation: as reinforce.py's loader hands
                    # it on (a float tensor), then its uint8 step, RandAugment on the tensor,
                    # to_tensor, erasing, normalization
                    res["training", r][i, k] = tr.reapply(img, dict(rest))[0].numpy()
                    res["generation", r][i, k] = tr.reapply(TF.to_tensor(img), dict(rest))[0].numpy()
        for (u, r), v in res.items():
            np.save(os.path.join(work, name, f"upstream_given_crop_{u}_{r}.npy"), v)
        np.save(os.path.join(work, name, "upstream_crops.npy"), up_crops)
        np.save(os.path.join(work, name, "upstream_pcrops.npy"), up_pcrops)


# ---------------------------------------------------------------------------------------
# fastload side


def _fastload_crops(ds, resize: str) -> tuple:
    """Each record's crop + flip alone (uint8), and its mixing partner's (zeros where it does
    not mix), as fastload renders them with the crop resize ``resize``."""
    import torch

    from fastload.replay import native
    from fastload.sample import params as P

    rp, K = ds.replay, ds.num_augmentations
    res = np.zeros((len(ds), K, 3) + tuple(rp["image_size"]), np.uint8)
    pres = res.copy()
    for i in range(len(ds)):
        r = ds.augs(i).copy()
        plain = P.empty(len(r))
        plain["crop"], plain["flags"] = r["crop"], r["flags"] & P.FLAG_FLIP
        o = torch.empty((K, 3) + tuple(rp["image_size"]), dtype=torch.uint8)
        native.render_batch([bytes(ds.image_bytes(i))] * K, plain, o, interpolation=rp["interpolation"],
                            dct_scale=False, threads=1, resize=resize)
        res[i] = o.numpy()
        for k in np.flatnonzero(r["partner"] >= 0):
            plain = P.empty(1)
            plain["crop"] = r["pcrop"][k]
            plain["flags"] = P.FLAG_FLIP if r["flags"][k] & P.FLAG_PARTNER_FLIP else 0
            o = torch.empty((1, 3) + tuple(rp["image_size"]), dtype=torch.uint8)
            native.render_batch([bytes(ds.image_bytes(int(r["partner"][k])))], plain, o,
                                interpolation=rp["interpolation"], dct_scale=False, threads=1, resize=resize)
            pres[i, k] = o[0].numpy()
    return res, pres


def _fastload_replay(out: str, resize=None) -> tuple:
    """Every record of the dataset at ``out`` replayed by the native kernel, with the crop
    resize of its policy or, given ``resize``, that one instead (the records do not depend on
    it: one import measures both)."""
    import torch

    from fastload.format.reader import ReinforcedDataset
    from fastload.replay import native

    ds = ReinforcedDataset(out)
    rp, pol = ds.replay, ds.manifest["policy"]
    resize = resize or pol.get("resize", "torch")
    K = ds.num_augmentations
    res = np.zeros((len(ds), K, 3) + tuple(rp["image_size"]), np.float32)
    for i in range(len(ds)):
        recs, ext = ds.augs(i), ds.augs_ext(i)
        partners = [bytes(ds.image_bytes(int(p))) if p >= 0 else None for p in recs["partner"]]
        o = torch.empty((K, 3) + tuple(rp["image_size"]))
        native.render_batch([bytes(ds.image_bytes(i))] * K, recs, o, partner_sources=partners, mean=rp["mean"],
                            std=rp["std"], interpolation=rp["interpolation"], dct_scale=False, threads=1, ext=ext,
                            box_grid=tuple(rp["box_grid"]), ra_semantics=pol.get("randaugment_semantics", "v1"),
                            resize=resize)
        res[i] = o.numpy()
    return res, ds


def _compare(ours: np.ndarray, theirs: np.ndarray, mean, std, recs_of) -> dict:
    s = (np.asarray(std, np.float32) * 255)[None, None, :, None, None]
    d = (np.abs(ours - theirs) * s).reshape(ours.shape[0], ours.shape[1], -1).max(-1)  # levels, per record
    d = np.round(d, 3)
    out = {"records": int(d.size), "exact": int((d < 0.01).sum()), "within_1": int((d <= 1.01).sum()),
           "over_1": int((d > 1.01).sum()), "max_levels": float(d.max())}
    # where the records over 1 level are: per thing a record holds (an op, erasing, mixing),
    # the records holding it, how many of them are within 1 level, and their largest difference
    groups = {}
    for (i, k), v in np.ndenumerate(d):
        for g in recs_of(i, k).split("+"):
            e = groups.setdefault(g, {"records": 0, "within_1": 0, "max_levels": 0.0})
            e["records"] += 1
            e["within_1"] += int(v <= 1.01)
            e["max_levels"] = max(e["max_levels"], float(v))
    out["by_record_content"] = dict(sorted(groups.items()))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mldr-repo", required=True, help="a checkout of apple/ml-dr")
    ap.add_argument("--upstream-python", default=sys.executable, help="python with ml-dr's requirements")
    ap.add_argument("--work", required=True, help="scratch folder (archives, images)")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--num-samples", type=int, default=5, help="augmentations per image")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--reuse-upstream", action="store_true",
                    help="reuse the archives and ml-dr replays already in --work (a rerun of the fastload side)")
    ap.add_argument("--upstream", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--upstream-given-crop", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.upstream:
        upstream(a.mldr_repo, a.work, a.images, a.num_samples, a.seed)
        return 0
    if a.upstream_given_crop:
        upstream_given_crop(a.mldr_repo, a.work)
        return 0
    from fastload.bench._common import write_result
    from fastload.sample import params as P

    load0 = os.getloadavg()
    commit = subprocess.run(["git", "-C", a.mldr_repo, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    # ml-dr's torch.load calls predate torch 2.6's weights_only default; the files are the ones
    # written just before by this run
    env = dict(os.environ, PYTHONPATH="", TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    if not a.reuse_upstream:
        subprocess.run([a.upstream_python, os.path.abspath(__file__), "--upstream", "--mldr-repo", a.mldr_repo,
                        "--work", a.work, "--images", str(a.images), "--num-samples", str(a.num_samples),
                        "--seed", str(a.seed)], check=True, env=env)
    up_versions = subprocess.run([a.upstream_python, "-c", "import torch, torchvision, PIL; print(torch.__version__, "
                                  "torchvision.__version__, PIL.__version__)"], capture_output=True, text=True,
                                 env=env).stdout.split()
    fastload_cli = os.path.join(os.path.dirname(sys.executable), "fastload")
    results, sets = {}, {}
    # (key, import semantics, crop resize at replay; None: the imported policy's). The training
    # import's policy says resize="pil"; replaying it with "torch" too (fastload's resize before
    # it had Pillow's) gives before and after on the same records, and "pil12" (Pillow <= 12's
    # pass order) shows that the pass order must follow the Pillow that ml-dr ran with.
    # "generation_resize_pil": the generation import with Pillow's resize, since reinforce.py
    # too crops the PIL image (its uint8 step before the crop is a no-op on PIL images).
    variants = (("generation", "generation", None), ("generation_resize_pil", "generation", "pil"),
                ("training_resize_torch", "training", "torch"),
                ("training_resize_pil", "training", "pil"), ("training_resize_pil12", "training", "pil12"))
    crops = {}
    for name in CONFIGS:
        results[name] = {"ml_dr_config": f"configs/imagenet/reinforce/{CONFIGS[name]}.yaml"}
        for sem in ("generation", "training"):
            out = os.path.join(a.work, name, f"fastload-{sem}")
            subprocess.run([fastload_cli, "import-mldr", os.path.join(a.work, name, "reinforced_data.tar.gz"),
                            "--images", os.path.join(a.work, "imagenet", "training"), "--out", out,
                            "--semantics", sem, "--quiet"], check=True)
        for key, sem, resize in variants:
            sets[name, key] = _fastload_replay(os.path.join(a.work, name, f"fastload-{sem}"), resize)
        policy_resize = sets[name, "training_resize_pil"][1].manifest["policy"].get("resize", "torch")
        if policy_resize != "pil":
            raise SystemExit(f"import-mldr --semantics training wrote resize={policy_resize!r}, expected 'pil'")
        for r in ("torch", "pil", "pil12"):
            crops[name, r] = _fastload_crops(sets[name, "training_resize_pil"][1], r)
            np.save(os.path.join(a.work, name, f"fastload_crops_{r}.npy"), crops[name, r][0])
    subprocess.run([a.upstream_python, os.path.abspath(__file__), "--upstream-given-crop", "--mldr-repo",
                    a.mldr_repo, "--work", a.work], check=True, env=env)
    for name in CONFIGS:
        theirs = np.load(os.path.join(a.work, name, "upstream_training.npy"))
        givens = {"generation": ("generation", "torch"), "generation_resize_pil": ("generation", "pil"),
                  "training_resize_torch": ("training", "torch"), "training_resize_pil": ("training", "pil")}
        givens = {key: np.load(os.path.join(a.work, name, f"upstream_given_crop_{u}_{r}.npy"))
                  for key, (u, r) in givens.items()}
        generated = np.load(os.path.join(a.work, name, "upstream_generation.npy"))
        up_c = np.load(os.path.join(a.work, name, "upstream_crops.npy"))
        up_pc = np.load(os.path.join(a.work, name, "upstream_pcrops.npy"))
        mixes = np.stack([sets[name, "generation"][1].augs(i)["partner"] >= 0 for i in range(up_c.shape[0])])
        # which records fastload crops + flips (image and mixing partner) byte for byte as ml-dr does
        same = {}
        for r in ("torch", "pil", "pil12"):
            c, pc = crops[name, r]
            main_ok = (c == up_c).reshape(c.shape[0], c.shape[1], -1).all(-1)
            part_ok = (pc == up_pc).reshape(c.shape[0], c.shape[1], -1).all(-1)
            same[r] = main_ok & part_ok
            results[name].setdefault("crop_flip_byte_exact", {"records": int(main_ok.size),
                                                              "mixing_records": int(mixes.sum())})
            results[name]["crop_flip_byte_exact"][f"resize_{r}"] = {
                "records": int(same[r].sum()), "image_crop": int(main_ok.sum()),
                "partner_crop_of_mixing_records": int((part_ok & mixes).sum())}
        results[name]["crop_flip_byte_exact"]["note"] = (
            "records whose crop + flip alone (and the mixing partner's) fastload renders byte for byte as "
            "ml-dr's RandomResizedCrop + RandomHorizontalFlip on the PIL image, per crop resize")
        for key, sem, resize in variants:
            ours, ds = sets[name, key]
            rp = ds.replay

            def content(i, k, ds=ds):
                r = ds.augs(i)[k]
                ops = sorted({P.RA_OPS[int(o)] for o in r["ra_ops"] if o != P.RA_NONE})
                parts = ["crop"] + ops + (["erase"] if np.any(r["erase"]) else []) + (
                    ["mix"] if r["partner"] >= 0 else [])
                return "+".join(parts)

            res = {"import_semantics": sem, "resize": resize or ds.manifest["policy"].get("resize", "torch")}
            res.update(_compare(ours, theirs, rp["mean"], rp["std"], content))
            m = same["pil"]
            w = _compare(ours[m][None], theirs[m][None], rp["mean"], rp["std"], lambda i, k: "")
            res["where_the_crop_matches"] = {x: w[x] for x in ("records", "exact", "within_1", "over_1", "max_levels")}
            res["where_the_crop_matches"]["note"] = ("the records whose crop + flip (and partner's) is byte-exact "
                                                     "with resize='pil' (the same box and decode as ml-dr's)")
            gen = _compare(ours, generated, rp["mean"], rp["std"], content)
            res["vs_generation"] = dict(gen, note="vs the pixels ml-dr's reinforce() gave the teacher for the same "
                                                "records (its generation-time replay: crop on PIL, uint8 "
                                                "truncation, RandAugment on tensors)")
            given = givens.get(key)
            if given is not None:
                solo = ~np.isnan(given).reshape(given.shape[0], given.shape[1], -1).any(-1)
                g = _compare(ours[solo][None], given[solo][None], rp["mean"], rp["std"], lambda i, k: "")
                res["given_the_same_crop"] = {
                    "records": g["records"], "exact": g["exact"], "within_1": g["within_1"], "over_1": g["over_1"],
                    "max_levels": g["max_levels"],
                    "note": "non-mixing records: ml-dr's reapply of RandAugment, erasing and normalization on "
                            "fastload's own crop + flip (with this row's resize), the way this semantics' "
                            "upstream path runs it (training: on the PIL image; generation: on the tensor after "
                            "its uint8 step)"}
            results[name][key] = res
            print(name, key, {k: v for k, v in res.items() if k not in ("by_record_content", "vs_generation")},
                  "vs generation", {k: v for k, v in gen.items() if k != "by_record_content"}, flush=True)
        print(name, "crop+flip byte-exact", results[name]["crop_flip_byte_exact"], flush=True)
    entry = {"description": ("fastload's replay of archives written by apple/ml-dr's own reinforce code vs ml-dr's "
                             "training-time ReinforcedDataset replay of the same records; levels of the "
                             "denormalized output; per config and import semantics"),
             "upstream": {"repository": "apple/ml-dr", "commit": commit,
                          "torch_torchvision_pillow": up_versions},
             "images": a.images, "augmentations_per_image": a.num_samples, "teacher": "tiny (pooled colour "
             "statistics -> 1000 classes), built here", "results": results,
             "machine_load_1min": {"start": load0[0], "end": os.getloadavg()[0]},
             "command": " ".join(["benchmarks/fidelity_upstream.py"] + (argv or sys.argv[1:]))}
    path = write_result("fidelity_upstream", entry, a.out_dir)
    with open(path) as f:
        entry = json.load(f)  # with the machine, versions, git commit and date
    latest = os.path.join(a.out_dir, "fidelity.json")
    doc = json.load(open(latest)) if os.path.exists(latest) else {}
    doc["upstream_archives"] = entry
    with open(latest + ".tmp", "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(latest + ".tmp", latest)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
