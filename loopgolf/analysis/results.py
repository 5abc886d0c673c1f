"""The results tables: their typed schemas, an atomic writer, and the loaders.

Every sweep writes two Parquet files, replaced atomically as trials finish:

- `<sweep_dir>/results/trials.parquet`, one row per trial (`trials_schema()`);
- `<sweep_dir>/results/curves.parquet`, the learning curves in long format (`curves_schema()`).

They are plain Parquet: `pandas.read_parquet` reads them without loopgolf. The loaders
add what only loopgolf knows: several sweeps at once, every column of the schema present
and typed (a column an older writer did not know is added as typed nulls), and one clear
`LoopgolfError` naming the file when one is missing or unreadable.

In the DataFrames the loaders return, int64 columns are pandas' nullable `Int64` and bool
columns nullable `boolean` (so a null stays a null and an int stays an int), floats are
float64 with NaN for null, strings are `str`, times are UTC timestamps and list columns
hold one numpy array (or None) per row.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal, get_args, get_origin

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from loopgolf.atomic import atomic_write
from loopgolf.errors import LoopgolfError
from loopgolf.trial.config import CompressConfig, ModelConfig, TrainConfig

TRIALS_FILE = Path("results") / "trials.parquet"
CURVES_FILE = Path("results") / "curves.parquet"
SCHEMA_VERSION = "1"

STATUSES = ("complete", "rejected", "failed")  # rejected: predicted over the byte cap, never trained

_TIMESTAMP = pa.timestamp("us", tz="UTC")
_FLOAT_LIST = pa.list_(pa.float64())

IDENTITY_FIELDS: tuple[pa.Field, ...] = (
    pa.field("sweep", pa.string()),
    pa.field("trial_id", pa.string()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),  # null unless failed or rejected
    pa.field("config_id", pa.string()),  # hash of the config without the seed: replicates share it
    pa.field("seed", pa.int64()),
    pa.field("host", pa.string()),
    pa.field("node_id", pa.string()),
    pa.field("started_at", _TIMESTAMP),
    pa.field("ended_at", _TIMESTAMP),
    pa.field("code_version", pa.string()),
)

METRIC_FIELDS: tuple[pa.Field, ...] = (
    pa.field("val_bpb", pa.float64()),  # measured on the model rebuilt from the artifact
    pa.field("val_bpb_prequant", pa.float64()),
    pa.field("val_loss", pa.float64()),
    pa.field("artifact_bytes", pa.int64()),
    pa.field("model_bytes", pa.int64()),
    pa.field("code_bytes", pa.int64()),
    pa.field("params", pa.int64()),
    pa.field("train_seconds", pa.float64()),
    pa.field("train_tokens", pa.int64()),
    pa.field("train_steps", pa.int64()),
    pa.field("eval_seconds", pa.float64()),
    pa.field("eval_passes_per_token", pa.float64()),
    pa.field("eval_flops_per_token", pa.float64()),
    pa.field("refine_fraction", pa.float64()),  # measured in eval from the artifact
    pa.field("refine_fraction_prequant", pa.float64()),  # null when the trial did not refine
    pa.field("feasible", pa.bool_()),
)

REFINEMENT_FIELDS: tuple[pa.Field, ...] = (
    # 10 values, decile 0 = lowest router score; null when the trial did not refine
    pa.field("decile_ce_delta", _FLOAT_LIST),  # mean (final CE - base CE) of the decile's tokens
    pa.field("decile_refined_frac", _FLOAT_LIST),  # fraction of the decile's tokens refined
)

METRICS: tuple[str, ...] = tuple(f.name for f in METRIC_FIELDS)
TRIALS_REQUIRED = ("trial_id", "status")
CURVES_REQUIRED = ("trial_id", "metric", "value")


def _arrow_type(hint: object, where: str) -> pa.DataType:
    """The Arrow type of one config field's annotation."""
    if hint is bool:  # before int: bool is an int subclass
        return pa.bool_()
    if hint is int:
        return pa.int64()
    if hint is float:
        return pa.float64()
    if hint is str or get_origin(hint) is Literal:
        return pa.string()
    if get_origin(hint) is tuple and get_args(hint)[1:] == (Ellipsis,) and get_args(hint)[0] is str:
        return pa.list_(pa.string())
    raise TypeError(f"{where}: no Parquet type for annotation {hint!r}")  # a new field type needs a rule here


def config_fields() -> tuple[pa.Field, ...]:
    """One typed field per flat config field of `TrialConfig.to_flat()`, in that order."""
    fields = []
    for cls in (ModelConfig, CompressConfig, TrainConfig):
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            fields.append(pa.field(field.name, _arrow_type(hints[field.name], f"{cls.__name__}.{field.name}")))
    return tuple(fields)


def _merge(*groups: Iterable[pa.Field]) -> list[pa.Field]:
    """Concatenate field groups; a name in two groups (`seed`, `train_seconds`) is one column."""
    seen: dict[str, pa.Field] = {}
    for group in groups:
        for field in group:
            if field.name in seen:
                if seen[field.name].type != field.type:
                    raise TypeError(f"column {field.name!r} is {seen[field.name].type} and {field.type}")
                continue
            seen[field.name] = field
    return list(seen.values())


