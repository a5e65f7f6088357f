"""PNG figures of an :class:`~lorascope.workflows.analyze.Analysis`: spectra, rank curves, residuals, energy shares,
loss and MoE experts.

Rendering only: every number comes from the analysis object (plus small reshapes of it); the shared look (size,
resolution, settings, log ticks) is :mod:`lorascope.report.style`. Figures are built with
matplotlib's object API (:class:`matplotlib.figure.Figure`, saved through the Agg canvas), so nothing touches
pyplot's global figure registry or the process-wide backend, and no figure outlives the call that drew it.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, PercentFormatter

from lorascope.analysis.curves import FLAT, TOO_FEW
from lorascope.errors import InvalidOptionError, LorascopeError
from lorascope.report.format import layer
from lorascope.report.style import DPI, WIDTH_IN, X_LABELS, figure_style, palette, plain_log_ticks
from lorascope.report.subspace_plot import subspace_figure
from lorascope.workflows.analyze import CURVE_P

if TYPE_CHECKING:
    from lorascope.workflows.analyze import Analysis, RunResult

__all__ = ["PLOT_NAMES", "AnalysisFigures", "draw_figure", "make_plots"]

# Every figure make_plots may write, in the order a report shows them.
PLOT_NAMES = ("energy_rank", "residual", "spectra", "energy_share", "experts", "subspace", "noise_scale", "loss")

KIND_ORDER = ("attention", "mlp", "moe_expert", "router", "embedding", "head", "norm", "other")
REFUSED = {TOO_FEW: "too few points", FLAT: "no significant growth"}


def make_plots(analysis: Analysis, folder: str | Path) -> dict[str, Path]:
    """Write the report's figures as PNG files into ``folder``.

    Parameters
    ----------
    analysis
        The result of :func:`lorascope.workflows.analyze.analyze`.
    folder
        Output folder, created when missing; files of the same names are replaced.

    Returns
    -------
    dict[str, Path]
        Figure name (see :data:`PLOT_NAMES`) to the file written, in report order. ``loss`` is always there;
        ``energy_rank``, ``residual``, ``spectra`` and ``energy_share`` need at least one snapshot; ``experts``
        needs MoE experts.

    Notes
    -----
    - ``energy_rank``: :math:`k_{0.9}` per kind and over all modules against the data axis, the power-law fit with
      its bootstrap band extrapolated a decade past the data, candidate ranks as horizontal lines and the
      crossings as markers (predicted ones with their interval). Refused fits are drawn as points only.
    - ``residual``: the rank-r residual :math:`e_r = 1 - \\sum_m C_{m,r} / \\sum_m E_m` over all modules.
    - ``spectra``: cumulative energy share of each module's update (from its stored singular values) at the final
      snapshot, per kind, with the energy-weighted kind aggregate at the analysed ranks in bold.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    with figure_style():
        for name in PLOT_NAMES:
            fig = draw_figure(analysis, name)
            if fig is None:
                continue
            path = folder / f"{name}.png"
            fig.savefig(path, format="png", dpi=DPI)
            fig.clear()  # a Figure without pyplot is freed with its last reference; clearing drops artists now
            written[name] = path
    return written


def draw_figure(analysis: Analysis, name: str) -> Figure | None:
    """One figure of the report (a name of :data:`PLOT_NAMES`) in the report's style, or None where the analysis
    has nothing to draw (see :func:`make_plots`). The figure is not saved and belongs to no pyplot registry."""
    if name not in _DRAWERS:
        raise InvalidOptionError(f"The 'name' parameter of draw_figure must be one of {PLOT_NAMES}. Got {name!r} "
                                 "instead.")
    with figure_style():
        return _DRAWERS[name](analysis, " (incomplete)" if analysis.incomplete else "")


