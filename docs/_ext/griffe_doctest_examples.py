"""griffe extension for the API pages: reads bnbfuse's docstrings the way their authors wrote
them, before griffe parses them as Google style.

* An ``Example:`` section whose body is a doctest is read as ``Examples:``, so mkdocstrings
  renders it as Python code (``Example:`` alone is an admonition, whose ``>>>`` lines would
  render as Markdown text).
* An argument line naming several parameters (``a, b: text``) documents each of them.
* Sphinx roles (``:class:`X` ``, ``:func:``, ``:meth:``, ...) render as inline code.
* A ``Raises:`` section written as prose rather than ``Error: description`` items is shown
  as a plain "Errors" note instead of being mis-parsed.
"""
from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

_EXAMPLE = re.compile(r"^(\s*)Example:\s*\n(?=\s+>>>)", re.M)
_ARGS = re.compile(r"^(\s*)(Args|Arguments|Parameters|Keyword Args|Keyword Arguments):\s*$")
_MULTI = re.compile(r"^(\s+)(\w+(?:\s*,\s*\w+)+)(\s*\([^)]*\))?:(\s.*)?$")
_RAISES = re.compile(r"^(\s*)Raises:\s*$")
_RAISES_ITEM = re.compile(r"^[A-Za-z_][\w.]*(\s*\([^)]*\))?\s*:(\s|$)")
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


def _prose_raises_to_note(text: str) -> str:
    lines = text.split("\n")
    for i, line in enumerate(lines):
        head = _RAISES.match(line)
        if not head:
            continue
        base = len(head.group(1))
        body = []
        for nxt in lines[i + 1:]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= base:
                break
            body.append(nxt)
        items = [b for b in body if b.strip()]
        if not items:
            continue
        item_indent = min(len(b) - len(b.lstrip()) for b in items)
        if any(len(b) - len(b.lstrip()) == item_indent and not _RAISES_ITEM.match(b.strip())
               for b in items):
            lines[i] = f"{head.group(1)}Errors:"
    return "\n".join(lines)


class DoctestExamples(Extension):
    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        doc = obj.docstring
        if doc is None:
            return
        value = _EXAMPLE.sub(r"\1Examples:\n", doc.value)
        value = _ROLE.sub(r"`\1`", value)
        doc.value = _prose_raises_to_note(_split_multi_params(value))
