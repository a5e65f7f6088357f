"""Snapshot cost at real-model scale (issue 16, item 4): one transformer layer's matrices of Llama-3.2-1B,
Llama-3.1-8B and Llama-3.1-70B, on the CPU, with the snapshot worker's kernel.

For every distinct matrix shape of one layer (q, k, v, o, gate, up, down; embedding and head apart) the script
times, on a random float32 update of that shape:

- ``copy``: what the training thread does at a snapshot step, a host copy of the weight in its own dtype
  (``torch.empty(...).copy_(W)``, bf16 and float32), with torch's own threads;
- ``gram``: what the snapshot worker does, :func:`lorascope.record.snapshot_worker.gram_measure` (float64 Gram
  matrix accumulated over blocks of rows, then ``eigvalsh``), with BLAS limited to one thread (the worker's
  default ``snapshot_threads=1``), split into the Gram product and the eigenvalue solve. Timed as CPU seconds
  (``time.process_time``, best of ``--repeats``): on a shared machine that is the work itself, while the wall
  time (printed beside it) adds the wait for a core. Copies are timed in wall seconds.

Shapes whose smaller side is above ``--max-measured-n`` (default 4096: the 70B model's 8192 x 8192 and
8192 x 28672 matrices) are not run: their time is computed from the rates measured in the same run (Gram
product: seconds per m n^2 multiply-add of the largest measured shape; eigenvalues: the largest measured n scaled
by n^3), and the table says which numbers are measured and which computed. Memory per layer and per model is
exact arithmetic (W_0 in bf16 or float32, the host copies of one snapshot in the parameter dtype, the worker's
Gram workspace). Then, for a run of ``--run-steps`` steps with the default log schedule, the worker CPU time of
all its snapshots and the training time below which the default ``time_budget=0.05`` starts thinning them.

``--device cuda`` times the same shapes on a GPU instead, every one measured (the 70B model's and the 128256-row
embedding and head included): the device-to-host copy a snapshot step makes (into pinned memory, ``non_blocking``,
then a synchronize), the Gram route on the device (:func:`lorascope.spectrum.singular_values_many` of a CUDA
tensor: float64 Gram product and cuSOLVER's ``syevd``), the float64 SVD route on the device (smaller sides up to
``--max-svd-n``), and float32 ``torch.linalg.svdvals`` (the route of ``snapshot_worker=False``); wall seconds
after a ``torch.cuda.synchronize()``, best of ``--repeats`` after one warm-up call. The host worker's kernel is
timed beside them on the shapes whose smaller side is at most ``--host-max-n`` (one BLAS thread, as above).

Usage::

    python benchmarks/snapshot_scale.py                     # a few minutes on 2 cores
    python benchmarks/snapshot_scale.py --device cuda --json scale_cuda.json   # about a minute on one GPU
    python benchmarks/snapshot_scale.py --models 1b --quick
    python benchmarks/snapshot_scale.py --json scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lorascope.record.schedule import SnapshotSchedule
from lorascope.record.snapshot_worker import blas_threads, gram_measure, randomized_measure

_MIB, _GIB = 2**20, 2**30


@dataclass(frozen=True)
class Model:
    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    tied: bool

    def layer_matrices(self) -> list[tuple[str, int, int]]:
        """(role, out, in) of one decoder layer."""
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        h, i = self.hidden, self.intermediate
        return [("q", h, h), ("k", kv, h), ("v", kv, h), ("o", h, h), ("gate", i, h), ("up", i, h), ("down", h, i)]

    def other_matrices(self) -> list[tuple[str, int, int]]:
        out = [("embedding", self.vocab, self.hidden)]
        if not self.tied:
            out.append(("head", self.vocab, self.hidden))
        return out


MODELS = {
    "1b": Model("Llama-3.2-1B", 2048, 8192, 32, 8, 16, 128256, True),
    "8b": Model("Llama-3.1-8B", 4096, 14336, 32, 8, 32, 128256, False),
    "70b": Model("Llama-3.1-70B", 8192, 28672, 64, 8, 80, 128256, False),
}


def best_of(fn: Any, repeats: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of the call with the least CPU time. On a shared machine the CPU time is
    the work itself (the worker's BLAS runs on one thread, in the calling thread); the wall time adds the waiting
    for a core."""
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        sample = (time.perf_counter() - wall, time.process_time() - cpu)
        best = min(best, sample, key=lambda s: s[1])
    return best


