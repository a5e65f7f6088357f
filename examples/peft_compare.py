"""Compare PEFT LoRA runs of ranks 1 and 4 with full fine-tuning: where does each rank leave the full curve?

A tiny Llama (built from a config: nothing is downloaded) is first pretrained on a synthetic language (the next
token's group is 1 or 2 groups on from the current one), then fine-tuned three times from those weights on the same
batches of a narrower language (always 1 group on): fully, and as PEFT LoRAs of rank 1 and 4 on every linear layer.
Each fine-tuning run is recorded with ``lorascope.record``; ``lorascope.compare(full, [loras])`` then finds, per
rank, the number of examples at which its loss leaves the full fine-tuning curve (docs/compare.md).

    python examples/peft_compare.py [OUTPUT_FOLDER]   # default: a new temporary folder; needs the hf extra

Writes ``full.h5``, ``lora_r1.h5`` and ``lora_r4.h5`` into OUTPUT_FOLDER and prints the falloff per rank.
About ten seconds on one CPU core.
"""

from __future__ import annotations

from pathlib import Path

import peft
import torch
from _common import grouped_tokens, output_folder, tiny_llama

import lorascope

PRETRAIN_STEPS, STEPS, BATCH, LENGTH, LR = 300, 150, 8, 16, 1e-3
RANKS = (1, 4)
# LoRA learning rate = LORA_LR_MULTIPLIER x full fine-tuning's. LoRA Without Regret finds ~10x best at scale; on
# this 32-wide model alpha 32 scales a rank-1 update 32x, and 10x diverges, so a smaller multiplier.
LORA_LR_MULTIPLIER = 3


def pretrained_weights() -> dict[str, torch.Tensor]:
    """The tiny Llama's weights after pretraining on the broader language (not recorded)."""
    model = tiny_llama(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for ids in grouped_tokens(PRETRAIN_STEPS * BATCH, LENGTH, groups=8, shifts=(1, 2), seed=1).split(BATCH):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def finetune(path: Path, weights: dict[str, torch.Tensor], batches: tuple[torch.Tensor, ...],
             rank: int | None = None) -> Path:
    """Fine-tune the pretrained model on ``batches`` (fully, or as a LoRA of ``rank``) and record it to ``path``."""
    model = tiny_llama()
    model.load_state_dict(weights)
    lr = LR
    if rank is not None:
        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=32, target_modules="all-linear"))
        lr *= LORA_LR_MULTIPLIER
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    with lorascope.record(model, path, optimizer=opt, total_steps=len(batches), overwrite=True):
        for ids in batches:  # examples, tokens and the loss are counted by the recorder's hooks
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    return path


def main(argv: list[str] | None = None) -> lorascope.Comparison:
    folder = output_folder(__doc__, argv, "compare")
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and several oversubscribe a busy machine
    weights = pretrained_weights()
    batches = grouped_tokens(STEPS * BATCH, LENGTH, groups=8, shifts=(1,), seed=2).split(BATCH)
    full = finetune(folder / "full.h5", weights, batches)
    loras = [finetune(folder / f"lora_r{rank}.h5", weights, batches, rank) for rank in RANKS]

    comparison = lorascope.compare(full, loras)
    summary = comparison.to_dict()  # the JSON document of docs/compare.md
    for run in (summary["full"], *summary["loras"]):
        print(f"{run['path']}: {run['status']} recording of {run['steps']} steps ({run['label']}), "
              f"final loss {run['final_loss']:.3f}")
    criterion = summary["criterion"]
    print(f"falloff: the LoRA loss stays more than {criterion['threshold']} {criterion['units']} above full "
          f"fine-tuning's while the data grow {10 ** criterion['window_decades']:.2f}x (tentative: it is above "
          "until the end of the data, which ends sooner)")
    print(f"{'rank':>4}  {'falloff':<9}  {'at examples seen':>16}  {'final loss gap (nats)':>21}")
    for lora in summary["loras"]:
        falloff = lora["falloff"]
        where = "-" if falloff["status"] == "none" else f"{falloff['examples_seen']:,}"
        print(f"{lora['rank']:>4}  {falloff['status']:<9}  {where:>16}  {lora['final_gap']:>21.3f}")
    for note in summary["notes"]:
        print(f"note: {note}")
    print(f"the plot: lorascope compare {' '.join(map(str, [full, *loras]))} -o compare")
    return comparison


if __name__ == "__main__":
    main()
