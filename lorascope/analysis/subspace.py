"""Which directions an update uses, and when they settle (REFERENCES.md section 10).

Singular values say how many directions an update :math:`\\Delta_t = W_t - W_0` uses; its singular vectors say
which. This module compares the top-r left (and right) singular subspaces of the update at each snapshot with
those of the final update and of the previous snapshot, through principal angles and the subspace similarity of
Hu et al. (LoRA, eq. 4), and says from which snapshot on a module's subspace has settled. Pure numpy: the factors
come in as arrays (``Run.factors``), NaN columns past those stored.

Notes
-----
Singular vectors are defined up to sign, and within a group of equal singular values up to rotation: only
subspaces are compared, never single vectors. The top-r subspace is well defined only when
:math:`\\sigma_r > \\sigma_{r+1}`; directions past the update's numerical rank (a rank-4 LoRA's update has four)
are arbitrary, so each comparison uses at most as many directions as both updates hold
(:func:`numerical_rank`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from lorascope.errors import InvalidOptionError

__all__ = ["DEFAULT_SETTLE_PHI", "SIDES", "GroupSettling", "ModuleSubspace", "Overlap", "SubspaceDynamics",
           "module_subspace", "overlap_of",
           "numerical_rank", "orthonormal", "principal_angles", "settle_index", "subspace_dynamics",
           "subspace_similarity"]

DEFAULT_SETTLE_PHI = 0.9  # phi to the final subspace from which a module counts as settled (both sides)
SIDES = ("left", "right")  # U (output space) and V (input space) of the update
RANK_TOLERANCE = 1e-4  # singular values below this share of the largest are numerical zeros (float32 factors)


def orthonormal(a: ArrayLike, r: int | None = None) -> np.ndarray:
    """An orthonormal basis of the span of the first ``r`` finite columns of ``a``.

    Columns holding NaN (those past what a run stored) are dropped first; the basis comes from a QR
    decomposition, so stored singular vectors that drifted from orthonormality in float32 are fixed.

    Examples
    --------
    >>> np.abs(orthonormal([[2.0, np.nan], [0.0, np.nan]])).round(6).tolist()
    [[1.0], [0.0]]
    """
    m = np.asarray(a, dtype=np.float64)
    if m.ndim != 2:
        raise InvalidOptionError(f"A subspace must be a 2-d array (n, r). Got shape {m.shape} instead.")
    m = m[:, np.isfinite(m).all(axis=0)]
    if r is not None:
        m = m[:, :r]
    if m.shape[1] == 0:
        return m
    q, _ = np.linalg.qr(m)
    return q


def principal_angles(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Principal angles (radians, ascending) between the spans of the columns of ``a`` and ``b``.

    .. math:: \\cos\\theta_i = s_i(Q_a^\\top Q_b), \\quad i = 1 \\ldots \\min(r_a, r_b)

    with :math:`Q_a, Q_b` orthonormal bases (:func:`orthonormal`; NaN columns dropped).

    Examples
    --------
    >>> np.degrees(principal_angles([[1.0], [0.0]], [[1.0], [1.0]])).round(6).tolist()
    [45.0]
    """
    qa, qb = orthonormal(a), orthonormal(b)
    if qa.shape[0] != qb.shape[0]:
        raise InvalidOptionError(f"Subspaces must live in the same space. Got {qa.shape[0]} and {qb.shape[0]} rows.")
    if not qa.shape[1] or not qb.shape[1]:
        return np.zeros(0)
    cos = np.linalg.svd(qa.T @ qb, compute_uv=False)
    return np.arccos(np.clip(cos, 0.0, 1.0))[: min(qa.shape[1], qb.shape[1])]


def subspace_similarity(a: ArrayLike, b: ArrayLike) -> float:
    """Subspace similarity phi in [0, 1] (Hu et al. 2021, eq. 4): 1 when one span holds the other, 0 when they are
    orthogonal; a random r-dimensional subspace of :math:`R^n` scores about r / n.

    .. math:: \\phi = \\frac{\\|Q_a^\\top Q_b\\|_F^2}{\\min(r_a, r_b)}
              = \\frac{1}{\\min(r_a, r_b)}\\sum_i \\cos^2\\theta_i

    NaN when either span is empty.

    Examples
    --------
    >>> round(subspace_similarity([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], [[1.0], [1.0], [0.0]]), 6)
    1.0
    """
    angles = principal_angles(a, b)
    return float(np.mean(np.cos(angles) ** 2)) if angles.size else float("nan")


def numerical_rank(sigma: ArrayLike, tolerance: float = RANK_TOLERANCE) -> int:
    """How many singular values are above ``tolerance`` times the largest (NaN-padded values ignored; 0 for a zero
    or non-finite update).

    >>> numerical_rank([3.0, 1.0, 1e-9, np.nan])
    2
    """
    s = np.asarray(sigma, dtype=np.float64)
    s = s[np.isfinite(s)]
    if not s.size or not s.max() > 0:
        return 0
    return int(np.sum(s > tolerance * s.max()))