def measure_shape(out: int, inp: int, repeats: int, rng: np.random.Generator) -> dict[str, float]:
    delta = rng.standard_normal((out, inp), dtype=np.float32)
    n = min(out, inp)
    gram = np.cov(rng.standard_normal((n, n + 8)))  # a symmetric positive definite n x n matrix
    with blas_threads(1):
        wall, total = best_of(lambda: gram_measure(delta), repeats)
        _, eig = best_of(lambda: np.linalg.eigvalsh(gram), repeats)
    weight = torch.from_numpy(delta)
    copies = {}
    for label, dtype in (("bf16", torch.bfloat16), ("float32", torch.float32)):
        source = weight.to(dtype)
        copies[label] = best_of(lambda s=source: torch.empty(s.shape, dtype=s.dtype).copy_(s), repeats)[0]
    return {"gram_s": total, "gram_wall_s": wall, "eig_s": eig, "product_s": max(total - eig, 0.0),
            "copy_bf16_s": copies["bf16"], "copy_float32_s": copies["float32"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="1b,8b,70b", help="comma-separated: 1b, 8b, 70b")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many calls per shape")
    parser.add_argument("--max-measured-n", type=int, default=4096,
                        help="shapes with a smaller side above this are computed from the measured rates")
    parser.add_argument("--run-steps", type=int, default=2000, help="steps of the typical run costed at the end")
    parser.add_argument("--quick", action="store_true", help="one repeat, smaller sides above 2048 computed")
    parser.add_argument("--top-k", type=int, default=0,
                        help="also time the worker's top-k route (top_k=K) on every shape, 70B's included")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cpu (default) or cuda: every shape timed on the GPU (see the module docstring)")
    parser.add_argument("--max-svd-n", type=int, default=2048,
                        help="with --device cuda: the SVD routes only on shapes with a smaller side up to this")
    parser.add_argument("--host-max-n", type=int, default=2048,
                        help="with --device cuda: the host worker's kernel only on shapes with smaller side up to this")
    parser.add_argument("--json", type=str)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.max_measured_n = 1, 2048
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("snapshot_scale --device cuda: no CUDA device here (torch.cuda.is_available() is False).")
            return 0
        return main_device(args, "cuda")
    rng = np.random.default_rng(0)
    load_before = os.getloadavg()[0]
    began = time.perf_counter()
    models = [MODELS[key.strip()] for key in args.models.split(",")]
    shapes = sorted({(o, i) for m in models for _, o, i in m.layer_matrices()}, key=lambda s: s[0] * s[1])
    measured: dict[tuple[int, int], dict[str, float]] = {}
    for out, inp in shapes:
        if min(out, inp) <= args.max_measured_n:
            measured[(out, inp)] = measure_shape(out, inp, args.repeats, rng)
            print(f"measured {out} x {inp}: {measured[(out, inp)]}", file=sys.stderr, flush=True)
    top_k = {}
    if args.top_k:
        for out, inp in shapes:
            delta = rng.standard_normal((out, inp), dtype=np.float32)
            with blas_threads(1):
                wall, cpu = best_of(lambda d=delta: randomized_measure(d, args.top_k, np.random.default_rng(0)),
                                    args.repeats)
            top_k[(out, inp)] = {"cpu_s": cpu, "wall_s": wall}
            print(f"top-{args.top_k} {out} x {inp}: {top_k[(out, inp)]}", file=sys.stderr, flush=True)
            del delta
    rates = fitted_rates(measured)
    report: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                              "load_before": load_before, "rates": rates, "models": {}}
    for model in models:
        report["models"][model.name] = cost_model(model, measured, rates, args.run_steps)
    if top_k:
        report["top_k"] = top_k_costs(models, top_k, args.top_k, args.run_steps)
    report["load_after"] = os.getloadavg()[0]
    report["elapsed_s"] = time.perf_counter() - began
    print_report(report, args)
    return write_json(report, args)


def write_json(report: dict[str, Any], args: argparse.Namespace) -> int:
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return 0


# -- --device cuda --------------------------------------------------------------------------------------------------
def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def device_seconds(fn: Any, repeats: int, device: str) -> float:
    """Best wall seconds of ``fn`` over ``repeats`` calls, each between two synchronizations of ``device``."""
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        began = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - began)
    return best


