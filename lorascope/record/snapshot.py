"""Snapshot capture on the training device: the update Delta of each recorded matrix, one module at a time.

Delta = W_t - W_0 in float32 (never downcast before differencing). For a PEFT LoRA layer the update is the
merged ``scaling * B @ A`` (summed over active adapters, minus its value at the start); it is kept in factored
form L @ R, so its energy and spectrum come from small QR factors instead of a dense SVD.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lorascope.model.peft import active_adapters, is_plain_lora
from lorascope.model.taxonomy import MatrixRef
from lorascope.record.options import RecordOptions
from lorascope.record.subspace import InitialBasis, weight_intruders, weight_now
from lorascope.spectrum import singular_values, top_singular_triplets
from lorascope.store.payloads import Snapshot


@dataclass
class LowRank:
    """An (out, in) matrix held as ``left @ right`` with left (out, q), right (q, in)."""

    left: torch.Tensor
    right: torch.Tensor

    def dense(self) -> torch.Tensor:
        return self.left @ self.right


def tensors_of(model: nn.Module, ref: MatrixRef) -> dict[str, torch.Tensor]:
    """The trainable tensors behind a recorded matrix: its parameter, or a LoRA layer's adapter weights."""
    module = model.get_submodule(ref.module)
    if not ref.lora:
        return {"weight": getattr(module, ref.parameter)}
    return {name: p for name, p in module.named_parameters() if not name.startswith("base_layer.")}


def current_update(model: nn.Module, ref: MatrixRef) -> torch.Tensor | LowRank:
    """The matrix now: ``W_t`` as float32 (out, in) for a weight, the merged LoRA update for a LoRA layer."""
    module: Any = model.get_submodule(ref.module)  # a PEFT LoRA layer's parts are untyped ModuleDicts
    if not ref.lora:
        return ref.matrix(getattr(module, ref.parameter).detach()).float()
    with torch.no_grad():
        if is_plain_lora(module):
            adapters = active_adapters(module)
            left = torch.cat([module.lora_B[a].weight.float() * float(module.scaling[a]) for a in adapters], 1)
            right = torch.cat([module.lora_A[a].weight.float() for a in adapters], 0)
            return LowRank(left, right)
        deltas = [module.get_delta_weight(a).float() for a in active_adapters(module)]
        return ref.matrix(functools.reduce(operator.add, deltas))


def capture_initial(model: nn.Module, ref: MatrixRef, *, keep_on: str = "cpu", dtype: str = "float32"
                    ) -> torch.Tensor | LowRank | None:
    """W_0 of a recorded matrix, cloned in float32, or a weight in its own dtype with ``dtype="parameter"`` (the
    same values: an update taken against it is the same); ``None`` for a LoRA update that starts at zero."""
    if dtype == "parameter" and not ref.lora:
        weight = ref.matrix(getattr(model.get_submodule(ref.module), ref.parameter).detach())
        return weight.clone() if keep_on == "device" else weight.to("cpu", copy=True)
    initial = current_update(model, ref)
    if isinstance(initial, LowRank):
        if not torch.any(initial.left) or not torch.any(initial.right):
            return None
        initial = LowRank(initial.left.clone(), initial.right.clone())
        return initial if keep_on == "device" else LowRank(initial.left.cpu(), initial.right.cpu())
    if ref.lora and not torch.any(initial):
        return None
    return initial.clone() if keep_on == "device" else initial.to("cpu", copy=True)


def to_storable(w0: torch.Tensor | LowRank | None) -> Any:
    """W_0 as numpy (a ``(left, right)`` pair for a factored LoRA start), for the initial-weights file."""
    if isinstance(w0, LowRank):
        return (w0.left.cpu().numpy(), w0.right.cpu().numpy())
    return None if w0 is None else w0.cpu().float().numpy()  # bf16 has no numpy dtype; its values fit float32


def from_storable(stored: Any, device: torch.device | str) -> torch.Tensor | LowRank | None:
    """Inverse of :func:`to_storable`, placed on ``device``."""
    if stored is None:
        return None
    if isinstance(stored, tuple):
        return LowRank(torch.from_numpy(stored[0]).to(device), torch.from_numpy(stored[1]).to(device))
    return torch.from_numpy(stored).to(device)


