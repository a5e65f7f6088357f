"""When to take snapshots of the update: log-spaced by default, because rank dynamics live on log(steps)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from lorascope._checks import check_positive_int
from lorascope.errors import InvalidOptionError


@dataclass(frozen=True)
class SnapshotSchedule:
    """A set of optimizer steps (1-based) at which to snapshot the update.

    Build one with :meth:`log`, :meth:`every` or :meth:`explicit`. The recorder adds the final step itself.
    """

    kind: str
    points: int = 0
    total_steps: int | None = None
    interval: int = 0
    steps: tuple[int, ...] = ()

    @classmethod
    def log(cls, points: int = 24, total_steps: int | None = None) -> SnapshotSchedule:
        """About ``points`` steps log-spaced over ``total_steps``; open-ended when the total is unknown
        (then ``points`` per factor of 1000 steps, continuing for as long as training runs)."""
        if not isinstance(points, int) or points < 2:
            raise InvalidOptionError(f"The 'points' parameter of SnapshotSchedule.log must be an int in the range "
                                     f"[2, inf). Got {points!r} instead.")
        if total_steps is not None and (not isinstance(total_steps, int) or total_steps < 1):
            raise InvalidOptionError(f"The 'total_steps' parameter of SnapshotSchedule.log must be None or an int "
                                     f"in the range [1, inf). Got {total_steps!r} instead.")
        return cls("log", points=points, total_steps=total_steps)

    @classmethod
    def every(cls, interval: int) -> SnapshotSchedule:
        """Every ``interval`` optimizer steps."""
        check_positive_int("interval", interval, "SnapshotSchedule.every")
        return cls("every", interval=int(interval))

    @classmethod
    def explicit(cls, steps: Iterable[int]) -> SnapshotSchedule:
        """Exactly these optimizer steps."""
        values = sorted(set(steps))
        if not values or any(not isinstance(s, int) or s < 1 for s in values):
            raise InvalidOptionError(f"The 'steps' parameter of SnapshotSchedule.explicit must be a non-empty list "
                                     f"of ints >= 1. Got {values!r} instead.")
        return cls("explicit", steps=tuple(values))

    def with_total(self, total_steps: int | None) -> SnapshotSchedule:
        """The same schedule, fitted to a planned number of steps learned later (from a trainer)."""
        if self.kind != "log" or self.total_steps is not None or not total_steps or total_steps < 1:
            return self
        return SnapshotSchedule.log(self.points, int(total_steps))

    def is_due(self, step: int) -> bool:
        """Whether to snapshot after optimizer step ``step``."""
        if self.kind == "every":
            return step % self.interval == 0
        if self.kind == "explicit":
            return step in self.steps
        return step in self._log_steps(step)

    @property
    def thinnable(self) -> bool:
        """Whether the time budget may thin this schedule: the log-spaced one (steps given by the user, or every
        N steps, are taken as asked)."""
        return self.kind == "log"

    def planned(self, up_to: int) -> list[int]:
        """The snapshot steps in ``[1, up_to]`` (for documentation and tests)."""
        return [s for s in range(1, up_to + 1) if self.is_due(s)]

    def _log_steps(self, step: int) -> frozenset[int]:
        if self.total_steps is not None:
            return _log_grid(self.total_steps, self.points)
        # Open-ended: ``points`` per decade-triple (x1000); extend the grid past the current step.
        horizon = 10 ** max(3, math.ceil(math.log10(max(step, 1))) + 1)
        per_decade = self.points / 3
        return _log_grid(horizon, max(2, round(per_decade * math.log10(horizon))))


_GRID_CACHE: dict[tuple[int, int], frozenset[int]] = {}


def _log_grid(total: int, points: int) -> frozenset[int]:
    key = (total, points)
    if key not in _GRID_CACHE:
        if total <= points:
            grid = set(range(1, total + 1))
        else:
            ratio = math.log(total) / (points - 1)
            grid = {max(1, round(math.exp(i * ratio))) for i in range(points)}
            grid.add(total)
        _GRID_CACHE[key] = frozenset(grid)
    return _GRID_CACHE[key]


# Snapshots that cost less than this in all (seconds) are never thinned: on small models the budget would make the
# schedule depend on timing noise for no saving worth having.
BUDGET_GRACE_SECONDS = 2.0


def within_budget(spent_seconds: float, next_seconds: float, elapsed_seconds: float, budget: float,
                  other_seconds: float = 0.0) -> bool:
    """Whether one more snapshot, expected to cost ``next_seconds``, keeps the recording within ``budget`` (a share
    of the training time so far), or the snapshots within :data:`BUDGET_GRACE_SECONDS` in all:

    .. math::

        t_{spent} + 2\\, t_{next} \\le \\max(b \\, t_{elapsed} - t_{other}, t_{grace})

    ``spent_seconds`` is what the snapshots have cost so far and ``other_seconds`` the recording's other costs (the
    per-step hooks, the writer thread): the budget is for the whole recording, and snapshots get what the per-step
    work leaves. The next snapshot counts twice because the final one, which is never thinned, is reserved at every
    decision: a short run whose budget only holds one snapshot keeps it for the end. The log-spaced schedule is
    densest at the start, where the training time is shortest: this thins those early steps first, and takes the
    later, sparser ones as the training time grows.

    Examples
    --------
    >>> within_budget(0.0, 0.2, 10.0, 0.05), within_budget(2.7, 0.2, 60.0, 0.05), within_budget(3.0, 2.0, 200, 0.05)
    (True, False, True)
    >>> within_budget(0.0, 1.0, 100.0, 0.05, other_seconds=2.0)  # 2 s <= max(5 s - 2 s, 2 s)
    True
    """
    return spent_seconds + 2 * next_seconds <= max(budget * elapsed_seconds - other_seconds, BUDGET_GRACE_SECONDS)
