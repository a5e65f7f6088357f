"""Why the reproduction's probe reads 10.7 bits per 8-bit fact: its first epoch has only 8 optimizer steps.

The probe's marginal rate d is the first-epoch loss after half of the first epoch (docs/information.md). On random
facts each fact is new when first seen, so once the model has learned the format (a value is one of the V value
tokens) the first-epoch loss sits at log2 V = 8 bits; what it pays above that before is a one-time cost. The study's
probe (512 facts, batch 64, learning rate 1e-2) has 8 steps in its first epoch, and its loss at the end of that epoch
was 7.35 nats (10.6 bits), above a uniform guess over the whole vocabulary (9 bits): the format was still being
learned in the second half, so d counts part of the one-time cost as per-fact bits.

This script runs the same probe (same base and facts, 150 epochs: the plan) with more steps in its first epoch (a
smaller batch, more facts) and at lower learning rates, and reads each for the plan with ``lorascope.recommend``: d,
the one-time cost F, a(150) and the bits per fact at the probe's N, as recommend reads them (each step's loss counted
at most at a uniform guess over the 512-token vocabulary, 9 bits: ``step_arrays``) and without that cap. The
truth is 8 bits per fact. The study's probe (the first row, the same facts as the study's: the first 512 of its
4,096) is then asked, as the study's ``--repredict`` asks it, where each rank falls off with the study's calibrated
kappa(r) (docs/reproduction/calibration_kappa.json), against the falloffs the study measured
(docs/reproduction/results.json): a post-hoc prediction, made after the LoRA runs, from the probe and calibration only.

    python examples/reproduce/probe_steps.py --base /path/to/base.pt -o docs/reproduction/probe_steps.json

``--base``: the study's ``base.pt`` (``python examples/reproduce/run.py`` writes it into its output folder); without
it the base is pretrained here as the full mode does (1,500 steps, a minute).
"""

from __future__ import annotations

import argparse
import json
import math
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

PROBES = ((512, 64, 1e-2), (512, 16, 1e-2), (512, 4, 1e-2), (2048, 64, 1e-2), (512, 64, 3e-3), (512, 64, 1e-3))
"""(facts, batch, learning rate): the study's probe; 4x and 16x its first-epoch steps by the batch, 4x by the facts;
its lower learning rates (the study's full fine-tuning grid)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=None, help="the study's base.pt (default: pretrain one)")
    parser.add_argument("-o", "--output", default="probe_steps.json")
    parser.add_argument("--epochs", type=int, default=150, help="the plan's epochs, also each probe's length")
    parser.add_argument("--pretrain-steps", type=int, default=1500, help="the base's pretraining without --base")
    args = parser.parse_args(argv)
    import torch

    import lorascope

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        base = Path(args.base) if args.base else Path(folder) / "base.pt"
        if not args.base:
            train.pretrain_base(base, steps=args.pretrain_steps)
        for facts, batch, lr in PROBES:
            spec = {"experiment": "probe_steps", "target": "full", "rank": 0, "examples": facts, "lr": lr,
                    "batch_size": batch, "epochs": args.epochs}
            path = Path(folder) / f"probe_n{facts}_bs{batch}_lr{lr:g}.h5"
            start = time.time()
            run = train.train_run({**spec, "base": str(base), "largest": LARGEST,
                                   "path": str(path), "seed": 0})
            rec = lorascope.recommend(train.load_base(base), examples=facts, ranks=(1,), probes=[str(path)],
                                      epochs=args.epochs).to_dict()
            bits, planned = rec["bits"], rec["probes"][0]["planned_recipe"]
            uncapped, end_bits = _read(str(path), facts, args.epochs)
            row = {"facts": facts, "batch_size": batch, "lr": lr, "first_epoch_steps": -(-facts // batch),
                   "end_of_first_epoch_loss_bits": end_bits,
                   "code_length_per_example": planned["code_length_per_example"],
                   "one_time_bits": planned["one_time_bits"], "absorbed_per_example": planned["absorbed_per_example"],
                   "bits_per_fact_at_n": bits["bits_per_example"], "truth": train.bits_per_fact(),
                   "uncapped": {"code_length_per_example": uncapped.code_length_per_example,
                                "one_time_bits": uncapped.one_time_bits,
                                "absorbed_per_example": uncapped.absorbed_per_example,
                                "bits_per_fact_at_n": uncapped.estimate().bits(facts) / facts},
                   "bits_held_at_end": run["bits_held"], "seconds": round(time.time() - start, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if (facts, batch, lr) == PROBES[0]:
                predictions = _study_predictions(train.load_base(base), str(path), args.epochs)
    result = {"command": "python examples/reproduce/probe_steps.py " + " ".join(argv or sys.argv[1:]),
              "plan_epochs": args.epochs, "rows": rows, "study_predictions": predictions}
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _study_predictions(model, path: str, epochs: int) -> dict[str, dict[str, float]]:
    """Each rank's predicted falloff from the study's probe and kappa(r), against the study's measured one."""
    import lorascope

    results = json.loads((DOCS / "results.json").read_text())
    ranks = tuple(results["tier"]["ranks"])
    kappa = lorascope.load_calibration(DOCS / "calibration_kappa.json")
    rec = lorascope.recommend(model, examples=LARGEST, ranks=ranks, probes=[path], epochs=epochs, calibration=kappa,
                              batch_size=results["tier"]["batch_size"])
    out = {}
    for p in rec.predictions:
        measured = results["falloff"][str(p.rank)]
        out[str(p.rank)] = {"predicted": p.runway_examples, "measured": measured["examples"],
                            "measured_status": measured["status"],
                            "ratio": p.runway_examples / measured["examples"]}
    print(f"bits per fact {rec.bits.bits_per_example:.3f}; " + ", ".join(
        f"r{r}: {v['predicted']:,.0f} / {v['measured']:,.0f} = {v['ratio']:.2f}" for r, v in out.items()), flush=True)
    return {"bits_per_example": rec.bits.bits_per_example, "one_time_bits": rec.to_dict()["bits"]["one_time_bits"],
            "ranks": out}


def _read(path: str, facts: int, epochs: int) -> tuple[Any, float]:
    """The probe read for the plan without the cap at a uniform guess over the vocabulary, and the token-weighted
    training loss of its first epoch's last quarter (bits per loss token)."""
    from lorascope.analysis.information import step_arrays
    from lorascope.analysis.recipe import Recipe, information_for_recipe
    from lorascope.store import open_run

    with open_run(path) as run:
        steps = run.steps
        uncapped = information_for_recipe(steps, dataset_examples=facts, planned=Recipe(epochs=epochs))
        arrays = step_arrays(steps)
    first = arrays.usable & (arrays.seen <= facts)
    late = first & (arrays.seen > 0.75 * facts)
    late = late if late.any() else first
    end_bits = float((arrays.loss[late] * arrays.tokens[late]).sum() / arrays.tokens[late].sum() / math.log(2))
    return uncapped, end_bits


if __name__ == "__main__":
    raise SystemExit(main())
