"""Singular vectors at snapshots: the update's top-k (``factors_k``) from host copies, and the intruder dimensions of
``intruder_k`` (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence", Def. 3.1).

Intruder dimensions compare the **weight** W_t = W_0 + Delta with the starting weight W_0: for each of the top k
left singular vectors y_j of W_t, the largest |cos(y_j, x_i)| over every left singular vector x_i of W_0. Once,
when recording starts, :func:`initial_basis` keeps X (out, min(out, in)) in float32 on the host, from a float32 SVD
of W_0 on its device (for a PEFT LoRA layer W_0 is the frozen base weight plus the merged update at the start).
At each snapshot the top-k left singular vectors of W_t come from the float64 Gram matrix of its smaller side
(``scipy.linalg.eigh`` with only the top k eigenpairs), or, for a matrix of more than ``top_k_min_size`` entries,
from Lanczos iterations on a float64 copy (ARPACK through ``scipy.sparse.linalg.svds``, to machine precision): a
randomized range finder is not accurate enough on a pretrained weight's slowly decaying spectrum (|cos| errors of
1e-3 on a 40 x 40 planted case). Both threads compute them the same way, on the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
from torch import nn

from lorascope.model.peft import base_layer_of
from lorascope.model.taxonomy import MatrixRef

# Float64 entries of a block of rows while accumulating a Gram matrix or multiplying by the vectors.
_BLOCK = 1 << 22
# A singular value below this share of the largest has no direction the float64 Gram route can resolve
# (its square is within rounding of 0): its vectors are not stored.
_RESOLVED = 1e-6


@dataclass
class InitialBasis:
    """What the intruder dimensions of one matrix need from the start of recording.

    ``x``: every left singular vector of W_0, (out, min(out, in)) float32. ``weight``: W_0 itself, (out, in)
    float32, kept only when the snapshot worker needs it and the recorder holds no host copy of its own (a LoRA
    layer, whose recorded W_0 is its update; ``w0_device="device"``)."""

    x: np.ndarray
    weight: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return int(self.x.nbytes + (0 if self.weight is None else self.weight.nbytes))


def base_weight(model: nn.Module, ref: MatrixRef) -> torch.Tensor:
    """A LoRA layer's frozen base weight as the recorded (out, in) matrix, float32 on its device."""
    module = base_layer_of(model.get_submodule(ref.module))
    return ref.matrix(getattr(module, ref.parameter).detach()).float()


def _dense(update: object) -> torch.Tensor:
    dense = getattr(update, "dense", None)
    return dense() if callable(dense) else update  # type: ignore[return-value]


def weight_now(model: nn.Module, ref: MatrixRef, now: object) -> torch.Tensor:
    """W_t as float32 (out, in) on the training device, given :func:`~lorascope.record.snapshot.current_update`'s
    ``now``: the matrix itself, or for a LoRA layer the base weight plus the merged update."""
    if not ref.lora:
        return now  # type: ignore[return-value]
    return base_weight(model, ref) + _dense(now).to(torch.float32)


def initial_basis(model: nn.Module, ref: MatrixRef, w0: object, *, keep_weight: bool) -> InitialBasis:
    """The left singular vectors of W_0 (and W_0 itself with ``keep_weight``), on the host.

    ``w0`` is what the recorder keeps as the start (:func:`~lorascope.record.snapshot.capture_initial`): W_0 of a
    weight, the merged update at the start of a LoRA layer (None when zero)."""
    with torch.no_grad():
        if ref.lora:
            start = base_weight(model, ref)
            if w0 is not None:
                start = start + _dense(w0).to(start.device, torch.float32)
        else:
            assert isinstance(w0, torch.Tensor)
            start = w0.float()
        x = torch.linalg.svd(start, full_matrices=False)[0]
        weight = start.to("cpu", copy=True).numpy() if keep_weight else None
    return InitialBasis(x=x.cpu().numpy().astype(np.float32, copy=False), weight=weight)


