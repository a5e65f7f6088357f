"""Entry point of the ``lorascope`` console script.

The CLI only parses arguments, calls the library and prints. Library errors caused by bad input are caught
here, at the boundary, and printed as one line with exit status 2.
"""

from __future__ import annotations

import errno
import json
import sys
from typing import Any

import click

from lorascope._version import __version__
from lorascope.errors import LorascopeError
from lorascope_cli.params import parse_ranks
from lorascope_cli.progress import progress_over, quiet_option

EXIT_BAD_INPUT = 2


class OneLineError(click.ClickException):
    """An error the CLI prints as one line, ``error: ...``, on stderr, with exit status 2."""

    exit_code = EXIT_BAD_INPUT

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {' '.join(self.format_message().split())}", err=True)


def _one_line(exc: BaseException) -> OneLineError:
    """The one-line form of an input error: a lorascope error, a click usage error (a bad option value, a missing
    argument, an unknown option or command: with where to find the usage) or an operating-system error on a path."""
    if isinstance(exc, click.UsageError):
        hint = f" (usage: {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
        return OneLineError(exc.format_message() + hint)
    if isinstance(exc, OSError) and exc.filename is not None:
        return OneLineError(f"{exc.filename}: {exc.strerror or exc}")
    return OneLineError(str(exc))


# NoArgsIsHelpError (a bare ``lorascope``) shows the help, as it should; every other error is one line.
_INPUT_ERRORS = (LorascopeError, click.ClickException, OSError)


class _Group(click.Group):
    """A click group that turns every input error (lorascope's, click's argument errors, an unusable path) into
    one line on stderr and exit status 2; click's usage text appears only with ``--help``."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except _INPUT_ERRORS as exc:
            if _passes_through(exc):
                raise
            raise _one_line(exc) from exc

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _INPUT_ERRORS as exc:
            if _passes_through(exc):
                raise
            raise _one_line(exc) from exc


def _passes_through(exc: BaseException) -> bool:
    """Already one line, the help of a bare ``lorascope``, or a closed pipe (``| head``): click's own handling."""
    return (isinstance(exc, (OneLineError, click.exceptions.NoArgsIsHelpError))
            or (isinstance(exc, OSError) and exc.errno == errno.EPIPE))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lorascope")
def cli() -> None:
    """lorascope: how much rank does a fine-tuning update need, and when does a LoRA of rank r run out?"""


@cli.command()
@click.argument("run_file", type=click.Path(dir_okay=True, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(run_file: str, as_json: bool) -> None:
    """Summarise RUN_FILE: status, versions, modules by kind, steps, snapshots, coverage."""
    from lorascope.store.info import run_info

    summary = run_info(run_file)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    from lorascope.report.info import format_info

    click.echo(format_info(summary))


@cli.command()
@click.argument("run_files", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("-o", "--output", "output", default="lorascope-report", show_default=True,
              help="Report folder to write (summary.json, metrics.nc, PNG plots, report.html).")
@click.option("--ranks", default="8,16,64", show_default=True, callback=parse_ranks,
              help="Candidate LoRA ranks, comma-separated.")
@click.option("--tokens", "x_tokens", is_flag=True, help="Use tokens seen instead of examples seen as the data axis.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of text.")
@click.option("--force", is_flag=True, help="Overwrite the report files in an existing output folder.")
@quiet_option
def analyze(run_files: tuple[str, ...], output: str, ranks: tuple[int, ...], x_tokens: bool, as_json: bool,
            force: bool, quiet: bool) -> None:
    """Analyse RUN_FILES: spectra, rank-vs-data curves, per-layer report; write a report folder.

    Several files of the same model trained on different dataset sizes give one curve point each.
    """
    from lorascope.report.folder import prepare_folder, write_report
    from lorascope.report.format import json_text
    from lorascope.report.terminal import format_summary
    from lorascope.workflows.analyze import analyze as run_analysis

    prepare_folder(output, force=force)  # refuse before the (possibly long) analysis
    analysis = run_analysis(run_files, ranks=ranks, x="tokens_seen" if x_tokens else "examples_seen",
                            progress=progress_over("reading runs", "run", quiet=quiet or len(run_files) < 2))
    files = write_report(analysis, output, force=force)
    if as_json:
        click.echo(json_text(analysis.summary))  # the text summary.json holds
        return
    click.echo(format_summary(analysis.summary))
    click.echo(f"\nreport: {files.html}")


@cli.command()
@click.option("-o", "--output", "output", default="lorascope-demo", show_default=True, help="Folder to write into.")
@click.option("--force", is_flag=True, help="Overwrite the demo's files in an existing output folder.")
@click.option("--steps", type=click.IntRange(min=2), default=None, help="Fine-tuning steps (default 400).")
@quiet_option
def demo(output: str, force: bool, steps: int | None, quiet: bool) -> None:
    """Train a small built-in transformer on CPU with full fine-tuning, record it, and analyse it."""
    from lorascope.demo import DemoConfig, run_demo
    from lorascope.report.terminal import format_summary

    cfg = DemoConfig() if steps is None else DemoConfig(finetune_steps=steps)
    run_path, analysis, files = run_demo(output, cfg=cfg, force=force,
                                       log=(lambda m: None) if quiet else (lambda m: click.echo(m, err=True)))
    click.echo(format_summary(analysis.summary))
    click.echo(f"\nrecording: {run_path}\nreport: {files.html}")


from lorascope_cli.compare import compare as _compare_command  # noqa: E402

cli.add_command(_compare_command)

from lorascope_cli.calibrate import calibrate as _calibrate_command  # noqa: E402
from lorascope_cli.recommend import recommend as _recommend_command  # noqa: E402

cli.add_command(_recommend_command)
cli.add_command(_calibrate_command)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI (console-script entry point)."""
    cli.main(args=argv, prog_name="lorascope")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
