"""Host buffers for the snapshot copies, reused from one snapshot to the next.

A snapshot's host copies are the recorded matrices once more (SmolLM2-135M: 513 MiB in float32). Allocated afresh
at every snapshot, the training thread pays for the allocation as well as the copy: fresh host memory faults in
every page on first touch, and glibc hands blocks this large back to the system when they are freed, so every
snapshot pays again (docs/benchmarks.md, "Snapshot copies into reused buffers"). So the worker gives each
snapshot's buffers back once it has computed the snapshot, and the next snapshot's copies go into them.

The buffers kept are those of snapshots already computed, so the copies of pending snapshots and the buffers kept
together never exceed the most that was pending at once: the bound of ``snapshot_buffer_mib``. The difference is
that this memory stays allocated between snapshots (on CUDA, torch's pinned-memory allocator keeps its blocks
anyway) until the recorder closes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import torch

_Key = tuple[tuple[int, ...], torch.dtype]


class HostBuffers:
    """Host tensors for snapshot copies, taken by the training thread (:meth:`copy`) and given back by the worker
    thread once their snapshot is computed (:meth:`give_back`); safe to use from both."""

    def __init__(self) -> None:
        self._free: dict[_Key, list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.allocated = 0  # buffers allocated so far
        self.reused = 0  # copies that went into a buffer given back

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of ``tensor`` in its own dtype, into a buffer of its shape given back earlier when there is
        one; from CUDA into pinned memory, without waiting for the device."""
        cuda = tensor.device.type == "cuda"
        with self._lock:
            free = self._free.get((tuple(tensor.shape), tensor.dtype))
            host = free.pop() if free else None
        if host is None:
            host = torch.empty(tuple(tensor.shape), dtype=tensor.dtype, device="cpu", pin_memory=cuda)
            self.allocated += 1
        else:
            self.reused += 1
        host.copy_(tensor, non_blocking=cuda)
        return host

    def give_back(self, buffers: Iterable[torch.Tensor | None]) -> None:
        """Buffers of :meth:`copy` that nothing reads any more, for the next copies of their shape and dtype.

        Pinned or not is not part of the match: a recorder's matrix keeps its device, and where matrices on two
        devices share a shape and dtype, a copy from CUDA into pageable memory is merely synchronous."""
        with self._lock:
            for host in buffers:
                if host is not None:
                    self._free.setdefault((tuple(host.shape), host.dtype), []).append(host)

    @property
    def kept_bytes(self) -> int:
        """Host bytes held by buffers waiting to be reused."""
        with self._lock:
            return sum(t.numel() * t.element_size() for free in self._free.values() for t in free)

    def clear(self) -> None:
        """Drop every kept buffer (the recorder is closing)."""
        with self._lock:
            self._free.clear()
