"""The documentation site builds with no warning (`mkdocs build --strict`), its API pages come
from the docstrings, and the README stays a front page that links into it."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[docs]' (the test extra has it)")
    pytest.importorskip("mkdocstrings", reason="mkdocstrings is not installed: pip install -e '.[docs]'")
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert not [l for l in log.splitlines() if l.startswith("WARNING")], log[-4000:]
    # the API reference is generated from the docstrings, not written by hand
    api = (site / "api" / "reinforced" / "index.html").read_text()
    assert "export_teacher" in api and "dynamic batch dimension" in api
    assert "ReinforcedLoader" in api
    assert (site / "index.html").exists() and (site / "changelog" / "index.html").exists()
    assert not (site / "_hooks").exists()  # the griffe extension is not published


def test_readme_is_a_front_page():
    text = open(os.path.join(ROOT, "README.md")).read()
    assert len(text.splitlines()) <= 200
    # CI runs the README's test command verbatim
    cmd = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -ra'
    assert cmd in text and cmd in open(os.path.join(ROOT, ".ci", "run")).read()
    # every relative link points at a file of the repository
    for target in re.findall(r"\]\(((?!https?://)[^)#]+)", text):
        assert os.path.exists(os.path.join(ROOT, target)), target
    assert "RECIPES.md" not in text


def test_nav_pages_exist():
    yaml = pytest.importorskip("yaml")

    nav = yaml.safe_load(open(os.path.join(ROOT, "mkdocs.yml")))["nav"]

    def pages(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for n in node:
                yield from pages(n)
        elif isinstance(node, dict):
            for v in node.values():
                yield from pages(v)

    missing = [p for p in pages(nav) if not os.path.exists(os.path.join(ROOT, "docs", p))]
    assert not missing, missing
