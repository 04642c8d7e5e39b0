"""griffe extension for the API pages: reads bnbfuse's docstrings the way their authors wrote
them, before griffe parses them as Google style.

* An ``Example:`` section whose body is a doctest is read as ``Examples:``, so mkdocstrings
  renders it as Python code (``Example:`` alone is an admonition, whose ``>>>`` lines would
  render as Markdown text).
* An argument line naming several parameters (``a, b: text``) documents each of them.
* Sphinx roles (``:class:`X` ``, ``:func:``, ``:meth:``, ...) render as inline code.
"""
from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

_EXAMPLE = re.compile(r"^(\s*)Example:\s*\n(?=\s+>>>)", re.M)
_ARGS = re.compile(r"^(\s*)(Args|Arguments|Parameters|Keyword Args|Keyword Arguments):\s*$")
_MULTI = re.compile(r"^(\s+)(\w+(?:\s*,\s*\w+)+)(\s*\([^)]*\))?:(\s.*)?$")
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|obj|data|exc):`~?([^`]+)`")


def _split_multi_params(text: str) -> str:
    out, in_args, item_indent = [], False, None
    for line in text.split("\n"):
        head = _ARGS.match(line)
        if head:
            in_args, item_indent = True, None
            out.append(line)
            continue
        if in_args and line.strip():
            indent = len(line) - len(line.lstrip())
            if item_indent is None:
                item_indent = indent
            elif indent < item_indent:
                in_args = False
            m = _MULTI.match(line) if in_args and indent == item_indent else None
            if m:
                for name in re.split(r"\s*,\s*", m.group(2)):
                    out.append(f"{m.group(1)}{name}{m.group(3) or ''}:{m.group(4) or ''}")
                continue
        out.append(line)
    return "\n".join(out)


class DoctestExamples(Extension):
    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        doc = obj.docstring
        if doc is None:
            return
        value = _EXAMPLE.sub(r"\1Examples:\n", doc.value)
        value = _ROLE.sub(r"`\1`", value)
        doc.value = _split_multi_params(value)
