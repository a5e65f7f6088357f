"""Helper of tests/test_record_distributed.py (not a test): recorded training runs of two processes on CPU (gloo).

Usage:
    python -m torch.distributed.run --standalone --nproc_per_node 2 _distributed_script.py {ddp,ddp_fail,fsdp,hf} OUT
    python _distributed_script.py lightning OUT      (Lightning starts the second process itself)
    RANK=.. WORLD_SIZE=2 MASTER_ADDR=.. MASTER_PORT=.. python _distributed_script.py kill OUT

Each run writes OUT/<mode>.h5 (rank 0 only). The data, models and step counts are defined here so that the test
can replay the same global batches in one process and compare the files. Rank 0 prints "STEP n" after each
optimizer step of the ``kill`` mode, which runs until it is killed.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

import lorascope

VOCAB, SEQ = 40, 8
WORLD = 2
STEPS = 6
GLOBAL_BATCH = 8  # sequences per optimizer step, over both ranks
PASSES = 2  # backward passes per rank and step in the DDP run (no_sync on all but the last)
CLIP = 0.05  # small enough that clipping acts on most steps
LR = 1e-2
SNAPSHOTS = [2, 4]  # plus the final step
PER_EXAMPLE_STEPS = 3  # a second DDP run with exact per-example norms
FAIL_AT, FAIL_SNAPSHOT = 2, 4  # a third one: rank 1's recorder fails at step 2; the next snapshot step is 4
HANG_SECONDS = 240  # a process still running after this long prints its stack and exits


class TinyLM(nn.Module):
    """Embedding, a residual MLP block, a norm and an output layer; 4 recorded matrices."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 24)
        self.mlp = nn.Sequential(nn.Linear(24, 36), nn.GELU(), nn.Linear(36, 24))
        self.norm = nn.LayerNorm(24)
        self.out = nn.Linear(24, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        return self.out(self.norm(x + self.mlp(x)))


def tiny_lm() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM()


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids)
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def global_batch(step: int, size: int = GLOBAL_BATCH, vocab: int = VOCAB) -> torch.Tensor:
    """The token ids of optimizer step ``step`` (1-based), the same in every process."""
    return torch.randint(0, vocab, (size, SEQ), generator=torch.Generator().manual_seed(1000 + step))


def micro_batches(step: int) -> list[torch.Tensor]:
    """The global batch cut as rank 0's passes, then rank 1's: rank r, pass k is entry r * PASSES + k."""
    return list(global_batch(step).chunk(WORLD * PASSES))


def ddp_step(model: nn.Module, optimizer: torch.optim.Optimizer, recorder, rank: int, step: int) -> None:
    """One optimizer step of a DDP rank: its PASSES micro-batches of the step's global batch (no_sync on all but the
    last), each loss logged, gradients clipped."""
    mine = micro_batches(step)[rank * PASSES: (rank + 1) * PASSES]
    for k, ids in enumerate(mine):
        if k < PASSES - 1:
            with model.no_sync():
                loss = lm_loss(model, ids)
                (loss / PASSES).backward()
        else:
            loss = lm_loss(model, ids)
            (loss / PASSES).backward()
        recorder.log(loss=loss)
    nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    optimizer.step()
    optimizer.zero_grad()


def tiny_mixtral():
    """A tiny Mixtral with odd sizes, so that FSDP2's shards are uneven: 3 experts over 2 ranks, vocab 63."""
    import transformers

    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=24,
        vocab_size=63, max_position_embeddings=64, tie_word_embeddings=False, num_local_experts=3,
        num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(config)


FSDP_STEPS = 4
FSDP_SNAPSHOTS = [1, 3]
HF_STEPS, HF_MICRO, HF_ACCUMULATION = 3, 2, 2  # per rank; the single-process twin accumulates 4 passes of 2


class Tokens(torch.utils.data.Dataset):
    """Sequences for the HF Trainer (and the Lightning run): input_ids, attention_mask, labels."""

    def __init__(self, n: int = 32, vocab: int = 64) -> None:
        self.ids = torch.randint(0, vocab, (n, SEQ), generator=torch.Generator().manual_seed(7))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": self.ids[i]}


