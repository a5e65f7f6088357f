"""The report's subspace figure: each kind's median subspace similarity to the final update against data, and the
intruder dimensions per kind against data. Rendering only: every number comes from ``Analysis.subspace``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from lorascope.report.style import WIDTH_IN, X_LABELS, palette, plain_log_ticks

if TYPE_CHECKING:
    from lorascope.workflows.analyze import Analysis

__all__ = ["subspace_figure"]


def subspace_figure(analysis: Analysis, suffix: str) -> Figure | None:
    """phi to the final subspace (median per kind, min of left and right) and intruder counts per kind against
    the data axis; None when the run recorded neither singular vectors nor intruder cosines."""
    sub = analysis.subspace
    if sub is None or (sub.dynamics is None and sub.intruders is None):
        return None
    fig = Figure(figsize=(WIDTH_IN, 4.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    dyn, intr = sub.dynamics, sub.intruders
    kinds = sorted(set((dyn or intr).kinds))  # type: ignore[union-attr]
    colors = dict(zip([*kinds, "all"], [*palette(len(kinds), "colorblind")[: len(kinds)], (0.0, 0.0, 0.0)]))
    if dyn is not None:
        for kind in [*kinds, "all"]:
            group = dyn.group(None if kind == "all" else kind)
            x, y = _positive(dyn.x, group.phi_final)
            if x.size:
                left.plot(x, y, "-o", markersize=3, color=colors[kind], linewidth=2.2 if kind == "all" else 1.4,
                          label=f"{kind} ({group.modules})")
        left.axhline(dyn.threshold, color="0.4", linestyle="--", linewidth=1.0)
        left.set_ylim(-0.03, 1.03)
        left.set_ylabel(f"phi to the final top-{dyn.rank} subspace")
        left.set_title(f"When the update's subspace settles{suffix}")
        _log_x(left, dyn.x, sub.x)
    else:
        left.text(0.5, 0.5, "no singular vectors recorded (factors_k)", ha="center", va="center",
                  transform=left.transAxes, color="0.3")
    if intr is not None:
        for kind in [*kinds, "all"]:
            x, y = _positive(intr.x, intr.group_counts(None if kind == "all" else kind).astype(float))
            if x.size:
                right.plot(x, y, "-o", markersize=3, color=colors[kind], linewidth=2.2 if kind == "all" else 1.4,
                           label=kind)
        right.set_ylabel(f"intruder dimensions (eps = {intr.eps:g}, top {intr.k})")
        right.set_title(f"Intruder dimensions{suffix}")
        _log_x(right, intr.x, sub.x)
    else:
        right.text(0.5, 0.5, "no intruder cosines recorded (intruder_k)", ha="center", va="center",
                   transform=right.transAxes, color="0.3")
    return fig


def _positive(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0)
    return x[keep], y[keep]


def _log_x(ax: object, x: np.ndarray, axis: str) -> None:
    if np.any(np.asarray(x, dtype=float) > 0):
        ax.set_xscale("log")  # type: ignore[attr-defined]
        plain_log_ticks(ax.xaxis)  # type: ignore[attr-defined]
        ax.legend(loc="best")  # type: ignore[attr-defined]
    ax.set_xlabel(X_LABELS.get(axis, axis))  # type: ignore[attr-defined]
