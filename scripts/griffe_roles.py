"""A griffe extension for the API reference (mkdocs.yml): the docstrings are numpydoc with Sphinx markup, which
Markdown would show raw or mangle (it eats the backslashes of LaTeX). Cross-references (:class:`~lorascope.x.Y`,
:func:`analyze`) become code spans of the name as Sphinx would display it (the last part after ``~``), inline
:math:`...` a code span of its source, and a ``.. math::`` block a fenced LaTeX block."""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|obj|exc|const|math):`(~?)([^`<]+?)(?:\s*<([^>]+)>)?`")
# ".. math:: first line" and the lines indented under it
MATH = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<first>.*)\n(?P<rest>(?:(?P=indent)[ \t]+\S.*\n)*)", re.M)


def _display(match: re.Match[str]) -> str:
    tilde, text, target = match.group(1), match.group(2).strip(), match.group(3)
    if target is not None:  # :class:`shown <target>`
        return f"`{text}`"
    return f"`{text.rsplit('.', 1)[-1] if tilde else text}`"


def _math_block(match: re.Match[str]) -> str:
    indent = match.group("indent")
    lines = [match.group("first").strip()] + [line.strip() for line in match.group("rest").splitlines()]
    body = "\n".join(f"{indent}{line}" for line in lines if line)
    return f"{indent}```latex\n{body}\n{indent}```\n"


class SphinxRoles(griffe.Extension):
    def on_object(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = obj.docstring.value if obj.docstring.value.endswith("\n") else obj.docstring.value + "\n"
            obj.docstring.value = ROLE.sub(_display, MATH.sub(_math_block, text)).rstrip("\n")