def measure_shape_device(out: int, inp: int, args: argparse.Namespace, device: str) -> dict[str, float]:
    from lorascope.spectrum import singular_values_many

    delta = torch.randn(out, inp, device=device, generator=torch.Generator(device=device).manual_seed(out + inp))
    n = min(out, inp)
    row = {"device_gram_s": device_seconds(lambda: singular_values_many([delta], method="gram"), args.repeats,
                                           device)}
    if n <= args.max_svd_n:
        row["device_svd_s"] = device_seconds(lambda: singular_values_many([delta], method="svd"), args.repeats,
                                             device)
        row["svdvals_float32_s"] = device_seconds(lambda: torch.linalg.svdvals(delta), args.repeats, device)
    for label, dtype in (("bf16", torch.bfloat16), ("float32", torch.float32)):
        source = delta.to(dtype)
        host = torch.empty(source.shape, dtype=dtype, pin_memory=device != "cpu")
        row[f"copy_{label}_s"] = device_seconds(lambda s=source, h=host: h.copy_(s, non_blocking=True), args.repeats,
                                                device)
    if n <= args.host_max_n:
        on_host = delta.cpu().numpy()
        with blas_threads(1):
            row["host_gram_s"] = best_of(lambda: gram_measure(on_host), args.repeats)[1]
    return row


def main_device(args: argparse.Namespace, device: str) -> int:
    """Every shape timed on ``device`` (``cuda``; ``cpu`` runs the same code, to check the script)."""
    from lorascope.spectrum import singular_values_many

    began = time.perf_counter()
    warm = torch.randn(64, 64, device=device)  # cuBLAS / cuSOLVER handles and workspaces, outside the timings
    for method in ("gram", "svd"):
        singular_values_many([warm], method=method)
    torch.linalg.svdvals(warm)
    models = [MODELS[key.strip()] for key in args.models.split(",")]
    shapes = sorted({(o, i) for m in models for _, o, i in m.layer_matrices() + m.other_matrices()},
                    key=lambda s: s[0] * s[1])
    measured = {}
    for out, inp in shapes:
        measured[(out, inp)] = measure_shape_device(out, inp, args, device)
        if device == "cuda":
            torch.cuda.empty_cache()
        print(f"measured {out} x {inp}: {measured[(out, inp)]}", file=sys.stderr, flush=True)
    snapshots = len(SnapshotSchedule.log(24, args.run_steps).planned(args.run_steps))
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    report: dict[str, Any] = {"device": name, "torch": torch.__version__,
                              "cpus": os.cpu_count(), "run_steps": args.run_steps, "run_snapshots": snapshots,
                              "shapes": {f"{o}x{i}": r for (o, i), r in measured.items()}, "models": {}}
    for model in models:
        matrices = [m for m in model.layer_matrices() for _ in range(model.layers)] + model.other_matrices()
        total = {key: sum(measured[(o, i)][key] for _, o, i in matrices)
                 for key in ("device_gram_s", "copy_bf16_s", "copy_float32_s")}
        report["models"][model.name] = {"matrices": len(matrices), **{f"snapshot_{k}": v for k, v in total.items()},
                                        "run_device_gram_s": snapshots * total["device_gram_s"]}
    report["elapsed_s"] = time.perf_counter() - began
    print_report_cuda(report, args)
    return write_json(report, args)


def print_report_cuda(report: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"lorascope snapshot scale on {report['device']} (torch {report['torch']}, {report['cpus']} CPUs; python "
          f"benchmarks/snapshot_scale.py {' '.join(sys.argv[1:])}); {report['elapsed_s']:.0f} s; wall seconds, "
          f"best of {args.repeats}; host worker: one BLAS thread, CPU seconds")
    print(f"  {'shape':>13}{'copy bf16':>11}{'copy fp32':>11}{'dev Gram':>11}{'dev SVD':>11}{'svdvals32':>11}"
          f"{'host Gram':>11}")

    def ms(row: dict[str, float], key: str) -> str:
        return f"{1e3 * row[key]:>8.1f} ms" if key in row else f"{'-':>11}"

    for shape, row in report["shapes"].items():
        print(f"  {shape:>13}" + "".join(ms(row, k) for k in ("copy_bf16_s", "copy_float32_s", "device_gram_s",
                                                              "device_svd_s", "svdvals_float32_s", "host_gram_s")))
    for name, m in report["models"].items():
        print(f"  {name}: one snapshot of its {m['matrices']} matrices (every layer's, embedding and head): "
              f"device Gram {m['snapshot_device_gram_s']:.2f} s, device-to-host copies {m['snapshot_copy_bf16_s']:.2f}"
              f" s in bf16 ({m['snapshot_copy_float32_s']:.2f} s in float32); a {report['run_steps']}-step run "
              f"({report['run_snapshots']} snapshots): device Gram {m['run_device_gram_s']:.0f} s")


