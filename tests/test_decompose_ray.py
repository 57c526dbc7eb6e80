"""engine="ray": one task per input file, per-bucket shards, resume by skipping finished files."""
import json
import os

import numpy as np
import pytest

from fastload.tokens.decompose import decompose, load_manifest, tokenize_folder


def arrays(path):
    m = load_manifest(path)
    return {k: np.concatenate([np.load(os.path.join(path, f["path"])) for f in b["files"]])
            for k, b in m["buckets"].items()}


@pytest.mark.slow
def test_ray_engine_equals_local_and_resumes(tmp_path):
    ray = pytest.importorskip("ray")
    rng = np.random.default_rng(0)
    src = tmp_path / "txt"
    src.mkdir()
    for i in range(9):
        (src / f"{i}.txt").write_bytes(bytes(rng.integers(32, 127, int(rng.integers(0, 3000))).astype(np.uint8)))
    tokenize_folder(str(src), str(tmp_path / "tok"), docs_per_file=3)
    local = decompose(str(tmp_path / "tok"), str(tmp_path / "local"), 4, 8, seed=1, progress=False)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        m = decompose(str(tmp_path / "tok"), str(tmp_path / "ray"), 4, 8, seed=1, engine="ray", progress=False)
        assert m["engine"] == "ray" and m["resumed_inputs"] == []
        assert len(m["buckets"]["4"]["files"]) == 3
        a, b = arrays(str(tmp_path / "local")), arrays(str(tmp_path / "ray"))
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
        for key in ("documents", "dropped_tokens", "input_tokens", "empty_documents"):
            assert m[key] == local[key]
        # An interrupted run: shard 1 never finished (no done marker) -> only it is redone.
        os.remove(tmp_path / "ray" / "shards" / "00001" / "done.json")
        mtime0 = os.path.getmtime(tmp_path / "ray" / "shards" / "00000" / "bucket_04.npy")
        m2 = decompose(str(tmp_path / "tok"), str(tmp_path / "ray"), 4, 8, seed=1, engine="ray", progress=False)
        assert m2["resumed_inputs"] == [0, 2]
        assert os.path.getmtime(tmp_path / "ray" / "shards" / "00000" / "bucket_04.npy") == mtime0
        c = arrays(str(tmp_path / "ray"))
        for k in a:
            np.testing.assert_array_equal(a[k], c[k])
        # Different parameters invalidate finished shards.
        m3 = decompose(str(tmp_path / "tok"), str(tmp_path / "ray"), 4, 8, seed=2, engine="ray", progress=False)
        assert m3["resumed_inputs"] == []
        with open(tmp_path / "ray" / "shards" / "00000" / "done.json") as f:
            assert json.load(f)["params"]["seed"] == 2
    finally:
        ray.shutdown()
