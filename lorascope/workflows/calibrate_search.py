"""Which adapters ``calibrate`` trains: the learning rate searched at the smallest rank, each larger rank at its rate's
capacity load (retried lower when it collapsed, offered more when it did not fill), and the step-budget mode's loads
at every rank.

Each function gets ``train(rank, load, rate, what) -> CalibrationPoint`` (one adapter trained and measured, the
bits it held) and decides what to train next; :func:`lorascope.workflows.calibrate.calibrate` owns the facts, the
model and the budget.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from lorascope.workflows.calibration import CalibrationPoint

__all__ = ["COLLAPSE_SHARE", "LR_EXTENSIONS", "at_capacity_loads", "at_step_budget", "describe", "filled", "tune_rate",
           "unless_collapsed"]

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


def at_capacity_loads(train: Train, ranks: Sequence[int], first: CalibrationPoint, rate: float,
                      load_for: Callable[[float], float], lower: list[float], bracket: Sequence[float],
                      affordable: Callable[[int, float], bool], skipped: Callable[[Sequence[int], float], str],
                      notes: list[str]) -> tuple[list[CalibrationPoint], dict[int, float], dict[int, float], set[int]]:
    """calibrate's epochs mode past the smallest rank (``first``, held at ``rate``): each larger rank offered the
    capacity load of the rate it trains at (``load_for(rate)``, read from that rate's loads at the smallest rank),
    at the rate of the rank below it, retried lower when it collapsed (:func:`unless_collapsed`) and offered the
    bracket's next load when it did not fill (:func:`filled`); while ``affordable(rank, load)``, else ``skipped``
    names the ranks left out. Returns the points, each rank's rate and load, and the ranks that held less at a larger
    load than at their own."""
    points, rates, offered = [first], {first.rank: rate}, {first.rank: load_for(rate)}
    held_less: set[int] = set()
    for position, rank in enumerate(ranks[1:], start=1):
        rate = rates[points[-1].rank]
        load = load_for(rate)
        if not affordable(rank, load):
            notes.append(skipped(ranks[position:], load))
            break
        point = train(rank, load, rate, f"rank {rank}")
        within = functools.partial(affordable, rank)
        point, rate, load = unless_collapsed(train, point, load, points[-1], rate, lower, load_for, within, notes)
        point, load, less = filled(train, point, load, rate, bracket, within, notes)
        if less:
            held_less.add(rank)
        points.append(point)
        rates[rank], offered[rank] = rate, load
    return points, rates, offered, held_less


def unless_collapsed(train: Train, point: CalibrationPoint, load: float, below: CalibrationPoint, rate: float,
                     lower: list[float], load_for: Callable[[float], float], affordable: Callable[[float], bool],
                     notes: list[str]) -> tuple[CalibrationPoint, float, float]:
    """``point``, trained at ``rate`` and ``load``, unless it held under :data:`COLLAPSE_SHARE` of the bits per
    parameter of the rank ``below`` it: then it collapsed rather than filled, and is retried at the next lower rate
    tried at the smallest rank (popped from ``lower``) and that rate's capacity load (``load_for``), for as long as
    that helps and is ``affordable(load)``. Returns the point kept, its rate (the larger ranks start there) and its
    load."""
    while point.bits_per_parameter < COLLAPSE_SHARE * below.bits_per_parameter and lower \
            and affordable(load_for(lower[0])):
        at = load_for(lower[0])
        retry = train(point.rank, at, lower[0], f"retry at learning rate {lower[0]:g}, load {at:g}, rank {point.rank}")
        better = retry.bits_stored > point.bits_stored
        notes.append(f"rank {point.rank}: {point.bits_per_parameter:.3f} bits per parameter at learning rate "
                     f"{rate:g}, under half of rank {below.rank}'s {below.bits_per_parameter:.3f} (a collapse); "
                     f"at {lower[0]:g}: {retry.bits_per_parameter:.3f}"
                     + (", kept, and the larger ranks start there" if better else ", not better"))
        if not better:
            break
        point, rate, load = retry, lower.pop(0), at
    return point, rate, load


def filled(train: Train, point: CalibrationPoint, load: float, rate: float, bracket: Sequence[float],
           affordable: Callable[[float], bool], notes: list[str]) -> tuple[CalibrationPoint, float, bool]:
    """``point``, unless it held so much of its ``load`` that it may not be full (not ``saturated``): then it is
    offered the bracket's next larger load at the same rate, kept if it held more, for as long as that helps and is
    ``affordable(load)``. A larger rank can hold more per parameter than the smallest one, whose loads set its
    offer. Returns the point kept, its load, and whether the next load held less (on the reproduction's base,
    seed 102, ranks 8 and 16 held 87-90% of load 1 and collapsed at load 2)."""
    while point.learned and not point.saturated:
        larger = [v for v in sorted(bracket) if v > load]
        if not larger or not affordable(larger[0]):
            break
        more = train(point.rank, larger[0], rate, f"load {larger[0]:g} at rank {point.rank}, not full at {load:g}")
        better = more.bits_stored > point.bits_stored
        notes.append(f"rank {point.rank}: held {point.bits_stored / point.bits_offered:.0%} of load {load:g} (it may "
                     f"not be full); at load {larger[0]:g}: {more.bits_per_parameter:.3f} bits per parameter, "
                     + ("kept" if better else "not more"))
        if not better:
            return point, load, True
        point, load = more, larger[0]
    return point, load, False


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
