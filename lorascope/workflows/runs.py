"""Run files as the workflows read them: one loader, and one check that two runs (or a run and a model in memory)
are of the same model.

:func:`load_run` reads what a workflow needs from a run file (or an open :class:`~lorascope.Run`) in one pass and
closes the file. :func:`model_difference` finds the first way two models differ, from what a run file records
(its model config and its matrices) or what a model in memory holds; :func:`check_same_model` turns a difference
between two runs into the error every workflow raises.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import xarray as xr
from torch import nn

from lorascope.analysis.information import (
    RecordedInformation,
    information_from_steps,
    recorded_dataset_examples,
    recorded_vocab_size,
)
from lorascope.errors import InvalidOptionError, LorascopeError
from lorascope.model.peft import without_peft_prefix
from lorascope.model.taxonomy import classify
from lorascope.store.reader import Run, open_run

__all__ = ["STRUCTURE_KEYS", "LoadedRun", "ModelDifference", "ModelFacts", "RunLike", "check_same_model",
           "information_from_run", "load_run", "model_difference"]

RunLike = str | os.PathLike[str] | Run
"""A run file's path, or a run already open (left open)."""

SNAPSHOTS = ("all", "lora", "none")
STRUCTURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "num_local_experts", "n_embd", "n_layer", "d_model")
"""Model-config fields that must agree for two runs to be of the same model (checked where both runs carry them)."""
MATRICES = ("same", "common", "contained")


@dataclass
class LoadedRun:
    """What a workflow reads from one run file: its metadata, modules table, config, steps and snapshots.

    Attributes
    ----------
    path : str
        The path as given (an open run's own path).
    status : str
        The writer's status ("recording", "finished", "failed", ...).
    complete : bool
        The run finished and its file was closed cleanly.
    framework : str
        The training framework that recorded it ("" when unknown).
    config : dict
        The run's config sections (recorder, optimizer, model, lora, dataset, ...).
    modules : pandas.DataFrame
        One row per recorded matrix.
    steps : xarray.Dataset
        The per-step table, in memory.
    snapshots : xarray.Dataset or None
        The per-snapshot table, in memory; None when the run has no snapshot or they were not asked for.
    flags : tuple of str
        What the validation on open kept but flagged (:attr:`lorascope.store.reader.Run.flags`).
    """

    path: str
    status: str
    complete: bool
    framework: str
    config: dict[str, Any]
    modules: pd.DataFrame
    steps: xr.Dataset
    snapshots: xr.Dataset | None = None
    flags: tuple[str, ...] = ()

    @property
    def records_lora(self) -> bool:
        """At least one recorded matrix is the merged update of a PEFT LoRA layer."""
        return bool(len(self.modules) and self.modules["lora"].any())

    @property
    def model_config(self) -> dict[str, Any] | None:
        """The recorded model's configuration (a transformers config as a dict), None when not recorded."""
        return _model_config(self.config)


def load_run(source: RunLike, *, snapshots: str = "all") -> LoadedRun:
    """Read a run file (or an open run, left open) into memory.

    Parameters
    ----------
    source
        A run file's path or an open :class:`~lorascope.Run`.
    snapshots
        Which runs' snapshot table to read: ``"all"``, ``"lora"`` (only a run that records LoRA updates) or
        ``"none"``. The table holds every spectrum, so a workflow that does not need it leaves it on disk.

    Raises
    ------
    RunFileError
        The file cannot be read as a lorascope run (a subclass names the problem).
    InvalidOptionError
        An unknown ``snapshots``.
    """
    if snapshots not in SNAPSHOTS:
        raise InvalidOptionError(f"The 'snapshots' parameter of load_run must be one of {SNAPSHOTS}. "
                                 f"Got {snapshots!r} instead.")
    if isinstance(source, Run):
        return _read(source, str(source.path), snapshots)
    with open_run(source) as run:
        return _read(run, os.fspath(source), snapshots)


