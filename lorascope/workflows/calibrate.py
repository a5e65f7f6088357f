"""``lorascope calibrate``: measure bits stored per LoRA parameter on the user's own architecture.

A short probe: at each of a few small ranks, a real PEFT LoRA on the frozen model is trained to memorize
random key -> value facts (:class:`~lorascope.inputs.synthetic.FactsTask`) offering more bits than the adapter can
hold, and the bits it ends up holding (:func:`~lorascope.inputs.synthetic.stored_bits`) are divided by its parameter
count. The result, a :class:`Calibration`, is saved as JSON and passed to ``lorascope recommend``.

Why measure: "2 bits per parameter" (Allen-Zhu & Li, 2025) is for a whole model trained long on its facts; a
low-rank adapter on a frozen base can store far less, and how much depends on the base.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import statistics
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorascope._checks import check_positive_int, check_ranks
from lorascope._version import __version__
from lorascope.errors import InvalidOptionError, LorascopeError, ModelConfigError
from lorascope.inputs import synthetic
from lorascope.model.lora_params import lora_parameters, model_from_config
from lorascope.model.peft_config import make_lora_config, to_peft
from lorascope.model.taxonomy import classify

__all__ = ["Calibration", "CalibrationPoint", "base_model", "calibrate", "load_calibration", "memorize_with_lora",
           "model_signature"]

CALIBRATION_FORMAT = "lorascope-calibration"
CALIBRATION_VERSION = 1
EVALUATIONS = 5
"""Checkpoints (evenly spaced over the epochs) at which an adapter's stored bits are measured; the best counts."""
AUTO_ALL_LAYERS_BUDGET = 50_000
"""LoRA parameters per rank up to which ``layers="auto"`` adapts every block."""
MIN_UNCERTAINTY = 1.25
"""The smallest uncertainty factor a calibrated constant is given, even when its ranks agree exactly."""
LEARNED_FRACTION = 0.05
"""A rank whose adapter held less than this share of the bits offered did not learn: left out of the constant."""


@dataclass(frozen=True)
class CalibrationPoint:
    """One rank of a calibration run: what was offered, what the adapter held."""

    rank: int
    lora_parameters: int
    facts: int
    bits_offered: float
    bits_stored: float
    final_loss_nats: float
    epochs: int

    @property
    def bits_per_parameter(self) -> float:
        return self.bits_stored / self.lora_parameters

    @property
    def learned(self) -> bool:
        """False when the adapter held under :data:`LEARNED_FRACTION` of the bits offered: it did not learn the
        facts (too few epochs, a learning rate that failed), so it says nothing about capacity."""
        return self.bits_stored >= LEARNED_FRACTION * self.bits_offered

    @property
    def saturated(self) -> bool:
        """True when the adapter held less than 80% of what was offered (so it was full, as intended)."""
        return self.bits_stored < 0.8 * self.bits_offered

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bits_per_parameter": self.bits_per_parameter, "saturated": self.saturated,
                "learned": self.learned}


