"""The live share of each rank's capacity used so far (docs/recording.md, "Live metrics in your tracker"): the last
one published equals what ``lorascope analyze``'s forecast computes from the finished file (its bits over the
row's capacity), each earlier one is the same estimator on the file's steps up to that snapshot, nothing is
published before the first epoch is complete, a calibration changes the capacity it divides by, and a run that
has no forecast (LoRA, RL, no dataset size) publishes no share."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorascope
from lorascope.analysis.capacity import CapacityConstant
from lorascope.analysis.live import capacity_constant, capacity_inputs
from lorascope.analysis.recipe import bits_for_plan, information_as_run
from lorascope.errors import InvalidOptionError
from lorascope.inputs.synthetic import FactsTask

pytestmark = pytest.mark.usefixtures("torch_single_thread")

FACTS, BATCH, STEPS = 64, 16, 40  # 10 epochs of random facts: full fine-tuning memorises them
RANKS = (8, 16)  # candidate ranks analyze's forecast and the live share both have (live_ranks keeps r < 32 here)


class _Collect:
    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, float]] = {}

    def __call__(self, scalars: dict[str, float], step: int) -> None:
        self.by_step.setdefault(step, {}).update(scalars)


def _facts_run(path, tracker, *, seed: int = 0, dataset: bool = True, **record_kwargs):
    """Full fine-tuning of a tiny Llama on random facts, recorded with a live tracker."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
        vocab_size=64, max_position_embeddings=16, tie_word_embeddings=False))
    task = FactsTask(facts=FACTS, vocab_size=64, values=16, key_tokens=3, seed=seed)
    ids, labels = task.tensors()
    extra = {"dataset": {"examples": FACTS}} if dataset else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(seed)
    with lorascope.record(model, path, optimizer=optimizer, total_steps=STEPS, extra_config=extra, tracker=tracker,
                          **record_kwargs):
        for _ in range(STEPS):
            chosen = torch.randint(0, FACTS, (BATCH,), generator=order)
            model(input_ids=ids[chosen], labels=labels[chosen]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return path


def _shares(scalars: dict[str, float]) -> dict[int, float]:
    prefix = "lorascope/capacity/share_r"
    return {int(name[len(prefix):]): value for name, value in scalars.items() if name.startswith(prefix)}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tracker = _Collect()
        path = _facts_run(tmp_path_factory.mktemp("live") / "run.h5", tracker)
        return path, tracker.by_step
    finally:
        torch.set_num_threads(threads)


def test_the_last_share_is_analyzes_bits_over_the_forecast_rows_capacity(recorded):
    path, published = recorded
    forecast = lorascope.analyze(path, ranks=RANKS).forecast
    assert forecast is not None
    bits = forecast.bits.bits(forecast.dataset_examples)  # the forecast's bits_to_learn
    last = published[max(published)]
    assert max(published) == STEPS  # the final snapshot's scalars reach the tracker
    assert last["lorascope/capacity/bits"] == pytest.approx(bits, rel=1e-9)
    for rank in RANKS:
        row = forecast.row("all-linear", rank)
        assert row is not None
        assert last[f"lorascope/capacity/share_r{rank}"] == pytest.approx(bits / row.prediction.capacity_bits,
                                                                          rel=1e-9), rank
    # A rank twice as large holds twice the bits (no matrix of this model is smaller than 16): half the share.
    assert last["lorascope/capacity/share_r8"] == pytest.approx(2 * last["lorascope/capacity/share_r16"], rel=1e-9)
    # Random facts memorised over 10 epochs: hundreds of bits, a visible share of a rank-8 adapter's capacity.
    assert bits > 100 and last["lorascope/capacity/share_r8"] > 0.01


def test_each_share_is_the_estimator_on_the_files_steps_up_to_its_snapshot(recorded):
    path, published = recorded
    with lorascope.open_run(path) as run:
        steps, snapshot_steps = run.steps.load(), [int(s) for s in run.snapshots["step"].values]
        seen_at = dict(zip(snapshot_steps, (int(s) for s in run.snapshots["examples_seen"].values), strict=True))
    assert sorted(published) == snapshot_steps  # every snapshot publishes (the rank-geometry scalars at least)
    with_share = [step for step in snapshot_steps if "lorascope/capacity/bits" in published[step]]
    # Nothing before the first epoch is complete; from then on, every snapshot whose estimate resolves bits.
    assert with_share and all(seen_at[step] >= FACTS for step in with_share)
    assert any(seen_at[step] < FACTS for step in snapshot_steps)  # the schedule did snapshot the first epoch
    for step in with_share:
        upto = steps.isel(step=np.flatnonzero(steps["step"].values <= step))
        information = information_as_run(upto, dataset_examples=FACTS, vocab_size=64)  # the model's vocabulary
        expected = bits_for_plan([information]).bits(FACTS)
        assert published[step]["lorascope/capacity/bits"] == pytest.approx(expected, rel=1e-9), step
        shares = _shares(published[step])
        assert set(RANKS) <= set(shares)
        assert shares[8] == pytest.approx(expected / published[STEPS]["lorascope/capacity/bits"]
                                          * published[STEPS]["lorascope/capacity/share_r8"], rel=1e-9)
    # Memorising goes on: the bits absorbed grow from the first published share to the last.
    first, last = with_share[0], with_share[-1]
    assert published[last]["lorascope/capacity/bits"] > published[first]["lorascope/capacity/bits"]


def test_a_calibration_sets_the_capacity_the_share_divides_by(tmp_path, recorded):
    _, reference = recorded
    tracker = _Collect()
    constant = CapacityConstant(0.5, 1.5, "a test calibration")
    _facts_run(tmp_path / "calibrated.h5", tracker, calibration=constant)
    last, default = tracker.by_step[STEPS], reference[STEPS]
    assert last["lorascope/capacity/bits"] == pytest.approx(default["lorascope/capacity/bits"], rel=1e-6)
    for rank in RANKS:  # kappa 0.5 instead of the default 0.69: the same bits fill 0.69 / 0.5 as much
        assert last[f"lorascope/capacity/share_r{rank}"] == pytest.approx(
            default[f"lorascope/capacity/share_r{rank}"] * 0.69 / 0.5, rel=1e-6)


def test_a_run_without_a_dataset_size_publishes_no_share(tmp_path):
    tracker = _Collect()
    _facts_run(tmp_path / "run.h5", tracker, dataset=False)
    assert tracker.by_step and not any(name.startswith("lorascope/capacity/") for scalars in tracker.by_step.values()
                                       for name in scalars)
    assert any("lorascope/all/signal_rank" in scalars for scalars in tracker.by_step.values())


@pytest.mark.parametrize("config, reason", [
    ({"lora": {"default": {"r": 4}}, "dataset": {"examples": 64}}, "a LoRA run"),
    ({"task": "rl", "dataset": {"examples": 64}}, "an RL run"),
    ({}, "no dataset size"),
])
def test_runs_analyze_gives_no_forecast_get_no_share(config, reason):
    modules = {"kind": ["mlp"], "out_features": [16], "in_features": [8], "module": ["up"], "parameter": ["weight"],
               "expert": [-1]}
    assert reason in capacity_inputs(config, modules, capacity_constant())


@pytest.mark.parametrize("calibration", ["lorascope-calibration.json", 0.69])
def test_a_calibration_that_is_not_one_is_refused_at_record(calibration, run_path, tiny_token_model):
    model = tiny_token_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(InvalidOptionError, match="load_calibration"):
        lorascope.record(model, run_path, optimizer=optimizer, tracker=lambda scalars, step: None,
                         calibration=calibration)
    assert not run_path.exists()


def test_the_default_constant_is_analyzes():
    assert capacity_constant() == CapacityConstant.default()
    assert np.isclose(capacity_constant().bits_per_parameter, 0.69)


class _Facts(torch.utils.data.Dataset):
    def __init__(self, task: FactsTask) -> None:
        self.ids, self.labels = task.tensors()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def test_an_hf_trainer_run_publishes_the_share_analyze_computes(tmp_path):
    """Through the HF integration: the dataset size comes from the Trainer's data loader, the loss tokens from the
    labels, and the final snapshot's share is published at train end."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
        vocab_size=64, max_position_embeddings=16, tie_word_embeddings=False))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), num_train_epochs=8, per_device_train_batch_size=BATCH, learning_rate=3e-3,
        lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args,
                                   train_dataset=_Facts(FactsTask(facts=FACTS, vocab_size=64, values=16, key_tokens=3)))
    tracker = _Collect()
    lorascope.record(trainer, tmp_path / "run.h5", tracker=tracker)
    trainer.train()
    forecast = lorascope.analyze(tmp_path / "run.h5", ranks=RANKS).forecast
    assert forecast is not None and forecast.dataset_examples == FACTS
    bits = forecast.bits.bits(forecast.dataset_examples)
    steps = 8 * FACTS // BATCH
    with lorascope.open_run(tmp_path / "run.h5") as run:
        assert int(run.snapshots["step"].values[-1]) == steps
    last = tracker.by_step[steps]
    assert last["lorascope/capacity/bits"] == pytest.approx(bits, rel=1e-9)
    for rank in RANKS:
        row = forecast.row("all-linear", rank)
        assert row is not None
        assert last[f"lorascope/capacity/share_r{rank}"] == pytest.approx(bits / row.prediction.capacity_bits,
                                                                          rel=1e-9)


@pytest.mark.parametrize("resumed", [False, True])
def test_a_resumed_run_publishes_no_share(resumed):
    """The writer tap sees only the rows written after a resume, not the first epoch the estimate reads: no share
    then (the same rows without the resume give one)."""
    from types import SimpleNamespace

    from lorascope.model.taxonomy import MatrixRef
    from lorascope.record.live_metrics import LiveMetrics
    from lorascope.store.payloads import Snapshot

    refs = [MatrixRef(name="up", module="up", parameter="weight", kind="mlp", role="up", layer=0, expert=-1,
                      out_features=16, in_features=8)]
    tracker = _Collect()
    live = LiveMetrics(refs, tracker)
    run_file = SimpleNamespace(_config={"dataset": {"examples": 32}}, reopen=lambda after: (0, 0),
                               append_steps=lambda rows: None, append_snapshot=lambda snapshot: None)
    tapped = live.tap(run_file)
    if resumed:
        tapped.reopen(0)
    steps = np.arange(1, 9)
    tapped.append_steps({"step": steps, "loss": np.repeat([4.0, 4.0, 1.0, 1.0], 2) * np.log(2),
                         "batch_examples": np.full(8, 8), "batch_tokens": np.full(8, 8),
                         "batch_loss_tokens": np.full(8, 8), "examples_seen": 8 * steps})
    tapped.append_snapshot(Snapshot(step=8, energy=[1.0], sv=[np.array([1.0] + [0.0] * 7)]))
    live.publish()
    published = tracker.by_step[8]
    assert "lorascope/mlp/energy_share" in published
    if resumed:
        assert not any(name.startswith("lorascope/capacity/") for name in published)
    else:  # 32 examples x (4 - 1) bits over kappa 0.69 x 24 parameters at rank 1
        assert published["lorascope/capacity/bits"] == pytest.approx(96.0)
        assert published["lorascope/capacity/share_r1"] == pytest.approx(96.0 / (0.69 * 24))


def test_a_lightning_run_publishes_the_share_analyze_computes(tmp_path):
    """Through the Lightning integration, read back from Lightning's own CSVLogger file: the dataset size comes
    from the trainer's data loader, the loss tokens from the labels the module's forward is given."""
    import csv

    pl = pytest.importorskip("lightning.pytorch")
    transformers = pytest.importorskip("transformers")
    from lightning.pytorch.loggers import CSVLogger

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, vocab_size=64, max_position_embeddings=16, tie_word_embeddings=False))

        def forward(self, **batch):
            return self.model(**batch)

        def training_step(self, batch, batch_idx):
            return self(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    torch.manual_seed(0)
    epochs = 8
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=CSVLogger(save_dir=str(tmp_path), name="csv"),
                         log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    lorascope.record(trainer, tmp_path / "run.h5")
    data = torch.utils.data.DataLoader(_Facts(FactsTask(facts=FACTS, vocab_size=64, values=16, key_tokens=3)),
                                       batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer.fit(Module(), data)
    forecast = lorascope.analyze(tmp_path / "run.h5", ranks=RANKS).forecast
    assert forecast is not None and forecast.dataset_examples == FACTS
    bits = forecast.bits.bits(forecast.dataset_examples)
    (metrics_csv,) = (tmp_path / "csv").rglob("metrics.csv")
    with metrics_csv.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("lorascope/capacity/bits")]
    last = max(rows, key=lambda r: int(r["step"]))
    assert int(last["step"]) == epochs * FACTS // BATCH
    assert float(last["lorascope/capacity/bits"]) == pytest.approx(bits, rel=1e-6)
    for rank in RANKS:
        row = forecast.row("all-linear", rank)
        assert row is not None
        assert float(last[f"lorascope/capacity/share_r{rank}"]) == pytest.approx(
            bits / row.prediction.capacity_bits, rel=1e-6)
