"""``lorascope.compare``: LoRA runs against a full fine-tuning run of the same data, and where each LoRA rank
leaves the full fine-tuning loss curve (LoRA Without Regret, Schulman et al. 2025: low-rank LoRA "falls off the
minimum-loss curve" after a number of steps that grows with rank).

Reads the run files (their per-step loss and data axis, the PEFT configuration of each LoRA run), checks that the
runs are comparable, and applies the falloff rule of :mod:`lorascope.analysis.falloff` to each LoRA run. Reports
render the :class:`Comparison`; they never read run files.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorascope.analysis.falloff import (
    FALLOFF,
    MAD_TO_SIGMA,
    MEDIAN_SE,
    NONE,
    TENTATIVE,
    detect_falloff,
    moving_median,
    paired_gap,
    thin_grid,
)
from lorascope.errors import InvalidOptionError, LorascopeError
from lorascope.model.peft import without_peft_prefix
from lorascope.store.reader import Run, open_run

__all__ = ["Comparison", "Criterion", "LoraResult", "PredictionRow", "RunCurve", "compare"]

RunLike = str | os.PathLike[str] | Run

X_AXES = ("examples_seen", "tokens_seen", "step")
DEFAULT_THRESHOLD = 0.02  # nats per token (a 2% perplexity ratio), or 2% of the FullFT loss when relative
DEFAULT_WINDOW = 0.2  # decades: the gap must hold while the data grow by 10**0.2 = 1.58x
DEFAULT_SMOOTH = 0.05  # decades: median window half-width, x / 1.12 .. x * 1.12
DEFAULT_Z = 2.0
DEFAULT_MIN_POINTS = 9
MIN_STEPS = 8  # usable steps each run needs, and steps the two runs must share
NUMERICAL_RANK_RTOL = 1e-4  # singular values below this share of s_1 count as zero (float32 spectra of B A)
# Model-config fields that must agree for two runs to be of the same model (checked when both runs carry them).
STRUCTURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "num_local_experts", "n_embd", "n_layer", "d_model")
COMPARE_FORMAT = "lorascope-compare"
COMPARE_VERSION = 1


@dataclass(frozen=True)
class Criterion:
    """Parameters of the falloff rule (see :mod:`lorascope.analysis.falloff` and ``docs/compare.md``).

    Attributes
    ----------
    threshold : float
        :math:`\\tau`: the smoothed gap must exceed it, in nats per token, or as a fraction of the full
        fine-tuning loss when ``relative``.
    window : float
        W, decades of the data axis the gap must stay above :math:`\\tau` (0.2: the data grow 1.58x).
    smooth : float
        h, half-width of the moving-median window in decades.
    z : float
        Standard errors by which the smoothed gap must clear :math:`\\tau`.
    min_points : int
        Smallest number of steps a median is taken over.
    relative : bool
        Gap as :math:`(L^{\\mathrm{LoRA}} - L^{\\mathrm{Full}}) / L^{\\mathrm{Full}}` instead of a difference.
    """

    threshold: float = DEFAULT_THRESHOLD
    window: float = DEFAULT_WINDOW
    smooth: float = DEFAULT_SMOOTH
    z: float = DEFAULT_Z
    min_points: int = DEFAULT_MIN_POINTS
    relative: bool = False

    @property
    def units(self) -> str:
        return "fraction of the full fine-tuning loss" if self.relative else "nats per token"

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "gap": "relative" if self.relative else "absolute",
                "units": self.units, "window_decades": self.window, "smooth_decades": self.smooth, "z": self.z,
                "min_points": self.min_points}


@dataclass
class RunCurve:
    """One run's loss against the data axis: metadata, the raw points and the moving-median curve.

    ``x``, ``step``, ``examples_seen``, ``tokens_seen`` and ``loss`` are the usable steps (finite loss, known x),
    sorted by x; ``curve_x`` / ``curve_loss`` the smoothed curve on a log-spaced subset of them.
    """

    path: str
    label: str
    status: str
    complete: bool
    framework: str
    x: np.ndarray
    step: np.ndarray
    examples_seen: np.ndarray
    tokens_seen: np.ndarray
    loss: np.ndarray
    batch_examples: float
    curve_x: np.ndarray = field(default_factory=lambda: np.empty(0))
    curve_loss: np.ndarray = field(default_factory=lambda: np.empty(0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "label": self.label,
            "status": self.status,
            "complete": self.complete,
            "framework": self.framework,
            "steps": int(self.step.size),
            "last_step": int(self.step.max()),
            "examples_seen": _count(self.examples_seen.max()),
            "tokens_seen": _count(self.tokens_seen.max()),
            "final_loss": _num(self.curve_loss[-1]) if self.curve_loss.size else None,
            "curve": {"x": _list(self.curve_x), "loss": _list(self.curve_loss)},
        }


@dataclass
class LoraResult:
    """A LoRA run set against the full fine-tuning run.

    Attributes
    ----------
    run : RunCurve
    rank : int or None
        LoRA rank r: from the run's PEFT config, given explicitly, or inferred as the numerical rank of the
        recorded merged updates (``rank_source`` says which); None when none of these exists.
    lora_alpha, scaling : float or None
        PEFT's alpha and the scaling of B A (alpha / r, or alpha / sqrt(r) with rsLoRA).
    status : str
        "falloff", "tentative" or "none" (no falloff within the data).
    falloff_index : int
        Row of ``run`` (usable steps sorted by x) where the falloff starts; -1 without one.
    grid_x, gap, gap_se : numpy.ndarray
        The smoothed gap and its standard error on the evaluation grid (LoRA steps in the shared x range).
    """

    run: RunCurve
    rank: int | None
    rank_source: str
    lora_alpha: float | None
    scaling: float | None
    scaling_rule: str | None
    status: str
    falloff_index: int
    grid_x: np.ndarray
    gap: np.ndarray
    gap_se: np.ndarray
    noise_sigma: float
    transients: list[tuple[float, float]]

    @property
    def falloff_x(self) -> float | None:
        return None if self.falloff_index < 0 else float(self.run.x[self.falloff_index])

    @property
    def falloff_step(self) -> int | None:
        return None if self.falloff_index < 0 else int(self.run.step[self.falloff_index])

    @property
    def falloff_gap(self) -> float | None:
        if self.falloff_index < 0:
            return None
        j = int(np.searchsorted(self.grid_x, self.run.x[self.falloff_index]))
        return _num(self.gap[min(j, self.gap.size - 1)])

    @property
    def compared_range(self) -> tuple[float, float]:
        return float(self.grid_x[0]), float(self.grid_x[-1])

    def to_dict(self) -> dict[str, Any]:
        i = self.falloff_index
        falloff = {"status": self.status, "x": self.falloff_x, "step": self.falloff_step,
                   "examples_seen": _count(self.run.examples_seen[i]) if i >= 0 else None,
                   "tokens_seen": _count(self.run.tokens_seen[i]) if i >= 0 else None, "gap": self.falloff_gap}
        low, high = self.compared_range
        return {
            **self.run.to_dict(),
            "rank": self.rank,
            "rank_source": self.rank_source,
            "lora_alpha": _num(self.lora_alpha) if self.lora_alpha is not None else None,
            "scaling": _num(self.scaling) if self.scaling is not None else None,
            "scaling_rule": self.scaling_rule,
            "falloff": falloff,
            "compared": {"x_min": low, "x_max": high, "points": int(self.grid_x.size)},
            "final_gap": _num(self.gap[-1]),
            "max_gap": _num(np.nanmax(self.gap)),
            "noise_sigma": _num(self.noise_sigma),
            "transients": [{"x_start": a, "x_end": b} for a, b in self.transients],
            "gap_curve": {"x": _list(self.grid_x), "gap": _list(self.gap), "se": _list(self.gap_se)},
        }


@dataclass(frozen=True)
class PredictionRow:
    """A predicted falloff (from a capacity model) beside the measured one for a rank.

    ``ratio`` is predicted / measured (above 1: the prediction was too late). Without a measured falloff
    ``measured_lower_bound`` is the end of the compared data, and ``consistent`` says whether the prediction
    lies beyond it too.
    """

    rank: int
    predicted: float
    label: str | None
    status: str
    measured: float | None
    ratio: float | None
    measured_lower_bound: float | None
    consistent: bool | None

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "run": self.label, "predicted": self.predicted, "status": self.status,
                "measured": self.measured, "ratio": self.ratio, "measured_lower_bound": self.measured_lower_bound,
                "consistent": self.consistent}


@dataclass
class Comparison:
    """Full fine-tuning against LoRA runs of the same data: loss curves, falloffs, predictions.

    Attributes
    ----------
    x : str
        The data axis: "examples_seen", "tokens_seen" or "step".
    criterion : Criterion
    full : RunCurve
    loras : list[LoraResult]
        In the order given.
    predictions : list[PredictionRow]
        One row per (predicted rank, LoRA run of that rank); empty without predictions.
    notes : list[str]
        Checks that could not be made, mismatches worth knowing, incomplete runs, transient excursions.
    """

    x: str
    criterion: Criterion
    full: RunCurve
    loras: list[LoraResult]
    predictions: list[PredictionRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def incomplete(self) -> bool:
        return not self.full.complete or any(not lora.run.complete for lora in self.loras)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (schema in docs/compare.md); strict JSON (no NaN)."""
        return {
            "format": COMPARE_FORMAT,
            "version": COMPARE_VERSION,
            "x": self.x,
            "criterion": self.criterion.to_dict(),
            "incomplete": self.incomplete,
            "notes": list(self.notes),
            "full": self.full.to_dict(),
            "loras": [lora.to_dict() for lora in self.loras],
            "predictions": [row.to_dict() for row in self.predictions],
        }


