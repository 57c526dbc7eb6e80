"""Reinforce an image folder once with a teacher, then train a student from the stored
augmentations and teacher targets with ``fastload.ReinforcedLoader`` (no teacher at training
time). Runs on a CPU in a minute: ``python examples/reinforce_and_train.py [WORKDIR]``."""
import os
import sys
import tempfile

import torch
from torch import nn

import fastload
from fastload.datasets import build_images  # real photos from scikit-image -> JPEG folder


def main(workdir: str, n_images: int = 64) -> float:
    images = build_images(os.path.join(workdir, "images"), n=n_images, progress=False)
    num_classes = len([d for d in os.listdir(images) if os.path.isdir(os.path.join(images, d))])

    # 1. Once: N augmentations per image, the teacher's top-k probabilities stored with them.
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(3 * 64, num_classes)).eval()
    policy = fastload.AugmentPolicy(rrc=True, flip=True, randaugment=(2, 9), erase=0.25,
                                    mixup=1.0, cutmix=1.0)
    out = os.path.join(workdir, "images_plus")
    fastload.reinforce(images, teacher=teacher, out=out, num_augmentations=8, topk=5,
                       policy=policy, image_size=64, progress=False)

    # 2. Every run: replay with the fused kernel; targets are dense teacher probabilities.
    ds = fastload.ReinforcedDataset(out)
    loader = fastload.ReinforcedLoader(ds, batch_size=16, shuffle=True, num_workers=2,
                                       image_size=64, drop_last=True, seed=0)
    student = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(8, num_classes))
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    for epoch in range(2):
        loader.set_epoch(epoch)
        for images_b, labels, targets in loader:
            loss = fastload.kd_loss(student(images_b), targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
    print(f"{len(ds)} images x {ds.num_augmentations} stored augmentations; last KD loss {loss.item():.4f}")
    return loss.item()


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:  # a temporary folder, removed afterwards
        with tempfile.TemporaryDirectory(prefix="fastload_example_") as tmp:
            main(tmp)
