"""The scalars the recorder publishes while training (docs/recording.md, "Live metrics in your tracker").

They are analyze's own numbers, computed from one snapshot at a time: per kind of matrix (and ``all``) the
energy rank :math:`k_{0.9}`, the signal rank, the rank-r residual :math:`e_r` at the candidate ranks and the
energy share come from :func:`lorascope.analysis.metrics.update_metrics` and
:func:`~lorascope.analysis.metrics.aggregate` (energy-weighted exactly as in ``lorascope analyze``); the gradient
noise scale is the ratio of the bias-corrected EMAs of :func:`lorascope.analysis.noise.unbiased_estimates`,
updated step by step (:class:`NoiseScaleEMA`), as :func:`lorascope.analysis.noise.noise_scale` computes it
over a whole run; the share of each candidate rank's capacity used so far (:func:`capacity_scalars`) is the bits
:func:`lorascope.analysis.forecast.forecast` reads from the steps so far, over the capacity it gives that rank.
Pure: arrays in, a ``{name: float}`` out; the recorder decides where they go.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from lorascope.analysis.capacity import CapacityConstant
from lorascope.analysis.forecast import Matrix, active_experts, lora_parameters_of, matrices_of
from lorascope.analysis.information import recorded_dataset_examples, recorded_vocab_size
from lorascope.analysis.layers import TARGET_SETS
from lorascope.analysis.metrics import DEFAULT_RANKS, aggregate, update_metrics
from lorascope.analysis.noise import DEFAULT_SMOOTHING, unbiased_estimates
from lorascope.analysis.recipe import bits_for_plan, information_as_run
from lorascope.errors import InvalidOptionError

__all__ = ["CAPACITY", "CAPACITY_TARGET", "PREFIX", "CapacityInputs", "NoiseScaleEMA", "capacity_constant",
           "capacity_inputs", "capacity_scalars", "group_norms", "live_ranks", "metric_name", "noise_scale_scalars",
           "snapshot_scalars"]

PREFIX = "lorascope"
ALL = "all"  # the group of every recorded matrix
CAPACITY = "capacity"  # the group of the capacity share: lorascope/capacity/share_r<r>, lorascope/capacity/bits
CAPACITY_TARGET = "all-linear"
"""The LoRA target set whose capacity the live share is of: every recorded matrix a LoRA adapts
(:data:`lorascope.analysis.layers.TARGET_SETS`), the first row set of analyze's forecast."""


def metric_name(kind: str, metric: str) -> str:
    """The one naming scheme of the published scalars.

    >>> metric_name("attention", "energy_rank_p90")
    'lorascope/attention/energy_rank_p90'
    """
    return f"{PREFIX}/{kind}/{metric}"


def live_ranks(out_features: Sequence[int], in_features: Sequence[int],
               candidates: Sequence[int] = DEFAULT_RANKS) -> tuple[int, ...]:
    """The candidate ranks worth a residual: those below the largest matrix rank min(out, in) of the run.

    >>> live_ranks([64, 64], [32, 128])
    (1, 2, 4, 8, 16, 32)
    """
    full = max((min(int(o), int(i)) for o, i in zip(out_features, in_features)), default=0)
    return tuple(r for r in candidates if r < full) or tuple(candidates[:1])


