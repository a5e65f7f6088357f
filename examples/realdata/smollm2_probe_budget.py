"""How a LoRA probe's kappa moves with the step budget (issue 13): one slice, one recipe, several budgets.

A LoRA probe (``lorascope.calibration_from_runs``) measures kappa, the bits an adapter holds per parameter, at the
step budget it ran; the forecast then uses it for a run of the planned budget. Every SmolLM2 study so far fixed one
budget, so whether a probe at 64 steps says anything about a run of 128 was not measured. Here, on one slice (SFT,
signature -> docstring, or with ``--task cpt`` continued pretraining on the docstrings' prose; N examples, the
study's block, batch and seed), full fine-tuning and LoRA probes of a few
ranks are trained for each budget in ``--steps``, at the rates the SFT studies used (full 3e-3, LoRA 1e-2), each
recorded with ``lorascope.record``; each probe is read against the full fine-tuning run of its own budget (what the
slice offered at that budget), and the JSON holds, per budget and rank, the bits offered and held, kappa and the
probe's share of full fine-tuning's bits. ``summary`` gives kappa per rank at each budget over kappa at the
smallest: a probe at budget S stands for a run at budget S' only if that ratio is flat between them.

    python examples/realdata/smollm2_probe_budget.py -o smollm2-probe-budget-out --steps 32,64,128,256 \\
        --out docs/realdata/smollm2_probe_budget.json          # ranks 4, 16, 64; 16 runs, 41 min on 2 cores
    python examples/realdata/smollm2_probe_budget.py --task cpt -o smollm2-probe-budget-cpt-out --steps 64,128 \
        --out docs/realdata/smollm2_probe_budget_cpt.json      # the same on continued pretraining, two budgets
    python examples/realdata/smollm2_probe_budget.py --tables docs/realdata/smollm2_probe_budget.json

A finished run is kept in ``<folder>/runs.json`` and not trained again, so an interrupted measurement resumes.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "reproduce"))

import smollm2  # noqa: E402
import smollm2_study as study  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-o", "--folder", type=Path, default=Path("smollm2-probe-budget-out"))
    parser.add_argument("--out", type=Path, default=Path("smollm2_probe_budget.json"))
    parser.add_argument("--cache", type=Path, default=smollm2.DEFAULT_CACHE)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", default="32,64,128", help="the step budgets (default 32,64,128)")
    parser.add_argument("--ranks", default="4,16,64", help="the LoRA probes' ranks (default 4,16,64)")
    parser.add_argument("--examples", type=int, default=256, help="the slice (default 256 examples)")
    parser.add_argument("--lrs", default="3e-3,1e-2", help="full fine-tuning's and LoRA's learning rates")
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--task", choices=("sft", "cpt"), default="sft",
                        help="SFT (signature -> docstring) or continued pretraining (default sft)")
    parser.add_argument("--tables", type=Path, metavar="JSON", help="print the table of a written JSON")
    args = parser.parse_args(argv)
    if args.tables:
        print(table(json.loads(args.tables.read_text())))
        return 0
    try:
        budgets = sorted({int(s) for s in args.steps.split(",")})
        ranks = sorted({int(r) for r in args.ranks.split(",")})
        full_lr, lora_lr = (float(x) for x in args.lrs.split(","))
    except ValueError:
        parser.error(f"--steps and --ranks take integers, --lrs two rates; got {args.steps!r}, {args.ranks!r}, "
                     f"{args.lrs!r}")
    if min(budgets) < 2 or min(ranks) < 1 or args.examples < 4 * study.BATCH:
        parser.error(f"budgets of 2 steps or more, ranks of 1 or more, and a slice of {4 * study.BATCH} examples or "
                     "more (two steps in its first epoch's second half, to measure what a run absorbed)")
    import torch

    import lorascope

    torch.set_num_threads(args.threads)
    started = time.time()

    def say(line: str) -> None:
        print(f"[{time.time() - started:6.0f} s] {line}", flush=True)

    base, tokenizer = smollm2.load(args.cache)
    study.SIZES, study.SEED = (args.examples,), args.seed
    task = (study.supervised if args.task == "sft" else study.continued_pretraining)(base, tokenizer, args.cache)
    say(f"data {task.info}")
    args.folder.mkdir(parents=True, exist_ok=True)
    runs_file = args.folder / "runs.json"
    done: dict[str, dict[str, Any]] = json.loads(runs_file.read_text()) if runs_file.is_file() else {}

    def run(steps: int, spec: study.RunSpec) -> tuple[Path, dict[str, Any]]:
        name, path = f"steps{steps}_{spec.name}", args.folder / "runs" / f"steps{steps}_{spec.name}.h5"
        if name not in done:
            path.parent.mkdir(exist_ok=True)
            study.STEPS = steps
            say(f"{name} ...")
            result = study.train_run(base, spec, task, path)
            done[name] = {k: v for k, v in result.items() if k != "path"}
            runs_file.write_text(json.dumps(done, indent=1) + "\n")
            say(f"{name}: train loss {result['train_loss']:.4f} ({result['seconds']:.0f} s)")
        return path, done[name]

    rows = []
    for steps in budgets:
        full, full_result = run(steps, study.RunSpec("full", 0, args.examples, full_lr))
        for rank in ranks:
            probe, probe_result = run(steps, study.RunSpec("all-linear", rank, args.examples, lora_lr))
            calibration = lorascope.calibration_from_runs([probe], [full])
            point = calibration.points[0]
            rows.append({"steps": steps, "rank": rank, "lora_parameters": point.lora_parameters,
                         "bits_offered": point.bits_offered, "bits_stored": point.bits_stored,
                         "kappa": point.bits_per_parameter, "share_of_full": point.bits_stored / point.bits_offered,
                         "saturated": point.saturated, "learned": point.learned, "notes": calibration.notes,
                         "train_loss": probe_result["train_loss"], "full_train_loss": full_result["train_loss"]})
    result = {"command": shlex.join(["python", "examples/realdata/smollm2_probe_budget.py",
                                     *(sys.argv[1:] if argv is None else argv)]),
              "data": task.info, "examples": args.examples, "seed": args.seed,
              "lrs": {"full": full_lr, "lora": lora_lr}, "batch": study.BATCH, "rows": rows, "summary": summary(rows),
              "wall_seconds": sum(r["seconds"] for r in done.values())}
    args.out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    print(table(result))
    return 0


def summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per rank: kappa at each budget over kappa at the smallest budget (1.0 there)."""
    out: dict[str, dict[str, float]] = {}
    for rank in sorted({r["rank"] for r in rows}):
        mine = sorted((r for r in rows if r["rank"] == rank), key=lambda r: r["steps"])
        out[str(rank)] = {str(r["steps"]): r["kappa"] / mine[0]["kappa"] for r in mine}
    return out


def table(result: dict[str, Any]) -> str:
    lines = ["| steps | rank | P(r) | bits offered (full FT) | bits held | share of full | kappa | kappa / kappa at "
             f"{min(r['steps'] for r in result['rows'])} steps |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['steps']} | {r['rank']} | {r['lora_parameters']:,} | {r['bits_offered']:,.0f} | "
                     f"{r['bits_stored']:,.0f} | {r['share_of_full']:.0%} | {r['kappa']:.3f} | "
                     f"{result['summary'][str(r['rank'])][str(r['steps'])]:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
