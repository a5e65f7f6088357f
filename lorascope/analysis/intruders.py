"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence",
Definition 3.1; REFERENCES.md section 10).

A left singular vector :math:`y_j` among the top k of the fine-tuned weight :math:`W_t` is an intruder dimension
when it is nearly orthogonal to every left singular vector :math:`x_i` of the starting weight :math:`W_0`:
:math:`\\max_i |\\cos(y_j, x_i)| < \\epsilon`. The recorder stores that maximum (``intruder_cos``); this module
counts, and says how much of a count chance alone explains.

Notes
-----
A random unit vector of :math:`R^n` against m orthonormal vectors already has a small largest cosine: about
:math:`\\sqrt{2 \\ln m / n}` (0.36 for n = m = 64, 0.06 for n = m = 4096). At small widths the paper's
:math:`\\epsilon = 0.5` sits close to what a direction unrelated to :math:`W_0` scores, and every direction scores at
least :math:`1/\\sqrt{n}` against a complete basis: the scale between "an old direction" (1) and "a new one" is
short, and counts swing with :math:`\\epsilon`. :func:`random_max_cos` gives the baseline per matrix shape and
:func:`near_chance` flags the matrices where :math:`\\epsilon` is within reach of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from lorascope.errors import InvalidOptionError

__all__ = ["DEFAULT_EPS", "EPS_SWEEP", "NEAR_CHANCE", "IntruderComparison", "IntruderSummary", "RunIntruders",
           "final_counts", "intruder_counts", "near_chance", "random_max_cos"]

DEFAULT_EPS = 0.5  # the paper's code default (its figures sweep 0.1 .. 0.9)
EPS_SWEEP = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
NEAR_CHANCE = 2.0  # eps below this many times a random direction's median max |cos|: the count is near chance
_SAMPLES = 2000  # random directions drawn per shape (seeded: the baseline is the same on every call)
_EXACT_UP_TO = 8192  # above this dimension the Gaussian asymptotics replace the draw


def intruder_counts(cos: ArrayLike, eps: float = DEFAULT_EPS) -> np.ndarray:
    """The number of intruder dimensions: entries of ``cos`` (the last axis: the top-k directions) below ``eps``.

    NaN entries (directions not computed) are not counted.

    .. math:: n_\\epsilon = \\#\\{j \\le k : \\max_i |\\cos(y_j, x_i)| < \\epsilon\\}

    Examples
    --------
    >>> intruder_counts([[0.99, 0.3, np.nan], [0.2, 0.1, 0.7]], eps=0.5).tolist()
    [1, 2]
    """
    if not 0 < eps <= 1:
        raise InvalidOptionError(f"The 'eps' parameter of intruder_counts must be a float in the range (0, 1]. "
                                 f"Got {eps!r} instead.")
    c = np.asarray(cos, dtype=np.float64)
    return np.sum(c < eps, axis=-1)  # NaN compares False


