"""One self-contained HTML page of an :class:`~lorascope.workflows.analyze.Analysis`.

The page renders :attr:`Analysis.summary`, the dictionary ``summary.json`` holds, with the numbers written as
:mod:`lorascope.report.format` writes them everywhere, so the page, the terminal and the JSON never disagree.
Figures are embedded as base64 ``data:`` URIs and the CSS is inline: the page loads nothing else
(no scripts, fonts or remote images), so it can be mailed, archived or opened offline. Every string taken from the
analysis (paths, module names, notes, reasons) is HTML-escaped.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lorascope._version import __version__
from lorascope.report.contributions import contributions_facts, contributions_header, contributions_rows
from lorascope.report.curves import CURVES_CAVEAT, crossings_sentence
from lorascope.report.forecast import forecast_facts, forecast_header, forecast_rows
from lorascope.report.format import MISSING, X_UNITS, count, escape, layer, number, percent
from lorascope.report.subspace import (
    intruder_facts,
    intruder_header,
    intruder_rows,
    settle_facts,
    settle_header,
    settle_rows,
    subspace_title,
)
from lorascope.workflows.analyze import CURVE_P

__all__ = ["render_html", "headline_sentence"]

CAPTIONS = {
    "energy_rank": "Energy rank k_0.9 against data, with the power-law fit, its bootstrap band and the candidate "
                   "ranks; markers show where the curve reaches each rank.",
    "residual": "Rank-r residual e_r over all recorded modules: the share of the update's energy a rank-r LoRA "
                "on every module misses.",
    "spectra": "Cumulative energy share of each module's update at the final snapshot, per kind.",
    "energy_share": "Share of the update's energy per layer and kind at the final snapshot.",
    "experts": "Share of the update's energy per MoE expert and layer at the final snapshot.",
    "noise_scale": "Gradient noise scale B_simple over training (left) and the steps / examples tradeoff at the "
                   "final estimate with this run's batch size (right).",
    "loss": "Training loss of every run.",
    "subspace": "Left: median subspace similarity phi of each kind's top-r update subspace to the final one, "
                "against data (dashed: the settling threshold). Right: intruder dimensions per kind against data.",
}
_MIME = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0 auto;
max-width:1080px;padding:1.5rem;color:#1d1d1f;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ddd;
padding-bottom:.2rem}.sub{color:#555;margin-top:0}
.banner{background:#fff4e5;border:1px solid #f0a030;border-radius:6px;padding:.7rem 1rem;margin:1rem 0}
.headline{font-size:1.08rem;background:#f3f7fc;border-left:4px solid #2f6db5;padding:.6rem 1rem}
.headline li{margin:.25rem 0}
table{border-collapse:collapse;margin:.6rem 0 1rem;font-size:.9rem}
th,td{border:1px solid #ddd;padding:.25rem .55rem;text-align:right;vertical-align:top}
th{background:#f5f5f7}td.l,th.l{text-align:left}code{font-size:.88em}
figure{margin:1.2rem 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.9rem}footer{color:#888;font-size:.8rem;margin-top:2rem}
""".strip()


