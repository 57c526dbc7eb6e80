"""Teacher export: fastload.export_teacher writes a dynamic-batch torch.export program that
reinforce accepts at any batch size; a static-batch program is refused in one clear line; the
probe uses a batch the run never uses; a failed run leaves no half-written dataset."""
import os
import subprocess
import sys

import pytest
import torch

import fastload
from fastload.datasets import make_images, make_teacher
from fastload.generate import load_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_export_round_trip_batch_1_and_7(tmp_path):
    net = make_teacher(5)
    path = fastload.export_teacher(net, 32, str(tmp_path / "t.pt2"))
    assert path == str(tmp_path / "t.pt2") and os.path.isfile(path)
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]
    loaded = load_teacher(path)
    for b in (1, 7):
        x = torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), net(x))


def test_static_batch_program_is_rejected_in_one_line(tmp_path):
    net = make_teacher(5)
    ep = torch.export.export(net, (torch.zeros(2, 3, 32, 32),))  # what the old hint produced
    path = str(tmp_path / "static.pt2")
    torch.export.save(ep, path)
    with pytest.raises(ValueError) as e:
        load_teacher(path)
    msg = str(e.value)
    assert "\n" not in msg and "static batch of 2" in msg and "fastload.export_teacher" in msg


@pytest.mark.slow  # ~20 s: a subprocess that imports torch and loads an exported program
def test_static_batch_program_through_the_cli(tmp_path):
    make_images(str(tmp_path / "img"), n=4, classes=2)
    path = str(tmp_path / "static.pt2")
    torch.export.save(torch.export.export(make_teacher(2), (torch.zeros(2, 3, 32, 32),)), path)
    r = subprocess.run([sys.executable, "-m", "fastload.cli", "reinforce", str(tmp_path / "img"),
                        "--teacher", path, "--out", str(tmp_path / "out"), "--image-size", "32",
                        "--batch-size", "2", "--num-augmentations", "1", "--quiet"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "static batch of 2" in r.stderr and "export_teacher" in r.stderr
    assert not os.path.exists(tmp_path / "out")


def test_probe_uses_a_batch_the_run_never_uses(tmp_path):
    make_images(str(tmp_path / "img"), n=4, classes=2)
    seen = []
    base = make_teacher(2)

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen.append(x.shape[0])
            return base(x)

    fastload.reinforce(str(tmp_path / "img"), Spy(), str(tmp_path / "out"), num_augmentations=3,
                       batch_size=4, image_size=32, progress=False)
    probe, run = seen[0], seen[1:]
    assert probe == 5 and run and max(run) <= 4 and probe not in run


def test_failure_after_the_start_leaves_no_half_written_dataset(tmp_path):
    make_images(str(tmp_path / "img"), n=4, classes=2)
    base = make_teacher(2)
    calls = []

    class DiesInTheFirstShard(torch.nn.Module):
        def forward(self, x):
            calls.append(x.shape[0])
            if len(calls) > 1:  # the probe passes, the first real batch fails
                raise RuntimeError("out of memory (simulated)")
            return base(x)

    out = tmp_path / "out"
    with pytest.raises(RuntimeError) as e:
        fastload.reinforce(str(tmp_path / "img"), DiesInTheFirstShard(), str(out), num_augmentations=2,
                           batch_size=4, image_size=32, progress=False)
    assert not out.exists()
    assert "was removed" in " ".join(getattr(e.value, "__notes__", []))


def test_dynamic_export_runs_reinforce_end_to_end(tmp_path):
    make_images(str(tmp_path / "img"), n=5, classes=2)
    path = fastload.export_teacher(make_teacher(2), 32, str(tmp_path / "t.pt2"))
    # 5 images x 3 augmentations in batches of 4: full batches and a smaller last one
    m = fastload.reinforce(str(tmp_path / "img"), path, str(tmp_path / "out"), num_augmentations=3,
                           batch_size=4, image_size=32, progress=False)
    assert m["complete"] and m["num_rows"] == 5