def in_kept_dtype(model: nn.Module, ref: MatrixRef, w0: torch.Tensor | LowRank | None, dtype: str
                  ) -> torch.Tensor | LowRank | None:
    """A W_0 read back to resume (stored as float32), in the dtype ``w0_dtype`` keeps it in."""
    if dtype == "parameter" and not ref.lora and isinstance(w0, torch.Tensor):
        return w0.to(getattr(model.get_submodule(ref.module), ref.parameter).dtype)
    return w0


def update_delta(model: nn.Module, ref: MatrixRef, w0: torch.Tensor | LowRank | None) -> torch.Tensor | LowRank:
    """Delta = (matrix now) - W_0, on the training device."""
    return minus_initial(current_update(model, ref), w0)


def minus_initial(now: torch.Tensor | LowRank, w0: torch.Tensor | LowRank | None) -> torch.Tensor | LowRank:
    """``now - w0`` on ``now``'s device; a factored update stays factored (its factors concatenated)."""
    if w0 is None:
        return now
    if isinstance(now, LowRank):
        assert isinstance(w0, LowRank)  # both are the merged update of the same LoRA layer
        dev = now.left.device
        return LowRank(torch.cat([now.left, -w0.left.to(dev)], 1), torch.cat([now.right, w0.right.to(dev)], 0))
    assert isinstance(w0, torch.Tensor)  # a dense update's start is dense
    return now - w0.to(now.device, non_blocking=True)


def _lowrank_svd(delta: LowRank) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # L R = Ql (Rl Rr^T) Qr^T: the SVD of the small core gives the exact SVD of the product.
    ql, rl = torch.linalg.qr(delta.left)
    qr, rr = torch.linalg.qr(delta.right.T)
    u, s, vh = torch.linalg.svd(rl @ rr.T)
    return ql @ u, s, qr @ vh.T


def take_snapshot(refs: tuple[MatrixRef, ...], model: nn.Module, w0: list[Any], *, options: RecordOptions,
                  step: int, grad_sv: list[torch.Tensor | None] | None = None,
                  grad_factors: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
                  bases: Sequence[InitialBasis | None] | None = None) -> Snapshot:
    """Energy, spectrum and optional factors / full update of every recorded matrix at optimizer step ``step``,
    as host arrays (``grad_sv``, ``grad_factors``: the gradient's spectra and vectors read before the step, on the
    CPU; ``bases``: the starting weights' vectors, for the intruder columns of ``intruder_k``).

    One module at a time, so the extra device memory is one matrix (and its SVD workspace).
    """
    arrays = SnapshotArrays(refs, options)
    rng_kept = rng_keeper(model, options)
    for i, ref in enumerate(refs):
        with torch.no_grad(), rng_kept():
            now = current_update(model, ref)
            arrays.add(i, minus_initial(now, w0[i]))
            basis = bases[i] if bases is not None else None
            if options.intruder_k and basis is not None:
                arrays.add_intruders(i, weight_now(model, ref, now), basis, seed=step)
    return arrays.result(step, grad_sv=grad_sv, grad_factors=grad_factors)


class SnapshotArrays:
    """The host arrays of one snapshot, filled one matrix at a time by :meth:`add` (a matrix never added keeps
    NaN energy and no spectrum)."""

    def __init__(self, refs: tuple[MatrixRef, ...], options: RecordOptions) -> None:
        self.refs, self.options = refs, options
        self.energy = np.full(len(refs), np.nan)
        self.nonfinite = np.zeros(len(refs), dtype=np.int64)
        self.spectra: list[np.ndarray | None] = [None] * len(refs)
        self.factors: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.deltas: dict[int, np.ndarray] = {}
        self.intruder_cos: list[np.ndarray | None] = [None] * len(refs)
        self.weight_sv: list[np.ndarray | None] = [None] * len(refs)

    def add(self, i: int, delta: torch.Tensor | LowRank) -> None:
        """Measure the update of matrix ``i`` (on its device) and keep the results on the host."""
        options = self.options
        spectrum, u, v, dense = _measure(delta, self.refs[i], options)
        if dense is not None:
            self.nonfinite[i] = _nonfinite(dense)
            self.energy[i] = _energy(dense)
            if options.store_delta:
                self.deltas[i] = dense.to(getattr(torch, options.store_delta)).cpu().numpy()
        if isinstance(delta, LowRank) and spectrum is not None:
            self.energy[i] = float(torch.sum(spectrum.double() ** 2))
        self.spectra[i] = None if spectrum is None else spectrum.cpu().numpy()
        if u is not None and v is not None:
            self.factors[i] = (u.cpu().numpy(), v.cpu().numpy())

    def add_intruders(self, i: int, weight: torch.Tensor, basis: InitialBasis, *, seed: int) -> None:
        """The intruder columns of matrix ``i`` from its weight W_t, copied to the host and computed there as the
        snapshot worker does (:func:`lorascope.record.subspace.weight_intruders`)."""
        host = weight.detach().to("cpu", torch.float32).numpy()
        large = host.size > self.options.top_k_min_size
        self.intruder_cos[i], self.weight_sv[i] = weight_intruders(host, basis, self.options.intruder_k,
                                                                   exact=not large, seed=seed)

    def result(self, step: int, *, grad_sv: list[Any] | None = None,
               grad_factors: dict[int, tuple[np.ndarray, np.ndarray]] | None = None) -> Snapshot:
        """The snapshot of optimizer step ``step`` (its examples and tokens seen are the writer's to fill in)."""
        options = self.options
        intruders = bool(options.intruder_k)
        return Snapshot(step=step, energy=self.energy, sv=self.spectra, delta_nonfinite=self.nonfinite,
                        grad_sv=grad_sv, factors=self.factors if options.factors_k else None,
                        deltas=self.deltas if options.store_delta else None, grad_factors=grad_factors,
                        intruder_cos=self.intruder_cos if intruders else None,
                        weight_sv=self.weight_sv if intruders else None)


