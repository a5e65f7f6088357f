"""Snapshot spectra off the training thread.

At a snapshot step the training thread only copies what it must to host memory (:func:`capture`): each recorded
matrix in its own dtype (W_0 stays where it is kept, on the host by default), or, with W_0 kept on the device,
the float32 update Delta = W_t - W_0 computed there; a PEFT LoRA layer's small factors; into buffers the worker
gives back after each snapshot (:mod:`~lorascope.record.host_buffers`), on CUDA pinned, copied without blocking
the device (an event marks when the copies are complete). A worker thread (:class:`SnapshotWorker`) turns each
copy into the energy, non-finite count and singular values of its update with numpy / LAPACK, with the BLAS limited
to its own thread budget (threadpoolctl), and hands the finished Snapshot to the writer thread. Training never
waits for the spectra; it waits only when the copies of pending snapshots would exceed their memory bound
(``snapshot_backlog="wait"``) or skips the snapshot with its reason in the file (``"skip"``).

The kernel is the float64 Gram route of :func:`lorascope.spectrum.singular_values_many` for a dense update
(:math:`G = \\Delta^T \\Delta` accumulated in float64 over blocks of rows, :math:`s_i = \\sqrt{\\max(\\lambda_i(G),
0)}`, the energy :math:`\\|\\Delta\\|_F^2 = \\operatorname{tr} G`), and two thin QR factorisations for a factored
LoRA update, :math:`L R = Q_L (R_L R_R^T) Q_R^T`. Both compute in float64 from the float32 update. For a matrix
that lives on a CUDA device (``spectra_device="auto"``, the default) the dense update's Gram route runs on that
device instead, on a stream of the worker's own (:mod:`lorascope.record.device_spectra`): one host core is 8-290x
slower there (docs/benchmarks.md).

With ``factors_k`` the same routes give the update's top singular vectors: the eigenvectors of the Gram matrix
(``numpy.linalg.eigh`` instead of ``eigvalsh``) are the vectors of the smaller side, the other side's are
:math:`\\Delta v / s`; the QR route keeps its Q factors. With ``intruder_k`` the worker also finds the top left
singular vectors of the weight W_t itself and compares them with the starting weight's
(:mod:`lorascope.record.subspace`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lorascope.model.taxonomy import MatrixRef
from lorascope.record.background import thread_cpu_seconds
from lorascope.record.contributions import HeldLosses, with_held_losses
from lorascope.record.device_spectra import device_gram_measure
from lorascope.record.host_buffers import HostBuffers
from lorascope.record.snapshot import LowRank, current_update, minus_initial
from lorascope.record.subspace import (
    InitialBasis,
    factored_triplets,
    gram,
    randomized_triplets,
    resolved,
    vectors_from_gram,
    weight_intruders,
)
from lorascope.store.payloads import Snapshot

Triplets = tuple[np.ndarray, np.ndarray, np.ndarray]

# Rows of float64 held at once while accumulating a Gram matrix (plus the n x n product of each block).
_GRAM_BLOCK = 1 << 22
_CLOSE = None


@dataclass
class HostMatrix:
    """One matrix of a pending snapshot, on the host: ``dense`` (out, in) in the parameter's dtype with ``w0``
    still to subtract (``None``: already subtracted, or a LoRA update that starts at zero), or the factors of a
    LoRA update ``left @ right`` (W_0 already subtracted)."""

    dense: torch.Tensor | None = None
    w0: torch.Tensor | None = None
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None


@dataclass
class SnapshotJob:
    """What the training thread hands the worker for one snapshot."""

    step: int
    matrices: list[HostMatrix | None]  # None: the copy failed (its reason is in ``failures``)
    nbytes: int
    ready: Any = None  # a CUDA event recorded after the copies, or None
    grad_sv: list[Any] | None = None
    grad_factors: dict[int, tuple[np.ndarray, np.ndarray]] | None = None
    grad_copies: list[torch.Tensor | None] | None = None  # host copies of the gradients, spectra still to compute
    held: HeldLosses | None = None
    failures: dict[int, str] = field(default_factory=dict)


def host_copy_bytes(refs: Sequence[MatrixRef], tensors: Sequence[dict[str, torch.Tensor]], w0_on_device: bool) -> int:
    """Host bytes one snapshot's copies take: each dense matrix in its parameter's dtype (float32 when W_0 is on the
    device and the update is taken there), a LoRA layer's factors in float32 (twice: now and at the start)."""
    total = 0
    for ref, named in zip(refs, tensors, strict=True):
        if ref.lora and _factored(named):
            total += 2 * 4 * sum(t.numel() for t in named.values())
        elif ref.lora:
            total += 4 * ref.out_features * ref.in_features
        else:
            itemsize = 4 if w0_on_device else named["weight"].element_size()
            total += itemsize * ref.out_features * ref.in_features
    return total