class AnalysisFigures:
    """The report's figures of one :class:`~lorascope.workflows.analyze.Analysis` as matplotlib figures, for
    restyling or saving in another format: ``analysis.plot.spectra()``, then ``fig.axes[0].set_title(...)``,
    ``fig.savefig("spectra.pdf")``. In Jupyter, after ``%matplotlib inline``, a figure that ends a cell is
    shown.

    Each method draws afresh and raises :class:`~lorascope.errors.LorascopeError` where the analysis has nothing
    to draw (no snapshots, no MoE experts, no noise-scale estimate).
    """

    def __init__(self, analysis: Analysis) -> None:
        self._analysis = analysis

    def __repr__(self) -> str:
        return f"<figures of an Analysis: {', '.join(n + '()' for n in PLOT_NAMES)}>"

    def _draw(self, name: str) -> Figure:
        fig = draw_figure(self._analysis, name)
        if fig is None:
            raise LorascopeError(f"no {name} figure for this analysis: {_NEEDS[name]}")
        return fig

    def energy_rank(self) -> Figure:
        """k_0.9 per kind against data, its power-law fit and band, the candidate ranks and the crossings."""
        return self._draw("energy_rank")

    def residual(self) -> Figure:
        """The rank-r residual e_r over all recorded modules against data, one line per candidate rank."""
        return self._draw("residual")

    def spectra(self) -> Figure:
        """The cumulative energy share of each module's update at the final snapshot, one panel per kind."""
        return self._draw("spectra")

    def energy_share(self) -> Figure:
        """The share of the update's energy per layer and kind at the final snapshot (a heatmap)."""
        return self._draw("energy_share")

    def experts(self) -> Figure:
        """The share of the update's energy per MoE expert and layer at the final snapshot (a heatmap)."""
        return self._draw("experts")

    def subspace(self) -> Figure:
        """phi to the final update subspace per kind, and intruder dimensions per kind, against data."""
        return self._draw("subspace")

    def noise_scale(self) -> Figure:
        """The gradient noise scale over training and the steps / examples tradeoff at the final estimate."""
        return self._draw("noise_scale")

    def loss(self) -> Figure:
        """The training loss of every run against data."""
        return self._draw("loss")


# -- figures ---------------------------------------------------------------------------------------------------


def _energy_rank(analysis: Analysis, suffix: str) -> Figure | None:
    if not analysis.curves:
        return None
    fig = Figure(figsize=(WIDTH_IN, 6.0), layout="constrained")
    ax = fig.add_subplot()
    colors = _kind_colors(analysis.curves)
    xs_all: list[float] = []
    ys_all: list[float] = []
    beyond = extrapolated = False
    for group, curve in _ordered(analysis.curves):
        color = colors[group]
        x, y = _positive(curve.x, curve.y)
        xs_all.extend(x)
        ys_all.extend(y)
        fit = curve.fit
        if fit.ok and x.size:
            grid = np.geomspace(x.min(), 10.0 * x.max(), 200)
            estimate, low, high = fit.predict(grid)
            ax.fill_between(grid, low, high, color=color, alpha=0.15, linewidth=0)
            ax.plot(grid, estimate, color=color, linewidth=2.2 if group == "all" else 1.6,
                    label=f"{group}: k ∝ x^{fit.exponent:.2f}")
            ax.plot(x, y, "o", color=color, markersize=4)
            x_max = 10.0 * x.max()
            extrapolated = True
        else:
            why = REFUSED.get(fit.status, fit.status)
            ax.plot(x, y, "o", color=color, markersize=4, label=f"{group}: points only, no fit ({why})")
            x_max = x.max() if x.size else np.nan
        for crossing in curve.crossings:
            if crossing.status not in ("observed", "predicted") or not np.isfinite(crossing.x):
                continue
            if crossing.x > x_max * 1.0001:
                beyond = True
                continue
            if crossing.status == "predicted":
                lo, hi = crossing.x - crossing.x_low, crossing.x_high - crossing.x
                hi = hi if np.isfinite(hi) else 0.0
                ax.errorbar([crossing.x], [crossing.level], xerr=[[max(lo, 0.0)], [max(hi, 0.0)]], fmt="D",
                            color=color, markersize=7, capsize=3, markeredgecolor="black")
            else:
                ax.plot([crossing.x], [crossing.level], "s", color=color, markersize=7, markerfacecolor="none",
                        markeredgewidth=1.5)
    if not xs_all:
        undefined = any(why is not None for curve in analysis.curves.values() for why in curve.missing)
        _empty(ax, f"no snapshot has a defined k_{CURVE_P:g}: every update is zero or non-finite (see the notes)"
               if undefined else "no snapshot has a positive data count: nothing to place on a log axis")
        ax.set_title(f"k_{CURVE_P:g} vs {_x_words(analysis.x)}{suffix}")
        return fig
    for rank in analysis.ranks:
        ax.axhline(rank, color="0.35", linestyle="--", linewidth=1)
        ax.annotate(f"r = {rank}", xy=(1.0, rank), xycoords=("axes fraction", "data"), xytext=(-4, 3),
                    textcoords="offset points", ha="right", va="bottom", fontsize=9, color="0.25")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_log_ticks(ax.xaxis)
    plain_log_ticks(ax.yaxis)
    y_lo = min(min(ys_all), min(analysis.ranks)) / 1.5
    y_hi = max(max(ys_all), max(analysis.ranks)) * 1.5
    ax.set_ylim(y_lo, y_hi)
    ax.set_xlim(min(xs_all) / 1.5, (10.0 if extrapolated else 1.0) * max(xs_all) * 1.5)
    ax.set_xlabel(X_LABELS[analysis.x])
    ax.set_ylabel(f"k_{CURVE_P:g}: directions holding {CURVE_P:.0%}\nof the update energy (log scale)")
    how = (f"power-law fit, {_confidence(analysis):.0%} bootstrap band, one decade extrapolated" if extrapolated
           else "no power-law fit (reasons in the legend)")
    ax.set_title(_wrap(f"Energy rank k_{CURVE_P:g} vs {_x_words(analysis.x)}: {how}{suffix}"))
    handles, labels = ax.get_legend_handles_labels()
    markers: list[Any] = [Line2D([], [], marker="s", linestyle="none", markerfacecolor="none", color="0.2",
                                label="rank reached (observed)"),
               Line2D([], [], marker="D", linestyle="none", color="0.6", markeredgecolor="black",
                                label="rank crossing predicted (interval)")]
    # Below the axes: with several kinds a legend inside would hide points and the rank lines.
    fig.legend(handles + markers, labels + [m.get_label() for m in markers], loc="outside lower center", ncols=2)
    if beyond:
        ax.text(0.01, 0.01, "some crossings lie beyond the plotted range: see the report's crossing table",
                transform=ax.transAxes, fontsize=9, color="0.3")
    return fig


