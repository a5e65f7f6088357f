"""``lorascope.compare``: LoRA runs against a full fine-tuning run of the same data, and where each LoRA rank
leaves the full fine-tuning loss curve (LoRA Without Regret, Schulman et al. 2025: low-rank LoRA "falls off the
minimum-loss curve" after a number of steps that grows with rank).

Reads the run files (their per-step loss and data axis, the PEFT configuration of each LoRA run), checks that the
runs are comparable, and hands their loss series to :mod:`lorascope.analysis.comparison`, which applies the falloff
rule of :mod:`lorascope.analysis.falloff` to each LoRA run. Reports render the :class:`Comparison`; they never read
run files.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorascope._checks import check_non_negative, check_positive, check_positive_int
from lorascope.analysis.comparison import (
    DEFAULT_MIN_POINTS,
    DEFAULT_SMOOTH,
    DEFAULT_THRESHOLD,
    DEFAULT_WINDOW,
    DEFAULT_Z,
    X_AXES,
    Comparison,
    Criterion,
    LoraResult,
    LossSeries,
    PredictionRow,
    RunCurve,
    check_data,
    falloff_against,
    lora_identity,
    loss_curve,
    numerical_rank,
    prediction_rows,
)
from lorascope.analysis.departure import absorbed_bits_curve, expected_departures
from lorascope.analysis.divergence import find_divergence
from lorascope.analysis.information import recorded_dataset_examples
from lorascope.errors import InvalidOptionError, LorascopeError
from lorascope.store.reader import Run
from lorascope.workflows.runs import LoadedRun, ModelFacts, RunLike, check_same_model, load_run
from lorascope.workflows.subspace import compare_subspaces

__all__ = ["Comparison", "Criterion", "LoraResult", "PredictionRow", "RunCurve", "compare", "read_predictions"]


def compare(full: RunLike, loras: RunLike | Sequence[RunLike], *, x: str = "examples_seen",
            threshold: float = DEFAULT_THRESHOLD, window: float = DEFAULT_WINDOW, smooth: float = DEFAULT_SMOOTH,
            z: float = DEFAULT_Z, min_points: int = DEFAULT_MIN_POINTS, relative: bool = False,
            ranks: Sequence[int | None] | None = None, labels: Sequence[str] | None = None,
            predictions: Mapping[Any, float] | None = None,
            capacities: Mapping[Any, float] | None = None, progress: Callable[[Any], Any] | None = None
            ) -> Comparison:
    """Where each LoRA run leaves the full fine-tuning loss curve.

    For each LoRA run, the raw gap :math:`d_i = L^{\\mathrm{LoRA}}_i - L^{\\mathrm{Full}}(x_i)` (full fine-tuning
    interpolated in :math:`\\log x`) is smoothed by a moving median over :math:`\\log_{10} x \\pm h`; with the
    robust noise level :math:`\\sigma = 1.4826\\,\\mathrm{MAD}` and a median's standard error
    :math:`\\mathrm{SE} = 1.2533\\,\\sigma/\\sqrt{n}`, the falloff is the first x from which

    .. math:: \\hat d(x') - z\\,\\mathrm{SE}(x') > \\tau \\quad \\text{for all } x' \\in [x,\\ 10^{W} x],

    unless the gap is later not above :math:`\\tau` (by z standard errors) for a window of the same length: a
    transient excursion, after which the search goes on. See ``docs/compare.md``.

    Parameters
    ----------
    full
        The full fine-tuning run: a path or an open :class:`~lorascope.Run` (left open).
    loras
        One or more LoRA runs of the same model on the same data.
    x
        Data axis: "examples_seen" (default), "tokens_seen" or "step".
    threshold
        :math:`\\tau` (default 0.02: nats per token, a 2% perplexity ratio; or 2% of the loss if ``relative``).
    window
        W in decades (default 0.2: the gap must hold while the data grow 1.58x).
    smooth
        h in decades (default 0.05: medians over x / 1.12 .. x * 1.12).
    z
        Standard errors the gap must clear the threshold by (default 2).
    min_points
        Smallest number of steps per median (default 9).
    relative
        Use the relative gap :math:`d_i / L^{\\mathrm{Full}}(x_i)`.
    ranks
        Explicit LoRA rank per LoRA run (None entries: read from the file). A run given a rank is accepted even
        without a PEFT configuration (for instance a hand-written LoRA).
    labels
        Display names per LoRA run (default "r=<rank>", with the file name where ranks repeat).
    predictions
        Predicted falloff per rank, in units of ``x``: each becomes a predicted-vs-measured row.
    capacities
        Instead of ``predictions``: the bits each rank's LoRA holds (``capacity_bits`` of ``lorascope recommend``
        or of analyze's forecast). They are translated into the units compare measures in: the point where the full
        fine-tuning run has absorbed that many bits (:mod:`lorascope.analysis.departure`; needs the full run's
        dataset size).
    progress
        Optional wrapper of an iterable (e.g. ``tqdm.tqdm``) for a progress bar over the LoRA runs read.

    Returns
    -------
    Comparison

    Raises
    ------
    LorascopeError
        No LoRA run; the full run is a LoRA run or a LoRA run is not; runs of different models; the data axis is
        not recorded; fewer than 8 usable or shared steps; an unreadable file (a
        :class:`~lorascope.errors.RunFileError`); an invalid parameter (:class:`~lorascope.errors.InvalidOptionError`).
    """
    criterion = _criterion(threshold, window, smooth, z, min_points, relative)
    if x not in X_AXES:
        raise InvalidOptionError(f"The 'x' parameter of compare must be one of {X_AXES}. Got {x!r} instead.")
    lora_list = [loras] if isinstance(loras, (str, os.PathLike, Run)) else list(loras)
    if not lora_list:
        raise LorascopeError("compare needs at least one LoRA run after the full fine-tuning run")
    ranks = _per_run(ranks, len(lora_list), "ranks")
    labels = _per_run(labels, len(lora_list), "labels")
    preds = _predictions(predictions)
    notes: list[str] = []

    full_run = load_run(full, snapshots="none")
    if _is_lora(full_run):
        raise LorascopeError(f"{full_run.path}: is a LoRA run ({_lora_evidence(full_run)}); the first run must be "
                             "full fine-tuning")
    full_facts = ModelFacts.of_run(full_run)
    _note_divergence(full_run, "the full fine-tuning run", notes)
    loaded = []
    pairs = list(zip(lora_list, ranks))
    for source, rank in progress(pairs) if progress else pairs:
        item = load_run(source, snapshots="lora")
        if Path(item.path) == Path(full_run.path):
            raise LorascopeError(f"{item.path}: given both as the full fine-tuning run and as a LoRA run")
        if rank is None and not _is_lora(item):
            raise LorascopeError(f"{item.path}: not a LoRA run (no PEFT LoRA config, no LoRA layers recorded); "
                                 "compare takes the full fine-tuning run first, then LoRA runs (give its rank "
                                 "explicitly for a LoRA PEFT does not describe)")
        check_same_model(full_facts, ModelFacts.of_run(item), refusal="cannot be compared", notes=notes)
        _note_divergence(item, "LoRA run", notes)
        loaded.append(item)
    full_series, series = _series(full_run), [_series(item) for item in loaded]
    check_data(full_series, series, x, notes)

    identities = [lora_identity(item.path, item.config.get("lora"), _spectrum_rank(item), rank, notes)
                  for item, rank in zip(loaded, ranks)]
    default_labels = _labels([identity.rank for identity in identities], [item.path for item in loaded])
    full_curve = loss_curve(full_series, x, "full fine-tuning", criterion)
    results = [falloff_against(full_curve, loss_curve(run, x, label or default, criterion), identity, criterion, x,
                               notes)
               for run, identity, label, default in zip(series, identities, labels, default_labels)]
    if capacities is not None:
        if preds:
            raise InvalidOptionError("Give predicted falloffs either as points of the data axis (predictions) or as "
                                     "capacities in bits (capacities), not both.")
        preds = _departures(_predictions(capacities, "capacities"), full_run, full_series, x, notes)
    subspace = compare_subspaces(full, [(source, result.run.label, identity.rank)
                                        for source, result, identity in zip(lora_list, results, identities)],
                                 recorded_dataset_examples(full_run.config))
    return Comparison(x=x, criterion=criterion, full=full_curve, loras=results,
                      predictions=prediction_rows(preds, results), notes=notes, subspace=subspace)


def _departures(capacities: dict[int, float], run: LoadedRun, series: LossSeries, x: str, notes: list[str]
                ) -> dict[int, float]:
    """Each rank's capacity as the point of ``x`` where full fine-tuning has absorbed it (inf: not in the run)."""
    dataset = recorded_dataset_examples(run.config)
    steps = run.steps
    tokens = steps["batch_loss_tokens"].values if "batch_loss_tokens" in steps else np.array([-1])
    if not (tokens > 0).any():
        tokens = steps["batch_tokens"].values
    examples = steps["batch_examples"].values
    known = (tokens > 0) & (examples > 0)
    if dataset is None or not known.any():
        notes.append(f"{run.path}: capacities cannot be placed on the curve without the run's dataset size and its "
                     "token counts; no predicted rows")
        return {}
    absorbed = absorbed_bits_curve(series.examples_seen, series.loss,
                                   loss_tokens_per_example=float(tokens[known].sum() / examples[known].sum()),
                                   dataset_examples=float(dataset))
    seen = expected_departures(capacities, series.examples_seen, absorbed)
    usable = series.usable("examples_seen")
    notes.append(f"predicted falloffs: where {run.path} had absorbed each rank's capacity (bits), "
                 "docs/compare.md")
    return {rank: value if math.isinf(value) else float(np.interp(value, series.examples_seen[usable],
                                                                    series.axis(x)[usable]))
            for rank, value in seen.items()}


