"""``OnlineBatchSelector``: online batch selection (ACID / ACED, JEST, RHO-LOSS) around a
``ReinforcedLoader`` that yields super-batches.

The wrapped loader renders super-batches of ``M = batch_size`` rows (build it with
``batch_size = B / keep``); per super-batch the selector asks the caller's ``score_fn`` for
the student's term (on the caller's thread, under ``torch.no_grad``), looks the reference term
up, applies the rule of ``fastload.select.rules`` and yields the kept ``B = round(M * keep)``
rows with their dataset indices.

Reference term (``reference=``), fixed, so it costs a lookup or one small matmul:
- ``None`` (default): what the reinforced dataset already stores per augmentation: for
  classification the teacher's loss on the label, ``-log p_teacher(label)`` from the batch's
  targets; for image-text the loss of the stored teacher embeddings (``image_emb``,
  ``text_emb``: a DataCompDR import as is) within the super-batch.
- an array ``[N]`` (per dataset row) or ``[N, A]`` (per row and stored augmentation, e.g. the
  sidecar of ``fastload.select.score_reference``), or a path to such a ``.npy``;
- a callable ``reference(batch) -> Tensor[M]`` (or ``[M, M]`` for ``method="joint"``).

Student term (``score_fn(batch)``): ``Tensor[M]`` per-example losses; ``[M, C]`` logits for
classification (cross-entropy with the labels); a pair ``(image_emb, text_emb)`` of the
student's ``[M, D]`` embeddings for image-text; for ``method="joint"`` a ``[M, M]`` pairwise
loss matrix or the embedding pair (SigLIP pair losses, ``rules.sigmoid_pair_losses``).

Render less (``render_size=``): the wrapped loader renders the super-batch at its own, low
``image_size`` for scoring; only the kept rows are rendered again at ``render_size`` by a
companion ``ReinforcedLoader`` (same dataset, seed and settings; it replays the same stored
augmentation of each row, since the augmentation choice is a function of (seed, epoch,
row)). Rendering ``M`` rows at ``s^2`` and ``B`` at ``S^2`` instead of ``M`` at ``S^2`` saves
``1 - (s/S)^2 - keep`` of the pixel work (0.55 at keep=0.2, 112 vs 224).

Distributed (``scope=``): ``"rank"`` selects within each rank's share of the super-batch;
``"global"`` all-gathers the scores and indices (on the caller's thread), every rank makes
the same selection over the global super-batch, and rank r renders its slice of the kept
indices with the companion loader (topk/sample only: the joint rule needs all embeddings).

Resume: ``state_dict()`` follows ``fastload._state`` (kind, version, epoch, step,
fingerprint) and nests the loader's state under ``"loader"``; the selection noise is a
function of (seed, epoch, step[, rank]), so a restored model and selector keep the same
indices; the last kept indices are in the state too (``"last_kept"``).
"""
from __future__ import annotations

import os
import queue
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import torch

from fastload._state import Position
from fastload.select import rules


class SelectedBatch(NamedTuple):
    """batch: the kept rows, in the wrapped loader's batch structure; indices: their dataset
    rows (int64 [B]); positions: their rows in the (rank's, or with scope="global" the
    gathered) super-batch; scores: the selection scores of the kept rows (float64 [B])."""
    batch: Any
    indices: torch.Tensor
    positions: torch.Tensor
    scores: torch.Tensor


