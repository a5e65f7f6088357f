"""A spot check past the study's grid: full fine-tuning and LoRA at one larger dataset size, after the study.

Uses a finished study's base model and corpora (``realdata-out/`` by default), one seed, each method at the
learning rates that were best at the study's largest N (full fine-tuning: 1e-3 and 3e-3; LoRA: 3e-3), so no
learning-rate sweep: the shares it gives are a check of the trend of the study's tables, not a grid point of
them. Writes ``larger_n.json`` into the study's folder.

    python examples/realdata/larger_n.py [-o realdata-out] [--examples 4096]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpora  # noqa: E402
import run  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="realdata-out", help="the finished study's folder")
    parser.add_argument("--examples", type=int, default=4096)
    parser.add_argument("--ranks", default="1,16,64")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    out = Path(args.output)
    summary = json.loads((out / "results.json").read_text())
    tier = run.Tier(**{k: tuple(v) if isinstance(v, list) else v for k, v in summary["tier"].items()})
    pool, held = corpora.split_b(corpora.corpus_b(), tier.held_out)
    base_path = out / "base.pt"
    base = run.load_base(tier, base_path)
    n = args.examples
    start_train, start_held = run.mean_loss(base, pool[:n]), run.mean_loss(base, held)
    folder = out / "runs_larger_n"
    folder.mkdir(exist_ok=True)
    specs = [run.RunSpec("full", 0, n, lr, 0) for lr in (1e-3, 3e-3)]
    specs += [run.RunSpec("all-linear", int(r), n, 3e-3, 0) for r in args.ranks.split(",")]
    runs = []
    for spec in specs:
        started = time.time()
        r = run.train_run(tier, spec, base_path, pool, held, folder / f"{spec.name}.h5")
        runs.append({k: v for k, v in r.items() if k != "path"})
        print(f"{spec.name}: train {r['train_loss']:.3f}, held-out {r['held_loss']:.3f} "
              f"({time.time() - started:.0f} s)")
    full = [r for r in runs if r["target"] == "full"]
    best = {c: min(full, key=lambda r, c=c: r[c]) for c in ("train_loss", "held_loss")}
    shares = {}
    for r in runs:
        if r["target"] == "full":
            continue
        shares[r["rank"]] = {
            "train": (start_train - r["train_loss"]) / (start_train - best["train_loss"]["train_loss"]),
            "held": (start_held - r["held_loss"]) / (start_held - best["held_loss"]["held_loss"])}
        share = shares[r["rank"]]
        print(f"rank {r['rank']}: share train {share['train']:.2f}, held-out {share['held']:.2f}")
    result = {"examples": n, "seed": 0, "base_losses": {"train": start_train, "held": start_held},
              "full_best_lr": {c: best[c]["lr"] for c in best}, "shares": shares, "runs": runs,
              "note": "one seed, no learning-rate sweep for LoRA (3e-3, best at N=1024 for every rank)",
              "per_seq_bits_factor": (corpora.SEQ_LEN - 1) / math.log(2)}
    (out / "larger_n.json").write_text(json.dumps(run._jsonable(result), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
