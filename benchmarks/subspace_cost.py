"""What the singular vectors of issue 18 cost a snapshot: ``factors_k=8`` (the update's top vectors) and
``intruder_k=10`` (the weight's top left vectors against W_0's, Shuttleworth et al. 2024), each relative to plain
spectra, on the snapshot worker and on the training thread, for Llama-like matrix shapes; and the host memory the
intruder basis keeps.

For every shape (out x in) one matrix is recorded: W_0 with a pretrained-like spectrum (s_i proportional to
i^-1/2, random singular vectors) and W_t = W_0 plus a random update of about 10% of its norm with a decaying
spectrum. Per configuration (plain, ``factors_k=8``, ``intruder_k=10``) the script times, in this one process:

- ``worker``: :meth:`SnapshotWorker.compute` on a fresh host copy (what the worker thread does per matrix), with
  BLAS limited to one thread (the default ``snapshot_threads=1``); the copy itself (training thread) is timed
  apart, it does not change with the options;
- ``thread``: :func:`lorascope.record.snapshot.take_snapshot` (what ``snapshot_worker=False`` does on the training
  thread), with torch and BLAS on ``--threads`` threads.

Times are CPU seconds of this process (``time.process_time``; best of ``--repeats``): on a shared machine that
is the work itself, the wall time (printed beside it) adds the wait for a core. Also timed once: the SVD of W_0
at the start (:func:`lorascope.record.subspace.initial_basis`). Memory is exact arithmetic on the arrays kept.

Usage::

    python benchmarks/subspace_cost.py                        # 576x576, 576x1536, 2048x2048, 2048x5632
    python benchmarks/subspace_cost.py --shapes 576x576 --repeats 1
    python benchmarks/subspace_cost.py --json subspace.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from lorascope.model.taxonomy import classify
from lorascope.record.options import RecordOptions
from lorascope.record.snapshot import capture_initial, take_snapshot
from lorascope.record.snapshot_worker import SnapshotWorker, blas_threads, capture, host_copy_bytes
from lorascope.record.subspace import initial_basis

_MIB = 2**20
CONFIGS = {"plain": {}, "factors_k=8": {"factors_k": 8}, "intruder_k=10": {"intruder_k": 10}}


class One(nn.Module):
    def __init__(self, out: int, inp: int) -> None:
        super().__init__()
        self.proj = nn.Linear(inp, out, bias=False)


def spectrum_matrix(out: int, inp: int, s: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = min(out, inp)
    left = np.linalg.qr(rng.standard_normal((out, n)))[0]
    right = np.linalg.qr(rng.standard_normal((inp, n)))[0]
    return (left * s[:n]) @ right.T


def weights(out: int, inp: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(W_0, W_t): a pretrained-like W_0 (s_i ~ i^-1/2, Frobenius norm ~ sqrt(out)) and W_0 plus an update of
    about 10% of that norm whose spectrum decays faster (s_i ~ i^-1)."""
    rng = np.random.default_rng(seed)
    n = min(out, inp)
    s0 = (1.0 + np.arange(n)) ** -0.5
    w0 = spectrum_matrix(out, inp, s0 * np.sqrt(out) / np.linalg.norm(s0), rng)
    s1 = 1.0 / (1.0 + np.arange(n))
    update = spectrum_matrix(out, inp, s1 * 0.1 * np.sqrt(out) / np.linalg.norm(s1), rng)
    return w0.astype(np.float32), (w0 + update).astype(np.float32)


def best(fn: Callable[[], Any], repeats: int, setup: Callable[[], Any] | None = None) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of the fastest of ``repeats`` calls (``setup`` runs untimed before each)."""
    cpu = wall = float("inf")
    for _ in range(repeats):
        arg = setup() if setup is not None else None
        c, w = time.process_time(), time.perf_counter()
        fn() if setup is None else fn(arg)  # type: ignore[call-arg]
        cpu, wall = min(cpu, time.process_time() - c), min(wall, time.perf_counter() - w)
    return cpu, wall


def measure(out: int, inp: int, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = One(out, inp)
    w0_np, wt_np = weights(out, inp, seed=out * 7 + inp)
    with torch.no_grad():
        model.proj.weight.copy_(torch.from_numpy(w0_np))
    refs = classify(model).matrices
    w0 = [capture_initial(model, ref) for ref in refs]
    started = time.process_time()
    bases = [initial_basis(model, ref, w0[0], keep_weight=False) for ref in refs]
    basis_cpu = time.process_time() - started
    with torch.no_grad():
        model.proj.weight.copy_(torch.from_numpy(wt_np))
    tensors = [{"weight": model.proj.weight}]
    nbytes = host_copy_bytes(refs, tensors, False)
    row: dict[str, Any] = {"shape": [out, inp], "entries": out * inp, "basis_svd_cpu_s": basis_cpu,
                           "basis_bytes": int(bases[0].x.nbytes), "w0_float32_bytes": int(w0_np.nbytes),
                           "host_copy_bytes": nbytes}
    row["capture_cpu_s"], row["capture_wall_s"] = best(
        lambda: capture(refs, model, w0, step=2, nbytes=nbytes), repeats)
    for label, changes in CONFIGS.items():
        options = RecordOptions(**changes)
        bases_now = bases if options.intruder_k else None
        worker = SnapshotWorker(refs, deliver=lambda s: None, missing=lambda s, r: None, buffer_bytes=nbytes,
                                threads=1, top_k=options.top_k, top_k_min_size=options.top_k_min_size,
                                factors_k=options.factors_k, intruder_k=options.intruder_k, bases=bases_now)

        def on_worker(job: Any, worker: SnapshotWorker = worker) -> None:
            with blas_threads(1):
                worker.compute(job)

        row[f"worker {label}"] = best(on_worker, repeats,  # a fresh copy each time: compute subtracts W_0 in place
                                      setup=lambda: capture(refs, model, w0, step=2, nbytes=nbytes))
        row[f"thread {label}"] = best(lambda o=options, b=bases_now: take_snapshot(
            refs, model, w0, options=o, step=2, bases=b), repeats)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="576x576,576x1536,2048x2048,2048x5632")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads of the training thread")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    print(f"# load average before: {os.getloadavg()[0]:.1f} (cores: {os.cpu_count()}); torch threads "
          f"{args.threads}; CPU seconds, best of {args.repeats}", flush=True)
    rows = []
    for out, inp in shapes:
        with blas_threads(args.threads):
            row = measure(out, inp, args.repeats)
        rows.append(row)
        print(f"\n{out} x {inp}: W_0 SVD at the start {row['basis_svd_cpu_s']:.3f} s; intruder basis "
              f"{row['basis_bytes'] / _MIB:.1f} MiB (W_0 float32 {row['w0_float32_bytes'] / _MIB:.1f} MiB); host copy "
              f"{row['capture_cpu_s'] * 1e3:.1f} ms CPU", flush=True)
        for where in ("worker", "thread"):
            plain = row[f"{where} plain"][0]
            cells = [f"{label} {row[f'{where} {label}'][0] * 1e3:8.1f} ms (x{row[f'{where} {label}'][0] / plain:5.2f}; "
                     f"wall {row[f'{where} {label}'][1] * 1e3:.0f} ms)" for label in CONFIGS]
            print(f"  {where:6s} " + " | ".join(cells), flush=True)
    print(f"\n# load average after: {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
