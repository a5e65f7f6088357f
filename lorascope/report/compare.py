"""Rendering of a :class:`~lorascope.workflows.compare.Comparison`: a terminal table, the loss-vs-data figure in the
style of LoRA Without Regret (log data axis, full fine-tuning dark, LoRA ranks on a sequential palette, falloffs
marked) with the smoothed gap beneath it, and the output folder (``compare.json``, ``compare.png``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lorascope.report.folder import prepare_folder
from lorascope.report.format import MISSING, X_UNITS, count, json_text, number, significant, table
from lorascope.report.style import DPI, WIDTH_IN, X_LABELS, figure_style, palette, plain_log_ticks

if TYPE_CHECKING:
    from lorascope.workflows.compare import Comparison, LoraResult

__all__ = ["CompareFiles", "format_comparison", "plot_comparison", "subspace_lines", "write_comparison"]

JSON_NAME = "compare.json"
PLOT_NAME = "compare.png"
FULL_COLOR = (0.1, 0.1, 0.1)


@dataclass(frozen=True)
class CompareFiles:
    """Paths of what :func:`write_comparison` wrote."""

    folder: Path
    json: Path
    plot: Path


def write_comparison(comparison: Comparison, folder: str | os.PathLike[str], *, force: bool = False
                     ) -> CompareFiles:
    """Write ``compare.json`` (strict JSON) and ``compare.png`` into ``folder``.

    An existing non-empty folder is refused unless ``force``, which replaces these two files and touches nothing
    else in it (as for the analysis report folder).
    """
    folder = prepare_folder(folder, force=force)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / JSON_NAME
    json_path.write_text(json_text(comparison.summary))
    plot_path = plot_comparison(comparison, folder / PLOT_NAME)
    return CompareFiles(folder, json_path, plot_path)


def plot_comparison(comparison: Comparison, path: str | os.PathLike[str]) -> Path:
    """Draw the loss of every run against the data axis (log scale) and the smoothed gaps; save as PNG.

    Top: the training loss of full fine-tuning (dark) and of each LoRA run (a sequential palette ordered by rank),
    raw steps faint and the moving median bold; a filled circle where a run falls off the full fine-tuning curve
    (hollow when tentative); a triangle on the axis at a predicted falloff. Bottom: the smoothed gap
    :math:`\\hat d` of each LoRA run with its :math:`\\pm z\\,\\mathrm{SE}` band, and the threshold.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with figure_style():
        fig = loss_figure(comparison)
        fig.savefig(path, format="png", dpi=DPI)
        fig.clear()
    return path


