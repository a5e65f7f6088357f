"""``lorascope compare``: LoRA runs against a full fine-tuning run of the same data.

Parses, calls :func:`lorascope.workflows.compare.compare` and the report writer, prints. Library errors reach the
group in :mod:`lorascope_cli.main`, which prints them as one line with exit status 2.
"""

from __future__ import annotations

import click

from lorascope.errors import InvalidOptionError
from lorascope.report.folder import prepare_folder
from lorascope.workflows.compare import DEFAULT_SMOOTH, DEFAULT_THRESHOLD, DEFAULT_WINDOW, read_predictions
from lorascope.workflows.compare import compare as run_compare
from lorascope_cli.progress import progress_over, quiet_option


@click.command("compare")
@click.argument("full_run", type=click.Path(path_type=str))
@click.argument("lora_runs", nargs=-1, type=click.Path(path_type=str))
@click.option("-o", "--output", "output", default="lorascope-compare", show_default=True,
              help="Folder to write compare.json and compare.png into.")
@click.option("--threshold", type=float, default=DEFAULT_THRESHOLD, show_default=True,
              help="Gap (LoRA - full) a falloff must exceed: nats per token, or a fraction of the loss with "
                   "--relative.")
@click.option("--window", type=float, default=DEFAULT_WINDOW, show_default=True,
              help="Decades of data the gap must stay above the threshold (0.2: the data grow 1.58x).")
@click.option("--smooth", type=float, default=DEFAULT_SMOOTH, show_default=True,
              help="Half-width of the moving-median window, in decades.")
@click.option("--relative", is_flag=True, help="Use the gap relative to the full fine-tuning loss.")
@click.option("--tokens", "x_tokens", is_flag=True, help="Use tokens seen as the data axis.")
@click.option("--steps", "x_steps", is_flag=True, help="Use optimizer steps as the data axis.")
@click.option("--predictions", "predictions_file", type=click.Path(path_type=str), default=None,
              help="JSON file mapping LoRA ranks to predicted falloffs (in units of the data axis), or the output "
                   "of `lorascope recommend --json`.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of text.")
@click.option("--force", is_flag=True, help="Overwrite compare.json and compare.png in an existing output folder.")
@quiet_option
def compare(full_run: str, lora_runs: tuple[str, ...], output: str, threshold: float, window: float, smooth: float,
            relative: bool, x_tokens: bool, x_steps: bool, predictions_file: str | None, as_json: bool,
            force: bool, quiet: bool) -> None:
    """Compare LoRA runs (LORA_RUNS) against the full fine-tuning run FULL_RUN of the same data.

    For each LoRA rank: the number of examples (or tokens, or steps) at which its training loss leaves the full
    fine-tuning curve, by a smoothed, noise-aware and sustained gap (docs/compare.md).
    """
    from lorascope.report.compare import format_comparison, write_comparison  # matplotlib: loaded when it runs
    from lorascope.report.format import json_text

    if x_tokens and x_steps:
        raise InvalidOptionError("--tokens and --steps choose the data axis: give at most one of them")
    x = "tokens_seen" if x_tokens else "step" if x_steps else "examples_seen"
    predicted = read_predictions(predictions_file) if predictions_file is not None else {}
    prepare_folder(output, force=force)  # refuse before reading the runs
    comparison = run_compare(full_run, list(lora_runs), x=x, threshold=threshold, window=window, smooth=smooth,
                             relative=relative, progress=progress_over("reading LoRA runs", "run", quiet=quiet),
                             **predicted)
    files = write_comparison(comparison, output, force=force)
    if as_json:
        click.echo(json_text(comparison.summary))
        return
    click.echo(format_comparison(comparison.summary))
    click.echo(f"\nplot: {files.plot}\njson: {files.json}")