def compare(full: RunLike, loras: RunLike | Sequence[RunLike], *, x: str = "examples_seen",
            threshold: float = DEFAULT_THRESHOLD, window: float = DEFAULT_WINDOW, smooth: float = DEFAULT_SMOOTH,
            z: float = DEFAULT_Z, min_points: int = DEFAULT_MIN_POINTS, relative: bool = False,
            ranks: Sequence[int | None] | None = None, labels: Sequence[str] | None = None,
            predictions: Mapping[Any, float] | None = None) -> Comparison:
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

    full_run = _load(full, x)
    if full_run.is_lora:
        raise LorascopeError(f"{full_run.path}: is a LoRA run ({full_run.lora_evidence}); the first run must be full "
                             "fine-tuning")
    loaded = []
    for run, rank in zip(lora_list, ranks):
        item = _load(run, x)
        if item.path == full_run.path:
            raise LorascopeError(f"{item.path}: given both as the full fine-tuning run and as a LoRA run")
        if rank is None and not item.is_lora:
            raise LorascopeError(f"{item.path}: not a LoRA run (no PEFT LoRA config, no LoRA layers recorded); "
                                 "compare takes the full fine-tuning run first, then LoRA runs (give its rank "
                                 "explicitly for a LoRA PEFT does not describe)")
        _check_same_model(full_run, item, notes)
        loaded.append(item)
    _check_data(full_run, loaded, x, notes)

    identities = [_identity(item, rank, notes) for item, rank in zip(loaded, ranks)]
    default_labels = _labels([ident[0] for ident in identities], [item.path for item in loaded])
    full_curve = _curve(full_run, "full fine-tuning", criterion)
    results = []
    for item, ident, label in zip(loaded, identities, labels):
        curve = _curve(item, label or default_labels[len(results)], criterion)
        results.append(_compare_one(full_curve, curve, ident, criterion, x, notes))
    comparison = Comparison(x=x, criterion=criterion, full=full_curve, loras=results, notes=notes)
    comparison.predictions = _prediction_rows(preds, results)
    return comparison


