"""Fuzzing the reader through the command line (issue 15, item 5): a real recording, mutated (groups removed,
datasets replaced by other dtypes, shapes and values, attributes retyped or removed, the file truncated), must give
from ``lorascope info`` and ``lorascope analyze`` either success or one line on stderr with exit status 2, never a
traceback.

The default tier runs a fixed sample of the mutations with the figures built but not rendered to PNG (rendering is
most of analyze's time); ``-m slow`` runs every mutation, and the value mutations with the PNGs rendered too.
"""

from __future__ import annotations

import random
import shutil
import traceback
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from matplotlib.figure import Figure
from torch import nn

import lorascope
from lorascope.store import schema as S
from lorascope_cli.main import cli

VOCAB = 32
Mutation = Callable[[h5py.File], None]


def _record(path: Path, steps: int = 6, seed: int = 0, **options) -> Path:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(VOCAB, 16), nn.Linear(16, 24), nn.GELU(), nn.Linear(24, VOCAB))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with lorascope.record(model, path, optimizer=optimizer, time_budget=None, **options) as recorder:
        for _ in range(steps):
            ids = torch.randint(0, VOCAB, (4, 6))
            loss = nn.functional.cross_entropy(model(ids).reshape(-1, VOCAB), ids.reshape(-1))
            loss.backward()
            recorder.log(loss=loss)
            optimizer.step()
            optimizer.zero_grad()
    return path


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Path:
    """A real recording: a tiny model trained 6 steps, snapshots every 2 steps with singular vectors, full
    updates and the gradient's spectrum, so that every optional group exists."""
    path = _record(tmp_path_factory.mktemp("fuzz") / "run.h5", snapshots=2, factors_k=2, store_delta="float16",
                   grad_sv=True)
    with lorascope.open_run(path) as run:  # the source itself is sound
        assert run.complete and run.n_steps == 6 and run.n_snapshots == 3 and run.flags == ()
    return path


# -- mutations ---------------------------------------------------------------------------------------------------

def _remove(name: str) -> Mutation:
    return lambda f: f.__delitem__(name)


def _replace(name: str, make: Callable[[np.ndarray], np.ndarray]) -> Mutation:
    def change(f: h5py.File) -> None:
        old = f[name][()]
        del f[name]
        f.create_dataset(name, data=make(old))
    return change


def _strings(old: np.ndarray) -> np.ndarray:
    return np.array([str(v) for v in np.ravel(old)] or ["x"], dtype=object).astype(h5py.string_dtype())


def _as(dtype: str) -> Callable[[np.ndarray], np.ndarray]:
    def make(old: np.ndarray) -> np.ndarray:
        if old.dtype.kind == "O":
            return np.arange(old.size).astype(dtype)
        with np.errstate(all="ignore"):
            return np.nan_to_num(old.astype(np.float64)).astype(dtype)
    return make


def _values(transform: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    def make(old: np.ndarray) -> np.ndarray:
        if old.dtype.kind in "OSUb":
            return old
        with np.errstate(all="ignore"):
            out = transform(old.astype(np.float64))
        if old.dtype.kind == "f":
            return out
        limits = np.iinfo(old.dtype)
        return np.clip(np.nan_to_num(out, posinf=limits.max, neginf=limits.min), limits.min, limits.max / 2
                       ).astype(old.dtype)
    return make


SHAPES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "extra_axis": lambda v: np.repeat(v[..., None], 3, axis=-1),
    "axis_dropped": lambda v: v[..., 0] if v.ndim > 1 else v[:, None],
    "scalar": lambda v: np.float64(1.5),
    "empty": lambda v: v[:0],
    "one_row_short": lambda v: v[:-1],
    "transposed": lambda v: v.T if v.ndim > 1 else v[None, :],
}
DTYPES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "strings": _strings,
    "bytes": lambda v: _strings(v).astype("S12"),
    "float16": _as("float16"),
    "int8": _as("int8"),
    "bool": _as("bool"),
    "uint64": lambda v: _as("float64")(v).clip(0, None).astype("uint64"),
}
VALUES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "negative": _values(lambda v: -np.abs(v) - 1),
    "nan": _values(lambda v: np.full_like(v, np.nan)),
    "inf": _values(lambda v: np.full_like(v, np.inf)),
    "huge": _values(lambda v: v * 1e30 + 1e30),
    "zeros": _values(np.zeros_like),
    "reversed": _values(lambda v: v[::-1].copy()),
    "denormal": _values(lambda v: np.full_like(v, 5e-324)),
}
TABLES = {S.GROUP_STEPS: S.STEP_COLUMNS, S.GROUP_SNAPSHOTS: S.SNAPSHOT_COLUMNS + S.GRAD_SV_COLUMNS,
          S.GROUP_MODULES: S.MODULE_COLUMNS, S.GROUP_COVERAGE: S.COVERAGE_COLUMNS}
