"""Reproduce LoRA Without Regret's findings at CPU scale, and set lorascope's predictions against the measurements.

A small Llama, pretrained on a synthetic Markov language, is fine-tuned on N random key -> value facts (exactly
N log2(256) bits to learn) for N on a geometric grid: full fine-tuning and PEFT LoRA on every linear layer at
several ranks (alpha 32, alpha / r scaling), each condition at the best learning rate of a small sweep, every run
recorded with lorascope. Before any LoRA run, lorascope predicts each rank's falloff (``recommend`` from the dataset
size, from a full fine-tuning probe, with ``calibrate``; the spectra of full fine-tuning's updates); then the LoRA
runs, the measured falloffs, ``lorascope compare``, the learning-rate ratio, the batch-size penalty and the target
sets at matched parameter count. docs/reproduction.md describes the design and the results.

    python examples/reproduce/run.py --quick         # a few minutes on one core
    python examples/reproduce/run.py                 # the full study: about an hour on 2 cores (--jobs 2)
    python examples/reproduce/run.py -o DIR --force  # another output folder; --force writes into a non-empty one

Writes into the output folder (default ``reproduce-out/``): ``results.md``, ``results.json``, ``predictions.json``
(written before the first LoRA run), ``recommend/*.json``, ``calibration.json``, ``compare/``, ``plots/*.png`` and
``runs/<experiment>/*.h5``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import repro_measure as measure  # noqa: E402
import repro_report as report  # noqa: E402
import repro_train as train  # noqa: E402


@dataclass(frozen=True)
class Tier:
    """The sizes of one mode of the study."""

    name: str
    ranks: tuple[int, ...]
    sizes: tuple[int, ...]  # dataset sizes N (facts)
    epochs: int  # passes over the data ...
    min_steps: int  # ... or more for small N, so that every run takes at least this many optimizer steps
    batch_size: int
    full_lrs: tuple[float, ...]
    lora_lrs: tuple[float, ...]
    pretrain_steps: int
    calibration_epochs: int
    probe_examples: int  # the full fine-tuning run used as recommend's probe
    batch_sizes: tuple[int, ...]  # the batch-size experiment ...
    batch_ranks: tuple[int, ...]
    batch_examples: int
    target_mlp_rank: int  # attention-only / MLP-only / all-linear at matched parameter count
    target_examples: int
    jobs: int
    kappa_ranks: tuple[int, ...] = ()  # a second calibration measuring kappa(r) at these ranks (none: skipped)
    kappa_budget: int | None = None  # its adapter-training examples at most (calibrate's --budget)


TIERS = {
    "full": Tier("full", ranks=(1, 2, 4, 8, 16, 32), sizes=(128, 256, 512, 1024, 2048, 4096), epochs=150,
                 min_steps=1500, batch_size=64, full_lrs=(1e-3, 3e-3, 1e-2), lora_lrs=(1e-3, 3e-3, 1e-2),
                 pretrain_steps=1500, calibration_epochs=300, probe_examples=512, batch_sizes=(16, 64, 256),
                 batch_ranks=(4, 16), batch_examples=512, target_mlp_rank=8, target_examples=2048, jobs=2,
                 kappa_ranks=(1, 2, 4, 8, 16), kappa_budget=12_000_000),
    "quick": Tier("quick", ranks=(1, 4, 16), sizes=(128, 512, 2048), epochs=40, min_steps=400, batch_size=64,
                  full_lrs=(1e-3, 3e-3), lora_lrs=(1e-3, 3e-3), pretrain_steps=600, calibration_epochs=60,
                  probe_examples=512, batch_sizes=(16, 128), batch_ranks=(4,), batch_examples=256,
                  target_mlp_rank=2, target_examples=512, jobs=1,
                  kappa_ranks=(1, 2, 4), kappa_budget=1_500_000),
    "smoke": Tier("smoke", ranks=(1, 4), sizes=(32, 64, 128), epochs=6, min_steps=12, batch_size=16,
                  full_lrs=(3e-3,), lora_lrs=(3e-3,), pretrain_steps=40, calibration_epochs=4, probe_examples=64,
                  batch_sizes=(8, 32), batch_ranks=(4,), batch_examples=64, target_mlp_rank=1, target_examples=64,
                  jobs=1),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a few minutes on one core")
    mode.add_argument("--smoke", action="store_true", help="seconds: the test suite's tier (numbers meaningless)")
    parser.add_argument("-o", "--output", default="reproduce-out", help="output folder (default: reproduce-out)")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: 2 full, 1 quick)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar on stderr (drawn on a terminal)")
    parser.add_argument("--repredict", metavar="DIR", help="a finished study's probe predictors read at the plan's "
                        "epochs, added post hoc (see repredict)")
    parser.add_argument("--report", metavar="RESULTS_JSON", help="print the tables of a results.json (markdown)")
    parser.add_argument("--level", type=int, default=1, help="--report's title heading level (default 1)")
    args = parser.parse_args(argv)
    if args.report or args.repredict:
        source = Path(args.report or Path(args.repredict) / "results.json")
        if not source.is_file():
            print(f"error: {source} does not exist", file=sys.stderr)
            return 2
        if args.repredict:
            repredict(Path(args.repredict))
            print(f"wrote {Path(args.repredict) / 'predictions_planned.json'} and updated results.json / results.md")
        else:
            print(report.markdown(json.loads(source.read_text()), level=args.level), end="")
        return 0
    tier = TIERS["quick" if args.quick else "smoke" if args.smoke else "full"]
    if args.jobs is not None:
        if args.jobs < 1:
            parser.error(f"--jobs must be at least 1, got {args.jobs}")
        tier = replace(tier, jobs=args.jobs)
    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.force:
        print(f"error: {out} exists and is not empty; choose another folder with -o or pass --force", file=sys.stderr)
        return 2
    if args.force:
        _clear(out)
    study(tier, out, quiet=args.quiet)
    return 0


OUTPUTS = ("base.pt", "calibration.json", "calibration_kappa.json", "predictions.json", "predictions_planned.json",
           "results.json", "results.md", "runs", "recommend", "compare", "plots")


def _clear(out: Path) -> None:
    """Remove what an earlier study wrote into ``out`` (and nothing else), so that predictions precede LoRA runs."""
    import shutil

    for name in OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def study(tier: Tier, out: Path, log: Callable[[str], None] = print, quiet: bool = False) -> dict[str, Any]:
    """Run every phase of the study into ``out``; returns what ``results.json`` holds."""
    import torch

    torch.set_num_threads(1)
    start = time.time()

    def say(line: str) -> None:
        log(f"[{time.time() - start:6.0f} s] {line}")

    out.mkdir(parents=True, exist_ok=True)
    base = out / "base.pt"
    pretrain_loss = train.pretrain_base(base, steps=tier.pretrain_steps)
    say(f"base: tiny Llama pretrained on the Markov language for {tier.pretrain_steps} steps (loss "
        f"{pretrain_loss:.2f} nats)")
    largest = max((*tier.sizes, tier.batch_examples, tier.target_examples, tier.probe_examples))
    runner = Runner(out, base, largest, tier.jobs, say, quiet=quiet)

    matched = matched_ranks(train.load_base(base), tier.target_mlp_rank)
    before, after = plan(tier, matched)

    # Phase 1: full fine-tuning at every N (each learning rate) and the calibration. No LoRA result exists yet.
    calibration_path = out / "calibration.json"
    # The published tiers calibrate with the recipe their numbers came from; the smoke tier's 4 epochs teach that
    # recipe nothing (numbers meaningless there), so it offers a quarter of the load: fewer facts, learned sooner.
    extra = [{"kind": "calibrate", "base": str(base), "path": str(calibration_path),
              "epochs": tier.calibration_epochs, "seed": 100,
              "recipe": "light" if tier.name == "smoke" else "published"}]
    # kappa as a function of rank (issue 13): calibrate's own recipe at several ranks, its capacity bracketed.
    kappa_path = out / "calibration_kappa.json" if tier.kappa_ranks else None
    if kappa_path:
        extra.append({"kind": "calibrate", "base": str(base), "path": str(kappa_path), "seed": 101,
                      "epochs": tier.calibration_epochs, "recipe": "kappa", "ranks": list(tier.kappa_ranks),
                      "budget": tier.kappa_budget})
    runner.run(before, extra=extra)
    best = measure.best_per_condition(runner.results.values())
    full_best = {n: best[("full", 0, n, tier.batch_size, epochs(tier, n))] for n in tier.sizes}
    probe = best[("full", 0, tier.probe_examples, tier.batch_size, epochs(tier, tier.probe_examples))]

    # Phase 2: predictions, from the base model, the probe, the calibration and full fine-tuning's spectra.
    predictions = predict(tier, out, base, full_best, probe, calibration_path, say, kappa_path)

    # Phase 3: the LoRA runs and the other experiments.
    runner.run(after)

    # Phase 4: measure, compare, report.
    results = measure_all(tier, out, runner, predictions, matched, say)
    results["runtime_seconds"] = time.time() - start
    results["pretrain_loss"] = pretrain_loss
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=2, allow_nan=False) + "\n")
    (out / "results.md").write_text(report.markdown(results))
    report.plots(results, out / "plots")
    say(f"done: {out / 'results.md'} ({len(runner.results)} runs, {results['runtime_seconds']:.0f} s)")
    return results


def plan(tier: Tier, matched: dict[str, int]) -> tuple[list[train.RunSpec], list[train.RunSpec]]:
    """The training runs before the predictions (full fine-tuning: the sweep over N and the probe) and after them
    (the LoRA sweep, the batch-size experiment, the target sets). A run listed twice is trained once."""
    before = [train.RunSpec("sweep", "full", 0, n, lr, tier.batch_size, epochs(tier, n))
              for n in tier.sizes for lr in tier.full_lrs]
    before += [train.RunSpec("probe", "full", 0, tier.probe_examples, lr, tier.batch_size,
                             epochs(tier, tier.probe_examples)) for lr in tier.full_lrs]
    after = [train.RunSpec("sweep", "all-linear", r, n, lr, tier.batch_size, epochs(tier, n))
             for n in tier.sizes for r in tier.ranks for lr in tier.lora_lrs]
    batch_epochs = epochs(tier, tier.batch_examples)  # the same epochs (examples) at every batch size
    after += [train.RunSpec("batch", target, rank, tier.batch_examples, lr, bs, batch_epochs)
              for bs in tier.batch_sizes
              for target, rank in [("full", 0)] + [("all-linear", r) for r in tier.batch_ranks]
              for lr in (tier.full_lrs if target == "full" else tier.lora_lrs)]
    nt, et = tier.target_examples, epochs(tier, tier.target_examples)
    after += [train.RunSpec("targets", target, rank, nt, lr, tier.batch_size, et)
              for target, rank in matched.items() for lr in tier.lora_lrs]
    after += [train.RunSpec("targets", "full", 0, nt, lr, tier.batch_size, et) for lr in tier.full_lrs]
    return before, after


def epochs(tier: Tier, examples: int, batch_size: int | None = None) -> int:
    return train.epochs_for(examples, batch_size or tier.batch_size, tier.epochs, tier.min_steps)


class Runner:
    """Runs training jobs (each once: a run shared by two experiments is trained once), in worker processes when
    ``jobs`` > 1, and keeps their results by run name."""

    def __init__(self, out: Path, base: Path, largest: int, jobs: int, say: Callable[[str], None],
                 quiet: bool = False) -> None:
        self.out, self.base, self.largest, self.jobs, self.say = out, base, largest, jobs, say
        self.quiet = quiet  # no progress bar (tqdm draws one only when stderr is a terminal anyway)
        self.results: dict[str, dict[str, Any]] = {}
        self.extras: list[dict[str, Any]] = []

    def run(self, specs: Sequence[train.RunSpec], extra: Sequence[dict[str, Any]] = ()) -> None:
        todo: dict[str, dict[str, Any]] = {}
        for spec in specs:
            if spec.name not in self.results and spec.name not in todo:
                path = self.out / "runs" / spec.experiment / f"{spec.name}.h5"
                path.parent.mkdir(parents=True, exist_ok=True)
                todo[spec.name] = {**asdict(spec), "kind": "train", "base": str(self.base), "largest": self.largest,
                                   "path": str(path), "seed": 0}
        # the calibrations first (kappa(r)'s is the longest job), then the runs, longest first
        jobs = list(extra) + sorted(todo.values(), key=lambda j: -j["epochs"] * j["examples"])
        self.say(f"{len(jobs)} jobs on {self.jobs} process(es)")
        from tqdm import tqdm

        with tqdm(total=len(jobs), desc="training runs", unit="run", disable=True if self.quiet else None,
                  leave=False) as bar:
            for result in _execute(jobs, self.jobs):
                bar.update(1)
                with tqdm.external_write_mode():  # the log lines go to stdout above the bar
                    self._log(result)

    def _log(self, result: dict[str, Any]) -> None:
        if result["kind"] == "calibrate":
            self.extras.append(result)
            self.say(f"calibrate: {result['bits_per_parameter']:.3f} bits per LoRA parameter "
                     f"({result['seconds']:.0f} s)")
            return
        self.results[result["name"]] = result
        self.say(f"{result['name']}: loss {result['final_loss']:.3f}, holds {result['bits_held']:.0f} of "
                 f"{result['bits_offered']:.0f} bits ({result['seconds']:.1f} s)")


def _execute(jobs: Sequence[dict[str, Any]], workers: int):
    if workers == 1:
        for job in jobs:
            yield train.run_job(job)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(train.run_job, job) for job in jobs]
        for future in as_completed(futures):
            yield future.result()


def matched_ranks(model: Any, mlp_rank: int) -> dict[str, int]:
    """Attention-only and all-linear ranks whose LoRA parameter count is nearest that of MLP-only at ``mlp_rank``."""
    from lorascope.model.lora_params import lora_parameters

    budget = lora_parameters(model, "mlp-only", rank=mlp_rank).total
    out = {"mlp-only": mlp_rank}
    for target in ("attention-only", "all-linear"):
        per_rank = lora_parameters(model, target, rank=1).total
        out[target] = max(1, round(budget / per_rank))
    return out


def predict(tier: Tier, out: Path, base: Path, full_best: dict[int, dict], probe: dict, calibration_path: Path,
            say: Callable[[str], None], kappa_path: Path | None = None) -> dict[str, Any]:
    """Every predictor's falloff per rank, written to ``predictions.json`` before any LoRA run exists."""
    import lorascope

    if list(out.glob("runs/*/all-linear*.h5")):
        raise RuntimeError(f"{out} already holds LoRA runs: the predictions must be made before them; use a fresh "
                           "output folder")
    model = train.load_base(base)
    calibration = lorascope.load_calibration(calibration_path)
    largest = max(tier.sizes)
    folder = out / "recommend"
    folder.mkdir(exist_ok=True)
    kappa = lorascope.load_calibration(kappa_path) if kappa_path else None
    calls = predictor_calls(probe["path"], calibration, kappa, epochs(tier, largest))
    documents, information = {}, {}
    for name, kwargs in calls.items():
        rec = lorascope.recommend(model, examples=largest, ranks=tier.ranks, batch_size=tier.batch_size, **kwargs)
        documents[name] = rec.to_dict()
        (folder / (name.replace(", ", "_").replace(" ", "_").replace("(r)", "_r") + ".json")).write_text(
            json.dumps(documents[name], indent=2) + "\n")
        information[name] = measure.information_predictions(documents[name])
        say(f"recommend ({name}): {documents[name]['bits']['bits_per_example']:.2f} bits per example, "
            f"{documents[name]['constant']['bits_per_parameter']:.3f} bits per parameter; runways "
            + ", ".join(f"r{r}: {p['examples']:,.0f}" for r, p in information[name].items()))
    spectra = {n: measure.linear_group(lorascope.analyze(run["path"], ranks=tier.ranks).to_dict()["final"],
                                       tier.ranks) for n, run in full_best.items()}
    spectral = measure.spectral_predictions(spectra, tier.ranks)
    predictions = {
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "lora_runs_before": 0,
        "examples_asked": largest,
        "bits_per_fact": train.bits_per_fact(),
        "probe": {"path": probe["path"], "examples": probe["examples"], "lr": probe["lr"],
                  "information": documents["probe, default constant"]["probes"][0]["information"]},
        "calibration": calibration.to_dict(),
        "calibration_kappa": kappa.to_dict() if kappa is not None else None,
        "information": information,
        "spectral": spectral,
        "full_spectra": spectra,
    }
    (out / "predictions.json").write_text(json.dumps(_jsonable(predictions), indent=2, allow_nan=False) + "\n")
    say(f"predictions written to {out / 'predictions.json'}")
    return predictions


