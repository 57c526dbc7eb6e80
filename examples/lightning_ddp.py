"""PyTorch Lightning + fastload: a LightningDataModule whose train_dataloader() returns a
``fastload.ReinforcedLoader``; DDP on 2 CPU processes (gloo); mid-epoch checkpoint and exact
resume through Lightning's own checkpoint (the loader's state_dict travels in it).

    python examples/lightning_ddp.py WORKDIR --max-steps 9                 # uninterrupted
    python examples/lightning_ddp.py WORKDIR --max-steps 4 --save-every 4   # stop mid-epoch
    python examples/lightning_ddp.py WORKDIR --max-steps 9 --resume WORKDIR/ckpt/epoch=0-step=4.ckpt

The lines a user changes in an existing Lightning project are marked ``# fastload``.
Each rank appends ``step rank sha1(images)`` to WORKDIR/batches_rank{R}.txt so a test can
compare a resumed run with an uninterrupted one batch for batch.
"""
import argparse
import hashlib
import os
import sys

import torch
from torch import nn

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

import fastload

BATCH, SIZE = 4, 32


def prepare(workdir: str, n_images: int = 48) -> str:
    """A small reinforced dataset from real photos (scikit-image) and a tiny teacher."""
    out = os.path.join(workdir, "data_plus")
    if os.path.exists(os.path.join(out, "manifest.json")):
        return out
    from fastload.datasets import build_images

    images = build_images(os.path.join(workdir, "images"), n=n_images, progress=False)
    classes = len([d for d in os.listdir(images) if os.path.isdir(os.path.join(images, d))])
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, classes)).eval()
    fastload.reinforce(images, teacher=teacher, out=out, num_augmentations=4, topk=3,
                       policy=fastload.AugmentPolicy(rrc=True, flip=True), image_size=SIZE,
                       progress=False)
    return out


class Data(L.LightningDataModule):
    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def train_dataloader(self):
        # fastload: was DataLoader(ImageFolder(...), batch_size=..., shuffle=True, ...). Rank and
        # world size come from torch.distributed (Lightning initialized it), image size and
        # classes from the dataset's manifest.
        return fastload.ReinforcedLoader(self.path, batch_size=BATCH, shuffle=True, seed=0,
                                         drop_last=True, num_workers=1)


class Student(L.LightningModule):
    def __init__(self, num_classes: int, log: str):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(8, num_classes))
        self.log_path = log

    def on_train_epoch_start(self):
        # fastload: Lightning calls set_epoch only on a DataLoader's sampler; tell the loader
        # (same epoch: keeps a resumed mid-epoch position)
        self.trainer.train_dataloader.set_epoch(self.current_epoch)

    def training_step(self, batch, batch_idx):
        images, labels, targets = batch
        with open(self.log_path.format(rank=self.global_rank), "a") as f:
            digest = hashlib.sha1(images.contiguous().numpy().tobytes()).hexdigest()[:16]
            f.write(f"{self.global_step} {self.global_rank} {digest}\n")
        return fastload.kd_loss(self.net(images), targets)  # fastload: KD loss on stored targets

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workdir")
    ap.add_argument("--max-steps", type=int, default=9)
    ap.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: never)")
    ap.add_argument("--resume", default=None, help="a Lightning checkpoint to resume from")
    ap.add_argument("--devices", type=int, default=2)
    args = ap.parse_args(argv)
    path = prepare(args.workdir)  # children of the DDP launcher find it ready
    num_classes = fastload.ReinforcedDataset(path).num_classes
    callbacks = []
    if args.save_every:
        callbacks.append(ModelCheckpoint(dirpath=os.path.join(args.workdir, "ckpt"),
                                         every_n_train_steps=args.save_every, save_top_k=-1))
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp",
                        max_steps=args.max_steps, callbacks=callbacks, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=bool(args.save_every),
                        use_distributed_sampler=False)  # fastload: the loader shards itself
    model = Student(num_classes, os.path.join(args.workdir, "batches_rank{rank}.txt"))
    trainer.fit(model, datamodule=Data(path), ckpt_path=args.resume)


if __name__ == "__main__":
    main(sys.argv[1:])
