"""Bad input to ``lorascope.record`` fails at the call, before any training step, with a message that says what
was expected; bad numbers during training (NaN/Inf) and write failures are recorded or reported, never fatal."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

import lorascope
from lorascope.errors import InvalidOptionError, LorascopeError, RecordingError, RunFileExistsError, SelectionError
from lorascope.record import snapshot_taker
from lorascope.store.writer import RunWriter

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _plain(tiny_token_model):
    torch.manual_seed(0)
    model = tiny_token_model()
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _assert_untouched(model, optimizer, path):
    """Nothing was attached and no file was created."""
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert not os.path.exists(path)


def _tiny_trainer(tmp_path, model):
    transformers = pytest.importorskip("transformers")
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, report_to=[], use_cpu=True,
                                          save_strategy="no")
    return transformers.Trainer(model=model, args=args, train_dataset=[])


def _tiny_llama(tiny_llama_config):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(tiny_llama_config())


# -- what is recorded ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", [42, "model.safetensors", torch.zeros(3, 3), torch.nn.Module])
def test_unsupported_target_names_the_supported_ones(target, run_path):
    with pytest.raises(InvalidOptionError) as info:
        lorascope.record(target, run_path)
    message = str(info.value)
    for supported in ("transformers.Trainer", "lightning.pytorch.Trainer", "torch.nn.Module with optimizer="):
        assert supported in message
    assert not os.path.exists(run_path)


def test_plain_module_needs_its_optimizer(run_path, tiny_token_model):
    model, optimizer = _plain(tiny_token_model)
    with pytest.raises(InvalidOptionError, match=r"optimizer=optimizer"):
        lorascope.record(model, run_path)
    _assert_untouched(model, optimizer, run_path)


@pytest.mark.parametrize("optimizer", ["adam", torch.zeros(2)])
def test_optimizer_must_be_a_torch_optimizer(optimizer, run_path, tiny_token_model):
    model, _ = _plain(tiny_token_model)
    with pytest.raises(InvalidOptionError, match=r"torch\.optim\.Optimizer"):
        lorascope.record(model, run_path, optimizer=optimizer)
    assert not os.path.exists(run_path)


# -- where it is recorded -----------------------------------------------------------------------------------------

def test_path_in_a_missing_folder_fails_at_the_call(tmp_path, tiny_token_model):
    model, optimizer = _plain(tiny_token_model)
    path = tmp_path / "no such folder" / "run.h5"
    with pytest.raises(LorascopeError, match="does not exist") as info:
        lorascope.record(model, path, optimizer=optimizer)
    assert not isinstance(info.value, RunFileExistsError)
    _assert_untouched(model, optimizer, path)


def test_path_that_is_a_folder_fails_at_the_call(tmp_path, tiny_token_model):
    model, optimizer = _plain(tiny_token_model)
    with pytest.raises(LorascopeError, match="is a directory"):
        lorascope.record(model, tmp_path, optimizer=optimizer)
    assert not optimizer._optimizer_step_post_hooks


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_folder_fails_at_the_call(tmp_path, tiny_token_model):
    model, optimizer = _plain(tiny_token_model)
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(LorascopeError, match="not writable"):
            lorascope.record(model, folder / "run.h5", optimizer=optimizer)
    finally:
        folder.chmod(0o700)


def test_existing_file_needs_overwrite(run_path, tiny_token_model):
    model, optimizer = _plain(tiny_token_model)
    run_path.write_bytes(b"an earlier run")
    with pytest.raises(RunFileExistsError, match="overwrite=True"):
        lorascope.record(model, run_path, optimizer=optimizer)
    assert run_path.read_bytes() == b"an earlier run"
    assert not optimizer._optimizer_step_post_hooks

    with lorascope.record(model, run_path, optimizer=optimizer, overwrite=True):
        model.loss(torch.randint(0, model.vocab, (2, 5))).backward()
        optimizer.step()
    with lorascope.open_run(run_path) as run:
        assert run.complete and run.n_steps == 1


def test_trainers_check_the_path_at_the_call(tmp_path, run_path, tiny_llama_config):
    pl = pytest.importorskip("lightning.pytorch")
    run_path.write_bytes(b"")
    trainer = _tiny_trainer(tmp_path, _tiny_llama(tiny_llama_config))
    callbacks = list(trainer.callback_handler.callbacks)
    with pytest.raises(RunFileExistsError):
        lorascope.record(trainer, run_path)
    with pytest.raises(LorascopeError, match="does not exist"):
        lorascope.record(trainer, tmp_path / "missing" / "run.h5")
    assert trainer.callback_handler.callbacks == callbacks

    lightning_trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                                   enable_progress_bar=False, enable_model_summary=False)
    callbacks = list(lightning_trainer.callbacks)
    with pytest.raises(RunFileExistsError):
        lorascope.record(lightning_trainer, run_path)
    assert lightning_trainer.callbacks == callbacks


# -- what to record -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("selection", "names_in_message"), [
    ({"kinds": ["moe_expert"]}, ["attention (8)", "mlp (6)", "embedding (1)", "head (1)"]),
    ({"modules": r"cross_attn"}, ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj"]),
    ({"kinds": ["mlp"], "modules": r"q_proj"}, ["attention (8)", "mlp (6)"]),
])
def test_selection_of_nothing_lists_what_exists(selection, names_in_message, tmp_path, run_path, tiny_llama_config):
    model = _tiny_llama(tiny_llama_config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(SelectionError) as info:
        lorascope.record(model, run_path, optimizer=optimizer, **selection)
    for name in names_in_message:
        assert name in str(info.value)
    _assert_untouched(model, optimizer, run_path)
    with pytest.raises(SelectionError):  # a transformers.Trainer is checked at the call too
        lorascope.record(_tiny_trainer(tmp_path, model), run_path, **selection)


def test_lightning_selection_of_nothing_fails_before_the_first_step(run_path):
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(4, 3)
            self.steps = 0

        def training_step(self, batch, batch_idx):
            self.steps += 1
            return self.fc1(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    lorascope.record(trainer, run_path, kinds=["attention"])  # the model is only known at train start
    module = Module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SelectionError, match=r"Kinds present: mlp \(1\)"):
            trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4))))
    assert module.steps == 0
    assert not os.path.exists(run_path)


def test_invalid_regex_is_a_selection_error(run_path, tiny_token_model):
    model, optimizer = _plain(tiny_token_model)
    with pytest.raises(SelectionError, match="regular expression"):
        lorascope.record(model, run_path, optimizer=optimizer, modules="mlp.(")


@pytest.mark.parametrize(("options", "named"), [
    ({"top_k": -1}, "top_k"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"store_delta": "float64"}, "store_delta"),
    ({"store_delta": True}, "store_delta"),
    ({"snapshots": 0}, "interval"),
    ({"snapshots": -5}, "interval"),
    ({"snapshots": []}, "steps"),
    ({"snapshots": [0, 3]}, "steps"),
    ({"snapshots": "weekly"}, "snapshots"),
    ({"snapshots": True}, "snapshots"),
    ({"snapshot_points": 1}, "snapshot_points"),
    ({"total_steps": 0}, "total_steps"),
    ({"factors_k": -1}, "factors_k"),
    ({"top_k_min_size": -1}, "top_k_min_size"),
    ({"queue_size": 0}, "queue_size"),
    ({"w0_device": "gpu"}, "w0_device"),
    ({"kinds": ["attn"]}, "kinds"),
    ({"kinds": []}, "kinds"),
    ({"modules": 3}, "modules"),
    ({"topk": 3}, "topk"),
    ({"options": {"top_k": 3}}, "RecordOptions"),
])
def test_options_out_of_range(options, named, run_path, tiny_token_model):
    model, optimizer = _plain(tiny_token_model)
    with pytest.raises(InvalidOptionError) as info:
        lorascope.record(model, run_path, optimizer=optimizer, **options)
    assert named in str(info.value)
    _assert_untouched(model, optimizer, run_path)


def test_unknown_option_lists_the_valid_ones(run_path, tiny_token_model):
    model, optimizer = _plain(tiny_token_model)
    with pytest.raises(InvalidOptionError) as info:
        lorascope.record(model, run_path, optimizer=optimizer, top_kk=3)
    assert "top_kk" in str(info.value) and "top_k" in str(info.value).replace("top_kk", "")


def test_log_rejects_a_negative_example_count(run_path, tiny_token_model):
    model, optimizer = _plain(tiny_token_model)
    with lorascope.record(model, run_path, optimizer=optimizer) as recorder:
        with pytest.raises(InvalidOptionError, match=r"The 'examples' parameter of Recorder.log .* Got -1 instead"):
            recorder.log(examples=-1)


def test_lightning_trainer_with_two_optimizers_is_refused_before_the_first_step(run_path):
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)
            self.automatic_optimization = False
            self.steps = 0

        def training_step(self, batch, batch_idx):
            self.steps += 1

        def configure_optimizers(self):
            return [torch.optim.SGD(self.fc1.parameters(), lr=0.1), torch.optim.SGD(self.fc2.parameters(), lr=0.1)]

    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    lorascope.record(trainer, run_path)
    module = Module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(InvalidOptionError, match="one optimizer; this Trainer has 2"):
            trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4))))
    assert module.steps == 0


# -- bad numbers during training ----------------------------------------------------------------------------------

def test_nan_gradient_is_recorded_and_counted(run_path, tiny_token_model):
    model, optimizer = _plain(tiny_token_model)
    data = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lorascope.RecordingWarning)
        with lorascope.record(model, run_path, optimizer=optimizer, snapshots=1) as recorder:
            for step in range(1, 6):
                loss = model.loss(torch.randint(0, model.vocab, (4, 8), generator=data))
                loss.backward()
                recorder.log(loss=loss)
                if step == 3:
                    model.mlp[0].weight.grad[0, 0] = float("nan")
                optimizer.step()
                optimizer.zero_grad()
    with lorascope.open_run(run_path) as run:
        assert run.complete and run.n_steps == 5 and run.n_snapshots == 5
        steps, snapshots = run.steps, run.snapshots
        np.testing.assert_array_equal(steps["grad_nonfinite_modules"][:3], [0, 0, 1])
        grad_at_3 = steps["grad_sq_norm"].sel(step=3)
        # A NaN gradient is stored as +Inf (NaN is kept for a matrix without a gradient: not the same thing).
        assert np.isposinf(grad_at_3.sel(module="mlp.0")) and np.isfinite(grad_at_3.drop_sel(module="mlp.0")).all()
        # The NaN reached the weight at step 3: one non-finite entry, no spectrum; the other matrices are intact.
        i = list(run.modules["name"]).index("mlp.0")
        assert snapshots["delta_nonfinite"].values[2, i] == 1 and snapshots["sv_count"].values[2, i] == 0
        assert np.isnan(snapshots["energy"].values[2, i])
        others = [j for j in range(4) if j != i]
        assert np.all(snapshots["delta_nonfinite"].values[2, others] == 0)
        assert np.all(np.isfinite(snapshots["energy"].values[2, others]))
        assert np.all(snapshots["sv_count"].values[2, others] > 0)
        # From step 4 on the whole model computes NaN: every gradient and every update is counted, nothing crashes.
        assert np.isnan(steps["loss"].values[3:]).all()
        np.testing.assert_array_equal(steps["grad_nonfinite_modules"][3:], 4)
        assert np.all(snapshots["delta_nonfinite"].values[4] > 0)


def test_inf_weight_is_recorded_and_counted(run_path, tiny_token_model):
    model, optimizer = _plain(tiny_token_model)
    data = torch.Generator().manual_seed(0)
    unused = model.vocab - 1  # a token never fed: its embedding row gets no gradient and stays infinite
    with lorascope.record(model, run_path, optimizer=optimizer, snapshots=1):
        for step in range(1, 5):
            model.loss(torch.randint(0, unused, (4, 8), generator=data)).backward()
            optimizer.step()
            optimizer.zero_grad()
            if step == 2:
                with torch.no_grad():
                    model.embed.weight[unused, 3] = float("inf")
    with lorascope.open_run(run_path) as run:
        assert run.complete
        snapshots = run.snapshots
        i = list(run.modules["name"]).index("embed")
        np.testing.assert_array_equal(snapshots["delta_nonfinite"].values[:, i], [0, 0, 1, 1])
        np.testing.assert_array_equal(snapshots["sv_count"].values[:, i], [24, 24, 0, 0])
        assert np.isinf(snapshots["energy"].values[2, i])
        np.testing.assert_array_equal(run.steps["grad_nonfinite_modules"], 0)
        assert np.all(np.isfinite(snapshots["energy"].values[:, [j for j in range(4) if j != i]]))


# -- write failures -----------------------------------------------------------------------------------------------

@pytest.fixture
def disk_full_after_three_step_writes(monkeypatch):
    """RunWriter.append_steps raises "No space left on device" from its fourth call on."""
    original = RunWriter.append_steps
    calls = []

    def append_steps(self, rows):
        calls.append(len(rows["step"]))
        if len(calls) > 3:
            raise OSError(28, "No space left on device")
        return original(self, rows)

    monkeypatch.setattr(RunWriter, "append_steps", append_steps)
    return calls


def _train_through_write_failure(model, optimizer, path, n_steps, **options):
    """Train ``n_steps``; after step 5, wait until the writer thread has died of the failure, so that the training
    thread meets it inside ``optimizer.step()`` (and not only at close). A post-hook of the user's, registered
    after the recorder's, must keep running."""
    user_hook_calls = []
    # Snapshots at every step, taken on the training thread, make the writer append exactly one step row per call,
    # in order (the snapshot worker hands a snapshot over whenever it is done, so which ones land before the
    # failure would depend on timing; its own failures are tests/record/test_record_offthread.py's).
    with lorascope.record(model, path, optimizer=optimizer, snapshots=1, snapshot_worker=False,
                          **options) as recorder:
        optimizer.register_step_post_hook(lambda *args: user_hook_calls.append(1))
        for step in range(1, n_steps + 1):
            model.loss(torch.randint(0, model.vocab, (4, 8))).backward()
            optimizer.step()
            optimizer.zero_grad()
            if step == 5:
                recorder._writer._thread.join()  # it ends only by failing (or at close)
    return len(user_hook_calls)


