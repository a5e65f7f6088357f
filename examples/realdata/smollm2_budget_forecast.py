"""LoRA probes run at one step budget, read for a run at another: kappa scaled by how it grew with the budget.

A LoRA probe's kappa is a property of its step budget: on one SFT slice it grew 1.54x / 1.88x / 1.95x at ranks 4 /
16 / 64 from 64 to 128 steps (``smollm2_probe_budget.py``, docs/realdata_smollm2.md, "kappa against the step
budget"). This checks that measurement where it matters, against falloffs: the LoRA probes of one step-budget study
(``smollm2_lora_probes.py``) are read for the studies of another budget, once as they are and once with each
probe's kappa multiplied by the growth measured on that slice between the two budgets, and both forecasts are set
against the falloffs those studies measured on training loss.

- The growth factor at a probe's LoRA parameter count is read log-log between the three measured ranks (4, 16 and
  64) and held at the nearest of them outside (ranks 1 and 2 take rank 4's); only budgets the slice measured (32,
  64, 128, 256 steps) can be bridged.
- Each target study's bits come from its own full probes at its own budget (the growth law its JSON keeps with its
  predictions), as a user would probe the data at the planned budget; only the LoRA probes come from elsewhere.
- The factors were measured on another task (SFT) and seed, not fitted to these falloffs; but every falloff here was
  known before this was run: post hoc.

    python examples/realdata/smollm2_budget_forecast.py \\
        --probes docs/realdata/smollm2_lora_probes.json --probes docs/realdata/smollm2_lora_probes_r32.json \\
        --probes docs/realdata/smollm2_lora_probes_steps_seed2.json \\
        --probes docs/realdata/smollm2_lora_probes_steps_seed2_r32.json \\
        docs/realdata/smollm2_steps.json docs/realdata/smollm2_steps_seed1.json \\
        docs/realdata/smollm2_steps_seed2.json docs/realdata/smollm2_steps128.json \\
        --out docs/realdata/smollm2_budget_forecast.json
    python examples/realdata/smollm2_budget_forecast.py --tables docs/realdata/smollm2_budget_forecast.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "reproduce"))

import repro_measure as measure  # noqa: E402
import smollm2_step_forecast as step_forecast  # noqa: E402

BUDGET = "docs/realdata/smollm2_probe_budget.json"
"""kappa of LoRA probes of ranks 4, 16 and 64 at 32, 64, 128 and 256 steps on one SFT slice."""


def growth_factor(budget: dict[str, Any], parameters: float, from_steps: int, to_steps: int) -> float:
    """kappa at ``to_steps`` over kappa at ``from_steps`` at ``parameters`` LoRA parameters: log-log between the
    measured ranks, held at the nearest one outside them.

    >>> rows = [{"steps": s, "lora_parameters": p, "kappa": k} for s, p, k in
    ...         [(64, 100, 1.0), (128, 100, 2.0), (64, 400, 1.0), (128, 400, 4.0)]]
    >>> [round(growth_factor({"rows": rows}, p, 64, 128), 3) for p in (50, 100, 200, 400, 800)]
    [2.0, 2.0, 2.828, 4.0, 4.0]
    >>> growth_factor({"rows": rows}, 100, 128, 64)
    0.5
    """
    kappa = {(r["steps"], r["lora_parameters"]): r["kappa"] for r in budget["rows"]}
    sizes = sorted(p for s, p in kappa if s == from_steps and (to_steps, p) in kappa)
    if not sizes:
        measured = sorted({s for s, _ in kappa})
        raise SystemExit(f"smollm2_budget_forecast: the budget slice measured {measured} steps; it cannot bridge "
                         f"{from_steps} to {to_steps}")
    logs = [math.log(kappa[to_steps, p] / kappa[from_steps, p]) for p in sizes]
    return math.exp(float(np.interp(math.log(parameters), np.log(sizes), logs)))  # np.interp holds the ends


def calibration_of(probes: dict[str, Any], scale: Callable[[int], float] | None = None) -> Any:
    """The LoRA probes' calibration as their forecast read it; with ``scale`` (a function of the LoRA parameter
    count), each probe's bits (held and offered alike, so which probes count as full is as measured) multiplied."""
    from lorascope.workflows.calibration import Calibration, CalibrationPoint

    saved = probes["predictions"]["calibration"]
    points = tuple(CalibrationPoint.from_dict(p) for p in saved["points"])
    if scale is not None:
        points = tuple(dataclasses.replace(p, bits_stored=p.bits_stored * scale(p.lora_parameters),
                                           bits_offered=p.bits_offered * scale(p.lora_parameters)) for p in points)
    return Calibration(model=saved["model"], target=saved["target"], points=points, task=saved["task"],
                       training=saved["training"], base=saved.get("base", ""))


def falloffs_of(study_path: Path, study: dict[str, Any], probe_sets: list[dict[str, Any]]) -> dict[str, Any]:
    """The study's falloffs on training loss, and those the LoRA-probe scripts measured on it for the rank they
    trained after their forecast (32, 64)."""
    falloff = dict(study["measured"]["falloff"]["train"])
    for probes in probe_sets:
        if Path(probes["study"]).resolve() == study_path.resolve():
            falloff.update({r: f for r, f in probes["falloff"].items() if r not in falloff})
    return falloff