@lru_cache(maxsize=256)
def _draw(n: int, m: int) -> np.ndarray:
    """Sorted max |cos| of ``_SAMPLES`` uniform unit vectors of R^n against m orthonormal vectors (by rotation
    invariance, the first m coordinate axes)."""
    rng = np.random.default_rng(20241028 + 7919 * n + m)
    out = []
    for _ in range(_SAMPLES // 200):  # 200 directions at a time: at most 13 MB at n = 8,192
        g = rng.standard_normal((200, n))
        out.append(np.abs(g[:, :m]).max(axis=1) / np.linalg.norm(g, axis=1))
    return np.sort(np.concatenate(out))


def _check_shape(n: int, m: int | None) -> int:
    if n < 1 or (m is not None and not 1 <= m <= n):
        raise InvalidOptionError(f"random_max_cos needs 1 <= m <= n. Got n={n}, m={m} instead.")
    return n if m is None else int(m)


def random_max_cos(n: int, m: int | None = None, q: float = 0.5) -> float:
    """The q-quantile of :math:`\\max_{i \\le m} |\\cos(y, x_i)|` for a uniform random unit vector y of
    :math:`R^n` and m orthonormal vectors :math:`x_i` (default m = n, a complete basis).

    Drawn (2,000 seeded directions) up to n = 8,192; above, the Gaussian approximation
    :math:`\\sqrt{2 \\ln m / n}` (whose error there is below 0.01).

    Examples
    --------
    >>> round(random_max_cos(64), 1)
    0.3
    """
    m = _check_shape(n, m)
    if not 0 < q < 1:
        raise InvalidOptionError(f"The 'q' parameter of random_max_cos must be in (0, 1). Got {q!r} instead.")
    if n > _EXACT_UP_TO:
        return float(np.sqrt(2 * np.log(max(m, 2)) / n))
    return float(np.quantile(_draw(n, m), q))


def near_chance(n: int, m: int | None = None, eps: float = DEFAULT_EPS) -> bool:
    """Whether ``eps`` is within reach of chance for an (n)-row matrix compared with m starting directions: below
    :data:`NEAR_CHANCE` (2) times the median largest cosine of a random direction (:func:`random_max_cos`).

    There a direction unrelated to :math:`W_0` and one that still shares a good part of an old direction score
    close to each other and to ``eps``, so counts swing with the threshold: read the sweep, not one count.

    Examples
    --------
    >>> near_chance(64), near_chance(4096)
    (True, False)
    """
    return bool(eps < NEAR_CHANCE * random_max_cos(n, m))


@dataclass
class IntruderSummary:
    """Intruder dimensions of one run, per module, kind and snapshot.

    Attributes
    ----------
    modules, kinds : list of str
    rows : ndarray (module,)
        Rows (output features) of each matrix: the dimension its left singular vectors live in.
    basis : ndarray (module,)
        How many left singular vectors of :math:`W_0` each top direction is compared with (min(out, in)).
    step, x : ndarray (snapshot,)
    cos : ndarray (snapshot, module, k)
        The recorded ``intruder_cos`` (NaN: not computed).
    eps : float
        The threshold of the counts; :data:`EPS_SWEEP` gives the sweep.
    """

    modules: list[str]
    kinds: list[str]
    rows: np.ndarray
    basis: np.ndarray
    step: np.ndarray
    x: np.ndarray
    cos: np.ndarray
    eps: float = DEFAULT_EPS

    @property
    def k(self) -> int:
        return int(self.cos.shape[-1])

    def counts(self, eps: float | None = None) -> np.ndarray:
        """(snapshot, module) intruder counts at ``eps`` (default: :attr:`eps`)."""
        return intruder_counts(self.cos, self.eps if eps is None else eps)

    def computed(self) -> np.ndarray:
        """(snapshot, module): whether the module's directions were computed at that snapshot."""
        return np.isfinite(self.cos).any(axis=-1)

    def baseline(self) -> np.ndarray:
        """(module,) the median largest cosine of a random direction against each matrix's :math:`W_0` basis."""
        return np.array([random_max_cos(int(n), int(m)) for n, m in zip(self.rows, self.basis)])

    def near(self) -> np.ndarray:
        """(module,) :func:`near_chance` at :attr:`eps`."""
        return np.array([near_chance(int(n), int(m), self.eps) for n, m in zip(self.rows, self.basis)])

    def group_counts(self, kind: str | None, eps: float | None = None) -> np.ndarray:
        """(snapshot,) the total count over the modules of ``kind`` (None: all) that were computed."""
        pick = np.array([kind is None or k == kind for k in self.kinds], dtype=bool)
        return self.counts(eps)[:, pick].sum(axis=1)

    def to_dict(self) -> dict[str, object]:
        kinds = sorted(set(self.kinds))
        computed = self.computed()
        all_counts = self.counts()
        near, base, final = self.near(), self.baseline(), all_counts[-1]

        def group(kind: str | None) -> dict[str, object]:
            pick = np.array([kind is None or k == kind for k in self.kinds], dtype=bool)
            return {"modules": int(pick.sum()), "near_chance_modules": int((near & pick).sum()),
                    "counts": [int(v) for v in self.group_counts(kind)],
                    "modules_computed": [int(v) for v in computed[:, pick].sum(axis=1)],
                    "final_sweep": {f"{e:g}": int(self.group_counts(kind, e)[-1]) for e in EPS_SWEEP}}

        return {
            "k": self.k, "eps": self.eps, "sweep": list(EPS_SWEEP), "near_chance_factor": NEAR_CHANCE,
            "step": [int(s) for s in self.step], "x": [float(v) for v in self.x],
            "all": group(None), "by_kind": {k: group(k) for k in kinds},
            "near_chance_modules": [m for m, flag in zip(self.modules, near) if flag],
            "baselines": [{"rows": int(n), "basis": int(b), "random_max_cos": round(random_max_cos(int(n), int(b)), 4),
                           "near_chance": near_chance(int(n), int(b), self.eps),
                           "modules": int(np.sum((self.rows == n) & (self.basis == b)))}
                          for n, b in sorted({(int(n), int(b)) for n, b in zip(self.rows, self.basis)})],
            "modules": [{"module": m, "kind": kind, "rows": int(n), "basis": int(b),
                         "counts": [int(v) for v in all_counts[:, i]], "final_count": int(c),
                         "random_max_cos": round(float(r), 4), "near_chance": bool(flag),
                         "final_cos": [None if not np.isfinite(v) else round(float(v), 4) for v in self.cos[-1, i]]}
                        for i, (m, kind, n, b, c, r, flag) in enumerate(zip(self.modules, self.kinds, self.rows,
                                                                            self.basis, final, base, near))],
        }


@dataclass(frozen=True)
class RunIntruders:
    """One run of a comparison: its intruder dimensions at the final snapshot beside its rank and dataset size, and
    (for a LoRA run) the overlap of its final update subspace with full fine-tuning's, per kind.

    ``counts`` per kind and "all" at ``eps`` (None: the run recorded no intruder cosines); ``overlap`` per kind and
    "all", an :class:`~lorascope.analysis.subspace.Overlap` each (None: no factors, or the full run itself).
    """

    label: str
    path: str
    rank: int | None
    dataset_examples: int | None
    counts: dict[str, int] | None
    modules: dict[str, int] | None
    near_chance_modules: int
    overlap: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "path": self.path, "rank": self.rank, "dataset_examples": self.dataset_examples,
                "intruders": self.counts, "modules": self.modules, "near_chance_modules": self.near_chance_modules,
                "overlap_with_full": None if self.overlap is None else {k: v.to_dict()
                                                                        for k, v in self.overlap.items()}}


@dataclass(frozen=True)
class IntruderComparison:
    """compare's subspace section: the full fine-tuning run and each LoRA run (:class:`RunIntruders`), the
    threshold and rank used, and one line naming the options when nothing was recorded."""

    eps: float
    rank: int
    runs: list[RunIntruders]
    missing: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"eps": self.eps, "rank": self.rank, "missing": self.missing, "runs": [r.to_dict() for r in self.runs]}


def final_counts(summary: IntruderSummary) -> tuple[dict[str, int], dict[str, int], int]:
    """Per kind and "all": the final snapshot's intruder count, the modules, and how many modules are near chance."""
    kinds = sorted(set(summary.kinds))
    counts = {k: int(summary.group_counts(k)[-1]) for k in kinds} | {"all": int(summary.group_counts(None)[-1])}
    modules = {k: summary.kinds.count(k) for k in kinds} | {"all": len(summary.kinds)}
    return counts, modules, int(summary.near().sum())