def trials_schema() -> pa.Schema:
    """The schema of `trials.parquet`: identity, every flat config field, metrics, refinement stats.

    Two names are shared between groups and are one column each: `seed` (identity and
    TrainConfig.seed, the same value) and `train_seconds` (TrainConfig's budget and the
    measured metric). The writer stores the measured seconds for a trial that trained and
    the configured budget for one that did not, so every row still holds a valid config.
    """
    fields = _merge(IDENTITY_FIELDS, config_fields(), METRIC_FIELDS, REFINEMENT_FIELDS)
    return pa.schema(fields, metadata={"loopgolf.table": "trials", "loopgolf.schema_version": SCHEMA_VERSION})


def curves_schema() -> pa.Schema:
    """The schema of `curves.parquet`: one row per (trial, step, metric)."""
    fields = [
        pa.field("sweep", pa.string()),
        pa.field("trial_id", pa.string()),
        pa.field("step", pa.int64()),
        pa.field("elapsed_seconds", pa.float64()),
        pa.field("train_tokens", pa.int64()),
        pa.field("metric", pa.string()),
        pa.field("value", pa.float64()),
    ]
    return pa.schema(fields, metadata={"loopgolf.table": "curves", "loopgolf.schema_version": SCHEMA_VERSION})


# ------------------------------------------------------------------------- writing


def _to_arrow(values: pd.Series, type_: pa.DataType | None, name: str) -> pa.Array:
    if isinstance(values.dtype, pd.DatetimeTZDtype):
        # pyarrow would read Series.values, which pandas 3.1 deprecates for tz-aware data:
        # hand it the UTC instants as naive datetime64 and attach the zone in the cast
        type_ = type_ or pa.timestamp(values.dtype.unit, tz=str(values.dtype.tz))
        values = pd.Series(values.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy(), index=values.index)
    try:
        if type_ is None:
            return pa.array(values, from_pandas=True)
        try:
            return pa.array(values, type=type_, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            # e.g. integral floats (an int column with NaN) into int64: a checked cast;
            # timestamps may drop sub-microsecond digits (the schema keeps microseconds)
            return pa.array(values, from_pandas=True).cast(type_, safe=not pa.types.is_timestamp(type_))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise LoopgolfError(f"column {name!r}: cannot store as {type_} ({_first_line(exc)})") from exc


def _table_from_frame(df: pd.DataFrame, schema: pa.Schema | None) -> pa.Table:
    if df.columns.has_duplicates:
        raise LoopgolfError(f"duplicate columns: {sorted(set(df.columns[df.columns.duplicated()]))}")
    n = len(df)
    arrays: dict[str, pa.Array] = {}
    fields: list[pa.Field] = []
    for field in schema or ():
        if field.name in df.columns:
            arrays[field.name] = _to_arrow(df[field.name], field.type, field.name)
        else:
            arrays[field.name] = pa.nulls(n, field.type)
        fields.append(field)
    for name in df.columns:  # columns the schema does not name are kept as they are
        if name not in arrays:
            arr = _to_arrow(df[name], None, str(name))
            arrays[str(name)] = arr
            fields.append(pa.field(str(name), arr.type))
    metadata = schema.metadata if schema is not None else None
    return pa.Table.from_arrays([arrays[f.name] for f in fields], schema=pa.schema(fields, metadata=metadata))


def write_table(data: pd.DataFrame | pa.Table, path: str | os.PathLike[str], schema: pa.Schema | None = None) -> Path:
    """Write a DataFrame (or Arrow table) as Parquet at `path`, atomically.

    With `schema`, columns are cast to its types, its missing columns are added as typed
    nulls and other columns are kept after it. The file is written beside `path` and moved
    over it (loopgolf.atomic), so a reader sees the old file or the new one, never half of
    one.
    """
    path = Path(path)
    if isinstance(data, pa.Table):
        table = _conform(data, schema, str(path)) if schema is not None else data
    else:
        table = _table_from_frame(data, schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda fh: pq.write_table(table, fh))


# ------------------------------------------------------------------------- reading


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _conform(table: pa.Table, schema: pa.Schema | None, source: str) -> pa.Table:
    """Every schema column present and of its type (typed nulls when absent); extras kept after."""
    if schema is None:
        return table
    arrays: list[pa.ChunkedArray | pa.Array] = []
    fields: list[pa.Field] = []
    for field in schema:
        if field.name in table.column_names:
            column = table.column(field.name)
            if column.type != field.type:
                try:
                    column = column.cast(field.type)
                except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
                    raise LoopgolfError(
                        f"{source}: column {field.name!r} is {column.type}, expected {field.type} ({_first_line(exc)})"
                    ) from exc
            arrays.append(column)
        else:
            arrays.append(pa.nulls(table.num_rows, field.type))
        fields.append(field)
    for name in table.column_names:
        if name not in schema.names:
            arrays.append(table.column(name))
            fields.append(table.schema.field(name))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=schema.metadata))


