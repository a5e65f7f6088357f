"""Rank measures against float64 numpy references, fuzzed invariants, and planted structure."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lorascope.analysis import spectra


@pytest.fixture
def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


finite = st.floats(0.0, 1e3, allow_nan=False, allow_infinity=False)


def _sorted_desc(values: np.ndarray) -> np.ndarray:
    return np.sort(np.abs(values))[::-1]


spectrum = arrays(np.float64, st.integers(1, 40), elements=finite).map(_sorted_desc).filter(lambda s: s.sum() > 1e-6)


def reference_energy_rank(s: np.ndarray, p: float) -> int:
    e = s**2  # the implementation's tolerance, relative to p (an absolute 1e-12 split [213, 213, 3e-4, 3e-4] at 0.5)
    return int(np.searchsorted(np.cumsum(e) / e.sum(), p * (1 - 1e-12)) + 1)


@given(spectrum, st.sampled_from([0.5, 0.9, 0.99, 1.0]))
@settings(max_examples=200, deadline=None)
def test_energy_rank_matches_reference_and_is_monotone_in_p(s, p):
    k = spectra.energy_rank(s, p)
    assert k == reference_energy_rank(s, p)
    assert spectra.energy_rank(s, 0.5) <= spectra.energy_rank(s, 0.9) <= spectra.energy_rank(s, 0.99)
    assert 1 <= k <= np.count_nonzero(s) or k == 1


@given(spectrum)
@settings(max_examples=200, deadline=None)
def test_effective_rank_lies_between_one_and_rank(s):
    erank = float(spectra.effective_rank(s))
    assert 1.0 - 1e-9 <= erank <= np.count_nonzero(s) + 1e-9


@given(spectrum, st.floats(1e-3, 1e3))
@settings(max_examples=100, deadline=None)
def test_measures_are_scale_invariant(s, scale):
    for fn in (lambda v: spectra.energy_rank(v, 0.9), spectra.effective_rank, spectra.stable_rank,
               lambda v: spectra.rank_residual(v, 2)):
        np.testing.assert_allclose(fn(s * scale), fn(s), rtol=1e-9, atol=1e-12)


@given(spectrum)
@settings(max_examples=200, deadline=None)
def test_residual_is_in_unit_interval_and_decreasing_in_r(s):
    residuals = [float(spectra.rank_residual(s, r)) for r in range(0, len(s) + 2)]
    assert all(0.0 <= e <= 1.0 for e in residuals)
    assert all(a >= b - 1e-12 for a, b in zip(residuals, residuals[1:]))
    assert residuals[0] == pytest.approx(1.0) and residuals[len(s)] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("shape", [(30, 20), (20, 30), (16, 16)])
def test_sum_of_squares_is_the_frobenius_energy(rng, shape):
    m = rng.normal(size=shape)
    s = np.linalg.svd(m, compute_uv=False)
    assert float(spectra.energy(s)) == pytest.approx(float(np.sum(m**2)), rel=1e-10)
    assert float(spectra.stable_rank(s)) == pytest.approx(np.sum(m**2) / s[0] ** 2, rel=1e-10)
    p = s / s.sum()
    assert float(spectra.effective_rank(s)) == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-10)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_planted_rank_k_plus_small_noise_gives_k90_equal_k(rng, k):
    m, n = 120, 80
    signal = sum(np.outer(rng.normal(size=m), rng.normal(size=n)) for _ in range(k))
    noise = 1e-3 * rng.normal(size=(m, n))
    s = np.linalg.svd(signal + noise, compute_uv=False)
    assert spectra.energy_rank(s, 0.9) <= k
    assert spectra.energy_rank(s, 0.99) <= k + 1
    assert spectra.signal_rank(s, (m, n)) == k


def test_signal_rank_sees_spikes_above_a_noise_bulk_that_dominates_energy(rng):
    m, n, k = 300, 200, 4
    noise = rng.normal(size=(m, n))  # per-entry sigma 1: bulk edge ~ sqrt(300) + sqrt(200) = 31.5
    u, _ = np.linalg.qr(rng.normal(size=(m, k)))
    v, _ = np.linalg.qr(rng.normal(size=(n, k)))
    spikes = u @ np.diag([120.0, 100.0, 80.0, 60.0]) @ v.T
    s = np.linalg.svd(noise + spikes, compute_uv=False)
    assert spectra.energy_rank(s, 0.9) > 50  # the noise floor dominates the energy
    assert spectra.signal_rank(s, (m, n)) == k
    assert spectra.signal_rank(s, (m, n), noise_sigma=1.0) == k


def test_top_k_spectra_report_bounds_not_inventions():
    full = np.array([4.0, 3.0, 2.0, 1.0])
    energy = float(np.sum(full**2))
    top2 = np.array([4.0, 3.0, np.nan, np.nan])
    k, bound = spectra.energy_rank(top2, 0.5, total_energy=energy, return_bound=True)
    assert (k, bool(bound)) == (1.0, False)  # 16/30 >= 0.5: exact from the stored values
    k, bound = spectra.energy_rank(top2, 0.9, total_energy=energy, return_bound=True)
    assert bool(bound) and k == 3.0  # stored values hold 25/30 < 0.9: at least 3
    assert float(spectra.rank_residual(top2, 1, total_energy=energy)) == pytest.approx(1 - 16 / 30)
    assert float(spectra.stable_rank(top2, total_energy=energy)) == pytest.approx(30 / 16)
    assert np.isnan(spectra.effective_rank(top2, complete=False))
    assert np.isnan(spectra.signal_rank(top2, (4, 4), complete=False))


def test_nan_padding_and_zero_updates():
    padded = np.array([[3.0, 2.0, np.nan], [0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(spectra.energy(padded), [13.0, 0.0])
    k = spectra.energy_rank(padded, 0.9)
    assert k[0] == 2 and np.isnan(k[1])
    assert np.isnan(spectra.rank_residual(padded, 1)[1])
    assert np.isnan(spectra.effective_rank(padded)[1])


def test_invalid_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="'p' parameter of energy_rank"):
        spectra.energy_rank([1.0], p=0.0)
    with pytest.raises(ValueError, match="'r' parameter of rank_residual"):
        spectra.rank_residual([1.0], -1)
    with pytest.raises(ValueError, match="'beta'"):
        spectra.gavish_donoho_omega(0.0)
