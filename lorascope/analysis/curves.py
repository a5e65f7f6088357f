"""Rank-vs-data curves: a power law fitted to a rank measure against examples (or tokens) seen, with bootstrap
uncertainty, extrapolation, and the dataset size at which the measure crosses a candidate LoRA rank.

A fit is refused, with the reason, when it would be meaningless: fewer points than the model has parameters
plus one (a two-parameter power law through two points has no error estimate), a non-positive or repeated
abscissa only, or a curve that does not grow significantly (the bootstrap interval of the exponent holds 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lorascope.errors import InvalidOptionError

__all__ = ["Crossing", "PowerLawFit", "fit_power_law"]

MIN_POINTS = 3  # two parameters, plus at least one degree of freedom for the residual spread

OK = "ok"
TOO_FEW = "too_few_points"
FLAT = "flat"


@dataclass(frozen=True)
class Crossing:
    """Where a fitted curve reaches a level (a candidate rank): the estimate and its bootstrap interval.

    ``status`` is "observed" (the data already reach the level at ``x``), "predicted" (extrapolated), or
    "never" (the fit does not grow, the interval is unbounded, or the level is above what the measure can reach;
    ``reason`` then says so).
    """

    level: float
    status: str
    x: float
    x_low: float
    x_high: float
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level, "status": self.status, "x": _num(self.x), "x_low": _num(self.x_low),
                "x_high": _num(self.x_high), "reason": self.reason or None}


@dataclass(frozen=True)
class PowerLawFit:
    """A fit of :math:`y = a\\,x^b` in log-log space, with bootstrap intervals.

    Attributes
    ----------
    status : str
        "ok", "too_few_points" or "flat"; ``reason`` says why in words.
    exponent, prefactor : float
        Least-squares estimates of b and a (NaN unless status is "ok" or "flat").
    exponent_interval : tuple[float, float]
        Central ``confidence`` bootstrap interval of b.
    """

    x: np.ndarray
    y: np.ndarray
    status: str
    reason: str
    exponent: float = np.nan
    prefactor: float = np.nan
    exponent_interval: tuple[float, float] = (np.nan, np.nan)
    confidence: float = 0.9
    boot: np.ndarray = field(default_factory=lambda: np.empty((0, 2)))  # (n_boot, [log a, b])

    @property
    def ok(self) -> bool:
        return self.status == OK

    def predict(self, x: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(estimate, low, high) of y at ``x``; NaN when the fit was refused."""
        x = np.atleast_1d(np.asarray(x, dtype=np.float64))
        if self.status == TOO_FEW:
            nan = np.full(x.shape, np.nan)
            return nan, nan, nan
        estimate = self.prefactor * x**self.exponent
        draws = np.exp(self.boot[:, :1] + self.boot[:, 1:] * np.log(x)[None, :])
        low, high = _interval(draws, self.confidence)
        return estimate, low, high

    def crossing(self, level: float, *, ceiling: float | None = None) -> Crossing:
        """The x at which the curve reaches ``level`` (e.g. a LoRA rank r for an energy-rank curve).

        ``ceiling`` is the largest value the measure can take (an energy rank's: the matrices' min(out, in));
        a level above it is never reached, whatever the fit says.
        """
        if ceiling is not None and level > ceiling:
            return Crossing(level, "never", np.inf, np.inf, np.inf,
                            f"rank {level:g} is above the matrices' dimension ({ceiling:g})")
        reached = np.flatnonzero(self.y >= level)
        if reached.size:
            x = float(self.x[reached[0]])
            return Crossing(level, "observed", x, x, x)
        if self.status != OK or not self.exponent > 0:
            return Crossing(level, "never", np.inf, np.inf, np.inf)
        estimate = (level / self.prefactor) ** (1.0 / self.exponent)
        log_a, b = self.boot[:, 0], self.boot[:, 1]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            draws = np.where(b > 0, np.exp((np.log(level) - log_a) / b), np.inf)
        low, high = _interval(draws, self.confidence)
        return Crossing(level, "predicted", float(estimate), float(low), float(high))

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reason": self.reason,
            "points": int(self.x.size),
            "exponent": _num(self.exponent),
            "exponent_interval": [_num(v) for v in self.exponent_interval],
            "prefactor": _num(self.prefactor),
            "confidence": self.confidence,
        }


def fit_power_law(x: Any, y: Any, *, n_boot: int = 1000, confidence: float = 0.9, seed: int = 0) -> PowerLawFit:
    """Fit :math:`y = a x^b` by least squares on :math:`\\log y = \\log a + b \\log x`, with a pairs bootstrap.

    Points with non-finite or non-positive x or y are dropped first (unknown example counts are -1 in a run
    file; a zero rank carries no information on a log scale).

    Parameters
    ----------
    x, y
        Abscissa (examples or tokens seen) and the rank measure.
    n_boot
        Bootstrap resamples for the intervals.
    confidence
        Central probability of the reported intervals.
    seed
        Seed of the bootstrap resampling (the fit itself is deterministic).

    Returns
    -------
    PowerLawFit
        With ``status`` "ok"; "too_few_points" (fewer than 3 distinct x); or "flat" (the exponent's interval
        holds 0: no significant growth, so no extrapolation is offered).

    Examples
    --------
    >>> x = np.array([1e3, 2e3, 4e3, 8e3, 16e3])
    >>> fit = fit_power_law(x, 3.0 * x**0.5)
    >>> fit.status, round(fit.exponent, 6)
    ('ok', 0.5)
    """
    if not 0 < confidence < 1:
        raise InvalidOptionError(f"The 'confidence' parameter of fit_power_law must be in (0, 1). "
                                 f"Got {confidence!r} instead.")
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise InvalidOptionError(f"x and y must have the same length. Got {x.shape[0]} and {y.shape[0]} instead.")
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    x, y = x[keep], y[keep]
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    distinct = np.unique(x).size
    if distinct < MIN_POINTS:
        return PowerLawFit(x, y, TOO_FEW, f"{distinct} usable point(s) at distinct x; a power law needs at least "
                           f"{MIN_POINTS}", confidence=confidence)
    lx, ly = np.log(x), np.log(y)
    b, log_a = np.polyfit(lx, ly, 1)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        idx = rng.integers(0, x.size, x.size)
        if np.unique(lx[idx]).size < 2:
            continue
        bb, aa = np.polyfit(lx[idx], ly[idx], 1)
        boot.append((aa, bb))
    boot_arr = np.asarray(boot) if boot else np.array([[log_a, b]])
    low, high = _interval(boot_arr[:, 1], confidence)
    interval = (float(low), float(high))
    status, reason = OK, f"{x.size} points, exponent {b:.3g} (interval {low:.3g} .. {high:.3g})"
    if low <= 0 <= high:
        status, reason = FLAT, (f"no significant growth with data: the exponent's {confidence:.0%} interval "
                                f"{low:.3g} .. {high:.3g} holds 0; no extrapolation")
    return PowerLawFit(x, y, status, reason, float(b), float(np.exp(log_a)), interval, confidence, boot_arr)


def _interval(draws: np.ndarray, confidence: float) -> tuple[Any, Any]:
    tail = (1.0 - confidence) / 2.0
    with np.errstate(invalid="ignore"):
        return np.quantile(draws, tail, axis=0), np.quantile(draws, 1.0 - tail, axis=0)


def _num(value: float) -> float | None:
    """JSON-friendly number: None where there is no finite value (strict JSON has no NaN or Infinity)."""
    value = float(value)
    return value if np.isfinite(value) else None
