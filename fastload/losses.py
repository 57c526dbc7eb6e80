"""Losses for training on reinforced datasets: densified top-k targets with a KL distillation
loss (Dataset Reinforcement) and the MobileCLIP distillation loss (DataCompDR)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def densify(ids, probs, num_classes: int, mode: str = "smooth") -> torch.Tensor:
    """Sparse top-k targets [B, k] -> dense float32 distributions [B, num_classes].

    ``mode="smooth"`` spreads ``1 - sum(top-k)`` evenly over the other classes;
    ``"zeros"`` renormalizes the top-k mass to 1 and leaves the rest at 0.

    apple/ml-dr's own rules (``dr.utils.densify``), for targets that must equal what ml-dr
    trains on (its ``ReinforcedDataset`` defaults to ``densify: zeros``):

    - ``"mldr"`` (ml-dr's ``"zeros"``): ``softmax`` *over the stored top-k probabilities*
      at the top-k ids, 0 elsewhere. It is not a renormalization: top-k values (0.7, 0.2)
      become (0.622, 0.378), not (0.778, 0.222).
    - ``"mldr_smooth"`` (ml-dr's ``"smooth"``): like ``"smooth"``, except that a row whose
      top-k sum exceeds 1 (float rounding) falls back to the softmax rule, as ml-dr does.

    Example:
        >>> t = densify(torch.tensor([[2, 0]]), torch.tensor([[0.7, 0.2]]), 4, mode="mldr")
        >>> [round(v, 3) for v in t[0].tolist()]
        [0.378, 0.0, 0.622, 0.0]

    Example:
        >>> t = densify(torch.tensor([[2, 0]]), torch.tensor([[0.7, 0.2]]), 4)
        >>> [round(v, 3) for v in t[0].tolist()]
        [0.2, 0.05, 0.7, 0.05]
    """
    ids = torch.as_tensor(ids)
    probs = torch.as_tensor(probs)
    if ids.ndim == 1:
        ids, probs = ids[None], probs[None]
    if ids.shape != probs.shape or ids.ndim != 2:
        raise ValueError(f"ids and probs must be [B, k] of the same shape, got {tuple(ids.shape)} and "
                         f"{tuple(probs.shape)}")
    B, k = ids.shape
    if k > num_classes:
        raise ValueError(f"topk {k} exceeds num_classes {num_classes}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_classes):
        raise ValueError(f"class ids must be in [0, {num_classes})")
    ids = ids.long()
    p = probs.float().clamp_min(0)
    if mode == "smooth":
        rest = (1.0 - p.sum(1, keepdim=True)).clamp_min(0)
        fill = rest / max(num_classes - k, 1)
        out = fill.expand(B, num_classes).clone()
        out.scatter_(1, ids, p)
        if num_classes == k:
            out = out / out.sum(1, keepdim=True).clamp_min(1e-12)
    elif mode == "zeros":
        out = torch.zeros(B, num_classes, dtype=torch.float32, device=p.device)
        out.scatter_(1, ids, p)
        out = out / out.sum(1, keepdim=True).clamp_min(1e-12)
    elif mode in ("mldr", "mldr_smooth"):
        q = probs.float()  # ml-dr neither clamps nor renormalizes the stored values
        soft = torch.zeros(B, num_classes, dtype=torch.float32, device=q.device)
        soft.scatter_(1, ids, torch.softmax(q, dim=1))
        if mode == "mldr":
            return soft
        rest = 1.0 - q.sum(1, keepdim=True)
        out = (rest / max(num_classes - k, 1)).expand(B, num_classes).clone()
        out.scatter_(1, ids, q)
        out = torch.where(rest < 0, soft, out)
    else:
        raise ValueError(f"mode must be 'smooth', 'zeros', 'mldr' or 'mldr_smooth', got {mode!r}")
    return out


def kd_loss(student_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """``kl_div(log_softmax(student), target, reduction="batchmean")``.

    Example:
        >>> kd_loss(torch.zeros(2, 4), torch.full((2, 4), 0.25)).abs().item() < 1e-6
        True
    """
    if student_logits.shape != target_probs.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and target_probs "
                         f"{tuple(target_probs.shape)} must have the same shape")
    return F.kl_div(F.log_softmax(student_logits.float(), dim=-1), target_probs.float(), reduction="batchmean")


def clip_distill_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                      teacher_image_features: torch.Tensor, teacher_text_features: torch.Tensor,
                      teacher_dims=None, distill_logit_scale: float = 100.0,
                      loss_weights=(0.25, 0.75), average_after_softmax: bool = True) -> torch.Tensor:
    """MobileCLIP's loss: ``w0 * contrastive CE + w1 * distillation CE``.

    Contrastive: CLIP's symmetric cross-entropy of the student's similarities
    ``logit_scale * img @ txt.T`` against the diagonal. Distillation: cross-entropy of the
    student's similarity softmax (both directions) against the teachers' similarity softmax
    at ``distill_logit_scale`` (100). Teacher features are the ensemble members concatenated
    along the last dimension (``teacher_dims`` their sizes, e.g. (768, 768)); each member is
    L2-normalized separately and, with ``average_after_softmax``, the members' softmaxes are
    averaged (ml-mobileclip's ``--distill-average-after-softmax``). Student features are
    L2-normalized here too.

    Example:
        >>> img, txt = torch.randn(4, 8), torch.randn(4, 8)
        >>> float(clip_distill_loss(img, txt, 100.0, torch.randn(4, 6), torch.randn(4, 6))) > 0
        True
    """
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError("image_features and text_features must both be [B, D]")
    B = image_features.shape[0]
    if teacher_image_features.shape[0] != B or teacher_text_features.shape != teacher_image_features.shape:
        raise ValueError("teacher features must be [B, D_teacher], the same for image and text")
    D = teacher_image_features.shape[1]
    dims = [D] if teacher_dims is None else [int(d) for d in teacher_dims]
    if sum(dims) != D:
        raise ValueError(f"teacher_dims {dims} do not sum to the teacher feature width {D}")
    w_clip, w_dist = loss_weights
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    scale = torch.as_tensor(logit_scale, dtype=torch.float32)
    logits_i = scale * img @ txt.T
    logits_t = logits_i.T
    labels = torch.arange(B, device=img.device)
    contrastive = 0.5 * (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels))

    t_img = torch.split(teacher_image_features.float(), dims, dim=-1)
    t_txt = torch.split(teacher_text_features.float(), dims, dim=-1)
    sims = [distill_logit_scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T for a, b in zip(t_img, t_txt)]
    if average_after_softmax:
        p_i = torch.stack([s.softmax(-1) for s in sims]).mean(0)
        p_t = torch.stack([s.T.softmax(-1) for s in sims]).mean(0)
    else:
        s = torch.stack(sims).mean(0)
        p_i, p_t = s.softmax(-1), s.T.softmax(-1)
    distill = 0.5 * (-(p_i * F.log_softmax(logits_i, -1)).sum(-1).mean()
                     - (p_t * F.log_softmax(logits_t, -1)).sum(-1).mean())
    return w_clip * contrastive + w_dist * distill
