"""How bits per LoRA parameter change with the adapter's size, and what an adapter holds past its capacity.

Bits per parameter :math:`\\kappa` is not one number: on random facts at a fixed training budget it fell from about
0.85 (ranks 1-2) to about 0.5 (rank 32) (issue 13). :func:`fit_kappa` fits the power law

.. math:: \\log \\kappa(P) = a + g \\log P

over measured adapters of :math:`P` parameters, and :class:`KappaFit` evaluates it, holding :math:`\\kappa` at the
nearest measured end outside the measured range (:meth:`KappaFit.at`) and saying how far the law would move it
there (:meth:`KappaFit.extrapolation`).

Past its capacity an adapter may hold less, not more: offered twice what it holds, a LoRA trained on random facts
collapsed to almost nothing (issue 13). :func:`bracket_capacity` reads the bits one adapter held at several loads
(bits offered per parameter) as a :class:`CapacityBracket`: where the held bits stop growing (capacity), and whether
they then fall under half their maximum (a collapse) or stay (a plateau).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lorascope.errors import InvalidOptionError

__all__ = ["COLLAPSE_FRACTION", "PLATEAU_FRACTION", "CapacityBracket", "KappaFit", "SaturatingCapacity",
           "bracket_capacity", "fit_kappa", "fit_saturating", "interpolate_kappa", "probes_extrapolation"]

COLLAPSE_FRACTION = 0.5
"""An adapter offered more than its capacity *collapsed* when it held under this share of the most it held."""
PLATEAU_FRACTION = 0.9
"""Held bits *stopped growing* at the smallest load where they reach this share of the most held."""


@dataclass(frozen=True)
class KappaFit:
    """:math:`\\log \\kappa = a + g \\log P` (natural logarithms), fitted over adapters of ``parameters_low`` to
    ``parameters_high`` parameters.

    ``residual`` is the standard deviation of the fit's log residuals (``n - 2`` degrees of freedom), NaN with
    two points or fewer.
    """

    intercept: float
    exponent: float
    parameters_low: float
    parameters_high: float
    residual: float
    points: int

    def at(self, parameters: float) -> float:
        """:math:`\\kappa` at ``parameters``; outside the measured range, the value at the nearest measured end.

        >>> fit = KappaFit(math.log(2.0), -0.5, 100.0, 10_000.0, 0.0, 3)
        >>> round(fit.at(400), 6), round(fit.at(1.0), 6), round(fit.at(1e6), 6)
        (0.1, 0.2, 0.02)
        """
        clamped = min(max(float(parameters), self.parameters_low), self.parameters_high)
        return self.law(clamped)

    def law(self, parameters: float) -> float:
        """:math:`\\kappa` at ``parameters`` by the power law itself, inside the measured range or not.

        >>> round(KappaFit(math.log(2.0), -0.5, 100.0, 10_000.0, 0.0, 3).law(1e6), 6)
        0.002
        """
        return math.exp(self.intercept + self.exponent * math.log(float(parameters)))

    def extrapolation(self, parameters: float) -> float:
        """How far the power law would move :math:`\\kappa` from the held value at ``parameters``: a factor >= 1,
        1 inside the measured range, :math:`(P / P_{high})^{|g|}` above it and :math:`(P_{low} / P)^{|g|}` below.

        >>> KappaFit(0.0, -0.5, 100.0, 10_000.0, 0.0, 3).extrapolation(40_000)
        2.0
        """
        if not parameters > 0:
            return 1.0
        distance = max(float(parameters) / self.parameters_high, self.parameters_low / float(parameters), 1.0)
        return distance ** abs(self.exponent)

    def to_dict(self) -> dict[str, Any]:
        return {"intercept": self.intercept, "exponent": self.exponent,
                "parameters_range": [self.parameters_low, self.parameters_high],
                "residual": None if math.isnan(self.residual) else self.residual, "points": self.points}


def interpolate_kappa(measured: Sequence[tuple[float, float]], parameters: float) -> float:
    """:math:`\\kappa` at ``parameters`` through measured ``(P, kappa)`` points: straight lines in log-log between
    neighbours, and past either end the end segment continued (its local trend; one point: that kappa).

    For LoRA probes, which measure kappa at the ranks probed: a fitted power law would move it there (over ranks 1 to
    64 of SmolLM2's probes by up to 1.3x), and the local trend is the better guess just outside.

    >>> round(interpolate_kappa([(100, 0.8), (400, 0.4)], 200), 6), round(interpolate_kappa([(100, 0.8), (400, 0.4)],
    ...                                                                                    1600), 6)
    (0.565685, 0.2)
    """
    points = sorted((float(p), float(k)) for p, k in measured)
    if not points or not parameters > 0 or not all(p > 0 and k > 0 for p, k in points):
        raise InvalidOptionError(f"interpolate_kappa needs positive measured points and parameter count. Got "
                                 f"{list(measured)!r} and {parameters!r} instead.")
    if len(points) == 1:
        return points[0][1]
    x = math.log(float(parameters))
    logs = [(math.log(p), math.log(k)) for p, k in points]
    i = next((j for j in range(1, len(logs) - 1) if x < logs[j][0]), len(logs) - 1)  # segment (i - 1, i)
    (x0, y0), (x1, y1) = logs[i - 1], logs[i]
    return math.exp(y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def probes_extrapolation(measured: Sequence[tuple[float, float]], parameters: float) -> float:
    """How far :func:`interpolate_kappa` moved :math:`\\kappa` past the probed range by continuing an end segment: a
    factor >= 1, 1 inside the range and with one probe; the range of a runway there is widened by it.

    >>> round(probes_extrapolation([(100, 0.8), (400, 0.4)], 1600), 6), probes_extrapolation([(100, 0.8)], 1e6)
    (2.0, 1.0)
    """
    points = sorted((float(p), float(k)) for p, k in measured)
    if len(points) < 2 or points[0][0] <= parameters <= points[-1][0]:
        return 1.0
    end = min(max(float(parameters), points[0][0]), points[-1][0])  # the nearest probe
    ratio = interpolate_kappa(points, parameters) / interpolate_kappa(points, end)
    return max(ratio, 1 / ratio)


@dataclass(frozen=True)
class SaturatingCapacity:
    """What an adapter of :math:`P` LoRA parameters holds in a fixed number of steps,

    .. math:: B(P) = B_\\infty \\left(1 - e^{-\\kappa_0 P / B_\\infty}\\right),

    :math:`\\kappa_0 P` for a small adapter (its capacity), rising to the ceiling :math:`B_\\infty` that no rank
    passes in these steps. With alpha / r scaling LoRAs of every rank learn alike early in training (LoRA Without
    Regret), so a short run fills a small adapter and leaves a large one at what the steps allowed: on SmolLM2 in 64
    steps ranks 16 and 64 held the same bits (docs/realdata_smollm2.md).

    >>> law = SaturatingCapacity(kappa0=0.8, ceiling=10_000.0)
    >>> round(law.bits(1_000), 1), round(law.bits(10**7), 1)
    (768.8, 10000.0)
    """

    kappa0: float
    ceiling: float

    def bits(self, parameters: float) -> float:
        return self.ceiling * -math.expm1(-self.kappa0 * float(parameters) / self.ceiling)

    def to_dict(self) -> dict[str, Any]:
        return {"kappa0": self.kappa0, "ceiling_bits": self.ceiling}


def fit_saturating(measured: Sequence[tuple[float, float]]) -> SaturatingCapacity | None:
    """:class:`SaturatingCapacity` through LoRA probes' ``(P, kappa)``, least squares in log bits; None when there
    are fewer than two probes or kappa does not fall from the smallest probe to the largest (nothing saturates: the
    probes' own trend is used instead, :func:`interpolate_kappa`).

    For a rate :math:`x = \\kappa_0 / B_\\infty` the best :math:`\\log B_\\infty` is the mean of
    :math:`\\log B_i - \\log(1 - e^{-x P_i})`, so one dimension is searched: :math:`x` on a log grid, then refined.
    Two probes are fitted exactly when the larger held more bits and less per parameter.

    >>> law = fit_saturating([(1000, 0.75), (4000, 0.5)])
    >>> round(law.bits(1000)), round(law.bits(4000)), round(law.ceiling)
    (750, 2000, 2816)
    >>> fit_saturating([(1000, 0.5), (4000, 0.6)]) is None
    True
    """
    points = sorted((float(p), float(k)) for p, k in measured)
    if len(points) < 2 or not all(p > 0 and k > 0 for p, k in points) or not points[-1][1] < points[0][1]:
        return None
    sizes = [p for p, _ in points]
    logs = [math.log(p * k) for p, k in points]

    def ceiling_log(x: float) -> float:
        return sum(y - math.log(-math.expm1(-x * p)) for p, y in zip(sizes, logs)) / len(sizes)

    def misfit(log_x: float) -> float:
        x = math.exp(log_x)
        c = ceiling_log(x)
        return sum((y - c - math.log(-math.expm1(-x * p))) ** 2 for p, y in zip(sizes, logs))

    low, high = math.log(1e-3 / sizes[-1]), math.log(1e3 / sizes[0])  # nearly linear to nearly flat at every probe
    grid = [low + (high - low) * i / 400 for i in range(401)]
    best = min(range(len(grid)), key=lambda i: misfit(grid[i]))
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    for _ in range(60):  # golden-section search between the grid's neighbours
        c, d = b - (b - a) / 1.618033988749895, a + (b - a) / 1.618033988749895
        a, b = (a, d) if misfit(c) < misfit(d) else (c, b)
    x = math.exp((a + b) / 2)
    ceiling = math.exp(ceiling_log(x))
    return SaturatingCapacity(kappa0=x * ceiling, ceiling=ceiling)


def fit_kappa(parameters: Sequence[float], bits_per_parameter: Sequence[float]) -> KappaFit:
    """Least-squares fit of :math:`\\log \\kappa = a + g \\log P` to measured adapters.

    .. math:: g = \\frac{\\sum_i (x_i - \\bar x)(y_i - \\bar y)}{\\sum_i (x_i - \\bar x)^2}, \\quad
              a = \\bar y - g \\bar x, \\qquad x_i = \\log P_i,\\ y_i = \\log \\kappa_i

    With one point, or points all of one size, :math:`g = 0` and :math:`\\kappa` is their geometric mean.

    Parameters
    ----------
    parameters : sequence of float
        LoRA parameter counts :math:`P_i > 0`.
    bits_per_parameter : sequence of float
        Bits held per parameter :math:`\\kappa_i > 0` by each adapter.

    Returns
    -------
    KappaFit

    Raises
    ------
    InvalidOptionError
        Empty or unequal sequences, or a count or value that is not a positive finite number.

    Examples
    --------
    >>> fit = fit_kappa([1000, 2000, 4000, 8000], [0.9 * (p / 1000) ** -0.2 for p in (1000, 2000, 4000, 8000)])
    >>> round(fit.exponent, 6), round(fit.at(1000), 6), fit.residual < 1e-9
    (-0.2, 0.9, True)
    """
    xs_raw, ys_raw = list(parameters), list(bits_per_parameter)
    if not xs_raw or len(xs_raw) != len(ys_raw) or not all(
            _real(v) and math.isfinite(v) and v > 0 for v in xs_raw + ys_raw):
        raise InvalidOptionError("fit_kappa needs as many parameter counts as bits per parameter, all positive "
                                 f"finite numbers. Got {xs_raw!r} and {ys_raw!r} instead.")
    xs, ys = [math.log(v) for v in xs_raw], [math.log(v) for v in ys_raw]
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    exponent = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
    intercept = mean_y - exponent * mean_x
    residuals = [y - intercept - exponent * x for x, y in zip(xs, ys)]
    residual = math.sqrt(sum(r * r for r in residuals) / (n - 2)) if n > 2 else math.nan
    return KappaFit(intercept, exponent, float(min(xs_raw)), float(max(xs_raw)), residual, n)


@dataclass(frozen=True)
class CapacityBracket:
    """The bits one adapter of ``lora_parameters`` parameters held at increasing loads (bits offered per parameter).

    Everything else is derived: the most held and where (``best_load``), where the held bits stopped growing
    (``capacity_load``: the smallest load holding :data:`PLATEAU_FRACTION` of the most), and what happened above
    it (``finding``):

    - ``"collapse"``: at a load above the best one the adapter held under :data:`COLLAPSE_FRACTION` of its most
      (``collapse_load``, the smallest such load);
    - ``"plateau"``: the held bits stopped growing and never fell that far up to the largest load offered;
    - ``"growing"``: they still grew at the largest load: capacity was not reached, nothing bracketed;
    - ``"not learned"``: the adapter held nothing at any load.

    Loads are also given as multiples of the adapter's capacity, :math:`\\text{load} / \\kappa_r` with
    :math:`\\kappa_r` = the most held / ``lora_parameters``.
    """

    rank: int
    lora_parameters: int
    loads: tuple[float, ...]
    held_bits: tuple[float, ...]

    @property
    def held_max(self) -> float:
        return max(self.held_bits)

    @property
    def best_load(self) -> float:
        return self.loads[self.held_bits.index(self.held_max)]

    @property
    def bits_per_parameter(self) -> float:
        """The adapter's capacity per parameter: the most it held over its parameter count."""
        return self.held_max / self.lora_parameters

    @property
    def capacity_load(self) -> float:
        return next(load for load, held in zip(self.loads, self.held_bits) if held >= PLATEAU_FRACTION * self.held_max)

    @property
    def collapse_load(self) -> float | None:
        best = self.loads.index(self.best_load)
        return next((load for load, held in zip(self.loads[best + 1:], self.held_bits[best + 1:])
                     if held < COLLAPSE_FRACTION * self.held_max), None)

    @property
    def finding(self) -> str:
        if self.held_max <= 0:
            return "not learned"
        if self.collapse_load is not None:
            return "collapse"
        return "plateau" if self.capacity_load < self.loads[-1] else "growing"

    @property
    def examined_load(self) -> float:
        """The load the finding speaks of: the collapse load, else the largest load offered."""
        return self.collapse_load if self.collapse_load is not None else self.loads[-1]

    @property
    def examined_share(self) -> float:
        """What the adapter held at :attr:`examined_load`, as a share of the most it held."""
        held = self.held_bits[self.loads.index(self.examined_load)]
        return held / self.held_max if self.held_max > 0 else 0.0

    def multiple(self, load: float) -> float:
        """``load`` as a multiple of this adapter's capacity (inf when it held nothing)."""
        return load / self.bits_per_parameter if self.held_max > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        collapse = self.collapse_load
        learned = self.held_max > 0
        return {"rank": self.rank, "lora_parameters": self.lora_parameters, "loads": list(self.loads),
                "held_bits": list(self.held_bits), "finding": self.finding, "best_load": self.best_load,
                "bits_per_parameter": self.bits_per_parameter, "capacity_load": self.capacity_load,
                "collapse_load": collapse,
                "collapse": None if collapse is None or not learned else self.multiple(collapse),
                "examined_load": self.examined_load,
                "examined_multiple": self.multiple(self.examined_load) if learned else None,
                "examined_share": self.examined_share}


def bracket_capacity(loads: Sequence[float], held_bits: Sequence[float], *, lora_parameters: int,
                     rank: int) -> CapacityBracket:
    """One adapter's held bits at two or more loads, as a :class:`CapacityBracket` (sorted by load).

    Raises
    ------
    InvalidOptionError
        Fewer than two loads, repeated or non-positive loads, negative held bits, or unequal lengths.

    Examples
    --------
    >>> b = bracket_capacity([0.5, 1, 2, 4], [500, 850, 900, 40], lora_parameters=1000, rank=1)
    >>> b.finding, b.capacity_load, b.collapse_load, round(b.multiple(b.collapse_load), 2)
    ('collapse', 1.0, 4.0, 4.44)
    >>> bracket_capacity([0.5, 1, 2, 4], [500, 850, 900, 880], lora_parameters=1000, rank=1).finding
    'plateau'
    """
    values = [*loads, *held_bits]
    pairs = sorted(zip(loads, held_bits)) if all(_real(v) and math.isfinite(v) for v in values) else []
    if (len(pairs) < 2 or len(loads) != len(held_bits) or len({p[0] for p in pairs}) != len(pairs)
            or pairs[0][0] <= 0 or min(p[1] for p in pairs) < 0):
        raise InvalidOptionError("A capacity bracket needs two or more distinct positive loads, each with the "
                                 f"non-negative bits held there. Got loads {list(loads)!r} and held bits "
                                 f"{list(held_bits)!r} instead.")
    if not isinstance(lora_parameters, int) or lora_parameters < 1:
        raise InvalidOptionError(f"The 'lora_parameters' parameter of bracket_capacity must be an int in the range "
                                 f"[1, inf). Got {lora_parameters!r} instead.")
    return CapacityBracket(int(rank), lora_parameters, tuple(float(p[0]) for p in pairs),
                           tuple(float(p[1]) for p in pairs))


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
