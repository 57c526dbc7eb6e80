"""open_clip + fastload: train a small CLIP (built from a config, no download) with
MobileCLIP's ``clip_distill_loss`` on a DataCompDR-style dataset imported with
``fastload import-datacomp`` (stored augmentations, synthetic captions and teacher
embeddings replayed by ``ReinforcedLoader``).

    python examples/open_clip_distill.py [WORKDIR] [--steps 4]

open_clip needs torchvision, whose wheels pull another (CUDA) torch build (~5.5 GB): run this
in an environment of its own (README, "Use it in your trainer"). Here a few DataCompDR-style
WebDataset shards are written from scikit-image photos with random teacher embeddings; with
the real DataCompDR, point ``import_datacomp`` at its tars. The lines a user changes in an
open_clip training script are marked ``# fastload``.
"""
import argparse
import io
import json
import os
import sys
import tarfile
import tempfile

import numpy as np
import torch

import fastload

N_AUG, D_TEACHER = 4, 32


def _add(tf, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_datacompdr_like(workdir: str, n: int = 24):
    """One reinforcement tar (KEY.syn.json, KEY.paug.json, KEY.npz) and one image tar
    (KEY.jpg, KEY.txt), the DataCompDR layout."""
    import skimage.data as sd
    from PIL import Image

    rng = np.random.default_rng(0)
    photos = [sd.astronaut(), sd.coffee(), sd.chelsea(), sd.rocket()]
    dr, im = os.path.join(workdir, "dr-00000.tar"), os.path.join(workdir, "img-00000.tar")
    with tarfile.open(dr, "w") as tdr, tarfile.open(im, "w") as tim:
        for s in range(n):
            key = f"{s:08d}"
            img = np.ascontiguousarray(photos[s % len(photos)][: 160 + 4 * s, : 150 + 3 * s])
            h, w = img.shape[:2]
            paug = []
            for _ in range(N_AUG):
                bh, bw = int(rng.integers(h // 2, h)), int(rng.integers(w // 2, w))
                i, j = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
                paug.append([[i, j, bh, bw], [["Brightness", int(rng.integers(-9, 10))]]])
            buf = io.BytesIO()
            np.savez(buf, image_emb=rng.standard_normal((N_AUG, D_TEACHER)).astype(np.float32),
                     text_emb=rng.standard_normal((1 + 3, D_TEACHER)).astype(np.float32))
            _add(tdr, f"{key}.syn.json", json.dumps({"syn_text": [f"a photo, view {s}.{c}" for c in range(3)]}).encode())
            _add(tdr, f"{key}.paug.json", json.dumps({"param_aug": paug}).encode())
            _add(tdr, f"{key}.npz", buf.getvalue())
            jpg = io.BytesIO()
            Image.fromarray(img).save(jpg, format="JPEG", quality=90)
            _add(tim, f"{key}.jpg", jpg.getvalue())
            _add(tim, f"{key}.txt", f"photo number {s}".encode())
    return dr, im


def prepare(workdir: str) -> str:
    os.makedirs(workdir, exist_ok=True)
    out = os.path.join(workdir, "datacompdr_plus")
    if not os.path.exists(os.path.join(out, "manifest.json")):
        from fastload.importers.datacomp import import_datacomp

        dr, im = write_datacompdr_like(workdir)
        import_datacomp([dr], out, images=[im])  # fastload: once, `fastload import-datacomp`
    return out


def main(argv=None) -> float:
    import open_clip

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workdir", nargs="?", default=None)
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args(argv)
    if a.workdir is None:  # a temporary folder, removed afterwards
        with tempfile.TemporaryDirectory(prefix="fastload_clip_") as tmp:
            return main([tmp] + list(sys.argv[1:] if argv is None else argv))
    workdir = a.workdir
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=32,
                           vision_cfg=dict(layers=2, width=64, head_width=32, patch_size=16, image_size=64),
                           text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=2, layers=2))
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=16)  # bundled BPE vocabulary
    # fastload: replaces open_clip's WebDataset pipeline; captions are tokenized per batch
    loader = fastload.ReinforcedLoader(prepare(workdir), batch_size=8, shuffle=True,
                                       drop_last=True, image_size=64, num_workers=2,
                                       tokenizer=tokenizer, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step, epoch, loss = 0, 0, torch.tensor(float("nan"))
    while step < a.steps:
        loader.set_epoch(epoch)
        for b in loader:  # an ImageTextBatch
            img = model.encode_image(b.images)
            # fastload: MobileCLIP's loss, real and synthetic captions against the stored
            # teacher embeddings of this augmentation and these captions
            loss = (fastload.clip_distill_loss(img, model.encode_text(b.captions), model.logit_scale.exp(),
                                               b.image_emb, b.text_emb)
                    + fastload.clip_distill_loss(img, model.encode_text(b.syn_captions),
                                                 model.logit_scale.exp(), b.image_emb, b.syn_text_emb))
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step >= a.steps:
                break
        epoch += 1
    print(f"open_clip: {step} steps, last loss {loss.item():.4f}")
    return loss.item()


if __name__ == "__main__":
    main(sys.argv[1:])
