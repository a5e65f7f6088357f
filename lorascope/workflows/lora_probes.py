"""kappa measured on your own data: LoRA probes, recorded at the planned step budget, read as a :class:`Calibration`.

``lorascope calibrate`` measures kappa on random facts trained to a plateau. On a real pretrained model and real text
that kappa made the forecast late for large ranks (2.4-5.8x at rank 16 on SmolLM2), because in a short run a large
adapter does not fill it, and random facts trained for the same few steps do not stand in for text: past one batch of
facts an adapter held almost nothing in 64 steps, where on text it held 0.1-0.4 bits per parameter
(docs/realdata_smollm2.md, "kappa at the step budget"). A LoRA probe measures kappa where the forecast is used: a
PEFT LoRA of a small rank trained on the same slice as a full fine-tuning probe, with the planned recipe (steps,
batch, learning rate), recorded with :func:`lorascope.record`. What it absorbed (the prequential code length of the
slice minus its code length under the trained adapter, :func:`~lorascope.workflows.runs.information_from_run`, in
the units the forecast's bits are in) over its LoRA parameter count is its kappa at that budget, provided the slice
asked more than it could hold: the full fine-tuning probe of the same slice says how much was on offer.

:func:`calibration_from_runs` turns such probes (one per rank; three ranks spanning 4x in parameters fit kappa(P))
into a :class:`~lorascope.workflows.calibration.Calibration` that ``recommend`` and ``analyze`` read like any other.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from lorascope.analysis.information import RecordedInformation, recorded_dataset_examples
from lorascope.errors import InvalidOptionError
from lorascope.workflows.calibration import (
    LEARNED_FRACTION,
    LORA_PROBES,
    Calibration,
    CalibrationPoint,
    step_limited_note,
)
from lorascope.workflows.runs import LoadedRun, information_from_run, load_run

__all__ = ["calibration_from_runs"]

SIGNATURE_KEYS = ("model_type", "hidden_size", "intermediate_size", "vocab_size")


def calibration_from_runs(lora_runs: Sequence[str | os.PathLike[str]],
                          full_runs: Sequence[str | os.PathLike[str]]) -> Calibration:
    """kappa at each LoRA probe's rank: what it absorbed over its LoRA parameters, at its step budget.

    Parameters
    ----------
    lora_runs : sequence of run files
        One recorded PEFT LoRA run per rank (a single adapter, one rank for every matrix), each on a slice of the
        planned data of known size (``dataset.examples`` in its config) and trained with the planned recipe; every
        probe the same number of optimizer steps.
    full_runs : sequence of run files
        Full fine-tuning runs on the same slices (one per slice size used by a LoRA probe): what was on offer. A
        probe that absorbed 80% of it or more was not full, and its kappa is only a lower bound (a note says so).

    Returns
    -------
    Calibration
        One point per rank (``facts`` holds the slice's examples, ``bits_offered`` what full fine-tuning absorbed
        there, ``bits_stored`` what the LoRA absorbed), ``training["steps"]`` the step budget, ``task["kind"]``
        :data:`LORA_PROBES`.

    Raises
    ------
    InvalidOptionError
        No probe, a run that is not a LoRA run (or is), two probes of one rank, probes with different step budgets,
        a slice without a full fine-tuning run, a run without its dataset size or too short to measure what it
        absorbed, or runs of different models.
    """
    if not lora_runs:
        raise InvalidOptionError("calibration_from_runs needs at least one LoRA probe (a recorded PEFT LoRA run).")
    offered = _offered(full_runs)
    probes = sorted((_probe(path, offered) for path in lora_runs), key=lambda probe: probe["point"].rank)
    ranks = [probe["point"].rank for probe in probes]
    if len(set(ranks)) < len(ranks):
        raise InvalidOptionError(f"calibration_from_runs takes one LoRA probe per rank; got ranks {ranks}.")
    budgets = {probe["point"].steps for probe in probes}
    if len(budgets) > 1:
        raise InvalidOptionError(f"the LoRA probes ran different numbers of optimizer steps ({sorted(budgets)}): a "
                                 "calibration is at one step budget, that of the planned run.")
    models = {tuple(sorted(probe["model"].items())) for probe in probes} | {
        tuple(sorted(run["model"].items())) for run in offered.values()}
    if len(models) > 1:
        raise InvalidOptionError("the LoRA and full fine-tuning probes were recorded on different models "
                                 f"({', '.join(str(dict(m)) for m in sorted(models))}).")
    points = tuple(probe["point"] for probe in probes)
    references = sorted({probe["reference"] for probe in probes})
    notes = [note for probe in probes for note in probe["notes"]]
    notes += [note for size in sorted(offered) if offered[size]["path"] in references
              for note in offered[size]["notes"]]
    calibration = Calibration(
        model={"class": "from recorded runs", **probes[0]["model"]}, target=probes[0]["target"], points=points,
        task={"kind": LORA_PROBES, "lora_runs": [probe["path"] for probe in probes], "full_runs": references},
        training={"steps": budgets.pop(), "epochs": None,
                  "lr": sorted({probe["lr"] for probe in probes if probe["lr"] is not None}),
                  "batch_size": probes[0]["batch_size"], "lora_alpha": probes[0]["alpha"]},
        base="the recorded model (LoRA probes on the planned data)",
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), notes=tuple(notes))
    limited = step_limited_note(calibration)
    return calibration if limited is None else dataclasses.replace(calibration, notes=(*calibration.notes, limited))


def _offered(full_runs: Sequence[str | os.PathLike[str]]) -> dict[int, dict[str, Any]]:
    """Full fine-tuning's absorbed bits per slice size."""
    out: dict[int, dict[str, Any]] = {}
    for path in full_runs:
        run = load_run(path, snapshots="none")
        if run.records_lora:
            raise InvalidOptionError(f"{os.fspath(path)} is a LoRA run; the reference runs are full fine-tuning "
                                     "of the same slices.")
        examples = _examples(run, path)
        if examples in out:
            raise InvalidOptionError(f"two full fine-tuning runs of {examples} examples: {out[examples]['path']} and "
                                     f"{os.fspath(path)}; give one per slice size.")
        info = information_from_run(run, dataset_examples=examples)
        out[examples] = {"path": os.fspath(path), "bits": _absorbed(info, path, examples), "model": _model(run),
                         "notes": [f"{os.fspath(path)}: {note}" for note in info.notes]}
    return out


