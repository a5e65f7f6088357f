"""kappa from LoRA probes on the data itself, at the study's step budget: a forecast for ranks no probe ran.

The step-budget study (``smollm2_study.py --steps 128``) read kappa(P) measured on random facts at a plateau; its
forecast was right at ranks 1 and 4 and 2.4x late at rank 16, and random facts trained for the same few steps do
not stand in for text (docs/realdata_smollm2.md, "kappa at the step budget"). Here kappa is measured where it is
used: LoRA probes (by default of ranks 1, 2 and 4, on the full probes' largest slice; ``--probe-ranks``,
``--probe-size``) at the study's recipe (its steps, batch 16, its LoRA learning rate), read by
``lorascope.calibration_from_runs`` (what each absorbed over its LoRA parameters). A probe the study did not run
(rank 2 by default) is trained here. Then, in order:

1. the forecast for ranks 1, 2, 4, 16 and the new rank (``lorascope.analyze`` of the study's two full probes with
   that kappa) is written to ``<out>_predictions.json`` before any run of the new rank, with the count of its runs
   that existed then (kept: a rerun reads it, never rewrites it);
2. the new rank (``--new-rank``, default 64; 0: none) is trained at N = 64, 128, 256 and 512 (full fine-tuning at
   512 too; the study stopped at 256), each at the study's rates, and its falloff measured as the study measures it
   (the first N where LoRA holds under 90% of full fine-tuning's training-loss gain, log-interpolated);
3. the forecast is set against the falloffs: ranks 1, 4 and 16 from the study's JSON (rank 16 not probed: an
   extrapolation), the new rank measured here; beside it the forecast today's lorascope gives from the same probes
   (``forecast_now``), and each studied rank's kappa from its own probe on the slice (``own_rank``: a consistency
   check, not a forecast).

The CPT predictions were written with the lorascope of that moment (kappa(P) a power law fitted over the probes and
extrapolated); today's reads the probes as a capacity saturating with P (docs/capacity.md, "Capacity at a step
budget"); ``--renew`` recomputes a written JSON's ``forecast_now`` with it, from the JSON and the study's alone.

    python examples/realdata/smollm2_study.py --steps 128 --sizes 16,32,64,128,256 --probe-sizes 64,128 \\
        --lrs 3e-3,1e-2 --kappa docs/realdata/smollm2_calibration_alllinear_load2.json -o smollm2-steps128-out \\
        --report docs/realdata/smollm2_steps128.json                    # the study (51 min), its run files
    python examples/realdata/smollm2_lora_probes.py smollm2-steps128-out docs/realdata/smollm2_steps128.json \\
        --out docs/realdata/smollm2_lora_probes.json                    # ~30 min on 2 cores
    python examples/realdata/smollm2_lora_probes.py smollm2-steps128-out docs/realdata/smollm2_steps128.json \\
        --probe-ranks 16,64 --probe-size 256 --new-rank 32 --new-sizes 64,128,256 \\
        --out docs/realdata/smollm2_lora_probes_r32.json               # rank 32 between probes of 16 and 64
    python examples/realdata/smollm2_lora_probes.py smollm2-sft-steps-seed1-out \\
        docs/realdata/smollm2_sft_steps_seed1.json --new-rank 0 --out docs/realdata/smollm2_lora_probes_sft_seed1.json
    python examples/realdata/smollm2_lora_probes.py --tables docs/realdata/smollm2_lora_probes.json
    python examples/realdata/smollm2_lora_probes.py --renew docs/realdata/smollm2_lora_probes.json  # forecast_now
    python examples/realdata/smollm2_lora_probes.py --remeasure docs/realdata/smollm2_lora_probes.json  # falloffs
        # and verdicts read again from the study's JSON and the held shares (a share below 0: diverged, left out)

To predict the study's own ranks before any of their runs, stop the study after its full fine-tuning runs, write the
forecast, then finish the study and compare (SFT, a third seed, full fine-tuning at a stable 3e-3):

    python examples/realdata/smollm2_study.py --task sft --steps 64 --sizes 16,32,64,128,256 --probe-sizes 64,128 \
        --seed 2 --lrs 3e-3,1e-2 --kappa docs/realdata/smollm2_calibration_alllinear_load2.json \
        -o smollm2-sft-seed2-out --stop-before-lora
    python examples/realdata/smollm2_lora_probes.py smollm2-sft-seed2-out smollm2-sft-seed2-out/results.json \
        --new-rank 0 --out docs/realdata/smollm2_lora_probes_sft_seed2.json --predict-only
    python examples/realdata/smollm2_study.py --task sft --steps 64 --sizes 16,32,64,128,256 --probe-sizes 64,128 \
        --seed 2 --lrs 3e-3,1e-2 --kappa docs/realdata/smollm2_calibration_alllinear_load2.json \
        -o smollm2-sft-seed2-out --report docs/realdata/smollm2_sft_steps_seed2.json
    python examples/realdata/smollm2_lora_probes.py smollm2-sft-seed2-out docs/realdata/smollm2_sft_steps_seed2.json \
        --new-rank 0 --out docs/realdata/smollm2_lora_probes_sft_seed2.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "reproduce"))

import repro_measure as measure  # noqa: E402
import smollm2  # noqa: E402
import smollm2_study as study  # noqa: E402

PROBE_RANKS = (1, 2, 4)
NEW_RANK = 64
NEW_SIZES = (64, 128, 256, 512)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", nargs="?", type=Path, help="the step-budget study's output folder (its run files)")
    parser.add_argument("report", nargs="?", type=Path, help="the study's results JSON")
    parser.add_argument("--out", type=Path, default=Path("smollm2_lora_probes.json"))
    parser.add_argument("--cache", type=Path, default=smollm2.DEFAULT_CACHE)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-rank", type=int, default=NEW_RANK,
                        help=f"the rank trained after the forecast is written (default {NEW_RANK}; 0: none)")
    parser.add_argument("--probe-ranks", default=",".join(map(str, PROBE_RANKS)), help="the LoRA probes' ranks")
    parser.add_argument("--probe-size", type=int, help="the probes' slice (default: the largest full probe's)")
    parser.add_argument("--new-sizes", default=",".join(map(str, NEW_SIZES)), help="where the new rank runs")
    parser.add_argument("--predict-only", action="store_true",
                        help="write the forecast (<out>_predictions.json) and stop: for a study stopped before its "
                             "LoRA runs (smollm2_study.py --stop-before-lora), so that its ranks are predicted first")
    parser.add_argument("--tables", type=Path, metavar="JSON", help="print the markdown tables of a written JSON")
    parser.add_argument("--remeasure", type=Path, metavar="JSON", help="recompute a written JSON's falloffs and "
                        "verdicts, in place, from its study's JSON and its own held shares (after a change of the "
                        "measurement rule); the forecasts are kept")
    parser.add_argument("--renew", type=Path, metavar="JSON", help="recompute a written JSON's forecast_now (today's "
                        "lorascope on its probes and the study's growth law: no run, no weights) and its verdicts")
    args = parser.parse_args(argv)
    if args.tables:
        print(tables(json.loads(args.tables.read_text())))
        return 0
    if args.remeasure or args.renew:
        remeasure(args.remeasure or args.renew, renew=bool(args.renew))
        print(tables(json.loads((args.remeasure or args.renew).read_text())))
        return 0
    if args.folder is None or args.report is None:
        parser.error("give the study's folder and its results JSON")
    import torch

    import lorascope
    from lorascope.analysis.capacity import CapacityConstant
    from lorascope.workflows.runs import information_from_run

    report = json.loads(args.report.read_text())
    training = report["training"]
    full_lr, lora_lr = training["full_lrs"][0], training["lora_lrs"][0]
    if not training.get("fixed_lrs") or training["steps"] is None:
        raise SystemExit("smollm2_lora_probes: the study must be a step-budget study with one rate per method (--lrs)")
    study.STEPS, study.SEED = training["steps"], training["seed"] or 0
    probe_ranks = tuple(int(r) for r in args.probe_ranks.split(","))
    new_sizes = tuple(int(n) for n in args.new_sizes.split(",")) if args.new_rank else ()
    study.SIZES = tuple(sorted({*report["data"]["sizes"], *new_sizes}))
    torch.set_num_threads(args.threads)
    started = time.time()

    def say(line: str) -> None:
        print(f"[{time.time() - started:6.0f} s] {line}", flush=True)

    base, tokenizer = smollm2.load(args.cache)
    sft = report["data"]["task"].startswith("SFT")
    task = (study.supervised if sft else study.continued_pretraining)(base, tokenizer, args.cache)
    runs, results_file = args.folder / "runs", args.folder / "lora_probe_runs.json"
    results: dict[str, dict[str, Any]] = json.loads(results_file.read_text()) if results_file.is_file() else {}

    def run(target: str, rank: int, n: int, lr: float) -> Path:
        spec = study.RunSpec(target, rank, n, lr)
        if spec.name not in results and spec.name not in report["runs"]:
            say(f"{spec.name} ...")
            results[spec.name] = {k: v for k, v in study.train_run(base, spec, task, runs / f"{spec.name}.h5").items()
                                  if k != "path"}
            results_file.write_text(json.dumps(results, indent=1) + "\n")
            say(f"{spec.name}: train loss {results[spec.name]['train_loss']:.4f} "
                f"({results[spec.name]['seconds']:.0f} s)")
        return runs / f"{spec.name}.h5"

    def train_loss(target: str, rank: int, n: int, lr: float) -> float:
        name = study.RunSpec(target, rank, n, lr).name
        return float((results.get(name) or report["runs"][name])["train_loss"])

    probe_n = args.probe_size or max(int(n) for n in report["predictions"]["probes"])
    full_probes = [runs / f"{p['name']}.h5" for p in report["predictions"]["probes"].values()]
    lora_probes = [run("all-linear", r, probe_n, lora_lr) for r in probe_ranks]
    calibration = lorascope.calibration_from_runs(lora_probes, [runs / f"full_n{probe_n}_lr{full_lr:g}.h5"])
    constant = CapacityConstant.from_calibration(calibration)
    ranks = tuple(sorted({1, 4, 16, *probe_ranks, *([args.new_rank] if args.new_rank else [])}))
    forecast = lorascope.analyze(full_probes, ranks=ranks, constant=constant).to_dict()["forecast"]
    rows = {row["rank"]: row for row in forecast["rows"] if row["target"] == "all-linear"}
    predictions = {
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "new_rank": args.new_rank, "new_rank_runs_before": len(list(runs.glob(f"lora_r{args.new_rank}_*.h5")))
        if args.new_rank else None,
        "study_lora_runs_before": sum(not name.startswith("full") for name in report["runs"]),
        "calibration": calibration.to_dict(), "constant": constant.to_dict(),
        "forecast": {r: {"examples": rows[r]["runway_examples"], "range": rows[r]["runway_range"],
                         "lora_parameters": rows[r]["lora_parameters"], "capacity_bits": rows[r]["capacity_bits"],
                         "kappa": rows[r]["capacity_bits"] / rows[r]["lora_parameters"]} for r in ranks}}
    predictions_file = args.out.with_name(args.out.stem + "_predictions.json")
    if not predictions_file.exists():  # written once, before the new rank's runs
        predictions_file.write_text(json.dumps(predictions, indent=1, allow_nan=False) + "\n")
    predictions = json.loads(predictions_file.read_text())
    say("forecast: " + ", ".join(f"r{r} {v['examples']:,.0f}" for r, v in predictions["forecast"].items()))
    if args.predict_only:
        say(f"forecast written to {predictions_file}; run the study's LoRA runs, then this command without "
            "--predict-only")
        return 0
    if report["measured"] is None:
        raise SystemExit("smollm2_lora_probes: the study has no LoRA run yet (it stopped before them): finish it, "
                         "or pass --predict-only")

    base_train = {int(n): v for n, v in report["base_losses"]["train"].items()}
    for n in new_sizes:
        if n not in base_train:
            tail = smollm2.trainable_tail(base)
            base_train[n] = study.mean_loss(tail, task.states[:n], task.labels[:n])
        run("full", 0, n, full_lr)
        run("all-linear", args.new_rank, n, lora_lr)
    # a consistency check, not a forecast: each studied rank's kappa from its own probe on the same slice
    reference = runs / f"full_n{probe_n}_lr{full_lr:g}.h5"
    info = information_from_run(reference, dataset_examples=probe_n)
    slice_ = {"examples": probe_n, "full_code_length_bits": info.description_length_bits,
              "full_absorbed_bits": info.absorbed_bits, "full_notes": info.notes}
    own = {}
    for r in (1, 4, 16, *([args.new_rank] if args.new_rank else [])):
        probe = run("all-linear", r, probe_n, lora_lr)
        single = lorascope.calibration_from_runs([probe], [reference])
        rows_r = lorascope.analyze(full_probes, ranks=(r,), constant=CapacityConstant.from_calibration(single)
                                   ).to_dict()["forecast"]["rows"]
        point = single.points[0]
        own[str(r)] = {"examples": next(x for x in rows_r if x["target"] == "all-linear")["runway_examples"],
                       "kappa": point.bits_per_parameter, "share_of_full": point.bits_stored / point.bits_offered,
                       "full": point.saturated, "code_length_bits": information_from_run(
                           probe, dataset_examples=probe_n).description_length_bits}
    share = {n: (base_train[n] - train_loss("all-linear", args.new_rank, n, lora_lr))
                / (base_train[n] - train_loss("full", 0, n, full_lr)) for n in new_sizes}
    used = {study.RunSpec("all-linear", r, probe_n, lora_lr).name for r in probe_ranks} | {
        study.RunSpec(*method, n, lr).name for n in new_sizes
        for method, lr in ((("full", 0), full_lr), (("all-linear", args.new_rank), lora_lr))}
    mine = {name: r for name, r in results.items() if name in used}  # the runs this script trained for this forecast
    result = {"command": "python examples/realdata/smollm2_lora_probes.py " + " ".join(argv or sys.argv[1:]),
              "study": str(args.report), "predictions": predictions,
              "held_share": {str(args.new_rank): share} if args.new_rank else {},
              "base_train_losses": base_train, "probe_slice": slice_,
              "forecast_now": {str(r): {"examples": rows[r]["runway_examples"], "range": rows[r]["runway_range"],
                                        "kappa": rows[r]["capacity_bits"] / rows[r]["lora_parameters"]}
                               for r in ranks},
              "own_rank": own, "runs": mine, "wall_seconds": sum(r["seconds"] for r in mine.values())}
    set_falloffs_and_verdicts(result, report)
    args.out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    print(tables(json.loads(args.out.read_text())))
    return 0


def remeasure(path: Path, *, renew: bool = False) -> None:
    """A written result's falloffs and verdicts read again (:func:`set_falloffs_and_verdicts`), in place: no run,
    no weights; the forecasts stay as written, except, with ``renew``, ``forecast_now``: what today's lorascope
    reads from the same probes (:func:`forecast_now`)."""
    result = json.loads(path.read_text())
    report = json.loads(Path(result["study"]).read_text())
    if renew:
        result["forecast_now"] = forecast_now(result, report)
    set_falloffs_and_verdicts(result, report)
    path.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")


def probe_constant(calibration: dict[str, Any]) -> Any:
    """The ``CapacityConstant`` today's lorascope reads from a calibration kept inside a result JSON."""
    import tempfile

    from lorascope.analysis.capacity import CapacityConstant
    from lorascope.workflows.calibration import load_calibration

    with tempfile.TemporaryDirectory() as folder:
        saved = Path(folder) / "calibration.json"
        saved.write_text(json.dumps(calibration))
        return CapacityConstant.from_calibration(load_calibration(saved))


