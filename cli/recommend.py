"""``lorascope recommend`` and ``lorascope calibrate``: parse, call the library, print.

Library errors reach the group in :mod:`lorascope_cli.main`, which prints them as one line with exit status 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from lorascope.analysis.information import DEFAULT_BITS_PER_EPISODE, DEFAULT_BITS_PER_TOKEN
from lorascope.errors import InvalidOptionError, RunFileExistsError
from lorascope.workflows.recommend import DEFAULT_RANKS, TARGET_CHOICES
from lorascope_cli.params import parse_ranks

_DEFAULT_RANKS = ",".join(map(str, DEFAULT_RANKS))


@click.command()
@click.option("--config", "config", required=True, type=click.Path(path_type=str),
              help="The model's config.json (or its directory); built on the meta device, no weights.")
@click.option("--examples", type=int, default=None, help="Training examples (SFT) or episodes (RL).")
@click.option("--tokens-per-example", type=float, default=None, help="Trained (completion) tokens per example.")
@click.option("--tokens", type=int, default=None, help="Trained (completion) tokens in total.")
@click.option("--dataset", type=click.Path(path_type=str), default=None,
              help="A JSONL dataset to count examples and trained tokens from.")
@click.option("--tokenizer", type=click.Path(path_type=str), default=None,
              help="Local tokenizer directory or tokenizer.json for --dataset (default: 4 characters per token).")
@click.option("--task", type=click.Choice(["sft", "rl"]), default="sft", show_default=True)
@click.option("--probe", "probes", multiple=True, type=click.Path(path_type=str),
              help="A full fine-tuning recording of this model on a slice of the data (repeatable).")
@click.option("--ranks", default=_DEFAULT_RANKS, show_default=True, callback=parse_ranks, help="Candidate ranks.")
@click.option("--batch-size", type=int, default=None, help="Planned batch size in examples.")
@click.option("--epochs", type=float, default=1.0, show_default=True, help="Planned passes over the data.")
# attention-only is accepted here only to be refused by the library with its reason.
@click.option("--target", type=click.Choice((*TARGET_CHOICES, "attention-only")), default="auto", show_default=True,
              help="LoRA target set; auto = all linear layers plus fused MoE experts.")
@click.option("--calibration", type=click.Path(path_type=str), default=None,
              help="A calibration from `lorascope calibrate` on this architecture.")
@click.option("--bits-per-token", type=float, default=DEFAULT_BITS_PER_TOKEN, show_default=True,
              help="Assumed information per trained token (SFT, without a probe).")
@click.option("--bits-per-episode", type=float, default=DEFAULT_BITS_PER_EPISODE, show_default=True,
              help="Assumed information per episode (RL).")
@click.option("--peft-config", "peft_config", type=click.Path(path_type=str), default=None,
              help="Write the recommended PEFT LoraConfig here (a .json file or a directory).")
@click.option("--json", "as_json", is_flag=True, help="Print the recommendation as JSON.")
def recommend(config: str, examples: int | None, tokens_per_example: float | None, tokens: int | None,
              dataset: str | None, tokenizer: str | None, task: str, probes: tuple[str, ...], ranks: tuple[int, ...],
              batch_size: int | None, epochs: float, target: str, calibration: str | None, bits_per_token: float,
              bits_per_episode: float, peft_config: str | None, as_json: bool) -> None:
    """Recommend LoRA ranks, targets, learning rate and batch size before training; predict when each rank runs
    out of capacity."""
    from lorascope.model.peft_config import write_peft_config
    from lorascope.report.recommend import format_recommendation
    from lorascope.workflows.recommend import recommend as run_recommend

    result = run_recommend(config, examples=examples, tokens_per_example=tokens_per_example, tokens=tokens,
                           dataset=dataset, tokenizer=tokenizer, task=task, probes=probes, ranks=ranks,
                           batch_size=batch_size, epochs=epochs, target=target, calibration=calibration,
                           bits_per_token=bits_per_token, bits_per_episode=bits_per_episode)
    written = write_peft_config(result.peft_config, peft_config) if peft_config else None
    summary = result.to_dict()
    if as_json:
        click.echo(json.dumps(summary, indent=2, allow_nan=False))
    else:
        click.echo(format_recommendation(summary))
    if written is not None:
        click.echo(f"PEFT config: {written}", err=as_json)


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
    from lorascope.report.recommend import format_calibration
    from lorascope.workflows.calibrate import calibrate as run_calibrate

    if (model_dir is None) == (config is None):
        raise InvalidOptionError("calibrate needs exactly one of --model DIR (weights) or --config FILE.")
    out = Path(output)
    if out.exists() and not force:
        raise RunFileExistsError(f"{out} exists; pass --force to overwrite it or choose another --output.")
    blocks = _layers(layers)
    try:
        lrs = [float(v) for v in lr.split(",") if v.strip()]
    except ValueError:
        lrs = []
    if not lrs or any(not v > 0 for v in lrs):
        raise InvalidOptionError(f"--lr must be positive numbers such as 1e-3,3e-3; got {lr!r}.")
    model, base = _load_model(model_dir, config, pretrain_steps, seed)
    result = run_calibrate(model, ranks=ranks, epochs=epochs, lr=lrs, batch_size=batch_size, seed=seed, base=base,
                           layers=blocks, log=lambda line: click.echo(line, err=True))
    result.save(out)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, allow_nan=False))
    else:
        click.echo(format_calibration(result.to_dict()))
        click.echo(f"\ncalibration: {out}")


def _layers(value: str) -> str | list[int] | None:
    if value in ("auto", "all"):
        return None if value == "all" else "auto"
    try:
        blocks = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        blocks = []
    if not blocks or any(b < 0 for b in blocks):
        raise InvalidOptionError(f"--layers must be auto, all or block indices such as 3,4; got {value!r}.")
    return blocks


def _load_model(model_dir: str | None, config: str | None, pretrain_steps: int, seed: int) -> tuple[object, str]:
    import torch
    import transformers

    from lorascope.errors import ModelConfigError

    if model_dir is not None:
        if not Path(model_dir).is_dir():
            raise ModelConfigError(f"--model {model_dir!r} is not a directory holding a transformers model.")
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelConfigError(f"cannot load a causal LM from {model_dir!r}: {str(exc).splitlines()[0]}") from None
        return model, f"pretrained weights from {model_dir}"
    from lorascope.inputs.synthetic import pretrain_on_markov
    from lorascope.model.lora_params import model_from_config

    meta = model_from_config(config)  # validates the config with lorascope's messages
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(meta.config)
    vocab = model.get_output_embeddings().out_features
    if pretrain_steps:
        click.echo(f"pretraining the randomly initialized model for {pretrain_steps} steps on a synthetic language "
                   "(a stand-in for real weights) ...", err=True)
        pretrain_on_markov(model, vocab, steps=pretrain_steps, seed=seed)
    return model, f"config {config}: random weights + {pretrain_steps} synthetic pretraining steps"
