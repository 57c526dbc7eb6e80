"""Every sampler and class the README, the guides and the examples import from a submodule is
also reachable as ``fastload.<Name>`` (the same object), and every public name resolves."""
import os
import re

import fastload

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _user_facing_texts():
    yield os.path.join(ROOT, "README.md")
    for folder in ("docs", "examples"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith((".md", ".py")) and "_hooks" not in dirpath:
                    yield os.path.join(dirpath, f)


def test_every_public_name_resolves():
    for name in fastload.__all__:
        assert getattr(fastload, name) is not None, name


def test_samplers_named_in_user_texts_are_public():
    import importlib

    named = set()
    for path in _user_facing_texts():
        text = open(path, encoding="utf-8").read()
        named |= set(re.findall(r"from (fastload\.batch\.\w+) import (\w*Sampler\w*|StreamMixer)", text))
    assert named, "the guides import no sampler: the pattern above is stale"
    missing = sorted(n for _, n in named if n not in fastload.__all__)
    assert not missing, f"samplers the docs use but fastload does not export: {missing}"
    for module, n in named:
        assert getattr(fastload, n) is getattr(importlib.import_module(module), n), n
