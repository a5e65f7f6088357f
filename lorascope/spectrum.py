"""Singular values of update matrices, on whatever device the matrix lives: the one numeric kernel that both
the recorder (on the training device) and the analysis (on the host) use.
"""

from __future__ import annotations

import torch

__all__ = ["singular_values", "top_singular_triplets"]


def singular_values(matrix: torch.Tensor, top_k: int | None = None, *, n_iter: int = 4) -> torch.Tensor:
    """Singular values of a 2-D matrix in descending order, as float32 on the matrix's device.

    Parameters
    ----------
    matrix
        A 2-D tensor (out, in). Computed in float32 (float64 inputs stay float64 for accuracy).
    top_k
        ``None`` for the full spectrum by LAPACK / cuSOLVER (exact). An int k computes the leading k values by a
        randomized range finder with ``n_iter`` power iterations (Halko, Martinsson & Tropp 2011); the result has
        ``min(k, min(out, in))`` entries.
    n_iter
        Power iterations of the randomized method; more iterations sharpen a slowly decaying spectrum.

    Returns
    -------
    torch.Tensor
        1-D, descending.

    Notes
    -----
    The exact energy :math:`\\|M\\|_F^2 = \\sum_i s_i^2` does not need an SVD; callers keep it separately so that
    energy ranks stay exact when only the top-k values are known.

    Examples
    --------
    >>> m = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    >>> singular_values(m).tolist()
    [3.0, 2.0, 1.0]
    """
    if matrix.ndim != 2:
        raise ValueError(f"singular_values expects a 2-D matrix. Got shape {tuple(matrix.shape)} instead.")
    m = matrix if matrix.dtype == torch.float64 else matrix.float()
    rank_bound = min(m.shape)
    if rank_bound == 0:
        return m.new_zeros(0)
    if top_k is None or top_k >= rank_bound:
        return torch.linalg.svdvals(m)
    if top_k < 1:
        raise ValueError(f"top_k must be None or an int >= 1. Got {top_k} instead.")
    _, s, _ = _randomized_svd(m, top_k, n_iter)
    return s


def top_singular_triplets(matrix: torch.Tensor, k: int, *, n_iter: int = 4,
                          exact: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading ``k`` singular triplets ``(U (out, k), s (k,), V (in, k))`` of a 2-D matrix.

    Singular vectors are defined up to a joint sign flip of ``u_i`` and ``v_i``; compare them sign-insensitively.
    ``exact=False`` uses the randomized method (for large matrices).
    """
    if matrix.ndim != 2:
        raise ValueError(f"top_singular_triplets expects a 2-D matrix. Got shape {tuple(matrix.shape)} instead.")
    m = matrix if matrix.dtype == torch.float64 else matrix.float()
    k = min(k, min(m.shape))
    if exact or k >= min(m.shape):
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[:, :k], s[:k], vh[:k].T
    return _randomized_svd(m, k, n_iter)


def _randomized_svd(m: torch.Tensor, k: int, n_iter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    oversample = min(10, min(m.shape) - k)
    # torch.svd_lowrank: randomized range finder with power iterations; returns V, not V^H.
    u, s, v = torch.svd_lowrank(m, q=k + oversample, niter=n_iter)
    return u[:, :k], s[:k], v[:, :k]