def forecast_now(result: dict[str, Any], report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each forecast rank's runway (and range, and kappa) from the result's probes as today's lorascope reads them,
    through the study's growth law: what ``lorascope.analyze`` of the study's full probes gives with that constant."""
    from smollm2_step_forecast import bits_estimate

    from lorascope.analysis.capacity import runway_range

    constant = probe_constant(result["predictions"]["calibration"])
    bits = bits_estimate(report)
    out = {}
    for r in result["forecast_now"]:
        parameters = result["predictions"]["forecast"][r]["lora_parameters"]
        runway, low, high = runway_range(constant.capacity_bits(parameters), bits, constant.uncertainty_at(parameters))
        out[r] = {"examples": runway, "range": [low, high], "kappa": constant.bits_per_parameter_at(parameters)}
    return out


def set_falloffs_and_verdicts(result: dict[str, Any], report: dict[str, Any]) -> None:
    """The measured falloffs (ranks 1, 4 and 16 from the study's ``report``; the new rank from the result's held
    shares, where a negative share, a run that ended above the base, diverged and is left out) and every forecast's
    verdict against them."""
    measured = {r: report["measured"]["falloff"]["train"][r] for r in ("1", "4", "16")}
    for r, share in result["held_share"].items():
        diverged = sorted(int(n) for n, v in share.items() if v < 0)
        measured[r] = measure.crossing({int(n): v for n, v in share.items() if int(n) not in diverged})
        result.setdefault("diverged", {})[r] = diverged
    result["falloff"] = measured
    result["verdicts"] = {r: measure.verdict(result["predictions"]["forecast"][r]["examples"], measured[r])
                          for r in measured}
    for rows in (result["forecast_now"], result["own_rank"]):
        for r, row in rows.items():
            if r in measured:
                row.update(measure.verdict(row["examples"], measured[r]))


def tables(result: dict[str, Any]) -> str:
    forecast, falloff, verdicts = result["predictions"]["forecast"], result["falloff"], result["verdicts"]
    now = result["forecast_now"]
    lines = ["| rank | LoRA params | kappa | forecast (range) | measured falloff | ratio | today's lorascope |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r, row in forecast.items():
        f = falloff.get(r)
        measured = "-" if f is None else ("<= " if f["status"] == "at_or_below" else "> " if f["status"] == "beyond"
                                          else "") + f"{f['examples']:,.0f}"
        v = verdicts.get(r)
        ratio = "-" if v is None else f"{v['ratio']:.2f}x" if v["ratio"] is not None else (
            "consistent" if v["consistent"] else "wrong side")
        low, high = row["range"]
        today = f"{now[r]['examples']:,.0f}" + (f" ({now[r]['ratio']:.2f}x)" if now[r].get("ratio") else "")
        lines.append(f"| {r} | {row['lora_parameters']:,} | {row['kappa']:.3f} | {row['examples']:,.0f} "
                     f"({low:,.0f}-{high:,.0f}) | {measured} | {ratio} | {today} |")
    lines += ["", "Each rank's kappa from its own probe on the same slice (a consistency check):", "",
              "| rank | absorbed / full FT's | kappa | runway | measured falloff | ratio |",
              "|---:|---:|---:|---:|---:|---:|"]
    for r, v in result["own_rank"].items():
        f = falloff[r]
        ratio = f"{v['ratio']:.2f}x" if v["ratio"] is not None else "consistent" if v["consistent"] else "wrong side"
        bound = "" if v["full"] else " (not full: a lower bound)"
        lines.append(f"| {r} | {v['share_of_full']:.0%}{bound} | {v['kappa']:.3f} | {v['examples']:,.0f} | "
                     f"{'<= ' if f['status'] == 'at_or_below' else ''}{f['examples']:,.0f} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