def predictor_calls(probe: str, calibration: Any, kappa: Any, plan_epochs: int) -> dict[str, dict[str, Any]]:
    """``recommend``'s arguments for each information predictor. The probe is read at the epochs the study plans
    for the largest N (recommend's own default is a one-epoch plan); the size-only predictor has no recipe."""
    calls: dict[str, dict[str, Any]] = {
        "size, default constant": {"tokens_per_example": 1},
        "size, calibrated": {"tokens_per_example": 1, "calibration": calibration},
        "probe, default constant": {"probes": [probe], "epochs": plan_epochs},
        "probe, calibrated": {"probes": [probe], "calibration": calibration, "epochs": plan_epochs},
    }
    if kappa is not None:
        calls["size, calibrated kappa(r)"] = {"tokens_per_example": 1, "calibration": kappa}
        calls["probe, calibrated kappa(r)"] = {"probes": [probe], "calibration": kappa, "epochs": plan_epochs}
    return calls


def repredict(out: Path) -> dict[str, Any]:
    """``--repredict``: the probe predictors of a finished study read at the plan's epochs, written to
    ``predictions_planned.json`` and added to ``results.json`` / ``results.md`` as predictors marked *post hoc*.

    For a study whose ``predictions.json`` was written before ``predict`` passed the plan's epochs (recommend read
    the probe for a one-epoch plan). Nothing measured on a LoRA run enters: the inputs are the probe's recording,
    the calibration files and the base model, as in ``predict``; but they are computed after the LoRA runs, and
    every table says so."""
    import lorascope

    results = json.loads((out / "results.json").read_text())
    tier = Tier(**{k: tuple(v) if isinstance(v, list) else v for k, v in results["tier"].items()})
    largest = max(tier.sizes)
    plan_epochs = epochs(tier, largest)
    probe = results["predictions"]["probe"]["path"]
    calibration = lorascope.load_calibration(out / "calibration.json")
    kappa_path = out / "calibration_kappa.json"
    kappa = lorascope.load_calibration(kappa_path) if kappa_path.is_file() else None
    model = train.load_base(out / "base.pt")
    information: dict[str, Any] = {}
    for name, kwargs in predictor_calls(probe, calibration, kappa, plan_epochs).items():
        if not name.startswith("probe"):
            continue
        document = lorascope.recommend(model, examples=largest, ranks=tier.ranks, batch_size=tier.batch_size,
                                       **kwargs).to_dict()
        information[f"{name}, {plan_epochs} epochs, post hoc"] = measure.information_predictions(document)
    lora_runs = sum(1 for r in results["runs"] if r["target"] != "full")
    planned = {"written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "lora_runs_before": lora_runs, "plan_epochs": plan_epochs,
               "note": "computed after the LoRA runs from the probe, the calibrations and the base only: the study's "
                       "predictions.json read the probe for a one-epoch plan (recommend's default), not the study's "
                       f"{plan_epochs} epochs", "information": information}
    (out / "predictions_planned.json").write_text(json.dumps(_jsonable(planned), indent=2, allow_nan=False) + "\n")
    for name, table in information.items():
        results["predictions"]["information"][name] = table
        results["predictors"][f"information ({name})"] = {
            r: {"predicted": table[int(r)]["examples"], "status": "predicted",
                **measure.verdict(table[int(r)]["examples"], results["falloff"][r])} for r in results["falloff"]}
    results["predictions_planned"] = {k: planned[k] for k in ("written", "lora_runs_before", "plan_epochs", "note")}
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=2, allow_nan=False) + "\n")
    (out / "results.md").write_text(report.markdown(results))
    return results


