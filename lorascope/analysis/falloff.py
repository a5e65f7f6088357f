"""Where a LoRA loss curve leaves the full fine-tuning curve: a smoothed loss gap, its noise, and a sustained-
excursion rule.

Everything here is pure numpy over arrays sorted by the data axis; :mod:`lorascope.workflows.compare` reads the
run files and calls it. The rule (documented with its defaults in ``docs/compare.md``):

1. **Paired gap.** At every recorded point i of the LoRA run (data axis :math:`x_i`), the raw gap is
   :math:`d_i = L^{\\mathrm{LoRA}}_i - L^{\\mathrm{Full}}(x_i)`, the full fine-tuning loss interpolated linearly in
   :math:`\\log x`. When both runs see the same batches in the same order this pairs equal batches, and the
   batch-to-batch noise of the loss cancels.
2. **Smoothing.** :math:`\\hat d(x)` is the median of the :math:`d_i` with :math:`|\\log_{10} x_i - \\log_{10} x|
   \\le h` (``smooth`` = h decades), widened to the ``min_points`` nearest points in :math:`\\log x` where the
   window holds fewer (the first steps are sparse on a log axis).
3. **Noise.** :math:`\\sigma = 1.4826\\,\\mathrm{median}_i |d_i - \\hat d(x_i)|` (the MAD of the residuals, a
   robust standard deviation), and the standard error of a window's median
   :math:`\\mathrm{SE}(x) = 1.2533\\,\\sigma / \\sqrt{n(x)}` for its :math:`n(x)` points.
4. **Above / below.** A point is *above* when :math:`\\hat d - z\\,\\mathrm{SE} > \\tau` (the gap exceeds the
   threshold :math:`\\tau` by z standard errors); every other point is *not above* (no evidence of a gap
   beyond :math:`\\tau` there).
5. **Falloff.** The first x from which every point is above for ``window`` = W decades (the data grow by a factor
   :math:`10^W`, and at least 3 evaluation points), unless the gap later is not above for a sustained window
   too: such an excursion is reported as transient (for instance a LoRA run that lags early and catches up),
   and the search goes on after it. An excursion that reaches the end of the data before it has lasted W
   decades is *tentative*; without either, there is no falloff within the data.
6. **Lag or capacity.** A LoRA run whose gap is above from its first steps never tracked full fine-tuning, so
   the rule cannot see a falloff *from* the curve. When its gap closes (it ends below :data:`CLOSING` of where it
   started) it is a *lag* in learning speed (a learning rate or warm-up that starts it slower), not a capacity
   falloff (:func:`classify_lag`); a gap that stays counts as a falloff, with a note that it may be the setup as
   much as capacity.
7. **Diverged.** A LoRA run whose own loss rose, ending above where it started or climbing back at the end by a
   quarter or more of what it had clearly learned (:func:`loss_rose`, on medians of 3 steps, beyond the threshold
   by z standard errors), was made worse by its training: an unstable run (a learning rate too high for its rank,
   typically), whose gap says nothing of its rank's capacity. It gets the status **diverged** and no falloff,
   whatever its gap did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["FalloffDetection", "LossRise", "classify_lag", "detect_falloff", "loss_rose", "moving_median", "paired_gap",
           "thin_grid"]

MAD_TO_SIGMA = 1.4826  # sigma of a normal distribution per unit of median absolute deviation
MEDIAN_SE = 1.2533  # sqrt(pi / 2): standard error of a median of n normal draws is 1.2533 sigma / sqrt(n)
MIN_SUSTAIN_POINTS = 3  # a sustained excursion is seen at 3 evaluation points at least
GRID_PER_DECADE = 100  # evaluation points per decade of the data axis, at most

FALLOFF = "falloff"
TENTATIVE = "tentative"
NONE = "none"
LAG = "lag"  # above from the first steps and closing: a learning-speed lag, not a capacity falloff
CLOSING = 0.5  # a gap that ends below this share of where it started is closing
DIVERGED = "diverged"  # its own loss rose (above its start, or back at the end): unstable, not a capacity falloff
GIVE_BACK = 0.25  # a loss that climbs back this share of what it had learned, at the end of a run, diverged
LEARNED_MARGINS = 4  # ... provided it had learned: its lowest this many noise margins below its start


@dataclass(frozen=True)
class FalloffDetection:
    """The smoothed gap on the evaluation grid and where (if anywhere) it leaves the threshold for good.

    Attributes
    ----------
    status : str
        "falloff" (a sustained excursion that does not return), "tentative" (above the threshold from ``index``
        to the end of the data, for less than the sustain window) or "none".
    index : int
        Position in the grid where the falloff starts; -1 for "none".
    gap, se : numpy.ndarray
        Smoothed gap :math:`\\hat d` and its standard error at each grid point.
    sigma : float
        Robust noise level of the raw gap (same units as the gap).
    transients : list[tuple[int, int]]
        Grid positions (start, return) of sustained excursions that came back below the threshold.
    """

    status: str
    index: int
    gap: np.ndarray
    se: np.ndarray
    sigma: float
    transients: list[tuple[int, int]] = field(default_factory=list)


def paired_gap(x: Any, loss: Any, x_ref: Any, loss_ref: Any) -> np.ndarray:
    """Raw gap :math:`d_i = L_i - L_{\\mathrm{ref}}(x_i)`, the reference interpolated linearly in :math:`\\log x`.

    ``x_ref`` must be sorted ascending and positive; points of ``x`` outside its range get NaN (no extrapolation).

    Examples
    --------
    >>> paired_gap([1, 10, 100], [3.0, 2.5, 2.0], [1, 100], [3.0, 1.0]).tolist()
    [0.0, 0.5, 1.0]
    >>> paired_gap([0.5], [1.0], [1, 2], [1.0, 1.0]).tolist()
    [nan]
    """
    lx, lref = np.log(np.asarray(x, dtype=np.float64)), np.log(np.asarray(x_ref, dtype=np.float64))
    ref = np.interp(lx, lref, np.asarray(loss_ref, dtype=np.float64))
    inside = (lx >= lref[0]) & (lx <= lref[-1])
    return np.where(inside, np.asarray(loss, dtype=np.float64) - ref, np.nan)


def moving_median(log_x: Any, values: Any, at: Any, half_width: float, min_points: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Median of ``values`` in the window :math:`|\\mathrm{log\\_x} - a| \\le h` around each ``a`` in ``at``.

    A window holding fewer than ``min_points`` points is widened to the ``min_points`` points nearest to ``a``
    (a contiguous block of the sorted ``log_x``). Returns the medians and the number of points each used.

    Parameters
    ----------
    log_x
        Sorted (ascending) positions of the points, e.g. :math:`\\log_{10}` of examples seen.
    values
        One value per point, finite.
    at
        Where to evaluate, on the same scale as ``log_x``.
    half_width
        h, on the same scale (decades for :math:`\\log_{10}`).
    min_points
        Smallest number of points a median is taken over (capped at the number of points).

    Examples
    --------
    >>> med, n = moving_median([0, 1, 2, 3, 4], [5.0, 1.0, 2.0, 9.0, 3.0], [2.0], 1.0, 1)
    >>> med.tolist(), n.tolist()
    ([2.0], [3])
    >>> moving_median([0, 1, 2, 3, 4], [5.0, 1.0, 2.0, 9.0, 3.0], [0.0], 0.1, 3)[0].tolist()
    [2.0]
    """
    lx = np.asarray(log_x, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    at = np.atleast_1d(np.asarray(at, dtype=np.float64))
    k = min(int(min_points), lx.size)
    lows = np.searchsorted(lx, at - half_width, side="left")
    highs = np.searchsorted(lx, at + half_width, side="right")
    medians, counts = np.empty(at.size), np.empty(at.size, dtype=np.int64)
    for j, (lo, hi, a) in enumerate(zip(lows, highs, at)):
        if hi - lo < k:  # widen to the k nearest points: extend towards the closer neighbour first
            if hi <= lo:
                lo = hi = int(np.searchsorted(lx, a))
            while hi - lo < k:
                left = a - lx[lo - 1] if lo > 0 else np.inf
                right = lx[hi] - a if hi < lx.size else np.inf
                if left <= right:
                    lo -= 1
                else:
                    hi += 1
        medians[j] = np.median(v[lo:hi])
        counts[j] = hi - lo
    return medians, counts


def thin_grid(log_x: Any, per_decade: int = GRID_PER_DECADE) -> np.ndarray:
    """Indices of the sorted points nearest to a grid of ``per_decade`` points per decade (unique, ascending).

    Runs with few points keep all of them; long runs are evaluated on a log-spaced subset (medians still use
    every point).

    Examples
    --------
    >>> thin_grid(np.log10(np.arange(1, 11)), per_decade=2).tolist()
    [0, 2, 9]
    """
    lx = np.asarray(log_x, dtype=np.float64)
    if lx.size == 0:
        return np.empty(0, dtype=np.int64)
    steps = max(1, int(np.ceil((lx[-1] - lx[0]) * per_decade)))
    grid = np.linspace(lx[0], lx[-1], steps + 1)
    right = np.clip(np.searchsorted(lx, grid), 1, lx.size - 1) if lx.size > 1 else np.zeros(grid.size, dtype=int)
    left = np.maximum(right - 1, 0)
    nearest = np.where(np.abs(lx[left] - grid) <= np.abs(lx[right] - grid), left, right)
    return np.unique(nearest)


def detect_falloff(log_x: Any, gap: Any, se: Any, *, threshold: float, window: float, z: float,
                   sigma: float = np.nan) -> FalloffDetection:
    """Apply steps 4 and 5 of the module's rule to a smoothed gap on its evaluation grid.

    Parameters
    ----------
    log_x
        Sorted :math:`\\log_{10}` data axis of the grid points.
    gap, se
        Smoothed gap :math:`\\hat d` and its standard error at each grid point.
    threshold
        :math:`\\tau`, in the gap's units.
    window
        W, the sustain window in decades of the data axis.
    z
        Standard errors by which the gap must clear the threshold.
    sigma
        The noise level, passed through to the result.

    Returns
    -------
    FalloffDetection

    Examples
    --------
    >>> lx = np.linspace(0, 3, 31)                       # 1 to 1000 examples, 10 points per decade
    >>> gap = np.where(lx >= 2, 0.1, 0.0)                # leaves the curve at 100 examples
    >>> found = detect_falloff(lx, gap, np.zeros(31), threshold=0.02, window=0.2, z=2.0)
    >>> found.status, float(10 ** lx[found.index])
    ('falloff', 100.0)
    >>> detect_falloff(lx, np.zeros(31), np.zeros(31), threshold=0.02, window=0.2, z=2.0).status
    'none'
    """
    lx = np.asarray(log_x, dtype=np.float64)
    d = np.asarray(gap, dtype=np.float64)
    s = np.asarray(se, dtype=np.float64)
    n = lx.size
    with np.errstate(invalid="ignore"):
        above = np.isfinite(d) & (d - z * s > threshold)
        below = np.isfinite(d) & ~above
    # ends[j]: one past the last grid point of the sustain window that starts at j; > n when the data end first.
    ends = np.maximum(np.searchsorted(lx, lx + window + 1e-12, side="right"), np.arange(n) + MIN_SUSTAIN_POINTS)
    covered = (lx + window <= lx[-1] + 1e-12) & (ends <= n) if n else np.zeros(0, dtype=bool)
    sustained_above = covered & _all_in(above, ends)
    sustained_below = covered & _all_in(below, ends)

    transients: list[tuple[int, int]] = []
    j = 0
    while j < n:
        start = _first(sustained_above, j)
        if start < 0:
            break
        back = _first(sustained_below, start + 1)
        if back < 0:
            return FalloffDetection(FALLOFF, start, d, s, float(sigma), transients)
        transients.append((start, back))
        j = back
    # No confirmed falloff: an excursion running to the end of the data, shorter than the window, is tentative.
    tail = n
    while tail > 0 and above[tail - 1]:
        tail -= 1
    last_transient_end = transients[-1][1] if transients else 0
    if n - tail >= 2 and tail >= last_transient_end:
        return FalloffDetection(TENTATIVE, tail, d, s, float(sigma), transients)
    return FalloffDetection(NONE, -1, d, s, float(sigma), transients)


def classify_lag(gap: Any, *, points: int = MIN_SUSTAIN_POINTS) -> tuple[bool, float, float]:
    """Whether a gap that is above from the first steps closes: (closing, gap at the start, gap at the end).

    Start and end are medians of the first and last ``points`` finite grid values; the gap closes when the end is
    below :data:`CLOSING` of the start.

    Examples
    --------
    >>> classify_lag([0.8, 0.7, 0.6, 0.4, 0.2, 0.1, 0.05, 0.05])[0]      # behind early, then catching up
    True
    >>> classify_lag([0.3, 0.3, 0.35, 0.4, 0.4, 0.45, 0.5, 0.5])[0]      # behind and staying behind
    False
    """
    d = np.asarray(gap, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size < 2 * points:
        return False, float("nan"), float("nan")
    start, end = float(np.median(d[:points])), float(np.median(d[-points:]))
    return bool(start > 0 and end < CLOSING * start), start, end


@dataclass(frozen=True)
class LossRise:
    """Whether a run's own training loss rose (:func:`loss_rose`), and the medians it was judged on."""

    rose: bool
    how: str  # "ended above its start", "climbed back at the end" or "" (it did not rise)
    start: float
    lowest: float
    end: float


def loss_rose(loss: Any, *, threshold: float, z: float, points: int = MIN_SUSTAIN_POINTS, relative: bool = False,
              give_back: float = GIVE_BACK) -> LossRise:
    """Whether a run's loss (in the order of the data axis) rose: it ended above where it started, or, having
    learned, it climbed back at the end by ``give_back`` or more of what it had learned.

    Start, end and the lowest level are medians of ``points`` consecutive losses (the first, the last, and the
    lowest before the last stretch), so that one bad batch decides nothing; a rise counts when it clears
    ``threshold`` (a share of the start when ``relative``) by ``z`` standard errors of the difference of two such
    medians (the noise from the losses' deviations from their own running median): the margin. A climb back is
    read only when the lowest is :data:`LEARNED_MARGINS` margins below the start: on a run that barely learned, the
    lowest of many noisy medians sits below the rest by chance. A LoRA starts from its base
    model exactly (B = 0), so a rise means training made the model worse: an unstable run, not a capacity effect.

    Examples
    --------
    >>> loss_rose([3.4, 3.3, 3.1, 2.9, 2.8, 2.7, 2.6, 2.5, 2.5, 2.4], threshold=0.02, z=2).rose   # learning
    False
    >>> loss_rose([3.4, 3.3, 3.5, 3.6, 4.1, 4.8, 5.0, 5.1, 5.0, 5.2], threshold=0.02, z=2).how
    'ended above its start'
    >>> loss_rose([3.4, 3.3, 2.1, 1.2, 0.6, 0.3, 0.2, 0.2, 0.3, 1.0, 1.4, 5.8], threshold=0.02, z=2).how
    'climbed back at the end'
    """
    values = np.asarray(loss, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size < 3 * points:
        return LossRise(False, "", float("nan"), float("nan"), float("nan"))
    medians = np.median(np.lib.stride_tricks.sliding_window_view(values, points), axis=1)
    start, end, lowest = float(medians[0]), float(medians[-1]), float(medians[:-points].min())
    residual = values[points // 2: points // 2 + medians.size] - medians
    sigma = MAD_TO_SIGMA * float(np.median(np.abs(residual)))
    scale = abs(start) if relative else 1.0
    margin = threshold * scale + z * MEDIAN_SE * sigma * np.sqrt(2.0 / points)
    if end - start > margin:
        return LossRise(True, "ended above its start", start, lowest, end)
    learned = start - lowest > LEARNED_MARGINS * margin  # a climb back is read only after clear progress
    if learned and end - lowest > margin and end - lowest >= give_back * (start - lowest):
        return LossRise(True, "climbed back at the end", start, lowest, end)
    return LossRise(False, "", start, lowest, end)


def _all_in(flags: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Whether flags[j:ends[j]] are all true, for every j (ends clipped to the length)."""
    counts = np.concatenate([[0], np.cumsum(flags)])
    ends = np.minimum(ends, flags.size)
    idx = np.arange(flags.size)
    return (counts[ends] - counts[idx]) == (ends - idx)


def _first(flags: np.ndarray, start: int) -> int:
    hits = np.flatnonzero(flags[start:])
    return int(start + hits[0]) if hits.size else -1