def test_write_failure_warns_once_and_training_continues(disk_full_after_three_step_writes, run_path,
                                                         tiny_token_model):
    model, optimizer = _plain(tiny_token_model)
    with pytest.warns(lorascope.RecordingWarning) as caught:
        steps_done = _train_through_write_failure(model, optimizer, run_path, 10)
    assert steps_done == 10
    recording_warnings = [w for w in caught if issubclass(w.category, lorascope.RecordingWarning)]
    assert len(recording_warnings) == 1
    assert "No space left on device" in str(recording_warnings[0].message)
    assert len(optimizer._optimizer_step_pre_hooks) == 0 and len(optimizer._optimizer_step_post_hooks) == 1
    with lorascope.open_run(run_path) as run:
        assert run.status == "failed" and not run.complete
        np.testing.assert_array_equal(run.step_index, [1, 2, 3])
        np.testing.assert_array_equal(run.snapshot_index, [1, 2, 3])
        assert np.all(np.isfinite(run.steps["grad_sq_norm"])) and np.all(np.isfinite(run.snapshots["energy"]))
        assert np.all(run.snapshots["sv_count"] > 0)


def test_write_failure_raises_when_strict(disk_full_after_three_step_writes, run_path, tiny_token_model):
    model, optimizer = _plain(tiny_token_model)
    with pytest.raises(RecordingError, match="No space left on device"):
        _train_through_write_failure(model, optimizer, run_path, 10, strict=True)
    with lorascope.open_run(run_path) as run:
        np.testing.assert_array_equal(run.step_index, [1, 2, 3])


