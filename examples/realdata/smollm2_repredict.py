"""The SmolLM2 study's forecast again, post hoc: today's estimator, with lorascope's default kappa and with SmolLM2's.

``smollm2_study.py`` wrote its predictions before any LoRA run, with the estimator of that day and the default kappa
(0.69 bits per LoRA parameter). Since then the estimator reads the bits under the planned recipe and caps each
step's loss at ln V (docs/information.md), and kappa was measured on this very block (``smollm2_calibrate.py``,
docs/capacity.md "A fourth base"): for attention-only LoRA at ranks 1-4 and for all-linear LoRA (the study's
target) at ranks 1-2, each at 2 bits offered per parameter. This script re-reads the study's own full fine-tuning
probes, both tasks, at the learning rate the predictions used (1e-3, the best probe when they were written) and at
full fine-tuning's best training-loss rate found later (3e-3), with each kappa, and sets each forecast (the growth
law over N = 64 and 256) against the falloffs the study measured (checked in: docs/realdata/smollm2_study.json,
smollm2_sft.json).

It is not a prediction: the LoRA results were known. Each fit kappa(P) is held at the end of its measured range
outside it (analyze does so): the all-linear fit covers 10,176-20,352 parameters, so ranks 4 and 16 (40,704 and
162,816) read it at its upper end, an extrapolation; the attention-only fit is for other matrices altogether.

    python examples/realdata/smollm2_study.py -o smollm2-study-out                  # the studies (their run files)
    python examples/realdata/smollm2_study.py --task sft --sizes 64,256 --grid-sizes 64 -o smollm2-sft-out
    python examples/realdata/smollm2_repredict.py smollm2-study-out smollm2-sft-out  # a minute; writes the JSON
    python examples/realdata/smollm2_repredict.py --tables docs/realdata/smollm2_repredicted.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DOCS = HERE.parents[1] / "docs" / "realdata"
sys.path.insert(0, str(HERE.parent / "reproduce"))

import repro_measure as measure  # noqa: E402

RANKS = (1, 4, 16)
PROBE_SIZES = (64, 256)
PROBE_LRS = {"1e-3 (the predictions' probes)": 1e-3, "3e-3 (full fine-tuning's best; found later)": 3e-3}
TASKS = {"cpt": ("continued pretraining", DOCS / "smollm2_study.json"), "sft": ("SFT", DOCS / "smollm2_sft.json")}
CALIBRATIONS = {"SmolLM2 attention-only kappa(P)": DOCS / "smollm2_calibration_load2.json",
                "SmolLM2 all-linear kappa(P)": DOCS / "smollm2_calibration_alllinear_load2.json"}
OUT = DOCS / "smollm2_repredicted.json"


def forecast_rows(forecast: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The all-linear rows of an analysis' forecast: runway (examples) and capacity per rank."""
    if "missing" in forecast:
        raise SystemExit(f"smollm2_repredict: no forecast: {forecast['missing']}")
    rows = {row["rank"]: row for row in forecast["rows"] if row["target"] == "all-linear"}
    return {r: {"examples": rows[r]["runway_examples"], "lora_parameters": rows[r]["lora_parameters"],
                "capacity_bits": rows[r]["capacity_bits"],
                "kappa": rows[r]["capacity_bits"] / rows[r]["lora_parameters"]} for r in RANKS}


def repredict(folder: Path, report: dict[str, Any], kappas: dict[str, Any]) -> dict[str, Any]:
    """Every (probe learning rate, kappa) forecast of one task against its measured falloffs."""
    import lorascope

    falloff = report["measured"]["falloff"]
    out: dict[str, Any] = {"falloff": falloff, "forecasts": {}}
    for lr_name, lr in PROBE_LRS.items():
        probes = [folder / "runs" / f"full_n{n}_lr{lr:g}.h5" for n in PROBE_SIZES]
        missing = [str(p) for p in probes if not p.exists()]
        if missing:
            raise SystemExit(f"smollm2_repredict: probe run files not found: {', '.join(missing)}")
        for kappa_name, constant in kappas.items():
            forecast = lorascope.analyze(probes, ranks=RANKS, constant=constant).to_dict()["forecast"]
            rows = forecast_rows(forecast)
            verdicts = {c: {r: measure.verdict(rows[r]["examples"], falloff[c][str(r)]) for r in RANKS}
                        for c in ("train", "held")}
            out["forecasts"][f"probes at LR {lr_name}, {kappa_name}"] = {
                "lr": lr_name, "kappa": kappa_name, "probes": [p.name for p in probes],
                "bits_per_example": forecast["bits"]["bits_per_example"],
                "growth_exponent": forecast["growth"]["exponent"], "rows": rows, "verdicts": verdicts}
    before = report["predictions"]["information"]["all sizes (growth law)"]
    out["written_before_the_lora_runs"] = {r: before[str(r)]["examples"] for r in RANKS}
    return out


def tables(result: dict[str, Any]) -> str:
    """The markdown tables docs/realdata_smollm2.md shows, from the JSON."""
    lines = []
    for task, data in result["tasks"].items():
        falloff = {r: data["falloff"]["train"][str(r)] for r in RANKS}
        measured = " | ".join(("<= " if f["status"] == "at_or_below" else "") + f"{f['examples']:,.0f}"
                              for f in falloff.values())
        lines += [f"{TASKS[task][0]}: forecast falloff (examples, growth law over N = 64 and 256) against the one "
                  "measured on training loss:", "",
                  "| probes at LR | kappa | bits per example | " + " | ".join(f"r{r}" for r in RANKS) + " |",
                  "|---|---|---|" + "---|" * len(RANKS),
                  f"| **measured** | | | {measured} |",
                  "| 1e-3, as written before the LoRA runs | default 0.69 | | " + " | ".join(
                      f"{data['written_before_the_lora_runs'][str(r)]:,.0f}" for r in RANKS) + " |"]
        for f in data["forecasts"].values():
            cells = []
            for r in RANKS:
                row, v = f["rows"][str(r)], f["verdicts"]["train"][str(r)]
                side = "consistent" if v["consistent"] else "wrong side"
                cells.append(f"{row['examples']:,.0f} ({side}; kappa {row['kappa']:.2f})")
            lines.append(f"| {f['lr']} | {f['kappa']} | {f['bits_per_example']:.1f} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("studies", nargs="*", type=Path, help="the continued-pretraining and SFT study folders")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--tables", type=Path, metavar="JSON", help="print the markdown tables of a written JSON")
    args = parser.parse_args(argv)
    if args.tables:
        print(tables(json.loads(args.tables.read_text())))
        return 0
    if len(args.studies) != len(TASKS):
        parser.error("give the continued-pretraining study folder, then the SFT one")
    import lorascope
    from lorascope.analysis.capacity import CapacityConstant

    kappas = {"default 0.69": None, **{name: CapacityConstant.from_calibration(lorascope.load_calibration(path))
                                        for name, path in CALIBRATIONS.items()}}
    result: dict[str, Any] = {
        "command": "python examples/realdata/smollm2_repredict.py smollm2-study-out smollm2-sft-out",
        "calibrations": {name: str(path.relative_to(HERE.parents[1])) for name, path in CALIBRATIONS.items()},
        "post_hoc": "read after the LoRA runs",
        "tasks": {task: repredict(folder, json.loads(TASKS[task][1].read_text()), kappas)
                  for task, folder in zip(TASKS, args.studies, strict=True)}}
    text = json.dumps(result, indent=1, allow_nan=False) + "\n"
    args.out.write_text(text)
    print(tables(json.loads(text)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
