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
    "import-mldr": ("fastload.format.mldr:main", "import an apple/ml-dr reinforcement archive (ImageNet+) for your image folder"),
    "curate": ("fastload.curate:main", "retrieve a transfer set: the pool rows nearest to query embeddings (faiss)"),
}
BENCH_MODES = {"--lm": "fastload.bench.lm:main", "--ffn": "fastload.bench.ffn:main",
               "--variable": "fastload.bench.variable:main", "--kernel": "fastload.bench.kernel:main",
               "--reinforce": "fastload.bench.reinforce:main",
               "--triton": "fastload.bench.triton_replay:main", "--gpu": "fastload.bench.gpu:main"}


def flag_error(prog: str, exc: BaseException, parser, names=None) -> int:
    """Print a library error for a command-line user: Python argument names (``eot_id=``,
    ``pass overwrite=True``) become the flags that set them (``--eot-id``, ``pass
    --overwrite``). Returns the exit status 2."""
    import re

    msg = str(exc)
    for name, flag in (names or {}).items():  # e.g. a positional: dataset_or_folder -> IMAGES
        msg = re.sub(rf"(?<![\w-]){re.escape(name)}\b", flag, msg)
    for action in parser._actions:
        flags = [o for o in action.option_strings if o.startswith("--")]
        if not flags or action.dest in ("help",):
            continue
        flag = flags[0]
        dest = re.escape(action.dest)
        msg = re.sub(rf"(?<![\w-]){dest}=True\b", flag, msg)
        msg = re.sub(rf"(?<![\w-]){dest}=", flag + " ", msg)
        msg = re.sub(rf"(?<![\w.-]){dest}(?=[: ])(?!\w)", flag, msg) if action.dest in _PLAIN_NAMES else msg
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return 2


# argument names that also appear bare in messages ("topk exceeds ...", "num_classes: ...")
_PLAIN_NAMES = {"topk", "num_classes", "image_size", "num_augmentations", "eot_id", "vocab_size",
                "tokens_per_step", "overwrite", "min_bucket", "max_bucket", "shard_size", "batch_size"}


# bench modes whose parser has --out-dir (fastload.bench.images defaults to the cache itself)
_OUT_DIR_MODES = {"fastload.bench.lm:main", "fastload.bench.ffn:main", "fastload.bench.variable:main",
                  "fastload.bench.kernel:main", "fastload.bench.reinforce:main"}


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
        # results go to the user's cache unless --out-dir is given (a relative default, run
        # from a checkout, overwrote its committed results)
        if target in _OUT_DIR_MODES and not any(a == "--out-dir" or a.startswith("--out-dir=") for a in rest) \
                and not {"-h", "--help"} & set(rest):
            from fastload.bench._common import default_results_dir

            rest += ["--out-dir", default_results_dir()]
    return _call(target, rest)


if __name__ == "__main__":
    sys.exit(main())
