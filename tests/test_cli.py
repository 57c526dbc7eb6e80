"""The command line as a person uses it: the README's reinforce line on a
3-class folder, the teacher's width checked against the folder, --help with defaults, errors
naming flags, torch.export teachers first, TorchScript without torch's deprecation noise, our
error alone for a non-model teacher, one style (INPUT --out DIR) across subcommands; every error one line with exit 2; whole help
texts listing the bench modes, citing no file outside the repository."""
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from fastload.datasets import make_images, make_teacher

SIZE = 32
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cli") / "photos")
    make_images(root, 6, classes=3)
    return root


def _export(t, path):
    torch.export.save(torch.export.export(t.eval(), (torch.zeros(2, 3, SIZE, SIZE),),
                                          dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)), path)
    return path


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fastload.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_readme_line_on_three_classes_topk_defaults_to_classes(folder, tmp_path, capsys):
    from fastload.generate import main

    teacher = _export(make_teacher(3), str(tmp_path / "t.pt2"))
    out = str(tmp_path / "plus")
    assert main([folder, "--teacher", teacher, "--out", out, "--image-size", str(SIZE),
                 "--num-augmentations", "2", "--quiet"]) == 0
    import fastload

    ds = fastload.ReinforcedDataset(out)
    assert ds.topk == 3 and ds.num_classes == 3
    # the older --images form still works, with a note
    assert main(["--images", folder, "--teacher", teacher, "--out", str(tmp_path / "p2"),
                 "--image-size", str(SIZE), "--num-augmentations", "2", "--quiet"]) == 0
    assert "--images DIR is deprecated" in capsys.readouterr().err


