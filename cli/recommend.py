"""``lorascope recommend``: parse, call :func:`lorascope.workflows.recommend.recommend`, print.

Library errors reach the group in :mod:`lorascope_cli.main`, which prints them as one line with exit status 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from lorascope.analysis.information import DEFAULT_BITS_PER_EPISODE, DEFAULT_BITS_PER_TOKEN
from lorascope.model.peft_config import write_peft_config
from lorascope.report.folder import check_output_path
from lorascope.report.recommend import format_recommendation
from lorascope.workflows.recommend import DEFAULT_RANKS, TARGET_CHOICES
from lorascope.workflows.recommend import recommend as run_recommend
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
@click.option("--epochs", type=float, default=1.0, show_default=True,
              help="Planned passes over the data (with --probe: the bits are what full fine-tuning absorbs in them).")
@click.option("--full-ft-lr", type=float, default=None,
              help="The full fine-tuning learning rate of the plan, compared with the probes' (optional).")
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
              batch_size: int | None, epochs: float, full_ft_lr: float | None, target: str, calibration: str | None,
              bits_per_token: float, bits_per_episode: float, peft_config: str | None, as_json: bool) -> None:
    """Recommend LoRA ranks, targets, learning rate and batch size before training; predict when each rank runs
    out of capacity."""
    if peft_config:  # refused before the work, not after it
        check_output_path(peft_config, folder=Path(peft_config).suffix != ".json", name="--peft-config")
    result = run_recommend(config, examples=examples, tokens_per_example=tokens_per_example, tokens=tokens,
                           dataset=dataset, tokenizer=tokenizer, task=task, probes=probes, ranks=ranks,
                           batch_size=batch_size, epochs=epochs, full_ft_lr=full_ft_lr, target=target,
                           calibration=calibration, bits_per_token=bits_per_token, bits_per_episode=bits_per_episode)
    written = write_peft_config(result.peft_config, peft_config) if peft_config else None
    summary = result.to_dict()
    if as_json:
        click.echo(json.dumps(summary, indent=2, allow_nan=False))
    else:
        click.echo(format_recommendation(summary))
    if written is not None:
        click.echo(f"PEFT config: {written}", err=as_json)
