"""Hugging Face + fastload: causal-LM pretraining of a tiny Llama (built from a config, no
download) on a decomposed dataset (``fastload.DecompositionLoader``: one length bucket per
step, constant tokens per step, every row one chunk of one document), through ``accelerate``
(prepare, save_state/load_state) or ``transformers.Trainer`` (a ``get_train_dataloader``
override plus a callback that stores the loader's position in each checkpoint).

    python examples/hf_causal_lm.py WORKDIR --mode trainer --max-steps 8
    python examples/hf_causal_lm.py WORKDIR --mode trainer --max-steps 4 --save-every 4
    python examples/hf_causal_lm.py WORKDIR --mode trainer --max-steps 8 --resume WORKDIR/out/checkpoint-4
    (--mode accelerate: same flags; checkpoints are WORKDIR/acc/step-N)

The lines a user changes are marked ``# fastload``. No cross-document attention: a row never
spans two documents, so plain causal attention over the row with ``position_ids`` restarting
at 0 in every row is per-document attention (no packing mask or cu_seqlens needed). Each run
appends ``tokens sha1(input_ids)`` per step to WORKDIR/batches_MODE.txt (for the tests).
"""
import argparse
import hashlib
import os
import sys
import sysconfig

import torch

import fastload

TOKENS_PER_STEP = 2**10
LOADER_STATE = "fastload_loader.pt"


def prepare(workdir: str) -> str:
    """Byte-level tokens of real text (the standard library's json package), decomposed."""
    out = os.path.join(workdir, "dd")
    if not os.path.exists(os.path.join(out, "manifest.json")):
        from fastload.tokens.decompose import tokenize_folder

        src = os.path.join(sysconfig.get_paths()["stdlib"], "json")
        tokens = tokenize_folder(src, os.path.join(workdir, "tokens"), pattern="*.py")
        fastload.decompose(tokens, out=out, min_bucket=5, max_bucket=8, seed=0, progress=False)
    return out


def tiny_llama(vocab_size: int = 257):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=1024)
    return LlamaForCausalLM(cfg)


class HFBatches:
    """DecompositionLoader batches as the dict a causal LM takes. ``targets`` are already the
    next tokens (the chunk's +1 token included), so they go in as ``shift_labels`` and the
    model does not shift again (no token of the step is lost). Passes state and epochs on."""

    def __init__(self, loader, log=None):
        self.loader, self.log = loader, log

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch):
        # Trainer calls set_epoch(epoch) at every epoch start, also right after a mid-epoch
        # resume: set_epoch of the current epoch keeps the loaded position (fastload's state
        # contract), so it is passed on as it is
        self.loader.set_epoch(epoch)

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)

    def __iter__(self):
        for x, y in self.loader:
            if self.log:
                with open(self.log, "a") as f:
                    f.write(f"{x.numel()} {hashlib.sha1(x.numpy().tobytes()).hexdigest()[:16]}\n")
            pos = torch.arange(x.shape[1]).expand_as(x)  # restarts in every row: one document each
            yield {"input_ids": x, "labels": y, "shift_labels": y, "position_ids": pos}


def loader_for(path: str):
    # fastload: rank and world size from torch.distributed; one bucket per step
    return fastload.DecompositionLoader(path, tokens_per_step=TOKENS_PER_STEP, seed=0)


def run_trainer(workdir: str, max_steps: int, save_every: int, resume):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    batches = HFBatches(loader_for(prepare(workdir)), os.path.join(workdir, "batches_trainer.txt"))

    class FastloadTrainer(Trainer):
        def get_train_dataloader(self):  # fastload: the loader instead of a DataLoader
            return batches

    class LoaderState(TrainerCallback):  # fastload: the loader's position in every checkpoint
        def on_save(self, args, state, control, **kw):
            ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            torch.save(batches.state_dict(), os.path.join(ckpt, LOADER_STATE))

    args = TrainingArguments(
        output_dir=os.path.join(workdir, "out"), max_steps=max_steps, learning_rate=1e-3,
        save_strategy="steps" if save_every else "no", save_steps=save_every or 500,
        report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1, seed=0,
        lr_scheduler_type="constant",
        ignore_data_skip=True)  # fastload: the loader resumes itself (below), Trainer must not skip
    trainer = FastloadTrainer(model=tiny_llama(), args=args, callbacks=[LoaderState()])
    if resume:  # fastload
        batches.load_state_dict(torch.load(os.path.join(resume, LOADER_STATE), weights_only=True))
    trainer.train(resume_from_checkpoint=resume)
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]  # resumed: all steps


def run_accelerate(workdir: str, max_steps: int, save_every: int, resume):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = HFBatches(loader_for(prepare(workdir)), os.path.join(workdir, "batches_accelerate.txt"))
    model, opt = acc.prepare(model, opt)  # fastload: the loader is not prepared (it shards itself)
    acc.register_for_checkpointing(batches)  # fastload: save_state/load_state carry its position
    step = 0
    if resume:
        acc.load_state(resume)
        step = int(os.path.basename(resume).split("-")[1])
    losses = []
    while step < max_steps:
        for batch in batches:  # a finished pass moves the loader to the next epoch by itself
            loss = model(**batch).loss
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            step += 1
            if save_every and step % save_every == 0:
                acc.save_state(os.path.join(workdir, "acc", f"step-{step}"))
            if step >= max_steps:
                break
    return losses


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workdir")
    ap.add_argument("--mode", choices=["trainer", "accelerate"], default="trainer")
    ap.add_argument("--max-steps", type=int, default=8)
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--resume", default=None)
    a = ap.parse_args(argv)
    run = run_trainer if a.mode == "trainer" else run_accelerate
    losses = run(a.workdir, a.max_steps, a.save_every, a.resume)
    print("losses", " ".join(f"{x:.6f}" for x in losses))
    return losses


if __name__ == "__main__":
    main(sys.argv[1:])
