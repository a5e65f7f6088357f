"""Live metrics in the user's tracker (docs/recording.md): the scalars are analyze's own numbers, and they land
where the user logs, read back with each tracker's own reader: TensorBoard event files (a SummaryWriter, the HF
Trainer's ``report_to=["tensorboard"]``, Lightning's TensorBoardLogger), Lightning's CSVLogger file, W&B offline,
MLflow's local store. A tracker lorascope does not know is refused at record(); one that raises warns once."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch

import lorascope
from lorascope.analysis.live import NoiseScaleEMA, group_norms, live_ranks
from lorascope.analysis.metrics import aggregate, update_metrics
from lorascope.analysis.noise import noise_scale

pytestmark = [
    pytest.mark.usefixtures("torch_single_thread"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec"),  # lightning 2.6 on a newer torch
]

N_STEPS, BATCH, PASSES = 8, 4, 2
SEED = 0  # the trackers' tests check plumbing; the numbers are checked for every seed above


class _Collect:
    """A callable tracker: every (step, scalars) it was given, and the threads it was called on."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, dict[str, float]]] = []
        self.threads: set[int] = set()

    def __call__(self, scalars: dict[str, float], step: int) -> None:
        self.calls.append((step, dict(scalars)))
        self.threads.add(threading.get_ident())

    def by_step(self) -> dict[int, dict[str, float]]:
        out: dict[int, dict[str, float]] = {}
        for step, scalars in self.calls:
            out.setdefault(step, {}).update(scalars)
        return out


def _train(make_model, path, seed, **record_kwargs):
    """A plain loop of N_STEPS optimizer steps of PASSES backward passes each (so the noise scale is measured)."""
    torch.manual_seed(seed)
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(seed)
    with lorascope.record(model, path, optimizer=optimizer, total_steps=N_STEPS, snapshots=2,
                          **record_kwargs) as recorder:
        for _ in range(N_STEPS):
            for _ in range(PASSES):
                ids = torch.randint(0, model.vocab, (BATCH, 10), generator=data)
                (model.loss(ids) / PASSES).backward()
                recorder.log(examples=BATCH)
            optimizer.step()
            optimizer.zero_grad()
    return recorder


def test_plain_loop_publishes_analyzes_numbers(seed, run_path, tiny_token_model):
    tracker = _Collect()
    _train(tiny_token_model, run_path, seed, tracker=tracker)
    published = tracker.by_step()
    assert tracker.threads == {threading.get_ident()}  # published on the training thread only

    with lorascope.open_run(run_path) as run:
        snapshots, steps = run.snapshots.load(), run.steps.load()
    ranks = live_ranks(snapshots["out_features"].values, snapshots["in_features"].values)
    metrics = update_metrics(snapshots, p=(0.9,), ranks=ranks)
    by_kind, overall = aggregate(metrics, by="kind"), aggregate(metrics, by="all")
    assert sorted(published) == [int(s) for s in snapshots["step"].values]  # every snapshot, at its own step
    for i, step in enumerate(snapshots["step"].values):
        scalars = published[int(step)]
        for groups, by in ((by_kind, "kind"), (overall, "all")):
            for group in groups[by].values:
                g = groups.isel(snapshot=i).sel({by: group})
                expected = {"energy_rank_p90": g["energy_rank"].sel(p=0.9), "signal_rank": g["signal_rank"],
                            "energy_share": g["energy_share"],
                            **{f"rank_residual_r{r}": g["rank_residual"].sel(rank=r) for r in ranks}}
                for metric, value in expected.items():
                    name = f"lorascope/{group}/{metric}"
                    if np.isfinite(float(value)):
                        assert scalars[name] == pytest.approx(float(value), rel=1e-5), name  # file: float32
                    else:
                        assert name not in scalars
    assert published[N_STEPS]["lorascope/all/energy_share"] == pytest.approx(1.0)
    assert {"lorascope/mlp/rank_residual_r1", "lorascope/embedding/signal_rank"} <= set(published[N_STEPS])

    # The noise scale at the last step is the EMA ratio analyze computes over the whole run.
    reference = noise_scale(steps)
    assert reference is not None
    last = reference.series["b_simple"].isel(step=-1)
    for group in reference.series["group"].values:
        name = f"lorascope/{group}/noise_scale"
        if np.isfinite(float(last.sel(group=group))) and float(reference.series["ema_g2"].isel(step=-1)
                                                                .sel(group=group)) > 0:
            assert published[N_STEPS][name] == pytest.approx(float(last.sel(group=group)), rel=1e-9), name
    b_noise = published[N_STEPS]["lorascope/all/noise_scale"]
    assert published[N_STEPS]["lorascope/all/batch_over_noise_scale"] == pytest.approx(BATCH * PASSES / b_noise)