@dataclass(frozen=True)
class Calibration:
    """Bits per LoRA parameter measured on one architecture.

    Attributes
    ----------
    model : dict
        :func:`model_signature` of the calibrated model (``model_type``, ``hidden_size``, ...).
    target : str
        The LoRA target set used.
    points : tuple of CalibrationPoint
    task, training : dict
        The facts task (values, key tokens, seed) and the training settings.
    base : str
        What the frozen base was (pretrained weights, or a config with synthetic pretraining).
    """

    model: dict[str, Any]
    target: str
    points: tuple[CalibrationPoint, ...]
    task: dict[str, Any]
    training: dict[str, Any]
    base: str = ""
    created: str = ""
    lorascope_version: str = __version__
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def counted(self) -> tuple[CalibrationPoint, ...]:
        """The points the constant is taken from: the ranks whose adapter learned (all, when none did)."""
        return tuple(p for p in self.points if p.learned) or self.points

    @property
    def bits_per_parameter(self) -> float:
        """The constant: the median over the ranks that learned of bits stored per LoRA parameter."""
        return float(statistics.median(p.bits_per_parameter for p in self.counted))

    @property
    def spread(self) -> float:
        """Largest over smallest per-rank constant among the ranks that learned (1 = they agree)."""
        values = [p.bits_per_parameter for p in self.counted]
        return max(values) / min(values) if min(values) > 0 else math.inf

    @property
    def uncertainty(self) -> float:
        """Multiplicative uncertainty of the constant: the spread over ranks, at least :data:`MIN_UNCERTAINTY`."""
        return max(MIN_UNCERTAINTY, self.spread)

    def to_dict(self) -> dict[str, Any]:
        return {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION,
                "lorascope_version": self.lorascope_version, "created": self.created, "model": dict(self.model),
                "base": self.base, "target": self.target, "task": dict(self.task), "training": dict(self.training),
                "points": [p.to_dict() for p in self.points], "bits_per_parameter": self.bits_per_parameter,
                "spread": self.spread, "uncertainty": self.uncertainty, "notes": list(self.notes)}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the calibration as JSON (what ``lorascope recommend --calibration`` reads)."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def load_calibration(path: str | os.PathLike[str]) -> Calibration:
    """Read a calibration written by :meth:`Calibration.save` / ``lorascope calibrate``.

    Raises
    ------
    LorascopeError
        If the file is missing, not JSON, or not a lorascope calibration.
    """
    path = Path(path)
    if not path.is_file():
        raise LorascopeError(f"No calibration file at {str(path)!r}; write one with `lorascope calibrate`.")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != CALIBRATION_FORMAT:
            raise ValueError("not a lorascope calibration")
        if data.get("version") != CALIBRATION_VERSION:
            raise ValueError(f"calibration format version {data.get('version')!r}, this lorascope reads "
                             f"{CALIBRATION_VERSION}")
        points = tuple(CalibrationPoint(**{k: p[k] for k in CalibrationPoint.__dataclass_fields__})
                       for p in data["points"])
        if not points or any(p.lora_parameters <= 0 for p in points):
            raise ValueError("no valid calibration points")
        return Calibration(model=data["model"], target=data["target"], points=points, task=data["task"],
                           training=data["training"], base=data.get("base", ""), created=data.get("created", ""),
                           lorascope_version=data.get("lorascope_version", ""), notes=tuple(data.get("notes", ())))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise LorascopeError(f"{str(path)!r} is not a valid lorascope calibration file ({exc}).") from None


def model_signature(model: nn.Module) -> dict[str, Any]:
    """What identifies an architecture for a calibration: the config's ``model_type`` and sizes (when the model
    has a transformers config), the class name, and the parameter count."""
    config = getattr(model, "config", None)
    signature: dict[str, Any] = {"class": type(model).__name__,
                                 "parameters": int(sum(p.numel() for p in model.parameters()))}
    if config is not None:
        text = getattr(config, "get_text_config", lambda: config)()
        for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"):
            value = getattr(text, key, None)
            if isinstance(value, (int, str)):
                signature[key] = value
    return signature