def _probe(path: str | os.PathLike[str], offered: Mapping[int, dict[str, Any]]) -> dict[str, Any]:
    run = load_run(path, snapshots="none")
    name = os.fspath(path)
    adapters = run.config.get("lora") or {}
    if not run.records_lora or len(adapters) != 1:
        raise InvalidOptionError(f"{name} is not a LoRA probe: a run of a PEFT model with one adapter "
                                 f"(it records {len(adapters)} adapter(s)).")
    adapter = next(iter(adapters.values()))
    if adapter.get("rank_pattern") or not isinstance(adapter.get("r"), int):
        raise InvalidOptionError(f"{name}: a LoRA probe needs one rank for every matrix (no rank_pattern).")
    rank = int(adapter["r"])
    examples = _examples(run, name)
    if examples not in offered:
        raise InvalidOptionError(f"{name} trained on {examples} examples and no full fine-tuning run of {examples} "
                                 "examples was given: it says what the slice offered.")
    lora = run.modules[run.modules["lora"]]
    parameters = int(rank * (lora["in_features"] + lora["out_features"]).sum())
    info = information_from_run(run, dataset_examples=examples)
    absorbed, reference = _absorbed(info, name, examples), offered[examples]["bits"]
    steps = int(run.steps.sizes["step"])
    point = CalibrationPoint(rank=rank, lora_parameters=parameters, facts=examples, bits_offered=reference,
                             bits_stored=absorbed, final_loss_nats=info.final_loss_nats,
                             epochs=math.ceil(info.epochs), steps=steps)
    notes = [f"{name}: {note}" for note in info.notes]
    if not point.learned:
        notes.append(f"rank {rank}: the LoRA probe absorbed {absorbed / reference:.1%} of what full fine-tuning did "
                     f"(under {LEARNED_FRACTION:.0%}): it did not learn (another learning rate), so it is left out")
    elif not point.saturated:
        notes.append(f"rank {rank}: the LoRA probe absorbed {absorbed / reference:.0%} of what full fine-tuning did "
                     f"on its {examples} examples, so it may not be full: its kappa is a lower bound; probe it on a "
                     "larger slice")
    optimizer = run.config.get("optimizer", {}).get("defaults", {})
    return {"path": name, "reference": offered[examples]["path"], "point": point, "notes": notes,
            "model": _model(run), "target": ", ".join(sorted(set(lora["kind"]))), "lr": optimizer.get("lr"),
            "alpha": adapter.get("lora_alpha"), "batch_size": _batch_size(run)}


def _examples(run: LoadedRun, path: str | os.PathLike[str]) -> int:
    examples = recorded_dataset_examples(run.config)
    if not examples:
        raise InvalidOptionError(f"{os.fspath(path)} does not record its dataset size: record it with "
                                 "extra_config={'dataset': {'examples': N}} (the HF and Lightning integrations do).")
    return int(examples)


def _absorbed(info: RecordedInformation, path: str | os.PathLike[str], examples: int) -> float:
    if info.absorbed_bits is None or not math.isfinite(info.absorbed_bits):
        raise InvalidOptionError(f"{os.fspath(path)} is too short to measure what it absorbed: it needs two "
                                 f"optimizer steps or more in its first epoch ({info.epoch_steps} on its {examples} "
                                 "examples).")
    return float(info.absorbed_bits)


def _model(run: LoadedRun) -> dict[str, Any]:
    config = run.model_config or {}
    return {key: config[key] for key in SIGNATURE_KEYS if key in config}


def _batch_size(run: LoadedRun) -> float | None:
    if "batch_examples" not in run.steps:
        return None
    sizes = run.steps["batch_examples"]
    median = float(sizes.where(sizes > 0).median())  # -1: not recorded
    return median if math.isfinite(median) else None
