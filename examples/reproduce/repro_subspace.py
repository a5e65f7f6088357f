"""Subspaces and intruder dimensions of full fine-tuning against PEFT LoRA at several ranks, on the same data.

The reproduction study's setting (repro_train.py: a Llama pretrained on a Markov language, then fine-tuned on N
random key -> value facts), at a width set by ``--hidden``. Full fine-tuning and all-linear LoRA at each rank are
recorded with ``factors_k`` (the update's top singular vectors) and ``intruder_k`` (intruder cosines of the
weights) at log-spaced snapshots, then read with ``lorascope.analyze``. Printed and written to ``--out``:

(a) intruder dimensions of every run at MATCHED TRAINING LOSS: each run's snapshot whose training loss (mean over
    the last epoch's steps) is closest to the lowest loss every run reaches, and at the final snapshot;
(b) the overlap (phi, principal angles) between each LoRA's final update subspace and full fine-tuning's;
(c) when each run's update subspace settles, per kind.

    python examples/reproduce/repro_subspace.py --out docs/subspace/study.json          # the published study
    python examples/reproduce/repro_subspace.py --smoke                                  # seconds, for the tests
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import repro_train as train  # noqa: E402

import lorascope  # noqa: E402
from lorascope.analysis.intruders import EPS_SWEEP  # noqa: E402
from lorascope.workflows.subspace import subspace_overlap  # noqa: E402

KINDS = ("attention", "mlp")  # what both methods train (full fine-tuning also moves the embedding and the head)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256, help="model width (intermediate: 2x)")
    parser.add_argument("--examples", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--alpha", type=float, default=None,
                        help="LoRA alpha (default 2r, the paper's choice; a number: fixed alpha, scaling alpha/r)")
    parser.add_argument("--full-lr", type=float, default=1e-3)
    parser.add_argument("--lora-lr", type=float, default=3e-3)
    parser.add_argument("--snapshots", type=int, default=16, help="log-spaced snapshots per run (plus one every "
                        "--every epochs, so that losses can be matched late in training too)")
    parser.add_argument("--every", type=int, default=2, help="also a snapshot every this many epochs")
    parser.add_argument("--match", type=float, nargs="*", default=[2.0, 0.5],
                        help="training losses to match besides the lowest every run reaches")
    parser.add_argument("--factors-k", type=int, default=8)
    parser.add_argument("--intruder-k", type=int, default=10)
    parser.add_argument("--grad", action="store_true",
                        help="also record the gradient's singular vectors (grad_sv) and report their overlap")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="a tiny setting that runs in seconds")
    args = parser.parse_args()
    if args.smoke:
        args.hidden, args.examples, args.epochs, args.batch_size = 32, 64, 4, 16
        args.pretrain_steps, args.ranks, args.snapshots, args.every, args.match = 10, [1, 4], 4, 2, [6.0]
    return args


def schedule(steps: int, count: int, every: int) -> list[int]:
    """``count`` log-spaced snapshot steps from the first to the last, and every ``every``-th step (unique)."""
    return sorted({int(round(s)) for s in np.geomspace(1, steps, count)} | set(range(every, steps + 1, every))
                  | {steps})


def train_and_record(base: Path, path: Path, args: argparse.Namespace, rank: int) -> dict[str, Any]:
    """Full fine-tuning (rank 0) or an all-linear PEFT LoRA of ``rank`` on the facts; every run sees the same
    batches in the same order."""
    model = train.load_base(base)
    ids, labels = train.facts(args.examples, args.examples)
    if rank == 0:
        trained: torch.nn.Module = model
        params, lr = list(model.parameters()), args.full_lr
    else:
        import peft

        from lorascope.model.peft_config import make_lora_config, to_peft

        for p in model.parameters():
            p.requires_grad_(False)
        torch.manual_seed(1)  # LoRA's A initialization
        alpha = 2 * rank if args.alpha is None else args.alpha
        config = make_lora_config(model, target="all-linear", rank=rank, alpha=alpha, task_type=None)
        trained = peft.get_peft_model(model, to_peft(config))
        params, lr = [p for p in trained.parameters() if p.requires_grad], args.lora_lr
    optimizer = torch.optim.Adam(params, lr=lr)
    per_epoch = math.ceil(args.examples / args.batch_size)
    steps = args.epochs * per_epoch
    order_generator = torch.Generator().manual_seed(0)
    start = time.time()
    trained.train()
    with lorascope.record(trained, path, optimizer=optimizer, overwrite=True, total_steps=steps,
                          snapshots=schedule(steps, args.snapshots, args.every * per_epoch), factors_k=args.factors_k,
                          intruder_k=args.intruder_k, grad_sv=args.grad, time_budget=None,
                          extra_config={"dataset": {"examples": args.examples}}):
        for _ in range(args.epochs):
            order = torch.randperm(args.examples, generator=order_generator)
            for first in range(0, args.examples, args.batch_size):
                batch = order[first:first + args.batch_size]
                trained(input_ids=ids[batch], labels=labels[batch]).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return {"rank": rank, "lr": lr, "path": str(path), "steps": steps, "per_epoch": per_epoch,
            "trainable_parameters": int(sum(p.numel() for p in params)), "seconds": round(time.time() - start, 1)}


def snapshot_losses(run: lorascope.Run, window: int) -> np.ndarray:
    """Per snapshot, the mean training loss over the ``window`` steps up to it (one epoch: every fact once)."""
    steps, loss = run.steps["step"].values, run.steps["loss"].values.astype(float)
    return np.array([np.nanmean(loss[(steps <= s) & (steps > s - window)]) for s in run.snapshot_index])


def measure(run_info: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """analyze one run: its per-snapshot losses, intruder counts per kind (eps 0.5 and the sweep) per snapshot,
    and when its subspace settles per kind."""
    path = run_info["path"]
    analysis = lorascope.analyze(path, ranks=(args.factors_k,))
    sub = analysis.subspace
    with lorascope.open_run(path) as run:
        losses = snapshot_losses(run, run_info["per_epoch"])
    out: dict[str, Any] = {**run_info, "snapshot_step": [int(s) for s in sub.dynamics.step] if sub and sub.dynamics
                           else [], "snapshot_loss": [round(float(v), 4) for v in losses]}
    if sub is not None and sub.intruders is not None:
        intr = sub.intruders
        pick = np.array([k in KINDS for k in intr.kinds])
        out["intruders"] = {f"{e:g}": {k: [int(v) for v in intr.group_counts(k, e)] for k in KINDS}
                            for e in EPS_SWEEP}
        out["intruder_modules"] = {k: int(sum(1 for kk in intr.kinds if kk == k)) for k in KINDS}
        out["near_chance_modules"] = int((intr.near() & pick).sum())
        out["random_max_cos"] = sorted({round(float(v), 3) for v in intr.baseline()[pick]})
    if sub is not None and sub.dynamics is not None:
        dyn = sub.dynamics
        out["settle"] = {k: {"settle_step": _num(dyn.group(k).settle_step), "modules": dyn.group(k).modules,
                             "settled_before_final": dyn.group(k).settled_early,
                             "phi_to_final": [_num(v, 3) for v in dyn.group(k).phi_final],
                             "grad_phi_to_final": None if dyn.group(k).grad_phi_final is None else
                             [_num(v, 3) for v in dyn.group(k).grad_phi_final]} for k in KINDS}
        out["subspace_rank"] = dyn.rank
    return out


def _num(value: float, digits: int = 1) -> float | None:
    return round(float(value), digits) if np.isfinite(value) else None


def match(run: dict[str, Any], target: float) -> dict[str, Any]:
    """The run's snapshot whose training loss is closest to ``target``, with its intruder counts per eps and kind."""
    i = int(np.nanargmin(np.abs(np.array(run["snapshot_loss"]) - target)))
    return {"snapshot": i, "step": run["snapshot_step"][i] if run["snapshot_step"] else None,
            "loss": run["snapshot_loss"][i],
            "intruders": {e: {k: v[i] for k, v in by.items()} for e, by in run.get("intruders", {}).items()}}


