"""Gradient noise scale from squared gradient norms at two batch sizes (McCandlish et al. 2018, appendix A).

With :math:`E|G_B|^2 = |G|^2 + \\mathrm{tr}(\\Sigma)/B`, norms at batch sizes :math:`b < B` give unbiased per-step
estimates

.. math:: |G|^2 \\approx \\frac{B\\,|G_B|^2 - b\\,|G_b|^2}{B - b}, \\qquad
          \\mathrm{tr}(\\Sigma) \\approx \\frac{|G_b|^2 - |G_B|^2}{1/b - 1/B}

Single-step values are noisy (the trace estimate can be negative), so each gets its own bias-corrected
exponential moving average and the noise scale is their ratio,
:math:`B_{\\mathrm{simple}} = \\mathrm{EMA}[\\mathrm{tr}\\Sigma] / \\mathrm{EMA}[|G|^2]`: a ratio of means, never a
mean of ratios (which is biased). Norms add over parameter blocks, so a group of modules (a kind) sums its
modules' squared norms before estimating.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from lorascope._checks import check_positive
from lorascope.errors import InvalidOptionError

__all__ = ["BatchAdvice", "NoiseScale", "batch_tradeoff", "noise_scale", "unbiased_estimates"]

DEFAULT_SMOOTHING = 0.95
FULL_FT_WARN_FACTOR = 4.0  # full fine-tuning: warn when B > 4 B_noise (data efficiency E/E_min > 5)
LORA_WARN_FACTOR = 1.0  # LoRA: warn already above B_noise (LoRA Without Regret: LoRA tolerates large batches less)


def unbiased_estimates(sq_small: Any, sq_big: Any, b_small: Any, b_big: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-step unbiased estimates of :math:`|G|^2` and :math:`\\mathrm{tr}(\\Sigma)` (NaN where not measured).

    Examples
    --------
    >>> g2, tr = unbiased_estimates(1.0 + 8.0 / 2, 1.0 + 8.0 / 8, 2, 8)  # |G|^2 = 1, tr(Sigma) = 8
    >>> float(g2), float(tr)
    (1.0, 8.0)
    """
    s, big = np.asarray(sq_small, dtype=np.float64), np.asarray(sq_big, dtype=np.float64)
    b, bb = np.asarray(b_small, dtype=np.float64), np.asarray(b_big, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        valid = (bb > b) & (b > 0)
        g2 = np.where(valid, (bb * big - b * s) / (bb - b), np.nan)
        trace = np.where(valid, (s - big) / (1.0 / b - 1.0 / bb), np.nan)
    return g2, trace


def _ema(values: np.ndarray, smoothing: float) -> np.ndarray:
    """Bias-corrected EMA along axis 0 that skips NaN steps (unmeasured steps do not decay the average)."""
    out = np.full(values.shape, np.nan)
    acc = np.zeros(values.shape[1:])
    weight = np.zeros(values.shape[1:])
    for t in range(values.shape[0]):
        seen = np.isfinite(values[t])
        acc = np.where(seen, smoothing * acc + (1 - smoothing) * np.nan_to_num(values[t]), acc)
        weight = np.where(seen, smoothing * weight + (1 - smoothing), weight)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[t] = np.where(weight > 0, acc / weight, np.nan)
    return out


@dataclass
class NoiseScale:
    """The noise scale of one run, per group of modules ("all" and each kind), over steps.

    Attributes
    ----------
    series : xarray.Dataset
        Over (step, group): per-step ``g2`` and ``trace`` estimates, their EMAs, ``b_simple`` (EMA ratio), with
        ``examples_seen`` on ``step``.
    final : dict
        Per group: ``b_simple``, the ratio of the means of the trace and |G|^2 estimates over the last half of the
        measured steps (the noise scale late in the run), its bootstrap interval (same ratio over resampled
        steps), ``b_simple_ema_last`` (the EMA ratio at the last step), the number of measured steps and of
        steps with a negative trace estimate.
    batch_small, batch_big : float
        Median batch sizes of the two norms.
    """

    series: xr.Dataset
    final: dict[str, dict[str, Any]]
    batch_small: float
    batch_big: float
    source: str
    smoothing: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "smoothing": self.smoothing, "batch_small": _num(self.batch_small),
                "batch_big": _num(self.batch_big), "groups": self.final, "notes": list(self.notes)}


