"""Real-data validation of lorascope's forecast (issue 13, item 3, "the second, cheaper setting").

A tiny byte-level Llama is pretrained on one real corpus (the docstrings of Python's standard library) and
fine-tuned on another (scikit-learn's dataset descriptions and numpy/scipy docstrings), at several dataset sizes N
(64-byte sequences): full fine-tuning and PEFT LoRA on every linear layer at several ranks (alpha 32, alpha / r),
the same epochs and batch, each at the better of a small learning-rate grid, every run recorded with
``lorascope.record``. Before any LoRA run, ``predictions.json`` holds lorascope's forecast of each rank's falloff,
read off the full fine-tuning recordings (``lorascope.analyze``: one forecast from all dataset sizes with the
fitted growth law, one per size), the size-only rule (``lorascope.recommend``) and the spectral signals. Then the
LoRA runs, and the measured falloff per rank: the dataset size where LoRA holds less than 90% of full fine-tuning's
loss reduction, on the training sequences and, separately, on held-out text. docs/realdata.md describes it.

    python examples/realdata/run.py --smoke         # seconds: the test suite's tier (numbers meaningless)
    python examples/realdata/run.py                 # the study: about 12 minutes, one process
    python examples/realdata/run.py -o DIR --force  # another output folder; --force writes into a non-empty one
    python examples/realdata/run.py --report docs/realdata/results.json   # the tables of docs/realdata.md

Writes into the output folder (default ``realdata-out/``): ``corpus.json``, ``base.pt``, ``runs/*.h5``,
``predictions.json`` (before the first LoRA run), ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "reproduce"))

import corpora  # noqa: E402
import repro_measure as measure  # noqa: E402  (crossing, verdict, spectral predictors: the facts study's)

HELD_FRACTION = measure.HELD_FRACTION  # 0.9


@dataclass(frozen=True)
class Tier:
    name: str
    hidden: int
    layers: int
    intermediate: int
    pretrain_steps: int
    pretrain_lr: float
    sizes: tuple[int, ...]
    ranks: tuple[int, ...]
    epochs: int
    min_steps: int
    batch_size: int
    full_lrs: tuple[float, ...]
    lora_lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    held_out: int


TIERS = {
    "default": Tier("default", hidden=64, layers=2, intermediate=128, pretrain_steps=800, pretrain_lr=3e-3,
                    sizes=(64, 256, 1024), ranks=(1, 4, 16, 64), epochs=5, min_steps=0, batch_size=16,
                    full_lrs=(1e-3, 3e-3), lora_lrs=(1e-3, 3e-3), seeds=(0, 1),
                    held_out=1024),
    "smoke": Tier("smoke", hidden=32, layers=1, intermediate=64, pretrain_steps=20, pretrain_lr=3e-3,
                  sizes=(32, 64), ranks=(1, 4), epochs=2, min_steps=8, batch_size=8, full_lrs=(3e-3,),
                  lora_lrs=(1e-2,), seeds=(0,), held_out=64),
}
LR_LADDER = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
"""Where a learning-rate grid is extended to when a condition's best learning rate sits at its edge."""
MAX_EXTENSIONS = 2  # per condition and side
OUTPUTS = ("corpus.json", "base.pt", "runs", "predictions.json", "results.json", "results.md")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="seconds: the test suite's tier (numbers meaningless)")
    parser.add_argument("-o", "--output", default="realdata-out", help="output folder (default: realdata-out)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    parser.add_argument("--report", metavar="RESULTS_JSON",
                        help="print the tables of a results.json (e.g. docs/realdata/results.json) and exit")
    parser.add_argument("--remeasure", metavar="DIR",
                        help="recompute results.json and results.md of a finished study from its run results and "
                             "predictions.json (no training)")
    args = parser.parse_args(argv)
    if args.report:
        print(markdown(json.loads(Path(args.report).read_text())), end="")
        return 0
    if args.remeasure:
        remeasure(Path(args.remeasure))
        return 0
    tier = TIERS["smoke" if args.smoke else "default"]
    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.force:
        print(f"error: {out} exists and is not empty; choose another folder with -o or pass --force", file=sys.stderr)
        return 2
    for name in OUTPUTS if args.force else ():
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    study(tier, out)
    return 0


# ---------------------------------------------------------------------------------------------------- training


