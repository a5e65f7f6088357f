"""The look every report figure shares: size, resolution, matplotlib settings, axis labels, log-axis ticks and
palettes. The settings apply only inside :func:`figure_style`, so nothing global changes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import matplotlib as mpl
from matplotlib.ticker import FuncFormatter

from lorascope.report.format import compact

__all__ = ["DPI", "WIDTH_IN", "X_LABELS", "figure_style", "palette", "plain_log_ticks"]

WIDTH_IN = 10.0  # 1000 px at DPI: the width the figures are designed to be read at
DPI = 100
X_LABELS = {"examples_seen": "examples seen (training examples, log scale)",
            "tokens_seen": "tokens seen (training tokens, log scale)",
            "step": "optimizer steps (log scale; examples seen were not recorded)"}
_RC = {"axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
       "font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 9, "figure.dpi": DPI}


@contextmanager
def figure_style() -> Iterator[None]:
    """Report styling for the duration of one call; rcParams are restored afterwards."""
    with mpl.rc_context(_RC):  # type: ignore[arg-type]  # matplotlib types rc keys as a Literal of every name
        yield


def palette(n: int, name: str) -> list[Any]:
    """``n`` colours (at least one) of the seaborn palette ``name``."""
    import seaborn as sns

    return list(sns.color_palette(name, max(n, 1)))


def plain_log_ticks(axis: Any) -> None:
    """Plain numbers on a log axis; minor ticks labelled when the axis spans few decades (all of them within one
    decade, those at 2 and 5 within two), so a short range still shows numbers."""
    def minor(value: float, _: Any) -> str:
        low, high = sorted(axis.get_view_interval())
        decades = math.log10(high / low) if low > 0 else math.inf
        mantissa = round(value / 10 ** math.floor(math.log10(value)), 6)
        return compact(value) if decades <= 1.0 or (decades <= 2.0 and mantissa in (2.0, 5.0)) else ""

    axis.set_major_formatter(FuncFormatter(lambda value, _: compact(value)))
    axis.set_minor_formatter(FuncFormatter(minor))
