"""The contributions of ``lorascope analyze``: the held-batch losses of the final snapshot (recorded with
``contributions=True``) handed to :func:`lorascope.analysis.contributions.contributions` with the forecast's bits.
When there are none, one sentence says why."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lorascope.analysis.contributions import Contributions, contributions
from lorascope.analysis.forecast import Forecast
from lorascope.workflows.forecast import active_experts, matrices_of

__all__ = ["MISSING", "contributions_of_run"]

MISSING = "record with contributions=True and a held batch"


def contributions_of_run(run: Any, ranks: Sequence[int],
                         forecast: Forecast | None) -> tuple[Contributions | None, str | None]:
    """Contributions at the final snapshot of ``run`` (a :class:`~lorascope.workflows.analyze.RunResult`), or
    None and why."""
    held = run.final_held
    if held is None or not np.isfinite(float(held["held_loss"])):
        return None, f"{run.path} has no held-batch losses at its final snapshot: {MISSING}"
    modules = run.modules
    without_layer = held["held_loss_without_layer"].values
    layered = bool(np.isfinite(without_layer).any())
    result = contributions(float(held["held_loss"]), float(held["held_loss_start"]),
                           held["held_loss_without_kind"].values, matrices_of(modules), ranks,
                           layers=modules["layer"].to_numpy() if layered else None,
                           loss_without_layer=without_layer if layered else None,
                           forecast=None if run.is_lora else forecast,
                           active_experts=active_experts((run.config.get("model") or {}).get("config")),
                           step=int(held["step"]))
    return result, None