def tiny_llama():
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=64))


LORA_STEPS = 3


def tiny_lora_llama():
    """A PEFT LoRA (r = 3: uneven shards of A over 2 ranks) on q, v and down of a tiny Llama, its B factors drawn
    non-zero so that the LoRA update's start W_0 is kept too."""
    import peft

    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=3, lora_alpha=8,
                                                              target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
    return model


def hf_trainer(model, out: Path, *, micro: int, accumulation: int, distributed: bool = False):
    """An HF Trainer over :class:`Tokens` in order (the same recipe in one process and under torchrun)."""
    import transformers

    class SequentialTrainer(transformers.Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    args = transformers.TrainingArguments(
        output_dir=str(out / "hf-out"), max_steps=HF_STEPS, per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation, learning_rate=1e-3, max_grad_norm=0.05, report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True, ddp_backend="gloo" if distributed else None, seed=0)
    return SequentialTrainer(model=model, args=args, train_dataset=Tokens())


LIGHTNING_STEPS, LIGHTNING_BATCH = 3, 4  # per rank


def lightning_module(model: nn.Module):
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            return lm_loss(self.model, batch["input_ids"])

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=LR)

        def train_dataloader(self):
            # Rank r reads the examples r, r + WORLD, ... in order (Lightning's own sampler would shuffle them).
            rank, world = self.trainer.global_rank, self.trainer.world_size
            mine = torch.utils.data.Subset(Tokens(vocab=VOCAB), range(rank, len(Tokens()), world))
            return torch.utils.data.DataLoader(mine, batch_size=LIGHTNING_BATCH, shuffle=False)

    return Module()


# -- the runs ---------------------------------------------------------------------------------------------------
def _init() -> int:
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=60))
    return torch.distributed.get_rank()


def run_ddp(out: Path) -> None:
    """DDP, two no_sync passes per rank and step, clipping, AdamW; the DDP wrapper is what gets recorded."""
    from torch.nn.parallel import DistributedDataParallel

    rank = _init()
    _check_errors_on_every_rank(out, rank)
    for name, steps, gns in (("ddp.h5", STEPS, "auto"), ("ddp_per_example.h5", PER_EXAMPLE_STEPS, "per_example")):
        model = DistributedDataParallel(tiny_lm())
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
        with lorascope.record(model, out / name, optimizer=optimizer, snapshots=SNAPSHOTS, total_steps=steps,
                              gns=gns) as recorder:
            assert recorder.distributed is not None and recorder.distributed.mode == "ddp"
            assert (recorder._writer is not None) == (rank == 0), "only rank 0 writes"
            for step in range(1, steps + 1):
                ddp_step(model, optimizer, recorder, rank, step)
    _shut_down()


def run_ddp_fail(out: Path) -> None:
    """A recorder error on rank 1 at step FAIL_AT: training goes on, every rank stops recording at the next
    snapshot step, nobody waits in a collective, rank 0's file is marked failed."""
    from torch.nn.parallel import DistributedDataParallel

    rank = _init()
    model = DistributedDataParallel(tiny_lm())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with lorascope.record(model, out / "ddp_fail.h5", optimizer=optimizer, snapshots=[FAIL_SNAPSHOT],
                              total_steps=STEPS) as recorder:
            if rank == 1:
                measure = recorder._local_step

                def broken():
                    if recorder.step == FAIL_AT:
                        raise RuntimeError("injected failure")
                    return measure()

                recorder._local_step = broken
            for step in range(1, STEPS + 1):
                loss = lm_loss(model, global_batch(step).chunk(WORLD)[rank])
                loss.backward()
                recorder.log(loss=loss)
                optimizer.step()
                optimizer.zero_grad()
    messages = [str(w.message) for w in caught if issubclass(w.category, lorascope.RecordingWarning)]
    print(f"rank {rank}: trained {STEPS} steps; recording warnings: {messages}", flush=True)
    _shut_down()


