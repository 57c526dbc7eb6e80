"""Relufication and sparse FFN swapping for models built from plain torch modules.

Recognized FFN blocks:

* ``nn.Sequential(Linear, act, [Dropout], Linear)``;
* a module whose children include an up ``nn.Linear`` (``c_fc``, ``fc1``, ``fc_in``,
  ``up_proj``/``up``, ``w1``, ``dense_h_to_4h``, ``lin1``), a down ``nn.Linear`` (``c_proj``,
  ``fc2``, ``fc_out``, ``down_proj``/``down``, ``w2``, ``dense_4h_to_h``, ``lin2``) and an
  activation module (``act``, ``act_fn``, ``activation``, ``activation_fn``); GPT-2/OPT style;
* the same with a gate ``nn.Linear`` (``gate_proj``/``gate``, or ``w1`` with ``w3`` as up):
  Llama style ``down(act(gate(x)) * up(x))``.

Activations given as functions inside ``forward`` (not modules) cannot be replaced.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn

from fastload.ffn.sparse import SparseReLUFFN

_UP = ("c_fc", "fc1", "fc_in", "up_proj", "up", "dense_h_to_4h", "lin1")
_DOWN = ("c_proj", "fc2", "fc_out", "down_proj", "down", "w2", "dense_4h_to_h", "lin2")
_GATE = ("gate_proj", "gate")
_ACT = ("act", "act_fn", "activation", "activation_fn")
_ACT_TYPES = (nn.GELU, nn.SiLU, nn.ReLU, nn.Mish, nn.Tanh, nn.ELU, nn.LeakyReLU, nn.Sigmoid, nn.Softplus)


def _is_act(m) -> bool:
    return isinstance(m, _ACT_TYPES) or type(m).__name__.lower().endswith(("gelu", "silu", "swish",
                                                                          "activation", "relu"))


def find_ffns(model: nn.Module):
    """Yield ``(name, module, parts)`` for each recognized FFN; ``parts`` has keys
    up, down, gate (or None), act_name (child holding the activation), kind."""
    for name, m in model.named_modules():
        if isinstance(m, SparseReLUFFN):
            continue
        if isinstance(m, nn.Sequential):
            ch = list(m.children())
            core = [c for c in ch if not isinstance(c, nn.Dropout)]
            if (len(core) == 3 and ch[0] is core[0] and isinstance(core[0], nn.Linear)
                    and _is_act(core[1]) and isinstance(core[2], nn.Linear)):
                act_name = str(ch.index(core[1]))
                yield name, m, {"up": core[0], "down": core[2], "gate": None, "act_name": act_name,
                                "kind": "sequential"}
            continue
        children = dict(m.named_children())
        act_name = next((a for a in _ACT if a in children and _is_act(children[a])), None)
        if act_name is None:
            continue
        gate = next((children[g] for g in _GATE if isinstance(children.get(g), nn.Linear)), None)
        up = next((children[u] for u in _UP if isinstance(children.get(u), nn.Linear)), None)
        down = next((children[d] for d in _DOWN if isinstance(children.get(d), nn.Linear)), None)
        if gate is None and isinstance(children.get("w1"), nn.Linear) and isinstance(children.get("w3"), nn.Linear):
            gate, up = children["w1"], children["w3"]  # Llama reference naming
        elif up is None and isinstance(children.get("w1"), nn.Linear):
            up = children["w1"]
        if up is None or down is None:
            continue
        yield name, m, {"up": up, "down": down, "gate": gate, "act_name": act_name,
                        "kind": "gated" if gate is not None else "plain"}


def _norm_types():
    types = [nn.LayerNorm, nn.GroupNorm]
    if hasattr(nn, "RMSNorm"):
        types.append(nn.RMSNorm)
    return tuple(types)


def relufy(model: nn.Module, norm_relu: bool = False) -> nn.Module:
    """Replace the activation between up- and down-projection of every recognized FFN by
    ``nn.ReLU`` (in place; returns the model). With ``norm_relu=True`` also apply ReLU to the
    output of every normalization layer (LayerNorm, RMSNorm, GroupNorm or a class whose name
    ends in "Norm"), as a forward hook so state-dict keys do not change.

    >>> import torch.nn as nn
    >>> mlp = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    >>> type(relufy(mlp)[1]).__name__
    'ReLU'
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    found = 0
    for _, m, parts in list(find_ffns(model)):
        setattr(m, parts["act_name"], nn.ReLU()) if parts["kind"] != "sequential" else \
            m.__setitem__(int(parts["act_name"]), nn.ReLU())
        found += 1
    if found == 0:
        warnings.warn("relufy: no FFN block recognized (see fastload.ffn.relufy for the patterns)")
    if norm_relu:
        norms = _norm_types()
        for _, m in model.named_modules():
            if isinstance(m, norms) or type(m).__name__.endswith("Norm"):
                if not getattr(m, "_fastload_relu_hook", False):
                    m.register_forward_hook(lambda mod, inp, out: torch.relu(out))
                    m._fastload_relu_hook = True
    return model