def _residual(analysis: Analysis, suffix: str) -> Figure | None:
    series = _overall_series(analysis)
    if series is None:
        return None
    x, axis, residual = series
    fig = Figure(figsize=(WIDTH_IN, 5.0), layout="constrained")
    ax = fig.add_subplot()
    colors = palette(len(analysis.ranks), "viridis")
    for i, rank in enumerate(analysis.ranks):
        ax.plot(x, residual[:, i], "o-", color=colors[i], markersize=4, label=f"rank {rank}")
    if not np.isfinite(residual).any():
        ax.text(0.5, 0.5, "n/a: e_r is undefined at every snapshot, every update being zero or non-finite (see the "
                "notes)", transform=ax.transAxes, ha="center", va="center", fontsize=10, color="0.3")
    ax.set_xscale("log")
    plain_log_ticks(ax.xaxis)
    ax.set_ylim(0.0, 1.0)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel(X_LABELS[axis])
    ax.set_ylabel("e_r: energy a rank-r LoRA misses\n(% of the update's ||ΔW||²_F)")
    ax.set_title(_wrap(f"Rank-r residual over all recorded modules vs {_x_words(axis)}{suffix}"))
    ax.legend(title="candidate rank", loc="best")
    return fig


def _spectra(analysis: Analysis, suffix: str) -> Figure | None:
    snap = analysis.final_snapshot()
    run = analysis.final_run
    if snap is None or run.by_kind is None:
        return None
    kinds = _ordered_kinds(np.unique(snap["kind"].values.astype(str)))
    ranks = snap["rank"].values.astype(float)
    full_rank = np.minimum(snap["out_features"].values, snap["in_features"].values).astype(float)
    captured = 1.0 - snap["rank_residual"].values  # (module, rank)
    valid = snap["valid"].values
    by_kind = run.by_kind.isel(snapshot=-1)
    colors = _kind_colors(kinds)
    ncols = min(4, len(kinds))
    nrows = math.ceil(len(kinds) / ncols)
    fig = Figure(figsize=(WIDTH_IN, 1.2 + 3.0 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    kind_of = snap["kind"].values.astype(str)
    for ax, kind in zip(axes.flat, kinds):
        members = np.flatnonzero((kind_of == kind) & valid)
        excluded = int(((kind_of == kind) & ~valid).sum())
        if run.final_spectra is not None:  # the whole stored spectrum: exact cumulative curves
            segments = [_cumulative_spectrum(run.final_spectra.values[m], snap["energy"].values[m]) for m in members]
        else:
            segments = [_cumulative(ranks, captured[m], full_rank[m]) for m in members]
        segments = [s for s in segments if len(s) > 1]
        if segments:
            ax.add_collection(LineCollection(segments, colors=[colors[kind]], linewidths=0.8, alpha=0.35))
        top = float(full_rank[members].max()) if members.size else float(ranks.max())
        agg = 1.0 - by_kind["rank_residual"].sel(kind=kind).values
        line = _cumulative(ranks, agg, top) if np.isfinite(agg).any() else np.empty((0, 2))
        if not segments and not len(line):  # every update of the kind non-finite or zero: say so, draw nothing
            ax.text(0.5, 0.5, "n/a: no finite,\nnon-zero update", transform=ax.transAxes, ha="center",
                    va="center", fontsize=10, color="0.3")
        if len(line):
            ax.plot(line[:, 0], line[:, 1], "o-", color="black", linewidth=2, markersize=3,
                    label="kind (energy-weighted)")
        for rank in analysis.ranks:
            ax.axvline(rank, color="0.5", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xlim(1, max(2.0, top))
        ax.set_ylim(0.0, 1.02)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_title(f"{kind} ({members.size} module{'s' if members.size != 1 else ''}"
                     + (f" + {excluded} non-finite)" if excluded else ")"))
        ax.set_xlabel("rank r (log2)")
    for ax in axes[:, 0]:
        ax.set_ylabel("energy in top-r directions")
    for ax in list(axes.flat)[len(kinds):]:
        ax.set_visible(False)
    if axes.flat[0].get_legend_handles_labels()[0]:
        axes.flat[0].legend(loc="lower right")
    fig.suptitle(_wrap(f"Cumulative energy share of each module's update (thin lines) at the final snapshot, "
                       f"{_snapshot_words(snap, analysis.x)}; dotted: candidate ranks{suffix}"), fontsize=12)
    return fig


def _energy_share(analysis: Analysis, suffix: str) -> Figure | None:
    shares = analysis.final_energy_shares
    if shares is None or shares["layer_kind"].empty:
        return None
    table = shares["layer_kind"]
    table = table[_ordered_kinds(table.columns.astype(str))]
    when = _snapshot_words(analysis.final_snapshot(), analysis.x)
    return _heatmap(table, "module kind", f"Where the update's energy lives: layer x kind, {when}{suffix}",
                    cmap="rocket_r", annotate=len(table) <= 48, cell_gap=0.5)


def _experts(analysis: Analysis, suffix: str) -> Figure | None:
    shares = analysis.final_energy_shares
    if shares is None or shares["expert"].empty:
        return None
    table = shares["expert"].unstack("expert")
    when = _snapshot_words(analysis.final_snapshot(), analysis.x)
    return _heatmap(table, "expert index", f"Update energy per MoE expert (all its matrices), {when}{suffix}",
                    cmap="mako_r", annotate=table.size <= 400 and table.shape[1] <= 16, cell_gap=0.3)


def _heatmap(table: Any, columns: str, title: str, *, cmap: str, annotate: bool, cell_gap: float) -> Figure:
    """Shares of all update energy per layer (rows) and ``columns``, each cell annotated when ``annotate``."""
    import seaborn as sns

    table = table.copy()
    table.index = [layer(v) for v in table.index]
    fig = Figure(figsize=(WIDTH_IN, _heatmap_height(len(table))), layout="constrained")
    ax = fig.add_subplot()
    sns.heatmap(table, ax=ax, cmap=cmap, vmin=0.0, annot=annotate, fmt=".1%", annot_kws={"fontsize": 8},
                cbar_kws={"label": "share of all update energy", "format": PercentFormatter(1.0)},
                linewidths=cell_gap, linecolor="white")
    ax.set_xlabel(columns)
    ax.set_ylabel("layer (transformer block)")
    ax.grid(False)
    ax.set_title(_wrap(title))
    return fig


def _loss(analysis: Analysis, suffix: str) -> Figure:
    axis = analysis.x if all(_has_positive_x(run.steps, analysis.x) for run in analysis.runs) else "step"
    fig = Figure(figsize=(WIDTH_IN, 5.0), layout="constrained")
    ax = fig.add_subplot()
    colors = palette(len(analysis.runs), "tab10")
    drawn = 0
    names = _run_names(analysis.runs)
    for color, run in zip(colors, analysis.runs):
        steps = run.steps
        if "loss" not in steps or not steps.sizes.get("step", 0):
            continue
        x = steps[axis].values.astype(float)
        y = steps["loss"].values.astype(float)
        keep = np.isfinite(x) & np.isfinite(y) & (x > 0)
        if not keep.any():
            continue
        label = names[run.path] + ("" if run.complete else " (incomplete)")
        ax.plot(x[keep], y[keep], "-", color=color, linewidth=1.4, marker="." if keep.sum() < 50 else None,
                label=label)
        drawn += 1
        if run.divergence is not None:  # where the run turned non-finite: a dashed line, named in the legend
            at = x[steps["step"].values == run.divergence.step]
            if at.size and np.isfinite(at[0]) and at[0] > 0:
                ax.axvline(at[0], color=color, linestyle="--", linewidth=1.0,
                           label=f"{names[run.path]}: diverged at step {run.divergence.step}")
    if drawn:
        ax.set_xscale("log")
        plain_log_ticks(ax.xaxis)
        ax.legend(loc="best")
    else:
        _empty(ax, "no finite training loss was recorded")
    ax.set_xlabel(X_LABELS[axis])
    ax.set_ylabel("training loss (nats per token)")
    ax.set_title(f"Training loss vs {_x_words(axis)}{suffix}")
    return fig


def _noise_scale(analysis: Analysis, suffix: str) -> Figure | None:
    """B_simple (EMA ratio) over training per group, and the steps/examples tradeoff at the final estimate."""
    runs = [r for r in analysis.runs if r.noise is not None]
    if not runs:
        return None
    fig = Figure(figsize=(WIDTH_IN, 4.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    for run in runs:
        if run.noise is None:  # not reached: runs holds the runs with an estimate
            continue
        series = run.noise.series
        groups = [str(g) for g in series["group"].values]
        colors = _kind_colors([g for g in groups if g != "all"])
        x_name = "examples_seen" if (series["examples_seen"].values > 0).any() else "step"
        x = series[x_name].values.astype(float)
        for group in groups:
            y = series["b_simple"].sel(group=group).values
            keep = np.isfinite(y) & (y > 0) & (x > 0)
            if keep.any():
                left.plot(x[keep], y[keep], color="black" if group == "all" else colors[group],
                          linewidth=2.0 if group == "all" else 1.0, label=group)
        left.set_xlabel(X_LABELS.get(x_name, "optimizer steps"))
        advice = run.batch_advice
        if advice is not None:
            b = np.asarray(advice.candidates)
            right.plot(b, advice.steps_factor, label="steps S / S_min = 1 + B_noise / B")
            right.plot(b, advice.examples_factor, label="examples E / E_min = 1 + B / B_noise")
            right.axvline(advice.batch, color="0.3", linestyle="--", linewidth=1,
                          label=f"this run's batch ({advice.batch:g})")
            right.axvline(advice.b_noise, color="0.6", linestyle=":", linewidth=1,
                          label=f"B_noise ~ {advice.b_noise:.3g}")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_ylabel("EMA tr(Sigma) / EMA |G|^2 (examples)")
    left.set_title("Gradient noise scale over training")
    left.legend(loc="best", fontsize=8)
    if right.lines:
        right.set_xscale("log", base=2)
        right.set_yscale("log")
        right.set_xlabel("batch size B (examples, log2)")
        right.set_ylabel("multiple of the minimum")
        right.set_title("Steps / examples tradeoff (McCandlish et al. 2018)")
        right.legend(loc="upper center", fontsize=8)
    else:
        _empty(right, "no positive noise-scale estimate")
    fig.suptitle(_wrap(f"Gradient noise scale from two batch sizes{suffix}"), fontsize=12)
    return fig


# -- helpers ---------------------------------------------------------------------------------------------------


def _ordered_kinds(kinds: Sequence[str] | Any) -> list[str]:
    kinds = [str(k) for k in kinds]
    known = [k for k in KIND_ORDER if k in kinds]
    return known + sorted(k for k in kinds if k not in KIND_ORDER)


def _ordered(curves: dict[str, Any]) -> list[tuple[str, Any]]:
    """Kinds in the canonical order, "all" last so its line is drawn on top."""
    order = _ordered_kinds([g for g in curves if g != "all"]) + (["all"] if "all" in curves else [])
    return [(g, curves[g]) for g in order]


def _kind_colors(kinds: Any) -> dict[str, Any]:
    import seaborn as sns

    base = sns.color_palette("colorblind", len(KIND_ORDER) + 4)
    colors: dict[str, Any] = {k: base[i] for i, k in enumerate(KIND_ORDER)}
    extra = iter(base[len(KIND_ORDER):])
    for kind in kinds:
        if kind == "all":
            colors["all"] = (0.0, 0.0, 0.0)
        elif kind not in colors:
            colors[kind] = next(extra, (0.5, 0.5, 0.5))
    return colors


def _positive(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points a log-log axis can show (unknown counts are -1 in a run file; NaN where a value is missing)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    return x[keep], y[keep]


def _cumulative(ranks: np.ndarray, share: np.ndarray, full_rank: float) -> np.ndarray:
    """(rank, captured share) points up to the matrix's full rank, where the share is 1 by definition."""
    keep = (ranks < full_rank) & np.isfinite(share)
    points = np.column_stack([ranks[keep], share[keep]])
    if np.isfinite(full_rank) and full_rank >= 1:
        points = np.vstack([points, [full_rank, 1.0]])
    return points


def _cumulative_spectrum(sv: np.ndarray, energy: float) -> np.ndarray:
    """(k, share of the exact energy in the top k directions) for every stored singular value."""
    s = sv[np.isfinite(sv)].astype(float)
    if not s.size or not energy > 0:
        return np.empty((0, 2))
    return np.column_stack([np.arange(1, s.size + 1), np.cumsum(s**2) / energy])


def _overall_series(analysis: Analysis) -> tuple[np.ndarray, str, np.ndarray] | None:
    """Residuals e_r of all modules at the candidate ranks against data, the way the rank curves pick points:
    every snapshot of a single run, or the final snapshot of each run when several have snapshots."""
    runs: list[RunResult] = [r for r in analysis.runs if r.n_snapshots and r.overall is not None]
    if not runs:
        return None
    overall = [r.overall for r in runs if r.overall is not None]  # every run here (checked above)
    picks = [o.isel(snapshot=[-1]) for o in overall] if len(overall) > 1 else overall
    axis = analysis.x if all((p[analysis.x].values > 0).all() for p in picks) else "step"
    x = np.concatenate([p[axis].values for p in picks]).astype(float)
    residual = np.concatenate([p["rank_residual"].sel(all="all", rank=list(analysis.ranks)).values
                               for p in picks]).astype(float)
    order = np.argsort(x, kind="stable")
    return x[order], axis, residual[order]


def _has_positive_x(steps: Any, axis: str) -> bool:
    return axis in steps.coords and steps.sizes.get("step", 0) > 0 and bool((steps[axis].values > 0).all())


def _heatmap_height(rows: int) -> float:
    """Inches: about 0.3 in per row (readable annotations), within [3, 40]."""
    return min(40.0, max(3.0, 1.8 + 0.3 * rows))


def _x_words(axis: str) -> str:
    return {"examples_seen": "examples seen", "tokens_seen": "tokens seen", "step": "optimizer steps"}[axis]


def _snapshot_words(snap: Any, axis: str) -> str:
    count = int(snap[axis].values) if axis in snap.coords else -1
    words = f"step {int(snap['step'].values)}"
    return words + (f", {count:,} {_x_words(axis)}" if count >= 0 else "")


def _run_names(runs: Sequence[RunResult]) -> dict[str, str]:
    """File names, or full paths where two runs share a file name."""
    short = [Path(r.path).name for r in runs]
    return {r.path: (s if short.count(s) == 1 else r.path) for r, s in zip(runs, short)}


def _wrap(title: str, width: int = 95) -> str:
    return "\n".join(textwrap.wrap(title, width))


def _confidence(analysis: Analysis) -> float:
    return next((c.fit.confidence for c in analysis.curves.values()), 0.9)


def _empty(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.3")


_DRAWERS = {"energy_rank": _energy_rank, "residual": _residual, "spectra": _spectra, "energy_share": _energy_share,
            "experts": _experts, "subspace": subspace_figure, "noise_scale": _noise_scale, "loss": _loss}
_NEEDS = {"energy_rank": "it needs at least one snapshot", "residual": "it needs at least one snapshot",
          "spectra": "it needs at least one snapshot", "energy_share": "it needs at least one snapshot",
          "experts": "it needs MoE experts among the recorded modules",
          "subspace": "it needs singular vectors (record with factors_k=8) or intruder cosines (intruder_k=10)",
          "noise_scale": "it needs a noise-scale estimate (two batch sizes per step)", "loss": ""}