# -- loading ---------------------------------------------------------------------------------------------------


@dataclass
class _Loaded:
    path: str
    status: str
    complete: bool
    framework: str
    config: dict[str, Any]
    modules: Any  # pandas.DataFrame
    columns: dict[str, np.ndarray]
    numerical_rank: int | None
    axis: str

    @property
    def lora_modules(self) -> bool:
        return bool(len(self.modules) and self.modules["lora"].any())

    @property
    def is_lora(self) -> bool:
        return bool(self.config.get("lora")) or self.lora_modules

    @property
    def lora_evidence(self) -> str:
        return "a PEFT LoRA config" if self.config.get("lora") else "LoRA layers recorded"


def _load(source: RunLike, x: str) -> _Loaded:
    if isinstance(source, Run):
        return _read(source, x)
    with open_run(source) as run:
        return _read(run, x)


def _read(run: Run, x: str) -> _Loaded:
    steps = run.steps
    columns = {name: np.asarray(steps[name].values) for name in ("step", "examples_seen", "tokens_seen")}
    columns["loss"] = np.asarray(steps["loss"].values, dtype=np.float64)
    columns["batch_examples"] = np.asarray(steps["batch_examples"].values)
    modules = run.modules
    rank = None
    if len(modules) and modules["lora"].any() and run.n_snapshots:
        rank = _numerical_rank(run.snapshots, modules["lora"].to_numpy(dtype=bool))
    return _Loaded(str(run.path), run.status, run.complete, str(run.attrs.get("framework", "")), run.config,
                   modules, columns, rank, x)