def _set_child(model: nn.Module, name: str, new: nn.Module):
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.Sequential) and leaf.isdigit():
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


@torch.no_grad()
def sparsify_ffn(model: nn.Module, crossover: Optional[float] = None, verify: bool = True) -> nn.Module:
    """Swap every recognized ReLU FFN block for a :class:`SparseReLUFFN` reusing its up/gate
    ``nn.Linear`` modules (no copy) and a transposed copy of the down weight (in place;
    returns the model). With ``verify`` each swap is checked on a random probe against the
    original block (in eval mode), so a block whose ``forward`` is not ``down(act(up(x)))``
    (or the gated form) is left alone with a warning. Non-ReLU FFNs raise ValueError: call
    :func:`relufy` first.

    >>> import torch.nn as nn
    >>> m = nn.Sequential(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8)))
    >>> type(sparsify_ffn(m)[0]).__name__
    'SparseReLUFFN'
    """
    todo = list(find_ffns(model))
    if not todo:
        warnings.warn("sparsify_ffn: no FFN block recognized")
    for name, m, parts in todo:
        act = m.get_submodule(parts["act_name"])
        if not isinstance(act, nn.ReLU):
            raise ValueError(f"FFN {name or '<root>'} uses {type(act).__name__}, not ReLU: the exact "
                             "sparse path needs ReLU (call fastload.relufy first)")
        new = SparseReLUFFN.from_dense(parts["up"], parts["down"], gate=parts["gate"], crossover=crossover)
        if verify:
            was = m.training
            m.eval()
            w = parts["up"].weight
            x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(0)).to(w.dtype)
            ref = m(x)
            got = new._down_dense(new._activation(x))
            m.train(was)
            tol = 1e-4 if w.dtype == torch.float32 else 3e-2
            if ref.shape != got.shape or not torch.allclose(got.float(), ref.float(), rtol=tol,
                                                            atol=tol * float(ref.abs().max().clamp_min(1))):
                warnings.warn(f"sparsify_ffn: {name or '<root>'} does not compute down(act(up(x))) "
                              "as assumed; left unchanged")
                continue
        if name == "":
            return new
        _set_child(model, name, new)
    return model


@torch.no_grad()
def activation_sparsity(model: nn.Module, batch, forward=None) -> dict:
    """Run ``model(batch)`` (or ``forward(model, batch)``) and return, per FFN, the fraction
    of exactly-zero activations (``"sparsity"``), the fraction of neurons inactive for the
    whole batch (``"union_sparsity"``) and the number of activation rows seen.

    >>> import torch, torch.nn as nn
    >>> m = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 8))
    >>> s = activation_sparsity(m, torch.randn(4, 8))
    >>> 0.0 < s[""]["sparsity"] < 1.0
    True
    """
    stats, handles = {}, []

    def record(name, act):
        a = act.reshape(-1, act.shape[-1])
        st = stats.setdefault(name, {"zeros": 0, "total": 0, "union_active": None, "rows": 0})
        st["zeros"] += int((a == 0).sum())
        st["total"] += a.numel()
        st["rows"] += a.shape[0]
        nz = (a != 0).any(0)
        st["union_active"] = nz if st["union_active"] is None else (st["union_active"] | nz)

    sparse_mods = []
    for name, m in model.named_modules():
        if isinstance(m, SparseReLUFFN):
            m._probe = (lambda n: (lambda mod, act: record(n, act)))(name)
            sparse_mods.append(m)
    for name, m, parts in find_ffns(model):
        act = m.get_submodule(parts["act_name"])
        if parts["gate"] is None:
            handles.append(act.register_forward_hook((lambda n: (lambda mod, i, o: record(n, o)))(name)))
        else:  # the activation that matters is act(gate) * up: capture down's input
            handles.append(parts["down"].register_forward_hook(
                (lambda n: (lambda mod, i, o: record(n, i[0])))(name)))
    try:
        forward(model, batch) if forward is not None else model(batch)
    finally:
        for h in handles:
            h.remove()
        for m in sparse_mods:
            m._probe = None
    return {n: {"sparsity": s["zeros"] / max(1, s["total"]),
                "union_sparsity": 1.0 - float(s["union_active"].float().mean()) if s["union_active"] is not None else 0.0,
                "rows": s["rows"]} for n, s in stats.items()}