def take(batch, keep: torch.Tensor, m: int):
    """Rows ``keep`` of every per-row part of a batch (tensors and lists with ``m`` rows)."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0 or batch.shape[0] != m:
            raise ValueError(f"cannot select rows of a batch part of shape {tuple(batch.shape)} "
                             f"(expected {m} rows)")
        return batch[keep.to(batch.device)]
    if isinstance(batch, list):
        return [batch[i] for i in keep.tolist()]
    if isinstance(batch, tuple):
        parts = [take(x, keep, m) for x in batch]
        return type(batch)(*parts) if hasattr(batch, "_fields") else tuple(parts)
    if hasattr(batch, "keys") and hasattr(batch, "__getitem__"):  # dict, BatchEncoding
        return type(batch)({k: take(batch[k], keep, m) for k in batch.keys()}) \
            if isinstance(batch, dict) else {k: take(batch[k], keep, m) for k in batch.keys()}
    if batch is None:
        return None
    raise TypeError(f"cannot select rows of a batch part of type {type(batch).__name__}")


def _images(batch):
    return batch[0] if isinstance(batch, tuple) else batch


def _check_finite(t: torch.Tensor, what: str, rows: np.ndarray) -> None:
    bad = ~torch.isfinite(t)
    if bad.any():
        where = torch.nonzero(bad.reshape(len(t), -1).any(dim=1)).flatten()[:8].tolist()
        raise ValueError(f"{what} has NaN or infinite values at super-batch rows {where} "
                         f"(dataset rows {[int(rows[i]) for i in where]})")


class _Feed:
    """A batch sampler yielding the kept rows the selector pushes, one list per batch; it
    waits (in the companion loader's prefetch thread, if any) until the next list comes, and
    ends at ``close()``."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()
        self.closed = False

    def push(self, rows) -> None:
        self.q.put(rows)

    def close(self) -> None:
        self.closed = True
        self.q.put(None)

    def __iter__(self):
        while True:
            try:
                b = self.q.get(timeout=0.5)
            except queue.Empty:
                if self.closed:
                    return
                continue
            if b is None:
                return
            yield b

    def __len__(self):
        return 1 << 40


class OnlineBatchSelector:
    """Keep ``keep`` of every super-batch of ``loader`` by the learnability rule.

    Arguments: ``loader`` (a ``ReinforcedLoader`` with the built-in order, or a sampler with
    ``global_order``), ``score_fn`` (the student term, see the module docstring; may be
    ``None`` with ``score="easy"``), ``keep`` in (0, 1], ``score`` ("learnability", "hard",
    "easy"), ``method`` ("topk", "sample", "joint"), ``chunks`` (joint), ``temperature``
    (sample / joint softmax), ``reference`` (module docstring), ``seed``, ``render_size``
    (render less), ``scope`` ("rank", "global"), ``ref_temperature`` / ``ref_bias``: the
    contrastive loss settings of the stored-embedding reference (softmax temperature for
    topk/sample; SigLIP t, b for joint; the student's pair losses use the same).

    Iterating yields ``SelectedBatch(batch, indices, positions, scores)``.
    """

    def __init__(self, loader, score_fn: Optional[Callable] = None, keep: float = 0.2,
                 score: str = "learnability", method: str = "topk", chunks: int = 4,
                 temperature: float = 1.0, reference=None, seed: int = 0, render_size=None,
                 scope: str = "rank", ref_temperature: Optional[float] = None,
                 ref_bias: float = -10.0):
        if not isinstance(keep, (int, float)) or not 0.0 < float(keep) <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {keep!r}")
        if score not in rules.SCORES:
            raise ValueError(f"score must be one of {rules.SCORES}, got {score!r}")
        if method not in rules.METHODS:
            raise ValueError(f"method must be one of {rules.METHODS}, got {method!r}")
        if scope not in ("rank", "global"):
            raise ValueError(f"scope must be 'rank' or 'global', got {scope!r}")
        if scope == "global" and method == "joint":
            raise ValueError("scope='global' supports method 'topk' or 'sample' (the joint rule "
                             "needs every rank's embeddings); use scope='rank' for 'joint'")
        if score_fn is None and score != "easy":
            raise ValueError(f"score={score!r} needs score_fn (the student's term)")
        if int(chunks) < 1 or float(temperature) <= 0:
            raise ValueError(f"chunks must be >= 1 and temperature > 0, got {chunks}, {temperature}")
        self.loader, self.score_fn = loader, score_fn
        self.keep, self.score, self.method = float(keep), score, method
        self.chunks, self.temperature, self.seed = int(chunks), float(temperature), int(seed)
        self.scope = scope
        self.kind = getattr(loader, "kind", "classification")
        self.ref_temperature = float(ref_temperature if ref_temperature is not None
                                     else (10.0 if method == "joint" else 100.0))
        self.ref_bias = float(ref_bias)
        self.reference = self._load_reference(reference)
        self.render_size = render_size
        if (render_size is not None or scope == "global") and (
                loader.views != 1 or loader.p_reinforced != 1.0):
            raise ValueError("render_size and scope='global' need views_per_decode=1 and "
                             "p_reinforced=1.0 (the companion loader replays stored augmentations)")
        self._pos = Position("OnlineBatchSelector")
        self.last_kept: list = []

    # ------------------------------------------------------------------ reference
    def _load_reference(self, reference):
        if reference is None or callable(reference):
            return reference
        if isinstance(reference, (str, os.PathLike)):
            reference = np.load(os.fspath(reference), allow_pickle=False)
        ref = torch.as_tensor(np.asarray(reference), dtype=torch.float64)
        n, A = len(self.loader.dataset), int(self.loader.num_augmentations)
        if ref.dim() not in (1, 2) or ref.shape[0] != n or (ref.dim() == 2 and ref.shape[1] != A):
            raise ValueError(f"reference must have shape [{n}] (dataset rows) or [{n}, {A}] (rows x "
                             f"stored augmentations), got {tuple(ref.shape)}")
        if self.method == "joint":
            raise ValueError("method='joint' needs a pairwise reference: pass reference=None "
                             "(stored embeddings) or a callable returning [M, M]")
        if not torch.isfinite(ref).all():
            bad = torch.nonzero(~torch.isfinite(ref.reshape(n, -1)).all(dim=1)).flatten()[:8].tolist()
            raise ValueError(f"reference has NaN or infinite values at dataset rows {bad}")
        return ref

    def _reference_term(self, batch, rows, aug, m) -> torch.Tensor:
        ref = self.reference
        joint = self.method == "joint"
        if callable(ref):
            out = torch.as_tensor(ref(batch)).double().cpu()
            want = (m, m) if joint else (m,)
            if tuple(out.shape) != want:
                raise ValueError(f"reference callable returned shape {tuple(out.shape)}, expected {list(want)}")
        elif ref is not None:
            out = ref[torch.from_numpy(rows)] if ref.dim() == 1 else \
                ref[torch.from_numpy(rows), torch.from_numpy(aug)]
        elif self.kind == "image_text":
            ie, te = batch.image_emb.cpu(), batch.text_emb.cpu()
            out = rules.sigmoid_pair_losses(ie, te, self.ref_temperature, self.ref_bias) if joint \
                else rules.clip_example_losses(ie, te, self.ref_temperature)
        else:
            if joint:
                raise ValueError("method='joint' on classification data needs a reference "
                                 "callable returning [M, M] (or score='hard')")
            out = _teacher_loss(batch[1].cpu(), batch[2])
        _check_finite(out, "the reference term", rows)
        return out

    # ------------------------------------------------------------------ student
    def _student_term(self, batch, rows, m) -> torch.Tensor:
        with torch.no_grad():
            out = self.score_fn(batch)
        joint = self.method == "joint"
        if isinstance(out, (tuple, list)) and len(out) == 2:
            ie, te = (torch.as_tensor(x).detach().cpu() for x in out)
            if ie.dim() != 2 or te.shape != ie.shape or ie.shape[0] != m:
                raise ValueError(f"score_fn returned embeddings of shapes {tuple(ie.shape)}, "
                                 f"{tuple(te.shape)}; expected two [{m}, D]")
            out = rules.sigmoid_pair_losses(ie, te, self.ref_temperature, self.ref_bias) if joint \
                else rules.clip_example_losses(ie, te, self.ref_temperature)
        else:
            out = torch.as_tensor(out).detach().cpu().double()
            if not joint and out.dim() == 2 and out.shape[0] == m and self.kind == "classification":
                _check_finite(out, "score_fn's logits", rows)
                labels = batch[1].cpu()
                out = torch.nn.functional.cross_entropy(out, labels, reduction="none")
            want = (m, m) if joint else (m,)
            if tuple(out.shape) != want:
                raise ValueError(f"score_fn returned shape {tuple(out.shape)}, expected {list(want)} "
                                 f"({'a pairwise loss matrix' if joint else 'per-example losses'} "
                                 f"of the {m}-row super-batch)")
        _check_finite(out, "score_fn's output", rows)
        return out

    # ------------------------------------------------------------------ selection
    def _generator(self, epoch: int, step: int, rank: int) -> torch.Generator:
        ss = np.random.SeedSequence([self.seed & (2 ** 64 - 1), epoch, step, rank + 1, 0x5E1EC7])
        return torch.Generator().manual_seed(int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1)))

    def _select(self, s: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
        if self.method == "topk":
            return rules.select_topk(s, k)
        if self.method == "sample":
            return rules.select_sample(s, k, g, self.temperature)
        return rules.select_joint(s, k, g, self.chunks, self.temperature)

    def kept_size(self, m: int) -> int:
        return max(1, int(round(m * self.keep)))

    def select(self, batch, plan):
        """Scores of one super-batch (no rendering); ``plan``: the loader's ``batch_plan``
        of it (rows and the stored augmentation each replays)."""
        rows = plan.indices
        m = len(rows)
        st = self._student_term(batch, rows, m) if self.score != "easy" else None
        ref = self._reference_term(batch, rows, plan.aug_ids, m) if self.score != "hard" else None
        s = rules.combine(st, ref, self.score)
        return s, m

    # ------------------------------------------------------------------ iteration
    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self.loader.epoch

    def __iter__(self):
        L = self.loader
        need = self.render_size is not None or self.scope == "global"
        comp = None
        it = iter(L)
        try:
            while True:
                st = L.state_dict()
                epoch, step = int(st["epoch"]), int(st["step"])
                try:
                    batch = next(it)
                except StopIteration:
                    return
                plan = L.batch_plan(epoch, step)  # the rows the loader just rendered
                rows = plan.indices
                s, m = self.select(batch, plan)
                k = self.kept_size(m)
                if self.scope == "global":
                    from fastload.select._dist import gather_scores

                    s_all, rows_all = gather_scores(s, rows)
                    W = len(rows_all) // m
                    pos_all = self._select(s_all, k * W, self._generator(epoch, step, -1))
                    pos = pos_all[L.rank * k:(L.rank + 1) * k]
                    kept_rows, kept_s = rows_all[pos.numpy()], s_all[pos]
                else:
                    pos = self._select(s, k, self._generator(epoch, step, L.rank))
                    kept_rows = rows[pos.numpy()]
                    kept_s = s[pos] if s.dim() == 1 else torch.diagonal(s)[pos]
                if need:
                    if comp is None or comp[1] != epoch:
                        if comp is not None:
                            comp[2].close()
                        comp = self._companion(epoch)
                    comp[2].push(kept_rows.tolist())
                    out = next(comp[3])
                else:
                    out = take(batch, pos, m)
                self.last_kept = kept_rows.tolist()
                yield SelectedBatch(out, torch.from_numpy(np.asarray(kept_rows, dtype=np.int64)), pos, kept_s)
        finally:
            if comp is not None:
                comp[2].close()

    def _companion(self, epoch: int = 0):
        """A loader rendering the kept rows (at render_size) with the wrapped loader's settings."""
        from fastload.loader.reinforced import ReinforcedLoader

        L = self.loader
        feed = _Feed()
        comp = ReinforcedLoader(
            L.dataset, batch_sampler=feed, num_workers=L.num_workers, seed=L.seed,
            image_size=self.render_size if self.render_size is not None else L.image_size,
            mean=L.mean, std=L.std, dtype=L.dtype, device=L.device, target_format=L.target_format,
            target_mode=L.target_mode, aug_choice=L.aug_choice, interpolation=L.interpolation,
            dct_scale=L.dct_scale, tokenizer=L.tokenizer, num_classes=L.num_classes,
            on_error=L.on_error, rank=0, world_size=1)
        comp.set_epoch(epoch)
        return comp, epoch, feed, iter(comp)

    # ------------------------------------------------------------------ state
    def _fingerprint(self) -> dict:
        return {"keep": self.keep, "score": self.score, "method": self.method, "chunks": self.chunks,
                "temperature": self.temperature, "seed": self.seed, "scope": self.scope}

    def state_dict(self) -> dict:
        st = self.loader.state_dict()
        self._pos.epoch, self._pos.step = int(st["epoch"]), int(st["step"])
        return self._pos.state(self._fingerprint(), loader=st, last_kept=list(self.last_kept))

    def load_state_dict(self, state: dict) -> None:
        self._pos.load(state, self._fingerprint())
        if "loader" not in state:
            raise ValueError("OnlineBatchSelector.load_state_dict: the state has no 'loader' entry")
        self.loader.load_state_dict(state["loader"])
        self.last_kept = [int(i) for i in state.get("last_kept", [])]


def _teacher_loss(labels: torch.Tensor, targets) -> torch.Tensor:
    """-log p_teacher(label) from the stored targets (dense [M, C] or top-k (ids, probs));
    a label outside the teacher's top-k gets the floor probability 1e-6."""
    labels = labels.long()
    if isinstance(targets, (tuple, list)):
        ids, probs = (torch.as_tensor(t).cpu() for t in targets)
        hit = ids == labels[:, None]
        p = (probs.double() * hit).sum(dim=1)
    else:
        p = targets.cpu().double().gather(1, labels[:, None]).squeeze(1)
    return -torch.log(p.clamp_min(1e-6))
