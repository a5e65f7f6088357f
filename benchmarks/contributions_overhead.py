"""Cost of ``contributions=True``: the record_overhead.py Llama trained on CPU, in one process, with the default
recorder and with contributions measured at every snapshot.

Configurations, each from the same initial weights on the same seeded random tokens, advanced side by side in
alternating blocks (order rotated per block) so that outside load hits them alike:

``baseline``        no recorder;
``snapshots``       the default recorder (log-spaced snapshots over ``--steps``);
``contributions``   the same with ``contributions=True`` (held batch: one training batch);
``layers``          the same with ``contributions="layers"``.

The table gives each configuration's loop time per step and its ratio to ``baseline`` and to ``snapshots`` (what
turning contributions on adds to a recording), median over rounds with the range. One measurement of the held
losses (:meth:`HeldLoss.measure`) is also timed directly, against one training step.

Usage::

    python benchmarks/contributions_overhead.py            # 150 steps x 2 rounds, a few minutes on 2 cores
    python benchmarks/contributions_overhead.py --quick    # smoke check, seconds
    python benchmarks/contributions_overhead.py --threads 1 --steps 100   # on a loaded machine: CPU-time ratios
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_overhead import FULL, QUICK, Setup, fresh_run, train_step  # noqa: E402

CONFIGS = ("baseline", "snapshots", "contributions", "layers")


def options(config: str, setup: Setup, held: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    if config == "baseline":
        return None
    base: dict[str, Any] = {"total_steps": setup.steps}
    if config == "contributions":
        base.update(contributions=True, held_batch=held)
    elif config == "layers":
        base.update(contributions="layers", held_batch=held)
    return base


def held_batch(batch: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": batch, "labels": batch}


def timed_round(setup: Setup, workdir: Path, index: int) -> dict[str, float]:
    import lorascope

    runs = []
    for config in CONFIGS:
        model, optimizer, batches = fresh_run(setup)
        opts = options(config, setup, held_batch(batches[0]))
        recorder = None if opts is None else lorascope.record(model, workdir / f"r{index}-{config}.h5",
                                                              optimizer=optimizer, **opts)
        runs.append({"config": config, "model": model, "optimizer": optimizer, "batches": batches,
                     "recorder": recorder, "loop_s": 0.0, "cpu_s": 0.0, "steps": 0, "snapshots": 0})
    done, block = 0, 0
    while done < setup.steps:
        n = min(setup.block, setup.steps - done)
        shift = (index + block) % len(runs)
        for run in runs[shift:] + runs[:shift]:
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(n):
                i = setup.warmup + run["steps"]
                train_step(run["model"], run["optimizer"], run["batches"][i % len(run["batches"])])
                run["steps"] += 1
            run["loop_s"] += time.perf_counter() - t0
            run["cpu_s"] += time.thread_time() - c0
        done, block = done + n, block + 1
    out = {}
    for run in runs:
        if run["recorder"] is not None:
            run["snapshots"] = len(run["recorder"].schedule.planned(setup.steps))
            run["recorder"].close()
        out[run["config"]] = run["loop_s"] / setup.steps
        out[f"{run['config']}_cpu"] = run["cpu_s"] / setup.steps
        out[f"{run['config']}_snapshots"] = run["snapshots"]
    return out


def one_measurement(setup: Setup, layers: bool) -> tuple[float, float]:
    """(CPU seconds of one HeldLoss.measure, of one training step) in this thread, medians of 5 (with one torch
    thread every op runs here, so outside load on the machine does not enter)."""
    from lorascope.model.taxonomy import classify
    from lorascope.record.contributions import HeldLoss
    from lorascope.record.snapshot import capture_initial

    model, optimizer, batches = fresh_run(setup)
    refs = classify(model).matrices
    w0 = [capture_initial(model, ref) for ref in refs]
    held = HeldLoss(model, refs, held_batch(batches[0]), None, layers=layers)
    measure, step = [], []
    for i in range(5):
        t0 = time.thread_time()
        held.measure(w0)
        measure.append(time.thread_time() - t0)
        t0 = time.thread_time()
        train_step(model, optimizer, batches[i % len(batches)])
        step.append(time.thread_time() - t0)
    return statistics.median(measure), statistics.median(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    fields = dict(QUICK if args.quick else FULL)
    fields["steps"] = args.steps or (fields["steps"] if args.quick else 150)
    fields["rounds"] = args.rounds or (fields["rounds"] if args.quick else 2)
    setup = Setup(**fields, threads=args.threads)
    torch.set_num_threads(setup.threads)
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(setup.rounds):
            rounds.append(timed_round(setup, Path(tmp), index))
    print(f"Llama hidden {setup.hidden}, {setup.layers} layers, batch {setup.batch} x {setup.seq}, "
          f"{setup.steps} steps x {setup.rounds} rounds, {setup.threads} torch threads")
    print(f"{'configuration':<16}{'snapshots':>10}{'step (ms)':>11}{'vs baseline':>20}{'vs snapshots':>20}")
    for clock, suffix in (("wall time", ""), ("training-thread CPU time (robust to outside load with 1 thread)",
                                              "_cpu")):
        print(f"-- {clock}")
        for config in CONFIGS:
            step = statistics.median(r[config + suffix] for r in rounds)
            vs_base = [r[config + suffix] / r["baseline" + suffix] for r in rounds]
            vs_snap = [r[config + suffix] / r["snapshots" + suffix] for r in rounds]
            print(f"{config:<16}{rounds[0][f'{config}_snapshots']:>10}{1e3 * step:>11.1f}"
                  f"{_ratio(vs_base):>20}{_ratio(vs_snap):>20}")
    for layers in (False, True):
        measure, step = one_measurement(setup, layers)
        print(f"one measurement ({'layers' if layers else 'kinds'}): {1e3 * measure:.1f} ms = "
              f"{measure / step:.2f} training steps ({1e3 * step:.1f} ms)")


def _ratio(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


if __name__ == "__main__":
    main()
