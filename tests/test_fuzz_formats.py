"""Fuzzing of the stored formats (tests/_fuzz.py): augmentation/target/embedding blobs,
shard files, manifests and token buckets. Every case ends in a result or the documented
exception naming the file; the cases run in child processes (a crash of pyarrow, numpy or a
native gather would kill only the child and fail the test with the batch to replay), under
a timeout (a hang fails) and a peak-RSS bound. The default suite runs 200 cases per kind;
the slow set 10,000 per kind."""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = ("blobs", "shards", "manifests", "buckets")


def _batch(kind: str, start: int, count: int, timeout: float) -> dict:
    cmd = [sys.executable, os.path.join(HERE, "_fuzz.py"), kind, str(start), str(count)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"fuzz {kind} cases [{start}, {start + count}) hung (> {timeout} s)")
    assert r.returncode == 0, (f"fuzz {kind} cases [{start}, {start + count}) crashed the child "
                               f"(exit {r.returncode}): {r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert "failed_case" not in res, (f"fuzz {kind} case {res.get('failed_case')} "
                                      f"(replay: python tests/_fuzz.py {kind} {res.get('failed_case')} 1): "
                                      f"{res.get('error')}\n{res.get('traceback')}")
    assert res["peak_rss_mib"] < res["rss_bound_mib"], res
    assert sum(res["counts"].values()) == count
    return res


def _run(kind: str, total: int, batches: int, parallel: int, timeout: float) -> dict:
    size = total // batches
    with ThreadPoolExecutor(parallel) as ex:
        results = list(ex.map(lambda b: _batch(kind, b * size, size, timeout), range(batches)))
    counts = {}
    for r in results:
        for k, v in r["counts"].items():
            counts[k] = counts.get(k, 0) + v
    return counts


@pytest.mark.parametrize("kind", KINDS)
def test_fuzz_formats_fast(kind):
    counts = _run(kind, 200, 1, 1, 300)
    # the corpus really exercises the error paths (and the accepting ones for blobs/buckets)
    assert counts.get("corrupt", 0) >= 100, counts


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_fuzz_formats_10k(kind):
    counts = _run(kind, 10_000, 4, 2, 600)
    assert sum(counts.values()) == 10_000 and counts.get("corrupt", 0) >= 5_000, counts
