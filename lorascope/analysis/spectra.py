"""Rank measures of an update from its singular values (REFERENCES.md section 3).

Every function takes singular values ``sigma`` with the values along the last axis, descending, NaN-padded
past the number actually stored (a run file's layout), and works on any leading shape. When only the top k
values are stored, pass the exact ``total_energy`` (the run file keeps it): measures that need the missing
tail are then reported as bounds (``energy_rank`` flags a lower bound) or NaN (``effective_rank``), never
invented.
"""

from __future__ import annotations

import warnings

import numpy as np
from numpy.typing import ArrayLike

from lorascope.errors import InvalidOptionError

__all__ = [
    "effective_rank",
    "energy",
    "energy_rank",
    "gavish_donoho_omega",
    "rank_residual",
    "signal_rank",
    "stable_rank",
]


def _sigma(sigma: ArrayLike) -> np.ndarray:
    s = np.asarray(sigma, dtype=np.float64)
    if s.ndim == 0:
        raise InvalidOptionError(f"sigma must have at least one axis (the singular values). "
                                 f"Got a scalar {s!r} instead.")
    return s


def _stored(s: np.ndarray) -> np.ndarray:
    return np.sum(np.isfinite(s), axis=-1)


def _total(s: np.ndarray, total_energy: ArrayLike | None) -> np.ndarray:
    if total_energy is None:
        return np.nansum(s**2, axis=-1)
    return np.broadcast_to(np.asarray(total_energy, dtype=np.float64), s.shape[:-1])


def energy(sigma: ArrayLike) -> np.ndarray:
    """Energy of a matrix from its singular values.

    .. math:: E = \\|M\\|_F^2 = \\sum_i s_i^2

    Examples
    --------
    >>> float(energy([3.0, 4.0, np.nan]))
    25.0
    """
    return np.nansum(_sigma(sigma) ** 2, axis=-1)