def test_teacher_width_checked_against_folder(folder, tmp_path, capsys):
    from fastload.generate import main

    teacher = _export(make_teacher(5), str(tmp_path / "t5.pt2"))
    base = [folder, "--teacher", teacher, "--image-size", str(SIZE), "--num-augmentations", "2", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "3 class subfolders but the teacher outputs 5" in err and "--num-classes 5" in err
    assert "num_classes=" not in err
    # explicit: the folder's classes are the teacher's first 3
    assert main(base + ["--out", str(tmp_path / "b"), "--num-classes", "5"]) == 0


def test_errors_name_flags(folder, tmp_path, capsys):
    from fastload.generate import main

    teacher = _export(make_teacher(3), str(tmp_path / "t.pt2"))
    assert main([folder, "--teacher", teacher, "--out", str(tmp_path / "o"), "--topk", "5",
                 "--image-size", str(SIZE), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--topk 5 exceeds" in err and "topk=" not in err
    assert main([str(tmp_path / "missing"), "--teacher", teacher, "--out", str(tmp_path / "o2"),
                 "--image-size", str(SIZE), "--quiet"]) == 2
    assert "IMAGES" in capsys.readouterr().err
    # a teacher exported at another size: a clear error, not a traceback
    assert main([folder, "--teacher", teacher, "--out", str(tmp_path / "o3"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "fails on a [65, 3, 224, 224] batch (--image-size 224)" in err, err  # batch 64 + 1: never used by the run


def test_help_has_defaults_and_a_sentence_per_option():
    p = _cli("reinforce", "--help")
    assert p.returncode == 0
    text = " ".join(p.stdout.split())
    assert "(default: 10)" in text and "default: min(10, classes)" in text
    assert "no teacher needed." in text  # the description is whole
    import argparse

    from fastload import generate

    # every option has help text
    seen = []
    orig = argparse.ArgumentParser.parse_args

    def grab(self, *a, **k):
        seen.extend(self._actions)
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = grab
    try:
        with pytest.raises(SystemExit):
            generate.main([])
    finally:
        argparse.ArgumentParser.parse_args = orig
    assert seen and all(a.help for a in seen), [a.dest for a in seen if not a.help]


def test_non_model_teacher_gets_our_error_alone(folder, tmp_path):
    junk = tmp_path / "teacher.pt"
    junk.write_text("not a model")
    p = _cli("reinforce", folder, "--teacher", str(junk), "--out", str(tmp_path / "o"), "--quiet")
    assert p.returncode == 2
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert lines[0].startswith("fastload reinforce: error: teacher file") and len(lines) == 1, p.stderr
    pickled = tmp_path / "pickled.pt"
    torch.save(make_teacher(3), pickled)
    p = _cli("reinforce", folder, "--teacher", str(pickled), "--out", str(tmp_path / "o"), "--quiet")
    assert p.returncode == 2 and "torch.save() pickle" in p.stderr and "Traceback" not in p.stderr


def test_torchscript_teacher_read_with_one_note(tmp_path):
    from fastload import generate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = str(tmp_path / "ts.pt")
        torch.jit.save(torch.jit.trace(make_teacher(3).eval(), torch.zeros(2, 3, SIZE, SIZE)), path)
    generate._JIT_NOTED = False
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t = generate.load_teacher(path)
        generate.load_teacher(path)
    assert t(torch.zeros(1, 3, SIZE, SIZE)).shape == (1, 3)
    msgs = [str(x.message) for x in w]
    assert not any("`torch.jit.load` is deprecated" in m for m in msgs), msgs
    assert sum("prefer a torch.export program" in m for m in msgs) == 1
    # a torch.export program is read whatever its file name
    ep = _export(make_teacher(3), str(tmp_path / "exported.pt"))
    assert type(generate.load_teacher(ep)).__name__ != "RecursiveScriptModule"


def test_decompose_one_style(tmp_path):
    import fastload
    from fastload.tokens.decompose import main

    toks = np.random.default_rng(0).integers(0, 256, 4000).astype(np.int32)
    np.savez(tmp_path / "t.npz", tokens=toks, offsets=np.arange(0, 4001, 200))
    src = str(tmp_path / "t.npz")
    assert main([src, "--out", str(tmp_path / "a"), "--min-bucket", "4", "--max-bucket", "6",
                 "--vocab-size", "257", "--eot-id", "256"]) == 0
    p = _cli("decompose", src, str(tmp_path / "b"), "--min-bucket", "4", "--max-bucket", "6",
             "--vocab-size", "257", "--eot-id", "256")
    assert p.returncode == 0 and "positional OUT is deprecated; use --out" in p.stderr
    p = _cli("decompose", src, "--out", str(tmp_path / "c"), "--min-bucket", "4", "--max-bucket", "6",
             "--vocab-size", "257", "--eot-id", "999")
    assert p.returncode == 2 and "eot_id" not in p.stderr and "--eot-id" in p.stderr, p.stderr
    p = _cli("decompose", src, "--out", str(tmp_path / "a"), "--min-bucket", "4", "--max-bucket", "6",
             "--vocab-size", "257", "--eot-id", "256")
    assert p.returncode == 2 and "(pass --overwrite)" in p.stderr, p.stderr
    assert fastload.DecompositionLoader(str(tmp_path / "a"), tokens_per_step=64)


def _help(capsys, *argv):
    from fastload import cli

    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


HELP_CASES = [("reinforce",), ("inspect",), ("import-datacomp",), ("decompose",), ("import-mldr",),
              ("bench",), ("bench", "--lm"), ("bench", "--ffn"), ("bench", "--variable"),
              ("bench", "--kernel"), ("bench", "--reinforce"), ("bench", "--triton"), ("bench", "--gpu")]


@pytest.mark.parametrize("argv", HELP_CASES, ids=lambda a: " ".join(a))
def test_help_texts_are_whole(argv, capsys):
    text = _help(capsys, *argv)
    assert text.startswith("usage: fastload " + " ".join(argv)), text[:80]
    assert "(default: None)" not in text and text.count("(default:") == len(
        [l for l in text.splitlines() if "(default:" in l])
    flat = " ".join(text.split())
    blocks = re.split(r"\n  (?=-)", text.split("options:", 1)[-1])
    twice = [b.split()[0] for b in blocks if b.lower().count("default") > 1]
    assert not twice, twice  # never a default said twice
    assert ".md" not in flat and "issue " not in flat.lower()  # no file outside the repository
    # the description is whole sentences: the paragraph after usage ends with a full stop
    desc = text.split("\n\n")[1]
    assert desc.strip().endswith((".", ")")) and len(desc.split()) >= 6, desc


def test_bench_help_lists_its_modes(capsys):
    from fastload import cli

    text = _help(capsys, "bench")
    for flag, (_, what) in cli.BENCH_MODE_HELP.items():
        assert f"fastload bench {flag}" in text and what in " ".join(text.split())


@pytest.mark.parametrize("argv, needle", [
    (["--pipelines", "foo"], "--pipelines: unknown foo"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--lm", "--quick"], "unrecognized arguments: --quick"),
    (["--python-peers", "/nonexistent/python"], "--python-peers '/nonexistent/python': no such executable"),
    (["--num-images", "0"], "--num-images must be positive"),
])
def test_bench_argument_errors_are_one_line(argv, needle, tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    p = subprocess.run([sys.executable, "-m", "fastload.cli", "bench", *argv], capture_output=True,
                       text=True, timeout=300, cwd=ROOT, env=env)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0].startswith("fastload bench") and ": error: " in lines[0] and needle in lines[0], lines
    assert not (tmp_path / "fastload").exists()  # nothing built before the arguments were checked


def test_decompose_that_keeps_nothing_is_an_error(tmp_path, capsys):
    from fastload.tokens.decompose import main

    # 20 documents of 10 tokens: none reaches the shortest chunk of 2**4 = 16 tokens
    toks = np.random.default_rng(0).integers(0, 256, 200).astype(np.int32)
    np.savez(tmp_path / "t.npz", tokens=toks, offsets=np.arange(0, 201, 10))
    out = tmp_path / "out"
    assert main([str(tmp_path / "t.npz"), "--out", str(out), "--min-bucket", "4", "--max-bucket", "6",
                 "--vocab-size", "257", "--eot-id", "256"]) == 2
    raw = capsys.readouterr().err
    err = [l for l in raw.splitlines() if l.startswith("fastload decompose")]  # the rest: progress bars
    assert "Traceback" not in raw and len(err) == 1 and "every one of the 20 documents was dropped" in err[0] and "--min-bucket" in err[0]
    assert not out.exists()


def test_usage_errors_are_one_line_for_every_command(capsys):
    import argparse

    from fastload import cli

    before = argparse.ArgumentParser.error
    for argv in (["reinforce"], ["inspect"], ["decompose", "x"], ["import-mldr"], ["import-datacomp"],
                 ["bench", "--workers", "many"], ["bench", "--ffn", "--bogus"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
        assert e.value.code == 2 and len(err) == 1 and ": error: " in err[0], (argv, err)
    assert argparse.ArgumentParser.error is before  # restored for everyone else in the process
