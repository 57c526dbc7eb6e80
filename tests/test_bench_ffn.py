"""`fastload bench --ffn` end to end at a tiny shape (the figures come from the full run)."""
import json


def test_ffn_bench_writes_every_row(tmp_path):
    from fastload.bench.ffn import main

    assert main(["--d-model", "64", "--d-ff", "256", "--batches", "1,4", "--sparsity", "0,0.9",
                 "--reps", "1", "--group-budget-s", "1", "--skip-e2e", "--out-dir", str(tmp_path)]) == 0
    d = json.loads((tmp_path / "ffn.json").read_text())
    assert d["d_model"] == 64 and d["d_ff"] == 256 and d["machine"] and d["command"]
    got = {(r["dtype"], r["batch"], r["sparsity"], r["part"]) for r in d["rows"]}
    want = {(dt, b, s, p) for dt in ("fp32", "bf16") for b in (1, 4) for s in (0.0, 0.9)
            for p in ("down", "ffn_plain", "ffn_gated")}
    assert got == want
    for r in d["rows"]:
        assert r["dense_ms"] > 0 and r["sparse_ms"] > 0 and r["speedup"] > 0
        assert 1.0 <= r["ceiling"]