def test_noise_scale_ema_streams_what_noise_scale_computes_at_once(seed):
    rng = np.random.default_rng(seed)
    kinds = ["mlp", "mlp", "attention"]
    small = rng.uniform(1.0, 3.0, size=(30, 3))
    big = small * rng.uniform(0.2, 0.9, size=(30, 3))
    small[4, 1] = np.nan  # one matrix unmeasured at one step: left out of that step's sums
    import xarray as xr

    steps = xr.Dataset({"gns_sq_norm_small": (("step", "module"), small), "gns_sq_norm_big": (("step", "module"), big),
                        "gns_batch_small": ("step", np.full(30, 2.0)), "gns_batch_big": ("step", np.full(30, 8.0))},
                       coords={"step": np.arange(1, 31), "kind": ("module", kinds),
                               "examples_seen": ("step", 8 * np.arange(1, 31))})
    ema = NoiseScaleEMA()
    for t in range(30):
        ema = ema.update(group_norms(small[t], big[t], kinds), 2.0, 8.0)
    reference = noise_scale(steps).series["b_simple"].isel(step=-1)
    streamed = ema.b_simple()
    for group in ("all", "mlp", "attention"):
        if np.isfinite(float(reference.sel(group=group))):
            assert streamed[group] == pytest.approx(float(reference.sel(group=group)), rel=1e-10)


def _event_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files under ``folder``, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return out


def test_tensorboard_summary_writer(tmp_path, tiny_token_model):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    reference = _Collect()
    _train(tiny_token_model, tmp_path / "a.h5", SEED, tracker=reference)
    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    _train(tiny_token_model, tmp_path / "b.h5", SEED, tracker=writer)
    writer.close()
    stored = _event_scalars(tmp_path / "tb")
    expected = reference.by_step()
    assert set(stored) == {name for scalars in expected.values() for name in scalars}
    for name, points in stored.items():
        assert points == [(step, pytest.approx(s[name], rel=1e-6)) for step, s in sorted(expected.items())
                          if name in s]


def test_unknown_tracker_is_refused_at_record(run_path, tiny_token_model):
    model = tiny_token_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(lorascope.InvalidOptionError, match="'tracker' parameter of lorascope.record.*Got builtins"):
        lorascope.record(model, run_path, optimizer=optimizer, tracker={"not": "a tracker"})
    assert not run_path.exists()


def test_failing_tracker_warns_once_and_recording_goes_on(run_path, tiny_token_model):
    calls = []

    def broken(scalars, step):
        calls.append(step)
        raise ConnectionError("tracker server unreachable")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(tiny_token_model, run_path, SEED, tracker=broken)
    messages = [str(w.message) for w in caught if issubclass(w.category, lorascope.RecordingWarning)]
    assert len(messages) == 1 and "ConnectionError: tracker server unreachable" in messages[0]
    assert calls == [calls[0]]  # not called again after it failed
    with lorascope.open_run(run_path) as run:
        assert run.complete
        assert run.steps.sizes["step"] == N_STEPS and run.snapshots.sizes["snapshot"] == N_STEPS // 2