def test_recorder_error_stops_recording_and_training_continues(monkeypatch, run_path, tiny_token_model):
    def broken_snapshot(*args, **kwargs):
        raise RuntimeError("recorder bug")

    model, optimizer = _plain(tiny_token_model)
    with lorascope.record(model, run_path, optimizer=optimizer, snapshots=[3]):
        user_hook_calls = []
        optimizer.register_step_post_hook(lambda *args: user_hook_calls.append(1))
        monkeypatch.setattr(snapshot_taker, "capture", broken_snapshot)  # the training thread's part
        with pytest.warns(lorascope.RecordingWarning, match="recorder bug"):
            for _ in range(5):
                model.loss(torch.randint(0, model.vocab, (2, 6))).backward()
                optimizer.step()
                optimizer.zero_grad()
    assert len(user_hook_calls) == 5
    with lorascope.open_run(run_path) as run:
        assert run.status == "failed"  # steps 4 and 5 are missing: the file must not claim to be complete
        np.testing.assert_array_equal(run.step_index, [1, 2, 3])
        assert run.n_snapshots == 0


def test_exception_in_the_loop_marks_the_run_failed(run_path, tiny_token_model):
    model, optimizer = _plain(tiny_token_model)
    with pytest.raises(KeyError, match="bad batch"):
        with lorascope.record(model, run_path, optimizer=optimizer):
            for step in range(1, 4):
                if step == 3:
                    raise KeyError("bad batch")
                model.loss(torch.randint(0, model.vocab, (2, 6))).backward()
                optimizer.step()
                optimizer.zero_grad()
    with lorascope.open_run(run_path) as run:
        assert run.status == "failed"
        np.testing.assert_array_equal(run.step_index, [1, 2])
