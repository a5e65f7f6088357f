"""Record a Lightning ``Trainer`` run with one line, ``lorascope.record(pl_trainer, path)``, then analyse it.

A small language model of one's own, wrapped in a ``LightningModule``, is trained by a real
``lightning.pytorch.Trainer`` on a synthetic language with two micro-batches per optimizer step
(``accumulate_grad_batches=2``), so the analysis measures the gradient noise scale too.

    python examples/lightning_trainer.py [OUTPUT_FOLDER]   # default: a new temporary folder; needs the lightning extra

(The file is not called ``lightning.py``: run as a script, it would shadow the ``lightning`` package.)
Writes ``OUTPUT_FOLDER/run.h5`` and prints the headline. A few seconds on one CPU core.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from _common import TinyLM, grouped_tokens, output_folder, print_headline

import lorascope

STEPS, BATCH, ACCUMULATION, LENGTH = 40, 8, 2, 16


class LanguageModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = TinyLM()

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model.loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def main(argv: list[str] | None = None) -> lorascope.Analysis:
    folder = output_folder(__doc__, argv, "lightning")
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and several oversubscribe a busy machine
    path = folder / "run.h5"
    loader = torch.utils.data.DataLoader(grouped_tokens(STEPS * BATCH * ACCUMULATION, LENGTH), batch_size=BATCH)
    torch.manual_seed(0)
    module = LanguageModule()
    pl_trainer = pl.Trainer(accelerator="cpu", max_steps=STEPS, accumulate_grad_batches=ACCUMULATION,
                            default_root_dir=folder, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)

    lorascope.record(pl_trainer, path, overwrite=True)  # the one line: a callback records from fit start to end
    pl_trainer.fit(module, loader)

    analysis = lorascope.analyze(path, ranks=(1, 4, 16))
    print_headline(analysis)
    return analysis


if __name__ == "__main__":
    main()
