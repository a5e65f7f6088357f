"""``lorascope.analyze``: read one or more run files and compute everything a report shows.

One run: rank curves over its snapshots (examples seen grow within the run). Several runs of the same model
trained on different dataset sizes: one point per run (its final snapshot), which is the cleaner
rank-vs-dataset-size curve. Reports render an :class:`Analysis`; they never read run files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar

import numpy as np
import xarray as xr

from lorascope import _display
from lorascope._checks import check_ranks
from lorascope.analysis.capacity import CapacityConstant
from lorascope.analysis.contributions import Contributions
from lorascope.analysis.curves import PowerLawFit, fit_power_law
from lorascope.analysis.divergence import Divergence, find_divergence, missing_gradients, zero_updates
from lorascope.analysis.forecast import Forecast
from lorascope.analysis.layers import TARGET_SETS, energy_shares, lora_capture, rank_hungry_modules
from lorascope.analysis.metrics import DEFAULT_P, aggregate, update_metrics
from lorascope.analysis.noise import BatchAdvice, NoiseScale, batch_tradeoff, noise_scale
from lorascope.errors import InvalidOptionError, LorascopeError
from lorascope.store.reader import Run
from lorascope.workflows.contributions import contributions_of_run
from lorascope.workflows.forecast import forecast_runs
from lorascope.workflows.runs import LoadedRun, ModelFacts, RunLike, check_same_model, load_run
from lorascope.workflows.subspace import Subspace, read_subspace

__all__ = ["Analysis", "RunResult", "analyze", "DEFAULT_CANDIDATE_RANKS"]

DEFAULT_CANDIDATE_RANKS = (8, 16, 64)
CURVE_P = 0.9  # the energy share whose rank k_p the curves follow (Biderman et al. 2024 use 90%)
X_AXES = ("examples_seen", "tokens_seen")
SUMMARY_FORMAT = "lorascope-summary"
SUMMARY_VERSION = 1
T = TypeVar("T")


@dataclass
class RunResult:
    """What one run file contributes: its metadata, loss curve and (when it has snapshots) metrics."""

    path: str
    status: str
    complete: bool
    framework: str
    modules: Any  # pandas.DataFrame
    steps: xr.Dataset
    metrics: xr.Dataset | None
    by_kind: xr.Dataset | None
    by_layer: xr.Dataset | None
    overall: xr.Dataset | None
    final_spectra: xr.DataArray | None = None  # singular values at the last snapshot (module, sv), NaN-padded
    final_held: xr.Dataset | None = None  # the held-batch loss columns of the last snapshot (contributions=True)
    config: dict[str, Any] = field(default_factory=dict)
    flags: tuple[str, ...] = ()  # what the file's validation flagged (kept, but worth a line in the report)
    noise: NoiseScale | None = None
    batch_advice: BatchAdvice | None = None
    divergence: Divergence | None = None  # where the run's loss, gradients or updates turned NaN/Inf

    @property
    def is_lora(self) -> bool:
        return bool(self.config.get("lora"))

    @property
    def n_snapshots(self) -> int:
        return 0 if self.metrics is None else int(self.metrics.sizes["snapshot"])


@dataclass
class CurveResult:
    """The rank curve of one group of modules (a kind, or "all")."""

    group: str
    x: np.ndarray
    y: np.ndarray
    fit: PowerLawFit
    crossings: list[Any]
    missing: list[str | None] = field(default_factory=list)  # per point: why its y is NaN (None where it is not)

    def to_dict(self) -> dict[str, Any]:
        return {"fit": self.fit.to_dict(), "points": [[_num(a), _num(b)] for a, b in zip(self.x, self.y)],
                "missing_points": [{"x": _num(a), "reason": why}
                                   for a, why in zip(self.x, self.missing) if why is not None],
                "crossings": [c.to_dict() for c in self.crossings]}


@dataclass
class Analysis:
    """Everything ``lorascope analyze`` reports, computed from run files.

    Attributes
    ----------
    runs : list[RunResult]
        In the order given.
    ranks : tuple[int, ...]
        Candidate LoRA ranks.
    p : tuple[float, ...]
        Energy shares of the energy ranks.
    x : str
        "examples_seen" or "tokens_seen": the data axis of the curves.
    curves : dict[str, CurveResult]
        k_0.9 (energy-weighted per kind, and over all modules) against ``x``, fitted and extrapolated.
    notes : list[str]
        What could not be computed and why; incomplete runs; excluded non-finite updates.
    forecast : Forecast or None
        Where a LoRA of each candidate rank and target set runs out on this data, from the full fine-tuning
        runs; ``forecast_missing`` says why when there is none.
    contributions : Contributions or None
        Per kind (and layer) the share of the held batch's loss reduction, its bits and the rank at which its
        LoRA runs out, at the final snapshot of the final run; ``contributions_missing`` says why when none.
    subspace : Subspace or None
        The final run's update subspaces over its snapshots (principal angles, settling, gradient overlap) and
        its intruder dimensions; ``subspace.missing`` is the one line naming the option for what was not
        recorded (docs/subspace.md).
    """

    runs: list[RunResult]
    ranks: tuple[int, ...]
    p: tuple[float, ...]
    x: str
    curves: dict[str, CurveResult] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    forecast: Forecast | None = None
    forecast_missing: str | None = None
    contributions: Contributions | None = None
    contributions_missing: str | None = None
    subspace: Subspace | None = None

    @property
    def incomplete(self) -> bool:
        return any(not run.complete for run in self.runs)

    @property
    def final_run(self) -> RunResult:
        """The run with the most data that has snapshots (the last one given when none has)."""
        with_snaps = [r for r in self.runs if r.n_snapshots]
        return max(with_snaps, key=_final_x(self.x)) if with_snaps else self.runs[-1]

    def final_snapshot(self) -> xr.Dataset | None:
        run = self.final_run
        return None if run.metrics is None else run.metrics.isel(snapshot=-1)

    @cached_property
    def summary(self) -> dict[str, Any]:
        """:meth:`to_dict`, computed once: the terminal, ``summary.json``, ``--json`` and the HTML page all render
        this one dictionary (read it after :func:`analyze` has returned; treat it as read-only)."""
        return self.to_dict()

    @cached_property
    def final_energy_shares(self) -> dict[str, Any] | None:
        """:func:`~lorascope.analysis.layers.energy_shares` of the final snapshot (per kind, layer, (layer, kind)
        and expert), or None without snapshots."""
        snap = self.final_snapshot()
        return None if snap is None else energy_shares(snap)

    def _repr_html_(self) -> str | None:  # Jupyter; rendered by lorascope.report.notebook via lorascope._display
        return _display.html("analysis", self.summary)

    @property
    def plot(self) -> Any:
        """The report's figures as matplotlib figures: ``analysis.plot.spectra()`` (see
        :class:`lorascope.report.plots.AnalysisFigures`)."""
        return _display.figures("analysis", self)

    def headline(self) -> list[dict[str, Any]]:
        """Per candidate rank: the share of the final update an all-linear LoRA of that rank could capture."""
        snap = self.final_snapshot()
        if snap is None:
            return []
        capture = lora_capture(snap).sel(target="all-linear")
        overall = _present(self.final_run.overall).isel(snapshot=-1, all=0)
        return [{"rank": int(r), "captured_energy_share": _num(capture.sel(rank=r)),
                 "signal_rank": _num(overall["signal_rank"]), "energy_rank_0.9": _num(
                     overall["energy_rank"].sel(p=CURVE_P))}
                for r in self.ranks]

    def to_dict(self) -> dict[str, Any]:
        """The JSON summary (schema documented in docs/analysis.md)."""
        out: dict[str, Any] = {
            "format": SUMMARY_FORMAT,
            "version": SUMMARY_VERSION,
            "incomplete": self.incomplete,
            "forecast": self.forecast.to_dict() if self.forecast is not None else {"missing": self.forecast_missing},
            "contributions": self.contributions.to_dict() if self.contributions is not None
            else {"missing": self.contributions_missing},
            "subspace": None if self.subspace is None else self.subspace.to_dict(),
            "notes": list(self.notes),
            "ranks": list(self.ranks),
            "p": list(self.p),
            "x": self.x,
            "runs": [_run_dict(r, self.x) for r in self.runs],
            "headline": self.headline(),
            "final": None,
            "curves": {g: c.to_dict() for g, c in self.curves.items()},
            "noise_scale": [
                {"run": r.path, **r.noise.to_dict(),
                 "batch_advice": None if r.batch_advice is None else r.batch_advice.to_dict()}
                for r in self.runs if r.noise is not None
            ],
        }
        snap = self.final_snapshot()
        if snap is not None:
            run = self.final_run
            shares = _present(self.final_energy_shares)
            out["final"] = {
                "run": run.path,
                "step": int(snap["step"]),
                "examples_seen": int(snap["examples_seen"]),
                "tokens_seen": int(snap["tokens_seen"]),
                "by_kind": _group_dict(_present(run.by_kind).isel(snapshot=-1), "kind", self),
                "overall": _group_dict(_present(run.overall).isel(snapshot=-1), "all", self)["all"],
                "lora_capture": {t: {str(int(r)): _num(v) for r, v in zip(row["rank"].values, row.values)}
                                 for t, row in zip(TARGET_SETS, lora_capture(snap))},
                "energy_share_by_layer": {str(k): _num(v) for k, v in shares["layer"].items()},
                "energy_share_by_expert": {f"{k[0]}.{k[1]}": _num(v) for k, v in shares["expert"].items()},
                "rank_hungry_modules": _records(rank_hungry_modules(snap, p=CURVE_P, rank=max(self.ranks))),
                "excluded_nonfinite_modules": [str(m) for m in snap["module"].values[~snap["valid"].values]],
                "missing": _snapshot_missing(snap),
            }
        return out

    def to_dataset(self) -> xr.Dataset:
        """Per-module metrics of the final run plus its per-kind aggregates, ready for NetCDF."""
        run = self.final_run
        if run.metrics is None:
            return xr.Dataset(attrs={"note": "no snapshots: no spectral metrics"})
        # Per-kind aggregates get their own dimension, so they do not collide with the module coordinate "kind".
        by_kind = _present(run.by_kind)
        kind = by_kind.rename({name: f"kind_{name}" for name in by_kind.data_vars}).rename(kind="kind_group")
        ds = xr.merge([run.metrics, kind], compat="override", join="outer")
        ds.attrs.update({"run": run.path, "status": run.status, "x": self.x})
        if run.divergence is not None:  # non-finite values are NaN in the variables; where they start is here
            ds.attrs["diverged_at_step"] = run.divergence.step
        return ds


def analyze(paths: RunLike | Sequence[RunLike], *,
            ranks: Sequence[int] = DEFAULT_CANDIDATE_RANKS, p: Sequence[float] = DEFAULT_P,
            x: str = "examples_seen", progress: Callable[[Any], Any] | None = None,
            constant: CapacityConstant | None = None) -> Analysis:
    """Analyse one or more run files.

    Parameters
    ----------
    paths
        One run file, or several runs of the same model (for instance trained on different dataset sizes); paths
        or open :class:`~lorascope.Run` objects (left open).
    ranks
        Candidate LoRA ranks: residuals, captures and the dataset size at which k_0.9 crosses each.
    p
        Energy shares of the energy ranks (0.9 is the one the curves follow).
    x
        Data axis: "examples_seen" or "tokens_seen".
    progress
        Optional wrapper of an iterable (e.g. ``tqdm.tqdm``) for a progress bar over the runs.
    constant
        Bits per LoRA parameter for the forecast (default: lorascope's measured default; a calibration's
        :meth:`CapacityConstant.from_calibration <lorascope.analysis.capacity.CapacityConstant.from_calibration>`).

    Raises
    ------
    LorascopeError
        Runs of different models passed together, an invalid ``ranks``/``p``/``x``, or an unreadable file
        (a :class:`~lorascope.errors.RunFileError`).
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike, Run)) else list(paths)
    if not paths:
        raise LorascopeError("analyze needs at least one run file")
    if x not in X_AXES:
        raise InvalidOptionError(f"The 'x' parameter of analyze must be one of {X_AXES}. Got {x!r} instead.")
    ranks = check_ranks(ranks, "analyze")
    p = tuple(sorted({float(v) for v in p} | {CURVE_P}))
    metric_ranks = tuple(sorted(set(ranks) | {1, 2, 4, 8, 16, 32, 64, 128, 256}))
    runs, first, sources = [], None, {}
    for source in progress(paths) if progress else paths:
        loaded = load_run(source)
        facts = ModelFacts.of_run(loaded)
        if first is None:
            first = facts
        else:
            check_same_model(first, facts, refusal="cannot share a curve", matrices="same")
        runs.append(_result(loaded, p, metric_ranks))
        sources[id(runs[-1])] = source
    analysis = Analysis(runs=runs, ranks=ranks, p=p, x=x)
    _add_notes(analysis)
    analysis.curves = _curves(analysis)
    analysis.forecast, analysis.forecast_missing = forecast_runs(runs, ranks, constant=constant)
    analysis.contributions, analysis.contributions_missing = contributions_of_run(analysis.final_run, ranks,
                                                                                  analysis.forecast)
    final = analysis.final_run
    if final.n_snapshots:  # without snapshots the report already says there is no spectral analysis
        analysis.subspace = read_subspace(sources[id(final)], final.path, ranks, x)
    return analysis


