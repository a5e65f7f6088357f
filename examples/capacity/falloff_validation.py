"""Does the information view predict where a real PEFT LoRA of rank r stops keeping up with full fine-tuning?

On a synthetic memorization task with known bits (N random key -> value facts, log2(V) bits each) and a small
Markov-pretrained Llama:

1. ``calibrate`` measures bits per LoRA parameter at ranks 1 and 2 (its own facts, its own seed);
2. the predicted falloff of rank r is N*(r) = kappa P(r) / log2(V);
3. the measured falloff: for N on a geometric grid, full fine-tuning and LoRA of rank r are trained on the same N
   facts with the same recipe; the falloff is the N at which the LoRA holds less than 90% of the bits full
   fine-tuning holds (log-interpolated between grid points).

    python examples/capacity/falloff_validation.py          # ranks 1, 2, 4 (docs/capacity.md has the result)
    python examples/capacity/falloff_validation.py --quick  # ranks 1, 2, a coarser grid

``tests/test_capacity_validation.py`` runs the quick mode as a slow test.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import dataclass

import torch
import transformers

from lorascope.inputs.synthetic import FactsTask, pretrain_on_markov, stored_bits
from lorascope.model.lora_params import lora_parameters
from lorascope.workflows.calibrate import calibrate, memorize_with_lora

VOCAB, VALUES, HIDDEN = 512, 256, 64
HELD_FRACTION = 0.9  # the LoRA has fallen off once it holds less than this share of full fine-tuning's bits


@dataclass(frozen=True)
class FalloffRow:
    rank: int
    lora_parameters: int
    predicted: float
    measured: float | None
    held: dict[int, float]  # N -> LoRA bits / full fine-tuning bits

    @property
    def ratio(self) -> float | None:
        return None if self.measured is None else self.predicted / self.measured


def base_model(seed: int = 0, pretrain_steps: int = 300) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4, intermediate_size=2 * HIDDEN, vocab_size=VOCAB,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    pretrain_on_markov(model, VOCAB, steps=pretrain_steps, seed=seed)
    return model


def full_finetune_bits(model: torch.nn.Module, task: FactsTask, *, epochs: int, lr: float = 1e-3,
                       batch_size: int = 128, seed: int = 0) -> float:
    """Bits full fine-tuning (every parameter, a copy of the model) holds after ``epochs`` passes."""
    model = copy.deepcopy(model)
    ids, _ = task.tensors()
    values = ids[:, -1]
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(task.facts, generator=generator)
        for start in range(0, task.facts, batch_size):
            batch = order[start:start + batch_size]
            loss = torch.nn.functional.cross_entropy(model(input_ids=ids[batch]).logits[:, -2], values[batch])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(input_ids=ids[i:i + 512]).logits[:, -2] for i in range(0, task.facts, 512)])
    return stored_bits(logits, task, values)


def crossing(held: dict[int, float], level: float = HELD_FRACTION) -> float | None:
    """First N where the held share drops below ``level``, log-interpolated; None if it never does.

    >>> crossing({100: 1.0, 200: 0.95, 400: 0.85, 800: 0.5})
    282.84...
    """
    points = sorted(held.items())
    for (n0, h0), (n1, h1) in zip(points, points[1:]):
        if h0 >= level > h1:
            t = (h0 - level) / (h0 - h1)
            return math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0)))
    if points and points[0][1] < level:
        return float(points[0][0])  # already below at the smallest N: the falloff is at most there
    return None


def run(ranks: tuple[int, ...], grid_points: int, epochs: int, seed: int = 0, log=print) -> tuple[float, list]:
    start = time.time()
    model = base_model(seed)
    # the recipe the published numbers were measured with: 2 bits per parameter offered, no capacity bracket
    calibration = calibrate(model, ranks=(1, 2), epochs=epochs, seed=seed + 100, offered_bits_per_parameter=2.0,
                            bracket=None)
    kappa = calibration.bits_per_parameter
    log(f"calibrate: {kappa:.3f} bits per LoRA parameter (ranks 1, 2: "
        f"{', '.join(f'{p.bits_per_parameter:.3f}' for p in calibration.points)}), {time.time() - start:.0f} s")
    bits_per_fact = math.log2(VALUES)
    predicted = {r: kappa * lora_parameters(model, "all-linear", rank=r).total / bits_per_fact for r in ranks}
    # One geometric grid for all ranks, from a quarter of the smallest prediction to 4x the largest.
    low, high = min(predicted.values()) / 4, max(predicted.values()) * 4
    grid = sorted({int(round(low * (high / low) ** (i / (grid_points - 1)))) for i in range(grid_points)})
    full = {}
    for n in grid:
        task = FactsTask(facts=n, vocab_size=VOCAB, values=VALUES, key_tokens=3, seed=seed + n)
        full[n] = full_finetune_bits(model, task, epochs=epochs, seed=seed)
        log(f"full fine-tuning N={n}: holds {full[n]:.0f} of {task.bits:.0f} bits")
    rows = []
    for r in ranks:
        held = {}
        for n in grid:
            task = FactsTask(facts=n, vocab_size=VOCAB, values=VALUES, key_tokens=3, seed=seed + n)
            point = memorize_with_lora(model, "all-linear", r, task, epochs=epochs, lr=calibration.training["lr"],
                                       batch_size=128, seed=seed)
            held[n] = point.bits_stored / full[n] if full[n] > 0 else 0.0
        row = FalloffRow(r, lora_parameters(model, "all-linear", rank=r).total, predicted[r], crossing(held), held)
        rows.append(row)
        log(f"rank {r}: predicted {row.predicted:.0f}, measured {row.measured or float('nan'):.0f}, held "
            + ", ".join(f"{n}:{h:.2f}" for n, h in held.items()))
    log(f"total {time.time() - start:.0f} s")
    return kappa, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ranks = (1, 2) if args.quick else (1, 2, 4)
    kappa, rows = run(ranks, grid_points=6 if args.quick else 9, epochs=args.epochs)
    print(f"\n{'rank':>4} {'LoRA params':>11} {'predicted N*':>12} {'measured N*':>11} {'ratio':>6}")
    for row in rows:
        measured = f"{row.measured:.0f}" if row.measured else "none"
        ratio = f"{row.ratio:.2f}" if row.ratio else "-"
        print(f"{row.rank:>4} {row.lora_parameters:>11} {row.predicted:>12.0f} {measured:>11} {ratio:>6}")


if __name__ == "__main__":
    main()