def test_wandb_offline_run(tmp_path, tiny_token_model, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    reference = _Collect()
    _train(tiny_token_model, tmp_path / "a.h5", SEED, tracker=reference)
    run = wandb.init(mode="offline", dir=str(tmp_path), project="lorascope-test")
    _train(tiny_token_model, tmp_path / "b.h5", SEED, tracker=run)
    run.log({"user/loss": 1.0})  # the user's own logging goes on alongside
    run.finish()
    history = _wandb_history(tmp_path)
    expected = reference.by_step()
    lorascope_rows = [row for row in history if "lorascope/step" in row]
    assert [int(row["lorascope/step"]) for row in lorascope_rows] == sorted(expected)
    for row in lorascope_rows:
        scalars = expected[int(row["lorascope/step"])]
        assert {k: pytest.approx(v, rel=1e-6) for k, v in scalars.items()} == {
            k: v for k, v in row.items() if k.startswith("lorascope/") and k != "lorascope/step"}
    assert any("user/loss" in row for row in history)


def _wandb_history(folder) -> list[dict[str, float]]:
    """The history rows of the offline run under ``folder``: its .wandb file (W&B's LevelDB-style log: a 7-byte
    header, then 32 KiB blocks of records with a 7-byte header, crc32 / length / type FULL=1 FIRST=2 MIDDLE=3
    LAST=4) parsed into W&B's own protobuf ``Record`` messages. wandb's service may still be writing the file
    when ``finish()`` returns: it is read again until its ``exit`` record is there, and a record cut off at the
    file's end (CI once caught one mid-write) ends that reading."""
    import time

    (path,) = folder.rglob("run-*.wandb")
    for _ in range(600):
        rows, finished = _wandb_records(path.read_bytes())
        if finished:
            return rows
        time.sleep(0.1)
    raise AssertionError(f"{path} has no exit record")


def _wandb_records(data: bytes) -> tuple[list[dict[str, float]], bool]:
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    assert data[:4] == b":W&B"
    block, pos, pending, rows, finished = 32768, 7, b"", [], False
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if (length == 0 and kind == 0) or pos + 7 + length > len(data):
            break  # the end of what the service has written so far
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            finished = finished or record.WhichOneof("record_type") == "exit"
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows, finished


@pytest.mark.slow  # MLflow's local store is a SQLite database: creating it takes 7-15 s on two busy cores
def test_mlflow_local_store(tmp_path, tiny_token_model):
    mlflow = pytest.importorskip("mlflow")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    reference = _Collect()
    _train(tiny_token_model, tmp_path / "a.h5", SEED, tracker=reference)
    expected = reference.by_step()
    try:
        with mlflow.start_run() as active:  # the module: its active run
            _train(tiny_token_model, tmp_path / "b.h5", SEED, tracker=mlflow)
        with mlflow.start_run() as other:
            pass
        _train(tiny_token_model, tmp_path / "c.h5", SEED, tracker=other)  # a run object, no longer active
    finally:
        mlflow.set_tracking_uri("")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    for run_id in (active.info.run_id, other.info.run_id):
        keys = set(client.get_run(run_id).data.metrics)
        assert keys == {name for scalars in expected.values() for name in scalars}
        for name in ("lorascope/all/energy_rank_p90", "lorascope/mlp/rank_residual_r1", "lorascope/all/noise_scale"):
            history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
            assert history == [(step, pytest.approx(s[name], rel=1e-6)) for step, s in sorted(expected.items())
                               if name in s]


def _expected_from_file(path) -> dict[int, dict[str, float]]:
    """The snapshot scalars of every snapshot of a run file (without the noise scale)."""
    from lorascope.analysis.live import snapshot_scalars

    with lorascope.open_run(path) as run:
        snapshots = run.snapshots.load()
    out = {}
    shapes = snapshots["out_features"].values, snapshots["in_features"].values
    for i, step in enumerate(snapshots["step"].values):
        row = snapshots.isel(snapshot=i)
        sv = [row["sv"].values[j, : int(row["sv_count"].values[j])] for j in range(row.sizes["module"])]
        out[int(step)] = snapshot_scalars(row["energy"].values, sv, *shapes, snapshots["kind"].values,
                                          delta_nonfinite=row["delta_nonfinite"].values)
    return out


class _Tokens(torch.utils.data.Dataset):
    """Causal-LM examples with labels (a Trainer's dataset and a Lightning DataLoader's)."""

    def __init__(self, n: int, vocab: int, length: int = 8) -> None:
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def test_hf_trainer_report_to_tensorboard(tmp_path, tiny_llama_config):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tensorboard")
    torch.manual_seed(SEED)
    model = transformers.LlamaForCausalLM(tiny_llama_config())
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=3e-3, report_to=["tensorboard"], use_cpu=True, save_strategy="no", logging_steps=2, seed=0,
        disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(32, vocab=64))
    lorascope.record(trainer, tmp_path / "run.h5", snapshots=2)  # nothing else: report_to decides
    trainer.train()

    stored = _event_scalars(tmp_path / "out")
    assert [g for g, _ in stored["train/loss"]] == [2, 4]  # the Trainer's own curves, untouched, beside ours
    expected = _expected_from_file(tmp_path / "run.h5")
    snapshot_steps = [(g, int(s)) for g, s in stored["train/lorascope/step"]]  # (global step, snapshot step)
    assert sorted(s for _, s in snapshot_steps) == sorted(expected)
    for name in ("lorascope/all/energy_rank_p90", "lorascope/attention/signal_rank", "lorascope/mlp/energy_share",
                 "lorascope/attention/rank_residual_r4"):
        points = stored[f"train/{name}"]
        assert [g for g, _ in points] == [g for g, _ in snapshot_steps]
        for (global_step, value), (_, snapshot_step) in zip(points, snapshot_steps):
            assert global_step >= snapshot_step  # published once written: at its step or later
            assert value == pytest.approx(expected[snapshot_step][name], rel=1e-6), (name, snapshot_step)
    assert len(list((tmp_path / "out").rglob("events.out.tfevents.*"))) == 1  # published before TB's writer closed
    # Two passes per step: the noise scale is measured (a group whose EMA of |G|^2 is not yet positive has none).
    assert any(name.startswith("train/lorascope/") and name.endswith("/noise_scale") for name in stored)
    assert any("lorascope/all/energy_rank_p90" in entry for entry in trainer.state.log_history)


