"""fastload.datasets: the public demo-data module examples and tests build their data with,
and the layering rule it exists for (the library never imports the benchmark harness)."""
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _library_files():
    """Every Python file of the installed package except the harness and the CLI dispatcher
    (fastload/kernels is a link to kernels/, walked through)."""
    base = os.path.join(ROOT, "fastload")
    for d, dirs, files in os.walk(base, followlinks=True):
        rel = os.path.relpath(d, base)
        if rel == "bench" or rel.startswith("bench" + os.sep) or "__pycache__" in rel:
            continue
        for f in files:
            if f.endswith(".py") and not (rel == "." and f == "cli.py"):
                yield os.path.join(d, f)


def _imports(path):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def test_library_never_imports_the_benchmark_harness():
    files = list(_library_files())
    assert any(f.endswith("datasets.py") for f in files) and len(files) > 20
    bad = sorted(f"{os.path.relpath(f, ROOT)}: {m}" for f in files for m in _imports(f)
                 if m == "fastload.bench" or m.startswith("fastload.bench."))
    assert not bad, bad


def test_examples_and_tests_take_their_data_from_fastload_datasets():
    for folder in ("examples", "tests"):
        for f in sorted(os.listdir(os.path.join(ROOT, folder))):
            if f.endswith(".py"):
                mods = set(_imports(os.path.join(ROOT, folder, f)))
                assert not {"fastload.bench.data", "fastload.bench.reinforce.make_images"} & mods, f


def test_importing_datasets_loads_no_harness_module():
    code = ("import sys, fastload.datasets, fastload._results\n"
            "print(sorted(m for m in sys.modules if m.startswith('fastload.bench')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_build_images_and_teachers(tmp_path):
    import torch

    from fastload import datasets

    root = datasets.build_images(str(tmp_path / "img"), n=6, seed=1, progress=False)
    paths, labels, classes = datasets.list_images(root)
    assert len(paths) == 6 and len(set(labels)) == min(6, len(classes))
    small = datasets.make_images(str(tmp_path / "small"), n=4, classes=2)
    assert len(small) == 4 and all(os.path.getsize(p) > 1000 for p in small)
    x = torch.rand(3, 3, 64, 64)
    a, b = datasets.tiny_teacher(5)(x), datasets.tiny_teacher(5)(x)
    assert a.shape == (3, 5) and torch.equal(a, b)  # fixed weights, no global RNG
    assert datasets.make_teacher(7)(x).shape == (3, 7)
