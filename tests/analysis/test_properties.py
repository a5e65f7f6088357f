"""Properties of the metrics and estimators on what a recording can hold (issue 15, item 5): NaN padding and NaN
measurements, +Inf, exact zeros, denormals, and matrices of extreme aspect ratios. Whatever the input, each function
returns (never raises) and each value is either NaN (undefined) or within its law: energy ranks monotone in p and
bounded by the dimension, residuals in [0, 1] and non-increasing in r, effective rank in [1, rank], stable rank >= 1,
shares in [0, 1], and the noise scale B_simple invariant to the units of the norms and equivariant in batch size.

``tests/analysis/test_analysis_spectra.py`` checks the same measures against numpy references on clean spectra.
"""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lorascope.analysis import spectra
from lorascope.analysis.metrics import aggregate, update_metrics
from lorascope.analysis.noise import noise_scale, unbiased_estimates

SETTINGS = settings(max_examples=50, deadline=None)
DENORMAL = 5e-324
SPECIAL = [0.0, DENORMAL, 1e-310, 1e-300, 1e-150, 1.0, 1e150, 1e300, np.inf, np.nan]
values = st.one_of(st.sampled_from(SPECIAL), st.floats(0.0, 1e6, allow_nan=False))
ASPECTS = [(1, 1), (1, 4096), (4096, 1), (2, 3000), (7, 5), (64, 64)]


@st.composite
def padded_spectra(draw, max_len: int = 24):
    """(modules, K) singular values as a run file stores them: each row descending (NaN and +Inf sort first, as
    a diverged update could hold), NaN-padded past its count; with the counts."""
    rows = draw(st.integers(1, 4))
    length = draw(st.integers(1, max_len))
    raw = draw(arrays(np.float64, (rows, length), elements=values))
    counts = np.array([draw(st.integers(0, length)) for _ in range(rows)])
    sv = np.full((rows, length), np.nan)
    for i, n in enumerate(counts):
        head = raw[i, :n]
        sv[i, :n] = np.concatenate([head[np.isnan(head)], -np.sort(-head[~np.isnan(head)])])
    return sv, counts


def _nan_or_within(x: np.ndarray, low: np.ndarray | float, high: np.ndarray | float) -> bool:
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return bool(np.all(np.isnan(x) | ((x >= low - 1e-9) & (x <= high + 1e-9))))


@given(padded_spectra(), st.one_of(st.none(), values))
@SETTINGS
def test_energy_rank_is_monotone_in_p_and_bounded_by_the_values_stored(data, total):
    sv, counts = data
    ranks = [spectra.energy_rank(sv, p, total_energy=total) for p in (0.1, 0.5, 0.9, 0.99, 1.0)]
    for k in ranks:
        assert _nan_or_within(k, 1, counts + 1)  # k_p <= count, or count + 1 flagged as a lower bound
        assert np.array_equal(np.isnan(k), np.isnan(ranks[0]))  # undefined for every p alike
    for low, high in zip(ranks, ranks[1:]):
        assert np.all(np.isnan(low) | (low <= high))
    if total is None:  # the energy is the stored values': never past them
        assert _nan_or_within(ranks[-1], 1, np.maximum(counts, 1))


@given(padded_spectra(), st.one_of(st.none(), values))
@SETTINGS
def test_residual_is_in_the_unit_interval_and_non_increasing_in_r(data, total):
    sv, _ = data
    residuals = np.stack([spectra.rank_residual(sv, r, total_energy=total) for r in range(sv.shape[1] + 2)])
    assert _nan_or_within(residuals, 0.0, 1.0)
    assert np.all(np.isnan(residuals[:-1]) | (residuals[:-1] >= residuals[1:] - 1e-12))
    assert np.array_equal(np.isnan(residuals), np.broadcast_to(np.isnan(residuals[0]), residuals.shape))


@given(padded_spectra())
@SETTINGS
def test_effective_stable_and_signal_ranks_stay_in_their_ranges(data):
    sv, counts = data
    assert _nan_or_within(spectra.effective_rank(sv), 1.0, np.maximum(counts, 1))
    assert _nan_or_within(spectra.stable_rank(sv), 1.0, np.inf)
    for shape in ASPECTS:
        assert _nan_or_within(spectra.signal_rank(sv, shape), 0, counts)
        assert _nan_or_within(spectra.signal_rank(sv, shape, noise_sigma=1e-3), 0, counts)


