"""Argument checks shared by the public functions, in the project's one message form:
"The 'x' parameter of f must be ... Got ... instead." (:class:`~lorascope.errors.InvalidOptionError`, which is
both a :class:`~lorascope.errors.LorascopeError` and a :class:`ValueError`)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from lorascope.errors import InvalidOptionError


def _where(name: str, caller: str) -> str:
    return f"The {name!r} parameter" + (f" of {caller}" if caller else "")


# The largest rank lorascope accepts: 2**20, above the smaller dimension of any weight matrix trained today (a
# LoRA rank is at most min(out, in)); larger values are typing errors, refused before any work.
MAX_RANK = 2**20


def check_ranks(ranks: Sequence[int], caller: str = "") -> tuple[int, ...]:
    """Candidate LoRA ranks: a non-empty sequence of ints in [1, :data:`MAX_RANK`], returned sorted without repeats.

    >>> check_ranks([16, 4, 4])
    (4, 16)
    """
    values = tuple(ranks)
    if not values or any(isinstance(r, bool) or not isinstance(r, numbers.Integral) or not 1 <= r <= MAX_RANK
                         for r in values):
        raise InvalidOptionError(f"{_where('ranks', caller)} must be a non-empty list of ints in the range "
                                 f"[1, {MAX_RANK}]. Got {list(values)!r} instead.")
    return tuple(sorted({int(r) for r in values}))


def check_positive(name: str, value: Any, caller: str = "") -> None:
    """A finite real number > 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise InvalidOptionError(f"{_where(name, caller)} must be a positive number. Got {value!r} instead.")


def check_positive_int(name: str, value: Any, caller: str = "") -> None:
    """An int >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InvalidOptionError(f"{_where(name, caller)} must be an int in the range [1, inf). "
                                 f"Got {value!r} instead.")


def check_non_negative(name: str, value: Any, caller: str = "") -> None:
    """A finite real number >= 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise InvalidOptionError(f"{_where(name, caller)} must be a non-negative number. Got {value!r} instead.")
