"""Singular values of update matrices, on whatever device the matrix lives: the one numeric kernel that both
the recorder (on the training device) and the analysis (on the host) use.

:func:`singular_values` and :func:`top_singular_triplets` handle one matrix (exact or randomized);
:func:`singular_values_many` computes the full spectra of many matrices at once, choosing per shape and device
between an exact SVD and the float64 Gram-matrix eigenvalue route, batching same-shaped matrices and using
every CPU core torch is allowed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

__all__ = ["singular_values", "singular_values_many", "top_singular_triplets"]


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


# -- many matrices at once ------------------------------------------------------------------------------------

SpectrumMethod = Literal["auto", "gram", "svd"]
_METHODS = ("auto", "gram", "svd")
# Matrices with at most this many entries are stacked into one batched call (fewer Python round trips);
# larger ones go one per call, where batching gains nothing and costs a copy.
_BATCH_MAX_ENTRIES = 1 << 16
# A stacked batch holds at most this many float64 entries (64 MiB).
_CHUNK_MAX_ENTRIES = 1 << 23
# Below this much work in total (multiply-adds, ~5 ms on one core) a thread pool costs more than it saves
# (starting the threads and limiting BLAS threads through threadpoolctl take about 1 ms).
_POOL_MIN_WORK = 5e7


def singular_values_many(matrices: Sequence[torch.Tensor | np.ndarray], *, device: torch.device | str | None = None,
                         method: SpectrumMethod = "auto") -> list[np.ndarray]:
    """Full singular value spectra of many 2-D matrices, each as a descending float64 numpy array.

    Parameters
    ----------
    matrices
        2-D torch tensors and/or numpy arrays of any real dtype, of any shapes (an ``m x n`` matrix gives
        ``min(m, n)`` values). Tensors may live on any device.
    device
        Where to compute: ``None`` computes each matrix where it lives (numpy arrays on the CPU); a device moves
        every matrix there first (``"cpu"`` brings accelerator tensors to the host).
    method
        ``"gram"``: eigenvalues of the float64 Gram matrix on the smaller side, :math:`G = M^T M` (or
        :math:`M M^T`), :math:`s_i = \\sqrt{\\max(\\lambda_i(G), 0)}`. ``"svd"``: an exact float64 SVD (LAPACK
        ``gesdd`` / cuSOLVER). ``"auto"``: the faster of the two for each shape and device (see Notes).

    Returns
    -------
    list of numpy.ndarray
        One float64 array per matrix, in the input order, descending, nonnegative.

    Raises
    ------
    ValueError
        A matrix is not 2-D, not real, or holds NaN / Inf (its spectrum is undefined); the message names its index.

    Notes
    -----
    The Gram route uses, for an ``m x n`` matrix :math:`M` with ``m >= n`` (otherwise :math:`M^T`),

    .. math::

        G = M^T M \\in \\mathbb{R}^{n \\times n}, \\qquad s_i(M) = \\sqrt{\\max(\\lambda_i(G), 0)},

    formed in float64 (float64 inputs are first divided by a power of two near their largest entry, which is exact,
    so that no square overflows or underflows).

    Accuracy. Every route computes in float64 (float32 inputs are converted exactly). Against float64 LAPACK
    (``scipy.linalg.svdvals`` of the float64 input) the error of every singular value is at most
    :math:`10^{-6} s_1`, the contract the tests check; measured errors are about :math:`10^{-8} s_1` at worst
    (exactly rank-deficient matrices) and :math:`10^{-11} s_1` on SmolLM2-135M-shaped weights.

    Why the Gram matrix in float64. Forming :math:`G` squares the condition number: an eigenvalue
    :math:`\\lambda_i = s_i^2` is known to about :math:`\\epsilon \\, s_1^2` absolute, so a small
    :math:`s_i = \\sqrt{\\lambda_i}` is known only to about :math:`\\sqrt{\\epsilon} \\, s_1`. In float32
    (:math:`\\epsilon \\approx 6 \\cdot 10^{-8}`) that is :math:`2.4 \\cdot 10^{-4} s_1`, far too coarse; in float64
    (:math:`\\epsilon \\approx 1.1 \\cdot 10^{-16}`) it is about :math:`10^{-8} s_1`. So singular values far below
    :math:`s_1` lose relative accuracy (one of :math:`10^{-6} s_1` may be off by a percent), while the error relative
    to :math:`s_1`, which energy ranks, residuals and effective ranks depend on, stays far below :math:`10^{-6}`. Use
    ``method="svd"`` when tiny singular values must be accurate relative to themselves.

    Speed and the rule of ``method="auto"``. The Gram route costs one symmetric product (:math:`m n^2 / 2`
    multiply-adds through BLAS ``syrk`` for ``m >= n``, at full BLAS-3 speed) and one symmetric eigenvalue problem of
    size ``n``; an SVD first bidiagonalizes the whole ``m x n`` matrix, half of it in memory-bound BLAS-2 steps.
    Measured on one core of the project's 2-core machine (numpy's OpenBLAS with its Haswell and SkylakeX kernels;
    torch's MKL was slower on both routes), time of the SVD over time of the Gram route: 2.8-3.1x for 1536 x 576,
    3.8-4.6x for 49152 x 576, 2.5-2.7x for 576 x 192, 1.7-2.0x for 576 x 576, about 3x for 256 x 256, and a tie
    (within 20%) at 64 x 64 and below. Hence:

    - on the CPU, ``"gram"`` for every shape;
    - on accelerators, ``"gram"`` as well (a batched GEMM and cuSOLVER's ``syevd``, usually much faster than its
      SVD; not measured here), same-shaped matrices of any size batched up to 64 MiB per call; MPS has no float64,
      so MPS tensors are computed on the CPU.

    On the CPU, same-shaped small matrices (at most 65,536 entries) are stacked into batched calls, and the work is
    spread over ``torch.get_num_threads()`` worker threads, largest first, each running single-threaded BLAS;
    while the pool runs, numpy / scipy BLAS is limited to one thread process-wide (threadpoolctl). This beat
    both torch's batched intra-op threads and multi-threaded BLAS on one matrix at a time (by 1.2x under light
    outside load to 6x under heavy load, which multi-threaded BLAS tolerates badly); when there is only one matrix
    or batch it gets every BLAS thread instead.

    Examples
    --------
    >>> import numpy as np
    >>> m = np.diag([3.0, 2.0, 1.0])
    >>> [s.round(12).tolist() for s in singular_values_many([m, m[:2]])]
    [[3.0, 2.0, 1.0], [3.0, 2.0]]
    """
    if method not in _METHODS:
        raise ValueError(f"The 'method' parameter of singular_values_many must be one of {_METHODS}. "
                         f"Got {method!r} instead.")
    target = None if device is None else torch.device(device)
    items = [_prepare(i, matrix, target, method) for i, matrix in enumerate(matrices)]
    results: list[np.ndarray | None] = [None] * len(items)
    on_host = [it for it in items if isinstance(it.data, np.ndarray)]
    for chunk, s in _host_spectra(on_host):
        for it, values in zip(chunk, s, strict=True):
            results[it.index] = values
    on_device = [it for it in items if not isinstance(it.data, np.ndarray)]
    for chunk, s in _torch_spectra(on_device):
        for it, values in zip(chunk, s, strict=True):
            results[it.index] = values
    return results  # type: ignore[return-value]  # every index was filled


def _auto_route(rows: int, cols: int, device_type: str) -> str:
    """The route of ``method="auto"``: the Gram route for every shape and device (measurements in the docstring of
    :func:`singular_values_many`); kept as one place to change should a shape or device favour the SVD."""
    return "gram"


@dataclass
class _Item:
    index: int
    data: np.ndarray | torch.Tensor  # as given (or moved), any real dtype, original orientation
    rows: int
    cols: int
    route: str

    @property
    def tall_shape(self) -> tuple[int, int]:
        return (max(self.rows, self.cols), min(self.rows, self.cols))

    @property
    def work(self) -> float:
        m, n = self.tall_shape
        return m * n * n * (1.0 if self.route == "gram" else 4.0) + n ** 3


def _prepare(index: int, matrix: torch.Tensor | np.ndarray, target: torch.device | None, method: str) -> _Item:
    data: np.ndarray | torch.Tensor
    if isinstance(matrix, torch.Tensor):
        tensor = matrix.detach()
        if target is not None:
            tensor = tensor.to(target)
        if tensor.device.type == "mps":  # no float64 there
            tensor = tensor.cpu()
        if tensor.is_complex():
            raise ValueError(f"singular_values_many expects real matrices. Got dtype {tensor.dtype} at index {index}.")
        data = tensor
        if tensor.device.type == "cpu":
            data = (tensor if tensor.dtype not in (torch.bfloat16, torch.float16) else tensor.float()
                    ).resolve_neg().numpy()
    else:
        data = np.asarray(matrix)
        if data.dtype.kind not in "fiub":
            raise ValueError(f"singular_values_many expects real matrices. Got dtype {data.dtype} at index {index}.")
        if target is not None and target.type not in ("cpu", "mps"):
            data = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float64)).to(target)
    if data.ndim != 2:
        raise ValueError(f"singular_values_many expects 2-D matrices. Got shape {tuple(data.shape)} at index "
                         f"{index}; pass a list of matrices.")
    rows, cols = (int(d) for d in data.shape)
    device = "cpu" if isinstance(data, np.ndarray) else data.device.type
    route = _auto_route(rows, cols, device) if method == "auto" else method
    return _Item(index, data, rows, cols, route)


def _chunks(items: list[_Item], workers: int, batch_max_entries: int = _BATCH_MAX_ENTRIES) -> list[list[_Item]]:
    """Same (tall shape, route) matrices of at most ``batch_max_entries`` entries stacked into batches (at most
    ``_CHUNK_MAX_ENTRIES`` entries each), at least ``workers`` batches where there are enough matrices to share;
    larger matrices one each. Largest work first."""
    groups: dict[tuple[tuple[int, int], str], list[_Item]] = {}
    for it in items:
        groups.setdefault((it.tall_shape, it.route), []).append(it)
    chunks: list[list[_Item]] = []
    for ((m, n), _), group in groups.items():
        entries = max(m * n, 1)
        size = 1
        if entries <= batch_max_entries:
            size = max(1, min(_CHUNK_MAX_ENTRIES // entries, math.ceil(len(group) / workers)))
        chunks.extend(group[i:i + size] for i in range(0, len(group), size))
    chunks.sort(key=lambda c: sum(it.work for it in c), reverse=True)
    return chunks


def _nonfinite(index: int) -> ValueError:
    return ValueError(f"The matrix at index {index} has NaN or Inf entries; its singular values are undefined. "
                      "Drop it or replace the non-finite entries first.")


def _host_spectra(items: list[_Item]) -> Iterator[tuple[list[_Item], list[np.ndarray]]]:
    if not items:
        return
    workers = max(1, torch.get_num_threads())
    chunks = _chunks(items, workers)
    if workers < 2 or len(chunks) < workers or sum(it.work for it in items) < _POOL_MIN_WORK:
        # Too little to share: one call at a time, each with BLAS's own threads.
        for chunk in chunks:
            yield chunk, _host_chunk(chunk)
        return
    with _blas_threads(1), ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lorascope-spectra") as pool:
        yield from zip(chunks, pool.map(_host_chunk, chunks), strict=True)


def _host_chunk(chunk: list[_Item]) -> list[np.ndarray]:
    """Spectra of one batch of same-shaped matrices on the host (numpy / LAPACK, float64)."""
    m, n = chunk[0].tall_shape
    if n == 0:
        return [np.zeros(0) for _ in chunk]
    converted = [_float64(it) for it in chunk]
    scales = np.array([scale for _, scale in converted])
    tall = [a if it.rows >= it.cols else a.T for (a, _), it in zip(converted, chunk, strict=True)]
    stacked = tall[0][None] if len(tall) == 1 else np.stack(tall)
    if chunk[0].route == "svd":
        for it, a in zip(chunk, tall, strict=True):
            if not np.isfinite(a).all():
                raise _nonfinite(it.index)
        s = np.linalg.svd(stacked, compute_uv=False)
    else:
        # M^T M of one buffer: numpy hands each product to BLAS syrk (half the multiply-adds of a general product).
        gram = np.matmul(np.swapaxes(stacked, 1, 2), stacked)
        # A NaN or Inf entry of M reaches the diagonal entry of its column; finite entries cannot overflow there.
        finite = np.isfinite(np.diagonal(gram, axis1=1, axis2=2)).all(axis=1)
        if not finite.all():
            raise _nonfinite(chunk[int(np.argmin(finite))].index)
        s = np.sqrt(np.clip(np.linalg.eigvalsh(gram)[:, ::-1], 0.0, None))
    s *= scales[:, None]
    return [np.ascontiguousarray(row) for row in s]


def _float64(it: _Item) -> tuple[np.ndarray, float]:
    """The matrix as a new float64 array, divided by a power of two (exact) when its squares could overflow or
    underflow float64, and that power.

    Entries of narrower types (float32 and below, integers) square and sum far inside float64's range, so only
    float64 (and wider) inputs are scaled, by a power of two near their largest magnitude.
    """
    data = it.data
    assert isinstance(data, np.ndarray)  # host items only
    if data.dtype.kind != "f" or data.dtype.itemsize < 8 or data.size == 0:
        return data.astype(np.float64), 1.0
    largest = max(abs(float(np.max(data))), abs(float(np.min(data))))  # NaN propagates
    if not math.isfinite(largest):
        raise _nonfinite(it.index)
    scale = math.ldexp(1.0, math.frexp(largest)[1]) if largest > 0 else 1.0
    return np.multiply(data, 1.0 / scale, dtype=np.float64), scale


def _torch_spectra(items: list[_Item]) -> Iterator[tuple[list[_Item], list[np.ndarray]]]:
    """Spectra on accelerators: batched float64 Gram products and eigenvalue solves, one host copy per batch.

    Every size is batched up to ``_CHUNK_MAX_ENTRIES`` (64 MiB of float64): on a GPU one call per matrix would be
    bound by kernel launches and host synchronizations rather than by arithmetic.
    """
    for chunk in _chunks(items, 1, batch_max_entries=_CHUNK_MAX_ENTRIES):
        first = chunk[0].data
        assert isinstance(first, torch.Tensor)  # only device tensors come here
        m, n = chunk[0].tall_shape
        if n == 0:
            yield chunk, [np.zeros(0) for _ in chunk]
            continue
        stacked = torch.empty((len(chunk), m, n), dtype=torch.float64, device=first.device)
        for j, it in enumerate(chunk):
            assert isinstance(it.data, torch.Tensor)
            stacked[j].copy_(it.data if it.rows >= it.cols else it.data.T)
        largest = stacked.abs().amax(dim=(1, 2))  # NaN propagates
        finite = torch.isfinite(largest).cpu()
        if not bool(finite.all()):
            raise _nonfinite(chunk[int((~finite).nonzero()[0, 0])].index)
        # Divide by a power of two near the largest magnitude (exact), as on the host.
        scale = torch.where(largest > 0, torch.ldexp(torch.ones_like(largest), torch.frexp(largest).exponent),
                            torch.ones_like(largest))
        stacked /= scale[:, None, None]
        if chunk[0].route == "svd":
            s = torch.linalg.svdvals(stacked)
        else:
            s = torch.linalg.eigvalsh(stacked.mT @ stacked).flip(-1).clamp_min_(0.0).sqrt_()
        host = (s * scale[:, None]).cpu().numpy()
        yield chunk, [np.ascontiguousarray(row) for row in host]


@contextlib.contextmanager
def _blas_threads(limit: int) -> Iterator[None]:
    """numpy / scipy BLAS limited to ``limit`` threads while the worker threads run (no oversubscription)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # a scikit-learn dependency, so normally present; without it, run oversubscribed
        yield
        return
    with threadpool_limits(limits=limit, user_api="blas"):
        yield
