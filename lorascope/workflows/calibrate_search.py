"""Which adapters ``calibrate`` trains: the learning rate searched at the smallest rank, a larger rank that collapsed
retried lower, and the step-budget mode's loads at every rank.

Each function gets ``train(rank, load, rate, what) -> CalibrationPoint`` (one adapter trained and measured, the
bits it held) and decides what to train next; :func:`lorascope.workflows.calibrate.calibrate` owns the facts, the
model and the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lorascope.workflows.calibration import CalibrationPoint

__all__ = ["COLLAPSE_SHARE", "LR_EXTENSIONS", "at_step_budget", "describe", "tune_rate", "unless_collapsed"]

Train = Callable[[int, float, float, str], CalibrationPoint]
"""Train one adapter of ``rank`` at ``load`` bits offered per parameter and learning rate ``rate``, logging ``what``."""
Points = tuple[CalibrationPoint, ...]

COLLAPSE_SHARE = 0.5
"""A larger rank holding under this share of the bits per parameter of the rank below it, at the rate chosen at the
smallest rank, is retried at a lower rate: a larger rank is offered more facts, so takes more steps in its epochs,
and a long run at a high rate collapses (on the reproduction's base at 3e-3 rank 4 held 0.01 bits per parameter
where rank 2 held 0.62). On the bases of docs/capacity.md trained to a plateau, kappa changed by far less than half
from one rank to the next unless an adapter collapsed or did not learn."""
LR_EXTENSIONS = 2
"""Rates tried past an end of the learning-rate grid when the best one sits there. An adapter near its capacity is
sensitive to the rate: on the reproduction's base rank 1 held at most 759 bits at 1e-3, 940 at 3e-3 and 731 at 9e-3,
each collapsing at fewer facts the higher the rate, so a rate read at one load or at the grid's edge can understate
kappa by a quarter (docs/capacity.md, "Learning rates at every load")."""


def tune_rate(train: Train, rank: int, loads: Sequence[float], lrs: Sequence[float], affordable: Callable[[], bool],
              notes: list[str]) -> tuple[float, dict[float, list[CalibrationPoint]]]:
    """Each rate at every load of ``rank``: the rate whose adapter held the most at any load (ties: the smaller),
    and each rate's adapters. An adapter near its capacity is sensitive to the rate, so the rate is chosen by the
    most it held at any load, not at one load. A best rate at an end of several is not trusted: the grid is extended
    past that end by its own step, at most :data:`LR_EXTENSIONS` times while ``affordable()`` (one more rate at
    every load); a best rate still at an end gets a note."""
    def curve(rate: float) -> list[CalibrationPoint]:
        return [train(rank, load, rate, f"learning rate {rate:g}, load {load:g} at rank {rank}") for load in loads]

    by_rate = {rate: curve(rate) for rate in sorted(set(lrs))}

    def best() -> float:
        return max(sorted(by_rate), key=lambda r: max(p.bits_stored for p in by_rate[r]))

    paid = True
    for _ in range(LR_EXTENSIONS if len(by_rate) >= 2 else 0):
        rates, rate = sorted(by_rate), best()
        if rates[0] < rate < rates[-1]:
            break
        if not affordable():
            paid = False
            break
        beyond = rate * rates[0] / rates[1] if rate == rates[0] else rate * rates[-1] / rates[-2]  # the grid's step
        by_rate[beyond] = curve(beyond)
    rates, rate = sorted(by_rate), best()
    if len(rates) >= 2 and rate in (rates[0], rates[-1]):
        notes.append(f"learning rate {rate:g}, the {'lowest' if rate == rates[0] else 'highest'} of those tried "
                     f"({', '.join(f'{r:g}' for r in rates)}), held the most: the best rate may lie past it, and kappa "
                     f"be understated; {'widen lr' if paid else 'the budget paid for no rate past it'}")
    return rate, by_rate


def unless_collapsed(train: Train, point: CalibrationPoint, below: CalibrationPoint, rate: float, lower: list[float],
                     affordable: Callable[[], bool], notes: list[str]) -> tuple[CalibrationPoint, float]:
    """``point``, trained at ``rate``, unless it held under :data:`COLLAPSE_SHARE` of the bits per parameter of the
    rank ``below`` it: then it collapsed rather than filled, and is retried at the next lower rate tried at the
    smallest rank (popped from ``lower``), for as long as that helps and is ``affordable()``. Returns the point
    kept and its rate, from which the larger ranks start."""
    while point.bits_per_parameter < COLLAPSE_SHARE * below.bits_per_parameter and lower and affordable():
        retry = train(point.rank, point.load, lower[0], f"retry at learning rate {lower[0]:g}, rank {point.rank}")
        better = retry.bits_stored > point.bits_stored
        notes.append(f"rank {point.rank}: {point.bits_per_parameter:.3f} bits per parameter at learning rate "
                     f"{rate:g}, under half of rank {below.rank}'s {below.bits_per_parameter:.3f} (a collapse); "
                     f"at {lower[0]:g}: {retry.bits_per_parameter:.3f}"
                     + (", kept, and the larger ranks start there" if better else ", not better"))
        if not better:
            break
        point, rate = retry, lower.pop(0)
    return point, rate


def at_step_budget(train: Train, affordable: Callable[[int], bool], extendable: Callable[[], bool],
                   ranks: Sequence[int], loads: Sequence[float], lrs: Sequence[float], budget: int | None,
                   notes: list[str], log: Callable[[str], None] | None
                   ) -> tuple[float, dict[float, list[CalibrationPoint]], list[CalibrationPoint], Points, Points]:
    """calibrate's step-budget mode: each rate at every load of the smallest rank (:func:`tune_rate`, its grid
    extended while ``extendable()``), the best rate at every load of each other rank (while ``affordable(rank)``),
    and each rank's best load as its point. Returns the rate, each rate's
    adapters at the smallest rank, the points, the smallest rank's loads (the bracket) and every adapter trained at
    the chosen rate."""
    first = ranks[0]
    rate, by_rate = tune_rate(train, first, loads, lrs, extendable, notes)
    curves = {first: by_rate[rate]}
    for position, rank in enumerate(ranks[1:], start=1):
        if not affordable(rank):  # always affordable without a budget
            notes.append(f"ranks {', '.join(map(str, ranks[position:]))} skipped: rank {rank} at {len(loads)} "
                         f"load(s) would pass the budget ({budget:,} adapter-training examples)")
            break
        curves[rank] = [train(rank, load, rate, f"load {load:g} at rank {rank}") for load in loads]
    points = []
    for rank, curve in curves.items():
        best = max(curve, key=lambda p: p.bits_stored)
        points.append(best)
        if log:  # one line per rank, each starting "rank ": the CLI's progress bar counts them
            log(f"rank {rank}: best load {best.load:.3g}: {describe(best)}")
        if len(curve) >= 2 and best.bits_stored > 0 and (best is curve[0] or best is curve[-1]):
            edge = "lowest" if best is curve[0] else "highest"
            notes.append(f"rank {rank}: held the most at the bracket's {edge} load ({best.load:.3g} bits offered per "
                         f"parameter), so its best load may lie outside the bracket: widen it")
    bracket_points = tuple(curves[first]) if len(loads) >= 2 else ()
    return rate, by_rate, points, bracket_points, tuple(p for curve in curves.values() for p in curve)


def describe(point: CalibrationPoint) -> str:
    return (f"{point.lora_parameters:,} LoRA parameters, {point.facts:,} facts ({point.bits_offered:,.0f} bits "
            f"offered, {point.load:.2g} per parameter), stored {point.bits_stored:,.0f} bits = "
            f"{point.bits_per_parameter:.3f} bits/parameter")
