"""The README's examples run as written (small sizes)."""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reinforce_and_train(tmp_path):
    loss = _load("reinforce_and_train").main(str(tmp_path), n_images=32)
    assert loss == loss and loss >= 0  # finite KL divergence


def test_decompose_and_load(tmp_path):
    steps = _load("decompose_and_load").main(str(tmp_path))
    assert steps > 0
