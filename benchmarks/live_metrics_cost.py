"""What the live metrics (docs/recording.md, "Live metrics in your tracker") cost per snapshot.

For model shapes from tiny to 7B, one snapshot's spectra are made up (descending random singular values of the
right count), and three things are timed in this process: the snapshot scalars (``snapshot_scalars``: analyze's
``update_metrics`` + ``aggregate``, computed on the writer thread), the training thread's share
(``LiveMetrics.publish`` with the noise-scale inputs of the steps since the last snapshot), and as the baseline
the spectra those scalars come from (the singular values of every matrix, which the recorder computes
anyway: ``torch.linalg.svdvals`` on one thread; above 1,024 per side estimated from 1,024 by ``n^3``). Prints a table of
times and ratios to the baseline.

    python benchmarks/live_metrics_cost.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from lorascope.analysis.live import snapshot_scalars
from lorascope.model.taxonomy import MatrixRef
from lorascope.record.live_metrics import LiveMetrics
from lorascope.store.payloads import Snapshot

SHAPES = {  # name: (layers, hidden, intermediate)
    "tiny (2 x 32)": (2, 32, 48),
    "Llama 4 x 256": (4, 256, 688),
    "SmolLM2-135M": (30, 576, 1536),
    "Llama-7B": (32, 4096, 11008),
}


def _matrices(layers: int, hidden: int, intermediate: int) -> list[tuple[str, int, int]]:
    out = []
    for _ in range(layers):
        out += [("attention", hidden, hidden)] * 4
        out += [("mlp", intermediate, hidden), ("mlp", intermediate, hidden), ("mlp", hidden, intermediate)]
    return out


def _svd_seconds(shapes: list[tuple[str, int, int]]) -> float:
    """Seconds of ``torch.linalg.svdvals`` over every matrix (one thread), each distinct shape timed once; above
    1,024 per side timed at 1,024 on the longer side (same aspect) and scaled by n^3."""
    per_shape: dict[tuple[int, int], float] = {}
    for o, i in {(o, i) for _, o, i in shapes}:
        factor = min(1.0, 1024 / max(o, i))
        m = torch.randn(max(1, round(o * factor)), max(1, round(i * factor)))
        started = time.perf_counter()
        torch.linalg.svdvals(m)
        per_shape[(o, i)] = (time.perf_counter() - started) / factor**3
    return sum(per_shape[(o, i)] for _, o, i in shapes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help="steps of noise-scale inputs per publication")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    torch.set_num_threads(1)
    print(f"{'model':<16} {'matrices':>8} {'scalars (writer) s':>19} {'publish (training) s':>21} "
          f"{'spectra s':>10} {'scalars / spectra':>18}")
    for name, dims in SHAPES.items():
        shapes = _matrices(*dims)
        sv = [np.sort(rng.random(min(o, i)))[::-1].astype(np.float32) for _, o, i in shapes]
        energy = [float(np.sum(s.astype(np.float64) ** 2)) for s in sv]
        kinds, outs, ins = zip(*shapes)
        scalars = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            snapshot_scalars(energy, sv, outs, ins, kinds)
            scalars.append(time.perf_counter() - started)
        refs = [MatrixRef(name=f"m{j}", module=f"m{j}", parameter="weight", kind=k, role="", layer=-1, expert=-1,
                          out_features=o, in_features=i) for j, (k, o, i) in enumerate(shapes)]
        live = LiveMetrics(refs, lambda scalars, step: None)
        for step in range(1, args.steps + 1):
            norms = torch.rand(len(refs))
            live.on_step({"step": step, "gns_batch_small": 4.0, "gns_batch_big": 8.0, "batch_examples": 8,
                          "gns_sq_norm_small": norms * 2, "gns_sq_norm_big": norms})
        live.on_snapshot(Snapshot(step=args.steps, energy=energy, sv=sv))
        started = time.perf_counter()
        live.publish()
        publish = time.perf_counter() - started
        spectra = _svd_seconds(shapes)
        best = min(scalars)
        print(f"{name:<16} {len(shapes):>8} {best:>19.3f} {publish:>21.4f} {spectra:>10.2f} {best / spectra:>18.3f}")


if __name__ == "__main__":
    main()
