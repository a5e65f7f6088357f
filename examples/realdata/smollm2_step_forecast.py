"""The step-budget studies' forecast read with kappa measured at their own step budget (post hoc).

The SmolLM2 step-budget studies (``smollm2_study.py --steps S``) forecast each rank's falloff from the probes' growth
law and kappa(P) measured to a plateau (300 epochs): right at rank 1, 1.7-2.4x late at rank 4 and 2.4-5.8x late at
rank 16, because in S steps a large adapter does not fill that kappa (docs/realdata_smollm2.md). This reads the same
growth law (each study's JSON keeps it with its predictions) with kappa(P) measured at S steps
(``smollm2_calibrate.py --steps S``: random facts, each adapter trained exactly S Adam steps, every rank at the load
where it held the most), and sets both forecasts against the falloffs each study measured on training loss.

The forecast with the calibration a study itself used (``--kappa``) is recomputed from its JSON and checked against
the one it wrote (to 1e-9, relative): the reconstruction is exact, and only kappa changes. That one was written
before the study's LoRA runs; the others are post hoc (the LoRA runs were known).

    python examples/realdata/smollm2_step_forecast.py \
        --calibration 64=docs/realdata/smollm2_calibration_steps64.json \
        docs/realdata/smollm2_steps.json docs/realdata/smollm2_steps_seed1.json \
        docs/realdata/smollm2_sft_steps.json docs/realdata/smollm2_sft_steps_seed1.json \
        --out docs/realdata/smollm2_step_forecast.json
    python examples/realdata/smollm2_step_forecast.py --tables docs/realdata/smollm2_step_forecast.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent / "reproduce"))

import repro_measure as measure  # noqa: E402

RANKS = ("1", "4", "16")
WRITTEN = "forecast: all sizes (growth law), measured kappa(P)"
PLATEAU_CALIBRATION = "docs/realdata/smollm2_calibration_alllinear_load2.json"
"""kappa(P) of all-linear LoRA on the block, trained 300 epochs (docs/capacity.md, "A fourth base")."""
AGREEMENT = 1e-9


def bits_estimate(study: dict[str, Any]) -> Any:
    """The growth law the study's predictions were read from."""
    from lorascope.analysis.information import BitsEstimate

    saved = study["predictions"]["forecast_all_sizes"]["bits"]
    return BitsEstimate(**{f.name: saved[f.name] for f in dataclasses.fields(BitsEstimate) if f.name in saved})


def runways(study: dict[str, Any], calibration_path: str) -> dict[str, dict[str, float]]:
    """Each rank's forecast runway (examples) with the calibration's kappa(P), and that kappa."""
    import lorascope
    from lorascope.analysis.capacity import CapacityConstant

    bits = bits_estimate(study)
    constant = CapacityConstant.from_calibration(lorascope.load_calibration(ROOT / calibration_path))
    out = {}
    for rank in RANKS:
        parameters = study["measured"]["lora_parameters"][rank]
        kappa = constant.bits_per_parameter_at(parameters)
        out[rank] = {"kappa": kappa, "runway": bits.examples_for(kappa * parameters)}
    return out