def fitted_rates(measured: dict[tuple[int, int], dict[str, float]]) -> dict[str, float]:
    """Seconds per multiply-add of the Gram product (m n^2) and seconds per n^3 of the eigenvalue solve, from the
    largest measured shapes (where BLAS and LAPACK run at their steady rate)."""
    largest = max(measured, key=lambda s: max(s) * min(s) ** 2)
    m, n = max(largest), min(largest)
    biggest_n = max(measured, key=lambda s: min(s))
    nn = min(biggest_n)
    return {"product_s_per_madd": measured[largest]["product_s"] / (m * n * n),
            "eig_s_per_n3": measured[biggest_n]["eig_s"] / nn**3,
            "copy_s_per_byte": min(r["copy_float32_s"] / (4 * s[0] * s[1]) for s, r in measured.items()),
            "from_product": f"{largest[0]}x{largest[1]}", "from_eig": f"n={nn}"}


def shape_cost(out: int, inp: int, measured: dict, rates: dict) -> tuple[dict[str, float], bool]:
    if (out, inp) in measured:
        return measured[(out, inp)], True
    m, n = max(out, inp), min(out, inp)
    product = rates["product_s_per_madd"] * m * n * n
    eig = rates["eig_s_per_n3"] * n**3
    copy = rates["copy_s_per_byte"] * out * inp
    return {"gram_s": product + eig, "gram_wall_s": float("nan"), "eig_s": eig, "product_s": product,
            "copy_bf16_s": 2 * copy, "copy_float32_s": 4 * copy}, False


def cost_model(model: Model, measured: dict, rates: dict, run_steps: int) -> dict[str, Any]:
    rows = []
    for role, out, inp in model.layer_matrices():
        cost, was_measured = shape_cost(out, inp, measured, rates)
        rows.append({"role": role, "shape": f"{out}x{inp}", "measured": was_measured, **cost,
                     "gram_workspace_mib": (min(out, inp) ** 2 * 8 * 2) / _MIB})
    layer_gram = sum(r["gram_s"] for r in rows)
    layer_copy_bf16 = sum(r["copy_bf16_s"] for r in rows)
    others = []
    for role, out, inp in model.other_matrices():
        cost, _ = shape_cost(out, inp, {}, rates)  # always computed: the vocabulary side is 128256
        others.append({"role": role, "shape": f"{out}x{inp}", **cost})
    layer_entries = sum(o * i for _, o, i in model.layer_matrices())
    all_entries = layer_entries * model.layers + sum(o * i for _, o, i in model.other_matrices())
    snapshot_worker_s = layer_gram * model.layers + sum(o["gram_s"] for o in others)
    snapshot_copy_s = layer_copy_bf16 * model.layers + sum(o["copy_bf16_s"] for o in others)
    snapshots = len(SnapshotSchedule.log(24, run_steps).planned(run_steps))
    return {
        "layer": rows, "others": others,
        "layer_gram_s": layer_gram, "layer_copy_bf16_s": layer_copy_bf16,
        "recorded_entries": all_entries,
        "w0_bf16_gib": 2 * all_entries / _GIB, "w0_float32_gib": 4 * all_entries / _GIB,
        "snapshot_copy_bf16_gib": 2 * all_entries / _GIB,
        "largest_gram_workspace_mib": max(r["gram_workspace_mib"] for r in rows),
        "snapshot_worker_s": snapshot_worker_s, "snapshot_copy_s": snapshot_copy_s,
        "run_steps": run_steps, "run_snapshots": snapshots,
        "run_worker_s": snapshots * snapshot_worker_s,
        "budget_training_s": snapshots * (snapshot_worker_s + snapshot_copy_s) / 0.05,
    }


