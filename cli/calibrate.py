"""``lorascope calibrate``: parse, build the base model and call :func:`lorascope.workflows.calibrate.calibrate`,
print, save.

Library errors reach the group in :mod:`lorascope_cli.main`, which prints them as one line with exit status 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

import lorascope.workflows.calibrate as calibration
from lorascope.errors import InvalidOptionError, RunFileExistsError
from lorascope.report.folder import check_output_path
from lorascope.report.recommend import format_calibration
from lorascope.workflows.lora_probes import calibration_from_runs
from lorascope_cli.params import parse_layers, parse_learning_rates, parse_ranks
from lorascope_cli.progress import progress_log, quiet_option


@click.command()
@click.option("--model", "model_dir", type=click.Path(path_type=str), default=None,
              help="A local transformers model directory with weights (the base you will fine-tune).")
@click.option("--config", "config", type=click.Path(path_type=str), default=None,
              help="Only a config.json: random weights, first pretrained on a synthetic language (a stand-in).")
@click.option("--lora-probe", "lora_probes", multiple=True, type=click.Path(path_type=str),
              help="Instead of --model/--config: a recorded LoRA run on a slice of your data at the planned step "
                   "budget (repeatable, one per rank); kappa is what it absorbed per LoRA parameter.")
@click.option("--full-probe", "full_probes", multiple=True, type=click.Path(path_type=str),
              help="With --lora-probe: the full fine-tuning run of the same slice (repeatable, one per slice size).")
@click.option("--pretrain-steps", type=click.IntRange(min=0), default=300, show_default=True,
              help="Synthetic pretraining steps of a --config model.")
@click.option("--ranks", default="1,2,4,8,16", show_default=True, callback=parse_ranks,
              help="Ranks to measure; kappa(P) is fitted over them (three or more spanning 4x in parameters).")
@click.option("--bracket", default="auto", show_default=True,
              help="Loads (bits offered per LoRA parameter) tried at the smallest rank (with --steps: at every rank) "
                   "to find its capacity and a collapse past it; 'none': no bracket; auto: 0.5,1,2,4,8, with --steps "
                   "0.015625,0.03125,0.0625,0.125,0.25,0.5.")
@click.option("--load", "load", type=float, default=None,
              help="Bits offered per LoRA parameter at every rank [default: where the smallest rank's held bits "
                   "stop growing at each rank's rate (a rank not full there is offered the next load), else 2].")
@click.option("--budget", type=int, default=None,
              help="The most adapter-training examples (facts x epochs, or steps x facts per step, summed over every "
                   "adapter trained); loads and ranks past it are skipped with a note [default: no limit].")
@click.option("--layers", default="auto", show_default=True,
              help="Blocks to adapt: auto (all for a small model, else the middle block), all, or indices like 3,4.")
@click.option("--epochs", type=click.IntRange(min=1), default=300, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Train each adapter this many steps of --batch-size facts instead of --epochs: random facts at a "
                   "step budget (they did not stand in for real text on SmolLM2; there use --lora-probe).")
@click.option("--lr", default="1e-3,3e-3", show_default=True,
              help="Adam learning rate(s) of the adapters; several: each at every load of the smallest rank, the "
                   "one that held the most is used for all (a best rate at an end: the grid extended past it).")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--output", default="lorascope-calibration.json", show_default=True,
              help="Where to save the calibration (pass it to `lorascope recommend --calibration`).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--json", "as_json", is_flag=True, help="Print the calibration as JSON.")
@quiet_option
def calibrate(model_dir: str | None, config: str | None, lora_probes: tuple[str, ...], full_probes: tuple[str, ...],
              pretrain_steps: int, ranks: tuple[int, ...], bracket: str,
              load: float | None, budget: int | None, layers: str, epochs: int, steps: int | None, lr: str,
              batch_size: int, seed: int, output: str, force: bool, as_json: bool, quiet: bool) -> None:
    """Measure bits stored per LoRA parameter on your architecture (random key -> value facts, real PEFT LoRA):
    kappa(P) over several ranks, and what an adapter holds past its capacity. Or, with --lora-probe and
    --full-probe, read kappa from LoRA runs recorded on a slice of your data at the planned step budget."""
    if lora_probes or full_probes:
        if model_dir is not None or config is not None or not (lora_probes and full_probes):
            raise InvalidOptionError("calibrate --lora-probe takes recorded runs instead of --model/--config, and "
                                     "needs --full-probe (full fine-tuning of the same slices) with them.")
        out = _output(output, force)
        _save(calibration_from_runs(lora_probes, full_probes), out, as_json)
        return
    if (model_dir is None) == (config is None):
        raise InvalidOptionError("calibrate needs exactly one of --model DIR (weights), --config FILE, or "
                                 "--lora-probe RUN with --full-probe RUN.")
    loads = _parse_loads(bracket)
    if budget is not None and budget < 1:
        raise InvalidOptionError(f"--budget must be a positive number of adapter-training examples; "
                                 f"got {budget}.")
    if load is not None and not 0 < load < float("inf"):
        raise InvalidOptionError(f"--load must be a positive number of bits offered per LoRA parameter; got {load}.")
    out = _output(output, force)
    blocks, lrs = parse_layers(layers), parse_learning_rates(lr)

    # A bar over the ranks on a terminal, advanced by the line calibrate logs as each rank is measured.
    with progress_log("calibrating", "rank", len(ranks), quiet=quiet, counts=lambda line: line.startswith("rank ")
                      ) as log:
        # Through the module, so that a test can stand in for the long steps.
        model, base = calibration.base_model(model_dir, config, pretrain_steps=pretrain_steps, seed=seed, log=log)
        result = calibration.calibrate(model, ranks=ranks, bracket=loads, offered_bits_per_parameter=load,
                                       budget=budget, epochs=epochs, steps=steps, lr=lrs, batch_size=batch_size,
                                       seed=seed,
                                       base=base, layers=blocks, log=log)
    _save(result, out, as_json)


def _output(output: str, force: bool) -> Path:
    out = check_output_path(output, folder=False, name="--output")
    if out.exists() and not force:
        raise RunFileExistsError(f"{out} exists; pass --force to overwrite it or choose another --output.")
    return out


def _save(result: calibration.Calibration, out: Path, as_json: bool) -> None:
    result.save(out)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, allow_nan=False))
    else:
        click.echo(format_calibration(result.to_dict()))
        click.echo(f"\ncalibration: {out}")


def _parse_loads(value: str) -> tuple[float, ...] | str | None:
    """``--bracket``: ``auto``, ``none``, or two or more comma-separated positive loads such as ``0.5,1,2,4``."""
    if value.strip().lower() in ("none", "auto"):
        return None if value.strip().lower() == "none" else "auto"
    try:
        loads = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        loads = ()
    if len(set(loads)) < 2 or not all(0 < v < float("inf") for v in loads):
        raise InvalidOptionError(f"--bracket must be two or more positive loads (bits offered per LoRA parameter) "
                                 f"such as 0.5,1,2,4, auto or none; got {value!r}.")
    return loads