def render_html(summary: Mapping[str, Any], images: Mapping[str, str | os.PathLike[str]] | None = None) -> str:
    """Render the report page.

    Parameters
    ----------
    summary
        :attr:`Analysis.summary <lorascope.workflows.analyze.Analysis.summary>` of the result of
        :func:`lorascope.workflows.analyze.analyze`.
    images
        Figure name to PNG file, as returned by :func:`lorascope.report.plots.make_plots`; each is embedded, in
        the given order, as a base64 data URI.

    Returns
    -------
    str
        A complete HTML5 document that references no external resource.
    """
    unit = X_UNITS.get(summary["x"], summary["x"])
    runs = summary["runs"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(report_title(runs))}</title>",
        f"<style>{_CSS}</style>",
        "</head><body>",
        f"<h1>{_e(report_title(runs))}</h1>",
        f'<p class="sub">{len(runs)} run(s); candidate ranks {_e(", ".join(str(r) for r in summary["ranks"]))}; '
        f"data axis: {_e(unit)} seen</p>",
    ]
    if summary["incomplete"]:
        bad = [r["path"] for r in runs if not r["complete"]]
        parts.append(f'<div class="banner" role="alert"><strong>Incomplete run{"s" if len(bad) > 1 else ""}:</strong> '
                     f"{_e(', '.join(bad))}. The results cover what was written so far.</div>")
    for run in runs:
        if run.get("divergence"):
            div = run["divergence"]
            parts.append(f'<div class="banner" role="alert"><strong>Diverged run:</strong> {_e(run["path"])} turned '
                         f"non-finite at step {_e(count(div['step']))}; see the notes for where.</div>")
    parts += summary_sections(summary)
    final = summary["final"]
    if final is not None:
        parts += _final_sections(final, summary, unit)
    parts += _curve_sections(summary, unit)
    parts += _noise_sections(summary)
    if images:
        parts.append("<h2>Figures</h2>")
        parts += [_figure(name, Path(path)) for name, path in images.items()]
    parts += [f"<footer>lorascope {_e(__version__)}: summary format {_e(summary['format'])} "
              f"v{_e(summary['version'])}</footer>", "</body></html>"]
    return "\n".join(parts) + "\n"


def headline_sentence(row: Mapping[str, Any]) -> str:
    """The report's headline for one candidate rank, from a row of ``Analysis.summary["headline"]``.

    Examples
    --------
    >>> headline_sentence({"rank": 16, "captured_energy_share": 0.8388, "signal_rank": 2.54})
    "A rank-16 LoRA on all linear layers captures 83.9% of this update's energy; its signal rank is 2.5."
    """
    return (f"A rank-{int(row['rank'])} LoRA on all linear layers captures {percent(row['captured_energy_share'])} of "
            f"this update's energy; its signal rank is {number(row['signal_rank'])}.")


# -- sections --------------------------------------------------------------------------------------------------


def summary_sections(summary: Mapping[str, Any]) -> list[str]:
    """The sections the report page and the notebook card share: forecast, contributions, headline, notes, runs."""
    parts = [*_forecast_section(summary.get("forecast")), *_contributions_section(summary.get("contributions")),
             *_subspace_section(summary.get("subspace")), *_headline(summary)]
    if summary["notes"]:
        parts += ["<h2>Notes</h2>", _list(summary["notes"])]
    return [*parts, "<h2>Runs</h2>", _runs_table(summary["runs"])]


def _contributions_section(contributions: Mapping[str, Any] | None) -> list[str]:
    if contributions is None:
        return []
    out = ['<h2 id="contributions">Contributions: which part runs out first</h2>',
           _list(contributions_facts(contributions))]
    rows = contributions_rows(contributions)
    if rows:
        out.append(_table(contributions_header(contributions), rows))
    if contributions.get("notes"):
        out.append(_list(contributions["notes"]))
    return out


def _subspace_section(subspace: Mapping[str, Any] | None) -> list[str]:
    if subspace is None:
        return []
    if subspace["dynamics"] is None and subspace["intruders"] is None:  # one line: what to record with
        return [f'<p id="subspace">Subspaces and intruder dimensions {_e(subspace["missing"])}</p>']
    out = [f'<h2 id="subspace">{_e(subspace_title())}</h2>', _list(settle_facts(subspace))]
    rows = settle_rows(subspace)
    if rows:
        out.append(_table(settle_header(subspace), rows))
    facts = intruder_facts(subspace)
    if facts:
        out += [_list(facts), _table(intruder_header(subspace), intruder_rows(subspace))]
    return out


def _forecast_section(forecast: Mapping[str, Any] | None) -> list[str]:
    if forecast is None:
        return []
    out = ['<h2 id="forecast">Forecast: where each LoRA runs out</h2>', _list(forecast_facts(forecast))]
    rows = forecast_rows(forecast)
    if rows:
        out.append(_table(forecast_header(forecast), rows, left=(0, 6)))
    if forecast.get("notes"):
        out.append(_list(forecast["notes"]))
    return out


