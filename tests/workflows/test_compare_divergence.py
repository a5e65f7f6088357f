"""``lorascope compare`` says when a LoRA run or the full fine-tuning run diverged (issue 15): a note in the
Comparison (and compare.json), printed with the text report; none for runs that stayed finite."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner

from lorascope.report.compare import format_comparison
from lorascope.store.writer import RunWriter
from lorascope.workflows.compare import compare
from lorascope_cli.main import cli

N_STEPS, BATCH = 200, 8


def _write(path, loss, *, rank=None, grad_inf_from=None):
    """A run file of one module with this loss per step; a PEFT LoRA run of ``rank`` when given; the module's
    gradient non-finite (+Inf squared norm) from step ``grad_inf_from``."""
    steps = np.arange(1, len(loss) + 1)
    name = ("base_model.model." if rank else "") + "model.layers.0.mlp.up_proj"
    module = dict(name=name, module=name, parameter="weight", kind="mlp", role="up", layer=0, expert=-1,
                  out_features=8, in_features=4, lora=bool(rank))
    config = {"lora": {"default": {"r": rank, "lora_alpha": 16, "use_rslora": False, "scaling_rule": "alpha/r",
                                   "rank_pattern": {}, "alpha_pattern": {}}}} if rank else {}
    grad = np.ones((len(loss), 1))
    nonfinite = np.zeros(len(loss), dtype=np.int32)
    if grad_inf_from is not None:
        grad[grad_inf_from - 1:] = np.inf
        nonfinite[grad_inf_from - 1:] = 1
    with RunWriter(path, [module], config=config) as writer:
        writer.append_steps({"step": steps, "examples_seen": BATCH * steps, "tokens_seen": 16 * BATCH * steps,
                             "loss": loss, "batch_examples": np.full(len(loss), BATCH), "grad_sq_norm": grad,
                             "grad_nonfinite_modules": nonfinite})
    return str(path)


def _loss(seed: int) -> np.ndarray:
    steps = np.arange(1, N_STEPS + 1)
    return 3.0 - 0.3 * np.log(steps) + np.random.default_rng(seed).normal(0, 0.02, N_STEPS)


def _divergence_notes(comparison) -> list[str]:
    return [note for note in comparison.notes if "diverged" in note]


def test_a_lora_run_that_diverged_is_named_with_its_step(tmp_path):
    full = _write(tmp_path / "full.h5", _loss(0))
    lora_loss = _loss(1)
    lora_loss[150:] = np.nan  # the loss went NaN at step 151, with the gradient
    lora = _write(tmp_path / "lora.h5", lora_loss, rank=4, grad_inf_from=151)
    clean = _write(tmp_path / "lora8.h5", _loss(2), rank=8)
    result = compare(full, [lora, clean])
    notes = _divergence_notes(result)
    assert len(notes) == 1, result.notes
    assert notes[0].startswith(f"{lora}: LoRA run diverged at step 151 ({151 * BATCH:,} examples)")
    assert "loss at step 151, gradient at step 151" in notes[0]
    assert notes[0] in result.to_dict()["notes"]
    assert notes[0] in format_comparison(result.summary)


def test_a_full_run_whose_loss_turned_infinite_is_named(tmp_path):
    full_loss = _loss(0)
    full_loss[120:] = np.inf
    full = _write(tmp_path / "full.h5", full_loss)
    lora = _write(tmp_path / "lora.h5", _loss(1), rank=4)
    notes = _divergence_notes(compare(full, lora))
    assert notes == [f"{full}: the full fine-tuning run diverged at step 121 ({121 * BATCH:,} examples) (first "
                     "non-finite loss at step 121); its curve holds only its finite losses, and what it shows after "
                     "that step is the divergence, not the rank"]
    result = CliRunner().invoke(cli, ["compare", full, lora, "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "the full fine-tuning run diverged at step 121" in " ".join(result.stdout.split())


def test_runs_that_stayed_finite_get_no_divergence_note(tmp_path):
    full = _write(tmp_path / "full.h5", _loss(0))
    lora = _write(tmp_path / "lora.h5", _loss(1), rank=4)
    assert _divergence_notes(compare(full, lora)) == []