def _resolve(paths: Sequence[str | os.PathLike[str]], relative: Path) -> list[Path]:
    """Sweep directories (or globs of them, or Parquet files themselves) -> the files to read."""
    if not paths:
        raise LoopgolfError("no sweep directory given")
    files: list[Path] = []
    for raw in paths:
        text = os.fspath(raw)
        if glob.has_magic(text):
            matches = [Path(m) for m in sorted(glob.glob(text)) if Path(m).is_dir() or m.endswith(".parquet")]
            if not matches:
                raise LoopgolfError(f"{text!r}: no sweep directory matches")
        else:
            matches = [Path(text)]
        for match in matches:
            if match.suffix == ".parquet" and not match.is_dir():
                files.append(match)
            elif match.is_dir():
                files.append(match / relative)
            else:
                raise LoopgolfError(f"{match}: no such sweep directory")
    unique: dict[Path, None] = {}
    for file in files:  # the same sweep named twice (e.g. by a path and a glob) is read once
        unique.setdefault(file.resolve(), None)
    return list(unique)


def _sweep_name(file: Path) -> str:
    # <sweep_dir>/results/trials.parquet -> the sweep directory's name
    return file.parent.parent.name if file.parent.name == "results" else file.parent.name


def _read(file: Path, schema: pa.Schema, required: tuple[str, ...]) -> pa.Table:
    if not file.is_file():
        raise LoopgolfError(f"{file}: no such file (has this sweep written results yet?)")
    try:
        table = pq.read_table(file)
    except (OSError, pa.ArrowException) as exc:
        raise LoopgolfError(f"{file}: cannot read Parquet ({_first_line(exc)})") from exc
    missing = [name for name in required if name not in table.column_names]
    if missing:
        raise LoopgolfError(f"{file}: missing required column(s) {missing}")
    if "status" in required:
        statuses = table.column("status").cast(pa.string())
        bad = sorted({s for s in pc.unique(statuses).to_pylist() if s not in STATUSES}, key=str)
        if bad:
            raise LoopgolfError(f"{file}: unknown trial status {bad}: expected one of {list(STATUSES)}")
    if "sweep" not in table.column_names or table.column("sweep").null_count:
        # older writers: the sweep is the directory's name
        name = _sweep_name(file)
        column = table.column("sweep") if "sweep" in table.column_names else pa.nulls(table.num_rows, pa.string())
        filled = pc.fill_null(column.cast(pa.string()), name)
        table = table.drop_columns(["sweep"]) if "sweep" in table.column_names else table
        table = table.append_column("sweep", filled)
    return _conform(table, schema, str(file))


_PANDAS_TYPES = {pa.int64(): pd.Int64Dtype(), pa.bool_(): pd.BooleanDtype()}


def _load(
    paths: Sequence[str | os.PathLike[str]], relative: Path, schema: pa.Schema, required: tuple[str, ...]
) -> pd.DataFrame:
    files = _resolve(paths, relative)
    tables = [_read(file, schema, required) for file in files]
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:  # only extra, unschema'd columns can disagree
        raise LoopgolfError(f"cannot combine {[str(f) for f in files]}: {_first_line(exc)}") from exc
    return table.to_pandas(types_mapper=_PANDAS_TYPES.get)


def trials_files(*paths: str | os.PathLike[str]) -> list[Path]:
    """The `trials.parquet` files that `load_results(*paths)` reads (whether or not they exist)."""
    return _resolve(paths, TRIALS_FILE)


def load_results(*paths: str | os.PathLike[str]) -> pd.DataFrame:
    """Read `trials.parquet` of one or many sweeps into one typed DataFrame.

    Each path is a sweep directory, a glob of sweep directories, or a Parquet file. The
    result has every column of `trials_schema()` (typed nulls where a file lacks one) plus
    any extra columns the files have. A missing or unreadable file, a file without
    `trial_id`/`status`, a column that cannot be cast to its type, or an unknown status
    is a `LoopgolfError` naming the file.
    """
    return _load(paths, TRIALS_FILE, trials_schema(), TRIALS_REQUIRED)


def load_curves(*paths: str | os.PathLike[str]) -> pd.DataFrame:
    """Read `curves.parquet` of one or many sweeps (long format) into one typed DataFrame."""
    return _load(paths, CURVES_FILE, curves_schema(), CURVES_REQUIRED)


def feasible_complete(df: pd.DataFrame) -> pd.Series:
    """Rows that may compete: status "complete" and feasible (bool Series; a null is False)."""
    missing = [c for c in ("status", "feasible") if c not in df.columns]
    if missing:  # silently ranking nothing would hide the mistake
        raise LoopgolfError(f"feasible rows: the frame has no {missing} column(s)")
    feasible = df["feasible"].astype("boolean").fillna(False)
    return ((df["status"] == "complete") & feasible).astype(bool)
