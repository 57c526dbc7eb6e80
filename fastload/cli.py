"""The ``fastload`` command. Each subcommand lives beside the code it drives and exposes
``main(argv) -> int`` with its own argparse, so this file only dispatches."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "bench": ("fastload.bench.images:main",
              "benchmark the image loaders on embedded data; other benchmarks: --lm (sequence "
              "buckets), --ffn (sparse FFN), --variable (variable resolution), --kernel (fused "
              "replay kernel alone), --reinforce (generation, format size), --triton (GPU replay), --gpu (every GPU figure "
              "in one run; --dry-run on CPU)"),
    "reinforce": ("fastload.generate:main", "create a reinforced dataset from images and a teacher"),
    "inspect": ("fastload.format.inspect:main", "summarize and validate a reinforced dataset"),
    "import-datacomp": ("fastload.format.datacomp:main",
                        "import DataCompDR-style WebDataset shards into the reinforced format"),
    "decompose": ("fastload.format.decompose:main", "decompose tokenized documents into length buckets"),
}
BENCH_MODES = {"--lm": "fastload.bench.lm:main", "--ffn": "fastload.bench.ffn:main",
               "--variable": "fastload.bench.variable:main", "--kernel": "fastload.bench.kernel:main",
               "--reinforce": "fastload.bench.reinforce:main",
               "--triton": "fastload.bench.triton_replay:main", "--gpu": "fastload.bench.gpu:main"}


def _usage() -> str:
    lines = ["usage: fastload COMMAND [options]   (fastload COMMAND --help for its options)", ""]
    lines += [f"  {name:<16} {doc}" for name, (_, doc) in COMMANDS.items()]
    return "\n".join(lines)


def _call(target: str, argv: list) -> int:
    module, func = target.split(":")
    return int(getattr(importlib.import_module(module), func)(argv) or 0)


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
    return _call(target, rest)


if __name__ == "__main__":
    sys.exit(main())