GROUPS = (S.GROUP_MODULES, S.GROUP_COVERAGE, S.GROUP_CONFIG, S.GROUP_STEPS, S.GROUP_SNAPSHOTS, S.GROUP_FACTORS,
          f"{S.GROUP_FACTORS}/{S.FACTOR_U}", S.GROUP_DELTAS, f"{S.GROUP_DELTAS}/{S.module_key(0)}")
RETYPED: dict[str, object] = {"int": np.int64(3), "float": 1.5, "str": "1", "bytes": np.bytes_(b"complete"),
                              "array": np.arange(3), "bool": np.bool_(True), "negative": np.int64(-2)}
CONFIG_TEXT = {"not_json": "{broken", "a_list": "[1, 2]", "a_number": "7", "wrong_fields": '{"r": "eight"}',
               "negative_examples": '{"examples": -5, "r": -1, "lora_alpha": null}'}
DEEP_CONFIG = {  # fields inside the sections lorascope reads, of the wrong JSON type
    "lora_adapter_a_list": ("lora", '{"default": [1, 2]}'),
    "lora_fields_text": ("lora", '{"default": {"r": "eight", "lora_alpha": "x", "rank_pattern": [1]}}'),
    "model_config_a_list": ("model", '{"config": [1]}'),
    "model_config_fields_text": ("model", '{"config": {"num_local_experts": "x", "num_experts_per_tok": -1, '
                                          '"model_type": 3}}'),
    "optimizer_defaults_a_list": ("optimizer", '{"defaults": [1]}'),
    "optimizer_lr_text": ("optimizer", '{"defaults": {"lr": "fast"}}'),
    "dataset_examples_text": ("dataset", '{"examples": "many", "bits_per_example": "x"}'),
    "extra_section_a_string": ("notes", '"a user section may hold any JSON"'),
}


def _retype(group: str, name: str, value: object) -> Mutation:
    return lambda f: f[group].attrs.__setitem__(name, value)


def _delete_attr(group: str, name: str) -> Mutation:
    return lambda f: f[group].attrs.__delitem__(name)


def _structure_mutations() -> dict[str, Mutation]:
    out: dict[str, Mutation] = {f"remove_group:{g}": _remove(g) for g in GROUPS}
    for group, columns in TABLES.items():
        for column in columns:
            name = f"{group}/{column.name}"
            out[f"remove:{name}"] = _remove(name)
            for kind, make in {**SHAPES, **DTYPES}.items():
                out[f"{kind}:{name}"] = _replace(name, make)
    for name in (*S.ROOT_ATTRS, S.ATTR_FINISHED):
        out[f"remove_attr:{name}"] = _delete_attr("/", name)
        for kind, value in RETYPED.items():
            out[f"attr_{kind}:{name}"] = _retype("/", name, value)
    for name in (S.ATTR_SV_CAPACITY, S.ATTR_FACTORS_K, S.ATTR_DELTA_DTYPE):
        out[f"remove_attr:snapshots.{name}"] = _delete_attr(S.GROUP_SNAPSHOTS, name)
        for kind, value in RETYPED.items():
            out[f"attr_{kind}:snapshots.{name}"] = _retype(S.GROUP_SNAPSHOTS, name, value)
    for section in ("recorder", "lora", "dataset", "model", "optimizer"):
        for kind, text in CONFIG_TEXT.items():
            out[f"config_{kind}:{section}"] = _retype(S.GROUP_CONFIG, section, text)
        out[f"config_int:{section}"] = _retype(S.GROUP_CONFIG, section, np.int64(4))
    for kind, (section, text) in DEEP_CONFIG.items():
        out[f"config_{kind}:{section}"] = _retype(S.GROUP_CONFIG, section, text)
    return out


