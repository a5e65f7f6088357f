"""Terminal summary of an analysis: the headline, tables per kind and per LoRA target set, and the curves."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _table(header: Sequence[str], rows: list[Sequence[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return [line(header), *(line(r) for r in rows)]


def _crossing_text(crossing: dict[str, Any], x_name: str) -> str:
    level = int(crossing["level"])
    if crossing["status"] == "observed":
        return f"r={level} already reached at {_count(crossing['x'])} {x_name}"
    if crossing["status"] == "never":
        return f"r={level} not reached (no growth)"
    low, high = crossing["x_low"], crossing["x_high"]
    interval = f"{_count(low)}..{_count(high)}" if high is not None else f"{_count(low)}..unbounded"
    return f"r={level} at ~{_count(crossing['x'])} {x_name} ({interval})"


def format_summary(summary: dict[str, Any]) -> str:
    """Render :meth:`lorascope.workflows.analyze.Analysis.to_dict` output as plain text."""
    lines: list[str] = []
    x_name = "examples" if summary["x"] == "examples_seen" else "tokens"
    for run in summary["runs"]:
        state = "complete" if run["complete"] else f"INCOMPLETE ({run['status']})"
        lines.append(f"run {run['path']}: {state}, {run['steps']:,} steps, {run['snapshots']} snapshots, "
                     f"{run['examples_seen']:,} examples, {run['tokens_seen']:,} tokens, final loss "
                     f"{_num(run['final_loss'], 4)}")
    if summary["incomplete"]:
        lines.append("WARNING: at least one run is incomplete (still being written, or the writer died); "
                     "results cover what was written so far.")
    final = summary["final"]
    if final is None:
        lines.append("No snapshots: no spectral analysis (the loss curve is in the report).")
    else:
        lines.append("")
        lines.append(f"At step {final['step']:,} ({final['examples_seen']:,} examples), over all recorded matrices:")
        for item in summary["headline"]:
            lines.append(f"  a rank-{item['rank']} LoRA (all-linear) captures {_pct(item['captured_energy_share'])} "
                         f"of this update's energy; its signal rank is {_num(item['signal_rank'])} "
                         f"(k_0.9 = {_num(item['energy_rank_0.9'])})")
        ranks = summary["ranks"]
        lines.append("")
        lines.append("Per kind (energy-weighted over modules; e_r = share a best rank-r update misses):")
        header = ["kind", "modules", "energy", "k_0.9", "k_0.9/dim", "erank", "signal", *[f"e_{r}" for r in ranks]]
        rows = []
        for kind, row in sorted(final["by_kind"].items(), key=lambda kv: -(kv[1]["energy_share"] or 0)):
            rows.append([kind, str(row["modules"]), _pct(row["energy_share"]), _num(row["energy_rank"]["0.9"]),
                         _pct(row["energy_rank_fraction"]["0.9"]), _num(row["effective_rank"]),
                         _num(row["signal_rank"]), *[_pct(row["rank_residual"][str(r)]) for r in ranks]])
        lines.extend("  " + s for s in _table(header, rows))
        lines.append("")
        lines.append("LoRA target sets (share of the whole update the best rank-r adapters capture):")
        header = ["target", *[f"r={r}" for r in ranks]]
        rows = [[t, *[_pct(values.get(str(r))) for r in ranks]] for t, values in final["lora_capture"].items()]
        lines.extend("  " + s for s in _table(header, rows))
        hungry = final["rank_hungry_modules"][:5]
        if hungry:
            lines.append("")
            lines.append("Modules needing the most rank (k_0.9 relative to min(out, in)):")
            for m in hungry:
                lines.append(f"  {m['module']} ({m['kind']}): k_0.9 = {_num(m['energy_rank'], 0)} "
                             f"({_pct(m['energy_rank_fraction'])} of its dimension)")
    if summary["curves"]:
        lines.append("")
        lines.append(f"Rank vs data (k_0.9 against {x_name} seen, power law with bootstrap interval):")
        for group, curve in summary["curves"].items():
            fit = curve["fit"]
            if fit["status"] == "ok":
                lo, hi = fit["exponent_interval"]
                crossings = "; ".join(_crossing_text(c, x_name) for c in curve["crossings"])
                lines.append(f"  {group}: k_0.9 ~ {_num(fit['prefactor'], 3)} x^{_num(fit['exponent'], 3)} "
                             f"(exponent {_num(lo, 3)}..{_num(hi, 3)}); {crossings}")
            else:
                lines.append(f"  {group}: no fit: {fit['reason']}")
    for noise in summary.get("noise_scale", []):
        lines.append("")
        overall = noise["groups"]["all"]
        low, high = overall["interval"]
        interval = f" ({_count(low)}..{_count(high)})" if low is not None and high is not None else ""
        lines.append(f"Gradient noise scale of {noise['run']} (batch {_count(noise['batch_small'])} vs "
                     f"{_count(noise['batch_big'])}, {overall['measured_steps']} steps): B_simple ~ "
                     f"{_num(overall['b_simple'])}{interval} examples")
        kinds = [f"{g} {_num(v['b_simple'])}" for g, v in noise["groups"].items() if g != "all"]
        if kinds:
            lines.append("  per kind: " + ", ".join(kinds))
        advice = noise.get("batch_advice")
        if advice:
            row = next(c for c in advice["candidates"] if c["batch"] == advice["batch"])
            lines.append(f"  at your batch of {_count(advice['batch'])}: {row['steps_factor']:.2f}x the minimal steps, "
                         f"{row['examples_factor']:.2f}x the minimal examples"
                         + (" (LoRA run)" if advice["lora"] else ""))
    if summary["notes"]:
        lines.append("")
        lines.append("Notes:")
        lines.extend(f"  - {note}" for note in summary["notes"])
    return "\n".join(lines)