def _check_errors_on_every_rank(out: Path, rank: int) -> None:
    """Bad input found on rank 0 is raised on every rank; options refused under FSDP2 likewise."""
    existing = out / "exists.h5"
    if rank == 0:
        existing.write_bytes(b"")
    torch.distributed.barrier()
    model = tiny_lm()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    try:
        lorascope.record(model, existing, optimizer=optimizer)
    except lorascope.RunFileExistsError as exc:
        print(f"rank {rank}: RunFileExistsError: {exc}", flush=True)
    else:
        raise AssertionError("an existing run file must be refused on every rank")


def run_fsdp(out: Path) -> None:
    """FSDP2 (fully_shard per decoder layer and the root) on a tiny Mixtral; each rank trains on half of the
    global batch."""
    from torch.distributed.fsdp import fully_shard

    rank = _init()
    model = tiny_mixtral()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    try:
        lorascope.record(model, out / "refused.h5", optimizer=optimizer, gns="accumulation")
    except lorascope.InvalidOptionError as exc:
        print(f"rank {rank}: InvalidOptionError: {exc}", flush=True)
    else:
        raise AssertionError("gns='accumulation' must be refused under FSDP2")
    with lorascope.record(model, out / "fsdp.h5", optimizer=optimizer, snapshots=FSDP_SNAPSHOTS,
                          total_steps=FSDP_STEPS, store_delta="float32") as recorder:
        assert recorder.distributed is not None and recorder.distributed.mode == "fsdp2"
        print(f"rank {rank}: W_0 bytes {recorder._sharded.initial_bytes()}", flush=True)
        for step in range(1, FSDP_STEPS + 1):
            ids = global_batch(step, vocab=63).chunk(WORLD)[rank]
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    lora = tiny_lora_llama()
    for layer in lora.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(lora)
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=LR)
    with lorascope.record(lora, out / "fsdp_lora.h5", optimizer=optimizer, snapshots=[1], total_steps=LORA_STEPS):
        for step in range(1, LORA_STEPS + 1):
            ids = global_batch(step, vocab=64).chunk(WORLD)[rank]
            lora(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    _shut_down()


def run_hf(out: Path) -> None:
    """The HF Trainer under torchrun (it sets up gloo itself), one lorascope.record line as in one process."""
    trainer = hf_trainer(tiny_llama(), out, micro=HF_MICRO, accumulation=HF_ACCUMULATION, distributed=True)
    lorascope.record(trainer, out / "hf.h5")
    trainer.train()
    _shut_down()


def run_lightning(out: Path) -> None:
    """Lightning's DDP strategy on two CPU processes (it launches the second one by running this script)."""
    import lightning.pytorch as pl

    trainer = pl.Trainer(accelerator="cpu", devices=WORLD, strategy="ddp", max_steps=LIGHTNING_STEPS, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False)
    lorascope.record(trainer, out / "lightning.h5")
    trainer.fit(lightning_module(tiny_lm()))
    _shut_down()


def _shut_down() -> None:
    """End the process once every rank is done. The run file is closed by then; tearing down an HF or Lightning
    DDP run with gloo on CPU sometimes aborts ("terminate called without an active exception") or hangs in a
    destructor, with or without lorascope, so the process leaves without running them."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_kill(out: Path) -> None:
    """DDP until killed; a snapshot after every step, rank 0 prints "STEP n" once step n is queued."""
    from torch.nn.parallel import DistributedDataParallel

    rank = _init()
    model = DistributedDataParallel(tiny_lm())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    with lorascope.record(model, out / "kill.h5", optimizer=optimizer, snapshots=1, queue_size=4) as recorder:
        step = 0
        while True:
            step += 1
            ids = global_batch(step).chunk(WORLD)[rank]
            loss = lm_loss(model, ids)
            loss.backward()
            recorder.log(loss=loss)
            optimizer.step()
            optimizer.zero_grad()
            print(f"STEP {step}", flush=True)


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)  # never outlive the test as a hung orphan
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    runs = {"ddp": run_ddp, "ddp_fail": run_ddp_fail, "fsdp": run_fsdp, "hf": run_hf, "lightning": run_lightning,
            "kill": run_kill}
    runs[mode](out)


if __name__ == "__main__":
    main()