def _value_mutations() -> dict[str, Mutation]:
    out: dict[str, Mutation] = {}
    for group, columns in TABLES.items():
        for column in columns:
            if column.dtype not in ("str", "bool"):
                for kind, make in VALUES.items():
                    out[f"{kind}:{group}/{column.name}"] = _replace(f"{group}/{column.name}", make)
    out["killed:status_recording"] = _retype("/", S.ATTR_STATUS, S.STATUS_RECORDING)
    out["failed:status_failed"] = _retype("/", S.ATTR_STATUS, S.STATUS_FAILED)
    return out


STRUCTURE, VALUE = _structure_mutations(), _value_mutations()
TRUNCATIONS = [i / 64 for i in range(64)]
# The default tier: the failures issue 15 names, one of every other kind of mutation, and a fixed random sample.
NAMED = ["extra_axis:steps/loss", "bytes:steps/loss", "negative:snapshots/sv_count", "attr_str:schema_version",
         "attr_float:schema_version", "attr_int:status", "reversed:steps/step", "huge:snapshots/sv_count",
         "negative:snapshots/sv", "nan:snapshots/energy", "remove_group:snapshots", "remove_group:snapshots/deltas",
         "remove:modules/name", "transposed:snapshots/sv", "float16:steps/step", "config_not_json:recorder",
         "config_wrong_fields:lora", "config_a_list:dataset", "config_lora_fields_text:lora",
         "config_model_config_fields_text:model", "attr_array:snapshots.sv_capacity", "remove_attr:snapshots.factors_k",
         "zeros:modules/out_features", "nan:steps/examples_seen", "inf:steps/grad_sq_norm", "zeros:snapshots/energy",
         "killed:status_recording", "denormal:snapshots/sv"]
_rng = random.Random(15)
SAMPLE = NAMED + _rng.sample(sorted(set(STRUCTURE) - set(NAMED)), 6) + _rng.sample(sorted(set(VALUE) - set(NAMED)), 2)
DEFAULT_TRUNCATIONS = [1 / 64, 0.25, 0.5, 63 / 64]
ALL = {**STRUCTURE, **VALUE}


# -- running the commands ----------------------------------------------------------------------------------------

def _mutated(recording: Path, folder: Path, key: str) -> Path:
    path = folder / "mutated.h5"
    shutil.copyfile(recording, path)
    with h5py.File(path, "r+", libver="latest") as f:
        ALL[key](f)
    return path


def _truncated(recording: Path, folder: Path, fraction: float) -> Path:
    data = recording.read_bytes()
    path = folder / "truncated.h5"
    path.write_bytes(data[: max(1, int(len(data) * fraction))])
    return path


def _check_outcome(result, what: str) -> None:
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        trace = "".join(traceback.format_exception(result.exception))
        pytest.fail(f"{what}: traceback\n{trace}")
    if result.exit_code == 0:
        return
    lines = result.stderr.splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), \
        f"{what}: exit {result.exit_code}, stderr {result.stderr!r}"


def _info_and_analyze(path: Path, folder: Path) -> None:
    runner = CliRunner()
    for args in (["info", str(path)], ["info", "--json", str(path)],
                 ["analyze", str(path), "-o", str(folder / "report"), "--json"]):
        _check_outcome(runner.invoke(cli, args), " ".join(args[:2]))


@pytest.fixture
def no_png(monkeypatch):
    """Build every figure but skip rendering it to PNG (an empty file instead): most of analyze's time."""
    monkeypatch.setattr(Figure, "savefig", lambda self, path, *args, **kwargs: Path(path).write_bytes(b""))


@pytest.mark.parametrize("key", SAMPLE)
def test_a_mutated_run_file_gives_success_or_one_line(recording, tmp_path, no_png, key):
    _info_and_analyze(_mutated(recording, tmp_path, key), tmp_path)


@pytest.mark.parametrize("fraction", DEFAULT_TRUNCATIONS)
def test_a_truncated_run_file_gives_success_or_one_line(recording, tmp_path, fraction):
    _info_and_analyze(_truncated(recording, tmp_path, fraction), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(set(STRUCTURE) - set(SAMPLE)))
def test_every_structural_mutation_gives_success_or_one_line(recording, tmp_path, no_png, key):
    _info_and_analyze(_mutated(recording, tmp_path, key), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(VALUE))