def _headline(summary: Mapping[str, Any]) -> list[str]:
    rows = summary["headline"]
    if not rows:
        return ['<p class="headline">No snapshots: no spectral results, only the loss curve.</p>']
    items = [_e(headline_sentence(row)) for row in rows]
    k = rows[0].get("energy_rank_0.9")
    tail = (f"<p>Over all modules, 90% of the update's energy lies in k_0.9 = {_e(number(k))} directions "
            "(energy-weighted mean over modules).</p>" if k is not None else "")
    return ["<h2>Headline</h2>", '<ul class="headline">' + "".join(f"<li>{i}</li>" for i in items) + "</ul>", tail]


def _runs_table(runs: Sequence[Mapping[str, Any]]) -> str:
    header = ["run", "status", "framework", "steps", "snapshots", "examples seen", "tokens seen", "final loss",
              "steps with non-finite gradients"]
    rows = [[r["path"], r["status"] + ("" if r["complete"] else " (incomplete)"), r["framework"], r["steps"],
             r["snapshots"], count(r["examples_seen"]), count(r["tokens_seen"]), number(r["final_loss"], 4),
             r["nonfinite_gradient_steps"]] for r in runs]
    return _table(header, rows, left=(0, 1, 2))


def _final_sections(final: Mapping[str, Any], summary: Mapping[str, Any], unit: str) -> list[str]:
    ranks = [str(r) for r in summary["ranks"]]
    ps = [str(p) for p in summary["p"]]
    where = (f"Final snapshot of {final['run']}: step {count(final['step'])}, {count(final['examples_seen'])} "
             f"examples, {count(final['tokens_seen'])} tokens.")
    header = (["kind", "modules", "energy share"] + [f"k_{p}" for p in ps] + ["effective rank", "signal rank"]
              + [f"e_{r}" for r in ranks])
    groups = list(final["by_kind"].items()) + [("all", final["overall"])]
    rows = [[name, g["modules"], percent(g["energy_share"])] + [number(g["energy_rank"].get(p)) for p in ps]
            + [number(g["effective_rank"]), number(g["signal_rank"])]
            + [percent(g["rank_residual"].get(r)) for r in ranks]
            for name, g in groups]
    out = ["<h2>Per kind</h2>", f"<p>{_e(where)} k_p: directions holding a share p of the update energy "
           "(energy-weighted over modules); e_r: share of the energy a rank-r approximation misses.</p>",
           *([f"<p>{MISSING}: {_e(final['missing'])}.</p>"] if final.get("missing") else []),
           _table(header, rows)]
    capture = final["lora_capture"]
    out += ["<h2>LoRA target capture</h2>",
            "<p>Share of the whole update's energy a rank-r LoRA on each target set could hold at best "
            "(Eckart-Young per module).</p>",
            _table(["target modules"] + [f"rank {r}" for r in ranks],
                   [[target] + [percent(row.get(r)) for r in ranks] for target, row in capture.items()])]
    hungry = final["rank_hungry_modules"]
    if hungry:
        p = "0.9" if "0.9" in ps else ps[-1]
        largest = max((int(r) for r in capture.get("all-linear", {})), default=None)  # rank_hungry_modules' default
        residual = f"e_r at r = {largest}" if largest is not None else "e_r at the largest analysed rank"
        out += ["<h2>Rank-hungry modules</h2>",
                f"<p>The modules whose update needs the most rank: sorted by k_{_e(p)} / min(out, in).</p>",
                _table(["module", "kind", "layer", f"k_{p}", f"k_{p} / min(out, in)", residual, "signal rank"],
                       [[h["module"], h["kind"], layer(h["layer"]), count(h["energy_rank"]),
                         percent(h["energy_rank_fraction"]), percent(h["residual_at_rank"]), number(h["signal_rank"])]
                        for h in hungry], left=(0, 1))]
    layers = final["energy_share_by_layer"]
    if layers:
        out += ["<h2>Energy share per layer</h2>",
                _table(["layer", "energy share"], [[layer(k), percent(v)] for k, v in layers.items()])]
    excluded = final["excluded_nonfinite_modules"]
    if excluded:
        out += ["<h2>Excluded updates</h2>", "<p>Modules whose update held NaN or Inf at the final snapshot, left "
                "out of every aggregate and fit:</p>", _list(excluded)]
    return out