def gradient_copies(grads: Sequence[torch.Tensor | None], buffers: HostBuffers | None = None
                    ) -> tuple[list[torch.Tensor | None], int]:
    """Host copies of the 2-D gradients for ``grad_sv`` on the worker (training thread, before the optimizer
    step; from CUDA into pinned memory without waiting: the copies precede the step in stream order), into
    ``buffers`` (fresh ones when None), and their bytes. A LoRA layer's gradient (its factors' gradients
    flattened) has no matrix spectrum: None."""
    buffers = buffers or HostBuffers()
    copies = [None if g is None or g.ndim != 2 else buffers.copy(g.detach()) for g in grads]
    return copies, sum(c.numel() * c.element_size() for c in copies if c is not None)


def _factored(named: dict[str, torch.Tensor]) -> bool:
    return any("lora_A" in name for name in named) and any("lora_B" in name for name in named)


def capture(refs: Sequence[MatrixRef], model: nn.Module, w0: Sequence[Any], *, step: int, nbytes: int,
            buffers: HostBuffers | None = None) -> SnapshotJob:
    """Copy what a snapshot needs to host memory, one matrix at a time (training thread), into ``buffers`` (the
    worker's, reused from snapshot to snapshot; fresh ones when None).

    A copy that fails (out of memory) leaves that matrix out, with its reason; the snapshot goes on."""
    job = SnapshotJob(step=step, matrices=[], nbytes=nbytes)
    to_host = (buffers or HostBuffers()).copy
    cuda = False
    for i, ref in enumerate(refs):
        try:
            with torch.no_grad():
                matrix, on_cuda = _capture_one(model, ref, w0[i], to_host)
            cuda = cuda or on_cuda
            job.matrices.append(matrix)
        except Exception as exc:  # noqa: BLE001 - recorded as a missing matrix
            job.matrices.append(None)
            job.failures[i] = f"{type(exc).__name__}: {exc}"
    if cuda:
        job.ready = torch.cuda.Event()
        job.ready.record()
    return job


def _capture_one(model: nn.Module, ref: MatrixRef, w0: Any, to_host: Callable[[torch.Tensor], torch.Tensor]
                 ) -> tuple[HostMatrix, bool]:
    module = model.get_submodule(ref.module)
    if ref.lora:
        update = minus_initial(current_update(model, ref), w0)
        if isinstance(update, LowRank):
            cuda = update.left.device.type == "cuda"
            return HostMatrix(left=to_host(update.left), right=to_host(update.right)), cuda
        return HostMatrix(dense=to_host(update)), update.device.type == "cuda"
    now = ref.matrix(getattr(module, ref.parameter).detach())
    cuda = now.device.type == "cuda"
    if w0 is not None and w0.device.type != "cpu":  # W_0 kept on the device: take the update there
        return HostMatrix(dense=to_host(now.float() - w0.float())), cuda
    return HostMatrix(dense=to_host(now), w0=w0), cuda


def job_copies(job: SnapshotJob) -> list[torch.Tensor | None]:
    """The host copies a job holds (W_0, which the recorder keeps, is not one)."""
    held = [t for m in job.matrices if m is not None for t in (m.dense, m.left, m.right)]
    return [*held, *(job.grad_copies or ())]


# -- the worker's host arithmetic (numpy only; the device route is lorascope.record.device_spectra) ----------------

def _float32(tensor: torch.Tensor) -> np.ndarray:
    """A host tensor as a float32 numpy array, converted exactly (bfloat16 by its bit pattern), sharing memory
    when it already is float32."""
    if tensor.dtype == torch.float32:
        return tensor.numpy()
    if tensor.dtype == torch.bfloat16:
        bits = tensor.view(torch.int16).numpy().view(np.uint16).astype(np.uint32)
        return np.left_shift(bits, 16).view(np.float32)
    if tensor.dtype in (torch.float16, torch.float64):
        return tensor.numpy().astype(np.float32)
    raise TypeError(f"cannot measure a matrix of dtype {tensor.dtype}")


