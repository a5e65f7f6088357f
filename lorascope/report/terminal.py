"""Terminal summary of an analysis: the headline, tables per kind and per LoRA target set, and the curves."""

from __future__ import annotations

from typing import Any

from lorascope.report.contributions import contributions_facts, contributions_header, contributions_rows
from lorascope.report.curves import CURVES_CAVEAT, crossings_sentence
from lorascope.report.forecast import forecast_facts, forecast_header, forecast_rows
from lorascope.report.format import X_UNITS, count, number, percent, table
from lorascope.report.subspace import (
    intruder_facts,
    intruder_header,
    intruder_rows,
    settle_facts,
    settle_header,
    settle_rows,
    subspace_title,
)

__all__ = ["format_summary"]


def _section(title: str, facts: list[str], header: list[str], rows: list[list[str]], notes: list[str]) -> list[str]:
    """A report section: its title, its sentences, its table (when it has rows) and its notes."""
    lines = ["", title, *(f"  {s}" for s in facts)]
    if rows:
        lines += [f"  {s}" for s in table(header, rows)]
    return lines + [f"  - {note}" for note in notes]


def _forecast_lines(forecast: dict[str, Any] | None) -> list[str]:
    if forecast is None:
        return []
    return _section("Forecast: where a LoRA of each rank runs out on this data (the bits full fine-tuning took in, "
                    "against the LoRA's capacity):", forecast_facts(forecast), forecast_header(forecast),
                    forecast_rows(forecast), forecast.get("notes", []))


def _contributions_lines(contributions: dict[str, Any] | None) -> list[str]:
    if contributions is None:
        return []
    return _section("Contributions: what each kind of the update is worth on a held batch, and which LoRA runs out "
                    "first:", contributions_facts(contributions), contributions_header(contributions),
                    contributions_rows(contributions), contributions.get("notes", []))


def _subspace_lines(subspace: dict[str, Any] | None) -> list[str]:
    if subspace is None:
        return []
    if subspace["dynamics"] is None and subspace["intruders"] is None:  # one line: what to record with
        return ["", f"Subspaces and intruder dimensions {subspace['missing']}"]
    lines = _section(subspace_title() + ":", settle_facts(subspace), settle_header(subspace), settle_rows(subspace),
                     [])
    facts = intruder_facts(subspace)
    if facts:
        lines += [*(f"  {s}" for s in facts), *(f"  {s}" for s in table(intruder_header(subspace),
                                                                         intruder_rows(subspace)))]
    return lines


