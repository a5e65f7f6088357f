"""``lorascope.calibrate`` on a finished real-data study's base model, and the forecast rescaled to its kappa.

The calibration trains LoRA adapters on random key -> value facts on the study's base (not on the study's data and
not using its LoRA runs), so it is a blind input; it is run after the study only because it was added later.
Writes ``calibration_e<EPOCHS>.json`` and ``calibrated_forecast_e<EPOCHS>.json`` into the study's folder.

    python examples/realdata/calibrate_base.py [-o realdata-out] [--epochs 300]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="realdata-out", help="the finished study's folder")
    parser.add_argument("--epochs", type=int, default=300)
    args = parser.parse_args(argv)
    import torch

    import lorascope
    from lorascope.analysis.capacity import CapacityConstant

    torch.set_num_threads(1)
    out = Path(args.output)
    summary = json.loads((out / "results.json").read_text())
    predictions = json.loads((out / "predictions.json").read_text())
    tier = run.Tier(**{k: tuple(v) if isinstance(v, list) else v for k, v in summary["tier"].items()})
    start = time.time()
    calibration = lorascope.calibrate(run.load_base(tier, out / "base.pt"), ranks=(1, 2), epochs=args.epochs,
                                      seed=100, base="the real-data study's byte-level tiny Llama",
                                      offered_bits_per_parameter=2.0, bracket=None)  # the published recipe
    calibration.save(out / f"calibration_e{args.epochs}.json")
    print(f"calibrate ({args.epochs} epochs, {time.time() - start:.0f} s): "
          f"{calibration.bits_per_parameter:.4f} bits per LoRA parameter")
    # The growth-law forecast again from the same full fine-tuning recordings, with the calibrated constant.
    paths = [out / "runs" / f"{predictions['probes'][str(n)]['name']}.h5" for n in tier.sizes]
    forecast = lorascope.analyze([str(p) for p in paths], ranks=tier.ranks,
                                 constant=CapacityConstant.from_calibration(calibration)).to_dict()["forecast"]
    rows = {row["rank"]: row["runway_examples"] for row in forecast["rows"] if row["target"] == "all-linear"}
    measured = summary["falloff"]
    result = {"epochs": args.epochs, "bits_per_parameter": calibration.bits_per_parameter,
              "points": calibration.to_dict()["points"], "runway_examples": rows,
              "measured_falloff": measured}
    (out / f"calibrated_forecast_e{args.epochs}.json").write_text(json.dumps(run._jsonable(result), indent=2) + "\n")
    for r in tier.ranks:
        print(f"rank {r}: runway {rows[r]:,.0f}; measured (train) {measured['train'][str(r)]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