def settle_index(phi: ArrayLike, threshold: float = DEFAULT_SETTLE_PHI) -> int | None:
    """The first position from which every later value of ``phi`` is at least ``threshold`` (None when the last
    one is not, or it is NaN).

    >>> settle_index([0.2, 0.95, 0.5, 0.92, 1.0])
    3
    """
    values = np.asarray(phi, dtype=np.float64)
    ok = values >= threshold  # NaN compares False
    if not ok.size or not ok[-1]:
        return None
    bad = np.flatnonzero(~ok)
    return int(bad[-1] + 1) if bad.size else 0


Factors = tuple[np.ndarray, np.ndarray] | None


@dataclass(frozen=True)
class ModuleSubspace:
    """The subspace dynamics of one module's update at one rank.

    Attributes
    ----------
    rank : int
        The rank asked for; each comparison uses at most the numerical rank of both updates.
    phi_final, phi_previous : ndarray (snapshot, 2)
        :func:`subspace_similarity` of the top-r (left, right) subspaces to the final snapshot's, and to the
        previous snapshot's (NaN at the first snapshot, or where either update has no vectors).
    angles_final : ndarray (snapshot, 2, rank)
        Principal angles to the final subspaces, degrees ascending, NaN-padded.
    used_rank : ndarray (snapshot,)
        Directions compared with the final subspaces at each snapshot.
    settle : int or None
        :func:`settle_index` of min(phi_final left, right).
    grad_phi_update, grad_phi_final : ndarray (snapshot, 2) or None
        phi between the gradient's top-r subspaces at the snapshot step and the update's at that snapshot, and
        the final update's; None without gradient factors.
    """

    rank: int
    phi_final: np.ndarray
    phi_previous: np.ndarray
    angles_final: np.ndarray
    used_rank: np.ndarray
    settle: int | None
    grad_phi_update: np.ndarray | None = None
    grad_phi_final: np.ndarray | None = None


def module_subspace(factors: Sequence[Factors], ranks: Sequence[int], rank: int, *,
                    grad_factors: Sequence[Factors] | None = None,
                    threshold: float = DEFAULT_SETTLE_PHI) -> ModuleSubspace:
    """Principal angles and phi of one module's top-``rank`` update subspaces over its snapshots.

    Parameters
    ----------
    factors
        Per snapshot, the update's top singular vectors ``(U (out, k), V (in, k))`` (NaN columns past those
        stored), or None where the snapshot holds none.
    ranks
        Per snapshot, the update's numerical rank (:func:`numerical_rank` of its singular values): vectors past
        it span noise and are left out.
    rank
        r, the number of leading directions compared.
    grad_factors
        Per snapshot, the gradient's top singular vectors at that step (or None).
    threshold
        phi to the final subspace (both sides) from which the module counts as settled.
    """
    if rank < 1:
        raise InvalidOptionError(f"The 'rank' parameter of module_subspace must be an int >= 1. Got {rank} instead.")
    n = len(factors)
    if len(ranks) != n:
        raise InvalidOptionError(f"module_subspace needs one numerical rank per snapshot ({n}). Got {len(ranks)}.")
    phi_final = np.full((n, 2), np.nan)
    phi_previous = np.full((n, 2), np.nan)
    angles = np.full((n, 2, rank), np.nan)
    used = np.zeros(n, dtype=np.int64)
    final = factors[-1] if n else None
    r_final = min(rank, int(ranks[-1])) if n else 0
    for t, pair in enumerate(factors):
        if pair is None:
            continue
        r_t = min(rank, int(ranks[t]))
        if final is not None and r_final and r_t:
            used[t] = min(r_t, r_final)
            for side in range(2):
                theta = np.degrees(principal_angles(orthonormal(pair[side], r_t), orthonormal(final[side], r_final)))
                angles[t, side, : theta.size] = theta
                phi_final[t, side] = float(np.mean(np.cos(np.radians(theta)) ** 2)) if theta.size else np.nan
        before = factors[t - 1] if t else None
        r_before = min(rank, int(ranks[t - 1])) if t else 0
        if before is not None and r_before and r_t:
            for side in range(2):
                phi_previous[t, side] = subspace_similarity(orthonormal(before[side], r_before),
                                                            orthonormal(pair[side], r_t))
    grad_update = grad_final = None
    if grad_factors is not None and any(g is not None for g in grad_factors):
        grad_update, grad_final = np.full((n, 2), np.nan), np.full((n, 2), np.nan)
        for t, grad in enumerate(grad_factors):
            if grad is None:
                continue
            now = factors[t]
            for side in range(2):
                g = orthonormal(grad[side], rank)
                if now is not None and ranks[t]:
                    grad_update[t, side] = subspace_similarity(g, orthonormal(now[side], min(rank, ranks[t])))
                if final is not None and r_final:
                    grad_final[t, side] = subspace_similarity(g, orthonormal(final[side], r_final))
    return ModuleSubspace(rank=rank, phi_final=phi_final, phi_previous=phi_previous, angles_final=angles,
                          used_rank=used, settle=settle_index(np.min(phi_final, axis=1), threshold),
                          grad_phi_update=grad_update, grad_phi_final=grad_final)