def loss_figure(comparison: Comparison) -> Figure:
    """The comparison's figure: each run's loss curve, and each LoRA's gap to full fine-tuning below it."""
    fig = Figure(figsize=(WIDTH_IN, 8.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3.0, 1.4]})
    colors = _rank_colors(comparison.loras)
    full = comparison.full
    top.plot(full.x, full.loss, color=FULL_COLOR, alpha=0.15, linewidth=0.8)
    top.plot(full.curve_x, full.curve_loss, color=FULL_COLOR, linewidth=2.4, label="full fine-tuning", zorder=4)
    words = X_UNITS[comparison.x]
    crit = comparison.criterion
    for lora in comparison.loras:
        color = colors[id(lora)]
        run = lora.run
        top.plot(run.x, run.loss, color=color, alpha=0.15, linewidth=0.8)
        top.plot(run.curve_x, run.curve_loss, color=color, linewidth=1.8, label=_legend(lora, words), zorder=3)
        bottom.fill_between(lora.grid_x, lora.gap - crit.z * lora.gap_se, lora.gap + crit.z * lora.gap_se,
                            color=color, alpha=0.15, linewidth=0)
        bottom.plot(lora.grid_x, lora.gap, color=color, linewidth=1.6)
        if lora.falloff_x is not None:
            at = lora.falloff_x
            y = float(np.interp(np.log(at), np.log(run.curve_x), run.curve_loss))
            tentative = lora.status == "tentative"
            for ax, value in ((top, y), (bottom, lora.falloff_gap)):
                if value is not None:
                    ax.plot([at], [value], "o", markersize=9, markeredgecolor="black", markeredgewidth=1.2,
                            color="white" if tentative else color, zorder=6)
    predicted = False
    for row in comparison.predictions:
        match = next((lo for lo in comparison.loras if lo.run.label == row.label), None)
        if match is None or not np.isfinite(row.predicted):  # none expected within the run: nothing to mark
            continue
        top.plot([row.predicted], [0.0], "v", color=colors[id(match)], markersize=10, markeredgecolor="black",
                 transform=top.get_xaxis_transform(), clip_on=False, zorder=7)
        predicted = True
    bottom.axhline(crit.threshold, color="0.35", linestyle="--", linewidth=1.0)
    bottom.axhline(0.0, color="0.6", linewidth=0.8)
    top.set_xscale("log")
    plain_log_ticks(bottom.xaxis)
    handles, labels = top.get_legend_handles_labels()
    handles.append(Line2D([], [], marker="o", linestyle="", color="0.5", markeredgecolor="black"))
    labels.append("falls off the full fine-tuning curve (hollow: tentative)")
    if predicted:
        handles.append(Line2D([], [], marker="v", linestyle="", color="0.5", markeredgecolor="black"))
        labels.append("predicted falloff")
    top.legend(handles, labels, loc="best")
    top.set_ylabel("training loss (nats per token)")
    units = "share of full FT loss" if crit.relative else "nats per token"
    bottom.set_ylabel(f"gap to full FT\n({units})")
    bottom.set_xlabel(X_LABELS[comparison.x])
    suffix = " (incomplete)" if comparison.incomplete else ""
    top.set_title(f"Training loss vs {words} seen: LoRA ranks against full fine-tuning{suffix}")
    bottom.set_title(f"Smoothed gap (moving median over ±{crit.smooth:g} decades, band ±{crit.z:g} SE); falloff: "
                     f"above {crit.threshold:g} for {crit.window:g} decades", fontsize=10)
    return fig


def _rank_colors(loras: list[LoraResult]) -> dict[int, Any]:
    """A sequential palette ordered by rank (unknown ranks last), so rank order reads as colour order."""
    ordered = sorted(loras, key=lambda lo: (lo.rank is None, lo.rank or 0, lo.run.label))
    return {id(lo): color for lo, color in zip(ordered, palette(len(ordered), "flare"))}


def _legend(lora: LoraResult, words: str) -> str:
    if lora.status == "falloff":
        return f"LoRA {lora.run.label}: falls off at {count(lora.falloff_x)} {words}"
    if lora.status == "tentative":
        return f"LoRA {lora.run.label}: tentative falloff at {count(lora.falloff_x)} {words}"
    if lora.status == "lag":
        return f"LoRA {lora.run.label}: slower from the start, closing the gap (no capacity falloff)"
    if lora.status == "diverged":
        return f"LoRA {lora.run.label}: its loss rose, diverged (no capacity falloff)"
    return f"LoRA {lora.run.label}: no falloff within the data"


