"""Issue 13's validation on a real pretrained model: does a rank-r LoRA of SmolLM2-135M fall off where lorascope says?

SmolLM2-135M-Instruct (:mod:`smollm2`) continues pretraining on the standard library's docstrings (the 64-token
sequences of :mod:`smollm2_recipe`: nested training sets of N = 64, 256 and 1,024 sequences, a held-out set of 64
sequences from documents never trained on, loss on every token but the first). Training is restricted to the last
block, for full fine-tuning and LoRA alike: the 29 frozen blocks run once over the data (their outputs are
cached), and a step costs only the trained block and the tied head. Every run: AdamW (weight decay 0), constant
learning rate, batch 16, 4 epochs, the same shuffled order for every method at a given N; recorded with
``lorascope.record``.

1. Full fine-tuning of the block at N = 64 and 256, each learning rate of its grid (the probes).
2. ``predictions.json``, written before any LoRA run (refused if one exists): analyze's forecast from the best
   probes (both sizes, the growth law; each size alone), the size-only rule of ``recommend``, and the spectral
   signals of full fine-tuning's updates.
3. PEFT LoRA on every linear matrix of the block (q, k, v, o, gate, up, down), ranks 1, 4, 16, alpha 32 (alpha / r),
   at every learning rate of its grid at N = 64 and 256; at N = 1,024 (full fine-tuning there is the reference, not a
   probe) each method runs only at the rate that was best on training loss at N = 256, to fit the CPU budget.
4. The measured falloff per rank: the N where LoRA holds less than 90% of full fine-tuning's loss reduction, on the
   training sequences and on the held-out set (learning rate tuned per condition and criterion), against each
   predictor.

Each finished run is written to ``runs.json`` at once, so an interrupted study resumes where it stopped; the report
(``results.json``) is written after every LoRA run (``"complete": false`` until the grid is done).

    python examples/realdata/smollm2_study.py                       # hours on 2 shared cores; -o DIR: another folder
    python examples/realdata/smollm2_study.py --report docs/realdata/smollm2_study.json   # copy the report there
    python examples/realdata/smollm2_study.py --tables docs/realdata/smollm2_study.json   # its tables, markdown
    python examples/realdata/smollm2_study.py --task sft --sizes 64,256 --grid-sizes 64 -o smollm2-sft-out  # SFT

``--steps S`` trains every run for the same S optimizer steps instead of 4 epochs (so a small N runs many epochs:
the regime where full fine-tuning memorises its set and a falloff can be reached at small N), evaluated once at the
end; ``--probe-sizes`` says which full fine-tuning runs the forecast reads, and ``--kappa CALIBRATION_JSON`` adds a
forecast with that measured kappa(P) to the predictions (still written before any LoRA run):

    python examples/realdata/smollm2_study.py --steps 64 --sizes 16,32,64,128,256 --probe-sizes 64,128 \\
        --grid-sizes 16,64 --kappa docs/realdata/smollm2_calibration_alllinear_load2.json -o smollm2-steps-out

``--seed S`` changes the batch order and LoRA's initialisation; ``--lrs FULL,LORA`` runs each method at one rate at
every N (no grid), for another seed of a study whose grids found the rates. The probes run at that rate too: where
it is not each probe's best, the forecast moves (the SFT second seed, docs/realdata_smollm2.md: 0.13x at rank 1).

A cell whose tuned LoRA run ended with a training loss above the base model's diverged: it is marked, and left out of
the falloff. ``--remeasure RESULTS_JSON`` rewrites a report's measured section from the report alone (its runs'
losses, base losses, predictions and loss tokens per example), after a change of that rule. A fresh SFT rerun draws
its pairs without memory addresses in the prompts (:func:`sft_pairs`), so not exactly the checked-in reports' draw.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "reproduce"))

import corpora  # noqa: E402
import repro_measure as measure  # noqa: E402
import smollm2  # noqa: E402
import smollm2_recipe as data  # noqa: E402  (the same sequences, split and cached frozen inputs)

import lorascope  # noqa: E402

SIZES, RANKS, EPOCHS, BATCH = (64, 256, 1024), (1, 4, 16), 4, data.BATCH
PROBE_SIZES = (64, 256)  # the forecast reads only these full runs: small slices, as a user would probe
GRID_SIZES = PROBE_SIZES  # sizes where every method runs its whole (widened) learning-rate grid
FULL_LRS, LORA_LRS = (3e-4, 1e-3), (1e-3, 3e-3, 1e-2)
START = {"full": FULL_LRS, "all-linear": LORA_LRS}
LR_LADDER = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
"""Where a grid is extended to while its best rate (on training or held-out loss) sits at an edge."""
MAX_EXTENSIONS = 2  # per condition and side
STEPS: int | None = None  # --steps: the same optimizer steps at every N instead of EPOCHS
SEED = 0  # --seed: the batch order and LoRA's initialisation (0: the studies' own)
KAPPA: Path | None = None  # --kappa: a calibration whose kappa(P) the predictions also use
ALPHA = 32
SFT_PROMPT_TOKENS, SFT_MIN_COMPLETION = 32, 16


@dataclass
class TaskData:
    """Cached inputs of the trained block and labels (-100: no loss) for the training pool and the held-out set."""

    states: torch.Tensor
    labels: torch.Tensor
    held_states: torch.Tensor
    held_labels: torch.Tensor
    info: dict[str, Any]

    def tokens_per_example(self, n: int) -> float:
        """Mean loss tokens per example of the first ``n`` training examples."""
        return float((self.labels[:n] != -100).sum()) / n


def continued_pretraining(base: Any, tokenizer: Any, cache: Path) -> TaskData:
    """Every token of 64-token docstring sequences is a loss token (but the first)."""
    data.EXAMPLES = max(SIZES)  # the first 256 sequences are smollm2_recipe's training set; the sets are nested
    ids, held_ids, info = data.split(corpora.corpus_a(), tokenizer)
    return TaskData(data.cached_inputs(base, ids, cache), data.labels_of(ids),
                    data.cached_inputs(base, held_ids, cache), data.labels_of(held_ids),
                    {**info, "task": "continued pretraining"})


def sft_pairs(tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """(prompt, completion) token ids: a function's qualified name and signature, then its docstring, for every
    documented callable of both corpora with a signature (the prompt at most 32 tokens, the pair cut to 64).

    A default's repr may hold a memory address (``timeout=<object object at 0x7f...>``), which differs from process
    to process; it is removed, so every process draws the same pairs. (The reports checked in before 2026-12-05 were
    built with the addresses: each study's runs in one process, one draw of 2,054 pairs; the LoRA-probe scripts'
    runs started from the same first batch, their step-1 losses equal to the study's.)"""
    import importlib
    import inspect
    import re
    import warnings

    pairs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, doc in corpora.corpus_a() + corpora.corpus_b():
            module, _, attr = name.rpartition(".")
            try:
                signature = re.sub(r" at 0x[0-9a-fA-F]+", "", str(inspect.signature(getattr(
                    importlib.import_module(module), attr))))
            except Exception:  # noqa: BLE001 - no signature (a module, a builtin): not a pair
                continue
            prompt = tokenizer(f"{name}{signature}\n", add_special_tokens=False).input_ids
            completion = tokenizer(f'"""{doc}"""\n', add_special_tokens=False).input_ids
            if len(prompt) <= SFT_PROMPT_TOKENS and len(prompt) + SFT_MIN_COMPLETION <= data.SEQ_LEN:
                pairs.append((prompt, completion[:data.SEQ_LEN - len(prompt)]))
    return pairs


def supervised(base: Any, tokenizer: Any, cache: Path) -> TaskData:
    """Signature -> docstring, loss on the completion only; right-padded to 64 tokens (a causal model's real tokens
    never see the padding after them, so the frozen blocks' outputs need no mask)."""
    import random

    pairs = sft_pairs(tokenizer)
    random.Random(0).shuffle(pairs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(pairs), data.SEQ_LEN), pad, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for i, (prompt, completion) in enumerate(pairs):
        whole = prompt + completion
        ids[i, :len(whole)] = torch.tensor(whole)
        labels[i, len(prompt):len(whole)] = torch.tensor(completion)
    held = slice(0, data.HELD)  # pairs never trained on
    train = slice(data.HELD, data.HELD + max(SIZES))
    if len(pairs) < data.HELD + max(SIZES):
        raise SystemExit(f"smollm2_study: {len(pairs)} signature -> docstring pairs, {data.HELD + max(SIZES)} needed")
    info = {"task": "SFT: qualified name and signature -> docstring, loss on the docstring", "pairs": len(pairs),
            "tokens_per_sequence": data.SEQ_LEN}
    return TaskData(data.cached_inputs(base, ids[train], cache), labels[train],
                    data.cached_inputs(base, ids[held], cache), labels[held], info)


DESCRIPTIONS = {
    "cpt": "the standard library's docstrings (corpora.corpus_a), SmolLM2's tokenizer, 64-token sequences, loss on "
           "every token but the first; nested training sets; held-out sequences from documents never trained on",
    "sft": "pairs from both corpora's documented callables: the qualified name and signature (at most 32 tokens) "
           "as the prompt, the docstring in triple quotes as the completion, cut to 64 tokens and right-padded; loss "
           "on the completion only; nested training sets; 64 held-out pairs never trained on"}


@dataclass(frozen=True)
class RunSpec:
    target: str  # "full" or "all-linear"
    rank: int  # 0 for full fine-tuning
    examples: int
    lr: float

    @property
    def name(self) -> str:
        method = "full" if self.target == "full" else f"lora_r{self.rank}"
        return f"{method}_n{self.examples}_lr{self.lr:g}"


def specs(target: str, rank: int, results: dict[str, dict], sizes: tuple[int, ...]) -> list[RunSpec]:
    """The runs of one method: its learning-rate grid at the sizes of :data:`GRID_SIZES`, extended along
    :data:`LR_LADDER` while the best rate on training or held-out loss sits at an edge; at a larger N only the
    rate that was best on training loss at the largest of them, to keep within the CPU budget (a probe size
    outside the grid sizes keeps the probes already run there)."""
    out = []
    tuned_at = max(n for n in GRID_SIZES if n in SIZES)
    for n in sizes:
        if n in GRID_SIZES:
            out += [RunSpec(target, rank, n, lr) for lr in grid_at(target, rank, n, results)]
            continue
        tuned = [r for r in results.values() if (r["target"], r["rank"], r["examples"]) == (target, rank, tuned_at)]
        if {r["lr"] for r in tuned} != set(grid_at(target, rank, tuned_at, results)):
            continue  # the grid below is not done yet
        out.append(RunSpec(target, rank, n, best(results, target, rank, tuned_at, "train_loss")["lr"]))
    return out


def grid_at(target: str, rank: int, n: int, results: dict[str, dict]) -> list[float]:
    """The starting grid, widened by one ladder step past each edge where the finished grid's best rate sits (on
    training or held-out loss), at most :data:`MAX_EXTENSIONS` steps per side."""
    start = sorted(START[target])
    if MAX_EXTENSIONS == 0:  # --lrs: the rates are given
        return start
    low, high = LR_LADDER.index(start[0]), LR_LADDER.index(start[-1])
    grid = start
    while True:
        runs = [r for r in results.values()
                if (r["target"], r["rank"], r["examples"]) == (target, rank, n) and r["lr"] in grid]
        if len(runs) < len(grid):
            return grid
        winners = {min(runs, key=lambda r: (_finite(r[by]), r["lr"]))["lr"] for by in ("train_loss", "held_loss")}
        i, j = LR_LADDER.index(grid[0]), LR_LADDER.index(grid[-1])
        wider = list(grid)
        if grid[0] in winners and i > 0 and low - i < MAX_EXTENSIONS:
            wider.insert(0, LR_LADDER[i - 1])
        if grid[-1] in winners and j + 1 < len(LR_LADDER) and j - high < MAX_EXTENSIONS:
            wider.append(LR_LADDER[j + 1])
        if wider == grid:
            return grid
        grid = wider


def trained_model(base: Any, spec: RunSpec) -> tuple[Any, list[torch.Tensor]]:
    """The last block as a model, fully trainable or wrapped in a PEFT LoRA of ``spec.rank``."""
    tail = smollm2.trainable_tail(base)
    if spec.target == "full":
        return tail, [p for p in tail.parameters() if p.requires_grad]
    import peft

    from lorascope.model.peft_config import make_lora_config, to_peft

    tail.requires_grad_(False)
    torch.manual_seed(1000 + SEED)  # LoRA's A initialisation, the same for every rank's first columns
    config = make_lora_config(tail, target=spec.target, rank=spec.rank, alpha=ALPHA, task_type=None)
    model = peft.get_peft_model(tail, to_peft(config))
    return model, [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def mean_loss(model: Any, states: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean loss per loss token (batches weighted by their loss tokens), in eval mode."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(labels), 32):
        batch = labels[start:start + 32]
        tokens = int((batch[:, 1:] != -100).sum())
        total += float(model(inputs_embeds=states[start:start + 32], labels=batch).loss) * tokens
        count += tokens
    model.train(was)
    return total / count


def train_run(base: Any, spec: RunSpec, task: TaskData, path: Path) -> dict[str, Any]:
    """Train and record one run; its loss on its own training sequences and on the held-out set after each epoch."""
    start = time.time()
    model, trainable = trained_model(base, spec)
    optimizer = torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=0.0)
    states, labels = task.states[:spec.examples], task.labels[:spec.examples]
    batches = math.ceil(spec.examples / BATCH)
    steps = STEPS or EPOCHS * batches
    epochs = steps / batches  # past the last whole epoch, the first batches of one more
    order = torch.Generator().manual_seed(SEED)  # the same batches in the same order for every method at this N
    mask = torch.ones(BATCH, data.SEQ_LEN, dtype=torch.long)
    train_curve, held_curve, step_seconds = [], [], []
    model.train()
    with lorascope.record(model, path, optimizer=optimizer, total_steps=steps, overwrite=True,
                          extra_config={"dataset": {"examples": spec.examples},
                                        "study": {**asdict(spec), "epochs": epochs, "batch_size": BATCH}}):
        for _ in range(math.ceil(epochs)):
            shuffled = torch.randperm(spec.examples, generator=order)
            for first in range(0, spec.examples, BATCH):
                if len(step_seconds) == steps:
                    break
                t = time.time()
                rows = shuffled[first:first + BATCH]
                loss = model(inputs_embeds=states[rows], attention_mask=mask[:len(rows)], labels=labels[rows]).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step_seconds.append(time.time() - t)
            if STEPS is None or len(step_seconds) == steps:  # a fixed step budget runs many epochs: the end only
                train_curve.append(mean_loss(model, states, labels))
                held_curve.append(mean_loss(model, task.held_states, task.held_labels))
    return {**asdict(spec), "name": spec.name, "path": str(path), "epochs": epochs, "steps": steps,
            "trainable_parameters": int(sum(p.numel() for p in trainable)),
            "train_loss": train_curve[-1], "held_loss": held_curve[-1],
            "train_loss_per_epoch": train_curve, "held_loss_per_epoch": held_curve,
            "median_step_seconds": sorted(step_seconds)[len(step_seconds) // 2], "seconds": time.time() - start}


def _finite(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def best(results: dict[str, dict], target: str, rank: int, n: int, by: str) -> dict[str, Any]:
    runs = [r for r in results.values() if (r["target"], r["rank"], r["examples"]) == (target, rank, n)]
    return min(runs, key=lambda r: (_finite(r[by]), r["lr"]))


def predict(out: Path, base: Any, task: TaskData, results: dict[str, dict], say: Any) -> dict[str, Any]:
    """Every predictor's falloff per rank, written to ``predictions.json`` before any LoRA run exists."""
    smaller_study = _module("realdata_run", HERE / "run.py")  # the cheaper setting's forecast reader
    if any(r["target"] != "full" for r in results.values()) or list((out / "runs").glob("lora_*.h5")):
        raise SystemExit(f"smollm2_study: {out} already holds LoRA runs; the predictions must come first")
    probes = {n: best(results, "full", 0, n, "train_loss") for n in PROBE_SIZES}
    forecasts: dict[str, Any] = {}
    both = lorascope.analyze([probes[n]["path"] for n in PROBE_SIZES], ranks=RANKS).to_dict()
    forecasts["all sizes (growth law)"] = smaller_study._forecast_rows(both["forecast"], RANKS)
    spectra = {}
    if KAPPA is not None:
        from lorascope.analysis.capacity import CapacityConstant

        constant = CapacityConstant.from_calibration(lorascope.load_calibration(KAPPA))
        measured_kappa = lorascope.analyze([probes[n]["path"] for n in PROBE_SIZES], ranks=RANKS,
                                           constant=constant).to_dict()
        forecasts["all sizes (growth law), measured kappa(P)"] = smaller_study._forecast_rows(
            measured_kappa["forecast"], RANKS)
    for n in PROBE_SIZES:
        one = lorascope.analyze(probes[n]["path"], ranks=RANKS).to_dict()
        forecasts[f"N={n} (linear)"] = smaller_study._forecast_rows(one["forecast"], RANKS)
        spectra[n] = measure.linear_group(one["final"], RANKS)
    size_only = lorascope.recommend(smollm2.trainable_tail(base), examples=max(SIZES), ranks=RANKS,
                                    target="all-linear", tokens_per_example=task.tokens_per_example(max(SIZES))
                                    ).to_dict()
    forecasts["size only (1 bit per token)"] = {
        p["rank"]: {"examples": p["runway_examples"], "lora_parameters": p["lora_parameters"],
                    "capacity_bits": p["capacity_bits"]} for p in size_only["predictions"]}
    for name, rows in forecasts.items():
        say(f"forecast ({name}): " + ", ".join(f"r{r}: {rows[r]['examples']:,.0f}" for r in RANKS))
    predictions = {
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "lora_runs_before": 0,
        "probes": {n: {"name": probes[n]["name"], "lr": probes[n]["lr"]} for n in PROBE_SIZES},
        "kappa_calibration": None if KAPPA is None else str(KAPPA),
        "forecast_all_sizes": both["forecast"],
        "information": forecasts,
        "spectral": measure.spectral_predictions(spectra, RANKS),
        "full_spectra": spectra,
    }
    (out / "predictions.json").write_text(json.dumps(_jsonable(predictions), indent=1, allow_nan=False) + "\n")
    say(f"predictions written to {out / 'predictions.json'}")
    return predictions


def measured(results: dict[str, dict], task: TaskData, base_losses: dict[str, Any], predictions: dict[str, Any]
             ) -> dict[str, Any]:
    """Held shares per rank and N (learning rate tuned per condition and criterion), the falloffs, and each
    predictor against them. A rank with a missing run at some N is left out of that N; so is a cell whose tuned
    LoRA run diverged (its training loss ended above the base model's: training made it worse, which says nothing
    of the rank's capacity), listed under ``diverged``."""
    criteria = {"train": "train_loss", "held": "held_loss"}
    done = {(r["target"], r["rank"], r["examples"]) for r in results.values()}
    sizes = [n for n in SIZES if ("full", 0, n) in done]
    share: dict[str, dict[int, dict[int, float]]] = {c: {r: {} for r in RANKS} for c in criteria}
    losses: dict[str, dict[int, dict[str, float]]] = {c: {} for c in criteria}
    diverged: dict[str, dict[int, list[int]]] = {c: {r: [] for r in RANKS} for c in criteria}
    best_lr: list[dict[str, Any]] = []
    def grid(target: str, rank: int, n: int) -> list[float]:
        return sorted(x["lr"] for x in results.values() if (x["target"], x["rank"], x["examples"]) == (target, rank, n))

    for c, by in criteria.items():
        for n in sizes:
            start = base_losses["train"][n] if c == "train" else base_losses["held"]
            full = best(results, "full", 0, n, by)
            losses[c][n] = {"base": start, "full": full[by]}
            best_lr.append({"criterion": c, "target": "full", "rank": 0, "examples": n, "lr": full["lr"],
                            "grid": grid("full", 0, n), "edge": _edge(full["lr"], grid("full", 0, n))})
            for r in RANKS:
                if ("all-linear", r, n) not in done:
                    continue
                lora = best(results, "all-linear", r, n, by)
                losses[c][n][f"r{r}"] = lora[by]
                share[c][r][n] = (start - lora[by]) / (start - full[by]) if start > full[by] else math.nan
                if lora["train_loss"] > base_losses["train"][n]:
                    diverged[c][r].append(n)
                best_lr.append({"criterion": c, "target": "all-linear", "rank": r, "examples": n, "lr": lora["lr"],
                                "grid": grid("all-linear", r, n), "edge": _edge(lora["lr"], grid("all-linear", r, n))})
    falloff = {c: {r: measure.crossing({n: v for n, v in share[c][r].items()
                                        if math.isfinite(v) and n not in diverged[c][r]}) for r in RANKS}
               for c in criteria}
    predictors = {}
    for name, rows in predictions["information"].items():
        predictors[f"forecast: {name}"] = {c: {r: {"predicted": rows[r]["examples"],
                                                   **measure.verdict(rows[r]["examples"], falloff[c][r])}
                                               for r in RANKS} for c in criteria}
    for signal, rows in predictions["spectral"].items():
        predictors[f"spectral: {signal}"] = {c: {r: {"predicted": rows[r]["examples"], "status": rows[r]["status"],
                                                     **measure.verdict(rows[r]["examples"], falloff[c][r],
                                                                       rows[r]["status"])}
                                                 for r in RANKS} for c in criteria}
    held_bits = {n: {m: (losses["train"][n]["base"] - v) * task.tokens_per_example(n) / math.log(2) * n
                     for m, v in losses["train"][n].items() if m != "base"} for n in sizes}
    params = {r: predictions["information"]["all sizes (growth law)"][r]["lora_parameters"] for r in RANKS}
    return {"held_fraction_level": measure.HELD_FRACTION, "losses": losses, "held_share": share,
            "diverged": diverged, "falloff": falloff, "predictors": predictors,
            "training_loss_reduction_bits": held_bits,
            "lora_parameters": params,
            "held_bits_per_lora_parameter": {r: {n: held_bits[n][f"r{r}"] / params[r] for n in sizes
                                                 if f"r{r}" in held_bits[n]} for r in RANKS},
            "best_learning_rates": best_lr, "lr_edges": sum(1 for row in best_lr if row["edge"]),
            "lr_cells": len(best_lr)}


def _edge(lr: float, grid: Any) -> str | None:
    grid = sorted(grid)
    if len(grid) < 2:
        return None
    return "low" if lr == grid[0] else "high" if lr == grid[-1] else None


def markdown(report: dict[str, Any]) -> str:
    """The tables of docs/realdata_smollm2.md from a results.json (the cell formats of the cheaper study)."""
    fmt = _module("realdata_run", HERE / "run.py")
    m = report["measured"]
    sizes = [n for n in report["data"]["sizes"] if str(n) in m["losses"]["train"]]
    lines = []
    for c, title in (("train", "training loss"), ("held", "held-out loss")):
        lines += [f"Loss (nats per token, {title}; learning rate tuned per cell on this loss):", "",
                  "| N | base | full | " + " | ".join(f"r{r}" for r in RANKS) + " |",
                  "|---|---|---|" + "---|" * len(RANKS)]
        for n in sizes:
            row = m["losses"][c][str(n)]
            lines.append(f"| {n:,} | {row['base']:.3f} | {row['full']:.3f} | "
                         + " | ".join(f"{row[f'r{r}']:.3f}" if f"r{r}" in row else "-" for r in RANKS) + " |")
        lines += ["", f"Share of full fine-tuning's loss reduction LoRA holds ({title}):", "",
                  "| rank | " + " | ".join(f"N={n:,}" for n in sizes) + " | falloff (< 90%) |",
                  "|---|" + "---|" * (len(sizes) + 1)]
        diverged = m.get("diverged", {}).get(c, {})  # reports before the rule have none
        for r in RANKS:
            shares, bad = m["held_share"][c][str(r)], diverged.get(str(r), [])
            lines.append(f"| {r} | " + " | ".join(("-" if shares.get(str(n)) is None else f"{shares[str(n)]:.2f}")
                                                 + (" (diverged)" if n in bad else "") for n in sizes)
                         + f" | {fmt._falloff(m['falloff'][c][str(r)])} |")
        if any(diverged.values()):
            lines += ["", "(diverged): the tuned LoRA run's training loss ended above the base model's; training made "
                      "it worse, so the cell says nothing of the rank's capacity and the falloff leaves it out."]
        lines.append("")
    for c, title in (("train", "training loss"), ("held", "held-out loss")):
        lines += [f"Predicted falloff (examples) against the one measured on {title}: predicted (predicted / "
                  "measured, or whether it is on the side the data allow):", "",
                  "| predictor | " + " | ".join(f"r{r}" for r in RANKS) + " |", "|---|" + "---|" * len(RANKS),
                  "| **measured** | " + " | ".join(fmt._falloff(m["falloff"][c][str(r)]) for r in RANKS) + " |"]
        for name, cells in m["predictors"].items():
            lines.append(f"| {name} | " + " | ".join(fmt._cell(cells[c][str(r)]) for r in RANKS) + " |")
        lines.append("")
    bits = report["predictions"]["information"]
    lines += ["Bits per LoRA parameter each rank held (its training-loss reduction on its N examples, in bits, over "
              "P(r)):", "", "| rank | P(r) | " + " | ".join(f"N={n:,}" for n in sizes) + " |",
              "|---|---|" + "---|" * len(sizes)]
    for r in RANKS:
        held = m["held_bits_per_lora_parameter"][str(r)]
        lines.append(f"| {r} | {m['lora_parameters'][str(r)]:,} | "
                     + " | ".join(f"{held[str(n)]:.2f}" if str(n) in held else "-" for n in sizes) + " |")
    first = bits["all sizes (growth law)"][str(RANKS[0])]
    lines += ["", f"The forecast read {first['bits_per_example']:.1f} bits per example (growth exponent "
              f"{first['growth_exponent']:.2f}) from the probes; {m['lr_edges']} of {m['lr_cells']} (method, N, "
              "criterion) cells have their best learning rate at an edge of the grid.", ""]
    return "\n".join(lines)


def remeasure(path: Path) -> None:
    """Rewrite a report's ``measured`` section from what the report itself holds (its runs' losses, the base
    losses, the predictions, the loss tokens per example): no weights, no corpus, so a change of the measurement rule
    reaches a checked-in report without re-deriving its data from the packages installed today."""
    global SIZES
    report = json.loads(path.read_text())
    SIZES = tuple(report["data"]["sizes"])
    tokens = {int(n): v for n, v in report["data"]["tokens_per_example"].items()}
    task = TaskData(*([None] * 4), info=report["data"])  # type: ignore[arg-type]
    task.tokens_per_example = tokens.__getitem__  # type: ignore[method-assign]
    base = {"train": {int(n): v for n, v in report["base_losses"]["train"].items()},
            "held": report["base_losses"]["held"]}
    predictions = {**report["predictions"],
                   **{kind: {k: {int(r): v for r, v in rows.items()} for k, rows in report["predictions"][kind].items()}
                      for kind in ("information", "spectral")}}
    report["measured"] = measured(report["runs"], task, base, predictions)
    path.write_text(json.dumps(_jsonable(report), indent=1, allow_nan=False) + "\n")


def _module(name: str, path: Path) -> Any:
    """A script imported under its own name (examples/reproduce/run.py is a module ``run`` too)."""
    import importlib.util

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def main(argv: list[str] | None = None) -> int:
    global SIZES, GRID_SIZES, PROBE_SIZES, STEPS, KAPPA, SEED, START, MAX_EXTENSIONS  # for the whole study
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-o", "--out", type=Path, default=Path("smollm2-study-out"))
    parser.add_argument("--cache", type=Path, default=smollm2.DEFAULT_CACHE, help="where the weights are kept")
    parser.add_argument("--task", choices=("cpt", "sft"), default="cpt",
                        help="cpt: continued pretraining on docstrings; sft: signature -> docstring")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", type=Path, help="also copy results.json there (the checked-in table)")
    parser.add_argument("--tables", type=Path, metavar="RESULTS_JSON", help="print the tables of a results.json")
    parser.add_argument("--remeasure", type=Path, metavar="RESULTS_JSON",
                        help="recompute a results.json's measured section from its own runs, base losses, predictions "
                        "and loss tokens per example, in place (after a change of the measurement rule)")
    parser.add_argument("--sizes", default=",".join(str(n) for n in SIZES),
                        help=f"dataset sizes N, comma-separated; must include {PROBE_SIZES} (default %(default)s)")
    parser.add_argument("--probe-sizes", default=",".join(str(n) for n in PROBE_SIZES),
                        help="the full fine-tuning sizes the forecast reads (default %(default)s)")
    parser.add_argument("--steps", type=int, help="the same number of optimizer steps at every N (default: "
                        f"{EPOCHS} epochs)")
    parser.add_argument("--kappa", type=Path, metavar="CALIBRATION_JSON",
                        help="also forecast with this calibration's kappa(P) (lorascope calibrate's JSON)")
    parser.add_argument("--seed", type=int, default=0, help="batch order and LoRA initialisation (default 0)")
    parser.add_argument("--lrs", metavar="FULL,LORA", help="one learning rate per method at every N, no grid (for "
                        "another seed of a study whose grid found them), e.g. 3e-3,1e-2; the probes run at it too, "
                        "so the forecast is only as good as that rate is for them")
    parser.add_argument("--stop-before-lora", action="store_true",
                        help="run full fine-tuning at every N, write predictions.json and the report, and stop "
                             "before any LoRA run (to write another forecast first; rerun without it to go on)")
    parser.add_argument("--grid-sizes", default=",".join(str(n) for n in GRID_SIZES),
                        help="sizes where every method runs its whole learning-rate grid; larger ones run the "
                             "training-loss winner of the largest (default %(default)s)")
    args = parser.parse_args(argv)
    def sizes(option: str, text: str) -> tuple[int, ...]:
        try:
            return tuple(sorted({int(n) for n in text.split(",")}))
        except ValueError:
            parser.error(f"{option} takes comma-separated integers. Got {text!r} instead.")

    grid, every, probe = (sizes(o, t) for o, t in (("--grid-sizes", args.grid_sizes), ("--sizes", args.sizes),
                                                    ("--probe-sizes", args.probe_sizes)))
    if len(probe) < 2:
        parser.error(f"--probe-sizes needs two sizes or more (the growth law). Got {args.probe_sizes!r} instead.")
    if min(probe) < 4 * BATCH:  # analyze's bits per additional example: 2 steps in the first epoch's second half
        parser.error(f"--probe-sizes must be at least {4 * BATCH} (4 batches, so that the forecast has 2 steps in "
                     f"the second half of a probe's first epoch). Got {args.probe_sizes!r} instead.")
    if not set(probe) <= set(every):
        parser.error(f"--sizes must include the probe sizes {probe}. Got {args.sizes!r} instead.")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps takes a positive integer. Got {args.steps} instead.")
    if args.kappa is not None and not args.kappa.is_file():
        parser.error(f"--kappa: no such calibration file: {args.kappa}")
    if args.lrs:
        try:
            full_lr, lora_lr = (float(x) for x in args.lrs.split(","))
        except ValueError:
            parser.error(f"--lrs takes two learning rates, full fine-tuning's and LoRA's. Got {args.lrs!r} instead.")
        if not (full_lr > 0 and lora_lr > 0):
            parser.error(f"--lrs takes positive learning rates. Got {args.lrs!r} instead.")
        START, MAX_EXTENSIONS, grid = {"full": (full_lr,), "all-linear": (lora_lr,)}, 0, every  # no grid to widen
    GRID_SIZES, SIZES, PROBE_SIZES, STEPS, KAPPA, SEED = grid, every, probe, args.steps, args.kappa, args.seed
    if args.tables:
        print(markdown(json.loads(args.tables.read_text())))
        return 0
    if args.remeasure:
        remeasure(args.remeasure)
        print(markdown(json.loads(args.remeasure.read_text())))
        return 0
    torch.set_num_threads(args.threads)
    started = time.time()

    def say(line: str) -> None:
        print(f"[{time.time() - started:6.0f} s] {line}", flush=True)

    try:
        base, tokenizer = smollm2.load(args.cache)
    except smollm2.LoadError as error:
        raise SystemExit(f"smollm2_study: {error}") from None
    task = (supervised if args.task == "sft" else continued_pretraining)(base, tokenizer, args.cache)
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    base_file = args.out / "base_losses.json"
    if base_file.is_file():
        base_losses = json.loads(base_file.read_text())
        base_losses["train"] = {int(n): v for n, v in base_losses["train"].items()}
    else:
        tail = smollm2.trainable_tail(base)
        base_losses = {"train": {n: mean_loss(tail, task.states[:n], task.labels[:n]) for n in SIZES},
                       "held": mean_loss(tail, task.held_states, task.held_labels)}
        base_file.write_text(json.dumps(base_losses) + "\n")
        del tail
    say(f"data {task.info}; base losses {base_losses}")
    runs_file = args.out / "runs.json"
    results: dict[str, dict] = json.loads(runs_file.read_text()) if runs_file.is_file() else {}

    def run(spec: RunSpec) -> None:
        if spec.name in results:
            return
        say(f"{spec.name} ...")
        results[spec.name] = train_run(base, spec, task, args.out / "runs" / f"{spec.name}.h5")
        r = results[spec.name]
        say(f"{spec.name}: train {r['train_loss']:.4f}, held-out {r['held_loss']:.4f} "
            f"({r['seconds']:.0f} s, {r['median_step_seconds']:.2f} s/step)")
        runs_file.write_text(json.dumps(_jsonable(results), indent=1) + "\n")

    for n in PROBE_SIZES:  # the probes: the widened grid at every probe size, whatever --grid-sizes says, so that
        while missing := [lr for lr in grid_at("full", 0, n, results)  # the forecast reads the best probe
                          if RunSpec("full", 0, n, lr).name not in results]:
            for lr in missing:
                run(RunSpec("full", 0, n, lr))
    predictions_file = args.out / "predictions.json"
    predictions = (json.loads(predictions_file.read_text()) if predictions_file.is_file()
                   else predict(args.out, base, task, results, say))
    # json turned the rank keys into strings
    predictions["information"] = {k: {int(r): v for r, v in rows.items()} for k, rows in
                                  predictions["information"].items()}
    predictions["spectral"] = {k: {int(r): v for r, v in rows.items()} for k, rows in predictions["spectral"].items()}
    def methods(n: int) -> list[tuple[str, int]]:  # past the grid sizes the highest rank first: the forecast says
        ranks = RANKS if n in GRID_SIZES else sorted(RANKS, reverse=True)  # it alone still holds at N = 1,024
        return [("full", 0)] + [("all-linear", r) for r in ranks]

    def write_report(complete: bool) -> None:
        lora_runs = any(not name.startswith("full") for name in results)
        report = {
            "command": shlex.join(["python", "examples/realdata/smollm2_study.py",
                                   *(sys.argv[1:] if argv is None else argv)]),
            "complete": complete,
            "model": {"description": smollm2.DESCRIPTION, "trained": "the last block (model.layers.29): every "
                      "matrix and norm (full fine-tuning) or a PEFT LoRA on its 7 linear matrices"},
            "data": {**task.info, "sizes": SIZES, "held_out": data.HELD,
                     "tokens_per_example": {n: task.tokens_per_example(n) for n in SIZES},
                     "description": DESCRIPTIONS[args.task]},
            "training": {"optimizer": "AdamW (weight decay 0)", "schedule": "constant", "batch": BATCH,
                         "epochs": EPOCHS if STEPS is None else None, "steps": STEPS, "full_lrs": START["full"],
                         "lora_lrs": START["all-linear"], "fixed_lrs": bool(args.lrs), "alpha": ALPHA,
                         "seed": SEED, "torch_threads": args.threads},
            "base_losses": base_losses, "predictions": predictions,
            "measured": measured(results, task, base_losses, predictions) if lora_runs else None,
            "runs": {k: {x: v for x, v in r.items() if x != "path"} for k, r in results.items()},
            "wall_seconds": sum(r["seconds"] for r in results.values())}
        (args.out / "results.json").write_text(json.dumps(_jsonable(report), indent=1, allow_nan=False) + "\n")
        if args.report:
            args.report.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(args.out / "results.json", args.report)

    if args.stop_before_lora:
        for n in SIZES:  # the references at every N, so that another forecast can be written before any LoRA run
            for spec in specs("full", 0, results, (n,)):
                run(spec)
        write_report(complete=False)
        say("stopped before any LoRA run (--stop-before-lora); rerun without it to go on")
        return 0
    pending = [s for n in SIZES for t, r in methods(n) for s in specs(t, r, results, (n,))]
    while pending:  # smaller N first; a larger N's rates are known once the grid below it is done
        spec = pending.pop(0)
        run(spec)
        pending = [s for n in SIZES for t, r in methods(n) for s in specs(t, r, results, (n,))
                   if s.name not in results]
        if spec.target != "full":
            write_report(complete=not pending)
    say("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
