"""The layering contract (.importlinter at the repository root) holds: the library never
imports the benchmark harness or the CLI dispatcher, and the data-flow layers import only
downwards. import-linter reads the import graph statically, so this costs a second."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_linter_contracts_are_kept():
    exe = shutil.which("lint-imports") or os.path.join(os.path.dirname(sys.executable), "lint-imports")
    if not os.path.exists(exe):
        pytest.fail("lint-imports is not installed: pip install -e '.[test]' installs import-linter")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([exe, "--config", os.path.join(ROOT, ".importlinter")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "0 broken" in out, out[-4000:]


def test_contract_names_every_library_package():
    """A new package under fastload/ must be placed in a layer (or the forbidden contract's
    sources), else the contract would silently not cover it."""
    cfg = open(os.path.join(ROOT, ".importlinter"), encoding="utf-8").read()
    pkgs = sorted(d for d in os.listdir(os.path.join(ROOT, "fastload"))
                  if os.path.isfile(os.path.join(ROOT, "fastload", d, "__init__.py")) and d not in ("bench", "kernels"))
    missing = [p for p in pkgs if f"fastload.{p}" not in cfg]
    assert not missing, f"packages missing from .importlinter: {missing}"


def test_setup_installs_every_package():
    """A non-editable install carries only the packages setup.py lists: every folder of
    fastload/ with an __init__.py must be among them (a moved module must not vanish)."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "setup.py"), encoding="utf-8").read()
    listed = set(re.findall(r'"(fastload(?:\.\w+)*)"', text[text.index("packages="):text.index("package_dir")]))
    found = {"fastload.kernels"}
    for dirpath, dirs, files in os.walk(os.path.join(root, "fastload")):
        dirs[:] = [d for d in dirs if not d.startswith((".", "_")) and d != "kernels"]
        if "__init__.py" in files:
            found.add(os.path.relpath(dirpath, root).replace(os.sep, "."))
    assert found == listed, (sorted(found - listed), sorted(listed - found))