def measure_all(tier: Tier, out: Path, runner: Runner, predictions: dict[str, Any], matched: dict[str, int],
                say: Callable[[str], None]) -> dict[str, Any]:
    import lorascope
    from lorascope.report.compare import write_comparison

    best = measure.best_per_condition(runner.results.values())

    def pick(target: str, rank: int, n: int) -> dict[str, Any]:
        return best[(target, rank, n, tier.batch_size, epochs(tier, n))]

    full = {n: pick("full", 0, n) for n in tier.sizes}
    lora = {(r, n): pick("all-linear", r, n) for r in tier.ranks for n in tier.sizes}
    held = {r: {n: _share(lora[r, n]["bits_held"], full[n]["bits_held"]) for n in tier.sizes} for r in tier.ranks}
    falloff = {r: measure.crossing(held[r]) for r in tier.ranks}
    # The same criterion on the final training loss: the LoRA's loss exceeds full fine-tuning's by more than 10%
    # of the information per fact (0.1 ln V nats), i.e. 1 - gap / ln V drops below 0.9.
    log_values = math.log(train.VALUES)
    falloff_loss = {r: measure.crossing({n: 1 - (lora[r, n]["final_loss"] - full[n]["final_loss"]) / log_values
                                         for n in tier.sizes}) for r in tier.ranks}

    predictors: dict[str, dict[int, float | None]] = {
        f"information ({name})": {r: p["examples"] for r, p in table.items()}
        for name, table in predictions["information"].items()}
    bounds: dict[str, dict[int, str]] = {}
    for signal, table in predictions["spectral"].items():
        name = f"spectral ({signal.replace('_', ' ')})"
        predictors[name] = {r: p["examples"] for r, p in table.items()}
        bounds[name] = {r: p["status"] for r, p in table.items()}
    table = {name: {r: {"predicted": values.get(r), "status": bounds.get(name, {}).get(r, "predicted"),
                        **measure.verdict(values.get(r), falloff[r], bounds.get(name, {}).get(r))}
                    for r in tier.ranks} for name, values in predictors.items()}

    # Per-step curves at the largest N: lorascope compare, with the information view translated to examples seen.
    n = max(tier.sizes)
    steps_x, steps_loss = _curve(full[n]["path"])
    absorbed = measure.absorbed_bits_curve(steps_x, steps_loss, n, train.VALUES)
    translated = {name: measure.translate_to_examples_seen(
        {r: p["capacity_bits"] for r, p in predictions["information"][name].items()}, steps_x, absorbed)
        for name in ("size, default constant", "size, calibrated")}
    compare_predictions = {r: x for r, x in translated["size, calibrated"].items() if x is not None}
    comparison = lorascope.compare(full[n]["path"], [lora[r, n]["path"] for r in tier.ranks],
                                   predictions=compare_predictions or None)
    write_comparison(comparison, out / "compare", force=True)
    compared = comparison.to_dict()
    say(f"compare at N = {n}: " + ", ".join(
        f"r{c['rank']}: {c['falloff']['status']}" + (f" at {c['falloff']['x']:,.0f}" if c['falloff']['x'] else "")
        for c in compared["loras"]))

    # The learning rate, the early curves, the batch size, the target sets.
    ratios = measure.lr_ratios(full, lora, tier.full_lrs, tier.lora_lrs)
    common_lr = min(tier.lora_lrs, key=lambda lr: (-sum(1 for b in lora.values() if b["lr"] == lr), lr))
    curves = {r: _curve(runner.results[train.RunSpec("sweep", "all-linear", r, n, common_lr, tier.batch_size,
                                                      epochs(tier, n)).name]["path"]) for r in tier.ranks}
    full_curve = _curve(runner.results[train.RunSpec("sweep", "full", 0, n, common_lr, tier.batch_size,
                                                     epochs(tier, n)).name]["path"]) if common_lr in tier.full_lrs \
        else None
    at = [e * n for e in (1, 4, 16) if e <= epochs(tier, n)]
    early = {"examples": n, "lr": common_lr, "at_examples": at, "loss": measure.early_losses(curves, at),
             "full_loss": measure.early_losses({0: full_curve}, at)[0] if full_curve else None}
    batch_rows = []
    for bs in tier.batch_sizes:
        f = best.get(("full", 0, tier.batch_examples, bs, epochs(tier, tier.batch_examples)))
        for r in tier.batch_ranks:
            b = best.get(("all-linear", r, tier.batch_examples, bs, epochs(tier, tier.batch_examples)))
            batch_rows.append({"batch_size": bs, "rank": r, "full_loss": f["final_loss"], "lora_loss": b["final_loss"],
                               "gap": b["final_loss"] - f["final_loss"], "full_lr": f["lr"], "lora_lr": b["lr"],
                               "steps": b["steps"], "lora_held": b["bits_held"], "full_held": f["bits_held"]})
    nt = tier.target_examples
    target_rows = []
    for target, rank in [("full", 0), *matched.items()]:
        b = best[(target, rank, nt, tier.batch_size, epochs(tier, nt))]
        target_rows.append({"target": target, "rank": rank, "lora_parameters": b["trainable_parameters"],
                            "final_loss": b["final_loss"], "bits_held": b["bits_held"], "lr": b["lr"]})

    runs = sorted(runner.results.values(), key=lambda r: (r["experiment"], r["target"], r["rank"], r["examples"],
                                                           r["batch_size"], r["lr"]))
    return {
        "tier": asdict(tier), "model": _model_summary(runner.base), "bits_per_fact": train.bits_per_fact(),
        "predictions": predictions, "held_fraction_level": measure.HELD_FRACTION,
        "full": {n: _brief(r) for n, r in full.items()},
        "lora": {r: {n: _brief(lora[r, n]) for n in tier.sizes} for r in tier.ranks},
        "held": held, "falloff": falloff, "falloff_loss": falloff_loss, "predictors": table,
        "compare": {"examples": n, "translated_predictions": translated, "comparison": _compare_brief(compared)},
        "lr": ratios, "early": early, "batch": {"examples": tier.batch_examples, "rows": batch_rows},
        "targets": {"examples": nt, "ranks": matched, "rows": target_rows},
        "runs": [{k: r[k] for k in ("experiment", "name", "target", "rank", "examples", "lr", "batch_size", "epochs",
                                    "steps", "final_loss", "bits_held", "seconds")} for r in runs],
        "run_seconds": {"total": sum(r["seconds"] for r in runs),
                        "per_example_ms": 1000 * sum(r["seconds"] for r in runs)
                        / sum(r["epochs"] * r["examples"] for r in runs)},
        "calibration_seconds": sum(e["seconds"] for e in runner.extras),
    }


