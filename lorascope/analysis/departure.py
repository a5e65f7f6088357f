"""A capacity forecast in the units ``lorascope compare`` measures in: the examples seen at which full fine-tuning
has absorbed a LoRA's capacity, so the LoRA should leave its per-step loss curve there.

The forecast says "a rank-r LoRA holds :math:`C_r = \\kappa P(r)` bits". Within one run on N examples, full
fine-tuning absorbs the data's bits gradually, over epochs; a LoRA keeps up until full fine-tuning has absorbed
about :math:`C_r`. The bits absorbed by examples seen :math:`x` are the distinct examples seen times the code
length saved per example against first sight,

.. math:: I(x) = \\min(x, N)\\, T\\, \\max\\bigl(0,\\ \\ell_{\\mathrm{first}} - \\tilde\\ell(x)\\bigr) / \\ln 2

with :math:`T` the loss tokens per example, :math:`\\ell_{\\mathrm{first}}` the mean loss over the second half of
the first epoch (examples coded at first sight, once what they all share is learned: the marginal estimator of
:mod:`lorascope.analysis.information`) and :math:`\\tilde\\ell` the loss smoothed by a moving median, made
non-decreasing. The expected departure is the first :math:`x` with :math:`I(x) \\ge C_r`; never, within the run,
when full fine-tuning absorbs less than :math:`C_r`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from lorascope.analysis.falloff import moving_median
from lorascope.errors import InvalidOptionError

__all__ = ["absorbed_bits_curve", "expected_departures"]

SMOOTH_DECADES, SMOOTH_POINTS = 0.05, 9  # compare's default moving median


def absorbed_bits_curve(examples_seen: Any, loss: Any, *, loss_tokens_per_example: float,
                        dataset_examples: float) -> np.ndarray:
    """:math:`I(x)` at each step of a full fine-tuning run (sorted by examples seen; NaN loss steps ignored).

    Examples
    --------
    >>> x = np.arange(1, 41) * 10.0                      # 40 steps of 10 examples, 4 epochs of 100
    >>> loss = np.where(x <= 100, 2.0, 1.0)              # first sight 2 nats/token, then 1
    >>> bits = absorbed_bits_curve(x, loss, loss_tokens_per_example=1.0, dataset_examples=100)
    >>> float(bits[0]), round(float(bits[-1]), 1)        # 100 examples x 1 nat / ln 2
    (0.0, 144.3)
    """
    x = np.asarray(examples_seen, dtype=np.float64)
    ell = np.asarray(loss, dtype=np.float64)
    if not (loss_tokens_per_example > 0 and dataset_examples > 0):
        raise InvalidOptionError("absorbed_bits_curve needs positive loss tokens per example and dataset size. "
                                 f"Got {loss_tokens_per_example!r} and {dataset_examples!r} instead.")
    ok = np.isfinite(ell) & (x > 0)
    out = np.full(x.shape, np.nan)
    if ok.sum() < 2:
        return out
    log_x = np.log10(x[ok])
    smooth, _ = moving_median(log_x, ell[ok], log_x, SMOOTH_DECADES, SMOOTH_POINTS)
    late_first = ok & (x > dataset_examples / 2) & (x <= dataset_examples)
    first = float(np.mean(ell[late_first])) if late_first.any() else float(ell[ok][0])
    bits = np.minimum(x[ok], dataset_examples) * loss_tokens_per_example * np.clip(first - smooth, 0.0, None)
    out[ok] = np.maximum.accumulate(bits / math.log(2))
    return out


def expected_departures(capacity_bits: Mapping[int, float], examples_seen: Any, absorbed: Any
                        ) -> dict[int, float]:
    """Per rank, the examples seen at which ``absorbed`` first reaches the rank's capacity (``inf``: never within
    the run).

    Examples
    --------
    >>> expected_departures({1: 50.0, 4: 1000.0}, [10, 20, 40], [20.0, 60.0, 90.0])
    {1: 20.0, 4: inf}
    """
    x = np.asarray(examples_seen, dtype=np.float64)
    bits = np.asarray(absorbed, dtype=np.float64)
    out = {}
    for rank, capacity in capacity_bits.items():
        hit = np.flatnonzero(np.nan_to_num(bits, nan=-np.inf) >= capacity)
        out[int(rank)] = float(x[hit[0]]) if hit.size else math.inf
    return out