def noise_scale(steps: xr.Dataset, *, smoothing: float = DEFAULT_SMOOTHING, n_boot: int = 1000,
                confidence: float = 0.9, seed: int = 0) -> NoiseScale | None:
    """Estimate :math:`B_{\\mathrm{simple}}` over a run's steps, for all modules and per kind.

    Parameters
    ----------
    steps
        A run's steps view with ``gns_sq_norm_small`` / ``gns_sq_norm_big`` (step, module), ``gns_batch_small`` /
        ``gns_batch_big`` (step) and the module coordinate ``kind``.
    smoothing
        EMA factor in [0, 1): weight of the past.

    Returns
    -------
    NoiseScale or None
        None when no step has norms at two batch sizes.
    """
    if not 0.0 <= smoothing < 1.0:
        raise InvalidOptionError(f"The 'smoothing' parameter of noise_scale must be in [0, 1). "
                                 f"Got {smoothing!r} instead.")
    b_small = steps["gns_batch_small"].values.astype(np.float64)
    b_big = steps["gns_batch_big"].values.astype(np.float64)
    measured = np.isfinite(b_small) & np.isfinite(b_big) & (b_big > b_small)
    if not measured.any():
        return None
    small = steps["gns_sq_norm_small"].values.astype(np.float64)
    big = steps["gns_sq_norm_big"].values.astype(np.float64)
    kinds = steps["kind"].values.astype(str)
    groups = ["all", *sorted(set(kinds))]
    # Modules with non-finite norms at a step are left out of that step's sums.
    ok = np.isfinite(small) & np.isfinite(big)
    sums_small = np.stack([np.where(ok & (kinds == g) if g != "all" else ok, small, 0.0).sum(1) for g in groups], 1)
    sums_big = np.stack([np.where(ok & (kinds == g) if g != "all" else ok, big, 0.0).sum(1) for g in groups], 1)
    sums_small[~measured], sums_big[~measured] = np.nan, np.nan
    g2, trace = unbiased_estimates(sums_small, sums_big, b_small[:, None], b_big[:, None])
    ema_g2, ema_trace = _ema(g2, smoothing), _ema(trace, smoothing)
    with np.errstate(invalid="ignore", divide="ignore"):
        b_simple = np.where(ema_g2 > 0, ema_trace / ema_g2, np.nan)
    series = xr.Dataset(
        {"g2": (("step", "group"), g2), "trace": (("step", "group"), trace),
         "ema_g2": (("step", "group"), ema_g2), "ema_trace": (("step", "group"), ema_trace),
         "b_simple": (("step", "group"), b_simple)},
        coords={"step": steps["step"].values, "group": groups,
                "examples_seen": ("step", steps["examples_seen"].values)},
    )
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(measured)
    tail = rows[len(rows) // 2:]
    final = {}
    for j, group in enumerate(groups):
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_g2 = np.mean(g2[tail, j])
            estimate = np.mean(trace[tail, j]) / mean_g2 if mean_g2 > 0 else np.nan
        low = high = np.nan
        if tail.size >= 4:
            draws = []
            for _ in range(n_boot):
                pick = rng.choice(tail, tail.size)
                mg, mt = np.mean(g2[pick, j]), np.mean(trace[pick, j])
                draws.append(mt / mg if mg > 0 else np.nan)
            with np.errstate(invalid="ignore"):
                low, high = np.nanquantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2])
        final[group] = {"b_simple": _num(estimate), "interval": [_num(low), _num(high)], "confidence": confidence,
                        "b_simple_ema_last": _num(b_simple[rows[-1], j]), "steps_used": int(tail.size),
                        "measured_steps": int(measured.sum()),
                        "negative_trace_steps": int(np.sum(trace[rows, j] < 0))}
    notes = []
    negative = final["all"]["negative_trace_steps"]
    if negative:
        notes.append(f"{negative} of {int(measured.sum())} single-step estimates of tr(Sigma) were negative "
                     "(expected: they are noisy); the EMA ratio is the estimate")
    return NoiseScale(series, final, float(np.median(b_small[measured])), float(np.median(b_big[measured])),
                      source="two batch sizes", smoothing=smoothing, notes=notes)


@dataclass(frozen=True)
class BatchAdvice:
    """Steps and examples multipliers for candidate batch sizes against a noise scale, and a verdict."""

    b_noise: float
    batch: float
    lora: bool
    candidates: tuple[float, ...]
    steps_factor: tuple[float, ...]  # S / S_min = 1 + B_noise / B
    examples_factor: tuple[float, ...]  # E / E_min = 1 + B / B_noise
    warning: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"b_noise": _num(self.b_noise), "batch": _num(self.batch), "lora": self.lora,
                "candidates": [{"batch": b, "steps_factor": s, "examples_factor": e}
                               for b, s, e in zip(self.candidates, self.steps_factor, self.examples_factor)],
                "warning": self.warning}


def batch_tradeoff(b_noise: float, batch: float, *, lora: bool = False,
                   candidates: tuple[float, ...] | None = None) -> BatchAdvice:
    """The steps / examples tradeoff of McCandlish et al. with :math:`B_{\\mathrm{crit}} \\approx B_{\\mathrm{noise}}`.

    .. math:: S / S_{\\min} = 1 + B_{\\mathrm{noise}} / B, \\qquad E / E_{\\min} = 1 + B / B_{\\mathrm{noise}}

    A warning is issued when the batch is well above the noise scale: above 4 B_noise for full fine-tuning
    (more than 5x the minimal data for the same loss), and already above B_noise for a LoRA run, since LoRA
    shows a loss penalty that grows with batch size, independent of rank (Schulman et al., "LoRA Without
    Regret", 2025).

    Examples
    --------
    >>> advice = batch_tradeoff(64.0, 256.0, lora=True)
    >>> advice.examples_factor[advice.candidates.index(256.0)]
    5.0
    """
    check_positive("b_noise", b_noise, "batch_tradeoff")
    check_positive("batch", batch, "batch_tradeoff")
    if candidates is None:
        candidates = tuple(sorted({float(2**k) for k in range(0, 14)} | {float(batch)}))
    steps = tuple(1.0 + b_noise / c for c in candidates)
    examples = tuple(1.0 + c / b_noise for c in candidates)
    factor = LORA_WARN_FACTOR if lora else FULL_FT_WARN_FACTOR
    warning = None
    if batch > factor * b_noise:
        who = "a LoRA run" if lora else "full fine-tuning"
        warning = (f"batch {batch:g} is {batch / b_noise:.1f}x the noise scale B_noise ~ {b_noise:.3g}: {who} at "
                   f"this batch needs ~{1 + batch / b_noise:.1f}x the examples of a small-batch run for the same loss"
                   + ("; LoRA's loss penalty vs full fine-tuning grows with batch size (LoRA Without Regret, 2025)"
                      if lora else ""))
    return BatchAdvice(float(b_noise), float(batch), lora, tuple(candidates), steps, examples, warning)


def _num(value: Any) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None
