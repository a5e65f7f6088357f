"""The batch-size experiment on real text: full fine-tuning and LoRA at several batch sizes, the same epochs, each
learning-rate grid extended until its optimum is interior (issue 13, item 3).

LoRA Without Regret reports that LoRA's loss penalty against full fine-tuning grows with the batch size, nearly
independently of the rank, and that LoRA's best learning rate is about 10x full fine-tuning's. The reproduction
study measured both on random facts with grids that did not bracket the optima; this measures them on the
real-data study's setting (a byte-level Llama pretrained on the standard library's docstrings, fine-tuned on the
scientific libraries' documentation, docs/realdata.md): N sequences, 5 epochs at every batch size (so a larger
batch takes fewer steps, as in the paper), one seed. For every (batch size, method) the grid starts at 1e-3 and
3e-3 and is extended along the study's ladder (at most two steps per side) while the best run by training or by
held-out loss sits at an edge.

The base is the study's (``base.pt`` in ``--output`` when a finished study is there), else pretrained there first
with the study's recipe. Writes ``batch_size.json`` into ``--output``; ``--tables FILE`` prints its tables.

    python examples/realdata/batch_size.py -o realdata-out    # ~9 minutes on one core (518 s measured, shared)
    python examples/realdata/batch_size.py --tables docs/realdata/batch_size.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpora  # noqa: E402
import run  # noqa: E402

START_GRID = (1e-3, 3e-3)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="realdata-out", help="folder with (or for) the study's base.pt")
    parser.add_argument("--examples", type=int, default=1024)
    parser.add_argument("--batches", default="16,64,256")
    parser.add_argument("--ranks", default="4,16")
    parser.add_argument("--smoke", action="store_true", help="the study's smoke tier (seconds; numbers meaningless)")
    parser.add_argument("--tables", metavar="JSON", help="print the tables of a batch_size.json and exit")
    args = parser.parse_args(argv)
    if args.tables:
        path = Path(args.tables)
        if not path.is_file():
            print(f"error: {path} does not exist", file=sys.stderr)
            return 2
        print(markdown(json.loads(path.read_text())), end="")
        return 0
    try:
        batches = [int(b) for b in args.batches.split(",")]
        ranks = [int(r) for r in args.ranks.split(",")]
    except ValueError:
        print(f"error: --batches and --ranks take comma-separated integers, got {args.batches!r} and {args.ranks!r}",
              file=sys.stderr)
        return 2
    result = experiment(Path(args.output), run.TIERS["smoke" if args.smoke else "default"], args.examples, batches,
                        ranks)
    print(markdown(result), end="")
    return 0


def experiment(out: Path, tier: run.Tier, n: int, batches: Sequence[int], ranks: Sequence[int]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    pool, held = corpora.split_b(corpora.corpus_b(), tier.held_out)
    base_path = out / "base.pt"
    if not base_path.is_file():
        text_a = corpora.encode("\n\n".join(doc for _, doc in corpora.corpus_a()))
        run.pretrain(tier, text_a, base_path)
    base = run.load_base(tier, base_path)
    base_losses = {"train": run.mean_loss(base, pool[:n]), "held": run.mean_loss(base, held)}
    folder = out / "runs_batch"
    folder.mkdir(exist_ok=True)
    runs: list[dict[str, Any]] = []
    for batch in batches:
        at_batch = dataclasses.replace(tier, batch_size=batch, min_steps=0)  # the same epochs at every batch size
        for target, rank in [("full", 0), *(("all-linear", r) for r in ranks)]:
            runs += bracketed(at_batch, run.RunSpec(target, rank, n, START_GRID[0], 0), base_path, pool, held,
                              folder)
    document = {"examples": n, "epochs": tier.epochs, "batches": list(batches), "ranks": list(ranks), "seed": 0,
                "base_losses": base_losses, "rows": summarize(runs, batches, ranks, base_losses),
                "runs": [{k: v for k, v in r.items() if k != "path"} for r in runs],
                "seconds": time.time() - started}
    (out / "batch_size.json").write_text(json.dumps(run._jsonable(document), indent=2, allow_nan=False) + "\n")
    return document


def bracketed(tier: run.Tier, spec: run.RunSpec, base: Path, pool: Any, held: Any, folder: Path
              ) -> list[dict[str, Any]]:
    """``spec`` at the start grid's learning rates, extended as the study extends its grids
    (:func:`run.extend_grid`)."""

    def train(lr: float) -> dict[str, Any]:
        s = dataclasses.replace(spec, lr=lr)
        path = folder / f"{s.name}_bs{tier.batch_size}.h5"
        r = {**run.train_run(tier, s, base, pool, held, path), "batch_size": tier.batch_size}
        print(f"bs {tier.batch_size} {s.name}: train {r['train_loss']:.3f}, held-out {r['held_loss']:.3f} "
              f"({r['steps']} steps, {r['seconds']:.1f} s)", flush=True)
        return r

    return run.extend_grid(START_GRID, train)


def summarize(runs: Sequence[dict[str, Any]], batches: Sequence[int], ranks: Sequence[int],
              base_losses: dict[str, float]) -> list[dict[str, Any]]:
    """Per batch size and rank: the best full fine-tuning and LoRA run by each loss, the gap, the share of full
    fine-tuning's loss reduction the LoRA holds, the learning-rate ratio, and whether each optimum is interior."""
    rows = []
    for batch in batches:
        full = [r for r in runs if r["batch_size"] == batch and r["target"] == "full"]
        for rank in ranks:
            lora = [r for r in runs if r["batch_size"] == batch and r["rank"] == rank and r["target"] != "full"]
            row: dict[str, Any] = {"batch_size": batch, "rank": rank, "steps": lora[0]["steps"]}
            for loss, key in (("train", "train_loss"), ("held", "held_loss")):
                f, b = min(full, key=lambda r: r[key]), min(lora, key=lambda r: r[key])
                reduction = base_losses[loss] - f[key]
                row[loss] = {"full_loss": f[key], "lora_loss": b[key], "gap": b[key] - f[key],
                             "share": (base_losses[loss] - b[key]) / reduction if reduction > 0 else math.nan,
                             "full_lr": f["lr"], "lora_lr": b["lr"], "lr_ratio": b["lr"] / f["lr"],
                             "full_edge": run._edge(f["lr"], sorted(r["lr"] for r in full)),
                             "lora_edge": run._edge(b["lr"], sorted(r["lr"] for r in lora))}
            rows.append(row)
    return rows


def markdown(result: dict[str, Any]) -> str:
    """The experiment's tables: per batch size and rank, on training and on held-out loss."""
    lines = [f"N = {result['examples']:,} sequences, {result['epochs']} epochs at every batch size, seed "
             f"{result['seed']}; base loss {result['base_losses']['train']:.3f} (training sequences), "
             f"{result['base_losses']['held']:.3f} (held-out), nats per byte.", ""]
    for loss, title in (("train", "training loss"), ("held", "held-out loss")):
        lines += [f"On {title} (each method at its best learning rate for this loss; * the optimum sits at an end "
                  "of the ladder or of the extensions allowed):", "",
                  "| batch | steps | rank | full | LoRA | gap | share | full LR | LoRA LR | LoRA LR / full LR |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in result["rows"]:
            c = row[loss]
            lines.append(f"| {row['batch_size']} | {row['steps']} | {row['rank']} | {c['full_loss']:.3f} | "
                         f"{c['lora_loss']:.3f} | {c['gap']:+.3f} | {c['share']:.2f} | {c['full_lr']:g}"
                         f"{'*' if c['full_edge'] else ''} | {c['lora_lr']:g}{'*' if c['lora_edge'] else ''} | "
                         f"{c['lr_ratio']:.3g} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