def dense_update(matrix: HostMatrix, now: np.ndarray | None = None) -> np.ndarray:
    """Delta = W_t - W_0 in float32, as the recorder has always taken it (W_t cast to float32, then differenced);
    ``now``: ``matrix.dense`` already as float32 (it is overwritten when W_0 is subtracted)."""
    assert matrix.dense is not None
    now = _float32(matrix.dense) if now is None else now
    if matrix.w0 is None:
        return now
    return np.subtract(now, _float32(matrix.w0), out=now)  # ``now`` is the worker's own copy


def gram_measure(delta: np.ndarray) -> tuple[float, int, np.ndarray | None]:
    """(energy, non-finite entries, singular values or None) of a dense float32 update by the float64 Gram route.

    The Gram matrix of the smaller side is accumulated in float64 over blocks of rows, so the extra memory is one
    block and the n x n Gram matrix; its trace is the exact energy (float64 accumulation). A non-finite entry
    reaches the diagonal of its column: then the entries are counted and no spectrum is computed."""
    energy, nonfinite, spectrum, _ = gram_route(delta, 0)
    return energy, nonfinite, spectrum


def gram_route(delta: np.ndarray, k: int) -> tuple[float, int, np.ndarray | None, Triplets | None]:
    """:func:`gram_measure` and, with ``k`` > 0, the top ``k`` singular triplets from the same Gram matrix (its full
    eigendecomposition instead of its eigenvalues; unresolved triplets of a lower-rank update are left out)."""
    tall = delta if delta.shape[0] >= delta.shape[1] else delta.T
    if tall.shape[1] == 0:
        return 0.0, 0, np.zeros(0), None
    g = gram(tall)  # numpy hands each block's A^T A to BLAS syrk
    energy = float(np.trace(g))
    if not np.isfinite(np.diagonal(g)).all():
        return energy, int(np.count_nonzero(~np.isfinite(delta))), None, None
    if not k:
        return energy, 0, np.sqrt(np.clip(np.linalg.eigvalsh(g)[::-1], 0.0, None)), None
    values, vectors = np.linalg.eigh(g)
    return energy, 0, np.sqrt(np.clip(values[::-1], 0.0, None)), vectors_from_gram(delta, values, vectors, k)


def factored_measure(left: np.ndarray, right: np.ndarray, full_rank: int) -> tuple[float, int, np.ndarray | None]:
    """(energy, non-finite entries, singular values zero-padded to ``full_rank``) of ``left @ right`` from two thin
    QR factorisations in float64: :math:`L R = Q_L (R_L R_R^T) Q_R^T`."""
    if not (np.isfinite(left).all() and np.isfinite(right).all()):
        dense = left @ right
        return float(np.sum(np.square(dense, dtype=np.float64))), int(np.count_nonzero(~np.isfinite(dense))), None
    r_left: np.ndarray = np.linalg.qr(left.astype(np.float64), mode="r")  # type: ignore[assignment]  # mode "r": R
    r_right: np.ndarray = np.linalg.qr(right.T.astype(np.float64), mode="r")  # type: ignore[assignment]
    s = np.linalg.svd(r_left @ r_right.T, compute_uv=False)
    spectrum = np.zeros(full_rank)
    spectrum[: min(full_rank, s.shape[0])] = s[:full_rank]
    return float(np.sum(np.square(s))), 0, spectrum


def gradient_measure(copies: Sequence[torch.Tensor | None], k: int
                     ) -> tuple[list[np.ndarray | None], dict[int, tuple[np.ndarray, np.ndarray]] | None]:
    """The singular values of each copied gradient (``grad_sv``) and, with ``k`` > 0, its top ``k`` resolved
    singular vectors (U, V) in float32, by the float64 Gram route; a non-finite gradient has none (None)."""
    spectra: list[np.ndarray | None] = []
    vectors: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for i, copy in enumerate(copies):
        if copy is None:
            spectra.append(None)
            continue
        _, _, spectrum, triplets = gram_route(_float32(copy), k)
        spectra.append(None if spectrum is None else spectrum.astype(np.float32))
        if triplets is not None:
            vectors[i] = (triplets[0].astype(np.float32), triplets[2].astype(np.float32))
    return spectra, (vectors if k else None)


