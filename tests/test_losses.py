"""densify / kd_loss / clip_distill_loss against plain per-element formulas."""
import math

import numpy as np
import pytest
import torch

from fastload.losses import clip_distill_loss, densify, kd_loss


def _densify_ref(ids, probs, c, mode):
    out = np.zeros((len(ids), c))
    for b in range(len(ids)):
        if mode == "smooth":
            rest = max(0.0, 1.0 - float(sum(probs[b])))
            out[b, :] = rest / (c - len(ids[b]))
            for i, p in zip(ids[b], probs[b]):
                out[b, i] = p
        else:
            s = float(sum(probs[b]))
            for i, p in zip(ids[b], probs[b]):
                out[b, i] = p / s
    return out


@pytest.mark.parametrize("mode", ["smooth", "zeros"])
def test_densify_matches_reference(mode):
    rng = np.random.default_rng(0)
    c, k, B = 50, 5, 8
    ids = np.stack([rng.choice(c, k, replace=False) for _ in range(B)])
    probs = np.sort(rng.dirichlet(np.ones(c), B)[:, :k] * 3, 1)[:, ::-1] / 3
    got = densify(torch.from_numpy(ids), torch.from_numpy(probs.astype(np.float16)), c, mode)
    ref = _densify_ref(ids, probs.astype(np.float16).astype(np.float64), c, mode)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.sum(1).numpy(), 1.0, rtol=1e-5)


def test_densify_bad_input():
    with pytest.raises(ValueError, match="class ids"):
        densify(torch.tensor([[0, 10]]), torch.tensor([[0.5, 0.2]]), 10)
    with pytest.raises(ValueError, match="mode"):
        densify(torch.tensor([[0]]), torch.tensor([[0.5]]), 10, mode="hard")
    with pytest.raises(ValueError, match="same shape"):
        densify(torch.tensor([[0, 1]]), torch.tensor([[0.5]]), 10)


def test_kd_loss_matches_formula():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 12, generator=g)
    t = torch.softmax(torch.randn(6, 12, generator=g), 1)
    ref = 0.0
    for b in range(6):
        q = torch.softmax(s[b].double(), 0)
        ref += sum(float(t[b, c]) * (math.log(float(t[b, c])) - math.log(float(q[c]))) for c in range(12))
    assert float(kd_loss(s, t)) == pytest.approx(ref / 6, rel=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(s, t[:, :5])


def _clip_ref(img, txt, scale, timg, ttxt, dims, ds, w):
    """Loops over the batch, straight from the MobileCLIP loss definition."""
    B = img.shape[0]
    n = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    img, txt = n(img.astype(np.float64)), n(txt.astype(np.float64))
    S = scale * img @ txt.T

    def logsm(v):
        m = v.max()
        return v - m - math.log(np.exp(v - m).sum())

    clip = 0.0
    for b in range(B):
        clip -= logsm(S[b])[b] + logsm(S[:, b])[b]
    clip /= 2 * B
    off = np.cumsum([0] + list(dims))
    P_i = np.zeros((B, B))
    P_t = np.zeros((B, B))
    for a in range(len(dims)):
        ti = n(timg[:, off[a]:off[a + 1]].astype(np.float64))
        tt = n(ttxt[:, off[a]:off[a + 1]].astype(np.float64))
        T = ds * ti @ tt.T
        for b in range(B):
            P_i[b] += np.exp(logsm(T[b])) / len(dims)
            P_t[b] += np.exp(logsm(T[:, b])) / len(dims)
    dist = 0.0
    for b in range(B):
        dist -= (P_i[b] * logsm(S[b])).sum() + (P_t[b] * logsm(S[:, b])).sum()
    dist /= 2 * B
    return w[0] * clip + w[1] * dist


def test_clip_distill_loss_matches_formula():
    rng = np.random.default_rng(1)
    B, D, dims = 5, 16, (6, 10)
    img, txt = rng.standard_normal((B, D)), rng.standard_normal((B, D))
    timg, ttxt = rng.standard_normal((B, 16)), rng.standard_normal((B, 16))
    got = clip_distill_loss(*(torch.tensor(a, dtype=torch.float32) for a in (img, txt)), 20.0,
                            torch.tensor(timg, dtype=torch.float32), torch.tensor(ttxt, dtype=torch.float32),
                            teacher_dims=dims, distill_logit_scale=100.0, loss_weights=(0.25, 0.75))
    ref = _clip_ref(img, txt, 20.0, timg, ttxt, dims, 100.0, (0.25, 0.75))
    assert float(got) == pytest.approx(ref, rel=1e-4)
    with pytest.raises(ValueError, match="teacher_dims"):
        clip_distill_loss(torch.zeros(2, 4), torch.zeros(2, 4), 1.0, torch.zeros(2, 6), torch.zeros(2, 6),
                          teacher_dims=(4, 4))