def model_config(tier: Tier) -> Any:
    import transformers

    return transformers.LlamaConfig(hidden_size=tier.hidden, num_hidden_layers=tier.layers, num_attention_heads=4,
                                    num_key_value_heads=4, intermediate_size=tier.intermediate, vocab_size=256,
                                    max_position_embeddings=corpora.SEQ_LEN, tie_word_embeddings=False)


def load_base(tier: Tier, path: Path) -> Any:
    import torch
    import transformers

    model = transformers.LlamaForCausalLM(model_config(tier))
    model.load_state_dict(torch.load(path, weights_only=True))
    return model


def mean_loss(model: Any, ids: Any, batch: int = 256) -> float:
    """Mean next-byte loss (nats per predicted byte) of ``model`` on the sequences ``ids``, in eval mode."""
    import torch

    was = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            chunk = ids[i:i + batch]
            loss = model(input_ids=chunk, labels=chunk).loss
            total += float(loss) * chunk.numel()
            count += chunk.numel()
    model.train(was)
    return total / count


def pretrain(tier: Tier, text: Any, path: Path, *, seed: int = 0) -> dict[str, float]:
    """Pretrain every parameter on random 64-byte windows of corpus A (AdamW, linear warm-up then cosine)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(model_config(tier))
    optimizer = torch.optim.AdamW(model.parameters(), lr=tier.pretrain_lr, weight_decay=0.01)
    warm = max(1, tier.pretrain_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / tier.pretrain_steps))))
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(tier.pretrain_steps):
        starts = torch.randint(0, len(text) - corpora.SEQ_LEN, (32,), generator=g)
        ids = torch.stack([text[s:s + corpora.SEQ_LEN] for s in starts])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    torch.save(model.state_dict(), path)
    tail = losses[-max(1, len(losses) // 10):]
    return {"final_loss_nats": statistics.fmean(tail), "parameters": sum(p.numel() for p in model.parameters())}


@dataclass(frozen=True)
class RunSpec:
    target: str  # "full" or "all-linear"
    rank: int  # 0 for full
    examples: int
    lr: float
    seed: int

    @property
    def name(self) -> str:
        method = "full" if self.target == "full" else f"lora_r{self.rank}"
        return f"{method}_n{self.examples}_lr{self.lr:g}_s{self.seed}"


def epochs_for(tier: Tier, examples: int) -> int:
    """``tier.epochs`` passes, more for small datasets so that every run takes at least ``min_steps`` steps."""
    return max(tier.epochs, math.ceil(tier.min_steps / math.ceil(examples / tier.batch_size)))


def train_run(tier: Tier, spec: RunSpec, base: Path, pool: Any, held: Any, path: Path) -> dict[str, Any]:
    """Train and record one run; its final loss on its training sequences and on the held-out set."""
    import torch

    start = time.time()
    model = load_base(tier, base)
    ids = pool[:spec.examples]
    if spec.target == "full":
        trainable = list(model.parameters())
        trained = model
    else:
        import peft

        from lorascope.model.peft_config import make_lora_config, to_peft

        for p in model.parameters():
            p.requires_grad_(False)
        torch.manual_seed(1000 + spec.seed)  # LoRA's A initialization
        config = make_lora_config(model, target=spec.target, rank=spec.rank, alpha=32, task_type=None)
        trained = peft.get_peft_model(model, to_peft(config))
        trainable = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=spec.lr)
    epochs = epochs_for(tier, spec.examples)
    steps = epochs * math.ceil(spec.examples / tier.batch_size)
    order_generator = torch.Generator().manual_seed(spec.seed)  # same batches in the same order for every method
    trained.train()
    with lorascope_record()(trained, path, optimizer=optimizer, overwrite=True, total_steps=steps,
                            extra_config={"dataset": {"examples": spec.examples},
                                          "study": {**asdict(spec), "epochs": epochs,
                                                    "batch_size": tier.batch_size}}):
        for _ in range(epochs):
            order = torch.randperm(spec.examples, generator=order_generator)
            for first in range(0, spec.examples, tier.batch_size):
                batch = ids[order[first:first + tier.batch_size]]
                trained(input_ids=batch, labels=batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return {**asdict(spec), "name": spec.name, "path": str(path), "epochs": epochs, "steps": steps,
            "trainable_parameters": int(sum(p.numel() for p in trainable)),
            "train_loss": mean_loss(trained, ids), "held_loss": mean_loss(trained, held),
            "seconds": time.time() - start}


def lorascope_record() -> Any:
    import lorascope

    return lorascope.record


# ---------------------------------------------------------------------------------------------------- study


def study(tier: Tier, out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    start = time.time()

    def say(line: str) -> None:
        log(f"[{time.time() - start:6.0f} s] {line}")

    out.mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(exist_ok=True)

    # Phase 0: corpora and the pretrained base.
    a_docs, b_docs = corpora.corpus_a(), corpora.corpus_b()
    text_a = corpora.encode("\n\n".join(doc for _, doc in a_docs))
    pool, held = corpora.split_b(b_docs, tier.held_out)
    if len(pool) < max(tier.sizes):
        raise RuntimeError(f"corpus B has {len(pool)} training sequences, fewer than {max(tier.sizes)}")
    corpus = {"a": {"source": "docstrings of Python's standard library", "modules": len(corpora.STDLIB),
                    **corpora.summary(a_docs)},
              "b": {"source": "scikit-learn dataset descriptions + numpy/scipy docstrings",
                    "modules": list(corpora.SCIENTIFIC), **corpora.summary(b_docs),
                    "training_pool_sequences": len(pool), "held_out_sequences": len(held)},
              "sequence_bytes": corpora.SEQ_LEN}
    (out / "corpus.json").write_text(json.dumps(corpus, indent=2) + "\n")
    base_path = out / "base.pt"
    pretrained = pretrain(tier, text_a, base_path)
    base = load_base(tier, base_path)
    base_losses = {"held": mean_loss(base, held), "train": {n: mean_loss(base, pool[:n]) for n in tier.sizes},
                   "uniform": math.log(256)}
    say(f"base: {pretrained['parameters']:,} parameters pretrained on A for {tier.pretrain_steps} steps (loss "
        f"{pretrained['final_loss_nats']:.3f} nats/byte); on B held-out {base_losses['held']:.3f} (uniform "
        f"{math.log(256):.3f})")

    results: dict[str, dict[str, Any]] = {}

    def run_one(spec: RunSpec) -> dict[str, Any]:
        if spec.name not in results:
            r = train_run(tier, spec, base_path, pool, held, out / "runs" / f"{spec.name}.h5")
            results[spec.name] = r
            say(f"{spec.name}: train {r['train_loss']:.3f}, held-out {r['held_loss']:.3f} nats/byte "
                f"({r['steps']} steps, {r['seconds']:.1f} s)")
        return results[spec.name]

    def run_all(target: str, ranks: Sequence[int], grid: Sequence[float]) -> None:
        """Every condition at every learning rate of ``grid``, the grid extended along LR_LADDER (at most
        MAX_EXTENSIONS per side) while the best run by training or by held-out loss sits at an edge."""
        for s in tier.seeds:
            for n in tier.sizes:
                for r in ranks:
                    extend_grid(grid, lambda lr, r=r, n=n, s=s: run_one(RunSpec(target, r, n, lr, s)))

    # Phase 1: full fine-tuning at every N, learning rate and seed. No LoRA run exists yet.
    run_all("full", [0], tier.full_lrs)

    # Phase 2: predictions, from the full fine-tuning recordings only.
    predictions = predict(tier, out, base, results, say)

    # Phase 3: the LoRA runs.
    run_all("all-linear", tier.ranks, tier.lora_lrs)

    # Phase 4: measure and report.
    summary = measure_all(tier, results, base_losses, predictions)
    summary.update({"tier": asdict(tier), "corpus": corpus, "base": {**pretrained, "losses": base_losses},
                    "runtime_seconds": time.time() - start,
                    "runs": sorted((_public(r) for r in results.values()), key=lambda r: r["name"])})
    (out / "results.json").write_text(json.dumps(_jsonable(summary), indent=2, allow_nan=False) + "\n")
    (out / "results.md").write_text(markdown(summary))
    say(f"done: {out / 'results.md'} ({len(results)} runs, {summary['runtime_seconds']:.0f} s)")
    return summary


def extend_grid(grid: Sequence[float], train: Callable[[float], dict[str, Any]]) -> list[dict[str, Any]]:
    """``train`` at every learning rate of ``grid``, the grid then extended along LR_LADDER (at most
    MAX_EXTENSIONS per side) while the best run by training or by held-out loss sits at an edge; the runs, by
    learning rate."""
    runs = {lr: train(lr) for lr in sorted(grid)}
    added = {"low": 0, "high": 0}
    while len(runs) >= 2:
        lrs = sorted(runs)
        edges = {measure.lr_grid_edge(min(runs.values(), key=lambda x, by=by: (_finite(x[by]), x["lr"])), lrs)
                 for by in ("train_loss", "held_loss")} - {None}
        grow = [(e, lr) for e in sorted(edges) if added[e] < MAX_EXTENSIONS and (lr := _next_lr(lrs, e))]
        if not grow:
            break
        for e, lr in grow:
            added[e] += 1
            runs[lr] = train(lr)
    return [runs[lr] for lr in sorted(runs)]


def _next_lr(lrs: Sequence[float], edge: str) -> float | None:
    """The ladder's next learning rate below (edge "low") or above ("high") the grid ``lrs``, None past its end."""
    if edge == "low":
        below = [lr for lr in LR_LADDER if lr < min(lrs) * 0.99]
        return below[-1] if below else None
    above = [lr for lr in LR_LADDER if lr > max(lrs) * 1.01]
    return above[0] if above else None