def _result(run: LoadedRun, p: tuple[float, ...], ranks: tuple[int, ...]) -> RunResult:
    """What one run contributes: its noise scale, batch advice and (with snapshots) its metrics."""
    steps, snapshots = run.steps, run.snapshots
    result = RunResult(path=run.path, status=run.status, complete=run.complete, framework=run.framework,
                       modules=run.modules, steps=steps, metrics=None, by_kind=None, by_layer=None, overall=None,
                       config=run.config, flags=run.flags)
    result.noise = noise_scale(steps) if steps.sizes.get("step", 0) else None
    result.batch_advice = _batch_advice(result)
    result.divergence = find_divergence(steps, snapshots)
    if snapshots is not None:
        metrics = update_metrics(snapshots, p=p, ranks=ranks)
        result.metrics = metrics
        result.by_kind = aggregate(metrics, "kind")
        result.by_layer = aggregate(metrics, "layer")
        result.overall = aggregate(metrics, "all")
        result.final_spectra = snapshots["sv"].isel(snapshot=-1)
        result.final_held = snapshots[[n for n in snapshots.data_vars if str(n).startswith("held_loss")]].isel(
            snapshot=-1)
    return result


def _batch_advice(run: RunResult) -> BatchAdvice | None:
    """Where the run's batch sits against its noise scale (None without a positive estimate)."""
    if run.noise is None:
        return None
    b_noise = run.noise.final["all"]["b_simple"]
    batches = run.steps["batch_examples"].values
    batches = batches[batches > 0]
    if b_noise is None or b_noise <= 0 or not batches.size:
        return None
    return batch_tradeoff(float(b_noise), float(np.median(batches)), lora=run.is_lora)