def read_predictions(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The predictions file of ``lorascope compare --predictions``, as keyword arguments of :func:`compare`: a JSON
    object mapping LoRA ranks to predicted falloffs in units of the data axis, e.g. ``{"1": 2000}``
    (``{"predictions": ...}``), or the output of ``lorascope recommend --json``, whose capacity per rank in bits
    compare places on the full fine-tuning run's curve (``{"capacities": ...}``).

    Raises
    ------
    InvalidOptionError
        The file is missing, not JSON, or not a JSON object.
    """
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidOptionError(f"{file}: no such predictions file") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidOptionError(f"{file}: not a readable JSON predictions file ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise InvalidOptionError(f"{file}: predictions must be a JSON object mapping LoRA ranks to predicted "
                                 f"falloffs, e.g. {{\"1\": 2000, \"4\": 9000}}; got a JSON {type(data).__name__}")
    if data.get("format") == "lorascope-recommend":  # `lorascope recommend --json`: each rank's capacity in bits
        return {"capacities": {str(p["rank"]): p["capacity_bits"] for p in data.get("predictions", [])}}
    return {"predictions": data}


# -- reading ---------------------------------------------------------------------------------------------------


def _is_lora(run: LoadedRun) -> bool:
    return bool(run.config.get("lora")) or run.records_lora


def _lora_evidence(run: LoadedRun) -> str:
    return "a PEFT LoRA config" if run.config.get("lora") else "LoRA layers recorded"


def _series(run: LoadedRun) -> LossSeries:
    steps = run.steps
    return LossSeries(path=run.path, status=run.status, complete=run.complete, framework=run.framework,
                      step=np.asarray(steps["step"].values), examples_seen=np.asarray(steps["examples_seen"].values),
                      tokens_seen=np.asarray(steps["tokens_seen"].values),
                      loss=np.asarray(steps["loss"].values, dtype=np.float64),
                      batch_examples=np.asarray(steps["batch_examples"].values))


def _note_divergence(run: LoadedRun, role: str, notes: list[str]) -> None:
    """A note where a run's loss, gradients or updates turned NaN or Inf (:func:`find_divergence`): its curve has
    only its finite losses, and a falloff or a gap after that step is the divergence, not the rank."""
    div = find_divergence(run.steps, run.snapshots)
    if div is None:
        return
    seen = f" ({div.examples_seen:,} examples)" if div.examples_seen is not None else ""
    what = [f"{name} at step {step}" for name, step in (("loss", div.loss_step), ("gradient", div.gradient_step),
                                                         ("update", div.update_step)) if step is not None]
    notes.append(f"{run.path}: {role} diverged at step {div.step}{seen} (first non-finite {', '.join(what)}); its "
                 "curve holds only its finite losses, and what it shows after that step is the divergence, not "
                 "the rank")


def _spectrum_rank(run: LoadedRun) -> int | None:
    """Numerical rank of the LoRA modules' merged updates at the last snapshot (None without them)."""
    if run.snapshots is None or not run.records_lora:
        return None
    lora = run.modules["lora"].to_numpy(dtype=bool)
    return numerical_rank(run.snapshots["sv"].values[-1][lora], run.snapshots["sv_count"].values[-1][lora])


# -- checks ----------------------------------------------------------------------------------------------------


def _criterion(threshold: float, window: float, smooth: float, z: float, min_points: int,
               relative: bool) -> Criterion:
    for name, value in (("threshold", threshold), ("window", window), ("smooth", smooth)):
        check_positive(name, value, "compare")
    check_non_negative("z", z, "compare")
    check_positive_int("min_points", min_points, "compare")
    return Criterion(float(threshold), float(window), float(smooth), float(z), int(min_points), bool(relative))


def _per_run(values: Sequence[Any] | None, n: int, name: str) -> list[Any]:
    if values is None:
        return [None] * n
    values = list(values)
    if len(values) != n:
        raise InvalidOptionError(f"The '{name}' parameter of compare must have one entry per LoRA run ({n}). Got "
                                 f"{len(values)} instead.")
    if name == "ranks" and any(r is not None and (isinstance(r, bool) or not isinstance(r, (int, np.integer))
                                                  or r < 1) for r in values):
        raise InvalidOptionError(f"The 'ranks' parameter of compare must hold ints >= 1 or None. Got {values!r} "
                                 "instead.")
    return values


def _predictions(predictions: Mapping[Any, float] | None, name: str = "predictions") -> dict[int, float]:
    if predictions is None:
        return {}
    if not isinstance(predictions, Mapping):
        raise InvalidOptionError(f"The {name!r} parameter of compare must map LoRA ranks to numbers, "
                                 f"e.g. {{1: 2000, 4: 9000}}. Got a {type(predictions).__name__} instead.")
    out = {}
    for key, value in predictions.items():
        try:
            rank = int(key)
            ok = str(rank) == str(key).strip() and rank >= 1
        except (TypeError, ValueError):
            ok = False
        if not ok or isinstance(key, bool):
            raise InvalidOptionError(f"{name}: keys must be LoRA ranks (ints >= 1). Got {key!r} instead.")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise InvalidOptionError(f"{name}: the value of rank {rank} must be a number > 0. Got {value!r} "
                                     "instead.")
        out[rank] = float(value)
    return out


def _labels(ranks: list[int | None], paths: list[str]) -> list[str]:
    stems = [Path(p).stem for p in paths]
    out = []
    for rank, stem in zip(ranks, stems):
        if rank is None:
            out.append(stem)
        else:
            out.append(f"r={rank}" if ranks.count(rank) == 1 else f"r={rank} ({stem})")
    return out