def snapshot_scalars(energy: Sequence[float] | np.ndarray, sv: Sequence[np.ndarray | None],
                     out_features: Sequence[int], in_features: Sequence[int], kinds: Sequence[str], *,
                     delta_nonfinite: Sequence[int] | np.ndarray | None = None,
                     ranks: Sequence[int] | None = None) -> dict[str, float]:
    """Per kind and for ``all``: k_0.9, signal rank, e_r at ``ranks`` and energy share of one snapshot.

    Parameters
    ----------
    energy
        (M,) :math:`\\|\\Delta\\|_F^2` of each recorded matrix.
    sv
        M descending spectra (``None`` where none was computed).
    out_features, in_features, kinds
        (M,) the matrices' shapes and kinds.
    delta_nonfinite
        (M,) non-finite entries of each update (such matrices are left out, as analyze does).
    ranks
        Candidate ranks of the residuals; default :func:`live_ranks`.

    Returns
    -------
    dict
        ``lorascope/<kind>/energy_rank_p90``, ``.../signal_rank``, ``.../rank_residual_r<r>``,
        ``.../energy_share``; a value that is not finite (no valid matrix of the kind) is left out.

    Examples
    --------
    >>> out = snapshot_scalars([14.0], [np.array([3.0, 2.0, 1.0])], [3], [3], ["mlp"], ranks=[1])
    >>> round(out["lorascope/mlp/rank_residual_r1"], 4), out["lorascope/mlp/energy_rank_p90"]
    (0.3571, 2.0)
    """
    energy = np.asarray(energy, dtype=np.float64)
    m = energy.shape[0]
    width = max((0 if s is None else len(s) for s in sv), default=0)
    padded = np.full((1, m, max(width, 1)), np.nan)
    for j, s in enumerate(sv):
        if s is not None and len(s):
            padded[0, j, : len(s)] = np.asarray(s, dtype=np.float64)
    count = np.array([[0 if s is None else len(s) for s in sv]])
    nonfinite = np.zeros((1, m), dtype=np.int64) if delta_nonfinite is None else \
        np.asarray(delta_nonfinite, dtype=np.int64)[None, :]
    module = {"out_features": ("module", np.asarray(out_features, dtype=np.int64)),
              "in_features": ("module", np.asarray(in_features, dtype=np.int64)),
              "kind": ("module", np.asarray(kinds, dtype=object))}
    snapshots = xr.Dataset(
        {"sv": (("snapshot", "module", "sv_index"), padded), "energy": (("snapshot", "module"), energy[None, :]),
         "sv_count": (("snapshot", "module"), count), "delta_nonfinite": (("snapshot", "module"), nonfinite)},
        coords=module)
    chosen = tuple(ranks) if ranks is not None else live_ranks(out_features, in_features)
    metrics = update_metrics(snapshots, p=(0.9,), ranks=chosen)
    out: dict[str, float] = {}
    for by in ("kind", ALL):
        groups = aggregate(metrics, by=by).isel(snapshot=0)
        for group in groups[by].values:
            g = groups.sel({by: group})
            values = {"energy_rank_p90": g["energy_rank"].sel(p=0.9), "signal_rank": g["signal_rank"],
                      "energy_share": g["energy_share"],
                      **{f"rank_residual_r{r}": g["rank_residual"].sel(rank=r) for r in chosen}}
            for metric, value in values.items():
                value = float(value)
                if np.isfinite(value):
                    out[metric_name(str(group), metric)] = value
    return out


@dataclass(frozen=True)
class NoiseScaleEMA:
    """Running bias-corrected EMAs of :math:`|G|^2` and :math:`\\mathrm{tr}\\,\\Sigma` per group of matrices.

    The streaming form of :func:`lorascope.analysis.noise.noise_scale`: :meth:`update` with each step's norms
    (a step without them leaves the averages as they are), :meth:`b_simple` the ratio of the EMAs. Immutable:
    :meth:`update` returns the next state.

    Examples
    --------
    >>> ema = NoiseScaleEMA().update({"all": (1.0 + 8.0 / 2, 1.0 + 8.0 / 8)}, 2, 8)  # |G|^2 = 1, tr = 8
    >>> ema.b_simple()
    {'all': 8.0}
    """

    smoothing: float = DEFAULT_SMOOTHING
    g2: tuple[tuple[str, float], ...] = ()
    trace: tuple[tuple[str, float], ...] = ()
    weight: tuple[tuple[str, float], ...] = ()

    def update(self, sq_norms: dict[str, tuple[float, float]], b_small: float, b_big: float) -> NoiseScaleEMA:
        """Add one step: per group (squared norm at ``b_small``, squared norm at ``b_big``)."""
        g2, trace, weight = dict(self.g2), dict(self.trace), dict(self.weight)
        a = self.smoothing
        for group, (small, big) in sq_norms.items():
            step_g2, step_trace = (float(v) for v in unbiased_estimates(small, big, b_small, b_big))
            if not (np.isfinite(step_g2) and np.isfinite(step_trace)):
                continue
            g2[group] = a * g2.get(group, 0.0) + (1 - a) * step_g2
            trace[group] = a * trace.get(group, 0.0) + (1 - a) * step_trace
            weight[group] = a * weight.get(group, 0.0) + (1 - a)
        return NoiseScaleEMA(a, tuple(g2.items()), tuple(trace.items()), tuple(weight.items()))

    def b_simple(self) -> dict[str, float]:
        """:math:`B_{\\mathrm{simple}} = \\mathrm{EMA}[\\mathrm{tr}\\Sigma] / \\mathrm{EMA}[|G|^2]` per group with
        a positive :math:`|G|^2` average (the bias corrections cancel in the ratio)."""
        trace = dict(self.trace)
        return {group: trace[group] / g2 for group, g2 in self.g2 if g2 > 0 and np.isfinite(trace[group] / g2)}


