"""Entry point of the ``lorascope`` console script.

The CLI only parses arguments, calls the library and prints. Library errors caused by bad input are caught
here, at the boundary, and printed as one line with exit status 2.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from lorascope._version import __version__
from lorascope.errors import LorascopeError

EXIT_BAD_INPUT = 2


class _Group(click.Group):
    """A click group that turns lorascope's input errors into one line on stderr and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LorascopeError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(EXIT_BAD_INPUT)


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


def main(argv: list[str] | None = None) -> None:
    """Run the CLI (console-script entry point)."""
    cli.main(args=argv, prog_name="lorascope")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
