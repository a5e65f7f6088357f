"""The snapshot worker's Gram route on a CUDA device (``spectra_device="auto"``, the default, for matrices on CUDA).

Measured on an H200 (docs/benchmarks.md, "The CUDA check"): the float64 Gram product and cuSOLVER's ``syevd``
take 5.7 ms for a 512 x 2048 update and 26 ms for 2048 x 2048, where one host core takes 45 ms and 1.1 s; a
float64 SVD on the device is 5-13x slower than the Gram route, float32 ``svdvals`` 3.5-7x. So the worker, which
already holds the host copy of the update, sends it back to the device in blocks of rows and computes there, on a
CUDA stream of its own: training's stream never waits for it, and only the worker thread waits for its results.

The arithmetic is the host route's (:func:`lorascope.record.snapshot_worker.gram_measure`): the Gram matrix of the
smaller side accumulated in float64, its trace the exact energy, :math:`s_i = \\sqrt{\\max(\\lambda_i, 0)}`.
Device memory while it runs: one block of rows (float32 and float64, at most 48 MiB) and the n x n float64 Gram
matrix with its eigenvalue workspace (512 MiB and about as much again at n = 8,192).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import numpy as np
import torch

SPECTRA_DEVICES = ("auto", "host")
_BLOCK = 1 << 22  # entries of one uploaded block of rows


def spectra_devices(tensors: Sequence[dict[str, torch.Tensor]], option: str) -> list[torch.device | None]:
    """Per recorded matrix, the CUDA device its dense spectra are computed on (None: the host): ``"auto"`` takes
    the device of the matrix's first trainable tensor when it is a CUDA device; ``"host"`` always the host."""
    if option == "host":
        return [None] * len(tensors)
    devices: list[torch.device | None] = []
    for named in tensors:
        first = next(iter(named.values()), None)
        devices.append(first.device if first is not None and first.device.type == "cuda" else None)
    return devices


def device_gram_measure(delta: np.ndarray, device: torch.device, stream: torch.cuda.Stream | None = None
                        ) -> tuple[float, int, np.ndarray | None]:
    """(energy, non-finite entries, singular values or None) of a dense float32 host update, computed on
    ``device`` (on ``stream`` when given). A non-finite entry reaches the Gram diagonal: then the entries are
    counted on the host and no spectrum is computed."""
    rows, cols = delta.shape
    wide = rows < cols  # the Gram matrix of the smaller side: delta delta^T, summed over blocks of columns
    m, n = max(rows, cols), min(rows, cols)
    if n == 0:
        return 0.0, 0, np.zeros(0)
    per_block = max(1, _BLOCK // n)
    with torch.cuda.stream(stream):  # None: the current stream
        g = torch.zeros((n, n), dtype=torch.float64, device=device)
        for start in range(0, m, per_block):
            part = delta[:, start:start + per_block] if wide else delta[start:start + per_block]
            block = torch.from_numpy(np.ascontiguousarray(part)).to(device).double()
            if wide:
                g.addmm_(block, block.T)
            else:
                g.addmm_(block.T, block)
        diagonal = torch.diagonal(g)
        energy, finite = float(diagonal.sum()), bool(torch.isfinite(diagonal).all())
        if not finite:
            return energy, int(np.count_nonzero(~np.isfinite(delta))), None
        values = torch.linalg.eigvalsh(g).flip(0).clamp_min_(0.0).sqrt_()
        return energy, 0, values.cpu().numpy()


@functools.cache
def device_gram_flops_per_second(device: torch.device) -> float:
    """The device route's speed, measured once per device and process on a random 4,096 x 1,024 host update (the
    upload included), best of three, on the calling thread (the training thread, at the first snapshot decision;
    the route took 11 ms for a 4,096 x 1,024 update on an H200, on the device alone): what the time budget
    expects of a snapshot before one has been measured."""
    probe = np.random.default_rng(0).standard_normal((4096, 1024), dtype=np.float32)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        device_gram_measure(probe, device)
        best = min(best, time.perf_counter() - started)
    m, n = probe.shape
    return (m * n * n + 4.0 / 3.0 * n ** 3) / max(best, 1e-9)
