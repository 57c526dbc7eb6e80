"""The selection rules of online batch selection, on tensors (no loader involved).

Scores (RECIPES.md section 6; RHO-LOSS, JEST, ACID): with per-example losses ``s`` under the
student being trained and ``r`` under a fixed reference model,

- ``"learnability"``: ``s - r`` (high where the student errs but the reference finds it easy),
- ``"hard"``: ``s``, ``"easy"``: ``-r``.

Methods, keeping ``k`` of ``M`` candidates:

- ``"topk"``: the ``k`` highest scores (ties to the lower position).
- ``"sample"``: ``k`` draws without replacement from ``softmax(score / temperature)``, by the
  Gumbel-top-k trick (equivalent in law to sequential sampling, one sort instead of k passes).
- ``"joint"`` (JEST): for a contrastive batch loss that is a sum of pairwise terms
  ``L(S) = sum_{i, j in S} A[i, j]`` (the sigmoid loss is), the kept set grows in ``chunks``
  chunks; a candidate's score is its *conditional* learnability given the set ``S`` already
  chosen, ``L(S + {i}) - L(S) = A[i, i] + sum_{j in S} (A[i, j] + A[j, i])``, and each chunk is
  sampled without replacement from ``softmax(conditional / temperature)``.

Randomness is an explicit ``torch.Generator``; the noise is drawn as float64 uniforms, one
vector of ``M`` per chunk (one in all for "sample"), so the reference implementation
(``fastload.select.reference``) consuming the same draws must keep the same indices.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

SCORES = ("learnability", "hard", "easy")
METHODS = ("topk", "sample", "joint")


def combine(student: Optional[torch.Tensor], reference: Optional[torch.Tensor], score: str) -> torch.Tensor:
    """The score (vector or pairwise matrix) from the student and reference terms."""
    if score == "learnability":
        return student - reference
    if score == "hard":
        return student
    if score == "easy":
        return -reference
    raise ValueError(f"score must be one of {SCORES}, got {score!r}")


def gumbel(u: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise from uniforms in [0, 1) (clamped away from 0 so the log is finite).

    libm's log, one value at a time: correctly rounded, so the same on every CPU (a SIMD log
    may differ in the last bit between AVX2 and AVX-512 and flip a near tie); and torch.log on
    a small tensor right after a multi-threaded forward took 15 ms (measured), this ~20 us."""
    return torch.tensor([-math.log(-math.log(max(x, 1e-300))) for x in u.tolist()], dtype=torch.float64)


def uniforms(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64)


def _top(values: torch.Tensor, k: int) -> torch.Tensor:
    # a stable descending sort: equal values keep their order (topk's tie order is unspecified)
    return torch.argsort(-values, stable=True)[:k]


def select_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    return _top(scores.double(), k)


def select_sample(scores: torch.Tensor, k: int, generator: torch.Generator,
                  temperature: float = 1.0) -> torch.Tensor:
    g = gumbel(uniforms(len(scores), generator))
    return _top(scores.double() / temperature + g, k)


def chunk_sizes(k: int, chunks: int) -> List[int]:
    chunks = max(1, min(int(chunks), k))
    base, extra = divmod(k, chunks)
    return [base + (c < extra) for c in range(chunks)]


def select_joint(pairs: torch.Tensor, k: int, generator: torch.Generator, chunks: int = 4,
                 temperature: float = 1.0) -> torch.Tensor:
    """JEST-style joint selection on a pairwise score matrix ``pairs`` [M, M]."""
    A = pairs.double()
    M = A.shape[0]
    sym = A + A.T
    diag = torch.diagonal(A)
    chosen = torch.zeros(M, dtype=torch.bool)
    cond_sum = torch.zeros(M, dtype=torch.float64)  # sum_{j in S} (A[i, j] + A[j, i])
    out = []
    for size in chunk_sizes(k, chunks):
        cond = (diag + cond_sum) / temperature + gumbel(uniforms(M, generator))
        cond = cond.masked_fill(chosen, float("-inf"))
        pick = _top(cond, size)
        out.append(pick)
        chosen[pick] = True
        cond_sum += sym[:, pick].sum(dim=1)
    return torch.cat(out)


def sigmoid_pair_losses(image_emb: torch.Tensor, text_emb: torch.Tensor, temperature: float = 10.0,
                        bias: float = -10.0) -> torch.Tensor:
    """SigLIP's pairwise loss matrix: ``A[i, j] = log(1 + exp(-z_ij (t <x_i, y_j> + b)))`` with
    ``z_ii = 1`` and ``z_ij = -1`` off the diagonal, on L2-normalized embeddings; the loss of a
    batch ``S`` is ``sum_{i, j in S} A[i, j]``. (t, b) default to SigLIP's initialization."""
    x = torch.nn.functional.normalize(image_emb.double(), dim=-1)
    y = torch.nn.functional.normalize(text_emb.double(), dim=-1)
    logits = temperature * (x @ y.T) + bias
    z = 2 * torch.eye(len(x), dtype=torch.float64) - 1
    return torch.nn.functional.softplus(-z * logits)


def clip_example_losses(image_emb: torch.Tensor, text_emb: torch.Tensor, temperature: float = 100.0) -> torch.Tensor:
    """Per-example softmax contrastive (CLIP) loss within the batch: the mean of the
    image-to-text and text-to-image cross-entropies of each pair."""
    x = torch.nn.functional.normalize(image_emb.double(), dim=-1)
    y = torch.nn.functional.normalize(text_emb.double(), dim=-1)
    logits = temperature * (x @ y.T)
    idx = torch.arange(len(x))
    i2t = torch.nn.functional.cross_entropy(logits, idx, reduction="none")
    t2i = torch.nn.functional.cross_entropy(logits.T, idx, reduction="none")
    return (i2t + t2i) / 2
