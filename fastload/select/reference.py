"""Plain reference implementation of the selection rules, written from the papers' formulas
one candidate at a time (loops, no sorting tricks), to check ``fastload.select.rules``.

It consumes the random draws as ``rules`` does (one float64 uniform vector of M per sampling
round) so that the two keep the same indices on the same inputs.
"""
from __future__ import annotations

import math
from typing import List

import torch


def _gumbel(u: float) -> float:
    return -math.log(-math.log(max(u, 1e-300)))


def reference_scores(student, reference, score: str):
    # RHO-LOSS / JEST learnability: loss under the learner minus loss under the reference
    if score == "learnability":
        return [float(a) - float(b) for a, b in zip(student, reference)]
    if score == "hard":
        return [float(a) for a in student]
    return [-float(b) for b in reference]


def reference_topk(scores: List[float], k: int) -> List[int]:
    left, out = list(range(len(scores))), []
    for _ in range(k):  # repeatedly take the best remaining (first one on ties)
        best = left[0]
        for i in left:
            if scores[i] > scores[best]:
                best = i
        out.append(best)
        left.remove(best)
    return out


def reference_sample(scores: List[float], k: int, generator: torch.Generator, temperature: float = 1.0) -> List[int]:
    """Sampling without replacement from softmax(scores / T), one draw after the other: each
    draw is the argmax of perturbed log-probabilities over the candidates still left (the
    Gumbel-max trick), whose law is the softmax renormalized over what is left."""
    u = torch.rand(len(scores), generator=generator, dtype=torch.float64).tolist()
    pert = [s / temperature + _gumbel(x) for s, x in zip(scores, u)]
    return reference_topk(pert, k)


def reference_joint(A: torch.Tensor, k: int, generator: torch.Generator, chunks: int, temperature: float = 1.0) -> List[int]:
    """JEST: grow the batch chunk by chunk; a candidate's score is the batch loss with it
    minus the batch loss without it, L(S u {i}) - L(S), L(X) = sum_{a, b in X} A[a, b],
    recomputed from the definition for every candidate."""
    A = A.double().tolist()
    M = len(A)
    chunks = max(1, min(int(chunks), k))
    sizes = [k // chunks + (c < k % chunks) for c in range(chunks)]

    def loss(X):
        return sum(A[a][b] for a in X for b in X)

    S: List[int] = []
    for size in sizes:
        u = torch.rand(M, generator=generator, dtype=torch.float64).tolist()
        base = loss(S)
        pert = [(loss(S + [i]) - base) / temperature + _gumbel(u[i]) if i not in S else -math.inf
                for i in range(M)]
        S += reference_topk(pert, size)
    return S


def reference_sigmoid_pairs(img, txt, t: float, b: float) -> torch.Tensor:
    """SigLIP pair loss -log sigmoid(z (t cos(x_i, y_j) + b)), entry by entry."""
    M = len(img)
    out = torch.zeros(M, M, dtype=torch.float64)
    for i in range(M):
        for j in range(M):
            xi, yj = img[i].double(), txt[j].double()
            cos = float(xi @ yj) / (float(xi.norm()) * float(yj.norm()))
            z = 1.0 if i == j else -1.0
            out[i, j] = -math.log(1.0 / (1.0 + math.exp(-z * (t * cos + b))))
    return out
