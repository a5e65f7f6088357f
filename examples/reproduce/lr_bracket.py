"""The reproduction's learning-rate grid extended until every optimum is interior.

The full mode's grid (1e-3, 3e-3, 1e-2 for full fine-tuning and LoRA alike) left every full fine-tuning optimum at
its top and 19 of 36 LoRA optima at an end (docs/reproduction.md), so its learning-rate ratio (0.37x) was a bound and
its falloffs were read at rates that may not be each condition's best. This script takes the study's sweep
(docs/reproduction/results.json: every run's final loss), and for each condition (method, rank, N) whose best rate
(lowest final loss, as the study chooses) is an end of the rates tried, trains the next rate past it on the
half-decade ladder (..., 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, ...), the same run the study would have trained (same
base, facts, order, seed: ``repro_train.train_run``), and repeats until the best is interior or
``--max-extensions`` rates were added past an end. It first reruns one of the study's runs to show that a rerun
reproduces it. Then it recomputes, as the study does: each condition's best rate, the LoRA / full fine-tuning rate
ratio, the bits each rank holds as a share of full fine-tuning's, and the falloffs.

    python examples/reproduce/lr_bracket.py --base /path/to/base.pt -o docs/reproduction/lr_bracket.json

``--base``: the study's ``base.pt``; without it the base is pretrained as the full mode does (1,500 steps; its loss
matches the study's, 4.6213). ``--jobs 2``: two runs at a time, one thread each.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import repro_measure as measure  # noqa: E402
import repro_train as train  # noqa: E402

DOCS = Path(__file__).resolve().parents[2] / "docs" / "reproduction"
RUN_FIELDS = ("experiment", "target", "rank", "examples", "lr", "batch_size", "epochs")
CHECK_RUN = "all-linear_r1_n128_bs64_e750_lr0.01"
"""The study's run rerun first: a rerun must reproduce it."""


def ladder_step(lr: float, up: bool) -> float:
    """The next rate on the half-decade ladder 1, 3, 10, 30, ... x 10^k, above or below ``lr``."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = lr / 10 ** exponent
    rungs = [1.0, 3.0, 10.0] if up else [3.0, 1.0, 0.3]
    rung = next(r for r in rungs if (r > mantissa * (1 + 1e-6) if up else r < mantissa * (1 - 1e-6)))
    return float(f"{rung * 10 ** exponent:.1e}")


def conditions(runs: Iterable[Mapping[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """The sweep's runs by condition (target, rank, N, batch, epochs)."""
    out: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        if run["experiment"] == "sweep":
            out.setdefault(measure.condition(run), []).append(dict(run))
    return out


