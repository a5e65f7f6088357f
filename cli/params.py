"""Option parsers shared by the commands."""

from __future__ import annotations

import click

from lorascope._checks import MAX_RANK
from lorascope.errors import InvalidOptionError


def parse_ranks(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    """A click callback: comma-separated positive ints such as ``8,16,64``."""
    try:
        ranks = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        ranks = ()
    if not ranks or any(not 1 <= r <= MAX_RANK for r in ranks):
        raise click.BadParameter(f"expected comma-separated integers from 1 to {MAX_RANK} such as 8,16,64; "
                                 f"got {value!r}")
    return ranks


def parse_layers(value: str) -> str | list[int] | None:
    """``--layers``: ``auto``, ``all`` (None) or comma-separated block indices such as ``3,4``."""
    if value in ("auto", "all"):
        return None if value == "all" else "auto"
    try:
        blocks = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        blocks = []
    if not blocks or any(b < 0 for b in blocks):
        raise InvalidOptionError(f"--layers must be auto, all or block indices such as 3,4; got {value!r}.")
    return blocks


def parse_learning_rates(value: str) -> list[float]:
    """``--lr``: comma-separated positive numbers such as ``1e-3,3e-3``."""
    try:
        rates = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        rates = []
    if not rates or any(not v > 0 for v in rates):
        raise InvalidOptionError(f"--lr must be positive numbers such as 1e-3,3e-3; got {value!r}.")
    return rates
