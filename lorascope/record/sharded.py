"""Recording under FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters are DTensors sharded on dim 0.

- **W_0** stays sharded: each rank keeps a float32 copy of its own shard of every recorded parameter (on the
  CPU by default, on the device with ``w0_device="device"``), so W_0 costs each rank 1/world of the recorded
  weights, and the update's shard ``Delta_r = W_t,r - W_0,r`` is formed locally without communication.
- **Snapshots** go one matrix at a time: every rank sends its shard of Delta to rank 0 (``gather``), rank 0
  measures the whole matrix (energy, spectrum, optional factors and full update) and writes it, the others go
  on to the next matrix. A fused-expert matrix lives whole on one rank (experts are the sharded dim), which
  sends it alone. Peak memory: one full float32 matrix on rank 0 (plus its SVD workspace), one shard elsewhere.
- **Gradient norms** come from the local shards of the gradients: each rank sums its shard's squares per
  matrix, and the per-step exchange adds them up; no gradient is ever gathered.

A PEFT LoRA layer's update is the merged ``scaling * B @ A``: its small factors are gathered whole to rank 0
(W_0 of a LoRA layer, usually zero, is kept there too) and measured in factored form, as in one process.
Parameters left out of ``fully_shard`` (plain tensors, replicated on every rank) are handled by rank 0 alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from lorascope.errors import InvalidOptionError
from lorascope.model.peft import active_adapters, is_plain_lora
from lorascope.model.taxonomy import MatrixRef
from lorascope.record.distributed import DistributedContext, is_dtensor
from lorascope.record.options import RecordOptions
from lorascope.record.snapshot import LowRank, SnapshotArrays, minus_initial, rng_keeper
from lorascope.store.payloads import Snapshot


@dataclass(frozen=True)
class ShardLayout:
    """Where one parameter's rows live: rank r holds rows ``[r * chunk, min((r + 1) * chunk, rows))`` of dim 0
    (``torch.chunk``, as FSDP2 shards), or every rank holds all of them (``replicated``)."""

    rows: int
    chunk: int
    offset: int
    local_rows: int
    replicated: bool = False

    def owner(self, row: int) -> int:
        """The rank holding global row ``row`` of dim 0."""
        return row // self.chunk


def layout_of(tensor: torch.Tensor, context: DistributedContext, name: str) -> ShardLayout:
    """The layout of a recorded parameter; raises for shardings the recorder cannot reassemble."""
    rows = int(tensor.shape[0]) if tensor.ndim else 1
    if not is_dtensor(tensor):
        return ShardLayout(rows, rows, 0, rows, replicated=True)
    dtensor = cast(Any, tensor)  # a DTensor: device_mesh, placements and to_local are not on torch.Tensor's type
    mesh, placements = dtensor.device_mesh, tuple(dtensor.placements)
    if mesh.ndim != 1 or mesh.size() != context.world_size or len(placements) != 1 \
            or not placements[0].is_shard(0):
        raise InvalidOptionError(
            f"lorascope records FSDP2 parameters sharded on dim 0 over all {context.world_size} ranks "
            f"(fully_shard on a 1-D mesh); {name} has placements {placements} on a mesh of shape "
            f"{tuple(mesh.shape)}. Record a data-parallel run of this model, or pass distributed=False")
    chunk = math.ceil(rows / context.world_size)
    offset = min(context.rank * chunk, rows)
    local_rows = int(dtensor.to_local().shape[0])
    if local_rows != max(0, min(chunk, rows - offset)):
        raise InvalidOptionError(f"{name}: local shard of {local_rows} rows on rank {context.rank}, expected the "
                                 f"torch.chunk layout of {rows} rows over {context.world_size} ranks")
    return ShardLayout(rows, chunk, offset, local_rows)


def check_options(options: RecordOptions, refs: Sequence[MatrixRef], model: torch.nn.Module) -> None:
    """Options that need full gradients or whole-model files, refused under FSDP2 with the reason."""
    refused = {
        "gns": (options.gns in ("accumulation", "per_example"),
                "the noise scale needs each backward pass's gradient, which FSDP2 reduce-scatters inside its own "
                "hooks; use gns='auto' (off under FSDP2) or None"),
        "grad_sv": (options.grad_sv, "gradient spectra would need every gradient gathered"),
        "intruder_k": (options.intruder_k > 0, "the starting weights' vectors would need every weight gathered"),
        "w0_dtype": (options.w0_dtype != "float32", "each rank keeps its W_0 shard in float32"),
        "resumable": (options.resumable is True or options.resume,
                      "the initial-weights file is not written from sharded weights"),
    }
    for name, (bad, why) in refused.items():
        if bad:
            raise InvalidOptionError(f"The '{name}' option of lorascope.record is not supported under FSDP2: {why}.")
    other_lora = [ref.name for ref in refs if ref.lora and not is_plain_lora(model.get_submodule(ref.module))]
    if other_lora:
        raise InvalidOptionError(f"lorascope records PEFT LoRA layers on Linear / Conv1D weights under FSDP2; "
                                 f"{other_lora[0]} is another kind (fused experts, embedding, convolution): train it "
                                 "with DDP, or leave it out with modules= / kinds=")


class ShardedRecording:
    """W_0 shards, local gradient norms and snapshot gathering for one recorder under FSDP2.

    Parameters
    ----------
    refs, tensors
        The recorder's matrices and, per matrix, ``{"weight": parameter}``.
    other
        The trainable parameters outside the recorded matrices (their gradient norm is one number).
    context
        The process group.
    """

    def __init__(self, refs: tuple[MatrixRef, ...], tensors: Sequence[dict[str, torch.Tensor]],
                 other: Sequence[torch.Tensor], context: DistributedContext) -> None:
        self.refs, self.context = refs, context
        self.tensors = [dict(named) for named in tensors]
        self.params = [None if ref.lora else named["weight"] for ref, named in zip(refs, self.tensors)]
        self.layouts = {id(t): layout_of(t, context, ref.name) for ref, named in zip(refs, self.tensors)
                        for t in named.values()}
        self.other = list(other)
        self.other_layouts = {id(p): layout_of(p, context, "a parameter") for p in self.other}
        self._w0: dict[int, torch.Tensor] = {}
        self._w0_lora: dict[int, LowRank | None] = {}  # rank 0: the merged update of each LoRA layer at start

    # -- W_0 --------------------------------------------------------------------------------------------------
    def capture_initial(self, model: torch.nn.Module, keep_on: str) -> None:
        """Keep each rank's float32 shard of every recorded parameter (rank 0 alone for replicated ones) and, on
        rank 0, each LoRA layer's merged update (gathered: a collective)."""
        for i, (ref, p) in enumerate(zip(self.refs, self.params)):
            if p is None:
                with torch.no_grad():
                    start = self._lora_update(model, ref)
                if start is not None and torch.any(start.left) and torch.any(start.right):
                    self._w0_lora[i] = start if keep_on == "device" else LowRank(start.left.cpu(), start.right.cpu())
                continue
            if id(p) in self._w0:
                continue  # split fused experts share one parameter
            layout = self.layouts[id(p)]
            if layout.replicated and not self.context.is_writer:
                continue
            local = _local(p).detach().float()
            self._w0[id(p)] = local.clone() if keep_on == "device" else local.to("cpu", copy=True)

    def initial_bytes(self) -> int:
        """Bytes this rank spends on W_0."""
        lora = sum(f.numel() * f.element_size() for w in self._w0_lora.values() if w is not None
                   for f in (w.left, w.right))
        return sum(t.numel() * t.element_size() for t in self._w0.values()) + lora

    # -- gradient norms ---------------------------------------------------------------------------------------
    def local_grad_norms(self) -> tuple[torch.Tensor, torch.Tensor | float]:
        """(M,) squared norms of this rank's part of each recorded gradient, and of the other parameters'.

        Summed over ranks they are the squared norms of the full gradients. A missing gradient is NaN.
        """
        n = len(self.refs)
        pieces: list[torch.Tensor] = []
        slots: list[int] = []
        missing: list[int] = []
        for i, ref in enumerate(self.refs):
            grads = [(t, t.grad) for t in self.tensors[i].values() if t.grad is not None]
            if not grads:
                missing.append(i)
                continue
            for t, grad in grads:  # a LoRA layer: |grad A|^2 + |grad B|^2 of its factors, as in one process
                piece = self._local_piece(ref, t, grad)
                if piece is not None:
                    pieces.append(piece)
                    slots.append(i)
        device = self.context.device
        sq = torch.zeros(n, dtype=torch.float64, device=device)
        if pieces:
            norms = torch._foreach_norm(pieces, 2, dtype=torch.float32)
            values = torch.stack([v.to(device) for v in norms]).double().square()
            values = torch.where(torch.isnan(values), torch.inf, values)  # a non-finite gradient, as in one process
            sq.index_add_(0, torch.tensor(slots, device=device), values)
        if missing:
            sq[torch.tensor(missing, device=device)] = float("nan")
        return sq, self._local_other_norm()

    def _local_other_norm(self) -> torch.Tensor | float:
        grads = []
        for p in self.other:
            if p.grad is None:
                continue
            if self.other_layouts[id(p)].replicated:
                if self.context.is_writer:
                    grads.append(p.grad)
            else:
                grads.append(_local(p.grad))
        grads = [g for g in grads if g.numel()]
        if not grads:
            return float("nan") if not self.other else 0.0
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        return torch.stack([v.to(self.context.device) for v in norms]).double().square().sum()

    def _local_piece(self, ref: MatrixRef, p: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor | None:
        """This rank's part of ``ref``'s matrix in ``tensor`` (a parameter-shaped DTensor or plain tensor)."""
        layout = self.layouts[id(p)]
        if layout.replicated:
            if not self.context.is_writer:
                return None
            return tensor if ref.lora else ref.matrix(tensor)
        local = _local(tensor)
        if ref.lora:
            return local
        if local.ndim == 3 and ref.expert >= 0:
            if layout.owner(ref.expert) != self.context.rank:
                return None
            return dataclasses.replace(ref, expert=ref.expert - layout.offset).matrix(local)
        return local  # a whole 2-D matrix (or a kernel) sharded by rows: its norm is that of the local rows

    # -- snapshots --------------------------------------------------------------------------------------------
    def snapshot(self, model: torch.nn.Module, options: RecordOptions, *, step: int, compute: bool
                 ) -> tuple[Snapshot | None, BaseException | None]:
        """Gather each matrix's update to rank 0 in turn; rank 0 measures it (when ``compute``) as the snapshot of
        optimizer step ``step``.

        Every rank must call this at the same step. Returns, on rank 0, the snapshot's host arrays (None when
        not computing or after an error) and the first error rank 0 met; a measuring error never stops the
        loop, so the other ranks' collectives always have their partner.
        """
        writer = self.context.is_writer
        arrays = SnapshotArrays(self.refs, options) if writer else None
        error: BaseException | None = None
        rng_kept = rng_keeper(model, options)
        for i, (ref, p) in enumerate(zip(self.refs, self.params)):
            with torch.no_grad():
                full = self._gather_update(ref, p) if p is not None else self._lora_delta(model, ref, i)
            if full is None or arrays is None or not compute or error is not None:
                continue
            try:
                with torch.no_grad(), rng_kept():
                    arrays.add(i, full)
            except Exception as exc:  # noqa: BLE001 - reported by the recorder after the loop
                error = exc
            del full
        if arrays is None or not compute or error is not None:
            return None, error
        return arrays.result(step), None

    def _gather_update(self, ref: MatrixRef, p: torch.Tensor) -> torch.Tensor | None:
        """The float32 update ``ref.matrix(W_t - W_0)`` on rank 0 (None elsewhere); a collective."""
        layout = self.layouts[id(p)]
        local = _local(p).detach()
        if layout.replicated:
            if not self.context.is_writer:
                return None
            return ref.matrix(local).float() - ref.matrix(self._w0[id(p)]).to(local.device)
        w0 = self._w0[id(p)]
        if local.ndim == 3 and ref.expert >= 0:
            return self._send_expert(ref, layout, local, w0)
        full = self._gather_rows(local.float() - w0.to(local.device), layout)
        return None if full is None else ref.matrix(full)

    def _gather_rows(self, local: torch.Tensor, layout: ShardLayout) -> torch.Tensor | None:
        """The whole tensor from its row shards, on rank 0 (None elsewhere); a collective."""
        context = self.context
        if layout.local_rows < layout.chunk:  # gather needs equal sizes: pad the short last shards
            local = torch.cat([local, local.new_zeros((layout.chunk - layout.local_rows, *local.shape[1:]))])
        if not context.is_writer:
            torch.distributed.gather(local, None, dst=0)
            return None
        full = local.new_empty((layout.chunk * context.world_size, *local.shape[1:]))
        torch.distributed.gather(local, list(full.chunk(context.world_size)), dst=0)
        return full[: layout.rows]

    def _gather_whole(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """A (small) parameter in float32 on rank 0, gathered from its shards; None elsewhere."""
        layout = self.layouts[id(tensor)]
        local = _local(tensor).detach().float()
        if layout.replicated:
            return local if self.context.is_writer else None
        return self._gather_rows(local, layout)

    def _lora_update(self, model: torch.nn.Module, ref: MatrixRef) -> LowRank | None:
        """The merged ``scaling * B @ A`` of a LoRA layer over its active adapters, as factors on rank 0."""
        layer = model.get_submodule(ref.module)
        # nn.Module's attributes type as Tensor | Module: the LoRA layer's parts, as PEFT defines them
        lora_a, lora_b = cast(torch.nn.ModuleDict, layer.lora_A), cast(torch.nn.ModuleDict, layer.lora_B)
        scaling = cast(dict[str, float], layer.scaling)
        lefts, rights = [], []
        for adapter in active_adapters(layer):
            b = self._gather_whole(cast(torch.Tensor, lora_b[adapter].weight))
            a = self._gather_whole(cast(torch.Tensor, lora_a[adapter].weight))
            if b is not None and a is not None:
                lefts.append(b * float(scaling[adapter]))
                rights.append(a)
        if not self.context.is_writer or not lefts:
            return None
        return LowRank(torch.cat(lefts, 1), torch.cat(rights, 0))

    def _lora_delta(self, model: torch.nn.Module, ref: MatrixRef, i: int) -> LowRank | None:
        now = self._lora_update(model, ref)
        return None if now is None else minus_initial(now, self._w0_lora.get(i))  # type: ignore[return-value]

    def _send_expert(self, ref: MatrixRef, layout: ShardLayout, local: torch.Tensor, w0: torch.Tensor
                     ) -> torch.Tensor | None:
        # One expert's matrix lives on one rank: point-to-point to rank 0, the other ranks skip it.
        owner, rank = layout.owner(ref.expert), self.context.rank
        delta = None
        if rank == owner:
            shifted = dataclasses.replace(ref, expert=ref.expert - layout.offset)
            delta = shifted.matrix(local).float() - shifted.matrix(w0).to(local.device)
            if owner == 0:
                return delta
            torch.distributed.send(delta.contiguous(), dst=0)
            return None
        if rank != 0:
            return None
        delta = torch.empty((ref.out_features, ref.in_features), dtype=torch.float32, device=local.device)
        torch.distributed.recv(delta, src=owner)
        return delta


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return cast(Any, tensor).to_local() if is_dtensor(tensor) else tensor  # DTensor.to_local: not on Tensor's type
