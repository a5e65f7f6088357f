"""Where a run stopped being finite, and which updates did not move at all.

A diverged run keeps being recorded: its loss, gradient norms and updates turn NaN or Inf from some step on.
:func:`find_divergence` locates that step three ways, from what a run file holds:

- the **loss**: the first step whose loss is ±Inf, or NaN while a recorded gradient is non-finite at the same
  step in a run that reported a finite loss before (a NaN loss alone also means "not reported", the file's fill
  value, so it needs the gradient to confirm it);
- the **gradient**, per matrix: the first step whose squared gradient norm is +Inf (the recorder stores +Inf for a
  gradient holding NaN or Inf, and NaN for a matrix without a gradient at that step, which is not a divergence);
- the **update**, per matrix: the first snapshot whose update :math:`\\Delta = W_t - W_0` holds NaN or Inf entries
  (``delta_nonfinite`` > 0), or whose energy is not finite.

:func:`zero_updates` counts the other non-finite source of a report: an update that is exactly zero (a learning
rate of 0, a matrix that never received a gradient), whose ranks are undefined (NaN, "n/a" in reports).
:func:`missing_gradients` counts, per matrix, the steps without a gradient (NaN norm: frozen for part of the run,
unused by the forward pass, a skipped step), which are not a divergence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

__all__ = ["Divergence", "ModuleDivergence", "find_divergence", "missing_gradients", "zero_updates"]


@dataclass(frozen=True)
class ModuleDivergence:
    """Where one recorded matrix stopped being finite (None: never, or not recorded)."""

    module: str
    gradient_step: int | None
    update_step: int | None

    @property
    def step(self) -> int:
        return min(s for s in (self.gradient_step, self.update_step) if s is not None)

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "first_nonfinite_gradient_step": self.gradient_step,
                "first_nonfinite_update_step": self.update_step}


@dataclass(frozen=True)
class Divergence:
    """Where a run diverged.

    Attributes
    ----------
    step : int
        The first optimizer step at which anything recorded is non-finite (the earliest of the three below).
    examples_seen : int or None
        Examples seen up to that step (None when the step is not in the steps table).
    loss_step, gradient_step, update_step : int or None
        The first step with a non-finite loss, with a non-finite gradient of some matrix, and the first snapshot
        step with a non-finite update (None where none was found).
    modules : tuple[ModuleDivergence, ...]
        Every matrix with a non-finite gradient or update, earliest first.
    """

    step: int
    examples_seen: int | None
    loss_step: int | None
    gradient_step: int | None
    update_step: int | None
    modules: tuple[ModuleDivergence, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "examples_seen": self.examples_seen,
                "first_nonfinite_loss_step": self.loss_step,
                "first_nonfinite_gradient_step": self.gradient_step,
                "first_nonfinite_update_step": self.update_step,
                "modules": [m.to_dict() for m in self.modules]}


def _first(steps: np.ndarray, flags: np.ndarray) -> int | None:
    """The step of the first True in ``flags`` (along the first axis), or None."""
    hits = np.flatnonzero(flags)
    return int(steps[hits[0]]) if hits.size else None


def find_divergence(steps: xr.Dataset, snapshots: xr.Dataset | None = None) -> Divergence | None:
    """The first non-finite loss, gradient and update of a run, or None when everything stayed finite.

    Parameters
    ----------
    steps
        A run's steps view (``loss``, and where recorded ``grad_sq_norm`` (step, module) and
        ``grad_nonfinite_modules``), indexed by ``step``.
    snapshots
        A run's snapshots view (``energy``, ``delta_nonfinite`` (snapshot, module)), or None without snapshots.

    Examples
    --------
    >>> steps = xr.Dataset({"loss": ("step", [2.0, 1.5, np.inf, np.nan])}, coords={"step": [1, 2, 3, 4]})
    >>> find_divergence(steps).step
    3
    >>> find_divergence(steps.isel(step=[0, 1])) is None
    True
    """
    step_ids = steps["step"].values if "step" in steps.coords else np.arange(1, steps.sizes.get("step", 0) + 1)
    n = step_ids.size
    bad_grad_rows = (steps["grad_nonfinite_modules"].values > 0) if "grad_nonfinite_modules" in steps \
        else np.zeros(n, dtype=bool)
    loss = steps["loss"].values.astype(np.float64) if "loss" in steps else np.full(n, np.nan)
    reported = np.logical_or.accumulate(np.isfinite(loss)) if n else np.zeros(0, dtype=bool)  # a loss before
    loss_step = _first(step_ids, np.isinf(loss) | (np.isnan(loss) & bad_grad_rows & reported))

    names = [str(m) for m in steps["module"].values] if "module" in steps.coords else []
    grad_steps: dict[str, int] = {}
    if "grad_sq_norm" in steps and n:
        grad = steps["grad_sq_norm"].transpose("step", "module").values
        for j, name in enumerate(names):
            hit = _first(step_ids, np.isposinf(grad[:, j]))
            if hit is not None:
                grad_steps[name] = hit
    update_steps: dict[str, int] = {}
    if snapshots is not None and snapshots.sizes.get("snapshot", 0):
        snap_ids = snapshots["step"].values
        energy = snapshots["energy"].transpose("snapshot", "module").values
        bad = ~np.isfinite(energy)
        if "delta_nonfinite" in snapshots:
            bad |= snapshots["delta_nonfinite"].transpose("snapshot", "module").values > 0
        for j, name in enumerate(str(m) for m in snapshots["module"].values):
            hit = _first(snap_ids, bad[:, j])
            if hit is not None:
                update_steps[name] = hit

    modules = tuple(sorted((ModuleDivergence(name, grad_steps.get(name), update_steps.get(name))
                            for name in dict.fromkeys([*grad_steps, *update_steps])),
                           key=lambda m: (m.step, m.module)))
    gradient_step = min(grad_steps.values()) if grad_steps else None
    update_step = min(update_steps.values()) if update_steps else None
    found = [s for s in (loss_step, gradient_step, update_step) if s is not None]
    if not found:
        return None
    first = min(found)
    seen = steps["examples_seen"].values[step_ids == first] if "examples_seen" in steps else np.array([])
    examples = int(seen[0]) if seen.size and seen[0] >= 0 else None
    return Divergence(step=first, examples_seen=examples, loss_step=loss_step, gradient_step=gradient_step,
                      update_step=update_step, modules=modules)


def zero_updates(metrics: xr.Dataset) -> np.ndarray:
    """(snapshot, module) True where the update is finite and exactly zero: the matrix has not moved.

    Its energy ranks, residuals and captures are undefined (NaN); aggregates weight it by its energy, zero.
    """
    return (metrics["valid"] & (metrics["energy"] == 0)).values


def missing_gradients(steps: xr.Dataset) -> dict[str, int]:
    """Per recorded matrix with at least one, the number of steps without a gradient (``grad_sq_norm`` NaN).

    Files written before the recorder stored a non-finite gradient as +Inf hold NaN for both; there a NaN
    gradient is counted here.

    >>> steps = xr.Dataset({"grad_sq_norm": (("step", "module"), [[1.0, np.nan], [np.inf, np.nan]])},
    ...                    coords={"step": [1, 2], "module": ["a", "b"]})
    >>> missing_gradients(steps)
    {'b': 2}
    """
    if "grad_sq_norm" not in steps or not steps.sizes.get("step", 0):
        return {}
    counts = np.isnan(steps["grad_sq_norm"].transpose("step", "module").values).sum(axis=0)
    return {str(m): int(c) for m, c in zip(steps["module"].values, counts) if c}
