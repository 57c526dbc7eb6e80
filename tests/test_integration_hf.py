"""Hugging Face integration (examples/hf_causal_lm.py) with the real transformers and
accelerate: a tiny Llama built from a config trains on DecompositionLoader batches through
transformers.Trainer and through accelerate; constant tokens per step; a run resumed from a
mid-run checkpoint sees the batches (and, on CPU, the losses) of an uninterrupted run; rows
never span two documents and position ids restart in every row."""
import importlib.util
import os

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example():
    spec = importlib.util.spec_from_file_location("hf_causal_lm", os.path.join(ROOT, "examples", "hf_causal_lm.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _lines(path):
    with open(path) as f:
        return [tuple(line.split()) for line in f]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["trainer", "accelerate"])
def test_hf_resume_is_exact(tmp_path, mode):
    ex = _example()
    run = ex.run_trainer if mode == "trainer" else ex.run_accelerate
    w = str(tmp_path)
    full = run(w, 8, 4, None)
    log = os.path.join(w, f"batches_{mode}.txt")
    seen_full = _lines(log)
    os.remove(log)
    assert len(seen_full) == 8 and {int(t) for t, _ in seen_full} == {ex.TOKENS_PER_STEP}
    ckpt = os.path.join(w, "out", "checkpoint-4") if mode == "trainer" else os.path.join(w, "acc", "step-4")
    resumed = run(w, 8, 0, ckpt)
    assert _lines(log) == seen_full[4:]
    np.testing.assert_allclose(resumed[-4:], full[4:], rtol=1e-5)


def test_rows_are_single_documents_with_their_own_positions(tmp_path):
    import fastload

    ex = _example()
    # document d is the token d % 200 repeated: a row mixing documents would show two values
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 300, 120)
    toks = np.concatenate([np.full(n, d % 200, np.int32) for d, n in enumerate(lengths)])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    fastload.decompose((toks, offsets), str(tmp_path), min_bucket=4, max_bucket=7, vocab_size=257,
                       eot_id=256, progress=False)
    batches = ex.HFBatches(fastload.DecompositionLoader(str(tmp_path), tokens_per_step=512, seed=0))
    n = 0
    for b in batches:
        x, pos = b["input_ids"], b["position_ids"]
        assert x.numel() == 512 and torch.equal(b["shift_labels"], b["labels"])
        assert torch.equal(pos, torch.arange(x.shape[1]).expand_as(x))
        full = torch.cat([x, b["labels"][:, -1:]], 1)
        for row in full.tolist():
            assert len(set(row) - {256}) == 1, row
        n += 1
    assert n == len(batches) > 0
