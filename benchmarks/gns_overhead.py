"""Cost of the gradient-noise-scale inputs: exact per-example norms, and the accumulation estimator.

Part A, per-example norms (``lorascope.record.per_example.PerExampleNorms``): a transformers Llama trained on
CPU, one forward/backward/AdamW step per batch, with and without the norms attached (``pop()`` after every
backward, as the recorder does). Columns are the recorder's matrices (``classify(model)``, one per module), the
rest (the RMSNorms) goes to ``other``.

Part B, the accumulation estimator (``lorascope.record(model, path, optimizer=opt, gns=...)``) with 4 backward
passes per optimizer step: no recorder, a recorder with ``gns=None``, a recorder with ``gns="auto"``, and, when
the recorder offers it, ``gns="per_example"``. Recorders record per-step statistics only (``snapshots=[10**9]``:
no snapshot in the loop), so the difference between them is the noise-scale work.

Every configuration of a part has its own model (same initial weights), optimizer and data; in each of
``--rounds`` rounds they are advanced side by side in alternating blocks of ``--block`` steps (order rotated per
block), so bursts of outside load on a shared machine hit them alike. After unrecorded warm-up steps, each step
is timed; the table gives the median step time and, per round, the ratio of median step times against the
round's baseline (median over rounds, with the range).

Usage::

    python benchmarks/gns_overhead.py                  # full: 3 rounds x 40 steps, several minutes on 2 cores
    python benchmarks/gns_overhead.py --quick          # tiny smoke check, seconds
    python benchmarks/gns_overhead.py --json out.json  # also write every measurement as JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

TARGET = 1.5  # per-example norms: step time at most 1.5x plain training


@dataclasses.dataclass(frozen=True)
class Setup:
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    batch: int
    seq: int
    steps: int
    rounds: int
    warmup: int
    block: int
    accumulation: int = 4
    threads: int = 2
    seed: int = 0


FULL = dict(hidden=256, layers=4, intermediate=688, vocab=2048, heads=4, batch=8, seq=128, steps=40, rounds=3,
            warmup=3, block=5)
QUICK = dict(hidden=64, layers=2, intermediate=172, vocab=256, heads=4, batch=4, seq=32, steps=6, rounds=2,
             warmup=2, block=3)


def build(setup: Setup) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=setup.hidden, num_hidden_layers=setup.layers,
                         intermediate_size=setup.intermediate, vocab_size=setup.vocab,
                         num_attention_heads=setup.heads, num_key_value_heads=setup.heads,
                         max_position_embeddings=max(setup.seq, 16))
    torch.manual_seed(setup.seed)
    return LlamaForCausalLM(config).train()


def batches(setup: Setup, size: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(setup.seed + 1)
    return [torch.randint(0, setup.vocab, (size, setup.seq), generator=generator) for _ in range(8)]


class Run:
    """One configuration: its model, optimizer, data and instrumentation, stepped block by block."""

    def __init__(self, config: str, setup: Setup, workdir: Path) -> None:
        self.config, self.setup = config, setup
        self.model = build(setup)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.passes = setup.accumulation if config.startswith("accum") else 1
        self.data = batches(setup, setup.batch // self.passes)
        self.norms: Any = None
        self.recorder: Any = None
        self.step_s: list[float] = []
        if config == "per_example":
            from lorascope.model.taxonomy import classify
            from lorascope.record.per_example import PerExampleNorms

            targets = {ref.module: [i] for i, ref in enumerate(classify(self.model).matrices)}
            self.norms = PerExampleNorms(self.model, targets)
            self.norms.attach()
        elif config.startswith("accum:") and config != "accum:none":
            import lorascope

            gns = config.split(":", 1)[1]
            self.recorder = lorascope.record(self.model, workdir / f"{config.replace(':', '-')}.h5",
                                             optimizer=self.optimizer, snapshots=[10**9], overwrite=True,
                                             gns=None if gns == "None" else gns)
        for i in range(setup.warmup):
            self.step(i)
        self.step_s.clear()

    def step(self, i: int) -> None:
        t0 = time.perf_counter()
        for k in range(self.passes):
            batch = self.data[(i * self.passes + k) % len(self.data)]
            loss = self.model(input_ids=batch, labels=batch).loss / self.passes
            loss.backward()
            if self.norms is not None:
                self.norms.pop()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_s.append(time.perf_counter() - t0)

    def block(self, n: int) -> None:
        for _ in range(n):
            self.step(self.setup.warmup + len(self.step_s))

    def close(self) -> None:
        if self.norms is not None:
            self.norms.detach()
        if self.recorder is not None:
            self.recorder.close()


def timed_round(configs: list[str], setup: Setup, workdir: Path, round_index: int) -> dict[str, list[float]]:
    runs = [Run(config, setup, workdir) for config in configs]
    done, block_index = 0, 0
    while done < setup.steps:
        n = min(setup.block, setup.steps - done)
        shift = (round_index + block_index) % len(runs)
        for run in runs[shift:] + runs[:shift]:
            run.block(n)
        done, block_index = done + n, block_index + 1
    for run in runs:
        run.close()
    return {run.config: run.step_s for run in runs}


def accumulation_configs() -> tuple[list[str], str]:
    """Part B's configurations, and a note when the recorder does not offer them (yet)."""
    from lorascope.record import RecordOptions

    fields = {f.name for f in dataclasses.fields(RecordOptions)}
    if "gns" not in fields:
        return [], "skipped: lorascope.RecordOptions has no 'gns' field yet"
    configs = ["accum:none", "accum:None", "accum:auto"]
    import inspect

    from lorascope.record import core

    if "PerExampleNorms" in inspect.getsource(core):  # the recorder wires per-example norms
        configs.append("accum:per_example")
    return configs, ""