def test_lightning_tensorboard_and_csv_loggers(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    vocab = 32

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.fc1, self.fc2 = torch.nn.Embedding(vocab, 16), torch.nn.Linear(16, 24), \
                torch.nn.Linear(24, vocab)

        def training_step(self, batch, batch_idx):
            logits = self.fc2(torch.relu(self.fc1(self.embed(batch["input_ids"]))))
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), batch["labels"].reshape(-1))
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    torch.manual_seed(SEED)
    loggers = [TensorBoardLogger(save_dir=str(tmp_path), name="tb"), CSVLogger(save_dir=str(tmp_path), name="csv")]
    trainer = pl.Trainer(accelerator="cpu", max_steps=6, accumulate_grad_batches=2, logger=loggers,
                         log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    lorascope.record(trainer, tmp_path / "run.h5", snapshots=2)
    trainer.fit(Module(), torch.utils.data.DataLoader(_Tokens(64, vocab=vocab), batch_size=4))
    expected = _expected_from_file(tmp_path / "run.h5")
    assert sorted(expected) == [2, 4, 6]

    stored = _event_scalars(tmp_path / "tb")
    assert "train_loss" in stored
    import csv

    (metrics_csv,) = (tmp_path / "csv").rglob("metrics.csv")
    with metrics_csv.open() as f:
        rows = list(csv.DictReader(f))
    for name in ("lorascope/all/energy_rank_p90", "lorascope/mlp/signal_rank", "lorascope/embedding/energy_share",
                 "lorascope/mlp/rank_residual_r1"):
        want = [(step, pytest.approx(s[name], rel=1e-6)) for step, s in sorted(expected.items())]
        assert stored[name] == want, name
        assert [(int(r["step"]), float(r[name])) for r in rows if r.get(name)] == want, name
    assert any(name.startswith("lorascope/") and name.endswith("/noise_scale") for name in stored)


def test_hf_trainer_with_its_own_tracker_or_none(tmp_path, tiny_llama_config):
    transformers = pytest.importorskip("transformers")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, report_to=[], use_cpu=True,
        save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True)
    trainers = []
    for tracker in (_Collect(), False):
        torch.manual_seed(SEED)
        trainer = transformers.Trainer(model=transformers.LlamaForCausalLM(tiny_llama_config()), args=args,
                                       train_dataset=_Tokens(8, vocab=64))
        lorascope.record(trainer, tmp_path / f"run{len(trainers)}.h5", snapshots=1, tracker=tracker)
        trainer.train()
        trainers.append((trainer, tracker))
    (with_tracker, collected), (without, _) = trainers
    assert [step for step, _ in collected.calls] == [1, 2]  # the snapshots' own steps, to the given tracker
    assert collected.threads == {threading.get_ident()}
    for trainer in (with_tracker, without):  # not through the Trainer's logging
        assert not any("lorascope/step" in entry for entry in trainer.state.log_history)
