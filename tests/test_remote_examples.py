"""The README's remote/mixing/TiC examples run as written (small sizes, real moto_server)."""
import importlib.util
import os
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mix_and_tic_example():
    out = _load("mix_and_tic").main()
    assert abs(out["share_small"] - 0.2) < 0.02
    assert all(sum(v) == 1024 for v in out["tic"].values())


@pytest.mark.slow
def test_remote_dataset_example(monkeypatch):
    pytest.importorskip("obstore")
    pytest.importorskip("boto3")
    if shutil.which("moto_server") is None:
        pytest.skip('moto_server missing: pip install "moto[server]"')
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ALLOW_HTTP"):
        monkeypatch.delenv(k, raising=False)  # the example sets them; undo after
    assert _load("remote_dataset").main([]) == 24