def _recording_cost(cost: Any) -> str | None:
    """The recorder's own cost, from the ``recording_cost`` section it writes at close (None when absent)."""
    if not isinstance(cost, dict):
        return None
    share, counts = cost.get("share_of_training"), [cost.get(k) for k in ("snapshots_taken", "snapshots_thinned",
                                                                           "snapshots_skipped")]
    if not isinstance(share, (int, float)) or not all(isinstance(c, int) for c in counts):
        return None
    taken, thinned, skipped = counts
    return (f"recording cost {share:.1%} of the training time ({taken} snapshot(s) taken, {thinned} thinned by the "
            f"time budget, {skipped} skipped by the backlog policy)")


def _add_notes(analysis: Analysis) -> None:
    for run in analysis.runs:
        analysis.notes.extend(f"{run.path}: flagged by the file's validation: {flag}" for flag in run.flags)
        cost = _recording_cost(run.config.get("recording_cost"))
        if cost:
            analysis.notes.append(f"{run.path}: {cost}")
        if not run.complete:
            analysis.notes.append(f"{run.path}: incomplete run (status '{run.status}'); results cover what was "
                                  "written so far")
        if run.noise is None:
            analysis.notes.append(f"{run.path}: no gradient noise scale: no step had gradient norms at two batch "
                                  "sizes; record with gradient accumulation (2 or more backward passes per optimizer "
                                  "step) or with gns='per_example' to measure it")
        else:
            analysis.notes.extend(f"{run.path}: {note}" for note in run.noise.notes)
            if run.batch_advice is not None and run.batch_advice.warning:
                analysis.notes.append(f"{run.path}: {run.batch_advice.warning}")
        if run.n_snapshots == 0:
            analysis.notes.append(f"{run.path}: no snapshots, so no spectral metrics; the loss curve is shown")
        elif run.metrics is not None:
            bad = int((~run.metrics["valid"]).sum())
            if bad:
                analysis.notes.append(f"{run.path}: {bad} module-snapshot(s) with non-finite updates were "
                                      "excluded from every aggregate and fit")
            analysis.notes.extend(f"{run.path}: {note}" for note in _zero_update_notes(run.metrics))
        no_gradient = missing_gradients(run.steps)
        if no_gradient:
            shown = ", ".join(f"{m} ({n} of {run.steps.sizes['step']} steps)" for m, n in list(no_gradient.items())[:5])
            more = f" and {len(no_gradient) - 5} more" if len(no_gradient) > 5 else ""
            analysis.notes.append(f"{run.path}: {len(no_gradient)} matrix(es) had no gradient at some steps (frozen "
                                  f"for part of the run, unused, or a skipped step; not a non-finite gradient): "
                                  f"{shown}{more}")
        if run.divergence is not None:
            analysis.notes.append(f"{run.path}: {_divergence_note(run.divergence)}")
    if len(analysis.runs) == 1 and analysis.runs[0].n_snapshots == 1:
        analysis.notes.append("a single snapshot: no rank-vs-data curve (it needs at least 3 points)")


