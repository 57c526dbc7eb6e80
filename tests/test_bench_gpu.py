"""`fastload bench --gpu --dry-run`: the whole GPU benchmark script on the CPU in Triton's
interpreter at tiny shapes, so that the first (short, scarce) GPU run cannot fail on a typo.
The timings of a dry run mean nothing; what is checked is that every section ran and that
the device results agree with the references."""
import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "gpu.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "fastload.cli", "bench", "--gpu", "--dry-run",
                        "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout


def test_every_section_runs(dry_run):
    doc, log = dry_run
    assert doc["dry_run"] is True and doc["status"] == "done"
    assert doc["date"] and doc["source_sha1"] and doc["device"]
    st = {k: v["status"] for k, v in doc["sections"].items()}
    assert set(st) == {"env", "bandwidth", "ffn", "replay", "loader", "dali"}
    for k in ("env", "bandwidth", "ffn", "replay", "loader"):
        assert st[k] == "ok", (k, doc["sections"][k].get("error"), doc["sections"][k].get("traceback"))
    assert st["dali"] in ("not available", "available, not measured")
    assert "wrote" in log


def test_ffn_rows_are_exact_and_complete(dry_run):
    doc, _ = dry_run
    ffn = doc["sections"]["ffn"]
    got = {(r["dtype"], r["batch"], r["sparsity"]) for r in ffn["rows"]}
    assert got == {(d, b, s) for d in ("fp16", "fp32") for b in (1, 4) for s in (0.0, 0.9)}
    for r in ffn["rows"]:
        assert r["max_rel_err"] < 2e-3 and r["module_max_rel_err"] < 2e-3, (r, ffn.get("module_errors"))
        assert 0 < r["union_active_frac"] <= 1 and r["ceiling_speedup"] >= 1
        assert r["sparse_ms"] > 0 and r["dense_ms"] > 0 and "sparse_pct_of_copy_bw" in r


def test_replay_rows_and_checks(dry_run):
    doc, _ = dry_run
    rp = doc["sections"]["replay"]
    assert set(rp["rows"]) == {"plain", "ra", "ra_mix"}
    assert rp["check_plain_max_levels"] <= 1.001
    assert rp["check_ra_max_levels"] <= 1 and rp["check_ra_frac_differ"] < 0.05
    for row in rp["rows"].values():
        assert row["images_per_s"] > 0 and row["host_pack_ms"] > 0


def test_loader_rows(dry_run):
    doc, _ = dry_run
    ld = doc["sections"]["loader"]
    assert ld["rows"]["cpu_replay"]["images"] > 0
    assert ld["rows"]["device_replay"]["images"] > 0
    assert ld["device_vs_cpu_first_batch_max_levels"] <= 1.01
