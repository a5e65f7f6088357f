"""The real-data study's forecast again, with today's estimator, from the study's own full fine-tuning recordings.

``run.py`` wrote its predictions (``docs/realdata/predictions.json``) before any LoRA run, with the estimator of
that day (each recording read at its own end). The bits are now read under the planned recipe (docs/information.md;
here the plan is the study's own: 5 epochs, so each probe is read at its last epoch as before, with the one-time
cost counted once and the growth law capped). This script re-predicts from the same probes and measures the new
predictions against the same LoRA runs. It is not a pre-registered prediction: the LoRA results were known; the
estimator was designed on random facts (examples/capacity/recipe_consistency.py), not tuned on these runs.

    python examples/realdata/run.py -o realdata-out          # the study (its run files are needed here)
    python examples/realdata/repredict.py realdata-out       # seconds; writes docs/realdata/repredicted.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402  (the study's tiers, measurement and tables)

OUT = HERE.parents[1] / "docs" / "realdata" / "repredicted.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study", type=Path, help="the study's output folder (with runs/*.h5 and results.json)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    import lorascope

    old = json.loads((args.study / "results.json").read_text())
    before = run._int_keys(json.loads((args.study / "predictions.json").read_text()))
    tier = run.Tier(**{k: tuple(v) if isinstance(v, list) else v for k, v in old["tier"].items()})
    results = {r["name"]: {**r, "path": str(args.study / "runs" / f"{r['name']}.h5")} for r in old["runs"]}
    probes = {n: results[p["name"]]["path"] for n, p in before["probes"].items()}
    information = {}
    all_sizes = lorascope.analyze([probes[n] for n in tier.sizes], ranks=tier.ranks).to_dict()["forecast"]
    information["all sizes (growth law)"] = run._forecast_rows(all_sizes, tier.ranks)
    for n in tier.sizes:
        one = lorascope.analyze(probes[n], ranks=tier.ranks).to_dict()["forecast"]
        information[f"N={n} (linear)"] = run._forecast_rows(one, tier.ranks)
    information["size only (1 bit per token)"] = before["information"]["size only (1 bit per token)"]
    after = {**before, "information": information, "forecast_all_sizes": all_sizes,
             "repredicted": "from the same probes with the planned-recipe estimator, after the LoRA runs"}
    summary = run.measure_all(tier, results, run._int_keys(old["base"]["losses"]), after)
    out = {"command": "python examples/realdata/repredict.py realdata-out",
           "predictions_before": {k: before["information"][k] for k in information},
           "predictions_after": information, "forecast_all_sizes": all_sizes,
           "predictors_before": old["predictors"], "predictors_after": summary["predictors"],
           "falloff": summary["falloff"], "bits_per_example": summary["bits_per_example"],
           "growth": summary["growth"]}
    args.out.write_text(json.dumps(run._jsonable(out), indent=2, allow_nan=False) + "\n")
    for name in information:
        for criterion in ("train", "held"):
            cells = summary["predictors"][f"forecast: {name}"][criterion]
            print(f"{name:28s} {criterion:5s} " + "  ".join(f"r{r}: {c['predicted']:,.0f} ({_ratio(c)})"
                                                           for r, c in cells.items()))


def _ratio(cell: dict) -> str:
    return "no falloff measured" if cell["ratio"] is None else f"{cell['ratio']:.2g}x measured"


if __name__ == "__main__":
    main()