def _curves(analysis: Analysis) -> dict[str, CurveResult]:
    """k_0.9 against data, per kind and over all modules; one point per snapshot (one run) or per run."""
    with_snaps = [r for r in analysis.runs if r.n_snapshots]
    if not with_snaps:
        return {}
    series: dict[str, tuple[list[float], list[float]]] = {}

    reasons: dict[str, list[str | None]] = {}

    def add(group: str, xs: Any, ys: Any, agg: xr.Dataset) -> None:
        entry = series.setdefault(group, ([], []))
        entry[0].extend(np.atleast_1d(xs).tolist())
        entry[1].extend(np.atleast_1d(ys).tolist())
        reasons.setdefault(group, []).extend(
            _point_missing(y, m, e) for y, m, e in zip(np.atleast_1d(ys), np.atleast_1d(agg["modules"].values),
                                                       np.atleast_1d(agg["energy"].values)))

    several = len(with_snaps) > 1
    for run in with_snaps:
        pick = (lambda d: d.isel(snapshot=[-1])) if several else (lambda d: d)
        by_kind, overall = pick(run.by_kind), pick(run.overall)
        xs = by_kind[analysis.x].values
        for kind in by_kind["kind"].values:
            add(str(kind), xs, by_kind["energy_rank"].sel(kind=kind, p=CURVE_P).values, by_kind.sel(kind=kind))
        add("all", xs, overall["energy_rank"].sel(all="all", p=CURVE_P).values, overall.sel(all="all"))
    curves = {}
    for group, (xs, ys) in series.items():
        fit = fit_power_law(xs, ys)
        ceiling = _largest_rank(analysis.final_run.modules, None if group == "all" else group)
        curves[group] = CurveResult(group, np.asarray(xs), np.asarray(ys), fit,
                                    [fit.crossing(r, ceiling=ceiling) for r in analysis.ranks], reasons[group])
    return curves