def best_and_edge(runs: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], str | None]:
    """The condition's best run (lowest final loss, ties to the smaller rate) and whether it is an end of its rates."""
    best = measure.best_per_condition(runs)[measure.condition(runs[0])]
    return best, measure.lr_grid_edge(best, sorted(r["lr"] for r in runs))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=None, help="the study's base.pt (default: pretrain one)")
    parser.add_argument("-o", "--output", default="lr_bracket.json")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--max-extensions", type=int, default=2, help="rates added past an end, per condition")
    args = parser.parse_args(argv)

    results = json.loads((DOCS / "results.json").read_text())
    tier = results["tier"]
    largest = max(tier["sizes"])
    by_condition = conditions(results["runs"])
    study_runs = {run["name"]: run for runs in by_condition.values() for run in runs}
    added: list[dict[str, Any]] = []
    start = time.time()
    with tempfile.TemporaryDirectory() as folder, ProcessPoolExecutor(args.jobs) as pool:
        base = Path(args.base) if args.base else Path(folder) / "base.pt"
        pretrain_loss = None if args.base else train.pretrain_base(base, steps=tier["pretrain_steps"])

        def job(spec: Mapping[str, Any]) -> dict[str, Any]:
            name = train.RunSpec(**{k: spec[k] for k in RUN_FIELDS}).name
            return {**{k: spec[k] for k in RUN_FIELDS}, "base": str(base), "largest": largest, "seed": 0,
                    "path": str(Path(folder) / f"{name}.h5")}

        rerun = pool.submit(train.train_run, job(study_runs[CHECK_RUN])).result()
        check = {"run": CHECK_RUN, "study_final_loss": study_runs[CHECK_RUN]["final_loss"],
                 "rerun_final_loss": rerun["final_loss"], "study_bits_held": study_runs[CHECK_RUN]["bits_held"],
                 "rerun_bits_held": rerun["bits_held"]}
        print(f"rerun of {CHECK_RUN}: {check}", flush=True)
        for round_ in range(args.max_extensions):
            todo = []
            for runs in by_condition.values():
                best, edge = best_and_edge(runs)
                if edge:
                    todo.append({**best, "lr": ladder_step(best["lr"], up=edge == "high")})
            print(f"round {round_ + 1}: {len(todo)} conditions at an end", flush=True)
            if not todo:
                break
            for spec, result in zip(todo, pool.map(train.train_run, [job(s) for s in todo])):
                row = {**{k: result[k] for k in (*RUN_FIELDS, "name", "steps", "final_loss", "bits_held",
                                                "seconds")}, "added": True}
                by_condition[measure.condition(spec)].append(row)
                added.append(row)
                print(f"{row['name']}: loss {row['final_loss']:.4g}, holds {row['bits_held']:.0f}", flush=True)
    out = summarize(by_condition, tier, results)
    out.update({"command": "python examples/reproduce/lr_bracket.py " + " ".join(argv or sys.argv[1:]),
                "pretrain_loss": pretrain_loss, "seconds": time.time() - start, "rerun_check": check,
                "added_runs": added})
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def summarize(by_condition: Mapping[tuple, Sequence[Mapping[str, Any]]], tier: Mapping[str, Any],
              results: Mapping[str, Any]) -> dict[str, Any]:
    """Each condition's best rate over the extended grid, the rate ratio, held shares and falloffs, as the study
    computes them, with the study's own numbers beside them."""
    best = {key: best_and_edge(runs) for key, runs in by_condition.items()}
    batch = tier["batch_size"]

    def cell(target: str, rank: int, n: int) -> tuple[dict[str, Any], str | None]:
        return next(v for (t, r, size, b, _), v in best.items() if (t, r, size, b) == (target, rank, n, batch))

    full = {n: cell("full", 0, n)[0] for n in tier["sizes"]}
    lora = {(r, n): cell("all-linear", r, n)[0] for r in tier["ranks"] for n in tier["sizes"]}
    rows = [{"target": t, "rank": r, "examples": n, "lrs": sorted(run["lr"] for run in by_condition[key]),
             "best_lr": b["lr"], "edge": edge, "final_loss": b["final_loss"], "bits_held": b["bits_held"]}
            for key, (b, edge) in sorted(best.items()) for (t, r, n, *_) in [key]]
    ratios = []
    for (rank, n), run in sorted(lora.items()):
        ratios.append({"rank": rank, "examples": n, "ratio": run["lr"] / full[n]["lr"]})
    held = {r: {n: lora[r, n]["bits_held"] / full[n]["bits_held"] if full[n]["bits_held"] > 0 else 1.0
                for n in tier["sizes"]} for r in tier["ranks"]}
    falloff = {str(r): measure.crossing(held[r]) for r in tier["ranks"]}
    return {
        "conditions": rows,
        "at_an_end": sum(row["edge"] is not None for row in rows),
        "lr_ratio_geometric_mean": measure.geometric_mean(row["ratio"] for row in ratios),
        "lr_ratio_by_rank": {str(r): measure.geometric_mean(x["ratio"] for x in ratios if x["rank"] == r)
                             for r in tier["ranks"]},
        "full_best_lr": {str(n): full[n]["lr"] for n in tier["sizes"]},
        "full_held_share": {str(n): full[n]["bits_held"] / (n * train.bits_per_fact()) for n in tier["sizes"]},
        "held": {str(r): {str(n): v for n, v in h.items()} for r, h in held.items()},
        "falloff": falloff,
        "study": {"lr_ratio_geometric_mean": results["lr"]["ratio_geometric_mean"],
                  "falloff": results["falloff"]},
    }


if __name__ == "__main__":
    raise SystemExit(main())
