"""``lorascope calibrate``: parse, build the base model and call :func:`lorascope.workflows.calibrate.calibrate`,
print, save.

Library errors reach the group in :mod:`lorascope_cli.main`, which prints them as one line with exit status 2.
"""

from __future__ import annotations

import json

import click

import lorascope.workflows.calibrate as calibration
from lorascope.errors import InvalidOptionError, RunFileExistsError
from lorascope.report.folder import check_output_path
from lorascope.report.recommend import format_calibration
from lorascope_cli.params import parse_layers, parse_learning_rates, parse_ranks


@click.command()
@click.option("--model", "model_dir", type=click.Path(path_type=str), default=None,
              help="A local transformers model directory with weights (the base you will fine-tune).")
@click.option("--config", "config", type=click.Path(path_type=str), default=None,
              help="Only a config.json: random weights, first pretrained on a synthetic language (a stand-in).")
@click.option("--pretrain-steps", type=click.IntRange(min=0), default=300, show_default=True,
              help="Synthetic pretraining steps of a --config model.")
@click.option("--ranks", default="1,2", show_default=True, callback=parse_ranks, help="Small ranks to measure.")
@click.option("--layers", default="auto", show_default=True,
              help="Blocks to adapt: auto (all for a small model, else the middle block), all, or indices like 3,4.")
@click.option("--epochs", type=click.IntRange(min=1), default=300, show_default=True)
@click.option("--lr", default="1e-3,3e-3", show_default=True,
              help="Adam learning rate(s) of the adapters; several: the best at the smallest rank is used for all.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--output", default="lorascope-calibration.json", show_default=True,
              help="Where to save the calibration (pass it to `lorascope recommend --calibration`).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--json", "as_json", is_flag=True, help="Print the calibration as JSON.")
def calibrate(model_dir: str | None, config: str | None, pretrain_steps: int, ranks: tuple[int, ...], layers: str,
              epochs: int, lr: str, batch_size: int, seed: int, output: str, force: bool, as_json: bool) -> None:
    """Measure bits stored per LoRA parameter on your architecture (random key -> value facts, real PEFT LoRA)."""
    if (model_dir is None) == (config is None):
        raise InvalidOptionError("calibrate needs exactly one of --model DIR (weights) or --config FILE.")
    out = check_output_path(output, folder=False, name="--output")
    if out.exists() and not force:
        raise RunFileExistsError(f"{out} exists; pass --force to overwrite it or choose another --output.")
    blocks, lrs = parse_layers(layers), parse_learning_rates(lr)

    def log(line: str) -> None:
        click.echo(line, err=True)

    # Through the module, so that a test can stand in for the long steps.
    model, base = calibration.base_model(model_dir, config, pretrain_steps=pretrain_steps, seed=seed, log=log)
    result = calibration.calibrate(model, ranks=ranks, epochs=epochs, lr=lrs, batch_size=batch_size, seed=seed,
                                   base=base, layers=blocks, log=log)
    result.save(out)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, allow_nan=False))
    else:
        click.echo(format_calibration(result.to_dict()))
        click.echo(f"\ncalibration: {out}")