def reforecast(path: Path, calibrations: dict[int, str]) -> dict[str, Any]:
    """One study: the forecast with kappa at a plateau and at the study's step budget, against its falloffs. The one
    with the calibration the study itself used (``--kappa``) is checked against what it wrote before its LoRA runs."""
    study = json.loads(path.read_text())
    steps = study["training"]["steps"]
    if steps not in calibrations:
        raise SystemExit(f"smollm2_step_forecast: {path} ran {steps} steps; give --calibration {steps}=JSON")
    falloff, used = study["measured"]["falloff"]["train"], study["predictions"]["kappa_calibration"]
    forecasts = {}
    for key, calibration in (("plateau_kappa", PLATEAU_CALIBRATION), ("step_kappa", calibrations[steps])):
        ranks = runways(study, calibration)
        if calibration == used:  # the same forecast as the study's: the reconstruction must be exact
            written = study["measured"]["predictors"][WRITTEN]["train"]
            for rank in RANKS:
                if abs(ranks[rank]["runway"] / written[rank]["predicted"] - 1) > AGREEMENT:
                    raise SystemExit(f"smollm2_step_forecast: {path}: rank {rank}'s forecast recomputes to "
                                     f"{ranks[rank]['runway']:.6g}, the study wrote {written[rank]['predicted']:.6g}")
        forecasts[key] = {"calibration": calibration, "written_before_the_lora_runs": calibration == used,
                          "ranks": ranks, "verdicts": {r: measure.verdict(ranks[r]["runway"], falloff[r])
                                                       for r in RANKS}}
    return {"study": str(path), "task": study["data"]["task"].split(":")[0], "steps": steps,
            "seed": study["training"].get("seed") or 0,
            "probe_learning_rates": {n: p["lr"] for n, p in study["predictions"]["probes"].items()},
            "bits_per_example": study["predictions"]["forecast_all_sizes"]["bits"]["bits_per_example"],
            "growth_exponent": study["predictions"]["forecast_all_sizes"]["bits"]["exponent"],
            "falloff": falloff, **forecasts}


def cell(runway: float, verdict: dict[str, Any]) -> str:
    if verdict["ratio"] is not None:
        return f"{runway:,.0f} ({verdict['ratio']:.2f}x)"
    return f"{runway:,.1f} ({'consistent' if verdict['consistent'] else 'wrong side'})"


def tables(result: dict[str, Any]) -> str:
    """The markdown table docs/realdata_smollm2.md shows, from the JSON."""
    lines = ["| study | kappa(P) at ranks 1, 4, 16 | " + " | ".join(f"r{r}" for r in RANKS) + " |",
             "|---|---|" + "---:|" * len(RANKS)]
    for study in result["studies"]:
        falloff = study["falloff"]
        lines.append(f"| {study['task']}, {study['steps']} steps, seed {study['seed']} | **measured falloff** | "
                     + " | ".join(("<= " if falloff[r]["status"] == "at_or_below" else "") +
                                  f"{falloff[r]['examples']:,.0f}" for r in RANKS) + " |")
        for key, label in (("plateau_kappa", "at a plateau"), ("step_kappa", "at the step budget")):
            forecast = study[key]
            when = "written before the LoRA runs" if forecast["written_before_the_lora_runs"] else "post hoc"
            lines.append(f"| | {label} ({when}): " + ", ".join(f"{forecast['ranks'][r]['kappa']:.3f}" for r in RANKS)
                         + " | " + " | ".join(cell(forecast["ranks"][r]["runway"], forecast["verdicts"][r])
                                              for r in RANKS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("studies", nargs="*", type=Path, help="step-budget study JSONs (smollm2_study.py --report)")
    parser.add_argument("--calibration", action="append", default=[], metavar="STEPS=JSON",
                        help="a calibration measured at STEPS steps (smollm2_calibrate.py --steps); repeatable")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--tables", type=Path, metavar="JSON", help="print the markdown table of a written JSON")
    args = parser.parse_args(argv)
    if args.tables:
        print(tables(json.loads(args.tables.read_text())))
        return 0
    if not args.studies:
        parser.error("give one or more study JSONs")
    calibrations = {}
    for item in args.calibration:
        steps, _, path = item.partition("=")
        if not steps.isdigit() or not path:
            parser.error(f"--calibration takes STEPS=JSON, got {item!r}")
        calibrations[int(steps)] = path
    result = {"command": "python examples/realdata/smollm2_step_forecast.py " + " ".join(argv or sys.argv[1:]),
              "post_hoc": "read after the LoRA runs",
              "studies": [reforecast(path, calibrations) for path in args.studies]}
    text = json.dumps(result, indent=1, allow_nan=False) + "\n"
    if args.out:
        args.out.write_text(text)
    print(tables(json.loads(text)))
    return 0


if __name__ == "__main__":
    sys.exit(main(None))
