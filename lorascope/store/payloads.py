"""What is appended to a run file, as typed values: the producer (the recorder, a test, a fixture script) builds
them, :class:`~lorascope.store.writer.RunWriter` checks and stores them. No torch here: every array is on the host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Snapshot:
    """One row of the ``snapshots`` table, with its per-module payloads (the columns of
    :data:`lorascope.store.schema.SNAPSHOT_COLUMNS`, M the number of recorded matrices).

    Attributes
    ----------
    step
        Optimizer step at which the snapshot was taken.
    energy
        (M,) squared Frobenius norm of each update.
    sv
        M entries: the descending singular values of each update, ``None`` when not computed.
    examples_seen, tokens_seen
        Training examples / tokens consumed up to this snapshot (-1: unknown).
    delta_nonfinite
        (M,) NaN / Inf entries of each update (``None``: all zero).
    grad_sv
        M entries: the gradient's singular values, for a file opened with ``grad_sv=True`` (``None``: none known).
    factors
        ``{module index: (U, V)}`` with U (out, k'), V (in, k'), k' <= the file's ``factors_k``.
    deltas
        ``{module index: update}``, each (out, in), for a file opened with a ``delta_dtype``.
    grad_factors
        ``{module index: (U, V)}``: the gradient's top singular vectors at the snapshot step, for a file opened with
        ``grad_sv=True`` and ``factors_k > 0``.
    intruder_cos, weight_sv
        M entries, for a file opened with ``intruder_k > 0``: for the top k' <= intruder_k left singular vectors y_j
        of the weight W_t, max_i |cos(y_j, x_i)| over the left singular vectors x_i of W_0, and the singular values
        of W_t (``None``: not computed).
    held_loss, held_loss_start
        The held batch's loss now and with every recorded matrix at W_0 (NaN: not measured).
    held_loss_without_kind, held_loss_without_layer
        (M,) the held batch's loss with the matrix's kind (layer) reverted to W_0 (``None``: not measured).
    """

    step: int
    energy: Sequence[float] | np.ndarray
    sv: Sequence[np.ndarray | None]
    examples_seen: int = -1
    tokens_seen: int = -1
    delta_nonfinite: Sequence[int] | np.ndarray | None = None
    grad_sv: Sequence[np.ndarray | None] | None = None
    factors: Mapping[int, tuple[np.ndarray, np.ndarray]] | None = None
    deltas: Mapping[int, np.ndarray] | None = None
    grad_factors: Mapping[int, tuple[np.ndarray, np.ndarray]] | None = None
    intruder_cos: Sequence[np.ndarray | None] | None = None
    weight_sv: Sequence[np.ndarray | None] | None = None
    held_loss: float = float("nan")
    held_loss_start: float = float("nan")
    held_loss_without_kind: Sequence[float] | np.ndarray | None = None
    held_loss_without_layer: Sequence[float] | np.ndarray | None = None