def top_k_costs(models: list[Model], measured: dict, k: int, run_steps: int) -> dict[str, Any]:
    """Per model: the top-k worker CPU of one layer (measured shapes) and of one snapshot (the vocabulary-sized
    matrices computed at the rate per m n (k + 10) of the largest measured shape)."""
    largest = max(measured, key=lambda s: s[0] * s[1])
    rate = measured[largest]["cpu_s"] / (largest[0] * largest[1] * (k + 10))
    snapshots = len(SnapshotSchedule.log(24, run_steps).planned(run_steps))
    out: dict[str, Any] = {"k": k, "rate_s_per_mnk": rate, "from": f"{largest[0]}x{largest[1]}", "models": {}}
    for model in models:
        rows = [{"role": role, "shape": f"{o}x{i}", **measured[(o, i)]} for role, o, i in model.layer_matrices()]
        layer = sum(r["cpu_s"] for r in rows)
        others = sum(rate * o * i * (k + 10) for _, o, i in model.other_matrices())
        snapshot = layer * model.layers + others
        out["models"][model.name] = {"layer": rows, "layer_cpu_s": layer, "others_cpu_s": others,
                                     "snapshot_cpu_s": snapshot, "run_cpu_s": snapshots * snapshot}
    return out


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    r = report["rates"]
    print(f"lorascope snapshot scale (python benchmarks/snapshot_scale.py {' '.join(sys.argv[1:])}); "
          f"{report['cpus']} CPUs, torch threads {report['torch_threads']} for the copies, worker BLAS 1 thread; "
          f"load average {report['load_before']:.1f} before, {report['load_after']:.1f} after; "
          f"{report['elapsed_s']:.0f} s")
    print(f"rates used for computed rows: Gram product {1e9 * r['product_s_per_madd']:.3f} s per 1e9 multiply-adds "
          f"(from {r['from_product']}), eigenvalues {1e9 * r['eig_s_per_n3']:.3f} s per 1e9 n^3 (from "
          f"{r['from_eig']}), copies {1e9 * r['copy_s_per_byte']:.3f} s per GB")
    for name, m in report["models"].items():
        print(f"\n{name}: one layer (M = measured, C = computed from the rates above)")
        print(f"  {'matrix':<10}{'shape':>13}{'':>3}{'copy bf16':>11}{'copy fp32':>11}{'Gram prod':>11}{'eigvalsh':>10}"
              f"{'worker CPU':>12}{'(wall)':>10}{'workspace':>11}")
        for row in m["layer"]:
            print(f"  {row['role']:<10}{row['shape']:>13}{'M' if row['measured'] else 'C':>3}"
                  f"{1e3 * row['copy_bf16_s']:>8.1f} ms{1e3 * row['copy_float32_s']:>8.1f} ms"
                  f"{row['product_s']:>9.2f} s{row['eig_s']:>8.2f} s{row['gram_s']:>10.2f} s"
                  f"{row['gram_wall_s']:>8.2f} s{row['gram_workspace_mib']:>7.0f} MiB")
        for row in m["others"]:
            print(f"  {row['role']:<10}{row['shape']:>13}{'C':>3}{1e3 * row['copy_bf16_s']:>8.1f} ms"
                  f"{1e3 * row['copy_float32_s']:>8.1f} ms{row['product_s']:>9.2f} s{row['eig_s']:>8.2f} s"
                  f"{row['gram_s']:>10.2f} s")
        print(f"  per layer: worker {m['layer_gram_s']:.1f} s, training-thread copies (bf16) "
              f"{1e3 * m['layer_copy_bf16_s']:.0f} ms")
        print(f"  whole model: {m['recorded_entries'] / 1e9:.2f} G recorded entries; W_0 {m['w0_bf16_gib']:.1f} GiB in "
              f"bf16, {m['w0_float32_gib']:.1f} GiB in float32; one snapshot's host copies (bf16) "
              f"{m['snapshot_copy_bf16_gib']:.1f} GiB; largest Gram workspace {m['largest_gram_workspace_mib']:.0f} "
              f"MiB")
        print(f"  one snapshot: worker {m['snapshot_worker_s'] / 60:.1f} min on one core, training thread "
              f"{m['snapshot_copy_s']:.1f} s of copies; a {m['run_steps']}-step run with the default schedule takes "
              f"{m['run_snapshots']} snapshots = {m['run_worker_s'] / 3600:.2f} core-hours of worker time, within the "
              f"default 5% budget only if training takes at least {m['budget_training_s'] / 3600:.1f} h")
    if "top_k" in report:
        tk = report["top_k"]
        print(f"\ntop_k={tk['k']} on the worker (randomized, measured per shape; embedding / head computed at "
              f"{1e9 * tk['rate_s_per_mnk']:.3f} s per 1e9 m n (k + 10), from {tk['from']}):")
        for name, m in tk["models"].items():
            shapes = ", ".join(f"{r['role']} {r['cpu_s']:.2f} s" for r in m["layer"])
            print(f"  {name}: {shapes}; per layer {m['layer_cpu_s']:.1f} s, embedding/head {m['others_cpu_s']:.1f} s,"
                  f" one snapshot {m['snapshot_cpu_s'] / 60:.1f} CPU-min, the {args.run_steps}-step run "
                  f"{m['run_cpu_s'] / 3600:.2f} core-h")


if __name__ == "__main__":
    sys.exit(main())
