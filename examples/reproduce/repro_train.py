"""Training for the reproduction study: the base model, the facts, and one recorded run (full fine-tuning or LoRA).

Every run starts from the same saved base (``base.pt``), sees the same facts (the first N of one fixed draw, so
the datasets are nested) in the same shuffled order (one seeded generator per run), and is recorded with
``lorascope.record``. :func:`train_run` takes a plain dict so that it can run in a worker process.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

import lorascope
from lorascope.inputs.synthetic import FactsTask, markov_batches, stored_bits

VOCAB, VALUES, KEY_TOKENS = 512, 256, 3
HIDDEN, LAYERS, INTERMEDIATE = 64, 2, 128
MARKOV_SPARSITY = 24.0  # a peaked language (entropy rate 4.0 nats, 4.9 at the default 8; ln 512 = 6.2), so that
# the frozen output head of a LoRA run has learned to be confident
FACTS_SEED = 1


def model_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                                    num_key_value_heads=4, intermediate_size=INTERMEDIATE, vocab_size=VOCAB,
                                    max_position_embeddings=64, tie_word_embeddings=False)


def pretrain_base(path: Path, *, steps: int, seed: int = 0, lr: float = 3e-3) -> float:
    """Build the model, pretrain every parameter on the Markov language with AdamW, save its state dict; the last
    loss. (``lorascope.inputs.synthetic.pretrain_on_markov`` with a sparser chain than its default.)"""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(model_config())
    stream = markov_batches(VOCAB, batch_size=32, length=24, generator=torch.Generator().manual_seed(seed),
                            sparsity=MARKOV_SPARSITY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    loss = torch.tensor(math.nan)
    for _ in range(steps):
        ids = next(stream)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.save(model.state_dict(), path)
    return float(loss.detach())


def load_base(path: Path) -> transformers.LlamaForCausalLM:
    model = transformers.LlamaForCausalLM(model_config())
    model.load_state_dict(torch.load(path, weights_only=True))
    return model


def facts(n: int, largest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` of ``largest`` random key -> value facts: ``(input_ids, labels)``, labels -100 but the value."""
    ids, labels = FactsTask(facts=largest, vocab_size=VOCAB, values=VALUES, key_tokens=KEY_TOKENS,
                            seed=FACTS_SEED).tensors()
    return ids[:n], labels[:n]


def bits_per_fact() -> float:
    return math.log2(VALUES)


@dataclass(frozen=True)
class RunSpec:
    """One training run. ``target`` is "full" (every parameter) or a LoRA target set; ``rank`` 0 for full."""

    experiment: str
    target: str
    rank: int
    examples: int
    lr: float
    batch_size: int
    epochs: int

    @property
    def name(self) -> str:
        method = "full" if self.target == "full" else f"{self.target}_r{self.rank}"
        return f"{method}_n{self.examples}_bs{self.batch_size}_e{self.epochs}_lr{self.lr:g}"

    @property
    def steps(self) -> int:
        return self.epochs * math.ceil(self.examples / self.batch_size)


def epochs_for(examples: int, batch_size: int, epochs: int, min_steps: int) -> int:
    """``epochs`` passes, more for small datasets so that every run takes at least ``min_steps`` optimizer steps."""
    return max(epochs, math.ceil(min_steps / math.ceil(examples / batch_size)))


def train_run(job: dict[str, Any]) -> dict[str, Any]:
    """Train and record one run; returns its spec with the final loss, the bits held and the wall time.

    ``job``: the :class:`RunSpec` fields plus ``base`` (the base state dict), ``largest`` (the size of the
    fact draw), ``path`` (the run file) and ``seed``.
    """
    torch.set_num_threads(1)
    spec = RunSpec(**{k: job[k] for k in RunSpec.__dataclass_fields__})
    start = time.time()
    model = load_base(Path(job["base"]))
    ids, labels = facts(spec.examples, job["largest"])
    if spec.target == "full":
        trainable = list(model.parameters())
        trained: torch.nn.Module = model
    else:
        import peft

        from lorascope.model.peft_config import make_lora_config, to_peft

        for p in model.parameters():
            p.requires_grad_(False)
        torch.manual_seed(job["seed"])  # LoRA's A initialization
        config = make_lora_config(model, target=spec.target, rank=spec.rank, alpha=32, task_type=None)
        trained = peft.get_peft_model(model, to_peft(config))
        trainable = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=spec.lr)
    order_generator = torch.Generator().manual_seed(job["seed"])  # the same batches, in the same order, for all
    trained.train()
    with lorascope.record(trained, job["path"], optimizer=optimizer, overwrite=True, total_steps=spec.steps,
                          extra_config={"dataset": {"examples": spec.examples},
                                        "study": {**asdict(spec), "seed": job["seed"]}}):
        for _ in range(spec.epochs):
            order = torch.randperm(spec.examples, generator=order_generator)
            for first in range(0, spec.examples, spec.batch_size):
                batch = order[first:first + spec.batch_size]
                trained(input_ids=ids[batch], labels=labels[batch]).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    trained.eval()
    with torch.no_grad():
        logits = torch.cat([trained(input_ids=ids[i:i + 1024]).logits[:, -2] for i in range(0, spec.examples, 1024)])
    values = ids[:, -1]
    final_loss = float(torch.nn.functional.cross_entropy(logits, values))
    task = FactsTask(facts=spec.examples, vocab_size=VOCAB, values=VALUES, key_tokens=KEY_TOKENS)
    return {**asdict(spec), "name": spec.name, "path": str(job["path"]), "steps": spec.steps,
            "trainable_parameters": int(sum(p.numel() for p in trainable)),
            "final_loss": final_loss, "bits_held": stored_bits(logits, task, values),
            "bits_offered": spec.examples * bits_per_fact(), "seconds": time.time() - start}


def calibrate_job(job: dict[str, Any]) -> dict[str, Any]:
    """``lorascope.calibrate`` on the base for ``job["epochs"]`` epochs, Adam at the better of 1e-3 and 3e-3, batch
    128: ranks 1 and 2, no capacity bracket, offering 2 bits per parameter (``job["recipe"] == "published"``, the
    published study's recipe) or 0.5 (the smoke tier's); or (``"kappa"``) kappa(r) at ``job["ranks"]`` with
    calibrate's bracket, within ``job["budget"]``. Saves the calibration JSON to ``job["path"]``."""
    torch.set_num_threads(1)
    start = time.time()
    recipe: dict[str, Any]
    if job.get("recipe") == "kappa":
        # kappa(r): calibrate's default recipe (capacity bracketed at the smallest rank, every rank offered the
        # capacity load) at job["ranks"], within job["budget"] adapter-training examples.
        recipe = {"ranks": tuple(job["ranks"]), "budget": job.get("budget")}
    else:
        load = 2.0 if job.get("recipe") == "published" else 0.5
        recipe = {"ranks": (1, 2), "offered_bits_per_parameter": load, "bracket": None}
    calibration = lorascope.calibrate(load_base(Path(job["base"])), epochs=job["epochs"], seed=job["seed"],
                                      base="the study's Markov-pretrained tiny Llama", **recipe)
    calibration.save(job["path"])
    return {"kind": "calibrate", "path": job["path"], "bits_per_parameter": calibration.bits_per_parameter,
            "seconds": time.time() - start}


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """A worker's entry point: a training run or the calibration."""
    if job["kind"] == "calibrate":
        return calibrate_job(job)
    return {"kind": "train", **train_run(job)}
