"""Record a Hugging Face ``Trainer`` run with one line, ``lorascope.record(trainer, path)``, then analyse it.

A tiny Llama (built from a config, random weights: nothing is downloaded) is fully fine-tuned by a real
``transformers.Trainer`` on a synthetic language, two micro-batches per optimizer step: gradient accumulation gives
lorascope the gradient norms at two batch sizes, so the analysis measures the gradient noise scale too.

    python examples/hf_trainer.py [OUTPUT_FOLDER]     # default: a new temporary folder; needs the hf extra

Writes ``OUTPUT_FOLDER/run.h5`` and prints the headline. About ten seconds on one CPU core.
"""

from __future__ import annotations

import torch
import transformers
from _common import grouped_tokens, output_folder, print_headline, tiny_llama

import lorascope

STEPS, BATCH, ACCUMULATION, LENGTH = 40, 8, 2, 16


class Tokens(torch.utils.data.Dataset):
    """Causal-LM examples: input_ids and labels (the Llama shifts the labels itself)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv: list[str] | None = None) -> lorascope.Analysis:
    folder = output_folder(__doc__, argv, "hf")
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and several oversubscribe a busy machine
    path = folder / "run.h5"
    args = transformers.TrainingArguments(
        output_dir=str(folder / "trainer"), max_steps=STEPS, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUMULATION, learning_rate=3e-3, lr_scheduler_type="constant", use_cpu=True,
        report_to=[], save_strategy="no", logging_steps=10, disable_tqdm=True, seed=0,
    )
    dataset = Tokens(grouped_tokens(STEPS * BATCH * ACCUMULATION, LENGTH))
    trainer = transformers.Trainer(model=tiny_llama(), args=args, train_dataset=dataset)

    lorascope.record(trainer, path, overwrite=True)  # the one line: a callback records from train begin to end
    trainer.train()

    analysis = lorascope.analyze(path, ranks=(1, 4, 16))
    print_headline(analysis)
    return analysis


if __name__ == "__main__":
    main()
