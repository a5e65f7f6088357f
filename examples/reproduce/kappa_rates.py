"""kappa(r) re-measured with every learning rate at every load of rank 1, and the facts forecast it gives.

The study's kappa(r) calibration (docs/reproduction/calibration_kappa.json) tried its learning rates (1e-3, 3e-3)
at one load (2 bits per parameter) of rank 1, kept 1e-3, and measured 0.32 bits per parameter there: rank 1's
forecast came 0.61x early, outside issue 13's 1.5x. An adapter near its capacity is sensitive to the rate (at load
2, 3e-3 can hold a third more than 1e-3, or collapse), so ``calibrate`` now offers rank 1 every load at every rate,
keeps the rate that held the most, extends the grid past an end, and retries a larger rank that collapsed at a lower
rate (``lorascope.workflows.calibrate_search``). This script runs today's ``calibrate`` with the study's kappa(r)
recipe (ranks 1-16, bracket 0.5-8, 300 epochs, seed 101 or ``--seed``, on the study's base), then asks
``recommend``, as ``probe_steps.py`` does, where each rank falls off: the study's probe (rerun: 512 facts, batch 64,
learning rate 1e-2, 150 epochs; each step's loss capped at a uniform guess) with this kappa(r),
with the study's, and the task's true 8 bits per fact with each; against the falloffs the study measured
(docs/reproduction/results.json). A post-hoc forecast: every falloff was measured before it was run.

    python examples/reproduce/kappa_rates.py --base /path/to/base.pt \\
        --calibration docs/reproduction/calibration_kappa_rates.json -o docs/reproduction/kappa_rates.json

``--base``: the study's ``base.pt``; without it the base is pretrained here as the full mode does (1,500 steps, a
minute; its loss matches the study's, 4.6213). One process, one thread: 13-15 minutes on this project's machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import repro_train as train  # noqa: E402

DOCS = Path(__file__).resolve().parents[2] / "docs" / "reproduction"
LARGEST = 4096
"""The study's largest N: its facts are the first N of one draw of this many."""
PROBE = {"experiment": "probe", "target": "full", "rank": 0, "examples": 512, "lr": 1e-2, "batch_size": 64}
"""The study's information probe (full fine-tuning of its first 512 facts at its best rate)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=None, help="the study's base.pt (default: pretrain one)")
    parser.add_argument("--calibration", default="calibration_kappa_rates.json", help="where the calibration goes")
    parser.add_argument("-o", "--output", default="kappa_rates.json")
    parser.add_argument("--budget", type=int, default=None, help="calibrate's budget (default: none)")
    parser.add_argument("--seed", type=int, default=101, help="calibrate's seed (the study's: 101)")
    args = parser.parse_args(argv)
    import torch

    import lorascope

    torch.set_num_threads(1)
    results = json.loads((DOCS / "results.json").read_text())
    tier = results["tier"]
    with tempfile.TemporaryDirectory() as folder:
        base = Path(args.base) if args.base else Path(folder) / "base.pt"
        pretrain_loss = None if args.base else train.pretrain_base(base, steps=tier["pretrain_steps"])
        start = time.time()
        calibration = lorascope.calibrate(train.load_base(base), ranks=tuple(tier["kappa_ranks"]),
                                          epochs=tier["calibration_epochs"], seed=args.seed, budget=args.budget,
                                          base="the study's Markov-pretrained tiny Llama", log=print)
        calibration.save(args.calibration)
        seconds = time.time() - start
        probe = Path(folder) / "probe.h5"
        train.train_run({**PROBE, "epochs": tier["epochs"], "base": str(base), "largest": LARGEST,
                         "path": str(probe), "seed": 0})
        model = train.load_base(base)
        old = lorascope.load_calibration(DOCS / "calibration_kappa.json")
        rows = {"probe, kappa(r) with every rate at every load": forecast(model, probe, calibration, results),
                "probe, the study's kappa(r)": forecast(model, probe, old, results),
                "true 8 bits per fact, kappa(r) with every rate at every load": true_bits(calibration, results),
                "true 8 bits per fact, the study's kappa(r)": true_bits(old, results)}
    for name, row in rows.items():
        print(f"{name}: " + ", ".join(f"r{r}: {v['ratio']:.2f}" for r, v in row.items()))
    out = {"command": "python examples/reproduce/kappa_rates.py " + " ".join(argv or sys.argv[1:]),
           "pretrain_loss": pretrain_loss, "calibration_seconds": seconds,
           "kappa": {str(p.rank): p.bits_per_parameter for p in calibration.points},
           "kappa_study": {str(p.rank): p.bits_per_parameter for p in old.points},
           "training": calibration.training, "notes": list(calibration.notes), "ratios": rows}
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def forecast(model: Any, probe: Path, calibration: Any, results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each rank's falloff as ``recommend`` forecasts it from the probe, against the study's measured one."""
    import lorascope

    tier = results["tier"]
    rec = lorascope.recommend(model, examples=LARGEST, ranks=tuple(tier["ranks"]), probes=[str(probe)],
                              epochs=tier["epochs"], calibration=calibration, batch_size=tier["batch_size"])
    return {str(p.rank): against(p.runway_examples, results["falloff"][str(p.rank)]) for p in rec.predictions}


def true_bits(calibration: Any, results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each rank's falloff at the task's true bits per fact: kappa(P(r)) P(r) / 8 facts."""
    from lorascope.analysis.capacity import CapacityConstant

    constant = CapacityConstant.from_calibration(calibration)
    per_rank = results["model"]["lora_parameters_per_rank"]["all-linear"]
    return {str(r): against(constant.capacity_bits(r * per_rank) / train.bits_per_fact(),
                            results["falloff"][str(r)]) for r in results["tier"]["ranks"]}


def against(predicted: float | None, measured: dict[str, Any]) -> dict[str, Any]:
    ratio = predicted / measured["examples"] if predicted is not None and measured["examples"] else None
    return {"predicted": predicted, "measured": measured["examples"], "measured_status": measured["status"],
            "ratio": ratio}


if __name__ == "__main__":
    raise SystemExit(main())
