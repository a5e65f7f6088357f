"""Progress on stderr for the long commands (analyze of many files, compare, calibrate, demo).

A tqdm bar is drawn only when stderr is a terminal (tqdm's ``disable=None``), so logs, pipes and CI stay clean,
and never with ``--quiet``, which also silences the progress lines some commands print on stderr. Results go to
stdout either way.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import click

T = TypeVar("T")

quiet_option = click.option("-q", "--quiet", is_flag=True,
                            help="No progress bar and no progress lines on stderr (results still print).")


def progress_over(description: str, unit: str, *, quiet: bool) -> Callable[[Iterable[T]], Iterable[T]] | None:
    """A wrapper of an iterable drawing a bar (for the library's ``progress=`` parameters), None when quiet."""
    if quiet:
        return None
    from tqdm import tqdm

    def wrap(items: Iterable[T]) -> Iterable[T]:
        return tqdm(items, desc=description, unit=unit, disable=None, leave=False)

    return wrap


@contextlib.contextmanager
def progress_log(description: str, unit: str, total: int, *, quiet: bool, counts: Callable[[str], bool]
                 ) -> Iterator[Callable[[str], None]]:
    """A ``log(line)`` callback for a library call that reports by lines: each line is printed on stderr above a
    bar of ``total`` items, which advances on the lines ``counts`` accepts; with ``quiet`` it prints nothing."""
    if quiet:
        yield lambda line: None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=description, unit=unit, disable=None, leave=False) as bar:
        def log(line: str) -> None:
            if bar.disable:
                click.echo(line, err=True)
            else:
                bar.write(line, file=sys.stderr)
            if counts(line):
                bar.update(1)

        yield log


