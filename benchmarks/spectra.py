"""Spectra of every matrix of a SmolLM2-135M-shaped model: lorascope's kernel against the usual ways, in one process.

The model is ``LlamaForCausalLM(LlamaConfig(...))`` with SmolLM2-135M's shapes (hidden 576, intermediate 1536,
30 layers, 9 heads, 3 KV heads, vocabulary 49152, tied embeddings) and random initial weights (no download).
Its matrices are the 2-D weights: q/k/v/o and gate/up/down of every layer, plus the embedding (211 matrices).

Methods, each over the same float32 matrices:

``lorascope``   ``lorascope.spectrum.singular_values_many(matrices)`` (method "auto": the float64 Gram route);
``lorascope-svd`` the same kernel with ``method="svd"`` (float64 LAPACK gesdd, same batching and worker threads):
                separates what the Gram route gains from what the threading gains;
``scipy-f64``   ``[scipy.linalg.svdvals(W.astype(float64)) for W in matrices]``: the bare LAPACK loop and the
                accuracy reference;
``torch-f32``   ``[torch.linalg.svdvals(W) for W in matrices]`` in float32;
``weightwatcher`` ``weightwatcher.WeightWatcher(model=model).analyze()`` when weightwatcher is importable: 212
                matrices, since it analyzes the tied ``lm_head`` again as a layer of its own (and it also fits power
                laws; its time is almost all scipy's float64 SVD);
``ww-same``     the same call with ``layers=[-id of lm_head]``: exactly the 211 matrices the others get. The
                speed-up "x vs ww" is taken against this one (same matrices), the conservative comparison.

Each method runs ``--repeats`` times in rotated order (so bursts of outside load hit all alike); the table gives
the best and the median wall time, speed-ups against weightwatcher and against the scipy loop (from the best
times), and the largest error of any singular value relative to its matrix's s_1 against the scipy float64
reference. The 1-minute load average is printed before and after: on a shared 2-core machine, numbers taken under
load are not comparable.

OpenBLAS: numpy / scipy pick their BLAS kernel by CPU type; OPENBLAS_CORETYPE in the environment overrides it.
The script records which kernel runs (threadpoolctl). To compare, run it twice::

    python benchmarks/spectra.py
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/spectra.py

Usage::

    python benchmarks/spectra.py                    # full model, 1 repeat (a few minutes with weightwatcher)
    python benchmarks/spectra.py --layers 4         # fewer layers
    python benchmarks/spectra.py --quick            # 2 layers, vocabulary 4096, no weightwatcher: seconds
    python benchmarks/spectra.py --json out.json    # also write every measurement as JSON
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy
import scipy.linalg
import torch

from lorascope.spectrum import singular_values_many

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)
TARGET_SPEEDUP_VS_WW = 6.0
TARGET_ERROR = 1e-6


def build_matrices(layers: int, vocab: int, seed: int) -> tuple[torch.nn.Module, list[tuple[str, torch.Tensor]]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers, "vocab_size": vocab})
    torch.manual_seed(seed)
    with torch.no_grad():
        model = LlamaForCausalLM(config).eval()
    named = [(name, p.detach()) for name, p in model.named_parameters() if p.ndim == 2]
    return model, named


def run_lorascope(matrices: list[torch.Tensor]) -> list[np.ndarray]:
    return singular_values_many(matrices)


def run_lorascope_svd(matrices: list[torch.Tensor]) -> list[np.ndarray]:
    return singular_values_many(matrices, method="svd")


def run_scipy(matrices: list[torch.Tensor]) -> list[np.ndarray]:
    return [scipy.linalg.svdvals(w.numpy().astype(np.float64)) for w in matrices]


def run_torch(matrices: list[torch.Tensor]) -> list[np.ndarray]:
    return [torch.linalg.svdvals(w).numpy().astype(np.float64) for w in matrices]


def run_weightwatcher(model: torch.nn.Module, *, skip_tied_head: bool = False) -> Any:
    import weightwatcher as ww

    kwargs: dict[str, Any] = {}
    if skip_tied_head:
        # weightwatcher numbers layers by their position in model.modules(); a negative id skips that layer.
        kwargs["layers"] = [-next(i for i, m in enumerate(model.modules()) if m is model.get_output_embeddings())]
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ww.WeightWatcher(model=model).analyze(**kwargs)


def weightwatcher_available() -> str | None:
    """weightwatcher's version, or None when it cannot be imported."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import weightwatcher
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    return str(getattr(weightwatcher, "__version__", "?"))