def reforecast(study_path: Path, probes_path: Path, probes: dict[str, Any], probe_sets: list[dict[str, Any]],
               budget: dict[str, Any]) -> dict[str, Any]:
    """One study read with one probe set of another budget: kappa as probed, and scaled to the study's budget."""
    from lorascope.analysis.capacity import CapacityConstant

    study = json.loads(study_path.read_text())
    to_steps, from_steps = study["training"]["steps"], probes["predictions"]["calibration"]["training"]["steps"]
    bits = step_forecast.bits_estimate(study)
    falloff = falloffs_of(study_path, study, probe_sets)
    parameters = {r: int(r) * study["measured"]["lora_parameters"]["1"] for r in falloff}
    forecasts = {}
    for key, scale in (("as_probed", None),
                       ("scaled", lambda p: growth_factor(budget, p, from_steps, to_steps))):
        constant = CapacityConstant.from_calibration(calibration_of(probes, scale))
        ranks = {}
        for r, p in parameters.items():
            kappa = constant.bits_per_parameter_at(p)
            runway = bits.examples_for(kappa * p)
            ranks[r] = {"kappa": kappa, "runway": runway, **measure.verdict(runway, falloff[r])}
        forecasts[key] = ranks
    probed = {str(p["rank"]): p["lora_parameters"] for p in probes["predictions"]["calibration"]["points"]}
    return {"study": str(study_path), "task": study["data"]["task"].split(":")[0], "steps": to_steps,
            "seed": study["training"].get("seed") or 0, "probes": str(probes_path), "probe_steps": from_steps,
            "probe_ranks": [int(r) for r in probed], "probe_size": probes["probe_slice"]["examples"],
            "growth_factors": {r: growth_factor(budget, p, from_steps, to_steps) for r, p in probed.items()},
            "falloff": falloff, **forecasts}


def cell(row: dict[str, Any]) -> str:
    if row["ratio"] is not None:
        return f"{row['runway']:,.0f} ({row['ratio']:.2f}x)"
    return f"{row['runway']:,.0f} ({'consistent' if row['consistent'] else 'wrong side'})"


def measured(falloff: dict[str, Any]) -> str:
    bound = {"at_or_below": "<= ", "beyond": "> "}.get(falloff["status"], "")
    return f"{bound}{falloff['examples']:,.0f}"


def tables(result: dict[str, Any]) -> str:
    """The markdown table docs/realdata_smollm2.md shows, from the JSON."""
    ranks = sorted({r for row in result["readings"] for r in row["falloff"]}, key=int)
    lines = ["| study | LoRA probes (growth factors) | kappa | " + " | ".join(f"r{r}" for r in ranks) + " |",
             "|---|---|---|" + "---:|" * len(ranks)]
    shown = None
    for row in result["readings"]:
        if row["study"] != shown:
            shown, falloff = row["study"], row["falloff"]
            lines.append(f"| {row['task']}, {row['steps']} steps, seed {row['seed']} | | **measured falloff** | "
                         + " | ".join(measured(falloff[r]) if r in falloff else "-" for r in ranks) + " |")
        factors = ", ".join(f"r{r} x{f:.2f}" for r, f in row["growth_factors"].items())
        probes = (f"ranks {', '.join(map(str, row['probe_ranks']))} at N = {row['probe_size']}, "
                  f"{row['probe_steps']} steps")
        for key, label in (("as_probed", "as probed"), ("scaled", f"scaled to {row['steps']} steps")):
            lines.append(f"| | {probes}" + (f" ({factors})" if key == "scaled" else "") + f" | {label} | "
                         + " | ".join(cell(row[key][r]) if r in row[key] else "-" for r in ranks) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("studies", nargs="*", type=Path, help="step-budget study JSONs (smollm2_study.py --report)")
    parser.add_argument("--probes", action="append", type=Path, default=[], metavar="JSON",
                        help="a LoRA-probe result (smollm2_lora_probes.py --out); repeatable")
    parser.add_argument("--budget", type=Path, default=ROOT / BUDGET, help="kappa against the step budget "
                        "(smollm2_probe_budget.py --out)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--tables", type=Path, metavar="JSON", help="print the markdown table of a written JSON")
    args = parser.parse_args(argv)
    if args.tables:
        print(tables(json.loads(args.tables.read_text())))
        return 0
    if not args.studies or not args.probes:
        parser.error("give one or more study JSONs and one or more --probes JSONs")
    for path in [*args.studies, *args.probes, args.budget]:
        if not path.is_file():
            parser.error(f"no such file: {path}")
    budget = json.loads(args.budget.read_text())
    probe_sets = [json.loads(p.read_text()) for p in args.probes]
    readings = []
    for study_path in args.studies:
        steps = json.loads(study_path.read_text())["training"]["steps"]
        for probes_path, probes in zip(args.probes, probe_sets):
            if probes["predictions"]["calibration"]["training"]["steps"] != steps:  # another budget only
                readings.append(reforecast(study_path, probes_path, probes, probe_sets, budget))
    if not readings:
        parser.error("no probe set ran at another budget than the studies")
    result = {"command": "python examples/realdata/smollm2_budget_forecast.py " + " ".join(argv or sys.argv[1:]),
              "post_hoc": "every falloff was measured before this was run", "budget": str(args.budget.relative_to(
                  ROOT) if args.budget.is_relative_to(ROOT) else args.budget), "readings": readings}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    print(tables(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
