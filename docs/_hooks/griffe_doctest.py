"""Griffe extension for the API reference. Doctests render as code, never as Markdown:

- an ``Example:`` header (which Google style reads as a free-text admonition) becomes
  ``Examples:``, the section whose ``>>>`` lines griffe renders as console code;
- a run of doctest lines outside such a section becomes a fenced ``pycon`` block, so
  Markdown never reads ``d["a"]["b"]`` or ``[0.2, 0.7]`` in it as links.

The docstrings stay plain doctests in the source."""
from __future__ import annotations

import re

from griffe import Extension

_HEADER = re.compile(r"^(\s*)Examples?:\s*$")


def fence_doctests(text: str) -> str:
    lines = text.splitlines()
    out, i, section = [], 0, None  # section: indent of the current Examples header
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        indent = line[: len(line) - len(stripped)]
        m = _HEADER.match(line)
        if m:
            section = len(m.group(1))
            out.append(m.group(1) + "Examples:")
            i += 1
            continue
        if stripped and section is not None and len(indent) <= section:
            section = None  # a line back at the header's level ends the section
        if section is not None or not stripped.startswith(">>>"):
            out.append(line)
            i += 1
            continue
        block = []
        while i < len(lines) and lines[i].strip() and lines[i].startswith(indent):
            block.append(lines[i][len(indent):])
            i += 1
        if out and out[-1].strip():
            out.append("")
        out += [indent + "```pycon"] + [indent + b for b in block] + [indent + "```"]
        if i < len(lines) and lines[i].strip():
            out.append("")
    return "\n".join(out)


class DoctestFences(Extension):
    def on_instance(self, *, obj, **kwargs) -> None:
        doc = getattr(obj, "docstring", None)
        if doc is not None and ">>>" in doc.value:
            doc.value = fence_doctests(doc.value)
