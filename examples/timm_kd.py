"""timm + fastload: train a timm model (built from its name, no pretrained download) by
knowledge distillation from the teacher targets stored in a reinforced dataset.

    python examples/timm_kd.py [WORKDIR] [--model resnet10t] [--steps 4]

timm needs torchvision, whose wheels pull another (CUDA) torch build (~5.5 GB): run this in
an environment of its own (README, "Use it in your trainer"). The lines a user changes in a
timm training script are marked ``# fastload``.
"""
import argparse
import os
import sys
import tempfile

import torch
from torch import nn

import fastload


def prepare(workdir: str, n_images: int = 32) -> str:
    out = os.path.join(workdir, "data_plus")
    if os.path.exists(os.path.join(out, "manifest.json")):
        return out
    from fastload.datasets import build_images

    images = build_images(os.path.join(workdir, "images"), n=n_images, progress=False)
    classes = len([d for d in os.listdir(images) if os.path.isdir(os.path.join(images, d))])
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, classes)).eval()
    fastload.reinforce(images, teacher=teacher, out=out, num_augmentations=4, topk=3,
                       policy=fastload.AugmentPolicy(rrc=True, flip=True, randaugment=(2, 9),
                                                     mixup=1.0, cutmix=1.0),
                       image_size=64, progress=False)
    return out


def main(argv=None) -> float:
    import timm

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workdir", nargs="?", default=None)
    ap.add_argument("--model", default="resnet10t")
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args(argv)
    if a.workdir is None:  # a temporary folder, removed afterwards
        with tempfile.TemporaryDirectory(prefix="fastload_timm_") as tmp:
            return main([tmp] + list(sys.argv[1:] if argv is None else argv))
    workdir = a.workdir
    ds = fastload.ReinforcedDataset(prepare(workdir))
    # fastload: replaces timm's create_loader / a DataLoader over ImageFolder with its own
    # augmentation, mixup and teacher (all stored in the dataset)
    loader = fastload.ReinforcedLoader(ds, batch_size=8, shuffle=True, drop_last=True,
                                       num_workers=2, seed=0)
    model = timm.create_model(a.model, pretrained=False, num_classes=ds.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step, loss = 0, torch.tensor(float("nan"))
    epoch = 0
    while step < a.steps:
        loader.set_epoch(epoch)
        for images, labels, targets in loader:
            loss = fastload.kd_loss(model(images), targets)  # fastload: soft teacher targets
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step >= a.steps:
                break
        epoch += 1
    print(f"timm {a.model}: {step} steps, last KD loss {loss.item():.4f}")
    return loss.item()


if __name__ == "__main__":
    main(sys.argv[1:])