def group_norms(sq_small: Sequence[float] | np.ndarray, sq_big: Sequence[float] | np.ndarray,
                kinds: Sequence[str]) -> dict[str, tuple[float, float]]:
    """One step's squared norms summed per kind and over ``all``, as :func:`lorascope.analysis.noise.noise_scale`
    sums them (norms add over parameter blocks; a matrix whose norms are not finite is left out of the step).

    >>> group_norms([1.0, 2.0, np.nan], [0.5, 1.0, 3.0], ["mlp", "mlp", "attention"])
    {'all': (3.0, 1.5), 'attention': (0.0, 0.0), 'mlp': (3.0, 1.5)}
    """
    small, big = np.asarray(sq_small, dtype=np.float64), np.asarray(sq_big, dtype=np.float64)
    names = np.asarray(kinds, dtype=str)
    ok = np.isfinite(small) & np.isfinite(big)
    out = {ALL: (float(small[ok].sum()), float(big[ok].sum()))}
    for kind in sorted(set(names.tolist())):
        chosen = ok & (names == kind)
        out[kind] = (float(small[chosen].sum()), float(big[chosen].sum()))
    return out


def noise_scale_scalars(ema: NoiseScaleEMA, batch_examples: float | None) -> dict[str, float]:
    """``lorascope/<group>/noise_scale`` (B_simple) and, for ``all`` with a known batch size,
    ``lorascope/all/batch_over_noise_scale`` (B / B_noise: above 1 for LoRA, above 4 for full fine-tuning,
    the batch spends more examples than it needs, :func:`lorascope.analysis.noise.batch_tradeoff`).

    >>> ema = NoiseScaleEMA().update({"all": (5.0, 2.0)}, 2, 8)
    >>> noise_scale_scalars(ema, 16)
    {'lorascope/all/noise_scale': 8.0, 'lorascope/all/batch_over_noise_scale': 2.0}
    """
    out = {metric_name(group, "noise_scale"): value for group, value in ema.b_simple().items()}
    b_noise = out.get(metric_name(ALL, "noise_scale"))
    if b_noise is not None and b_noise > 0 and batch_examples is not None and batch_examples > 0:
        out[metric_name(ALL, "batch_over_noise_scale")] = float(batch_examples) / b_noise
    return out


def capacity_constant(calibration: Any = None) -> CapacityConstant:
    """The bits per LoRA parameter the live capacity share divides by: lorascope's default constant, a given
    :class:`~lorascope.analysis.capacity.CapacityConstant`, or a calibration of this architecture
    (:func:`lorascope.load_calibration`; its :math:`\\kappa(P)`, as analyze and recommend use it).

    Raises
    ------
    InvalidOptionError
        Anything else (a path: load it with ``lorascope.load_calibration(path)`` first), or a calibration in
        which no rank learned.

    >>> capacity_constant().bits_per_parameter
    0.69
    """
    if calibration is None:
        return CapacityConstant.default()
    if isinstance(calibration, CapacityConstant):
        return calibration
    if hasattr(calibration, "points") and hasattr(calibration, "bracket"):
        return CapacityConstant.from_calibration(calibration)
    raise InvalidOptionError(f"The 'calibration' parameter of lorascope.record must be a calibration "
                             f"(lorascope.load_calibration(path)) or a CapacityConstant. Got "
                             f"{type(calibration).__name__} instead.")


@dataclass(frozen=True)
class CapacityInputs:
    """What the live capacity share needs besides the steps: the dataset size, the LoRA-adaptable matrices, the
    experts routed per token, and the constant. ``None`` from :func:`capacity_inputs` says why there is none."""

    dataset_examples: int
    matrices: tuple[Matrix, ...]
    active_experts: int | None
    constant: CapacityConstant
    vocab_size: int | None = None