def matched(results: list[dict[str, Any]]) -> float:
    """The lowest training loss every run reaches (its snapshots' smoothed losses)."""
    return max(float(np.nanmin(r["snapshot_loss"])) for r in results)


def main() -> int:
    args = parse()
    torch.set_num_threads(1)
    # The study's model at another width: repro_train reads its shape constants when it builds the model.
    train.HIDDEN, train.INTERMEDIATE = args.hidden, 2 * args.hidden
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base.pt"
        pretrain_loss = train.pretrain_base(base, steps=args.pretrain_steps)
        runs = [train_and_record(base, Path(tmp) / f"r{rank}.h5", args, rank) for rank in [0, *args.ranks]]
        results = [measure(info, args) for info in runs]
        full = runs[0]["path"]
        overlaps = {}
        for info in runs[1:]:
            per_kind = subspace_overlap(full, info["path"], args.factors_k)
            overlaps[str(info["rank"])] = None if per_kind is None else {k: v.to_dict() for k, v in per_kind.items()}
    target = matched(results)
    for r in results:
        r["matched"] = match(r, target)
        # other losses: only the runs that reach them (within 10%) get a snapshot
        r["matched_at"] = {f"{t:g}": match(r, t) if np.nanmin(r["snapshot_loss"]) <= 1.1 * t else None
                           for t in args.match}
    report = {"command": "python examples/reproduce/repro_subspace.py " + " ".join(sys.argv[1:]),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "pretrain_loss": round(pretrain_loss, 4), "matched_loss": round(target, 4), "runs": results,
              "overlap_with_full": overlaps, "seconds": round(time.time() - started, 1)}
    print_report(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def _name(rank: int) -> str:
    return "full" if rank == 0 else f"LoRA r={rank}"


def print_report(report: dict[str, Any]) -> None:
    s = report["settings"]
    alpha = "2r" if s["alpha"] is None else f"{s['alpha']:g}"
    print(f"hidden {s['hidden']}, {s['examples']} facts, {s['epochs']} epochs, batch {s['batch_size']}, LR full "
          f"{s['full_lr']:g} / LoRA {s['lora_lr']:g}, LoRA alpha {alpha}; "
          f"matched training loss {report['matched_loss']:.3f}; {report['seconds']:.0f} s")
    print("\n(a) intruder dimensions (attention + mlp matrices; top-k of each weight) at matched loss | at the end")
    print(f"{'run':<12}{'loss':>7}{'step':>6}" + "".join(f"{'eps=' + e:>9}" for e in ("0.3", "0.5", "0.7"))
          + f"{'final@0.5':>11}{'near chance':>13}")
    for r in report["runs"]:
        m = r["matched"]
        counts = [sum(m["intruders"].get(e, {}).values()) if m["intruders"] else None for e in ("0.3", "0.5", "0.7")]
        final = sum(v[-1] for v in r["intruders"]["0.5"].values()) if "intruders" in r else None
        print(f"{_name(r['rank']):<12}{m['loss']:>7.3f}{m['step']!s:>6}" + "".join(f"{c!s:>9}" for c in counts)
              + f"{final!s:>11}{r.get('near_chance_modules', '-')!s:>13}")
    for t in report["settings"]["match"]:
        print(f"\n    at training loss {t:g} (runs that reach it), intruders at eps=0.5 (0.3 / 0.7):")
        for r in report["runs"]:
            m = r["matched_at"].get(f"{t:g}")
            if m is None:
                print(f"    {_name(r['rank']):<12} never reaches it (lowest {min(r['snapshot_loss']):.3f})")
                continue
            c = {e: sum(m["intruders"].get(e, {}).values()) for e in ("0.3", "0.5", "0.7")}
            print(f"    {_name(r['rank']):<12} loss {m['loss']:.3f} at step {m['step']}: {c['0.5']} "
                  f"({c['0.3']} / {c['0.7']})")
    print("\n(b) overlap of each LoRA's final update subspace with full fine-tuning's top-k (median phi, left/right)")
    for rank, per in report["overlap_with_full"].items():
        if per is None:
            print(f"  r={rank}: no factors")
            continue
        print(f"  r={rank}: " + ", ".join(f"{k} {v['phi']['left']:.2f}/{v['phi']['right']:.2f}"
                                          for k, v in per.items()))
    print("\n(c) settling step (median over modules; phi to the final >= 0.9 on both sides from there on)")
    for r in report["runs"]:
        settle = r.get("settle", {})
        print(f"  {_name(r['rank']):<12} of {r['steps']} steps: " + ", ".join(
            f"{k} {v['settle_step']} ({v['settled_before_final']}/{v['modules']} early)" for k, v in settle.items()))
    if report["settings"].get("grad"):
        print("\n    the gradient's top-k subspace at each snapshot against the final update's (median phi, min of "
              "left/right), at 1/8, 1/4, 1/2 of training")
        for r in report["runs"]:
            steps = np.array(r["snapshot_step"])
            at = [int(np.argmin(np.abs(steps - f * r["steps"]))) for f in (0.125, 0.25, 0.5)]
            print(f"  {_name(r['rank']):<12} " + ", ".join(
                f"{k} " + " / ".join(f"{v['grad_phi_to_final'][i]}" for i in at)
                for k, v in r.get("settle", {}).items() if v.get("grad_phi_to_final")))


if __name__ == "__main__":
    raise SystemExit(main())