def _numerical_rank(snapshots: Any, lora: np.ndarray) -> int | None:
    """Largest numerical rank of the LoRA modules' merged updates at the last snapshot (r for a uniform rank)."""
    sv = np.asarray(snapshots["sv"].values[-1], dtype=np.float64)[lora]
    count = np.asarray(snapshots["sv_count"].values[-1])[lora]
    best = None
    for values, n in zip(sv, count):
        values = values[: int(n)]
        if values.size and np.isfinite(values).all() and values[0] > 0:
            k = int(np.sum(values > NUMERICAL_RANK_RTOL * values[0]))
            best = k if best is None else max(best, k)
    return best


# -- checks ----------------------------------------------------------------------------------------------------


def _criterion(threshold: float, window: float, smooth: float, z: float, min_points: int,
               relative: bool) -> Criterion:
    for name, value, low in (("threshold", threshold, 0.0), ("window", window, 0.0), ("smooth", smooth, 0.0)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= low:
            raise InvalidOptionError(f"The '{name}' parameter of compare must be a finite number > 0. "
                                     f"Got {value!r} instead.")
    if not isinstance(z, (int, float)) or isinstance(z, bool) or not math.isfinite(z) or z < 0:
        raise InvalidOptionError(f"The 'z' parameter of compare must be a finite number >= 0. Got {z!r} instead.")
    if isinstance(min_points, bool) or not isinstance(min_points, (int, np.integer)) or min_points < 1:
        raise InvalidOptionError(f"The 'min_points' parameter of compare must be an int >= 1. Got {min_points!r} "
                                 "instead.")
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


def _predictions(predictions: Mapping[Any, float] | None) -> dict[int, float]:
    if predictions is None:
        return {}
    if not isinstance(predictions, Mapping):
        raise InvalidOptionError("The 'predictions' parameter of compare must map LoRA ranks to predicted falloffs, "
                                 f"e.g. {{1: 2000, 4: 9000}}. Got a {type(predictions).__name__} instead.")
    out = {}
    for key, value in predictions.items():
        try:
            rank = int(key)
            ok = str(rank) == str(key).strip() and rank >= 1
        except (TypeError, ValueError):
            ok = False
        if not ok or isinstance(key, bool):
            raise InvalidOptionError(f"predictions: keys must be LoRA ranks (ints >= 1). Got {key!r} instead.")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise InvalidOptionError(f"predictions: the predicted falloff of rank {rank} must be a number > 0. Got "
                                     f"{value!r} instead.")
        out[rank] = float(value)
    return out


def _model_config(run: _Loaded) -> dict[str, Any] | None:
    model = run.config.get("model")
    config = model.get("config") if isinstance(model, dict) else None
    return config if isinstance(config, dict) else None


def _check_same_model(full: _Loaded, lora: _Loaded, notes: list[str]) -> None:
    """Refuse runs of different models: structural config fields, or shapes of the matrices both record."""
    verified = False
    cf, cl = _model_config(full), _model_config(lora)
    if cf is not None and cl is not None:
        for key in STRUCTURE_KEYS:
            if key in cf and key in cl and cf[key] != cl[key]:
                raise LorascopeError(f"runs of different models cannot be compared: {full.path} has {key} = "
                                     f"{cf[key]!r}, {lora.path} has {key} = {cl[key]!r}")
        verified = any(key in cf and key in cl for key in STRUCTURE_KEYS)
    shapes = {str(n): (int(o), int(i)) for n, o, i in zip(full.modules["name"], full.modules["out_features"],
                                                         full.modules["in_features"])}
    for name, out, inp in zip(lora.modules["name"], lora.modules["out_features"], lora.modules["in_features"]):
        base = without_peft_prefix(name)
        if base in shapes:
            if shapes[base] != (int(out), int(inp)):
                raise LorascopeError(f"runs of different models cannot be compared: {base} is {shapes[base][0]}x"
                                     f"{shapes[base][1]} in {full.path} but {int(out)}x{int(inp)} in {lora.path}")
            verified = True
    if not verified:
        notes.append(f"{lora.path}: could not verify that it trains the same model as {full.path} (no model config "
                     "and no recorded matrix in common)")


def _usable(run: _Loaded, x: str) -> np.ndarray:
    values = run.columns[x]
    return np.isfinite(run.columns["loss"]) & (values > 0)


def _check_data(full: _Loaded, loras: list[_Loaded], x: str, notes: list[str]) -> None:
    """Refuse runs without the data axis or with too few steps; note data and batch mismatches."""
    for run in [full, *loras]:
        finite_loss = int(np.isfinite(run.columns["loss"]).sum())
        if finite_loss and not (run.columns[x][np.isfinite(run.columns["loss"])] > 0).any():
            other = "tokens_seen" if x == "examples_seen" else "examples_seen"
            raise LorascopeError(f"{run.path}: {x} was not recorded (unknown in every step); compare on {other} or "
                                 "on optimizer steps instead (--tokens / --steps, x=...)")
        usable = int(_usable(run, x).sum())
        if usable < MIN_STEPS:
            raise LorascopeError(f"{run.path}: too few steps to compare: {usable} step(s) with a finite loss and a "
                                 f"known {x}; compare needs at least {MIN_STEPS}")
        if not run.complete:
            notes.append(f"{run.path}: incomplete run (status '{run.status}'); compared on what was written so far")
    full_tpe = _tokens_per_example(full)
    full_batch = _median_batch(full)
    for run in loras:
        tpe = _tokens_per_example(run)
        if full_tpe and tpe and abs(tpe / full_tpe - 1.0) > 0.1:
            notes.append(f"{run.path}: {tpe:.1f} tokens per example against {full_tpe:.1f} in the full fine-tuning "
                         "run; the runs may not see the same data")
        batch = _median_batch(run)
        if full_batch and batch and batch != full_batch:
            notes.append(f"{run.path}: batch of {batch:g} examples against {full_batch:g} in the full fine-tuning run; "
                         "LoRA's gap to full fine-tuning also grows with batch size (LoRA Without Regret), so the "
                         "comparison mixes both effects")


def _tokens_per_example(run: _Loaded) -> float | None:
    ex, tok = run.columns["examples_seen"], run.columns["tokens_seen"]
    known = (ex > 0) & (tok > 0)
    return float(tok[known][-1] / ex[known][-1]) if known.any() else None


def _median_batch(run: _Loaded) -> float | None:
    batch = run.columns["batch_examples"]
    batch = batch[batch > 0]
    return float(np.median(batch)) if batch.size else None


def _identity(run: _Loaded, given: int | None, notes: list[str]
              ) -> tuple[int | None, str, float | None, float | None, str | None]:
    """(rank, rank source, alpha, scaling, scaling rule) of a LoRA run."""
    rank, source, alpha, rule = None, "unknown", None, None
    config = run.config.get("lora")
    if isinstance(config, dict) and config:
        adapter, cfg = next(iter(config.items()))
        if len(config) > 1:
            notes.append(f"{run.path}: {len(config)} LoRA adapters; rank and alpha are those of '{adapter}'")
        cfg = cfg if isinstance(cfg, dict) else {}
        r = cfg.get("r")
        if isinstance(r, int) and not isinstance(r, bool) and r >= 1:
            rank, source = r, "config"
        if cfg.get("rank_pattern"):
            notes.append(f"{run.path}: rank_pattern sets other ranks for some modules; r = {r} is the default rank")
        alpha = cfg.get("lora_alpha") if isinstance(cfg.get("lora_alpha"), (int, float)) else None
        rule = cfg.get("scaling_rule") or ("alpha/sqrt(r)" if cfg.get("use_rslora") else "alpha/r")
    if rank is None and run.numerical_rank is not None:
        rank, source = run.numerical_rank, "spectrum"
        notes.append(f"{run.path}: LoRA rank not in the file's config; inferred r = {rank} as the numerical rank of "
                     "the recorded merged updates")
    if given is not None:
        if rank is not None and rank != given:
            notes.append(f"{run.path}: rank {given} given, the file says {rank} ({source}); using {given}")
        rank, source = int(given), "given"
    scaling = None
    if alpha is not None and rank is not None:
        scaling = alpha / math.sqrt(rank) if rule == "alpha/sqrt(r)" else alpha / rank
    return rank, source, alpha, scaling, rule


def _labels(ranks: list[int | None], paths: list[str]) -> list[str]:
    stems = [Path(p).stem for p in paths]
    out = []
    for rank, stem in zip(ranks, stems):
        if rank is None:
            out.append(stem)
        else:
            out.append(f"r={rank}" if ranks.count(rank) == 1 else f"r={rank} ({stem})")
    return out


# -- computation -----------------------------------------------------------------------------------------------


def _curve(run: _Loaded, label: str, criterion: Criterion) -> RunCurve:
    """Usable steps sorted by x and the moving-median loss curve."""
    keep = _usable(run, run.axis)
    order = np.argsort(run.columns[run.axis][keep], kind="stable")
    pick = {name: values[keep][order] for name, values in run.columns.items()}
    x = pick[run.axis].astype(np.float64)
    batches = pick["batch_examples"][pick["batch_examples"] > 0]
    curve = RunCurve(path=run.path, label=label, status=run.status, complete=run.complete,
                     framework=run.framework, x=x, step=pick["step"], examples_seen=pick["examples_seen"],
                     tokens_seen=pick["tokens_seen"], loss=pick["loss"],
                     batch_examples=float(np.median(batches)) if batches.size else float("nan"))
    lx = np.log10(x)
    grid = thin_grid(lx)
    curve.curve_x = x[grid]
    # The displayed curve is a pure log-window median: widening it to min_points would flatten the first steps,
    # where the loss falls fastest (the gap, a difference of two such curves, is widened; see falloff.py).
    curve.curve_loss, _ = moving_median(lx, curve.loss, lx[grid], criterion.smooth, 1)
    return curve


def _compare_one(full: RunCurve, lora: RunCurve, ident: tuple[Any, ...], criterion: Criterion, x: str,
                 notes: list[str]) -> LoraResult:
    rank, source, alpha, scaling, rule = ident
    inside = np.flatnonzero((lora.x >= full.x[0]) & (lora.x <= full.x[-1]))
    if inside.size < MIN_STEPS:
        raise LorascopeError(f"{lora.path} and {full.path} share {inside.size} step(s) of the {x} range "
                             f"(LoRA {_span(lora.x)}, full {_span(full.x)}); compare needs at least {MIN_STEPS}: "
                             "are they runs on the same data?")
    if inside.size < lora.x.size:
        notes.append(f"{lora.path}: compared up to {x} = {full.x[-1]:,.0f}, where the full fine-tuning run ends")
    lx_all = np.log10(lora.x[inside])
    gap_raw = paired_gap(lora.x[inside], lora.loss[inside], full.x, full.loss)
    if criterion.relative:
        reference = lora.loss[inside] - gap_raw
        with np.errstate(divide="ignore", invalid="ignore"):
            gap_raw = np.where(reference > 0, gap_raw / reference, np.nan)
        finite = np.isfinite(gap_raw)
        if finite.sum() < MIN_STEPS:
            raise LorascopeError(f"{full.path}: the relative gap needs a positive full fine-tuning loss; it is not "
                                 f"positive at enough steps shared with {lora.path}")
        inside, lx_all, gap_raw = inside[finite], lx_all[finite], gap_raw[finite]
    grid = thin_grid(lx_all)
    gap, counts = moving_median(lx_all, gap_raw, lx_all[grid], criterion.smooth, criterion.min_points)
    residual = gap_raw[grid] - gap
    sigma = MAD_TO_SIGMA * float(np.median(np.abs(residual))) if residual.size else 0.0
    se = MEDIAN_SE * sigma / np.sqrt(counts)
    found = detect_falloff(lx_all[grid], gap, se, threshold=criterion.threshold, window=criterion.window,
                           z=criterion.z, sigma=sigma)
    rows = inside[grid]
    grid_x = lora.x[rows]
    transients = [(float(lora.x[rows[a]]), float(lora.x[rows[b]])) for a, b in found.transients]
    for start, end in transients:
        notes.append(f"{lora.path}: the gap exceeded the threshold from {x} = {start:,.0f} and was no longer clearly "
                     f"above it from {end:,.0f} on (a transient excursion, not a falloff)")
    index = int(rows[found.index]) if found.status in (FALLOFF, TENTATIVE) else -1
    if 0 <= index - inside[0] < criterion.min_points:
        notes.append(f"{lora.path}: above the full fine-tuning curve from its first steps (the first medians span "
                     f"{criterion.min_points} steps): it never tracked full fine-tuning, which points at its learning "
                     "rate or setup rather than at its rank's capacity")
    return LoraResult(run=lora, rank=rank, rank_source=source, lora_alpha=alpha, scaling=scaling, scaling_rule=rule,
                      status=found.status, falloff_index=index, grid_x=grid_x, gap=found.gap, gap_se=found.se,
                      noise_sigma=found.sigma, transients=transients)


def _prediction_rows(predictions: dict[int, float], results: list[LoraResult]) -> list[PredictionRow]:
    rows = []
    for rank in sorted(predictions):
        predicted = predictions[rank]
        matching = [r for r in results if r.rank == rank]
        if not matching:
            rows.append(PredictionRow(rank, predicted, None, "no_run", None, None, None, None))
        for result in matching:
            if result.status == NONE:
                bound = result.compared_range[1]
                rows.append(PredictionRow(rank, predicted, result.run.label, NONE, None, None, bound,
                                          predicted >= bound))
            else:
                measured = float(result.falloff_x)
                rows.append(PredictionRow(rank, predicted, result.run.label, result.status, measured,
                                          predicted / measured, None, None))
    return rows


def _span(x: np.ndarray) -> str:
    return f"{x[0]:,.0f}..{x[-1]:,.0f}"


def _num(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _count(value: Any) -> int | None:
    value = int(value)
    return value if value >= 0 else None


def _list(values: np.ndarray) -> list[float | None]:
    return [_num(v) for v in np.asarray(values, dtype=np.float64)]