def format_summary(summary: dict[str, Any]) -> str:
    """Render :attr:`lorascope.workflows.analyze.Analysis.summary` (``summary.json``) as plain text."""
    lines: list[str] = []
    x_name = X_UNITS[summary["x"]]
    for run in summary["runs"]:
        state = "complete" if run["complete"] else f"INCOMPLETE ({run['status']})"
        lines.append(f"run {run['path']}: {state}, {count(run['steps'])} steps, {run['snapshots']} snapshots, "
                     f"{count(run['examples_seen'])} examples, {count(run['tokens_seen'])} tokens, final loss "
                     f"{number(run['final_loss'], 4)}"
                     + (f"; DIVERGED at step {count(run['divergence']['step'])} (see the notes)"
                        if run.get("divergence") else ""))
    if summary["incomplete"]:
        lines.append("WARNING: at least one run is incomplete (still being written, or the writer died); "
                     "results cover what was written so far.")
    lines += _forecast_lines(summary.get("forecast"))
    lines += _contributions_lines(summary.get("contributions"))
    lines += _subspace_lines(summary.get("subspace"))
    final = summary["final"]
    if final is None:
        lines.append("No snapshots: no spectral analysis (the loss curve is in the report).")
    else:
        lines.append("")
        lines.append(f"At step {count(final['step'])} ({count(final['examples_seen'])} examples), over all recorded "
                     "matrices:")
        if final.get("missing"):
            lines.append(f"  n/a: {final['missing']}")
        for item in summary["headline"]:
            lines.append(f"  a rank-{item['rank']} LoRA (all-linear) captures "
                         f"{percent(item['captured_energy_share'])} of this update's energy; its signal rank is "
                         f"{number(item['signal_rank'])} (k_0.9 = {number(item['energy_rank_0.9'])})")
        ranks = summary["ranks"]
        lines.append("")
        lines.append("Per kind (energy-weighted over modules; e_r = share a best rank-r update misses):")
        header = ["kind", "modules", "energy", "k_0.9", "k_0.9/dim", "erank", "signal", *[f"e_{r}" for r in ranks]]
        rows = []
        for kind, row in sorted(final["by_kind"].items(), key=lambda kv: -(kv[1]["energy_share"] or 0)):
            rows.append([kind, str(row["modules"]), percent(row["energy_share"]), number(row["energy_rank"]["0.9"]),
                         percent(row["energy_rank_fraction"]["0.9"]), number(row["effective_rank"]),
                         number(row["signal_rank"]), *[percent(row["rank_residual"][str(r)]) for r in ranks]])
        lines.extend("  " + s for s in table(header, rows))
        lines.append("")
        lines.append("LoRA target sets (share of the whole update the best rank-r adapters capture):")
        header = ["target", *[f"r={r}" for r in ranks]]
        rows = [[t, *[percent(values.get(str(r))) for r in ranks]] for t, values in final["lora_capture"].items()]
        lines.extend("  " + s for s in table(header, rows))
        hungry = final["rank_hungry_modules"][:5]
        if hungry:
            lines.append("")
            lines.append("Modules needing the most rank (k_0.9 relative to min(out, in)):")
            for m in hungry:
                lines.append(f"  {m['module']} ({m['kind']}): k_0.9 = {count(m['energy_rank'])} "
                             f"({percent(m['energy_rank_fraction'])} of its dimension)")
    if summary["curves"]:
        lines.append("")
        lines.append(f"Rank vs data (k_0.9 against {x_name} seen, power law with bootstrap interval; {CURVES_CAVEAT}):")
        for group, curve in summary["curves"].items():
            fit = curve["fit"]
            if fit["status"] == "ok":
                lo, hi = fit["exponent_interval"]
                lines.append(f"  {group}: k_0.9 ~ {number(fit['prefactor'], 3)} x^{number(fit['exponent'], 3)} "
                             f"(exponent {number(lo, 3)}..{number(hi, 3)})")
            else:
                lines.append(f"  {group}: no fit: {fit['reason']}")
            if curve["crossings"]:
                lines.append(f"    {crossings_sentence(group, curve, x_name)}")
    for noise in summary.get("noise_scale", []):
        lines.append("")
        overall = noise["groups"]["all"]
        low, high = overall["interval"]
        interval = f" ({number(low)}..{number(high)})" if low is not None and high is not None else ""
        lines.append(f"Gradient noise scale of {noise['run']} (batch {count(noise['batch_small'])} vs "
                     f"{count(noise['batch_big'])}, {overall['measured_steps']} steps): B_simple ~ "
                     f"{number(overall['b_simple'])}{interval} examples")
        kinds = [f"{g} {number(v['b_simple'])}" for g, v in noise["groups"].items() if g != "all"]
        if kinds:
            lines.append("  per kind: " + ", ".join(kinds))
        advice = noise.get("batch_advice")
        if advice:
            row = next(c for c in advice["candidates"] if c["batch"] == advice["batch"])
            lines.append(f"  at your batch of {count(advice['batch'])}: {number(row['steps_factor'], 2)}x the minimal "
                         f"steps, {number(row['examples_factor'], 2)}x the minimal examples"
                         + (" (LoRA run)" if advice["lora"] else ""))
    if summary["notes"]:
        lines.append("")
        lines.append("Notes:")
        lines.extend(f"  - {note}" for note in summary["notes"])
    return "\n".join(lines)