@given(padded_spectra(max_len=8), st.floats(1e-6, 1e6))
@SETTINGS
def test_rank_measures_of_finite_spectra_are_scale_invariant(data, scale):
    sv, _ = data
    sv = np.where(np.isinf(sv), 1.0, sv)
    sv = np.where(sv < 1e-100, 0.0, np.minimum(sv, 1e100))  # scaling must not under- or overflow
    for measure in (lambda s: spectra.energy_rank(s, 0.9), spectra.effective_rank, spectra.stable_rank,
                    lambda s: spectra.rank_residual(s, 2)):
        np.testing.assert_allclose(measure(sv * scale), measure(sv), rtol=1e-9, atol=1e-12)


@st.composite
def snapshot_views(draw):
    """A snapshots view with modules of extreme aspect ratios, spectra that may hold NaN, Inf, zeros and denormals,
    energies that may be NaN, Inf or zero, and some updates flagged non-finite."""
    n_snap = draw(st.integers(1, 3))
    shapes = draw(st.lists(st.sampled_from(ASPECTS), min_size=1, max_size=4))
    capacity = draw(st.integers(1, 6))
    sv = np.full((n_snap, len(shapes), capacity), np.nan)
    counts = np.zeros((n_snap, len(shapes)), dtype=np.int32)
    for i in range(n_snap):
        for j, shape in enumerate(shapes):
            n = draw(st.integers(0, min(capacity, *shape)))
            head = np.asarray(draw(st.lists(values, min_size=n, max_size=n)), dtype=np.float64)
            sv[i, j, :n] = -np.sort(-head)
            counts[i, j] = n
    energy = draw(arrays(np.float64, (n_snap, len(shapes)), elements=values))
    nonfinite = draw(arrays(np.int64, (n_snap, len(shapes)), elements=st.sampled_from([0, 0, 0, 3])))
    kinds = [draw(st.sampled_from(["attention", "mlp"])) for _ in shapes]
    return xr.Dataset(
        {"sv": (("snapshot", "module", "sv_index"), sv), "sv_count": (("snapshot", "module"), counts),
         "energy": (("snapshot", "module"), energy), "delta_nonfinite": (("snapshot", "module"), nonfinite)},
        coords={"step": ("snapshot", np.arange(1, n_snap + 1)), "module": [f"m{j}" for j in range(len(shapes))],
                "kind": ("module", kinds), "out_features": ("module", [s[0] for s in shapes]),
                "in_features": ("module", [s[1] for s in shapes])})


def _metrics(snapshots: xr.Dataset) -> xr.Dataset:
    with np.errstate(all="ignore"):
        return update_metrics(snapshots, p=(0.5, 0.9, 0.99), ranks=(1, 2, 4, 8))


@given(snapshot_views())
@SETTINGS
def test_update_metrics_hold_their_laws_on_any_recording(snapshots):
    metrics = _metrics(snapshots)
    valid = metrics["valid"].values
    assert np.all(np.isfinite(metrics["energy"].values[valid]))
    assert not np.any(metrics["energy_rank"].notnull().values & ~valid[..., None])
    k = metrics["energy_rank"].values
    full_rank = np.minimum(snapshots["out_features"].values, snapshots["in_features"].values)
    assert _nan_or_within(k, 1, (full_rank + 1)[None, :, None])  # bounded by the dimension (+1: a lower bound)
    assert np.all(np.isnan(k[..., :-1]) | (k[..., :-1] <= k[..., 1:]))  # monotone in p
    residual = metrics["rank_residual"].values
    assert _nan_or_within(residual, 0.0, 1.0)
    assert np.all(np.isnan(residual[..., :-1]) | (residual[..., :-1] >= residual[..., 1:] - 1e-12))
    assert _nan_or_within(metrics["effective_rank"].values, 1.0, full_rank[None, :])
    assert _nan_or_within(metrics["energy_rank_fraction"].values, 0.0, 2.0)


@given(snapshot_views())
@settings(max_examples=15, deadline=None)  # xarray's groupby makes an example ~0.1 s
def test_aggregates_hold_their_laws_on_any_recording(snapshots):
    groups = aggregate(_metrics(snapshots), by="kind")
    assert _nan_or_within(groups["energy_share"].values, 0.0, 1.0)
    assert _nan_or_within(groups["rank_residual"].values, 0.0, 1.0)
    assert np.all(groups["modules"].values >= 0)
    for name in ("energy_rank", "effective_rank"):  # energy-weighted means of values >= 1
        assert _nan_or_within(groups[name].values, 1.0, np.inf)


