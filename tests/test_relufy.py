"""relufy / sparsify_ffn / activation_sparsity on small GPT-2-style and Llama-style models."""
import warnings

import pytest
import torch
import torch.nn as nn

from fastload.ffn.relufy import activation_sparsity, relufy, sparsify_ffn
from fastload.ffn.sparse import SparseReLUFFN


class GPT2MLP(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.c_fc, self.act, self.c_proj = nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class LlamaMLP(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.down_proj, self.act_fn = nn.Linear(h, d, bias=False), nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, d, h, mlp):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.attn = nn.Linear(d, d)  # a stand-in mixer that must stay untouched
        self.mlp = mlp(d, h)

    def forward(self, x):
        x = x + self.attn(self.ln(x))
        return x + self.mlp(self.ln(x))


class Model(nn.Module):
    def __init__(self, mlp, d=24, h=70, layers=3):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, d)
        self.blocks = nn.ModuleList([Block(d, h, mlp) for _ in range(layers)])
        self.head = nn.Linear(d, 50)

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


@pytest.mark.parametrize("mlp,act_attr", [(GPT2MLP, "act"), (LlamaMLP, "act_fn")])
def test_relufy_then_sparsify_matches_dense(mlp, act_attr):
    model = Model(mlp).eval()
    relufy(model)
    for b in model.blocks:
        assert isinstance(getattr(b.mlp, act_attr), nn.ReLU)
    assert isinstance(model.blocks[0].attn, nn.Linear)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids)
    stats = activation_sparsity(model, ids)
    assert set(stats) == {f"blocks.{i}.mlp" for i in range(3)}
    for s in stats.values():
        assert 0.2 < s["sparsity"] < 0.9 and s["rows"] == 18
    up_weight = model.blocks[0].mlp.up_proj.weight if mlp is LlamaMLP else model.blocks[0].mlp.c_fc.weight
    sparsify_ffn(model, crossover=1.0)
    for b in model.blocks:
        assert isinstance(b.mlp, SparseReLUFFN)
    assert model.blocks[0].mlp.up.weight is up_weight  # reused, not copied
    with torch.no_grad():
        out = model(ids)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    stats2 = activation_sparsity(model, ids)
    for k, s in stats.items():
        assert abs(stats2[k]["sparsity"] - s["sparsity"]) < 1e-6


def test_sequential_and_norm_relu():
    m = nn.Sequential(nn.LayerNorm(8), nn.Sequential(nn.Linear(8, 32), nn.SiLU(), nn.Dropout(0.0), nn.Linear(32, 8)))
    relufy(m, norm_relu=True)
    assert isinstance(m[1][1], nn.ReLU)
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert (m[0](x) >= 0).all()  # ReLU after the norm, state-dict keys unchanged
        ref = m(x)
    assert "0.weight" in m.state_dict()
    sparsify_ffn(m, crossover=1.0)
    assert isinstance(m[1], SparseReLUFFN)
    with torch.no_grad():
        assert torch.allclose(m(x), ref, atol=1e-5)


def test_sparsify_refuses_non_relu_and_skips_unknown_forward():
    with pytest.raises(ValueError, match="relufy"):
        sparsify_ffn(Model(GPT2MLP))

    class Odd(GPT2MLP):
        def forward(self, x):  # not down(act(up(x))): must be left alone
            return self.c_proj(self.act(self.c_fc(x))) * 2

    m = Model(Odd)
    relufy(m)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        sparsify_ffn(m)
    assert any("left unchanged" in str(x.message) for x in w)
    assert isinstance(m.blocks[0].mlp, Odd)
    with pytest.raises(ValueError, match="nn.Module"):
        relufy("not a model")
