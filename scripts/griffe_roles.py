"""A griffe extension for the API reference (mkdocs.yml): the docstrings write cross-references in Sphinx's form
(:class:`~lorascope.x.Y`, :func:`analyze`, :data:`PLOT_NAMES`), which Markdown would show raw; they become code
spans of the name as Sphinx would display it (the last part after ``~``)."""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|obj|exc|const):`(~?)([^`<]+?)(?:\s*<([^>]+)>)?`")


def _display(match: re.Match[str]) -> str:
    tilde, text, target = match.group(1), match.group(2).strip(), match.group(3)
    if target is not None:  # :class:`shown <target>`
        return f"`{text}`"
    return f"`{text.rsplit('.', 1)[-1] if tilde else text}`"


class SphinxRoles(griffe.Extension):
    def on_object(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_display, obj.docstring.value)
