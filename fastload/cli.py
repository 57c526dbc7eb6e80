"""The ``fastload`` command. Each subcommand lives beside the code it drives and exposes
``main(argv) -> int`` with its own argparse, so this file only dispatches."""
from __future__ import annotations

import argparse
import importlib
import sys

from fastload._cli import DefaultsFormatter, describe, flag_error  # noqa: F401  (re-exported for the commands)

# bench modes: flag -> (entry point, what it measures); `fastload bench --help` lists them
BENCH_MODE_HELP = {
    "--lm": ("fastload.bench.lm:main", "Dataset Decomposition vs concat-and-chunk vs packing on real text"),
    "--ffn": ("fastload.bench.ffn:main", "sparse ReLU FFN vs dense linear layers on the CPU"),
    "--variable": ("fastload.bench.variable:main", "variable-resolution batching vs a fixed 224 loader"),
    "--kernel": ("fastload.bench.kernel:main", "the fused replay kernel alone vs the torch ops it replaces"),
    "--reinforce": ("fastload.bench.reinforce:main", "dataset generation speed and bytes per stored augmentation"),
    "--triton": ("fastload.bench.triton_replay:main", "the Triton replay kernel on a GPU vs per-image torch ops"),
    "--gpu": ("fastload.bench.gpu:main", "every GPU figure in one short run (--dry-run checks the script on a CPU)"),
}
BENCH_MODES = {flag: target for flag, (target, _) in BENCH_MODE_HELP.items()}

COMMANDS = {
    "bench": ("fastload.bench.images:main",
              "benchmark the image loaders on the embedded photos (other benchmarks: "
              + ", ".join(BENCH_MODE_HELP) + "; see fastload bench --help)"),
    "reinforce": ("fastload.generate:main", "create a reinforced dataset from images and a teacher"),
    "inspect": ("fastload.tools.inspect:main", "summarize and validate a reinforced dataset"),
    "import-datacomp": ("fastload.importers.datacomp:main",
                        "import DataCompDR-style WebDataset shards into the reinforced format"),
    "decompose": ("fastload.tokens.decompose:main", "decompose tokenized documents into length buckets"),
    "import-mldr": ("fastload.importers.mldr:main", "import an apple/ml-dr reinforcement archive (ImageNet+) for your image folder"),
    "curate": ("fastload.curate:main", "retrieve a transfer set: the pool rows nearest to query embeddings (faiss)"),
}


# bench modes whose parser has --out-dir (fastload.bench.images defaults to the cache itself)
_OUT_DIR_MODES = {"fastload.bench.lm:main", "fastload.bench.ffn:main", "fastload.bench.variable:main",
                  "fastload.bench.kernel:main", "fastload.bench.reinforce:main"}


def _usage() -> str:
    lines = ["usage: fastload COMMAND [options]   (fastload COMMAND --help for its options)", ""]
    lines += [f"  {name:<16} {doc}" for name, (_, doc) in COMMANDS.items()]
    return "\n".join(lines)


def _one_line_error(self, message):
    """argparse's usage error as one line (its default prints the whole usage first)."""
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _call(target: str, argv: list) -> int:
    module, func = target.split(":")
    # for this call only: tests and other callers in the same process keep argparse's own
    saved = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _one_line_error
    try:
        return int(getattr(importlib.import_module(module), func)(argv) or 0)
    finally:
        argparse.ArgumentParser.error = saved


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"fastload: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target = COMMANDS[cmd][0]
    if cmd == "bench":
        for flag, mode_target in BENCH_MODES.items():
            if flag in rest:
                rest.remove(flag)
                target = mode_target
                break
        # results go to the user's cache unless --out-dir is given (a relative default, run
        # from a checkout, overwrote its committed results)
        if target in _OUT_DIR_MODES and not any(a == "--out-dir" or a.startswith("--out-dir=") for a in rest) \
                and not {"-h", "--help"} & set(rest):
            from fastload.bench._common import default_results_dir

            rest += ["--out-dir", default_results_dir()]
    return _call(target, rest)


if __name__ == "__main__":
    sys.exit(main())