def base_model(model_dir: str | os.PathLike[str] | None = None, config: str | os.PathLike[str] | None = None, *,
               pretrain_steps: int = 300, seed: int = 0,
               log: Callable[[str], None] | None = None) -> tuple[nn.Module, str]:
    """The base model to calibrate on, and a description of it for :attr:`Calibration.base`.

    Parameters
    ----------
    model_dir : str or os.PathLike, optional
        A local transformers causal-LM directory with its weights (the base you will fine-tune); nothing is
        downloaded.
    config : str or os.PathLike, optional
        Only a ``config.json`` (or its directory): the model gets random weights, first trained for
        ``pretrain_steps`` on a synthetic language (:func:`~lorascope.inputs.synthetic.pretrain_on_markov`), a
        stand-in for real weights.
    pretrain_steps : int, default 300
        Synthetic pretraining steps of a ``config`` model (0: none).
    seed : int, default 0
        Seed of the random weights and of the synthetic pretraining.
    log : callable, optional
        Receives a line before the synthetic pretraining starts.

    Raises
    ------
    InvalidOptionError
        Not exactly one of ``model_dir`` and ``config``.
    ModelConfigError
        ``model_dir`` is not a directory transformers loads a causal LM from, or ``config`` cannot be read or built.
    """
    import transformers

    if (model_dir is None) == (config is None):
        raise InvalidOptionError("base_model needs exactly one of 'model_dir' (a model directory with weights) or "
                                 "'config' (a config.json).")
    if model_dir is not None:
        if not Path(model_dir).is_dir():
            raise ModelConfigError(f"{str(model_dir)!r} is not a directory holding a transformers model.")
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelConfigError(f"cannot load a causal LM from {str(model_dir)!r}: {str(exc).splitlines()[0]}"
                                   ) from None
        return model, f"pretrained weights from {model_dir}"
    meta = model_from_config(config)  # validates the config with lorascope's messages
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(meta.config)
    vocab = model.get_output_embeddings().out_features
    if pretrain_steps:
        if log:
            log(f"pretraining the randomly initialized model for {pretrain_steps} steps on a synthetic language "
                "(a stand-in for real weights) ...")
        synthetic.pretrain_on_markov(model, vocab, steps=pretrain_steps, seed=seed)
    return model, f"config {config}: random weights + {pretrain_steps} synthetic pretraining steps"


