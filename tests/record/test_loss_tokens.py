"""The per-step count of loss tokens (labels != -100), which the information estimate of ``recommend`` needs."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch

import lorascope

transformers = pytest.importorskip("transformers")


def _masked_batch(generator: torch.Generator, vocab: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    ids = torch.randint(0, vocab, (3, 7), generator=generator)
    labels = ids.clone()
    labels[:, : int(torch.randint(1, 6, (), generator=generator))] = -100  # a masked prompt of random length
    return ids, labels, int((labels != -100).sum())


def test_forward_hook_counts_label_tokens_over_micro_batches(run_path, tiny_llama_config):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    expected = []
    with lorascope.record(model, run_path, optimizer=optimizer, snapshots=[1]):
        for _ in range(3):
            count = 0
            for _ in range(2):  # two micro-batches per step
                ids, labels, n = _masked_batch(generator, 64)
                model(input_ids=ids, labels=labels).loss.backward()
                count += n
            expected.append(count)
            optimizer.step()
            optimizer.zero_grad()
    with lorascope.open_run(run_path) as run:
        np.testing.assert_array_equal(run.steps["batch_loss_tokens"], expected)
        np.testing.assert_array_equal(run.steps["batch_tokens"], 2 * 3 * 7)


def test_logged_loss_tokens_take_precedence_and_missing_ones_are_unknown(run_path):
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    with lorascope.record(model, run_path, optimizer=optimizer, snapshots=[1]) as recorder:
        for step in range(2):
            model(torch.randn(5, 4)).square().mean().backward()
            if step == 0:
                recorder.log(loss_tokens=torch.tensor(11))
            optimizer.step()
            optimizer.zero_grad()
    with lorascope.open_run(run_path) as run:
        np.testing.assert_array_equal(run.steps["batch_loss_tokens"], [11, -1])


def test_file_written_before_the_column_existed_reads_as_unknown(tmp_path):
    old = tmp_path / "old.h5"
    shutil.copy("fixtures/tiny_run.h5", old)
    with h5py.File(old, "r+") as f:
        if "steps/batch_loss_tokens" in f:
            del f["steps/batch_loss_tokens"]
    with lorascope.open_run(old) as run:
        values = run.steps["batch_loss_tokens"].values
        assert values.dtype == np.int64 and len(values) == run.n_steps and np.all(values == -1)
