"""Option parsers shared by the commands."""

from __future__ import annotations

import click


def parse_ranks(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    """A click callback: comma-separated positive ints such as ``8,16,64``."""
    try:
        ranks = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        ranks = ()
    if not ranks or any(r < 1 for r in ranks):
        raise click.BadParameter(f"expected comma-separated positive integers such as 8,16,64; got {value!r}")
    return ranks