def energy_rank(sigma: ArrayLike, p: float = 0.9, *, total_energy: ArrayLike | None = None,
                return_bound: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Smallest number of singular directions holding a share ``p`` of the energy.

    .. math:: k_p = \\min\\{k : \\sum_{i \\le k} s_i^2 \\ge p \\, E\\}

    Parameters
    ----------
    sigma
        Singular values, descending, NaN-padded, along the last axis.
    p
        Energy share in (0, 1]. Biderman et al. (2024) use p = 0.9.
    total_energy
        Exact energy E when ``sigma`` holds only the top k values; defaults to the sum over ``sigma``.
    return_bound
        Also return a boolean array, True where the stored values do not reach ``p E`` and the result is
        only a lower bound (k + 1).

    Returns
    -------
    numpy.ndarray
        k_p as float (NaN for a zero or non-finite energy).

    Examples
    --------
    >>> float(energy_rank([3.0, 2.0, 1.0], p=0.9))
    2.0
    >>> k, lower_bound = energy_rank([3.0, 2.0], p=0.99, total_energy=14.0, return_bound=True)
    >>> float(k), bool(lower_bound)
    (3.0, True)
    """
    if not (0.0 < p <= 1.0):
        raise InvalidOptionError(f"The 'p' parameter of energy_rank must be a float in the range (0, 1]. "
                                 f"Got {p!r} instead.")
    s = _sigma(sigma)
    total = _total(s, total_energy)
    cumulative = np.cumsum(np.nan_to_num(s, nan=0.0) ** 2, axis=-1)
    target = p * total * (1.0 - 1e-12)  # round-off must not push k_p one past an exactly reached share
    reached = cumulative >= target[..., None]
    k = np.argmax(reached, axis=-1).astype(np.float64) + 1.0
    bound = ~np.any(reached, axis=-1)
    k = np.where(bound, _stored(s) + 1.0, k)
    k = np.where((total > 0) & np.isfinite(total), k, np.nan)
    bound = np.asarray(bound & np.isfinite(k))
    return (k, bound) if return_bound else k


def rank_residual(sigma: ArrayLike, r: int, *, total_energy: ArrayLike | None = None) -> np.ndarray:
    """Share of the energy that the best rank-r approximation cannot represent (Eckart-Young).

    .. math:: e_r = 1 - \\frac{\\sum_{i \\le r} s_i^2}{E}

    It is what a rank-r LoRA that found the best rank-r update would still miss. With top-k values and
    ``r > k`` the result is an upper bound (the unstored values can only lower it).

    Examples
    --------
    >>> round(float(rank_residual([3.0, 2.0, 1.0], 1)), 4)  # 1 - 9/14
    0.3571
    """
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0:
        raise InvalidOptionError(f"The 'r' parameter of rank_residual must be an int in the range [0, inf). "
                                 f"Got {r!r} instead.")
    s = _sigma(sigma)
    total = _total(s, total_energy)
    head = np.nansum(s[..., :r] ** 2, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        residual = np.clip(1.0 - head / total, 0.0, 1.0)
    return np.where((total > 0) & np.isfinite(total), residual, np.nan)


def effective_rank(sigma: ArrayLike, *, complete: ArrayLike | bool = True) -> np.ndarray:
    """Entropy effective rank (Roy & Vetterli, 2007).

    .. math:: p_i = s_i / \\textstyle\\sum_j s_j, \\qquad \\mathrm{erank} = \\exp\\big(-\\sum_i p_i \\log p_i\\big)

    It lies in [1, rank]. It needs the whole spectrum: pass ``complete=False`` (or a boolean array) where only
    the top k values are stored, and those entries become NaN.

    Examples
    --------
    >>> float(effective_rank([1.0, 1.0, 1.0, 1.0]))
    4.0
    >>> float(effective_rank([5.0, 0.0]))
    1.0
    """
    s = np.nan_to_num(_sigma(sigma), nan=0.0)
    total = np.sum(s, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        prob = s / total[..., None]
        terms = np.where(prob > 0, prob * np.log(prob), 0.0)
    erank = np.exp(-np.sum(terms, axis=-1))
    valid = (total > 0) & np.isfinite(total) & np.asarray(complete, dtype=bool)
    return np.where(valid, erank, np.nan)


def stable_rank(sigma: ArrayLike, *, total_energy: ArrayLike | None = None) -> np.ndarray:
    """Stable rank, exact even from top-k values when the exact energy is given.

    .. math:: \\mathrm{srank} = E / s_1^2

    Examples
    --------
    >>> float(stable_rank([2.0, 1.0]))
    1.25
    """
    s = _sigma(sigma)
    total = _total(s, total_energy)
    top = s[..., 0] if s.shape[-1] else np.full(s.shape[:-1], np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = total / top**2
    return np.where((top > 0) & np.isfinite(out), out, np.nan)


def gavish_donoho_omega(beta: ArrayLike) -> np.ndarray:
    """Gavish & Donoho (2014) optimal hard-threshold factor for unknown noise, by their cubic approximation.

    .. math:: \\omega(\\beta) \\approx 0.56\\beta^3 - 0.95\\beta^2 + 1.82\\beta + 1.43,
              \\qquad \\beta = \\min(m, n) / \\max(m, n)

    Examples
    --------
    >>> round(float(gavish_donoho_omega(1.0)), 2)
    2.86
    """
    b = np.asarray(beta, dtype=np.float64)
    if np.any((b <= 0) | (b > 1)):
        raise InvalidOptionError(f"The 'beta' parameter of gavish_donoho_omega must be in the range (0, 1]. "
                                 f"Got {beta!r} instead.")
    return 0.56 * b**3 - 0.95 * b**2 + 1.82 * b + 1.43


def signal_rank(sigma: ArrayLike, shape: tuple[int, int], *, noise_sigma: ArrayLike | None = None,
                complete: ArrayLike | bool = True) -> np.ndarray:
    """Number of singular values above the noise floor of an (m, n) matrix.

    Without ``noise_sigma`` (the usual case: the noise level of an update is unknown) the Gavish-Donoho
    optimal hard threshold is used, :math:`s_i > \\omega(\\beta)\\,\\mathrm{median}(s)`, which needs the whole
    spectrum (``complete``; NaN otherwise). With a known per-entry noise standard deviation ``noise_sigma`` the
    threshold is the Marchenko-Pastur bulk edge :math:`\\sigma(\\sqrt m + \\sqrt n)`, which top-k spectra
    support exactly when fewer than k values pass it.

    Why it matters: an update made by Adam carries a near-full-rank noise floor that can dominate its
    energy spectrum; the signal rank counts only the directions that stand out of that bulk.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> noise = rng.normal(size=(200, 100)) * 0.01
    >>> spike = 5 * np.outer(rng.normal(size=200), rng.normal(size=100)) / np.sqrt(200 * 100)
    >>> int(signal_rank(np.linalg.svd(noise + spike, compute_uv=False), (200, 100)))
    1
    """
    m, n = int(shape[0]), int(shape[1])
    if m < 1 or n < 1:
        raise InvalidOptionError(f"The 'shape' parameter of signal_rank must be two positive ints. "
                                 f"Got {shape!r} instead.")
    s = _sigma(sigma)
    filled = np.nan_to_num(s, nan=-np.inf)
    if noise_sigma is None:
        beta = min(m, n) / max(m, n)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN row (no spectrum) gives NaN, as wanted
            threshold = gavish_donoho_omega(beta) * np.nanmedian(np.where(np.isfinite(s), s, np.nan), axis=-1)
        valid = np.asarray(complete, dtype=bool) & np.isfinite(threshold)
    else:
        threshold = np.asarray(noise_sigma, dtype=np.float64) * (np.sqrt(m) + np.sqrt(n))
        passed = np.sum(filled > np.asarray(threshold)[..., None], axis=-1)
        # A top-k spectrum whose every stored value passes may hide more above the edge.
        valid = np.asarray(complete, dtype=bool) | (passed < _stored(s))
    count = np.sum(filled > np.asarray(threshold)[..., None], axis=-1).astype(np.float64)
    return np.where(valid, count, np.nan)