def test_every_value_mutation_gives_success_or_one_line_with_the_figures_rendered(recording, tmp_path, key):
    _info_and_analyze(_mutated(recording, tmp_path, key), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("fraction", sorted(set(TRUNCATIONS) - set(DEFAULT_TRUNCATIONS)))
def test_every_truncation_gives_success_or_one_line(recording, tmp_path, fraction):
    _info_and_analyze(_truncated(recording, tmp_path, fraction), tmp_path)


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> tuple[Path, Path]:
    """A full fine-tuning recording and one labelled a rank-2 LoRA run (a PEFT config section), 24 steps each: enough
    for ``lorascope compare``."""
    folder = tmp_path_factory.mktemp("compare")
    full, lora = (_record(folder / f"{name}.h5", steps=24, seed=seed, snapshots=4)
                  for name, seed in (("full", 0), ("lora", 1)))
    with h5py.File(lora, "r+") as f:
        f[S.GROUP_CONFIG].attrs["lora"] = ('{"default": {"r": 2, "lora_alpha": 4, "use_rslora": false, '
                                           '"scaling_rule": "alpha/r", "rank_pattern": {}, "alpha_pattern": {}}}')
    return full, lora


COMPARED = sorted(key for key in ALL if key.split(":")[1].startswith(
    (f"{S.GROUP_STEPS}/", f"{S.GROUP_SNAPSHOTS}/step", f"{S.GROUP_SNAPSHOTS}/sv", f"{S.GROUP_MODULES}/",
     S.GROUP_CONFIG, "status")) or key in {f"remove_group:{g}" for g in GROUPS if not g.startswith(
        (S.GROUP_FACTORS, S.GROUP_DELTAS))})  # the compared recordings store neither factors nor deltas


@pytest.mark.slow
@pytest.mark.parametrize("role", ["full", "lora"])
@pytest.mark.parametrize("key", COMPARED)
def test_compare_of_a_mutated_run_gives_success_or_one_line(compared, tmp_path, no_png, key, role):
    full, lora = compared
    source = full if role == "full" else lora
    mutated = _mutated(source, tmp_path, key)
    runs = [mutated, lora] if role == "full" else [full, mutated]
    result = CliRunner().invoke(cli, ["compare", *map(str, runs), "-o", str(tmp_path / "out"), "--json"])
    _check_outcome(result, f"compare ({role} mutated)")


# -- recommend --probe with a mutated probe ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> tuple[Path, Path]:
    """A full fine-tuning probe of a tiny Llama (its dataset size recorded; every optional group, as the recording
    above) and the model's config folder."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("probe")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, intermediate_size=24, vocab_size=VOCAB,
                                      max_position_embeddings=16)
    model = transformers.LlamaForCausalLM(config)
    config.save_pretrained(folder / "model")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, VOCAB, (32, 6), generator=torch.Generator().manual_seed(0))
    path = folder / "probe.h5"
    with lorascope.record(model, path, optimizer=optimizer, snapshots=2, time_budget=None, factors_k=2,
                          store_delta="float16", grad_sv=True, extra_config={"dataset": {"examples": 32}}):
        for step in range(8):
            rows = ids[4 * step:4 * step + 4]
            model(input_ids=rows, labels=rows).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return path, folder / "model"


def _recommend_with(probe_path: Path, model: Path) -> None:
    args = ["recommend", "--config", str(model), "--examples", "1000", "--probe", str(probe_path), "--json"]
    _check_outcome(CliRunner().invoke(cli, args), "recommend --probe")


PROBE_SAMPLE = ["bytes:steps/loss", "reversed:steps/step", "nan:steps/examples_seen", "config_a_list:dataset",
                "config_not_json:model", "remove:steps/batch_loss_tokens", "zeros:steps/batch_examples",
                "remove_group:snapshots"]


@pytest.mark.parametrize("key", PROBE_SAMPLE)
def test_recommend_with_a_mutated_probe_gives_success_or_one_line(probe, tmp_path, key):
    _recommend_with(_mutated(probe[0], tmp_path, key), probe[1])


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(set(ALL) - set(PROBE_SAMPLE)))
def test_recommend_with_every_mutated_probe_gives_success_or_one_line(probe, tmp_path, key):
    _recommend_with(_mutated(probe[0], tmp_path, key), probe[1])