def capacity_inputs(config: Mapping[str, Any], modules: Mapping[str, Sequence[Any]],
                    constant: CapacityConstant) -> CapacityInputs | str:
    """The inputs of :func:`capacity_scalars` from a run's config and modules table, as analyze's forecast reads
    them (:mod:`lorascope.workflows.forecast`), or why the run has no capacity share: a LoRA run (its own
    capacity caps what it absorbs), an RL run (bits per episode), no recorded dataset size, no matrix a LoRA
    adapts.

    >>> capacity_inputs({"lora": {"r": 8}}, {}, capacity_constant())
    'a LoRA run'
    """
    if config.get("lora"):
        return "a LoRA run"
    if config.get("task") == "rl":
        return "an RL run"
    examples = recorded_dataset_examples(config)
    if examples is None:
        return "no dataset size in the run config (dataset.examples)"
    matrices = tuple(m for m in matrices_of(modules) if m.kind in TARGET_SETS[CAPACITY_TARGET])
    if not matrices:
        return "no recorded matrix a LoRA adapts"
    return CapacityInputs(examples, matrices, active_experts((config.get("model") or {}).get("config")), constant,
                          recorded_vocab_size(config))


def capacity_scalars(steps: xr.Dataset, inputs: CapacityInputs, ranks: Sequence[int]) -> dict[str, float]:
    """``lorascope/capacity/bits`` and, per candidate rank r, ``lorascope/capacity/share_r<r>``: the bits the
    run has absorbed so far over the capacity of a rank-r LoRA on :data:`CAPACITY_TARGET`.

    .. math:: \\mathrm{share}(r) = \\frac{F + a(E)\\,N}{\\kappa(P(r))\\,P(r)}

    The bits are those of :func:`~lorascope.analysis.recipe.information_as_run` on the steps so far (the
    prequential code of the first epoch's second half minus the code under the model now, on loss tokens, at the
    epochs :math:`E` run so far) through :func:`~lorascope.analysis.recipe.bits_for_plan`, exactly as analyze's
    forecast reads the finished file; the capacity is the forecast row's (:func:`lorascope.analysis.forecast.forecast`).
    Nothing (``{}``) before the first epoch is complete (its prequential code is not read yet), when the steps
    do not give an estimate, or while the bits are below what the run resolves (an upper bound, not a share).

    Parameters
    ----------
    steps : xarray.Dataset
        The steps so far (``loss``, ``batch_examples``, ``batch_tokens``, ``batch_loss_tokens``, ``examples_seen``,
        optionally ``lr``), as the run file stores them.
    inputs : CapacityInputs
    ranks : sequence of int

    Examples
    --------
    Eight steps of 8 one-token examples over a dataset of 32, the loss falling from 4 to 1 bit:

    >>> loss = np.repeat([4.0, 4.0, 1.0, 1.0], 2) * np.log(2)
    >>> steps = xr.Dataset({"loss": ("step", loss), "batch_examples": ("step", np.full(8, 8)),
    ...                     "batch_tokens": ("step", np.full(8, 8)), "batch_loss_tokens": ("step", np.full(8, 8)),
    ...                     "examples_seen": ("step", np.arange(1, 9) * 8)})
    >>> inputs = CapacityInputs(32, (Matrix("mlp", 16, 8, "up"),), None, CapacityConstant(0.5, 2.0, "test"))
    >>> out = capacity_scalars(steps, inputs, ranks=[1, 2])
    >>> out["lorascope/capacity/bits"], out["lorascope/capacity/share_r1"], out["lorascope/capacity/share_r2"]
    (96.0, 8.0, 4.0)
    >>> capacity_scalars(steps.isel(step=slice(0, 3)), inputs, ranks=[1])  # the first epoch is not over
    {}
    """
    seen = np.asarray(steps["examples_seen"].values, dtype=np.float64)
    if not seen.size or not np.nanmax(seen) >= inputs.dataset_examples:
        return {}
    try:
        information = information_as_run(steps, dataset_examples=inputs.dataset_examples,
                                         vocab_size=inputs.vocab_size)
        bits = bits_for_plan([information])
    except InvalidOptionError:  # too few steps, no usable loss, nothing absorbed yet
        return {}
    if information.below_resolution:
        return {}
    absorbed = bits.bits(float(inputs.dataset_examples))
    out = {metric_name(CAPACITY, "bits"): float(absorbed)}
    kinds = TARGET_SETS[CAPACITY_TARGET]
    for rank in ranks:
        count, _ = lora_parameters_of(inputs.matrices, kinds, int(rank), inputs.active_experts)
        if count > 0:
            out[metric_name(CAPACITY, f"share_r{int(rank)}")] = float(absorbed / inputs.constant.capacity_bits(count))
    return out
