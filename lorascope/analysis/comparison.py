"""Full fine-tuning against LoRA runs of the same data: loss curves, the gap between them, where each LoRA leaves
the full fine-tuning curve, and predicted falloffs beside the measured ones.

Pure: per-step arrays (:class:`LossSeries`) in, result dataclasses out. :mod:`lorascope.workflows.compare` reads the
run files, checks that they are runs of the same model and calls these functions; the falloff rule itself is
:mod:`lorascope.analysis.falloff`, its parameters a :class:`Criterion`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from lorascope import _display
from lorascope.analysis.falloff import (
    DIVERGED,
    FALLOFF,
    LAG,
    MAD_TO_SIGMA,
    MEDIAN_SE,
    NONE,
    TENTATIVE,
    classify_lag,
    detect_falloff,
    loss_rose,
    moving_median,
    paired_gap,
    thin_grid,
)
from lorascope.analysis.intruders import IntruderComparison
from lorascope.errors import LorascopeError

__all__ = ["Comparison", "Criterion", "LoraIdentity", "LoraResult", "LossSeries", "PredictionRow", "RunCurve",
           "check_data", "falloff_against", "lora_identity", "loss_curve", "numerical_rank", "prediction_rows"]

X_AXES = ("examples_seen", "tokens_seen", "step")
DEFAULT_THRESHOLD = 0.02  # nats per token (a 2% perplexity ratio), or 2% of the FullFT loss when relative
DEFAULT_WINDOW = 0.2  # decades: the gap must hold while the data grow by 10**0.2 = 1.58x
DEFAULT_SMOOTH = 0.05  # decades: median window half-width, x / 1.12 .. x * 1.12
DEFAULT_Z = 2.0
DEFAULT_MIN_POINTS = 9
MIN_STEPS = 8  # usable steps each run needs, and steps the two runs must share
NUMERICAL_RANK_RTOL = 1e-4  # singular values below this share of s_1 count as zero (float32 spectra of B A)
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


@dataclass(frozen=True)
class LossSeries:
    """One run's per-step rows as a comparison reads them: its metadata and columns, in recording order.

    ``examples_seen`` / ``tokens_seen`` are -1 where unknown; ``loss`` is NaN where not recorded.
    """

    path: str
    status: str
    complete: bool
    framework: str
    step: np.ndarray
    examples_seen: np.ndarray
    tokens_seen: np.ndarray
    loss: np.ndarray
    batch_examples: np.ndarray

    def axis(self, x: str) -> np.ndarray:
        """The data axis ``x``: one of :data:`X_AXES`."""
        return {"step": self.step, "examples_seen": self.examples_seen, "tokens_seen": self.tokens_seen}[x]

    def usable(self, x: str) -> np.ndarray:
        """Steps with a finite loss and a known (positive) ``x``."""
        return np.isfinite(self.loss) & (self.axis(x) > 0)


@dataclass(frozen=True)
class LoraIdentity:
    """What a LoRA run is: its rank (and where that comes from), alpha and scaling rule."""

    rank: int | None
    rank_source: str
    lora_alpha: float | None
    scaling: float | None
    scaling_rule: str | None


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
        "falloff", "tentative", "none" (no falloff within the data), "lag" (behind from the start and closing)
        or "diverged" (its own loss rose, above its start or back at the end: no capacity falloff is read from it).
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

    ``ratio`` is predicted / measured (above 1: the prediction was too late); ``predicted`` is infinite (null in
    JSON) when no falloff is expected within the run. Without a measured falloff
    ``measured_lower_bound`` is the end of the compared data, and ``consistent`` says whether the prediction
    lies beyond it too; a run that diverged (``status`` "diverged") measures nothing, and every field but the
    prediction is None.
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
        return {"rank": self.rank, "run": self.label, "predicted": _num(self.predicted), "status": self.status,
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
    subspace: IntruderComparison | None = None  # intruder dimensions and overlap with full fine-tuning (issue 18)

    @property
    def incomplete(self) -> bool:
        return not self.full.complete or any(not lora.run.complete for lora in self.loras)

    @cached_property
    def summary(self) -> dict[str, Any]:
        """:meth:`to_dict`, computed once: ``compare.json``, ``--json`` and the terminal render this one dictionary
        (read it after :func:`lorascope.compare` has returned; treat it as read-only)."""
        return self.to_dict()

    def _repr_html_(self) -> str | None:  # Jupyter; rendered by lorascope.report.notebook via lorascope._display
        return _display.html("comparison", self.summary)

    @property
    def plot(self) -> Any:
        """The figure as a matplotlib figure: ``comparison.plot.loss()`` (``compare.png``)."""
        return _display.figures("comparison", self)

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
            "subspace": None if self.subspace is None else self.subspace.to_dict(),
        }


def numerical_rank(sv: np.ndarray, sv_count: np.ndarray) -> int | None:
    """Largest numerical rank of the given merged updates (r for a uniform rank): singular values above
    :data:`NUMERICAL_RANK_RTOL` of each update's largest count.

    Parameters
    ----------
    sv : numpy.ndarray
        (module, sv_index) singular values, NaN-padded.
    sv_count : numpy.ndarray
        (module,) number of stored singular values.

    Examples
    --------
    >>> numerical_rank(np.array([[3.0, 1.0, 1e-7], [2.0, 0.0, np.nan]]), np.array([3, 2]))
    2
    """
    best = None
    for values, n in zip(np.asarray(sv, dtype=np.float64), np.asarray(sv_count)):
        values = values[: int(n)]
        if values.size and np.isfinite(values).all() and values[0] > 0:
            k = int(np.sum(values > NUMERICAL_RANK_RTOL * values[0]))
            best = k if best is None else max(best, k)
    return best


def check_data(full: LossSeries, loras: Sequence[LossSeries], x: str, notes: list[str]) -> None:
    """Refuse runs without the data axis ``x`` or with fewer than :data:`MIN_STEPS` usable steps; note incomplete
    runs, and LoRA runs whose tokens per example or batch differ from the full fine-tuning run's.

    Raises
    ------
    LorascopeError
        A run did not record ``x`` or has too few usable steps.
    """
    for run in [full, *loras]:
        finite_loss = np.isfinite(run.loss)
        if finite_loss.any() and not (run.axis(x)[finite_loss] > 0).any():
            other = "tokens_seen" if x == "examples_seen" else "examples_seen"
            raise LorascopeError(f"{run.path}: {x} was not recorded (unknown in every step); compare on {other} or "
                                 "on optimizer steps instead (--tokens / --steps, x=...)")
        usable = int(run.usable(x).sum())
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


def _tokens_per_example(run: LossSeries) -> float | None:
    ex, tok = run.examples_seen, run.tokens_seen
    known = (ex > 0) & (tok > 0)
    return float(tok[known][-1] / ex[known][-1]) if known.any() else None


def _median_batch(run: LossSeries) -> float | None:
    batch = run.batch_examples[run.batch_examples > 0]
    return float(np.median(batch)) if batch.size else None


def lora_identity(path: str, lora_config: Mapping[str, Any] | None, spectrum_rank: int | None, given: int | None,
                  notes: list[str]) -> LoraIdentity:
    """The rank, alpha and scaling of a LoRA run: from its PEFT config (the first adapter's), else the numerical
    rank of its recorded updates; a ``given`` rank overrides both (with a note where they disagree).

    Parameters
    ----------
    path : str
        The run, for the notes.
    lora_config : mapping or None
        The run's ``lora`` config section: adapter name -> its settings (``r``, ``lora_alpha``, ``scaling_rule``,
        ``use_rslora``, ``rank_pattern``).
    spectrum_rank : int or None
        :func:`numerical_rank` of its recorded merged updates.
    given : int or None
        A rank the user gave.
    notes : list of str
        Receives what the reader should know.

    Examples
    --------
    >>> lora_identity("r.h5", {"default": {"r": 4, "lora_alpha": 32}}, None, None, [])
    LoraIdentity(rank=4, rank_source='config', lora_alpha=32, scaling=8.0, scaling_rule='alpha/r')
    """
    rank, source, alpha, rule = None, "unknown", None, None
    if isinstance(lora_config, Mapping) and lora_config:
        adapter, cfg = next(iter(lora_config.items()))
        if len(lora_config) > 1:
            notes.append(f"{path}: {len(lora_config)} LoRA adapters; rank and alpha are those of '{adapter}'")
        cfg = cfg if isinstance(cfg, Mapping) else {}
        r = cfg.get("r")
        if isinstance(r, int) and not isinstance(r, bool) and r >= 1:
            rank, source = r, "config"
        if cfg.get("rank_pattern"):
            notes.append(f"{path}: rank_pattern sets other ranks for some modules; r = {r} is the default rank")
        alpha = cfg.get("lora_alpha") if isinstance(cfg.get("lora_alpha"), (int, float)) else None
        rule = cfg.get("scaling_rule") or ("alpha/sqrt(r)" if cfg.get("use_rslora") else "alpha/r")
    if rank is None and spectrum_rank is not None:
        rank, source = spectrum_rank, "spectrum"
        notes.append(f"{path}: LoRA rank not in the file's config; inferred r = {rank} as the numerical rank of "
                     "the recorded merged updates")
    if given is not None:
        if rank is not None and rank != given:
            notes.append(f"{path}: rank {given} given, the file says {rank} ({source}); using {given}")
        rank, source = int(given), "given"
    scaling = None
    if alpha is not None and rank is not None:
        scaling = alpha / math.sqrt(rank) if rule == "alpha/sqrt(r)" else alpha / rank
    return LoraIdentity(rank, source, alpha, scaling, rule)


def loss_curve(run: LossSeries, x: str, label: str, criterion: Criterion) -> RunCurve:
    """A run's usable steps sorted by ``x``, and its moving-median loss curve on a log-spaced grid."""
    keep = run.usable(x)
    order = np.argsort(run.axis(x)[keep], kind="stable")

    def pick(values: np.ndarray) -> np.ndarray:
        return values[keep][order]

    data_x = pick(run.axis(x)).astype(np.float64)
    batches = pick(run.batch_examples)
    batches = batches[batches > 0]
    curve = RunCurve(path=run.path, label=label, status=run.status, complete=run.complete,
                     framework=run.framework, x=data_x, step=pick(run.step), examples_seen=pick(run.examples_seen),
                     tokens_seen=pick(run.tokens_seen), loss=pick(run.loss),
                     batch_examples=float(np.median(batches)) if batches.size else float("nan"))
    lx = np.log10(data_x)
    grid = thin_grid(lx)
    curve.curve_x = data_x[grid]
    # The displayed curve is a pure log-window median: widening it to min_points would flatten the first steps,
    # where the loss falls fastest (the gap, a difference of two such curves, is widened; see falloff.py).
    curve.curve_loss, _ = moving_median(lx, curve.loss, lx[grid], criterion.smooth, 1)
    return curve