@st.composite
def noise_steps(draw):
    """A steps view with gradient norms at two batch sizes from E|G_B|^2 = |G|^2 + tr/B, some steps unmeasured,
    some norms NaN or Inf."""
    n, modules = draw(st.integers(1, 12)), draw(st.integers(1, 3))
    g2 = draw(arrays(np.float64, (n, modules), elements=st.floats(1e-3, 1e3)))
    trace = draw(arrays(np.float64, (n, modules), elements=st.floats(0.0, 1e4)))
    b_small, b_big = draw(st.sampled_from([(1.0, 8.0), (4.0, 16.0), (2.0, 64.0)]))
    small, big = g2 + trace / b_small, g2 + trace / b_big
    spoiled = draw(arrays(np.int8, (n, modules), elements=st.sampled_from([0, 0, 0, 0, 1, 2])))
    small = np.where(spoiled == 1, np.nan, np.where(spoiled == 2, np.inf, small))
    measured = draw(arrays(np.bool_, n, elements=st.sampled_from([True, True, False])))
    return xr.Dataset(
        {"gns_batch_small": ("step", np.where(measured, b_small, np.nan)),
         "gns_batch_big": ("step", np.where(measured, b_big, np.nan)),
         "gns_sq_norm_small": (("step", "module"), small), "gns_sq_norm_big": (("step", "module"), big)},
        coords={"step": np.arange(1, n + 1), "examples_seen": ("step", 8 * np.arange(1, n + 1)),
                "module": [f"m{j}" for j in range(modules)],
                "kind": ("module", ["attention", "mlp", "mlp"][:modules])})


def _scaled(steps: xr.Dataset, norms: float = 1.0, batch: float = 1.0) -> xr.Dataset:
    return steps.assign(gns_sq_norm_small=steps["gns_sq_norm_small"] * norms,
                        gns_sq_norm_big=steps["gns_sq_norm_big"] * norms,
                        gns_batch_small=steps["gns_batch_small"] * batch,
                        gns_batch_big=steps["gns_batch_big"] * batch)


def _b_simple(result) -> dict[str, float | None]:
    return {group: values["b_simple"] for group, values in result.final.items()}


@given(noise_steps(), st.floats(1e-6, 1e6), st.sampled_from([0.25, 2.0, 1024.0]))
@SETTINGS
def test_b_simple_is_invariant_to_norm_units_and_equivariant_in_batch_size(steps, norms, batch):
    base = noise_scale(steps, n_boot=20)
    if base is None:
        assert not np.any(np.isfinite(steps["gns_batch_small"].values))
        return
    for values in base.final.values():
        assert values["b_simple"] is None or np.isfinite(values["b_simple"])
        assert all(v is None or np.isfinite(v) for v in values["interval"])
    rescaled = _b_simple(noise_scale(_scaled(steps, norms=norms), n_boot=20))
    for group, value in _b_simple(base).items():
        if value is None:
            continue
        assert rescaled[group] == pytest.approx(value, rel=1e-6, abs=1e-9)
    rebatched = _b_simple(noise_scale(_scaled(steps, batch=batch), n_boot=20))
    for group, value in _b_simple(base).items():
        if value is not None:
            assert rebatched[group] == pytest.approx(value * batch, rel=1e-6, abs=1e-9)


@given(st.floats(1e-3, 1e3), st.floats(0.0, 1e4), st.sampled_from([(1.0, 8.0), (3.0, 5.0), (1.0, 1e6)]))
@SETTINGS
def test_unbiased_estimates_recover_the_gradient_and_its_noise(g2, trace, batches):
    b, big = batches
    est_g2, est_trace = unbiased_estimates(g2 + trace / b, g2 + trace / big, b, big)
    assert float(est_g2) == pytest.approx(g2, rel=1e-6, abs=1e-6 * (1 + trace))
    assert float(est_trace) == pytest.approx(trace, rel=1e-6, abs=1e-6 * (1 + g2) * big)
    for bad in ((b, b), (big, b), (0.0, big), (np.nan, big)):  # no pair of two batch sizes: NaN, never a number
        assert np.isnan(unbiased_estimates(1.0, 1.0, *bad)).all()