def randomized_measure(delta: np.ndarray, k: int, rng: np.random.Generator, n_iter: int = 4
                       ) -> tuple[float, int, np.ndarray | None]:
    """(energy, non-finite entries, the top ``k`` singular values or None): :func:`randomized_route` without
    vectors."""
    energy, nonfinite, spectrum, _ = randomized_route(delta, k, 0, rng, n_iter)
    return energy, nonfinite, spectrum


def randomized_route(delta: np.ndarray, k: int, vectors: int, rng: np.random.Generator, n_iter: int = 4
                     ) -> tuple[float, int, np.ndarray | None, Triplets | None]:
    """(energy, non-finite entries, the top ``k`` singular values or None) of a dense float32 update, by a randomized
    range finder with ``n_iter`` power iterations (Halko, Martinsson & Tropp 2011), as ``top_k`` asks for large
    matrices: products in float32 with ``k + 10`` columns, the small final SVD in float64. The energy stays exact
    (float64 sums of squares over blocks of rows). ``rng`` is the worker's own, so training's random streams are
    never touched. With ``vectors`` > 0, also the top ``vectors`` singular triplets from the same range."""
    energy = 0.0
    rows = max(1, _GRAM_BLOCK // max(delta.shape[1], 1))
    for start in range(0, delta.shape[0], rows):
        block = np.asarray(delta[start:start + rows], dtype=np.float64)
        energy += float(np.einsum("ij,ij->", block, block))
    if not np.isfinite(energy):
        return energy, int(np.count_nonzero(~np.isfinite(delta))), None, None
    u, s, v = randomized_triplets(delta, max(k, vectors), rng, n_iter)
    return energy, 0, s[:k], (resolved(u[:, :vectors], s[:vectors], v[:, :vectors]) if vectors else None)


def threads_after_training(worker_threads: int, training_threads: int) -> int:
    """BLAS threads for the snapshots still pending when training ends: as many as training used, as far as the
    cores are free, and never fewer than the worker's own. The one-minute load average still counts training's
    threads (they ran a moment ago); what it holds beyond them is outside load, and multi-threaded BLAS on cores
    another process keeps busy can be many times slower than one thread (``benchmarks/close_threads.py`` beside two
    busy processes: 3.8 s and 102 s on two threads, 2.1-2.4 s on one; docs/benchmarks.md). Without a load average
    (not Unix), the worker's own threads."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return worker_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    outside = max(load - training_threads, 0.0)
    return max(worker_threads, min(training_threads, round(cores - outside)))


@functools.cache
def _blas_controller() -> Any:
    """threadpoolctl's view of the BLAS libraries loaded (numpy's, scipy's), found once; None without threadpoolctl."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()


@contextlib.contextmanager
def blas_threads(limit: int) -> Iterator[None]:
    """numpy / scipy BLAS limited to ``limit`` threads while the worker computes (threadpoolctl; without it, BLAS
    keeps its own setting). torch's threads are never touched."""
    controller = _blas_controller()
    if controller is None:
        yield
        return
    with controller.limit(limits=limit, user_api="blas"):
        yield


# -- what a snapshot is expected to cost before one has been measured ------------------------------------------

def snapshot_flops(refs: Sequence[MatrixRef], *, top_k: int | None = None, top_k_min_size: int = 0,
                   grad_sv: bool = False, factors_k: int = 0, intruder_k: int = 0) -> float:
    """About the floating-point operations of one snapshot on the worker's kernels, from the matrices' shapes: for
    an m x n update (m >= n) the Gram matrix (m n^2) and its eigenvalues (4/3 n^3; 9 n^3 with vectors, Golub & Van
    Loan), or with ``top_k`` the randomized range finder (about 20 m n (k + 10) at 4 power iterations); ``grad_sv``
    and ``intruder_k`` measure a second matrix of the same shape. A LoRA layer's factored update costs next to
    nothing (two thin QRs) and counts 0."""

    def one(m: int, n: int, vectors: bool) -> float:
        m, n = max(m, n), min(m, n)
        if top_k is not None and top_k < n and m * n > top_k_min_size:
            return 20.0 * m * n * (top_k + 10)
        return m * n * n + (9.0 if vectors else 4.0 / 3.0) * n ** 3

    total = 0.0
    for ref in refs:
        if ref.lora:
            continue
        m, n = ref.out_features, ref.in_features
        total += one(m, n, factors_k > 0)
        total += one(m, n, factors_k > 0) if grad_sv else 0.0
        total += one(m, n, True) if intruder_k else 0.0
    return total


_PROBE_SHAPE = (2048, 256)


@functools.cache
def gram_flops_per_second(threads: int) -> float:
    """The speed of the worker's kernel here, measured once per thread count: the float64 Gram route on a random
    2,048 x 256 matrix (under 0.1 s in all), best of three. Only an estimate: on SmolLM2-135M's 211 shapes it put a
    snapshot at 3.25 s against 3.4-3.6 s measured (``benchmarks/close_threads.py``)."""
    probe = np.random.default_rng(0).standard_normal(_PROBE_SHAPE, dtype=np.float32)
    best = float("inf")
    with blas_threads(threads):
        for _ in range(3):
            started = time.perf_counter()
            gram_measure(probe)
            best = min(best, time.perf_counter() - started)
    m, n = _PROBE_SHAPE
    return (m * n * n + 4.0 / 3.0 * n ** 3) / max(best, 1e-9)


class SnapshotWorker:
    """The thread that computes snapshot spectra from host copies, one snapshot at a time, in order.

    Parameters
    ----------
    refs
        The recorded matrices.
    deliver
        Called on the worker thread with each finished :class:`Snapshot` (the writer's queue).
    missing
        Called with ``(step, reason)`` for a snapshot or matrix that could not be computed.
    buffer_bytes
        Host bytes the copies of pending snapshots (queued or being computed) may hold; one snapshot larger than
        this is still taken when nothing else is pending.
    threads
        BLAS threads of the worker while training runs. Once :meth:`close` is called training is over, and the
        snapshots still pending (the final one) use as many threads as training did (``torch.get_num_threads()``)
        as far as no other process keeps those cores busy (:func:`threads_after_training`), so that the wait at
        the end of ``train()`` is shorter.
    store_delta
        Also keep every full update in this dtype ("float16", "float32" or None).
    top_k, top_k_min_size
        Matrices with more than ``top_k_min_size`` entries get only their top ``top_k`` singular values
        (:func:`randomized_measure`); ``top_k=None``: full spectra. Such matrices also get the weight's top
        ``intruder_k`` vectors by the randomized method.
    factors_k
        Also the top ``factors_k`` singular vectors of every update.
    intruder_k, bases
        The intruder columns of every weight (:mod:`lorascope.record.subspace`) against ``bases``, one per matrix
        (``None``: that matrix's are not measured).
    devices
        Per matrix, the CUDA device its plain dense spectrum is computed on (:mod:`lorascope.record.device_spectra`,
        on a stream of the worker's own), or None for the host; ``None``: every one on the host.
    """

    def __init__(self, refs: Sequence[MatrixRef], *, deliver: Callable[[Snapshot], Any],
                 missing: Callable[[int, str], Any], buffer_bytes: int, threads: int,
                 store_delta: str | None = None, top_k: int | None = None, top_k_min_size: int = 0,
                 factors_k: int = 0, intruder_k: int = 0, bases: Sequence[InitialBasis | None] | None = None,
                 devices: Sequence[torch.device | None] | None = None) -> None:
        self.refs = tuple(refs)
        self.devices = list(devices) if devices is not None else [None] * len(self.refs)
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self.top_k, self.top_k_min_size = top_k, top_k_min_size
        self.factors_k, self.intruder_k = factors_k, intruder_k
        self.bases = list(bases) if bases is not None else [None] * len(self.refs)
        self._deliver, self._missing = deliver, missing
        self.buffer_bytes, self.threads, self.store_delta = int(buffer_bytes), int(threads), store_delta
        self._jobs: queue.Queue[SnapshotJob | None] = queue.Queue()
        self.buffers = HostBuffers()  # the copies' host memory, given back after each snapshot
        self._room = threading.Condition()
        self._pending_bytes = 0
        self.in_flight = 0
        self.cpu_seconds = 0.0  # worker-thread CPU time spent on snapshots so far
        self.device_seconds = 0.0  # wall time of the device route's calls (device_gram_measure) so far
        self.device_cpu_seconds = 0.0  # the worker thread's CPU time within those calls (part of cpu_seconds)
        self.computed = 0
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self.threads_at_close = self.threads
        self.close_wait_seconds = 0.0
        self._cpu_at_close = self._cpu_at_exit = float("nan")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lorascope-snapshots", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- training thread -----------------------------------------------------------------------------------
    def reserve(self, nbytes: int, *, wait: bool) -> bool:
        """Room for one more snapshot's copies: True when reserved (after waiting, with ``wait``), False when the
        pending snapshots fill the buffer and ``wait`` is false."""
        with self._room:
            while self._pending_bytes and self._pending_bytes + nbytes > self.buffer_bytes:
                if not wait or not self.alive:
                    return False
                self._room.wait(timeout=0.5)
            self._pending_bytes += nbytes
            self.in_flight += 1
            return True

    def release(self, nbytes: int) -> None:
        """Give back a reservation that was never submitted."""
        with self._room:
            self._pending_bytes -= nbytes
            self.in_flight -= 1
            self._room.notify_all()

    def submit(self, job: SnapshotJob) -> None:
        self._jobs.put(job)

    def close(self) -> None:
        """Finish every pending snapshot, then stop the thread. Training is over: the pending snapshots use the
        threads training used as far as outside load leaves them free (:func:`threads_after_training`), and
        :attr:`close_wait_seconds` is how long this waited for them."""
        if self._thread is None:
            return
        started = time.monotonic()
        self.threads_at_close = threads_after_training(self.threads, torch.get_num_threads())
        self._cpu_at_close = thread_cpu_seconds(self._thread)
        self._closing.set()
        if self._thread.is_alive():
            self._jobs.put(_CLOSE)
            self._thread.join()
        self._thread = None
        self.buffers.clear()
        self.close_wait_seconds = time.monotonic() - started

    @property
    def cost_seconds(self) -> float:
        """What the snapshots computed so far cost: the worker's CPU time on the host, with the device route's
        calls counted at their wall time (the device time they take from training) instead."""
        return self.cpu_seconds - self.device_cpu_seconds + self.device_seconds

    @property
    def close_uncounted_seconds(self) -> float:
        """The part of the wait at close that the worker thread's CPU time does not cover (the BLAS helper threads
        of the final snapshot, once it may use training's threads); the whole wait where a thread's CPU clock
        cannot be read."""
        counted = self._cpu_at_exit - self._cpu_at_close
        return max(0.0, self.close_wait_seconds - counted) if counted == counted else self.close_wait_seconds

    # -- worker thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _CLOSE:
                self._cpu_at_exit = time.thread_time()
                return
            started = time.thread_time()
            try:
                self._deliver(self.compute(job))
            except Exception as exc:  # noqa: BLE001 - the snapshot is missing, training goes on
                self._missing(job.step, f"failed: {type(exc).__name__}: {exc}")
            finally:
                self.cpu_seconds += time.thread_time() - started
                self.computed += 1
                self.buffers.give_back(job_copies(job))  # for the next snapshot's copies
                job.matrices.clear()
                job.grad_copies = None
                self.release(job.nbytes)

    def compute(self, job: SnapshotJob) -> Snapshot:
        """The snapshot of one job (callable directly, e.g. in tests)."""
        if job.ready is not None:
            job.ready.synchronize()
        if job.grad_copies is not None:
            with self._blas():
                job.grad_sv, job.grad_factors = gradient_measure(job.grad_copies, self.factors_k)
        n = len(self.refs)
        energy = np.full(n, np.nan)
        nonfinite = np.zeros(n, dtype=np.int64)
        spectra: list[np.ndarray | None] = [None] * n
        deltas: dict[int, np.ndarray] = {}
        factors: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        intruder: list[tuple[np.ndarray, np.ndarray] | None] = [None] * n
        for i, (ref, matrix) in enumerate(zip(self.refs, job.matrices, strict=True)):
            reason = job.failures.get(i)
            if matrix is not None:
                try:
                    with self._blas():  # per matrix: the thread count rises once training is over
                        intruder[i] = self._intruders(i, matrix, seed=job.step)
                        energy[i], nonfinite[i], spectra[i], delta, triplets = self._measure(
                            ref, matrix, seed=(job.step, i), device=self.devices[i])
                    if self.store_delta and delta is not None:
                        deltas[i] = delta.astype(self.store_delta)
                    if triplets is not None:
                        factors[i] = (triplets[0].astype(np.float32), triplets[2].astype(np.float32))
                except Exception as exc:  # noqa: BLE001 - this matrix is missing from the snapshot
                    reason = f"{type(exc).__name__}: {exc}"
            if reason is not None:
                self._missing(job.step, f"failed: matrix {ref.name}: {reason}")
        extra: dict[str, Any] = {}
        if self.intruder_k:
            extra["intruder_cos"] = [None if m is None else m[0] for m in intruder]
            extra["weight_sv"] = [None if m is None else m[1] for m in intruder]
        snapshot = Snapshot(step=job.step, energy=energy, sv=spectra, delta_nonfinite=nonfinite,
                            grad_sv=job.grad_sv, deltas=deltas if self.store_delta else None,
                            factors=factors if self.factors_k else None, grad_factors=job.grad_factors, **extra)
        return snapshot if job.held is None else with_held_losses(snapshot, job.held)

    def _blas(self) -> contextlib.AbstractContextManager[None]:
        return blas_threads(self.threads_at_close if self._closing.is_set() else self.threads)

    def _large(self, shape: tuple[int, ...]) -> bool:
        return int(np.prod(shape)) > self.top_k_min_size

    def _on_device(self, delta: np.ndarray, device: torch.device) -> tuple[float, int, np.ndarray | None]:
        """:func:`device_gram_measure` on the worker's own stream of ``device``, timed for :attr:`cost_seconds`."""
        if device.type == "cuda" and device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return device_gram_measure(delta, device, self._streams.get(device))
        finally:
            self.device_seconds += time.perf_counter() - wall
            self.device_cpu_seconds += time.thread_time() - cpu

    def _intruders(self, i: int, matrix: HostMatrix, *, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The intruder columns of matrix ``i`` from W_t: the host copy itself when W_0 is still to be subtracted,
        else the kept W_0 plus the update."""
        basis = self.bases[i]
        if not self.intruder_k or basis is None:
            return None
        if matrix.left is not None and matrix.right is not None:
            assert basis.weight is not None
            weight = basis.weight + _float32(matrix.left) @ _float32(matrix.right)
        elif matrix.w0 is not None:
            assert matrix.dense is not None
            weight = _float32(matrix.dense)  # W_t, before dense_update subtracts W_0
        else:
            assert matrix.dense is not None and basis.weight is not None
            weight = basis.weight + _float32(matrix.dense)
        return weight_intruders(weight, basis, self.intruder_k, exact=not self._large(weight.shape), seed=seed)

    def _measure(self, ref: MatrixRef, matrix: HostMatrix, *, seed: tuple[int, int], device: torch.device | None
                 ) -> tuple[float, int, np.ndarray | None, np.ndarray | None, Triplets | None]:
        k = self.factors_k
        if matrix.left is not None and matrix.right is not None:
            left, right = _float32(matrix.left), _float32(matrix.right)
            full_rank = min(ref.out_features, ref.in_features)
            energy, nonfinite, spectrum = factored_measure(left, right, full_rank)
            triplets = factored_triplets(left, right, k) if k and spectrum is not None else None
            return energy, nonfinite, spectrum, (left @ right if self.store_delta else None), triplets
        delta = dense_update(matrix)
        if self.top_k is not None and self.top_k < min(delta.shape) and self._large(delta.shape):
            energy, nonfinite, spectrum, triplets = randomized_route(delta, self.top_k, k,
                                                                     np.random.default_rng(seed))
        elif k:
            energy, nonfinite, spectrum, triplets = gram_route(delta, k)
        elif device is not None:
            (energy, nonfinite, spectrum), triplets = self._on_device(delta, device), None
        else:  # gram_measure itself: the spectra's kernel since before the vectors
            (energy, nonfinite, spectrum), triplets = gram_measure(delta), None
        return energy, nonfinite, spectrum, delta, triplets