def _edge(lr: float, grid: Sequence[float]) -> str | None:
    """"low" / "high" when ``lr`` is at an end of a grid of several that the ladder could still extend, "ladder
    end" when it is at the ladder's end, else None (bracketed)."""
    if len(grid) < 2 or min(grid) < lr < max(grid):
        return None
    side = "low" if lr == min(grid) else "high"
    return side if _next_lr(grid, side) else f"{side} (ladder end)"


def _runs_of(results: dict[str, dict], target: str, rank: int, n: int, seed: int) -> list[dict]:
    return [r for r in results.values()
            if (r["target"], r["rank"], r["examples"], r["seed"]) == (target, rank, n, seed)]


def _int_keys(x: Any) -> Any:
    """JSON's string keys back to ints where they are numbers (ranks, dataset sizes)."""
    if isinstance(x, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in x.items()}
    return x


def remeasure(out: Path) -> dict[str, Any]:
    """Measurement and report again from a finished study's ``results.json`` and ``predictions.json``."""
    old = json.loads((out / "results.json").read_text())
    predictions = _int_keys(json.loads((out / "predictions.json").read_text()))
    tier = Tier(**{k: tuple(v) if isinstance(v, list) else v for k, v in old["tier"].items()})
    results = {r["name"]: r for r in old["runs"]}
    summary = measure_all(tier, results, _int_keys(old["base"]["losses"]), predictions)
    summary.update({k: old[k] for k in ("tier", "corpus", "base", "runtime_seconds", "runs")})
    (out / "results.json").write_text(json.dumps(_jsonable(summary), indent=2, allow_nan=False) + "\n")
    (out / "results.md").write_text(markdown(summary))
    return summary


