"""The forecast of ``lorascope analyze``: a full fine-tuning recording read as a probe.

Picks the full fine-tuning runs of an analysis, measures their information with the estimator
``lorascope recommend --probe`` uses, reads the LoRA-adaptable matrices off the run's modules table, and hands
both to :func:`lorascope.analysis.forecast.forecast`. When no forecast can be made, one sentence says why.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

from lorascope.analysis.capacity import CapacityConstant
from lorascope.analysis.forecast import ACTIVE_EXPERT_KEYS, Forecast, active_experts, forecast, matrices_of
from lorascope.analysis.information import recorded_dataset_examples, recorded_vocab_size
from lorascope.analysis.recipe import RecipeInformation, information_as_run
from lorascope.errors import InvalidOptionError

__all__ = ["ACTIVE_EXPERT_KEYS", "active_experts", "forecast_runs", "matrices_of"]  # the first two and the last:
# re-exported from lorascope.analysis.forecast, where the live capacity share (analysis/live.py) reads them too


def forecast_runs(runs: Sequence[Any], ranks: Sequence[int], *,
                  constant: CapacityConstant | None = None) -> tuple[Forecast | None, str | None]:
    """The forecast from an analysis's runs (:class:`~lorascope.workflows.analyze.RunResult`), or None and why.

    Every full fine-tuning run with a recorded dataset size counts, as one dataset size of the growth law.
    """
    full = [run for run in runs if not run.is_lora]
    if not full:
        return None, ("every run is a LoRA recording: what a LoRA absorbs is capped by its own capacity, so the "
                      "forecast needs a full fine-tuning recording of the same data")
    rl = [run for run in full if run.config.get("task") == "rl"]
    if rl:
        return None, (f"{rl[0].path} is an RL run (config task 'rl'): its bits are per episode, not its loss's "
                      "(lorascope recommend --task rl); the forecast reads supervised fine-tuning recordings")
    informations: list[RecipeInformation] = []
    for run in full:
        examples = recorded_dataset_examples(run.config)
        if examples is None:
            return None, (f"{run.path} does not record its dataset size (config dataset.examples): the HF and "
                          "Lightning integrations write it; in a plain loop pass extra_config={'dataset': "
                          "{'examples': N}} to lorascope.record")
        try:
            informations.append(information_as_run(run.steps, dataset_examples=examples,
                                                   vocab_size=recorded_vocab_size(run.config)))
        except InvalidOptionError as exc:
            return None, f"{run.path}: {exc}"
    largest = max(range(len(full)), key=lambda i: informations[i].dataset_examples)
    config = full[largest].config
    truth = (config.get("dataset") or {}).get("bits_per_example")
    result = forecast(informations, matrices_of(full[largest].modules), ranks, constant=constant,
                      active_experts=active_experts((config.get("model") or {}).get("config")),
                      truth_bits_per_example=float(truth) if isinstance(truth, numbers.Real) else None)
    if not result.rows:
        return None, "no recorded matrix is one a LoRA adapts (attention, MLP, MoE experts or other linear layers)"
    result.notes.extend(n for info in informations for n in info.notes)
    result.notes.extend(f"{run.path} diverged at step {run.divergence.step}: its bits come from the finite losses "
                        "before it, what the data asks only as far as the run got" for run in full
                        if getattr(run, "divergence", None) is not None)
    return result, None
