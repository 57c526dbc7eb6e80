"""timm and open_clip examples. Both need torchvision, whose wheels pull a second torch build
(CUDA, ~5.5 GB), so CI (torch 2.13.0) does not install them: these run when
FASTLOAD_TV_PYTHON names a Python that has torch + torchvision + timm + open_clip and can
import fastload (e.g. PYTHONPATH set to the checkout). The data is prepared here (it needs
scikit-image), the training runs there."""
import importlib.util
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TV = os.environ.get("FASTLOAD_TV_PYTHON")


def _prepare(name, workdir):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.prepare(workdir)


@pytest.mark.slow
@pytest.mark.skipif(not TV, reason="FASTLOAD_TV_PYTHON unset: timm/open_clip need torchvision (a second, "
                                   "5.5 GB torch build), kept out of CI")
@pytest.mark.parametrize("name", ["timm_kd", "open_clip_distill"])
def test_torchvision_examples(tmp_path, name):
    _prepare(name, str(tmp_path))
    p = subprocess.run([TV, os.path.join(ROOT, "examples", f"{name}.py"), str(tmp_path), "--steps", "3"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "3 steps" in p.stdout