def _public(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k != "path"}


def best_full(tier: Tier, results: dict[str, dict], seed: int, by: str) -> dict[int, dict]:
    """Per N, the full fine-tuning run of ``seed`` with the lowest ``by`` loss over the learning-rate grid."""
    return {n: min(_runs_of(results, "full", 0, n, seed), key=lambda r: (_finite(r[by]), r["lr"])) for n in tier.sizes}


def _finite(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def predict(tier: Tier, out: Path, base: Any, results: dict[str, dict], say: Callable[[str], None]) -> dict:
    """Every predictor's falloff per rank, written to ``predictions.json`` before any LoRA run exists."""
    import lorascope

    lora_before = [r for r in results.values() if r["target"] != "full"]
    if lora_before or list((out / "runs").glob("lora_*.h5")):
        raise RuntimeError(f"{out} already holds LoRA runs: the predictions must come first; use a fresh folder")
    seed = tier.seeds[0]
    full = best_full(tier, results, seed, "train_loss")  # the probes: best training loss, as measured below
    forecasts: dict[str, Any] = {}
    all_sizes = lorascope.analyze([full[n]["path"] for n in tier.sizes], ranks=tier.ranks)
    forecasts["all sizes (growth law)"] = _forecast_rows(all_sizes.to_dict()["forecast"], tier.ranks)
    spectra = {}
    for n in tier.sizes:
        one = lorascope.analyze(full[n]["path"], ranks=tier.ranks).to_dict()
        forecasts[f"N={n} (linear)"] = _forecast_rows(one["forecast"], tier.ranks)
        spectra[n] = measure.linear_group(one["final"], tier.ranks)
    size_only = lorascope.recommend(base, examples=max(tier.sizes), ranks=tier.ranks, target="all-linear",
                                    tokens_per_example=corpora.SEQ_LEN - 1).to_dict()
    forecasts["size only (1 bit per token)"] = {
        p["rank"]: {"examples": p["runway_examples"], "lora_parameters": p["lora_parameters"],
                    "capacity_bits": p["capacity_bits"]} for p in size_only["predictions"]}
    for name, rows in forecasts.items():
        say(f"forecast ({name}): " + ", ".join(f"r{r}: {rows[r]['examples']:,.0f}" for r in tier.ranks))
    predictions = {
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "lora_runs_before": 0,
        "probes": {n: {"name": full[n]["name"], "lr": full[n]["lr"], "seed": seed} for n in tier.sizes},
        "forecast_all_sizes": all_sizes.to_dict()["forecast"],
        "information": forecasts,
        "spectral": measure.spectral_predictions(spectra, tier.ranks),
        "full_spectra": spectra,
    }
    (out / "predictions.json").write_text(json.dumps(_jsonable(predictions), indent=2, allow_nan=False) + "\n")
    say(f"predictions written to {out / 'predictions.json'}")
    return predictions


def _forecast_rows(forecast: dict[str, Any], ranks: Sequence[int]) -> dict[int, dict]:
    if "missing" in forecast:
        raise RuntimeError(f"no forecast: {forecast['missing']}")
    rows = {row["rank"]: row for row in forecast["rows"] if row["target"] == "all-linear"}
    return {r: {"examples": rows[r]["runway_examples"], "range": rows[r]["runway_range"],
                "lora_parameters": rows[r]["lora_parameters"], "capacity_bits": rows[r]["capacity_bits"],
                "bits_per_example": forecast["bits"]["bits_per_example"],
                "growth_exponent": forecast["growth"]["exponent"]} for r in ranks}


# ---------------------------------------------------------------------------------------------------- measure


def measure_all(tier: Tier, results: dict[str, dict], base_losses: dict[str, Any], predictions: dict) -> dict:
    """Held shares per rank and N (seed-averaged losses, learning rate tuned per condition and criterion), the
    measured falloffs, the ratios predicted / measured, the bits per example and the learning-rate table."""

    def best(target: str, rank: int, n: int, seed: int, by: str) -> dict:
        return min(_runs_of(results, target, rank, n, seed), key=lambda r: (_finite(r[by]), r["lr"]))

    criteria = {"train": "train_loss", "held": "held_loss"}
    held_share: dict[str, dict[int, dict[int, float]]] = {c: {r: {} for r in tier.ranks} for c in criteria}
    losses: dict[str, Any] = {c: {} for c in criteria}
    by_seed: dict[str, dict[int, dict[int, list[float]]]] = {c: {r: {} for r in tier.ranks} for c in criteria}
    lr_rows = []
    for c, by in criteria.items():
        for n in tier.sizes:
            start = base_losses["train"][n] if c == "train" else base_losses["held"]
            full = statistics.fmean(best("full", 0, n, s, by)[by] for s in tier.seeds)
            losses[c].setdefault(n, {})["full"] = full
            losses[c][n]["base"] = start
            for r in tier.ranks:
                lora = statistics.fmean(best("all-linear", r, n, s, by)[by] for s in tier.seeds)
                losses[c][n][f"r{r}"] = lora
                held_share[c][r][n] = (start - lora) / (start - full) if start - full > 0 else math.nan
                for s in tier.seeds:  # the same share per seed: the noise of the table
                    f, lo = best("full", 0, n, s, by)[by], best("all-linear", r, n, s, by)[by]
                    by_seed[c][r].setdefault(n, []).append((start - lo) / (start - f) if start - f > 0 else math.nan)
    for n in tier.sizes:
        for target, rank in [("full", 0)] + [("all-linear", r) for r in tier.ranks]:
            for s in tier.seeds:
                grid = sorted(r["lr"] for r in _runs_of(results, target, rank, n, s))
                for c, by in criteria.items():
                    b = best(target, rank, n, s, by)
                    lr_rows.append({"target": target, "rank": rank, "examples": n, "seed": s, "criterion": c,
                                    "grid": grid, "best_lr": b["lr"], "edge": _edge(b["lr"], grid)})
    falloff = {c: {r: measure.crossing({n: v for n, v in held_share[c][r].items() if math.isfinite(v)})
                   for r in tier.ranks} for c in criteria}
    predictors = {}
    for name, rows in predictions["information"].items():
        predictors[f"forecast: {name}"] = {c: {r: {"predicted": rows[r]["examples"],
                                                   **measure.verdict(rows[r]["examples"], falloff[c][r])}
                                               for r in tier.ranks} for c in criteria}
    for signal, rows in predictions["spectral"].items():
        predictors[f"spectral: {signal}"] = {c: {r: {"predicted": rows[r]["examples"], "status": rows[r]["status"],
                                                     **measure.verdict(rows[r]["examples"], falloff[c][r],
                                                                       rows[r]["status"])}
                                                 for r in tier.ranks} for c in criteria}
    bits = {n: {"bits_per_example": row["bits_per_example"]}
            for n, row in ((int(k.split("=")[1].split()[0]), v[tier.ranks[0]])
                           for k, v in predictions["information"].items() if k.startswith("N="))}
    growth = predictions["forecast_all_sizes"]["growth"]
    points = {int(n): b for n, b in growth["points"]}
    for n in bits:
        bits[n]["absorbed_bits"] = points.get(n)
    # Bits LoRA held at each N, in the forecast's units: its training-loss reduction over the N sequences.
    per_seq = (corpora.SEQ_LEN - 1) / math.log(2)
    reduction_bits = {n: {m: (losses["train"][n]["base"] - v) * per_seq * n for m, v in losses["train"][n].items()
                          if m != "base"} for n in tier.sizes}
    params = {r: predictions["information"]["all sizes (growth law)"][r]["lora_parameters"] for r in tier.ranks}
    # Bits per LoRA parameter: what each rank held (its training-loss reduction in bits over P(r)), and the kappa
    # that would have put the growth-law forecast exactly on each measured falloff (B(N_measured) / P(r)).
    held_per_parameter = {r: {n: reduction_bits[n][f"r{r}"] / params[r] for n in tier.sizes} for r in tier.ranks}
    law = predictions["forecast_all_sizes"]["growth"]

    def law_bits(n: float) -> float:
        return law["reference_bits"] * (n / law["reference_examples"]) ** law["exponent"]

    implied_kappa = {c: {r: (law_bits(falloff[c][r]["examples"]) / params[r]
                             if falloff[c][r]["status"] == "measured" else None) for r in tier.ranks}
                     for c in criteria}
    return {"held_fraction_level": HELD_FRACTION, "losses": losses, "held_share": held_share,
            "held_share_by_seed": by_seed, "falloff": falloff,
            "predictors": predictors, "bits_per_example": bits, "growth": growth,
            "training_loss_reduction_bits": reduction_bits, "lora_parameters": params,
            "held_bits_per_lora_parameter": held_per_parameter, "implied_kappa": implied_kappa,
            "kappa_default": predictions["forecast_all_sizes"]["constant"]["bits_per_parameter"],
            "learning_rates": lr_rows,
            "lr_edges": sum(1 for row in lr_rows if row["edge"]), "lr_cells": len(lr_rows)}


# ---------------------------------------------------------------------------------------------------- report


def _n(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return "n/a"
    return f"{x:,.0f}" if abs(x) >= 10 else f"{x:.3g}"


def _falloff(f: dict) -> str:
    if f["status"] == "none":  # no finite share at any N
        return "-"
    return {"measured": "{:,.0f}", "at_or_below": "<= {:,.0f}", "beyond": "> {:,.0f} (beyond the grid)"
            }[f["status"]].format(f["examples"])


def _cell(cell: dict) -> str:
    if cell.get("ratio") is not None:
        return f"{_n(cell['predicted'])} ({cell['ratio']:.2g}x)"
    mark = {True: "consistent", False: "wrong side", None: "?"}[cell.get("consistent")]
    return f"{_n(cell['predicted'])} ({mark})"


def markdown(s: dict[str, Any]) -> str:
    tier = s["tier"]
    ranks, sizes = tier["ranks"], tier["sizes"]
    lines = [f"# Real-data study ({tier['name']} tier)", "",
             f"Base: {s['base']['parameters']:,}-parameter byte-level Llama pretrained on {s['corpus']['a']['source']} "
             f"({s['corpus']['a']['bytes']:,} bytes) for {tier['pretrain_steps']} steps; fine-tuned on "
             f"{s['corpus']['b']['source']} ({s['corpus']['b']['training_pool_sequences']:,} training sequences "
             f"of {s['corpus']['sequence_bytes']} bytes, {s['corpus']['b']['held_out_sequences']:,} held out). "
             f"Base loss on B held-out {s['base']['losses']['held']:.3f} nats/byte (uniform "
             f"{s['base']['losses']['uniform']:.3f}). Seeds {', '.join(str(x) for x in tier['seeds'])}; "
             f"runtime {s['runtime_seconds']:.0f} s.",
             ""]
    for c, title in (("train", "training loss"), ("held", "held-out loss")):
        lines += [f"## Loss (nats/byte, {title}; seed mean, learning rate tuned per cell on this loss)", "",
                  "| N | base | full | " + " | ".join(f"r{r}" for r in ranks) + " |",
                  "|---|---|---|" + "---|" * len(ranks)]
        for n in sizes:
            row = s["losses"][c][str(n)] if str(n) in s["losses"][c] else s["losses"][c][n]
            lines.append(f"| {n} | {row['base']:.3f} | {row['full']:.3f} | "
                         + " | ".join(f"{row[f'r{r}']:.3f}" for r in ranks) + " |")
        lines += ["", f"Share of full fine-tuning's loss reduction LoRA holds ({title}):", "",
                  "| rank | " + " | ".join(f"N={n} (per seed)" for n in sizes) + " | falloff (< 90%) |",
                  "|---|" + "---|" * (len(sizes) + 1)]
        for r in ranks:
            shares = _get(s["held_share"][c], r)
            seeds = _get(s["held_share_by_seed"][c], r)
            lines.append(f"| {r} | " + " | ".join(
                f"{_get(shares, n):.2f} ({', '.join(f'{v:.2f}' for v in _get(seeds, n))})" for n in sizes)
                         + f" | {_falloff(_get(s['falloff'][c], r))} |")
        lines.append("")
    lines += ["## Predicted falloff (examples) vs measured: predicted (predicted / measured)", ""]
    for c, title in (("train", "training loss"), ("held", "held-out loss")):
        lines += [f"Measured on {title}:", "", "| predictor | " + " | ".join(f"r{r}" for r in ranks) + " |",
                  "|---|" + "---|" * len(ranks)]
        lines.append("| **measured** | " + " | ".join(_falloff(_get(s["falloff"][c], r)) for r in ranks) + " |")
        for name, cells in s["predictors"].items():
            lines.append(f"| {name} | " + " | ".join(_cell(_get(cells[c], r)) for r in ranks) + " |")
        lines.append("")
    lines += ["## Bits per example (the forecast's b) and growth", "",
              "| N | b (bits per additional example) | absorbed bits (growth-law point) |", "|---|---|---|"]
    for n in sizes:
        b = _get(s["bits_per_example"], n)
        lines.append(f"| {n} | {b['bits_per_example']:.2f} | {_n(b['absorbed_bits'])} |")
    lines += ["", "Bits per LoRA parameter each rank held (its training-loss reduction on its N sequences, in bits, "
              f"over P(r)); the forecast assumes kappa = {s['kappa_default']:.2f}:", "",
              "| rank | P(r) | " + " | ".join(f"N={n}" for n in sizes)
              + " | kappa that fits the measured falloff (train / held-out) |", "|---|---|" + "---|" * (len(sizes) + 1)]
    for r in ranks:
        held_pp = _get(s["held_bits_per_lora_parameter"], r)
        implied = [_get(s["implied_kappa"][c], r) for c in ("train", "held")]
        lines.append(f"| {r} | {_get(s['lora_parameters'], r):,} | "
                     + " | ".join(f"{_get(held_pp, n):.2f}" for n in sizes) + " | "
                     + " / ".join("-" if k is None else f"{k:.2f}" for k in implied) + " |")
    lines += ["", f"Fitted growth exponent g = {s['growth']['exponent']:.3f} ({s['growth']['source']}).", "",
              f"Learning rates: {s['lr_edges']} of {s['lr_cells']} (method, N, seed, criterion) cells have their "
              "best learning rate at an edge of the grid (see results.json `learning_rates`).", ""]
    return "\n".join(lines)


def _get(d: dict, key: Any) -> Any:
    return d[key] if key in d else d[str(key)]


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        return _jsonable(x.item())
    return x


if __name__ == "__main__":
    raise SystemExit(main())