NONFINITE_UPDATE = "every update of the group is non-finite (NaN or Inf) at this snapshot"
ZERO_UPDATE = "the group's update is exactly zero at this snapshot (no matrix moved): its ranks are undefined"


def _point_missing(y: float, modules: float, energy: float) -> str | None:
    """Why a curve point's k_0.9 is NaN (None when it is a number)."""
    if np.isfinite(y):
        return None
    if modules == 0:
        return NONFINITE_UPDATE
    return ZERO_UPDATE if energy == 0 else "k_0.9 is undefined at this snapshot"


def _snapshot_missing(snap: xr.Dataset) -> str | None:
    """Why the final snapshot's overall numbers are n/a (None when they are not)."""
    valid = snap["valid"].values
    if not valid.any():
        return "every recorded matrix's update is non-finite (NaN or Inf) at this snapshot"
    if not np.nansum(snap["energy"].values[valid]) > 0:
        return "every finite update is exactly zero at this snapshot (no matrix moved): ranks are undefined"
    return None


def _zero_update_notes(metrics: xr.Dataset) -> list[str]:
    """Notes on updates that are exactly zero: the whole run, or matrices that never moved."""
    zero = zero_updates(metrics)
    if not zero.size or not zero.any():
        return []
    if zero.all():
        return ["no recorded matrix moved: every update is exactly zero (a learning rate of 0, or no gradient "
                "reached them); energy ranks, residuals and captures are n/a"]
    still = [str(m) for m in metrics["module"].values[zero.all(axis=0)]]
    if still:
        shown = ", ".join(still[:5]) + (f" and {len(still) - 5} more" if len(still) > 5 else "")
        return [f"{len(still)} matrix(es) never moved (a zero update at every snapshot: frozen, unused, or a "
                f"learning rate of 0): {shown}; their ranks are n/a and they weigh nothing in the aggregates"]
    return [f"{int(zero.sum())} module-snapshot(s) with an exactly zero update: their ranks are n/a and they weigh "
            "nothing in the aggregates"]