# Whole-matrix float64 norms and finite masks make temporaries of 1-2x the matrix; blocks of rows keep a snapshot's
# peak at the update itself plus LAPACK's copy (benchmarks/distributed_snapshot.py).
_BLOCK = 1 << 20  # elements per block


def _row_blocks(dense: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if dense.numel() == 0:
        return ()
    return dense.split(max(1, _BLOCK // dense[0].numel()))


def _energy(dense: torch.Tensor) -> float:
    """||dense||_F^2, accumulated in float64."""
    total = torch.zeros((), dtype=torch.float64, device=dense.device)
    for block in _row_blocks(dense):
        total += torch.linalg.vector_norm(block, dtype=torch.float64) ** 2
    return float(total)


def _nonfinite(dense: torch.Tensor) -> int:
    """Number of NaN / Inf entries; a plain sum (no temporary) answers the common all-finite case."""
    if bool(torch.isfinite(dense.sum())):
        return 0
    total = torch.zeros((), dtype=torch.int64, device=dense.device)
    for block in _row_blocks(dense):
        total += (~torch.isfinite(block)).sum()
    return int(total)


def rng_keeper(model: nn.Module, options: RecordOptions) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """The randomized SVD (top-k spectra and factors of large matrices) draws from torch's global generators;
    fork them, so that recording never shifts the training loop's random stream (dropout, shuffling)."""
    if options.top_k is None and not options.factors_k and not options.intruder_k:
        return contextlib.nullcontext
    devices = {(p.device.type, p.device.index) for p in model.parameters() if p.device.type != "cpu"}
    device_type = next(iter(devices))[0] if devices else "cuda"
    indices = sorted(index for kind, index in devices if kind == device_type and index is not None)
    return lambda: torch.random.fork_rng(devices=indices, device_type=device_type)


def _measure(delta: torch.Tensor | LowRank, ref: MatrixRef, options: RecordOptions
             ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(singular values, U_k, V_k, dense delta or None) of one update; no spectrum when it is not finite."""
    k = options.factors_k
    full_rank = min(ref.out_features, ref.in_features)
    if isinstance(delta, LowRank):
        if not (torch.isfinite(delta.left).all() and torch.isfinite(delta.right).all()):
            return None, None, None, delta.dense()
        u, s, v = _lowrank_svd(delta)
        spectrum = torch.zeros(full_rank, dtype=s.dtype, device=s.device)
        spectrum[: s.shape[0]] = s[:full_rank]
        dense = delta.dense() if options.store_delta else None
        return spectrum, (u[:, :k] if k else None), (v[:, :k] if k else None), dense
    if _nonfinite(delta):
        return None, None, None, delta
    large = delta.numel() > options.top_k_min_size
    top_k = options.top_k if large else None
    spectrum = singular_values(delta, top_k)
    if not k:
        return spectrum, None, None, delta
    left, _, right = top_singular_triplets(delta, k, exact=not large)
    return spectrum, left, right, delta
