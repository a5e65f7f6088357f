"""``lorascope demo``: the whole pipeline on a built-in model and task, with core dependencies only.

A small causal transformer (Llama-style module names) is first pretrained briefly on a random Markov-chain
language, so fine-tuning starts from a trained model, then fully fine-tuned on a memorization task of random
key -> value facts while lorascope records every weight matrix; the recording is analysed and a report
folder written. It takes well under two minutes on two CPU cores.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lorascope.inputs.synthetic import FactsTask, pretrain_on_markov

if TYPE_CHECKING:
    from lorascope.report.folder import ReportFiles
    from lorascope.workflows.analyze import Analysis

__all__ = ["REPRODUCED_BITS_PER_PARAMETER", "DemoConfig", "DemoTransformer", "measured_falloffs", "run_demo"]

HELD_FACTS = 128  # facts in the held batch whose loss measures each kind's contribution
REPRODUCED_BITS_PER_PARAMETER = (0.51, 0.67)
"""Bits asked per LoRA parameter where real PEFT LoRA runs fell off on this task (random facts, all-linear LoRA,
ranks 1 to 16), measured by the reproduction study (docs/reproduction.md)."""


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo: model, pretraining, and the fine-tuning task."""

    vocab: int = 256
    dim: int = 96
    layers: int = 2
    heads: int = 4
    mlp: int = 256
    seq: int = 24
    pretrain_steps: int = 150
    facts: int = 768
    key_tokens: int = 4
    finetune_steps: int = 400
    batch: int = 32
    passes: int = 2
    lr: float = 2e-3
    seed: int = 0


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        split = lambda h: h.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                             is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, d))


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Block(nn.Module):
    def __init__(self, cfg: DemoConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.dim)
        self.self_attn = _Attention(cfg.dim, cfg.heads)
        self.post_attention_layernorm = nn.LayerNorm(cfg.dim)
        self.mlp = _MLP(cfg.dim, cfg.mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class DemoTransformer(nn.Module):
    """A small pre-norm causal transformer; returns ``{"loss", "logits"}`` like a transformers model."""

    def __init__(self, cfg: DemoConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.dim)
        self.layers = nn.ModuleList(_Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        h = self.embed_tokens(input_ids)
        for block in self.layers:
            h = block(h)
        logits = self.lm_head(self.norm(h))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                          ignore_index=-100)
        return out


def measured_falloffs(rows: list[Any], bits_per_fact: float) -> str:
    """Where the reproduction study's measurements put each all-linear rank's falloff on the demo's facts: the
    truth the forecast is checked against."""
    low, high = REPRODUCED_BITS_PER_PARAMETER
    spans = [f"rank {r.prediction.rank} at {low * r.prediction.lora_parameters / bits_per_fact:,.0f}.."
             f"{high * r.prediction.lora_parameters / bits_per_fact:,.0f}" for r in rows if r.target == "all-linear"]
    return (f"truth for the demo's task: {bits_per_fact:g} bits per fact; real PEFT LoRA runs on this task fell off at "
            f"{low:g}-{high:g} bits per LoRA parameter (docs/reproduction.md), so all-linear LoRA falls off at "
            + ", ".join(spans) + " facts")


def run_demo(folder: str | os.PathLike[str] = "lorascope-demo", *, cfg: DemoConfig | None = None,
             force: bool = False, log: Any = print) -> tuple[Path, Analysis, ReportFiles]:
    """Pretrain, fully fine-tune with recording, analyse and write the report into ``folder``.

    Returns the run file path, the :class:`~lorascope.workflows.analyze.Analysis` and the report files.
    """
    cfg = cfg or DemoConfig()
    threads = torch.get_num_threads()
    # The demo's model is tiny: one thread is fastest, and on a busy machine more threads waiting for each other
    # made it several times slower (measured: 5 s vs 38 s for a short run on 2 loaded cores).
    torch.set_num_threads(1)
    try:
        return _run(folder, cfg, force, log)
    finally:
        torch.set_num_threads(threads)


def _run(folder: str | os.PathLike[str], cfg: DemoConfig, force: bool, log: Any
         ) -> tuple[Path, Analysis, ReportFiles]:
    import lorascope
    from lorascope.report.folder import prepare_folder, write_report
    from lorascope.workflows.analyze import analyze

    folder = prepare_folder(folder, force=force)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    model = DemoTransformer(cfg)

    log(f"pretraining a {sum(p.numel() for p in model.parameters()):,}-parameter transformer for "
        f"{cfg.pretrain_steps} steps on a Markov-chain language ...")
    pretrain_on_markov(model, cfg.vocab, steps=cfg.pretrain_steps, seed=cfg.seed, batch_size=cfg.batch,
                       length=cfg.seq, lr=3e-3)

    task = FactsTask(facts=cfg.facts, vocab_size=cfg.vocab, values=cfg.vocab // 2, key_tokens=cfg.key_tokens,
                     seed=cfg.seed)
    ids, labels = task.tensors()
    bits = task.bits
    log(f"full fine-tuning on {cfg.facts} random key -> value facts ({bits:,.0f} bits) for {cfg.finetune_steps} "
        "steps, recorded by lorascope ...")
    run_path = folder / "demo_run.h5"
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    # A held batch of training facts: at each snapshot the recorder measures its loss with each kind's update
    # reverted (contributions), so the report says which part of the update the facts live in.
    held = {"ids": ids[:HELD_FACTS], "labels": labels[:HELD_FACTS]}
    with lorascope.record(model, run_path, optimizer=opt, total_steps=cfg.finetune_steps, overwrite=force,
                          extra_config={"demo": {"facts": cfg.facts, "bits_to_learn": bits},
                                        "dataset": {"examples": cfg.facts, "bits_per_example": task.bits_per_fact}},
                          contributions=True, held_batch=held,
                          loss_fn=lambda m, b: m(b["ids"], labels=b["labels"])["loss"]):
        for _ in range(cfg.finetune_steps):
            # Two backward passes per step (gradient accumulation), so the recording also measures the
            # gradient noise scale from the norms at both batch sizes.
            for _ in range(cfg.passes):
                batch = torch.randint(0, cfg.facts, (cfg.batch // cfg.passes,), generator=generator)
                (model(ids[batch], labels=labels[batch])["loss"] / cfg.passes).backward()
            opt.step()
            opt.zero_grad()

    log("analysing the recording ...")
    analysis = analyze(run_path, ranks=(4, 8, 16))
    if analysis.forecast is not None:
        analysis.forecast.notes.append(measured_falloffs(analysis.forecast.rows, task.bits_per_fact))
    files = write_report(analysis, folder / "report", force=True)
    return run_path, analysis, files