LABELS = {
    "plain": "plain backward (baseline)",
    "per_example": "per-example norms (PerExampleNorms)",
    "accum:none": "accumulation x4, no recorder (baseline)",
    "accum:None": "accumulation x4, record gns=None",
    "accum:auto": "accumulation x4, record gns='auto'",
    "accum:per_example": "accumulation x4, record gns='per_example'",
}


def summarize(rounds: list[dict[str, list[float]]], baseline: str) -> list[dict[str, Any]]:
    rows = []
    for config in rounds[0]:
        medians = [statistics.median(r[config]) for r in rounds]
        ratios = [statistics.median(r[config]) / statistics.median(r[baseline]) for r in rounds]
        rows.append({"config": config, "label": LABELS[config], "median_step_ms": 1e3 * statistics.median(medians),
                     "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)})
    return rows


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    print(f"| {'configuration':<44} | {'median step':>11} | {'ratio (range)':>20} |")
    print(f"|{'-' * 46}|{'-' * 13}|{'-' * 22}|")
    for row in rows:
        ratio = f"{row['ratio']:.3f} ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})"
        print(f"| {row['label']:<44} | {row['median_step_ms']:>8.1f} ms | {ratio:>20} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and few steps (smoke check)")
    parser.add_argument("--steps", type=int, help="timed optimizer steps per configuration and round")
    parser.add_argument("--rounds", type=int, help="rounds (fresh models and recorders each)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--json", type=Path, help="also write every measurement to this JSON file")
    args = parser.parse_args(argv)
    values = dict(QUICK if args.quick else FULL, threads=args.threads)
    if args.steps:
        values["steps"] = args.steps
    if args.rounds:
        values["rounds"] = args.rounds
    setup = Setup(**values)
    torch.set_num_threads(setup.threads)

    print(f"Llama hidden {setup.hidden}, {setup.layers} layers, vocab {setup.vocab}, batch {setup.batch} x seq "
          f"{setup.seq}; {setup.rounds} rounds x {setup.steps} steps (+{setup.warmup} warm-up), {setup.threads} "
          f"threads, torch {torch.__version__}, {platform.machine()}")
    accumulation, note = accumulation_configs()
    results: dict[str, Any] = {"setup": dataclasses.asdict(setup), "per_example": [], "accumulation": []}
    with tempfile.TemporaryDirectory(prefix="lorascope-gns-bench-") as tmp:
        for r in range(setup.rounds):
            results["per_example"].append(timed_round(["plain", "per_example"], setup, Path(tmp), r))
            if accumulation:
                results["accumulation"].append(timed_round(accumulation, setup, Path(tmp), r))
    rows_a = summarize(results["per_example"], "plain")
    print_table("A. exact per-example gradient norms, one backward per step", rows_a)
    ratio = rows_a[1]["ratio"]
    print(f"per-example norms: {ratio:.3f}x plain ({'within' if ratio <= TARGET else 'ABOVE'} the {TARGET}x target)")
    if accumulation:
        rows_b = summarize(results["accumulation"], "accum:none")
        print_table(f"B. accumulation estimator, {setup.accumulation} backward passes per step", rows_b)
        results["summary_accumulation"] = rows_b
    else:
        print(f"\nB. accumulation estimator: {note}")
    results["summary_per_example"] = rows_a
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
