"""The final snapshot after training (issue 16): does the snapshot worker finish it sooner with training's threads?

While training runs the worker keeps to ``snapshot_threads`` BLAS threads (default 1); once the recorder closes,
training is over and the snapshots still pending use as many threads as training did (``torch.get_num_threads()``)
where the load average shows those cores free. Run it beside busy processes to see why that condition matters.
This times :meth:`SnapshotWorker.compute` on one snapshot of SmolLM2-135M's 211 matrix shapes (random float32
updates: the time depends on the shapes) in both states, alternating, in one process: wall seconds, best and
median of ``--repeats``; the ratio is one thread over ``--threads``. It also prints the time budget's estimate of
one such snapshot before any is measured (:func:`~lorascope.record.snapshot_worker.snapshot_flops` at
:func:`~lorascope.record.snapshot_worker.gram_flops_per_second` with one thread), to set against the measurement.

Usage::

    python benchmarks/close_threads.py                # about a minute on 2 cores
    python benchmarks/close_threads.py --threads 2 --repeats 5 --json close.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from lorascope.model.taxonomy import MatrixRef
from lorascope.record import snapshot_worker as W

# SmolLM2-135M: 30 blocks of q, k, v, o, gate, up, down (out x in), and the 49,152 x 576 embedding.
BLOCK = [("q", 576, 576), ("k", 192, 576), ("v", 192, 576), ("o", 576, 576), ("gate", 1536, 576),
         ("up", 1536, 576), ("down", 576, 1536)]


def smollm2_refs(layers: int) -> list[MatrixRef]:
    refs = [MatrixRef(f"{layer}.{role}", f"{layer}.{role}", "weight", "mlp", role, layer, -1, out_features=m,
                      in_features=n) for layer in range(layers) for role, m, n in BLOCK]
    return refs + [MatrixRef("embed", "embed", "weight", "embedding", "", -1, -1, out_features=49152,
                             in_features=576)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="threads at close (training's; default 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    refs = smollm2_refs(args.layers)
    rng = np.random.default_rng(0)
    updates = [torch.from_numpy(rng.standard_normal((r.out_features, r.in_features), dtype=np.float32)) for r in refs]
    job = W.SnapshotJob(step=1, matrices=[], nbytes=0)
    times: dict[str, list[float]] = {"1 thread (while training)": [], f"{args.threads} threads (at close)": []}
    for _ in range(args.repeats):
        for name in times:
            worker = W.SnapshotWorker(refs, deliver=lambda s: None, missing=lambda *a: None, buffer_bytes=0, threads=1)
            if name.startswith(f"{args.threads} "):
                worker.threads_at_close = args.threads
                worker._closing.set()  # as after close(), without a thread to join
            job.matrices = [W.HostMatrix(dense=u) for u in updates]
            started = time.perf_counter()
            worker.compute(job)
            times[name].append(time.perf_counter() - started)
    one, many = times.values()
    estimate = W.snapshot_flops(refs) / W.gram_flops_per_second(1)
    print(f"{len(refs)} matrices (SmolLM2-135M's shapes), {args.repeats} repeats, alternating")
    print(f"  the budget's estimate before any snapshot is measured: {estimate:.2f} s (one thread)")
    for name, values in times.items():
        print(f"  {name}: best {min(values):.2f} s, median {statistics.median(values):.2f} s")
    print(f"  ratio (1 thread / {args.threads}, medians): {statistics.median(one) / statistics.median(many):.2f}")
    if args.json:
        args.json.write_text(json.dumps({"matrices": len(refs), "threads": args.threads, "seconds": times,
                                         "estimate_seconds": estimate}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