def _share(lora_bits: float, full_bits: float) -> float:
    """The LoRA's bits as a share of full fine-tuning's (1 when full fine-tuning held nothing either)."""
    return lora_bits / full_bits if full_bits > 0 else 1.0


def _curve(path: str) -> tuple[Any, Any]:
    """A run's training loss against examples seen, as a moving median over x / 1.12 .. x * 1.12 (9 points at
    least), the smoothing lorascope compare uses."""
    import numpy as np

    import lorascope
    from lorascope.analysis.falloff import moving_median

    with lorascope.open_run(path) as run:
        steps = run.steps.load()
    x = steps["examples_seen"].values.astype(float)
    loss = steps["loss"].values.astype(float)
    keep = np.isfinite(loss) & (x > 0)
    x, loss = x[keep], loss[keep]
    order = np.argsort(x)
    x, loss = x[order], loss[order]
    smooth, _ = moving_median(np.log10(x), loss, np.log10(x), 0.05, 9)
    return x, smooth


def _brief(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result[k] for k in ("lr", "final_loss", "bits_held", "bits_offered", "steps", "epochs", "path")}


def _compare_brief(compared: dict[str, Any]) -> dict[str, Any]:
    return {"notes": compared["notes"], "criterion": compared["criterion"],
            "full_final_loss": compared["full"]["final_loss"],
            "loras": [{"rank": c["rank"], "falloff": c["falloff"], "final_gap": c["final_gap"],
                       "max_gap": c["max_gap"], "compared": c["compared"]} for c in compared["loras"]],
            "predictions": compared["predictions"]}


def _model_summary(base: Path) -> dict[str, Any]:
    from lorascope.model.lora_params import lora_parameters
    from lorascope.workflows.calibrate import model_signature

    model = train.load_base(base)
    return {**model_signature(model), "lora_parameters_per_rank": {
        t: lora_parameters(model, t, rank=1).total for t in ("all-linear", "attention-only", "mlp-only")}}


def _jsonable(value: Any) -> Any:
    """Strict JSON: int keys as strings, NaN / inf as null."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return _jsonable(value.item())
    return value


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