def max_error(result: list[np.ndarray], reference: list[np.ndarray]) -> float:
    worst = 0.0
    for s, ref in zip(result, reference, strict=True):
        if ref.size and ref[0] > 0:
            worst = max(worst, float(np.max(np.abs(np.asarray(s, dtype=np.float64) - ref)) / ref[0]))
    return worst


def blas_info() -> list[dict[str, Any]]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [{"note": "threadpoolctl not installed"}]
    keys = ("user_api", "internal_api", "prefix", "version", "architecture", "num_threads", "threading_layer")
    return [{k: d.get(k) for k in keys} for d in threadpool_info()]


def machine_info() -> dict[str, Any]:
    torch_config = torch.__config__.show()
    torch_blas = "MKL" if "BLAS_INFO=mkl" in torch_config else ("OpenBLAS" if "openblas" in torch_config else "?")
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_blas": torch_blas,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE"),
        "numpy_scipy_blas": blas_info(),
    }


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds, result)."""
    cpu, start = time.process_time(), time.perf_counter()
    out = fn()
    return time.perf_counter() - start, time.process_time() - cpu, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=SMOLLM2_135M["num_hidden_layers"], help="decoder layers (30)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (49152; 4096 with --quick)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each method (rotated order)")
    parser.add_argument("--quick", action="store_true", help="2 layers, vocabulary 4096, no weightwatcher")
    parser.add_argument("--no-weightwatcher", action="store_true", help="skip weightwatcher even if installed")
    parser.add_argument("--methods", default=None,
                        help="comma-separated subset of lorascope,lorascope-svd,scipy-f64,torch-f32,weightwatcher,"
                             "ww-same (scipy-f64, the reference, always runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write every measurement as JSON")
    args = parser.parse_args(argv)
    layers = 2 if args.quick and args.layers == SMOLLM2_135M["num_hidden_layers"] else args.layers
    vocab = args.vocab or (4096 if args.quick else SMOLLM2_135M["vocab_size"])
    torch.set_num_threads(2)

    machine = machine_info()
    ww_version = None if (args.quick or args.no_weightwatcher) else weightwatcher_available()
    model, named = build_matrices(layers, vocab, args.seed)
    matrices = [w for _, w in named]
    print(f"SmolLM2-135M-shaped Llama, {layers} layers, vocabulary {vocab}: {len(matrices)} matrices, "
          f"{sum(w.numel() for w in matrices) / 1e6:.1f} M entries (float32, random init)")
    print(f"torch {machine['torch']} ({machine['torch_blas']}, {machine['torch_threads']} threads), numpy "
          f"{machine['numpy']}, scipy {machine['scipy']}, {machine['cpu_count']} CPUs; OPENBLAS_CORETYPE="
          f"{machine['OPENBLAS_CORETYPE']} OPENBLAS_L2_SIZE={machine['OPENBLAS_L2_SIZE']}")
    for lib in machine["numpy_scipy_blas"]:
        if lib.get("user_api") == "blas":
            print(f"  numpy/scipy BLAS: {lib['prefix']} {lib['version']}, kernel {lib['architecture']}, "
                  f"{lib['num_threads']} threads")
    if ww_version is None and not (args.quick or args.no_weightwatcher):
        print("weightwatcher is not importable: its column is left out (pip install weightwatcher)")

    methods: dict[str, Callable[[], Any]] = {
        "lorascope": lambda: run_lorascope(matrices),
        "lorascope-svd": lambda: run_lorascope_svd(matrices),
        "scipy-f64": lambda: run_scipy(matrices),
        "torch-f32": lambda: run_torch(matrices),
    }
    if ww_version is not None:
        methods["weightwatcher"] = lambda: run_weightwatcher(model)
        methods["ww-same"] = lambda: run_weightwatcher(model, skip_tied_head=True)
    if args.methods:
        keep = set(args.methods.split(",")) | {"scipy-f64"}
        unknown = keep - set(methods) - {"weightwatcher", "ww-same"}
        if unknown:
            parser.error(f"unknown methods {sorted(unknown)}")
        methods = {name: fn for name, fn in methods.items() if name in keep}

    run_lorascope(matrices[:8])  # warm-up: thread pools, LAPACK workspaces, lazy imports
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {name: [] for name in methods}
    cpu_times: dict[str, list[float]] = {name: [] for name in methods}
    outputs: dict[str, Any] = {}
    names = list(methods)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            seconds, cpu_seconds, out = timed(methods[name])
            times[name].append(seconds)
            cpu_times[name].append(cpu_seconds)
            outputs[name] = out
            print(f"  [{r + 1}/{args.repeats}] {name}: {seconds:.2f} s (CPU {cpu_seconds:.2f} s, load "
                  f"{os.getloadavg()[0]:.2f})", flush=True)
    load_after = os.getloadavg()

    reference = outputs["scipy-f64"]
    best = {name: min(ts) for name, ts in times.items()}
    rows = []
    baseline_ww = "ww-same" if "ww-same" in best else ("weightwatcher" if "weightwatcher" in best else None)
    for name in methods:
        error = max_error(outputs[name], reference) if name not in ("weightwatcher", "ww-same") else None
        rows.append({
            "method": name,
            "matrices": len(outputs[name]),  # weightwatcher: rows of its table
            "best_s": best[name],
            "median_s": statistics.median(times[name]),
            "cpu_s_of_best": cpu_times[name][times[name].index(best[name])],
            "speedup_vs_weightwatcher": best[baseline_ww] / best[name] if baseline_ww else None,
            "speedup_vs_scipy": best["scipy-f64"] / best[name],
            "max_error_rel_s1": error,
        })

    print()
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}; {args.repeats} repeat(s)")
    header = f"{'method':<14} {'matrices':>8} {'best s':>8} {'median s':>9} {'CPU s':>7} {'x vs ww':>8} " \
             f"{'x vs scipy':>10} {'max err / s_1':>13}"
    print(header)
    print("-" * len(header))
    for row in rows:
        ww_ratio = "-" if row["speedup_vs_weightwatcher"] is None else f"{row['speedup_vs_weightwatcher']:.1f}"
        err = "-" if row["max_error_rel_s1"] is None else f"{row['max_error_rel_s1']:.1e}"
        print(f"{row['method']:<14} {row['matrices']:>8} {row['best_s']:>8.2f} {row['median_s']:>9.2f} "
              f"{row['cpu_s_of_best']:>7.2f} {ww_ratio:>8} {row['speedup_vs_scipy']:>10.1f} {err:>13}")
    ours = next((row for row in rows if row["method"] == "lorascope"), None)
    if ours is None:
        return 0
    verdict: dict[str, Any] = {"error_ok": ours["max_error_rel_s1"] <= TARGET_ERROR}
    if ours["speedup_vs_weightwatcher"] is not None:
        verdict["speedup_ok"] = ours["speedup_vs_weightwatcher"] >= TARGET_SPEEDUP_VS_WW
        print(f"target: >= {TARGET_SPEEDUP_VS_WW:.0f}x faster than weightwatcher ({baseline_ww}) with error <= "
              f"{TARGET_ERROR:.0e} s_1: "
              f"{ours['speedup_vs_weightwatcher']:.1f}x, {ours['max_error_rel_s1']:.1e} -> "
              f"{'met' if verdict['speedup_ok'] and verdict['error_ok'] else 'NOT met'}")
    else:
        print(f"error target <= {TARGET_ERROR:.0e} s_1: {ours['max_error_rel_s1']:.1e} -> "
              f"{'met' if verdict['error_ok'] else 'NOT met'} (no weightwatcher: speed target not measured)")

    if args.json:
        payload = {
            "argv": sys.argv, "layers": layers, "vocab": vocab, "repeats": args.repeats, "machine": machine,
            "weightwatcher": ww_version, "speedup_baseline": baseline_ww,
            "load_average_before": load_before, "load_average_after": load_after,
            "times_s": times, "cpu_times_s": cpu_times, "rows": rows, "verdict": verdict,
            "matrix_shapes": sorted({f"{tuple(w.shape)}" for w in matrices}),
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
