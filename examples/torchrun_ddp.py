"""Plain PyTorch DDP + fastload, launched with torchrun: ``ReinforcedLoader`` driven by a
``VariableBatchSampler`` (one resolution per step, constant pixels per batch, the same shape
on every rank at every step) and a ``torch.compile``d model warmed once over
``sampler.shapes()``, so training never recompiles.

    torchrun --nproc_per_node=2 examples/torchrun_ddp.py WORKDIR [--epochs 2] [--no-compile] [--check-shapes]

The lines a user changes are marked ``# fastload``. Each rank appends ``epoch step b h w
sha1(images)`` per step to WORKDIR/steps_rank{R}.txt, and rank 0 writes the number of graphs
compiled after warm-up and after training to WORKDIR/compile.txt (for the tests).
"""
import argparse
import gc
import hashlib
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fastload


def prepare(workdir: str, n_images: int = 40) -> str:
    out = os.path.join(workdir, "data_plus")
    if os.path.exists(os.path.join(out, "manifest.json")):
        return out
    from fastload.datasets import build_images

    images = build_images(os.path.join(workdir, "images"), n=n_images, progress=False)
    classes = len([d for d in os.listdir(images) if os.path.isdir(os.path.join(images, d))])
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, classes)).eval()
    fastload.reinforce(images, teacher=teacher, out=out, num_augmentations=4, topk=3,
                       policy=fastload.AugmentPolicy(rrc=True, flip=True), image_size=32,
                       progress=False)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workdir")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="eager model (skips torch.compile)")
    ap.add_argument("--check-shapes", action="store_true",
                    help="the sampler checks across ranks that every step has the same shape")
    a = ap.parse_args(argv)
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank = dist.get_rank()
    if rank == 0:
        prepare(a.workdir)
    dist.barrier()
    ds = fastload.ReinforcedDataset(os.path.join(a.workdir, "data_plus"))
    # fastload: a batch sampler with one (h, w) per step; rank and world size from torch.distributed
    sampler = fastload.VariableBatchSampler(ds, base_size=32, base_batch_size=8, min_size=24,
                                            max_size=40, num_scales=3, divisible_by=8, seed=0,
                                            check_shapes=a.check_shapes)
    loader = fastload.ReinforcedLoader(ds, batch_sampler=sampler, num_workers=1)  # fastload
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, ds.num_classes))
    model = DDP(net)
    if not a.no_compile:
        model = torch.compile(model, dynamic=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def step(images, targets):
        loss = fastload.kd_loss(model(images), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()

    # fastload: compile every shape the sampler can yield up front (largest first reserves the
    # peak memory first); zero gradients keep the weights unchanged
    for b, h, w in sampler.shapes(epochs=range(a.epochs), largest_first=True):
        x = torch.zeros(b, 3, h, w)
        loss = model(x).sum() * 0
        loss.backward()
        opt.zero_grad()
    graphs = []
    if not a.no_compile:
        from torch._dynamo.utils import counters

        graphs.append(counters["frames"]["ok"])
    log = open(os.path.join(a.workdir, f"steps_rank{rank}.txt"), "w")
    steps = 0
    for epoch in range(a.epochs):
        loader.set_epoch(epoch)  # as with DistributedSampler
        for s, (images, labels, targets) in enumerate(loader):
            step(images, targets)
            digest = hashlib.sha1(images.contiguous().numpy().tobytes()).hexdigest()[:16]
            log.write(f"{epoch} {s} {images.shape[0]} {images.shape[2]} {images.shape[3]} {digest}\n")
            steps += 1
    log.close()
    if not a.no_compile:
        graphs.append(counters["frames"]["ok"])
    if rank == 0:
        with open(os.path.join(a.workdir, "compile.txt"), "w") as f:
            f.write(" ".join(map(str, graphs)) + "\n")
            f.write(" ".join(f"{b}x{h}x{w}" for b, h, w in sampler.shapes(epochs=range(a.epochs))) + "\n")
        compiled = f", {graphs[-1]} graphs compiled (none after warm-up)" if len(graphs) == 2 and graphs[0] == graphs[1] \
            else (f", graphs compiled {graphs[0]} -> {graphs[1]}" if len(graphs) == 2 else "")
        print(f"torchrun_ddp: OK, {dist.get_world_size()} ranks x {steps} steps over {a.epochs} epochs{compiled}; "
              f"logs in {a.workdir}", flush=True)
    # DDP's reducer holds the process group in reference cycles: free them now, so gloo's
    # threads are joined here and not by the interpreter's last collection at exit, where
    # their destruction can end in "terminate called without an active exception"
    del model, opt, step
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
