"""contributions=True: the held batch's loss with parts of the update reverted to W_0, on a tiny Llama trained for
real (plain loop and a real transformers Trainer); the weights are never left changed; refused where it cannot be
measured."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import lorascope  # noqa: E402
from lorascope.errors import InvalidOptionError  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")

VOCAB, LENGTH, BATCH, STEPS = 64, 12, 4, 8


def _batches(seed: int, n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    # A learnable task: the next token is the current one plus one.
    out = []
    for _ in range(n):
        start = torch.randint(0, VOCAB, (BATCH, 1), generator=g)
        ids = (start + torch.arange(LENGTH)) % VOCAB
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def _train(model, path, optimizer, data, **options):
    with lorascope.record(model, path, optimizer=optimizer, total_steps=len(data), snapshots=[2, len(data)],
                          overwrite=True, **options):
        for batch in data:
            model.train()
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()


def _llama(config, seed):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def test_weights_and_random_stream_unchanged_by_contributions(seed, tmp_path, tiny_llama_config):
    # Dropout draws from the global generator: a training run with contributions must end bit-identical to one
    # without (the reverts restored exactly, no random number drawn by the measurement).
    config = tiny_llama_config(attention_dropout=0.2)
    data = _batches(seed, STEPS)
    finals = []
    for contributions in (False, "layers"):
        model = _llama(config, seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        torch.manual_seed(seed + 100)
        extra = {"contributions": contributions, "held_batch": data[0]} if contributions else {}
        _train(model, tmp_path / f"run_{contributions}.h5", optimizer, data, **extra)
        assert model.training
        finals.append({k: v.clone() for k, v in model.state_dict().items()})
    assert finals[0].keys() == finals[1].keys()
    for name in finals[0]:
        assert torch.equal(finals[0][name], finals[1][name]), name


def test_weights_bit_identical_across_one_measurement(seed, tiny_llama_config):
    from lorascope.model.taxonomy import classify
    from lorascope.record.contributions import HeldLoss
    from lorascope.record.snapshot import capture_initial

    model = _llama(tiny_llama_config(), seed)
    refs = classify(model).matrices
    w0 = [capture_initial(model, ref) for ref in refs]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = HeldLoss(model, refs, _batches(seed, 1)[0], None, layers=True).measure(w0)
    assert model.training and all(m.training for m in model.modules())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert np.isfinite(losses.held_loss) and np.isfinite(losses.held_loss_start)
    assert np.isfinite(losses.held_loss_without_kind).all()
    layer = np.array([ref.layer for ref in refs])
    assert np.isfinite(losses.held_loss_without_layer[layer >= 0]).all()
    assert np.isnan(losses.held_loss_without_layer[layer < 0]).all()


def test_planted_mlp_carries_the_learning(seed, run_path, tiny_llama_config):
    # Attention is trainable (so recorded) but its learning rate is 0; embeddings, norms and head are frozen: the
    # MLP update is everything the model learned, and reverting the attention changes nothing.
    model = _llama(tiny_llama_config(), seed)
    for name, p in model.named_parameters():
        p.requires_grad_(".mlp." in name or ".self_attn." in name)
    attention = [p for n, p in model.named_parameters() if ".self_attn." in n]
    mlp = [p for n, p in model.named_parameters() if ".mlp." in n]
    optimizer = torch.optim.Adam([{"params": mlp, "lr": 1e-2}, {"params": attention, "lr": 0.0}])
    data = _batches(seed, STEPS)
    _train(model, run_path, optimizer, data, contributions="layers", held_batch=data[0])

    with lorascope.open_run(run_path) as run:
        snaps = run.snapshots
        kinds = run.modules["kind"].to_numpy()
        assert set(kinds) == {"attention", "mlp"}
        assert snaps.sizes["snapshot"] == 2
        last = snaps.isel(snapshot=-1)
        loss, start = float(last["held_loss"]), float(last["held_loss_start"])
        without = last["held_loss_without_kind"].values
        assert start - loss > 0.05  # the MLP learned something on the held batch
        np.testing.assert_array_equal(without[kinds == "attention"], loss)  # lr 0: bit-identical weights
        np.testing.assert_allclose(without[kinds == "mlp"], start, rtol=1e-6)
        # Each matrix of one kind carries its group's loss; the layer columns are measured too.
        assert np.unique(without[kinds == "mlp"]).size == 1
        assert np.isfinite(last["held_loss_without_layer"].values).all()
        # The loss now matches an independent evaluation of the final model.
        model.eval()
        with torch.no_grad():
            assert float(last["held_loss"]) == pytest.approx(float(model(**data[0]).loss), rel=1e-6)
        assert run.config["recorder"]["contributions"] == "layers"
        assert "input_ids: 4x12" in run.config["recorder"]["held_batch"]


def test_options_refusals(run_path, tiny_llama_config):
    model = _llama(tiny_llama_config(), 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(InvalidOptionError, match="needs held_batch"):
        lorascope.record(model, run_path, optimizer=opt, contributions=True)
    with pytest.raises(InvalidOptionError, match="loss_fn"):
        lorascope.record(model, run_path, optimizer=opt, contributions=True, held_batch=(torch.zeros(2, 3),))
    with pytest.raises(InvalidOptionError, match="'contributions' option"):
        lorascope.record(model, run_path, optimizer=opt, contributions="kinds")
    with pytest.raises(InvalidOptionError, match="'contributions' option"):
        lorascope.record(model, run_path, optimizer=opt, held_batch={"input_ids": torch.zeros(1, 2)})
    with pytest.raises(InvalidOptionError, match="returned no loss"):
        lorascope.record(model, run_path, optimizer=opt, contributions=True,
                         held_batch={"input_ids": torch.zeros(1, 4, dtype=torch.long)})
    assert not run_path.exists()


def test_tuple_batch_with_loss_fn(run_path, tiny_llama_config):
    model = _llama(tiny_llama_config(), 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = _batches(0, 3)
    held = (data[0]["input_ids"],)

    def loss_fn(m, batch):
        return m(input_ids=batch[0], labels=batch[0]).loss

    _train(model, run_path, opt, data, contributions=True, held_batch=held, loss_fn=loss_fn)
    with lorascope.open_run(run_path) as run:
        assert np.isfinite(run.snapshots["held_loss"].values).all()
        assert np.isnan(run.snapshots["held_loss_without_layer"].values).all()  # only with "layers"


def test_refused_for_peft_lora(run_path, tiny_llama_config):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_llama(tiny_llama_config(), 0), peft.LoraConfig(r=2, target_modules="all-linear"))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(InvalidOptionError, match="PEFT LoRA"):
        lorascope.record(model, run_path, optimizer=opt, contributions=True, held_batch=_batches(0, 1)[0])


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.rows = [row for batch in _batches(1, n // BATCH) for row in
                     ({k: v[i] for k, v in batch.items()} for i in range(BATCH))]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def test_hf_trainer_takes_its_first_batch_and_compute_loss(tmp_path, tiny_llama_config):
    def run(contributions):
        model = _llama(tiny_llama_config(), 0)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=BATCH, learning_rate=3e-3,
            report_to=[], use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(32))
        path = tmp_path / f"run_{contributions}.h5"
        lorascope.record(trainer, path, contributions=contributions, snapshots=[3, 6])
        trainer.train()
        return model, path, trainer

    plain_model, _, _ = run(False)
    model, path, trainer = run(True)
    for (name, a), b in zip(plain_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name  # the Trainer's shuffling and the weights are untouched
    first = trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)])
    model.eval()
    with torch.no_grad():
        expected = float(model(**first).loss)
    with lorascope.open_run(path) as run:
        last = run.snapshots.isel(snapshot=-1)
        assert float(last["held_loss"]) == pytest.approx(expected, rel=1e-5)
        assert float(last["held_loss_start"]) > float(last["held_loss"])
        assert np.isfinite(last["held_loss_without_kind"].values).all()
        assert run.config["recorder"]["loss_fn"] == "Trainer.compute_loss"


def test_fused_moe_experts_reverted_at_the_parameter(seed, tiny_mixtral_config):
    # Fused 3-D expert tensors are recorded per expert and half; reverting the kind must restore each whole
    # tensor (checked against a copy of the model with its expert tensors set back by hand), then put it back.
    from lorascope.model.taxonomy import classify
    from lorascope.record.contributions import HeldLoss
    from lorascope.record.snapshot import capture_initial

    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(tiny_mixtral_config())
    start = {k: v.clone() for k, v in model.state_dict().items()}
    refs = classify(model).matrices
    assert any(ref.kind == "moe_expert" and ref.part for ref in refs)
    w0 = [capture_initial(model, ref) for ref in refs]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    now = {k: v.clone() for k, v in model.state_dict().items()}
    batch = _batches(seed, 1)[0]
    losses = HeldLoss(model, refs, batch, None).measure(w0)
    for name, value in model.state_dict().items():
        assert torch.equal(value, now[name]), name
    experts = {f"{ref.module}.{ref.parameter}" for ref in refs if ref.kind == "moe_expert"}
    reverted = {k: (start[k] if k in experts else v) for k, v in now.items()}
    model.load_state_dict(reverted)
    model.eval()
    with torch.no_grad():
        expected = float(model(**batch).loss)
    kinds = np.array([ref.kind for ref in refs])
    np.testing.assert_allclose(losses.held_loss_without_kind[kinds == "moe_expert"], expected, rtol=1e-6)
    assert losses.held_loss_without_kind[kinds == "moe_expert"][0] != pytest.approx(losses.held_loss, rel=1e-4)


def test_refused_under_torch_distributed(monkeypatch, run_path, tiny_llama_config):
    # Several processes (here faked: a process group of 2 recorded per process with distributed=False): a revert
    # on one rank alone would break the replicas' agreement, or a shard's.
    model = _llama(tiny_llama_config(), 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(InvalidOptionError, match="torch.distributed"):
        lorascope.record(model, run_path, optimizer=opt, distributed=False, contributions=True,
                         held_batch=_batches(0, 1)[0])
