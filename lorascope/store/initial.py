"""The initial-weights file ``<run>.w0.h5``: W_0 of every recorded matrix, kept so that a run resumed from a
checkpoint can go on measuring updates against the true start instead of the checkpoint.

One group per recorded matrix (named by its row in the modules table): a dataset ``dense`` (out, in) float32,
or ``left`` (out, q) and ``right`` (q, in) for a LoRA update held in factored form, or nothing when the update
starts at zero. The root attribute ``names`` lists the matrix names, so a mismatch is caught on load.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from lorascope.errors import CorruptRunFileError, RunFileNotFoundError
from lorascope.store.schema import module_key

FORMAT_NAME = "lorascope-initial-weights"


def initial_weights_path(run_path: str | os.PathLike[str]) -> Path:
    """Where the initial weights of ``run_path`` are kept: beside it, as ``<run>.w0.h5``."""
    run_path = Path(run_path)
    return run_path.with_name(run_path.name + ".w0.h5")


def save_initial_weights(path: str | os.PathLike[str], names: Sequence[str], weights: Sequence[Any]) -> None:
    """Write W_0; each entry of ``weights`` is an array, a ``(left, right)`` pair, or ``None`` (zero)."""
    with h5py.File(path, "w") as f:
        f.attrs["format"] = FORMAT_NAME
        f.attrs["names"] = json.dumps(list(names))
        for i, weight in enumerate(weights):
            group = f.create_group(module_key(i))
            if weight is None:
                continue
            if isinstance(weight, tuple):
                group.create_dataset("left", data=np.asarray(weight[0], dtype=np.float32))
                group.create_dataset("right", data=np.asarray(weight[1], dtype=np.float32))
            else:
                group.create_dataset("dense", data=np.asarray(weight, dtype=np.float32))


def load_initial_weights(path: str | os.PathLike[str], names: Sequence[str]) -> list[Any]:
    """Read W_0 written by :func:`save_initial_weights`, checking it belongs to the same matrices."""
    path = Path(path)
    if not path.is_file():
        raise RunFileNotFoundError(f"{path}: initial weights file not found; it is written when recording with "
                                   "resumable=True and is needed to resume a recording")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT_NAME:
                raise CorruptRunFileError(f"{path}: not a lorascope initial-weights file")
            stored = json.loads(f.attrs["names"])
            if list(stored) != list(names):
                raise CorruptRunFileError(f"{path}: initial weights of other matrices ({len(stored)} stored, "
                                          f"{len(names)} recorded now; first differing: "
                                          f"{next((a for a, b in zip(stored, names, strict=False) if a != b), '?')})")
            out: list[Any] = []
            for i in range(len(names)):
                group = f[module_key(i)]
                if "dense" in group:
                    out.append(group["dense"][()])
                elif "left" in group:
                    out.append((group["left"][()], group["right"][()]))
                else:
                    out.append(None)
            return out
    except OSError as exc:
        raise CorruptRunFileError(f"{path}: cannot read initial weights: {exc}") from None