def _median(values: Sequence[float] | np.ndarray) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else float("nan")


def _num(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _nums(values: np.ndarray, digits: int = 4) -> list[float | None]:
    return [None if not np.isfinite(v) else round(float(v), digits) for v in np.asarray(values, dtype=np.float64)]


@dataclass(frozen=True)
class GroupSettling:
    """Settling of a group of modules (a kind, or "all") at the criterion rank.

    Attributes
    ----------
    modules : int
        Modules with singular vectors at the final snapshot.
    settled_early : int
        Of those, the ones that settled before the final snapshot.
    settle_step, settle_x : float
        Median over the modules of the step / data-axis value at which each settled (a module that settles only
        at the final snapshot counts there).
    phi_final, phi_previous : ndarray (snapshot,)
        Per snapshot, the median over modules of min(phi left, phi right) to the final / previous snapshot.
    grad_phi_final : ndarray (snapshot,) or None
        Median over modules of min(phi left, right) between the gradient's top-r subspaces and the final update's.
    """

    modules: int
    settled_early: int
    settle_step: float
    settle_x: float
    phi_final: np.ndarray
    phi_previous: np.ndarray
    grad_phi_final: np.ndarray | None

    def to_dict(self) -> dict[str, object]:
        return {"modules": self.modules, "settled_before_final": self.settled_early,
                "settle_step": _num(self.settle_step), "settle_x": _num(self.settle_x),
                "phi_to_final": _nums(self.phi_final), "phi_to_previous": _nums(self.phi_previous),
                "grad_phi_to_final": None if self.grad_phi_final is None else _nums(self.grad_phi_final)}


@dataclass
class SubspaceDynamics:
    """The subspace dynamics of one run: per module its :class:`ModuleSubspace` at each analysed rank, and the
    settling per kind and over all modules at the criterion rank (the largest analysed).

    ``step`` and ``x`` (the data axis, e.g. examples seen) have one entry per snapshot.
    """

    modules: list[str]
    kinds: list[str]
    step: np.ndarray
    x: np.ndarray
    ranks: tuple[int, ...]
    tracks: dict[int, list[ModuleSubspace]]
    threshold: float = DEFAULT_SETTLE_PHI

    @property
    def rank(self) -> int:
        """The criterion rank: the largest analysed."""
        return max(self.ranks)

    def group(self, kind: str | None, rank: int | None = None) -> GroupSettling:
        """Settling of the modules of ``kind`` (None: all modules) at ``rank`` (default: the criterion rank)."""
        tracks = [t for t, k in zip(self.tracks[rank or self.rank], self.kinds) if kind is None or k == kind]
        live = [t for t in tracks if t.settle is not None]
        last = len(self.step) - 1
        stacked = np.array([np.min(t.phi_final, axis=1) for t in live]) if live else np.full((0, len(self.step)),
                                                                                             np.nan)
        previous = np.array([np.min(t.phi_previous, axis=1) for t in live]) if live else stacked
        grads = [np.min(t.grad_phi_final, axis=1) for t in live if t.grad_phi_final is not None]
        return GroupSettling(
            modules=len(live), settled_early=sum(1 for t in live if t.settle is not None and t.settle < last),
            settle_step=_median([self.step[t.settle] for t in live if t.settle is not None]),
            settle_x=_median([self.x[t.settle] for t in live if t.settle is not None]),
            phi_final=_column_medians(stacked), phi_previous=_column_medians(previous),
            grad_phi_final=_column_medians(np.array(grads)) if grads else None)

    def to_dict(self) -> dict[str, object]:
        kinds = sorted(set(self.kinds))
        rows = []
        for i, (name, kind) in enumerate(zip(self.modules, self.kinds)):
            track = self.tracks[self.rank][i]
            rows.append({
                "module": name, "kind": kind,
                "settle_step": None if track.settle is None else int(self.step[track.settle]),
                "settle_x": None if track.settle is None else _num(float(self.x[track.settle])),
                "compared_rank": [int(v) for v in track.used_rank],
                "phi_to_final": {side: _nums(track.phi_final[:, j]) for j, side in enumerate(SIDES)},
                "phi_to_previous": {side: _nums(track.phi_previous[:, j]) for j, side in enumerate(SIDES)},
                "angles_to_final_deg": {side: [_nums(track.angles_final[t, j], 2) for t in range(len(self.step))]
                                        for j, side in enumerate(SIDES)},
                "grad_phi_to_update": None if track.grad_phi_update is None else
                {side: _nums(track.grad_phi_update[:, j]) for j, side in enumerate(SIDES)},
                "grad_phi_to_final": None if track.grad_phi_final is None else
                {side: _nums(track.grad_phi_final[:, j]) for j, side in enumerate(SIDES)},
            })
        return {
            "rank": self.rank, "ranks": list(self.ranks), "threshold": self.threshold,
            "step": [int(s) for s in self.step], "x": _nums(self.x, 6),
            "by_rank": {str(r): {"all": self.group(None, r).to_dict(),
                                 "by_kind": {k: self.group(k, r).to_dict() for k in kinds}} for r in self.ranks},
            "all": self.group(None).to_dict(),
            "by_kind": {k: self.group(k).to_dict() for k in kinds},
            "modules": rows,
        }


def _column_medians(stacked: np.ndarray) -> np.ndarray:
    """Per column (snapshot), the median of the finite values (NaN where none)."""
    if not stacked.size:
        return np.full(stacked.shape[1] if stacked.ndim == 2 else 0, np.nan)
    return np.array([_median(stacked[:, j]) for j in range(stacked.shape[1])])


def subspace_dynamics(modules: Sequence[str], kinds: Sequence[str], step: ArrayLike, x: ArrayLike,
                      factors: Sequence[Sequence[Factors]], numerical_ranks: ArrayLike, ranks: Sequence[int], *,
                      grad_factors: Sequence[Sequence[Factors]] | None = None,
                      threshold: float = DEFAULT_SETTLE_PHI) -> SubspaceDynamics:
    """:func:`module_subspace` of every module at every rank of ``ranks``.

    Parameters
    ----------
    modules, kinds
        Per module, its name and kind.
    step, x
        Per snapshot, the optimizer step and the data axis (examples or tokens seen).
    factors
        ``factors[m][t]``: module m's update factors at snapshot t (or None).
    numerical_ranks
        (module, snapshot): :func:`numerical_rank` of each update's singular values.
    ranks
        The ranks to analyse; the largest is the settling criterion's.
    grad_factors
        ``grad_factors[m][t]``: the gradient's factors, or None without any.
    threshold
        phi from which a module counts as settled.
    """
    if not ranks or min(ranks) < 1:
        raise InvalidOptionError(f"The 'ranks' parameter of subspace_dynamics must be a non-empty list of ints >= 1. "
                                 f"Got {list(ranks)!r} instead.")
    if not 0 < threshold <= 1:
        raise InvalidOptionError(f"The 'threshold' parameter of subspace_dynamics must be in (0, 1]. "
                                 f"Got {threshold!r} instead.")
    nr = np.asarray(numerical_ranks)
    tracks = {int(r): [module_subspace(factors[m], list(nr[m]), int(r), threshold=threshold,
                                       grad_factors=None if grad_factors is None else grad_factors[m])
                       for m in range(len(modules))] for r in ranks}
    return SubspaceDynamics(modules=list(modules), kinds=list(kinds), step=np.asarray(step),
                            x=np.asarray(x, dtype=np.float64), ranks=tuple(sorted(int(r) for r in ranks)),
                            tracks=tracks, threshold=threshold)


@dataclass(frozen=True)
class Overlap:
    """How much of full fine-tuning's top-r update subspace a LoRA run's holds, per kind, at the final snapshots.

    ``phi[side]`` and ``angles_deg[side]`` (the median over modules of each principal angle) per side ("left",
    "right"); ``modules`` matched by name.
    """

    rank: int
    modules: int
    phi: dict[str, float | None]
    angles_deg: dict[str, list[float | None]]

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "modules": self.modules, "phi": self.phi, "angles_deg": self.angles_deg}


def overlap_of(rank: int, rows: list[tuple[np.ndarray, np.ndarray]]) -> Overlap:
    """An :class:`Overlap` from the principal angles (degrees; left, right) of each module of a group."""
    phi: dict[str, float | None] = {}
    angles: dict[str, list[float | None]] = {}
    for s, side in enumerate(("left", "right")):
        values = [float(np.mean(np.cos(np.radians(row[s])) ** 2)) for row in rows]
        phi[side] = round(float(np.median(values)), 4)
        width = max(row[s].size for row in rows)
        padded = np.full((len(rows), width), np.nan)
        for m, row in enumerate(rows):
            padded[m, : row[s].size] = row[s]
        angles[side] = [None if not np.isfinite(np.nanmedian(col)) else round(float(np.nanmedian(col)), 2)
                        for col in padded.T]
    return Overlap(rank=rank, modules=len(rows), phi=phi, angles_deg=angles)