def format_comparison(summary: dict[str, Any]) -> str:
    """Render :meth:`lorascope.workflows.compare.Comparison.to_dict` output as plain text."""
    words = X_UNITS[summary["x"]]
    crit = summary["criterion"]
    full = summary["full"]
    lines = [_run_line("full fine-tuning", full)]
    lines.extend(_run_line(f"LoRA {lora['label']}", lora) for lora in summary["loras"])
    if summary["incomplete"]:
        lines.append("WARNING: at least one run is incomplete; results cover what was written so far.")
    gap = "relative gap (LoRA - full) / full" if crit["gap"] == "relative" else "gap LoRA - full"
    lines.append("")
    lines.append(f"Falloff: the {gap}, moving median over ±{crit['smooth_decades']:g} decades, above "
                 f"{crit['threshold']:g} {crit['units']} by {crit['z']:g} standard errors while the {words} grow "
                 f"{number(10 ** crit['window_decades'], 2)}x ({crit['window_decades']:g} decades).")
    header = ["run", "rank", "alpha", "scaling", f"falloff ({words})", "step", "gap there", "final gap", "verdict"]
    rows = []
    for lora in summary["loras"]:
        falloff = lora["falloff"]
        verdict = {"falloff": "falls off", "tentative": "tentative (data end)",
                   "lag": "lag, closing (no falloff)",
                   "diverged": "diverged: its loss rose (no falloff)",
                   "none": f"none up to {count(lora['compared']['x_max'])} {words}"}[falloff["status"]]
        rank = MISSING if lora["rank"] is None else str(lora["rank"])
        rows.append([lora["label"], rank, significant(lora["lora_alpha"]), significant(lora["scaling"]),
                     count(falloff["x"]), count(falloff["step"]), number(falloff["gap"], 3),
                     number(lora["final_gap"], 3), verdict])
    lines.extend("  " + s for s in table(header, rows))
    if summary["predictions"]:
        lines.append("")
        lines.append(f"Predicted vs measured falloff ({words}; ratio = predicted / measured):")
        header = ["rank", "run", "predicted", "measured", "ratio", "note"]
        rows = []
        for row in summary["predictions"]:
            if row["status"] == "no_run":
                note = "no LoRA run of this rank"
            elif row["status"] == "diverged":
                note = "the run diverged: it measures nothing"
            elif row["status"] == "none":
                note = (f"no falloff up to {count(row['measured_lower_bound'])}: prediction "
                        + ("consistent" if row["consistent"] else "too early"))
            else:
                note = "tentative" if row["status"] == "tentative" else ""
            # null: the run never absorbed the rank's capacity, so no falloff is expected within it
            predicted = "none in run" if row["predicted"] is None else count(row["predicted"])
            rows.append([str(row["rank"]), row["run"] or MISSING, predicted, count(row["measured"]),
                         number(row["ratio"], 2), note])
        lines.extend("  " + s for s in table(header, rows))
    lines += subspace_lines(summary.get("subspace"))
    if summary["notes"]:
        lines.append("")
        lines.append("Notes:")
        lines.extend(f"  - {note}" for note in summary["notes"])
    return "\n".join(lines)


def subspace_lines(subspace: dict[str, Any] | None) -> list[str]:
    """compare's subspace section: each run's intruder dimensions beside its rank and dataset size, and each LoRA's
    overlap with full fine-tuning's update subspace; one line when neither was recorded."""
    if subspace is None:
        return []
    runs = subspace["runs"]
    if all(r["intruders"] is None and r["overlap_with_full"] is None for r in runs):
        return ["", f"Intruder dimensions and subspace overlap {subspace['missing']}"]
    lines = ["", f"Intruder dimensions at the final snapshot (eps {subspace['eps']:g}; per kind) and the overlap of "
             f"each LoRA's final update subspace with full fine-tuning's top {subspace['rank']} (median phi over "
             "matched modules, left/right; 1 = inside it):"]
    header = ["run", "rank", "dataset", "intruders", "per module", "by kind", "near chance", "phi (all)",
              "phi by kind"]
    rows = []
    for run in runs:
        counts, modules, overlap = run["intruders"], run["modules"], run["overlap_with_full"]
        per = None if not counts or not modules or not modules["all"] else counts["all"] / modules["all"]
        kinds = ", ".join(f"{k} {v}" for k, v in (counts or {}).items() if k != "all") or MISSING
        whole = overlap.get("all") if overlap else None
        phi = MISSING if whole is None else f"{number(whole['phi']['left'], 2)}/{number(whole['phi']['right'], 2)}"
        by_kind = ", ".join(f"{k} {number(v['phi']['left'], 2)}/{number(v['phi']['right'], 2)}"
                            for k, v in (overlap or {}).items() if k != "all") or MISSING
        rows.append([run["label"], MISSING if run["rank"] is None else str(run["rank"]), count(run["dataset_examples"]),
                     MISSING if counts is None else count(counts["all"]), number(per, 2), kinds,
                     str(run["near_chance_modules"]), phi, by_kind])
    lines.extend("  " + s for s in table(header, rows))
    if any(r["near_chance_modules"] for r in runs):
        lines.append("  near chance: matrices so narrow that eps is below twice what a random direction scores; "
                     "their counts swing with eps (docs/subspace.md).")
    if subspace["missing"]:
        lines.append(f"  {subspace['missing']}")
    return lines


def _run_line(name: str, run: dict[str, Any]) -> str:
    state = "complete" if run["complete"] else f"INCOMPLETE ({run['status']})"
    return (f"{name}: {run['path']} ({state}), {count(run['steps'])} steps, {count(run['examples_seen'])} examples, "
            f"final loss {number(run['final_loss'], 4)}")