def _read(run: Run, path: str, snapshots: str) -> LoadedRun:
    loaded = LoadedRun(path=path, status=run.status, complete=run.complete,
                       framework=str(run.attrs.get("framework", "")), config=run.config, modules=run.modules,
                       steps=run.steps.load(), flags=tuple(run.flags))
    if run.n_snapshots and (snapshots == "all" or (snapshots == "lora" and loaded.records_lora)):
        loaded.snapshots = run.snapshots.load()
    return loaded


def information_from_run(path: RunLike | LoadedRun, *, dataset_examples: int | None = None) -> RecordedInformation:
    """:func:`~lorascope.analysis.information.information_from_steps` of a run file (or of a run already loaded);
    the epoch size defaults to the run's recorded dataset size (config ``dataset.examples``, written by the HF and
    Lightning integrations or given by the user through ``extra_config={"dataset": {"examples": N}}``)."""
    run = path if isinstance(path, LoadedRun) else load_run(path, snapshots="none")
    if dataset_examples is None:
        dataset_examples = recorded_dataset_examples(run.config)
    return information_from_steps(run.steps, dataset_examples=dataset_examples,
                                  vocab_size=recorded_vocab_size(run.config))


# -- the same-model check --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """What identifies a model for the same-model check: its config fields and its matrices.

    Attributes
    ----------
    source : str
        Where the facts come from: a run file's path, or a label such as "this model".
    config : mapping
        Model-config fields (empty when unknown).
    matrices : tuple of (name, out_features, in_features)
        The recorded (or recordable) matrices, in order.
    """

    source: str
    config: Mapping[str, Any]
    matrices: tuple[tuple[str, int, int], ...]

    @classmethod
    def of_run(cls, run: LoadedRun | Run) -> ModelFacts:
        """The recorded model config and matrices of a run (loaded, or open: nothing more is read)."""
        modules = run.modules
        matrices = tuple((str(n), int(o), int(i)) for n, o, i in zip(modules["name"], modules["out_features"],
                                                                      modules["in_features"]))
        return cls(str(run.path), _model_config(run.config) or {}, matrices)

    @classmethod
    def of_model(cls, model: nn.Module, source: str = "this model") -> ModelFacts:
        config = getattr(model, "config", None)
        values = config.to_dict() if config is not None and callable(getattr(config, "to_dict", None)) else {}
        refs = classify(model, include_frozen=True).matrices
        return cls(source, values, tuple((r.name, r.out_features, r.in_features) for r in refs))


@dataclass(frozen=True)
class ModelDifference:
    """The first way two models differ.

    Attributes
    ----------
    kind : str
        ``"config"``: a config field (``name``) differs; ``"shape"``: matrix ``name`` has another shape;
        ``"missing"``: matrix ``name`` of the other model is not in the reference; ``"matrices"``: the two record
        different matrices (``reference`` and ``other`` are the first differing (name, out, in), or the counts).
    name : str
    reference, other
        The values in the reference and in the other model.
    """

    kind: str
    name: str
    reference: Any
    other: Any

    def describe(self, reference: str, other: str) -> str:
        """The difference in words, the two models called ``reference`` and ``other``."""
        if self.kind == "config":
            return f"{reference} has {self.name} = {self.reference!r}, {other} has {self.name} = {self.other!r}"
        if self.kind == "shape":
            return (f"{self.name} is {_shape(self.reference)} in {reference} but {_shape(self.other)} in {other}")
        if self.kind == "missing":
            return f"{self.name}, recorded in {other}, is not a matrix of {reference}"
        if isinstance(self.reference, tuple) and isinstance(self.other, tuple):
            detail = (f"first difference: {self.reference[0]} {_shape(self.reference[1:])} vs {self.other[0]} "
                      f"{_shape(self.other[1:])}")
        else:
            detail = f"{self.reference} vs {self.other} matrices"
        return f"{reference} and {other} record different matrices ({detail})"


def model_difference(reference: ModelFacts, other: ModelFacts, *, keys: Sequence[str] = STRUCTURE_KEYS,
                     matrices: str = "common") -> tuple[ModelDifference | None, bool]:
    """The first way ``other`` is not the model of ``reference``, and whether the check had anything to compare.

    Config fields ``keys`` present in both must agree; then the matrices, by the rule ``matrices``:

    ``"same"``
        Both record the same matrices, names and shapes, in the same order (runs that share a curve).
    ``"common"``
        Matrices both record (PEFT's name prefix removed) have the same shape (a LoRA run against a full
        fine-tuning run).
    ``"contained"``
        Every matrix of ``other`` (PEFT's prefix removed; a wrapper's leading components dropped until the name
        is one of ``reference``'s) is a matrix of ``reference``, with the same shape (a probe against the model).

    Returns
    -------
    (ModelDifference or None, bool)
        The first difference found (config fields first), and False when neither a config field nor a matrix
        could be compared (nothing verified).

    Examples
    --------
    >>> a = ModelFacts("a.h5", {"hidden_size": 32}, (("q", 32, 32),))
    >>> b = ModelFacts("b.h5", {"hidden_size": 32}, (("base_model.model.q", 32, 32), ("v", 8, 32)))
    >>> model_difference(a, b)
    (None, True)
    >>> model_difference(a, b, matrices="contained")[0].describe("a", "b")
    'v, recorded in b, is not a matrix of a'
    """
    if matrices not in MATRICES:
        raise InvalidOptionError(f"The 'matrices' parameter of model_difference must be one of {MATRICES}. "
                                 f"Got {matrices!r} instead.")
    for key in keys:
        if key in reference.config and key in other.config and reference.config[key] != other.config[key]:
            return ModelDifference("config", key, reference.config[key], other.config[key]), True
    verified = any(key in reference.config and key in other.config for key in keys)
    if matrices == "same":
        if reference.matrices == other.matrices:
            return None, True
        pair = next(((a, b) for a, b in zip(reference.matrices, other.matrices) if a != b), None)
        if pair is None:
            return ModelDifference("matrices", "", len(reference.matrices), len(other.matrices)), True
        return ModelDifference("matrices", "", *pair), True
    shapes = {without_peft_prefix(name): (out, inp) for name, out, inp in reference.matrices}
    for name, out, inp in other.matrices:
        base = without_peft_prefix(name)
        if matrices == "contained" and base not in shapes:  # recorded under a wrapper: its longest known suffix
            base = next((base[i + 1:] for i, c in enumerate(base) if c == "." and base[i + 1:] in shapes), base)
        if base not in shapes:
            if matrices == "contained":
                return ModelDifference("missing", base, None, (out, inp)), True
            continue
        if shapes[base] != (out, inp):
            return ModelDifference("shape", base, shapes[base], (out, inp)), True
        verified = True
    return None, verified


def check_same_model(reference: ModelFacts, other: ModelFacts, *, refusal: str, matrices: str = "common",
                     notes: list[str] | None = None) -> None:
    """Refuse two runs of different models (config fields, then matrices; see :func:`model_difference`).

    Parameters
    ----------
    reference, other
        :meth:`ModelFacts.of_run` of the two runs.
    refusal
        What the workflow cannot do with runs of different models ("cannot be compared", "cannot share a curve").
    matrices
        The matrices rule of :func:`model_difference`.
    notes
        Where to say that nothing could be compared; without it that goes unsaid.

    Raises
    ------
    LorascopeError
        "runs of different models <refusal>: ..." with the first difference.
    """
    difference, verified = model_difference(reference, other, matrices=matrices)
    if difference is not None:
        raise LorascopeError(f"runs of different models {refusal}: "
                             f"{difference.describe(reference.source, other.source)}")
    if not verified and notes is not None:
        notes.append(f"{other.source}: could not verify that it trains the same model as {reference.source} (no "
                     "model config and no recorded matrix in common)")


def _model_config(config: Mapping[str, Any]) -> dict[str, Any] | None:
    model = config.get("model")
    values = model.get("config") if isinstance(model, dict) else None
    return values if isinstance(values, dict) else None


def _shape(shape: Sequence[int]) -> str:
    return f"{shape[0]}x{shape[1]}"