def calibrate(model: nn.Module, *, ranks: Sequence[int] = (1, 2), target: str = "auto", values: int | None = None,
              offered_bits_per_parameter: float = 2.0, epochs: int = 300, lr: float | Sequence[float] = (1e-3, 3e-3),
              batch_size: int = 128,
              seed: int = 0, layers: Sequence[int] | str | None = "auto", base: str = "",
              log: Callable[[str], None] | None = None) -> Calibration:
    """Measure bits stored per LoRA parameter on ``model`` with real PEFT LoRA adapters.

    For each rank r: :math:`P(r)` LoRA parameters on ``target``; :math:`N = \\lceil \\rho P(r) / \\log_2 V\\rceil`
    facts offering :math:`\\rho` = ``offered_bits_per_parameter`` bits per parameter; Adam on the adapter for
    ``epochs`` passes (loss on the value token); then

    .. math:: \\kappa_r = \\mathrm{stored\\_bits} / P(r), \\qquad \\kappa = \\mathrm{median}_r\\, \\kappa_r

    The model is left as it was (adapters are removed with PEFT's ``unload``; base weights never change).

    Parameters
    ----------
    model : torch.nn.Module
        A causal LM taking ``input_ids`` and returning logits (transformers models do); its trained weights
        should be the base you will fine-tune: the constant depends on them.
    ranks : sequence of int, default (1, 2)
        Small ranks keep the probe cheap: the facts needed grow with the rank.
    target : str, default "auto"
        ``"auto"`` (all linear layers, plus fused MoE experts when present) or a target set of
        :data:`~lorascope.model.lora_params.LORA_TARGETS`.
    values : int, optional
        Size V of the value set (default ``min(256, vocab_size // 4)``).
    offered_bits_per_parameter : float, default 2.0
        Bits offered per LoRA parameter; well above what an adapter holds, so it fills up.
    epochs, batch_size, seed
        Training of each adapter.
    lr : float or sequence of float, default (1e-3, 3e-3)
        Adam learning rate; given several, each is tried at the smallest rank and the one storing the most bits is
        used for every rank (with alpha / r scaling the best LoRA learning rate barely depends on the rank).
    layers : "auto", sequence of int or None, default "auto"
        Transformer blocks to adapt. The constant is per parameter, so one block measures it as well as all of them
        at a fraction of the cost (the facts needed grow with the adapter). ``"auto"``: every block when an
        all-block adapter has at most :data:`AUTO_ALL_LAYERS_BUDGET` parameters per rank, else the middle block;
        None: every block.
    base : str
        A description of the base stored with the result.
    log : callable, optional
        Receives one progress line per rank.

    Returns
    -------
    Calibration

    Raises
    ------
    InvalidOptionError
        Bad ranks, sizes or training settings.
    ModelConfigError
        The model has no vocabulary size to draw facts from, or PEFT cannot adapt it.
    """
    ranks = check_ranks(ranks, "calibrate")
    check_positive_int("epochs", epochs, "calibrate")
    check_positive_int("batch_size", batch_size, "calibrate")
    lrs = (lr,) if isinstance(lr, (int, float)) else tuple(lr)
    if not lrs or not all(isinstance(v, (int, float)) and v > 0 for v in lrs) or not offered_bits_per_parameter > 0:
        raise InvalidOptionError("The 'lr' (a number or a list of numbers) and 'offered_bits_per_parameter' "
                                 "parameters of calibrate must be positive.")
    lr_candidates = lrs
    vocab = _vocab_size(model)
    values = values or min(256, vocab // 4)
    resolved = resolve_target(model, target)
    blocks = _calibration_layers(model, resolved, layers)
    points, notes = [], []
    for rank in ranks:
        params = rank * _per_rank(model, resolved, blocks)
        facts = math.ceil(offered_bits_per_parameter * params / math.log2(values))
        task = synthetic.FactsTask(facts=facts, vocab_size=vocab, values=values,
                                   key_tokens=_key_tokens(facts, vocab - values), seed=seed + rank)
        tried = [memorize_with_lora(model, resolved, rank, task, epochs=epochs, lr=value, batch_size=batch_size,
                                    seed=seed, layers=blocks) for value in lrs]
        best = max(range(len(lrs)), key=lambda i: tried[i].bits_stored)
        point, lrs = tried[best], (lrs[best],)  # the smallest rank picks the learning rate for the others
        if point.lora_parameters != params:  # PEFT's own count must agree with lorascope's accounting
            raise LorascopeError(f"PEFT created {point.lora_parameters} LoRA parameters at rank {rank}, lorascope "
                                 f"counted {params}; please report this architecture.")
        if not point.learned:
            notes.append(f"rank {rank}: the adapter held {point.bits_stored / point.bits_offered:.1%} of the bits "
                         "offered: it did not learn the facts (more epochs or another learning rate), so this rank "
                         "is left out of the constant")
        elif not point.saturated:
            notes.append(f"rank {rank}: the adapter held {point.bits_stored / point.bits_offered:.0%} of the bits "
                         "offered, so it may not be full: the constant is a lower bound; raise "
                         "offered_bits_per_parameter")
        points.append(point)
        if log:
            log(f"rank {rank}: {params:,} LoRA parameters, {facts:,} facts ({point.bits_offered:,.0f} bits offered), "
                f"stored {point.bits_stored:,.0f} bits = {point.bits_per_parameter:.3f} bits/parameter")
    return Calibration(model=model_signature(model), target=resolved, points=tuple(points),
                       task={"kind": "random key -> value facts", "values": values, "seed": seed},
                       training={"optimizer": "Adam", "lr": lrs[0], "lr_tried": list(map(float, lr_candidates)),
                                 "epochs": epochs, "batch_size": batch_size,
                                 "lora_alpha": 32, "offered_bits_per_parameter": offered_bits_per_parameter,
                                 "layers": None if blocks is None else sorted(blocks)},
                       base=base, created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       notes=tuple(notes))


def _calibration_layers(model: nn.Module, target: str, layers: Sequence[int] | str | None) -> frozenset[int] | None:
    if layers is None:
        return None
    adapters = lora_parameters(model, target).adapters
    present = sorted({a.layer for a in adapters if a.layer >= 0})
    if isinstance(layers, str):
        if layers != "auto":
            raise InvalidOptionError(f"The 'layers' parameter of calibrate must be 'auto', None or a list of block "
                                     f"indices. Got {layers!r} instead.")
        if sum(a.per_rank for a in adapters) <= AUTO_ALL_LAYERS_BUDGET or not present:
            return None
        return frozenset({present[len(present) // 2]})
    chosen = frozenset(layers)
    if not chosen or not chosen <= set(present):
        raise InvalidOptionError(f"The 'layers' parameter of calibrate must name blocks of this model "
                                 f"({present[0]}..{present[-1]}). Got {sorted(chosen)!r} instead.")
    return chosen


def _per_rank(model: nn.Module, target: str, layers: frozenset[int] | None) -> int:
    return sum(a.per_rank for a in lora_parameters(model, target).adapters if layers is None or a.layer in layers)


def resolve_target(model: nn.Module, target: str) -> str:
    """``"auto"``: ``"all-linear+experts"`` when the model has fused MoE experts, else ``"all-linear"``."""
    if target != "auto":
        return target
    fused = any(ref.kind == "moe_expert" and ref.expert >= 0 for ref in classify(model, include_frozen=True).matrices)
    return "all-linear+experts" if fused else "all-linear"


def memorize_with_lora(model: nn.Module, target: str, rank: int, task: synthetic.FactsTask, *, epochs: int, lr: float,
                       batch_size: int, seed: int, layers: Collection[int] | None = None) -> CalibrationPoint:
    """Train a PEFT LoRA of ``rank`` on ``target`` of the frozen ``model`` to memorize ``task``; the bits it holds.

    Adam at ``lr``, ``epochs`` shuffled passes in batches of ``batch_size``, cross-entropy on the value token,
    alpha 32 with alpha / r scaling, on the blocks ``layers`` (all when None). The stored bits are measured at
    :data:`EVALUATIONS` evenly spaced checkpoints and the best one is kept (early stopping). The adapters are
    removed afterwards (``model`` is left as it was).
    """
    import peft

    ids, labels = task.tensors()
    device = next(model.parameters()).device
    ids, values = ids.to(device), ids[:, -1].to(device)
    config = make_lora_config(model, target=target, rank=rank, task_type=None, layers=layers)
    trainable_before = {name: p.requires_grad for name, p in model.named_parameters()}
    torch.manual_seed(seed)  # LoRA's A initialization
    try:
        wrapped = peft.get_peft_model(model, to_peft(config))
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ModelConfigError(f"PEFT cannot add LoRA adapters to this model: {exc}") from None
    try:
        trainable = [p for p in wrapped.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(trainable, lr=lr)
        generator = torch.Generator().manual_seed(seed)
        checkpoints = {round(epochs * k / EVALUATIONS) for k in range(1, EVALUATIONS + 1)}
        epoch_loss, bits = math.nan, 0.0
        for epoch in range(1, epochs + 1):
            wrapped.train()
            order = torch.randperm(task.facts, generator=generator).to(device)
            total = 0.0
            for start in range(0, task.facts, batch_size):
                batch = order[start:start + batch_size]
                loss = nn.functional.cross_entropy(_value_logits(wrapped, ids[batch]).float(), values[batch])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                total += loss.item() * len(batch)
            epoch_loss = total / task.facts
            if epoch in checkpoints:  # the best checkpoint counts: a run that later diverges still held its bits
                wrapped.eval()
                with torch.no_grad():
                    logits = torch.cat([_value_logits(wrapped, ids[i:i + 512]) for i in range(0, task.facts, 512)])
                bits = max(bits, synthetic.stored_bits(logits.cpu(), task, values.cpu()))
        count = sum(p.numel() for p in trainable)
    finally:
        wrapped.unload()  # take the adapters out again; the base weights were frozen and are unchanged
        for name, p in model.named_parameters():
            p.requires_grad_(trainable_before.get(name, p.requires_grad))
    return CalibrationPoint(rank, int(count), task.facts, task.bits, bits, epoch_loss, epochs)


def _value_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits at the position that predicts the value (the last token)."""
    out = model(input_ids=ids)
    logits = out if isinstance(out, torch.Tensor) else out["logits"] if isinstance(out, dict) else out.logits
    return logits[:, -2, :]


def _vocab_size(model: nn.Module) -> int:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    size = getattr(head, "out_features", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(size, int) or size < 16:
        raise ModelConfigError("calibrate needs a causal LM with an output vocabulary of at least 16 tokens "
                               "(a transformers *ForCausalLM model).")
    return size


def _key_tokens(facts: int, key_ids: int) -> int:
    """Key length so that random keys rarely collide: ``key_ids ** k >= 1000 facts``."""
    return max(2, math.ceil(math.log(1000 * facts) / math.log(key_ids)))
