"""The worked example of docs/capacity.md: a small Llama, a probe recording, a calibration, three recommendations.

Writes into a folder (default ``capacity-example/``):

- ``model/``: a small Llama (config.json and weights), pretrained briefly on the synthetic Markov language;
- ``probe.h5``: full fine-tuning of that model on 400 random key -> value facts (3,200 bits), 20 epochs, two
  backward passes per step (so the gradient noise scale is measured), recorded with ``lorascope.record``.

Then run (docs/capacity.md shows the output):

    lorascope recommend --config capacity-example/model --examples 4000 --tokens-per-example 1 --ranks 1,2,4,8,16
    lorascope calibrate --model capacity-example/model -o capacity-example/cal.json --ranks 1,2 --bracket none --load 2
    lorascope recommend --config capacity-example/model --examples 4000 --probe capacity-example/probe.h5 \\
        --calibration capacity-example/cal.json --batch-size 32 --epochs 20 --ranks 1,2,4,8,16 \\
        --peft-config capacity-example/lora
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers

import lorascope
from lorascope.inputs.synthetic import FactsTask, pretrain_on_markov

VOCAB = 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="capacity-example")
    args = parser.parse_args()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4, intermediate_size=128, vocab_size=VOCAB,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    print(f"pretraining on the Markov language: loss {pretrain_on_markov(model, VOCAB, steps=300):.2f}")
    model.save_pretrained(folder / "model")

    task = FactsTask(facts=400, vocab_size=VOCAB, values=256, key_tokens=3, seed=7)
    ids, labels = task.tensors()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    epochs, batch, passes = 20, 32, 2
    with lorascope.record(model, folder / "probe.h5", optimizer=optimizer, overwrite=True,
                          extra_config={"dataset": {"examples": task.facts}}):
        for _ in range(epochs):
            order = torch.randperm(task.facts, generator=generator)
            for start in range(0, task.facts, batch):
                for part in order[start:start + batch].chunk(passes):  # two backward passes per step
                    (model(input_ids=ids[part], labels=labels[part]).loss / passes).backward()
                optimizer.step()
                optimizer.zero_grad()
    print(f"probe: {folder / 'probe.h5'} ({task.facts} facts, {task.bits:,.0f} bits, {epochs} epochs)")


if __name__ == "__main__":
    main()
