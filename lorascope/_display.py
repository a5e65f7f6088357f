"""Rich display of lorascope's values in notebooks, without the lower layers importing the report.

``Run`` (store), ``Comparison`` (analysis), ``Analysis`` and ``Recommendation`` (workflows) show an HTML summary in
Jupyter (``_repr_html_``) and hand out the report's figures as matplotlib figures (``.plot``); the rendering lives
in :mod:`lorascope.report.notebook`, a layer that these may not import (docs/design.md). So the value asks this
module, which every layer may import, and :mod:`lorascope.report.notebook` registers its renderers here when
``lorascope`` is imported (``lorascope/__init__.py`` wires them, as it wires the public surface). A value's method
is one line: ``return _display.html("analysis", self.summary)``.

Nothing here imports matplotlib or any renderer; an unregistered kind (only possible while ``lorascope`` itself is
being imported) shows no HTML, so Jupyter falls back to ``repr``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lorascope.errors import LorascopeError

__all__ = ["figures", "html", "register"]

_HTML: dict[str, Callable[[Any], str]] = {}
_FIGURES: dict[str, Callable[[Any], Any]] = {}


def register(kind: str, *, html: Callable[[Any], str], figures: Callable[[Any], Any] | None = None) -> None:
    """Register the renderers of one kind of value: ``html(summary) -> str`` and ``figures(value) -> accessor``."""
    _HTML[kind] = html
    if figures is not None:
        _FIGURES[kind] = figures


def html(kind: str, summary: Any) -> str | None:
    """The HTML summary of a value of ``kind`` from its summary (its ``summary`` or ``to_dict()``), or None."""
    render = _HTML.get(kind)
    return None if render is None else render(summary)


def figures(kind: str, value: Any) -> Any:
    """The figure accessor of a value of ``kind`` (see :mod:`lorascope.report.notebook`)."""
    make = _FIGURES.get(kind)
    if make is None:
        raise LorascopeError(f"no figures are registered for {kind!r}: import lorascope first")
    return make(value)
