"""Snapshot copies into reused buffers (issue 16): what the training thread pays per snapshot for its host copies.

At a snapshot step the training thread copies every recorded matrix to host memory
(:func:`lorascope.record.snapshot_worker.capture`). This times that copy of SmolLM2-135M's 211 matrices (the
shapes, random float32 weights, W_0 kept on the host as the recorder keeps it) two ways, alternating in one
process: into fresh host memory each time (the recorder before :mod:`lorascope.record.host_buffers`), and into
the buffers of the previous copy, given back as the worker gives them back once a snapshot is computed. Per way:
wall seconds and the calling thread's minor page faults per copy, best and median of ``--repeats``, and the ratio of
the medians. ``--load spin`` runs it beside two busy processes (as ``smollm2_trainer_overhead.py --load-kind
spin``), the state in which the recorder's loaded runs measured 1.2-1.8 s per snapshot on the training thread.

Usage::

    python benchmarks/host_copies.py --repeats 10 --json docs/benchmarks/host_copies.json
    python benchmarks/host_copies.py --repeats 10 --load spin --json docs/benchmarks/host_copies_spin.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from close_threads import smollm2_refs  # noqa: E402
from smollm2_trainer_overhead import start_load  # noqa: E402

from lorascope.record.host_buffers import HostBuffers  # noqa: E402
from lorascope.record.snapshot_worker import capture, host_copy_bytes, job_copies  # noqa: E402


def smollm2_shaped_model() -> tuple[nn.Module, list, list[torch.Tensor]]:
    """A module holding SmolLM2-135M's recorded matrices (random float32), their refs, and W_0 (host clones)."""
    refs = smollm2_refs(30)
    model = nn.Module()
    for ref in refs:
        *parents, leaf = ref.module.split(".")
        owner = model
        for name in parents:
            if not hasattr(owner, name):
                owner.add_module(name, nn.Module())
            owner = getattr(owner, name)
        owner.add_module(leaf, nn.Linear(ref.in_features, ref.out_features, bias=False))
    w0 = [model.get_submodule(ref.module).weight.detach().clone() for ref in refs]
    return model, refs, w0


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--load", choices=("none", "spin"), default="none")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model, refs, w0 = smollm2_shaped_model()
    nbytes = host_copy_bytes(refs, [{"weight": model.get_submodule(r.module).weight} for r in refs], False)
    buffers = HostBuffers()
    load = start_load("spin") if args.load == "spin" else []
    seconds: dict[str, list[float]] = {"fresh": [], "reused": []}
    faults: dict[str, list[int]] = {"fresh": [], "reused": []}
    try:
        for step in range(args.repeats + 1):  # the first round warms both ways and is not counted
            for way in seconds:
                before, started = minor_faults(), time.perf_counter()
                job = capture(refs, model, w0, step=step, nbytes=nbytes, buffers=buffers if way == "reused" else None)
                elapsed, faulted = time.perf_counter() - started, minor_faults() - before
                if way == "reused":
                    buffers.give_back(job_copies(job))
                del job
                if step:
                    seconds[way].append(round(elapsed, 4))
                    faults[way].append(faulted)
    finally:
        for process in load:
            process.kill()
    medians = {way: statistics.median(values) for way, values in seconds.items()}
    print(f"{len(refs)} matrices, {nbytes / 2**20:.0f} MiB per copy, {args.repeats} repeats, load {args.load}, "
          f"load average {os.getloadavg()[0]:.1f}")
    for way, values in seconds.items():
        print(f"  {way}: best {min(values):.3f} s, median {medians[way]:.3f} s, "
              f"minor page faults (median) {statistics.median(faults[way]):,.0f}")
    print(f"  fresh / reused (medians): {medians['fresh'] / medians['reused']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"matrices": len(refs), "copy_bytes": nbytes, "load": args.load,
                                         "load_average": os.getloadavg()[0], "seconds": seconds,
                                         "minor_faults": faults}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
