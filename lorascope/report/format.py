"""The report's number vocabulary: one way to write a count, an estimate, a share or a plain number, used by the
terminal, the HTML page and every other rendering, so the same value reads the same everywhere.

A missing value (``None`` in a summary, NaN, or -1 for a count a run file did not record) is written
:data:`MISSING`; an infinite count (an unbounded interval) is written "unbounded".
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from typing import Any

__all__ = ["MISSING", "X_UNITS", "approx_count", "bound", "byte_size", "compact", "count", "escape", "json_text",
           "layer", "number", "percent", "significant", "table"]

MISSING = "n/a"
# The data axis of a summary ("x") in words: "12,800 examples".
X_UNITS = {"examples_seen": "examples", "tokens_seen": "tokens", "step": "steps"}


def _missing(value: Any) -> bool:
    return value is None or math.isnan(float(value))


def count(value: Any) -> str:
    """An exact count (steps, examples or tokens seen, parameters, a batch size) with thousands separators.

    >>> count(12345), count(None), count(-1), count(float("inf"))
    ('12,345', 'n/a', 'n/a', 'unbounded')
    """
    if _missing(value) or float(value) < 0:
        return MISSING
    if math.isinf(float(value)):
        return "unbounded"
    return f"{float(value):,.0f}"


def approx_count(value: Any, digits: int = 3) -> str:
    """A predicted count (where a curve crosses a rank) to ``digits`` significant digits, thousands separators.

    >>> approx_count(12345.0), approx_count(20049.0), approx_count(None)
    ('12,300', '20,000', 'n/a')
    """
    if _missing(value) or float(value) < 0 or math.isinf(float(value)):
        return count(value)
    return f"{float(f'{float(value):.{digits}g}'):,.0f}"


def bound(value: Any) -> str:
    """A bound of a predicted interval; the summary stores an infinite bound as ``None``.

    >>> bound(8000.0), bound(None)
    ('8,000', 'unbounded')
    """
    return "unbounded" if value is None else approx_count(value)


def number(value: Any, digits: int = 1) -> str:
    """A measured or estimated number with ``digits`` decimals and thousands separators.

    >>> number(2.54), number(12345.678, 3), number(None)
    ('2.5', '12,345.678', 'n/a')
    """
    return MISSING if _missing(value) else f"{float(value):,.{digits}f}"


def percent(share: Any, digits: int = 1) -> str:
    """A share in [0, 1] as a percentage.

    >>> percent(0.8388), percent(None)
    ('83.9%', 'n/a')
    """
    return MISSING if _missing(share) else f"{100.0 * float(share):.{digits}f}%"


def significant(value: Any, digits: int = 4) -> str:
    """A value of any magnitude to ``digits`` significant digits (a LoRA alpha, a scaling, a constant).

    >>> significant(32.0), significant(0.0123456), significant(None)
    ('32', '0.01235', 'n/a')
    """
    return MISSING if _missing(value) else f"{float(value):.{digits}g}"


def compact(value: float) -> str:
    """A tick label on a log axis: 1000 -> 1k, 2.5e6 -> 2.5M.

    >>> compact(1000.0), compact(2.5e6), compact(20.0)
    ('1k', '2.5M', '20')
    """
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:g}{unit}"
    return f"{value:g}"


def byte_size(n_bytes: int) -> str:
    """A file size in binary units.

    >>> byte_size(512), byte_size(3 * 1024**2)
    ('512 B', '3.0 MiB')
    """
    size = float(n_bytes)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def layer(value: Any) -> str:
    """A transformer block index; -1 (embeddings, the head, anything outside the blocks) says so.

    >>> layer(3), layer(-1)
    ('3', 'outside the blocks')
    """
    return "outside the blocks" if int(value) < 0 else str(int(value))


def table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Lines of a plain-text table: the first column left-aligned, the others right-aligned.

    >>> print("\\n".join(table(["kind", "share"], [["mlp", "61.2%"], ["attention", "8.0%"]])))
    kind       share
    mlp        61.2%
    attention   8.0%
    """
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]

    def line(cells: Sequence[Any]) -> str:
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(header), *(line(r) for r in rows)]


def json_text(data: Any) -> str:
    """Strict JSON (no NaN or Infinity), indented: the form of every JSON file and ``--json`` output."""
    return json.dumps(data, indent=2, allow_nan=False)


def escape(value: Any) -> str:
    """``value`` as text safe inside HTML (quotes included)."""
    return html.escape(str(value), quote=True)