def _divergence_note(div: Divergence) -> str:
    """Where a run diverged, in words."""
    seen = f" ({div.examples_seen:,} examples)" if div.examples_seen is not None else ""
    parts = [f"diverged at step {div.step}{seen}"]
    if div.loss_step is not None:
        parts.append(f"first non-finite loss at step {div.loss_step}")
    for label, step, attr in (("gradient", div.gradient_step, "gradient_step"),
                              ("update", div.update_step, "update_step")):
        if step is not None:
            first = [m.module for m in div.modules if getattr(m, attr) == step]
            where = "step" if label == "gradient" else "the snapshot of step"
            shown = ", ".join(first[:5]) + (f" and {len(first) - 5} more" if len(first) > 5 else "")
            parts.append(f"first non-finite {label} at {where} {step} ({shown})")
    return ("; ".join(parts) + "; non-finite updates are excluded from the aggregates and fits, and the final loss "
            "is n/a (per module: runs[].divergence in summary.json)")


def _largest_rank(modules: Any, kind: str | None) -> float | None:
    """The largest rank a group's updates can have: the widest min(out, in) among its matrices."""
    rows = modules if kind is None else modules[modules["kind"] == kind]
    return float((rows[["out_features", "in_features"]].min(axis=1)).max()) if len(rows) else None


def _present(value: T | None) -> T:
    """A result that a run with snapshots always has (its metrics and aggregates), narrowed from Optional."""
    if value is None:
        raise LorascopeError("internal: a run with snapshots has no metrics")
    return value


def _final_x(x: str) -> Callable[[RunResult], float]:
    return lambda run: float(run.metrics[x].values[-1]) if run.metrics is not None else -1.0


def _num(value: Any) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def _group_dict(agg: xr.Dataset, by: str, analysis: Analysis) -> dict[str, Any]:
    out = {}
    for group in agg[by].values:
        row = agg.sel({by: group})
        out[str(group)] = {
            "modules": int(row["modules"]),
            "energy": _num(row["energy"]),
            "energy_share": _num(row["energy_share"]),
            "energy_rank": {str(p): _num(row["energy_rank"].sel(p=p)) for p in analysis.p},
            "energy_rank_fraction": {str(p): _num(row["energy_rank_fraction"].sel(p=p)) for p in analysis.p},
            "effective_rank": _num(row["effective_rank"]),
            "signal_rank": _num(row["signal_rank"]),
            "rank_residual": {str(r): _num(row["rank_residual"].sel(rank=r)) for r in analysis.ranks},
        }
    return out


def _run_dict(run: RunResult, x: str) -> dict[str, Any]:
    steps = run.steps
    loss = steps["loss"].values if "loss" in steps else np.array([])
    finite = loss[np.isfinite(loss)]
    return {
        "path": run.path,
        "status": run.status,
        "complete": run.complete,
        "framework": run.framework,
        "steps": int(steps.sizes.get("step", 0)),
        "snapshots": run.n_snapshots,
        "examples_seen": int(steps["examples_seen"].values[-1]) if steps.sizes.get("step", 0) else 0,
        "tokens_seen": int(steps["tokens_seen"].values[-1]) if steps.sizes.get("step", 0) else 0,
        "final_loss": float(finite[-1]) if finite.size and run.divergence is None else None,
        "divergence": None if run.divergence is None else run.divergence.to_dict(),
        "no_gradient_steps": missing_gradients(steps),
        "nonfinite_gradient_steps": int((steps["grad_nonfinite_modules"].values > 0).sum())
        if "grad_nonfinite_modules" in steps else 0,
    }


def _records(frame: Any) -> list[dict[str, Any]]:
    return [{k: (v.item() if hasattr(v, "item") else v) if not (isinstance(v, float) and not np.isfinite(v))
             else None for k, v in row.items()} for row in frame.to_dict(orient="records")]