def falloff_against(full: RunCurve, lora: RunCurve, identity: LoraIdentity, criterion: Criterion, x: str,
                    notes: list[str]) -> LoraResult:
    """Where ``lora`` leaves the ``full`` fine-tuning curve: the paired gap over the steps they share, smoothed,
    and the falloff rule of :mod:`lorascope.analysis.falloff`.

    Raises
    ------
    LorascopeError
        The runs share fewer than :data:`MIN_STEPS` steps of the data axis, or (relative gap) the full fine-tuning
        loss is not positive at enough of them.
    """
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
    status = found.status
    rise = loss_rose(lora.loss[inside], threshold=criterion.threshold, z=criterion.z, relative=criterion.relative)
    if rise.rose:
        status, index = DIVERGED, -1
        notes.append(f"{lora.path}: its loss {rise.how} (medians of 3 steps: {rise.start:.3g} at the start, "
                     f"{rise.lowest:.3g} at its lowest, {rise.end:.3g} at the end): training made it worse, an "
                     "unstable run (a learning rate too high for this rank, typically); its gap is that, not the "
                     "rank's capacity, and no falloff is read from it")
    elif 0 <= index - inside[0] < criterion.min_points:  # above from the first steps: it never tracked full FT
        closing, start, end = classify_lag(found.gap)
        if closing:
            status, index = LAG, -1
            notes.append(f"{lora.path}: behind full fine-tuning from its first steps, and the gap closes ({start:.3g} "
                         f"at the start, {end:.3g} at the end): a lag in learning speed (its learning rate or "
                         "warm-up), not a capacity falloff")
        else:
            notes.append(f"{lora.path}: above the full fine-tuning curve from its first steps (the first medians "
                         f"span {criterion.min_points} steps) and the gap does not close ({start:.3g} at the start, "
                         f"{end:.3g} at the end): it never tracked full fine-tuning, so this falloff may be its "
                         "learning rate or setup as much as its rank's capacity")
    return LoraResult(run=lora, rank=identity.rank, rank_source=identity.rank_source, lora_alpha=identity.lora_alpha,
                      scaling=identity.scaling, scaling_rule=identity.scaling_rule, status=status,
                      falloff_index=index, grid_x=grid_x, gap=found.gap, gap_se=found.se, noise_sigma=found.sigma,
                      transients=transients)


def prediction_rows(predictions: Mapping[int, float], results: Sequence[LoraResult]) -> list[PredictionRow]:
    """One :class:`PredictionRow` per predicted rank and LoRA run of that rank (a ``"no_run"`` row without one)."""
    rows = []
    for rank in sorted(predictions):
        predicted = predictions[rank]
        matching = [r for r in results if r.rank == rank]
        if not matching:
            rows.append(PredictionRow(rank, predicted, None, "no_run", None, None, None, None))
        for result in matching:
            if result.status == DIVERGED:  # an unstable run measures nothing about capacity
                rows.append(PredictionRow(rank, predicted, result.run.label, DIVERGED, None, None, None, None))
            elif result.status in (NONE, LAG):
                bound = result.compared_range[1]
                rows.append(PredictionRow(rank, predicted, result.run.label, NONE, None, None, bound,
                                          predicted >= bound))
            else:
                assert result.falloff_x is not None  # a measured or onset falloff has its place
                measured = float(result.falloff_x)
                ratio = predicted / measured if math.isfinite(predicted) else None
                rows.append(PredictionRow(rank, predicted, result.run.label, result.status, measured, ratio, None,
                                          None))
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