def max_cosines(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(k,) the largest |cos(y_j, x_i)| over the unit columns x_i of ``x``, for each unit column y_j of ``y``
    (float32 products; at most 1)."""
    if y.shape[1] == 0 or x.shape[1] == 0:
        return np.full(y.shape[1], np.nan, dtype=np.float32)
    products = x.T @ np.asarray(y, dtype=np.float32)
    return np.minimum(np.abs(products).max(axis=0), np.float32(1.0))


def intruders(x: np.ndarray, u: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(intruder_cos, weight_sv) of one matrix: its top left singular vectors ``u`` with singular values ``s``,
    compared with the starting weight's ``x``; NaN when the weight holds NaN or Inf."""
    if not (np.isfinite(u).all() and np.isfinite(s).all()):
        return np.full(len(s), np.nan, dtype=np.float32), np.asarray(s, dtype=np.float32)
    return max_cosines(x, u), np.asarray(s, dtype=np.float32)


# -- the kernels (numpy: the snapshot worker runs no torch op) ------------------------------------------------------

def gram(tall: np.ndarray) -> np.ndarray:
    """``tall^T tall`` in float64, accumulated over blocks of rows (one block of float64 at a time)."""
    m, n = tall.shape
    rows = max(1024, _BLOCK // max(n, 1))
    total = np.zeros((n, n))
    for start in range(0, m, rows):
        block = np.ascontiguousarray(tall[start:start + rows], dtype=np.float64)
        with np.errstate(invalid="ignore", over="ignore"):  # a non-finite update is counted by the caller
            total += block.T @ block
    return total


def _times(tall: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``tall @ w`` with ``tall`` float32 read in float64 blocks of rows."""
    out = np.empty((tall.shape[0], w.shape[1]))
    rows = max(1, _BLOCK // max(tall.shape[1], 1))
    for start in range(0, tall.shape[0], rows):
        out[start:start + rows] = np.asarray(tall[start:start + rows], dtype=np.float64) @ w
    return out


def vectors_from_gram(matrix: np.ndarray, eigenvalues: np.ndarray, eigenvectors: np.ndarray, k: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top ``k`` singular triplets (U (out, k'), s (k',), V (in, k')) of ``matrix`` from the eigenpairs of the
    Gram matrix of its smaller side (ascending, as LAPACK returns them). Triplets whose singular value is not
    resolved (below 1e-6 of the largest) are left out, so k' <= k."""
    order = np.argsort(eigenvalues)[::-1][:k]
    s = np.sqrt(np.clip(eigenvalues[order], 0.0, None))
    keep = _resolved(s)
    s, w = s[keep], eigenvectors[:, order[keep]]
    tall_is_matrix = matrix.shape[0] >= matrix.shape[1]
    tall = matrix if tall_is_matrix else matrix.T
    other = _times(tall, w) / s if len(s) else np.zeros((tall.shape[0], 0))
    return (other, s, w) if tall_is_matrix else (w, s, other)


def top_triplets(matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top ``k`` singular triplets of a finite float32 matrix by the float64 Gram route, computing only the top
    k eigenpairs (``scipy.linalg.eigh(subset_by_index=...)``)."""
    tall = matrix if matrix.shape[0] >= matrix.shape[1] else matrix.T
    n = tall.shape[1]
    k = min(k, n)
    if k == 0:
        return np.zeros((matrix.shape[0], 0)), np.zeros(0), np.zeros((matrix.shape[1], 0))
    values, vectors = scipy.linalg.eigh(gram(tall), subset_by_index=[n - k, n - 1])
    return vectors_from_gram(matrix, values, vectors, k)


def randomized_triplets(matrix: np.ndarray, k: int, rng: np.random.Generator, n_iter: int = 4
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top ``k`` singular triplets of a finite float32 matrix by a randomized range finder with ``n_iter`` power
    iterations (Halko, Martinsson & Tropp 2011): products in float32 with ``k + 10`` columns, the small final SVD
    in float64. ``rng`` is the caller's own, so training's random streams are never touched."""
    width = min(min(matrix.shape), k + 10)
    y = matrix @ rng.standard_normal((matrix.shape[1], width)).astype(np.float32)
    for _ in range(n_iter):
        y = matrix @ np.linalg.qr(matrix.T @ np.linalg.qr(y)[0])[0]
    basis = np.linalg.qr(y.astype(np.float64))[0]
    small = (basis.T.astype(np.float32) @ matrix).astype(np.float64)
    u, s, vt = np.linalg.svd(small, full_matrices=False)
    return basis @ u[:, :k], s[:k], vt[:k].T


def factored_triplets(left: np.ndarray, right: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top ``k`` singular triplets of ``left @ right`` from two thin QR factorisations in float64,
    :math:`L R = Q_L (R_L R_R^T) Q_R^T`; unresolved triplets (a rank below k) are left out."""
    q_left, r_left = np.linalg.qr(left.astype(np.float64))
    q_right, r_right = np.linalg.qr(right.T.astype(np.float64))
    u, s, vt = np.linalg.svd(r_left @ r_right.T)
    k = int(_resolved(s[:k]).sum())
    return q_left @ u[:, :k], s[:k], q_right @ vt[:k].T


def _resolved(s: np.ndarray) -> np.ndarray:
    """Which of the descending singular values ``s`` are resolved (above 1e-6 of the largest, which is > 0)."""
    if not len(s) or not s[0] > 0:
        return np.zeros(len(s), dtype=bool)
    return s > _RESOLVED * s[0]


def resolved(u: np.ndarray, s: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The triplets whose singular value is resolved (descending ``s``: a leading run of them)."""
    keep = _resolved(s)
    return u[:, keep], s[keep], v[:, keep]


def lanczos_left(matrix: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` (< min(shape)) left singular vectors and values of a float32 matrix by Lanczos iterations on a
    float64 copy (``scipy.sparse.linalg.svds``, ARPACK, converged to machine precision; ``seed``: its start vector,
    so training's random streams are never touched)."""
    from scipy.sparse.linalg import svds

    u, s, _ = svds(matrix.astype(np.float64), k=k, tol=0, solver="arpack", random_state=seed)
    order = np.argsort(s)[::-1]
    return u[:, order], s[order]


def weight_intruders(weight: np.ndarray, basis: InitialBasis, k: int, *, exact: bool, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(intruder_cos, weight_sv) of one weight W_t (float32 on the host) against its starting basis; empty when
    the weight holds NaN or Inf (stored as NaN)."""
    if not np.isfinite(weight).all():
        return np.full(0, np.nan, dtype=np.float32), np.full(0, np.nan, dtype=np.float32)
    if exact or k >= min(weight.shape):
        u, s, _ = top_triplets(weight, k)
    else:
        u, s = lanczos_left(weight, k, seed)
    return intruders(basis.x, u, s)


def host_basis_bytes(bases: Sequence[InitialBasis | None] | None) -> int:
    """Host bytes the starting bases hold (for the recording's cost section and the docs)."""
    return sum(b.nbytes for b in bases or () if b is not None)


def gradient_spectra(grads: Sequence[torch.Tensor | None], k: int
                     ) -> tuple[list[torch.Tensor | None], dict[int, tuple[np.ndarray, np.ndarray]] | None]:
    """The singular values of each 2-D gradient (CPU tensors, ``grad_sv``) and, with ``k`` > 0, its top ``k``
    singular vectors (U, V) on the host, from one ``torch.linalg.svd`` on the gradient's device."""
    from lorascope.spectrum import singular_values

    spectra: list[torch.Tensor | None] = []
    vectors: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for i, g in enumerate(grads):
        if g is None or g.ndim != 2:
            spectra.append(None)
        elif not k or not bool(torch.isfinite(g).all()):
            spectra.append(singular_values(g).cpu())
        else:
            u, s, vh = torch.linalg.svd(g.float(), full_matrices=False)
            spectra.append(s.cpu())
            kept = int((s[:k] > _RESOLVED * s[0]).sum()) if s.numel() and bool(s[0] > 0) else 0
            vectors[i] = (u[:, :kept].cpu().numpy(), vh[:kept].T.cpu().numpy())
    return spectra, (vectors if k else None)