def _curve_sections(summary: Mapping[str, Any], unit: str) -> list[str]:
    curves = summary["curves"]
    if not curves:
        return []
    header = ["group", "fit", "points", "exponent", "exponent interval", "reason"]
    rows = []
    sentences = []
    for group, curve in curves.items():
        fit = curve["fit"]
        low, high = fit["exponent_interval"]
        rows.append([group, fit["status"], fit["points"], number(fit["exponent"], 3),
                     f"{number(low, 3)} .. {number(high, 3)}", fit["reason"]])
        if curve["crossings"]:
            sentences.append(crossings_sentence(group, curve, unit, CURVE_P))
    return ["<h2>Rank curves and crossings</h2>",
            f"<p>Power law k_{CURVE_P:g} = a x^b fitted against {_e(unit)} seen, with bootstrap intervals; a fit "
            f"is refused (status and reason below) when it would be meaningless. This is {_e(CURVES_CAVEAT)}.</p>",
            _table(header, rows, left=(0, 1, 5)), _list(sentences)]


def _noise_sections(summary: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for noise in summary.get("noise_scale", []):
        rows = []
        for group, values in noise["groups"].items():
            low, high = values["interval"]
            rows.append([group, number(values["b_simple"]), f"{number(low)} .. {number(high)}",
                         values["measured_steps"], values["negative_trace_steps"]])
        out += [f"<h2>Gradient noise scale: {_e(noise['run'])}</h2>",
                f"<p>Norms at batch {count(noise['batch_small'])} and {count(noise['batch_big'])} examples; "
                "B_simple = mean tr(Sigma) / mean |G|^2 of the unbiased per-step estimates over the last half of "
                "the measured steps, with a bootstrap interval over those steps; the figure shows the ratio of "
                f"their bias-corrected EMAs (smoothing {_e(noise['smoothing'])}) over training.</p>",
                _table(["group", "B_simple (examples)", "interval", "measured steps", "negative tr(Sigma) steps"],
                       rows)]
        advice = noise.get("batch_advice")
        if advice:
            if advice["warning"]:
                out.append(f'<div class="banner" role="alert">{_e(advice["warning"])}</div>')
            out.append(_table(["batch", "steps / minimum", "examples / minimum"],
                              [[count(c["batch"]) + (" (this run)" if c["batch"] == advice["batch"] else ""),
                                number(c["steps_factor"], 2), number(c["examples_factor"], 2)]
                               for c in advice["candidates"]]))
    return out


def _figure(name: str, path: Path) -> str:
    mime = _MIME.get(path.suffix.lower(), "application/octet-stream")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    caption = CAPTIONS.get(name, name)
    return (f'<figure id="fig-{_e(name)}"><img src="data:{mime};base64,{data}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


# -- formatting ------------------------------------------------------------------------------------------------


_e = escape


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], left: Sequence[int] = (0,)) -> str:
    """An HTML table; the columns at indices ``left`` (names, text) are left-aligned, numbers right-aligned."""
    def cells(values: Sequence[Any], tag: str) -> str:
        return "".join(f'<{tag}{" class=l" if i in left else ""}>{_e(v)}</{tag}>' for i, v in enumerate(values))

    body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in rows)
    return f"<table><thead><tr>{cells(header, 'th')}</tr></thead><tbody>{body}</tbody></table>"


def _list(items: Iterable[Any]) -> str:
    return "<ul>" + "".join(f"<li>{_e(i)}</li>" for i in items) + "</ul>"


def report_title(runs: Sequence[Mapping[str, Any]]) -> str:
    """The page's title: the run files' names (the first three)."""
    names = [Path(r["path"]).name for r in runs]
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"lorascope report: {shown}"
