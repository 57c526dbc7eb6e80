"""Argument-parsing helpers shared by every command's ``main()``.

They live apart from ``fastload.cli`` (the dispatcher, which reaches the benchmark harness)
so that library modules with a command (``decompose``, ``reinforce``, the importers,
``curate``) never import the CLI or the harness: the layering contract in ``.importlinter``
checks it."""
from __future__ import annotations

import argparse
import sys


def describe(doc: str) -> str:
    """A command's help description from its module docstring: the whole first paragraph,
    unwrapped (a first line alone cut sentences in half)."""
    para = (doc or "").strip().split("\n\n")[0]
    return " ".join(para.split())


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only where the help text does not already say its default and
    there is one to show (never "(default: ...) (default: None)")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS) \
                or isinstance(action, argparse._HelpAction):
            return text
        return super()._get_help_string(action)


def flag_error(prog: str, exc: BaseException, parser, names=None) -> int:
    """Print a library error for a command-line user: Python argument names (``eot_id=``,
    ``pass overwrite=True``) become the flags that set them (``--eot-id``, ``pass
    --overwrite``). Returns the exit status 2."""
    import re

    msg = str(exc)
    for name, flag in (names or {}).items():  # e.g. a positional: dataset_or_folder -> IMAGES
        msg = re.sub(rf"(?<![\w-]){re.escape(name)}\b", flag, msg)
    msg = " ".join(msg.split())  # one line, whatever the library's message looked like
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
