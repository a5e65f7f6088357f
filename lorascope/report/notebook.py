"""Jupyter display of lorascope's values: the HTML their ``_repr_html_`` returns, and the figure accessors.

Each renderer takes the summary dictionary the other outputs render (``Analysis.summary``, ``Comparison.summary``,
``Recommendation.to_dict()``, :func:`lorascope.store.info.run_summary`), so a notebook, the terminal, the JSON and
the report page never disagree; the Analysis card reuses the report page's sections, the others put the terminal
text under a short table of the key facts. Every string from a value is HTML-escaped; no ``<style>`` or script is
emitted (a notebook's own table style applies). :func:`register_renderers` hands these to :mod:`lorascope._display`,
through which the values reach them without importing this layer (``lorascope/__init__.py`` calls it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lorascope import _display
from lorascope.report.format import X_UNITS, byte_size, count, escape, number
from lorascope.report.html import report_title, summary_sections

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lorascope.analysis.comparison import Comparison

__all__ = ["ComparisonFigures", "analysis_html", "comparison_html", "recommendation_html", "register_renderers",
           "run_html"]

_BOX = '<div class="lorascope" style="max-width:1080px">'


def run_html(summary: Mapping[str, Any]) -> str:
    """A run file at a glance: status, writer, size, modules by kind, steps, snapshots and coverage."""
    status = summary["status"] if summary["complete"] else f"{summary['status']} (incomplete)"
    steps, snaps, cov = summary["steps"], summary["snapshots"], summary["coverage"]
    kinds = ", ".join(f"{kind} {n}" for kind, n in summary["modules_by_kind"].items()) or "none"
    shown = ", ".join(str(s) for s in snaps["steps"][:12]) + (", ..." if snaps["count"] > 12 else "")
    rows = [("status", status), ("written by", f"lorascope {summary['lorascope_version']}, torch "
                                               f"{summary['torch_version']}, {summary['framework']}"),
            ("size", byte_size(summary["file_size_bytes"])),
            ("modules", f"{summary['n_modules']} matrices: {kinds}"),
            ("parameters", f"{cov['recorded']} recorded, {cov['not_recorded']} not recorded (see run.coverage)"),
            ("steps", count(steps["count"]) + (f" (steps {steps['first']}..{steps['last']})" if steps["count"]
                                                else "")),
            ("snapshots", count(snaps["count"]) + (f" at steps {shown}" if snaps["count"] else ""))]
    return _card(f"lorascope run: {summary['path']}", _pairs(rows))


def analysis_html(summary: Mapping[str, Any]) -> str:
    """The report page's forecast, contributions, headline, notes and runs, without its figures (``.plot``)."""
    unit = X_UNITS.get(summary["x"], summary["x"])
    parts = [f"<p>{len(summary['runs'])} run(s); candidate ranks {escape(', '.join(map(str, summary['ranks'])))}; "
             f"data axis: {escape(unit)} seen. Figures: <code>analysis.plot.energy_rank()</code>, "
             "<code>.spectra()</code>, ...; the full page: "
             "<code>lorascope.report.folder.write_report(analysis, folder)</code>.</p>"]
    if summary["incomplete"]:
        parts.append("<p><strong>Incomplete run(s):</strong> the results cover what was written so far.</p>")
    parts += summary_sections(summary)
    body = "\n".join(parts).replace("<h2", "<h4").replace("</h2>", "</h4>")  # the page's sections, under the card
    return _card(report_title(summary["runs"]).replace("report", "analysis", 1), body)


def comparison_html(summary: Mapping[str, Any]) -> str:
    """Per LoRA run its rank and falloff against full fine-tuning, then the terminal text (criterion, predictions,
    notes)."""
    from lorascope.report.compare import format_comparison

    words = X_UNITS[summary["x"]]
    rows = [(f"LoRA {lora['label']}", _falloff_words(lora, words)) for lora in summary["loras"]]
    rows.insert(0, ("full fine-tuning", f"{summary['full']['path']}, final loss "
                                        f"{number(summary['full']['final_loss'], 4)}"))
    return _card("lorascope comparison: LoRA against full fine-tuning",
                 _pairs(rows) + _details(format_comparison(dict(summary))))


def _falloff_words(lora: Mapping[str, Any], words: str) -> str:
    status = lora["falloff"]["status"]
    if status in ("falloff", "tentative"):
        return f"falloff at {count(lora['falloff']['x'])} {words} ({status})"
    if status == "diverged":
        return "diverged: its own loss rose (no falloff read from it)"
    return f"no falloff up to {count(lora['compared']['x_max'])} {words} ({status})"


def recommendation_html(summary: Mapping[str, Any]) -> str:
    """The recommended rank, its LoRA parameters and advice, then the terminal text (the table per rank, probes,
    notes)."""
    from lorascope.report.recommend import format_recommendation

    by_kind = ", ".join(f"{k} {r}" for k, r in summary["ranks_by_kind"].items())
    rows = [("recommended rank", f"{summary['rank']} ({by_kind}) on {summary['target']}, lora_alpha "
                                 f"{summary['lora_alpha']}"),
            ("LoRA parameters", count(summary["lora_parameters"])),
            ("bits to learn", f"{count(summary['bits_to_learn'])} for {count(summary['examples'])} examples"),
            ("learning rate", f"{summary['lr_multiplier']:g}x your full fine-tuning LR"),
            ("PEFT config", "recommendation.to_peft_config()")]
    return _card("lorascope recommendation", _pairs(rows) + _details(format_recommendation(dict(summary))))


class ComparisonFigures:
    """The figure of a :class:`~lorascope.analysis.comparison.Comparison` (``compare.png``) as a matplotlib
    figure: ``comparison.plot.loss()``."""

    def __init__(self, comparison: Comparison) -> None:
        self._comparison = comparison

    def __repr__(self) -> str:
        return "<figures of a Comparison: loss()>"

    def loss(self) -> Figure:
        """The loss of every run against data (log scale), falloffs marked, and the smoothed gaps beneath."""
        from lorascope.report.compare import loss_figure
        from lorascope.report.style import figure_style

        with figure_style():
            return loss_figure(self._comparison)


def register_renderers() -> None:
    """Hand these renderers to :mod:`lorascope._display` (called once, by ``lorascope/__init__.py``)."""
    _display.register("run", html=run_html)
    _display.register("analysis", html=analysis_html, figures=_analysis_figures)
    _display.register("comparison", html=comparison_html, figures=ComparisonFigures)
    _display.register("recommendation", html=recommendation_html)


def _analysis_figures(analysis: Any) -> Any:
    from lorascope.report.plots import AnalysisFigures  # matplotlib: loaded when a figure is asked for

    return AnalysisFigures(analysis)


# -- pieces ----------------------------------------------------------------------------------------------------


def _card(title: str, body: str) -> str:
    return f"{_BOX}<h3>{escape(title)}</h3>\n{body}\n</div>"


def _pairs(rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f'<tr><th style="text-align:left">{escape(k)}</th><td style="text-align:left">{escape(v)}</td></tr>'
                   for k, v in rows)
    return f"<table>{body}</table>"


def _details(text: str) -> str:
    return f"<details><summary>details</summary><pre>{escape(text)}</pre></details>"

