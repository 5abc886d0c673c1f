"""The ledger's tables as data: their files, their schema, and the typed Parquet form both
sides share.

`results/trials.parquet` holds one row per trial with every config field and metric
(`trials_schema()`); `results/curves.parquet` the learning curves in long format
(`curves_schema()`). The writer (ledger.py) and the readers (analysis/results.py) meet
here: `write_table` casts a frame or table to a schema and writes it atomically;
`_conform` brings a table read back (perhaps from an older writer) to the schema.

This module imports neither Ray nor anything that does: analysis reads the ledger through
it on a machine with only pandas and pyarrow.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, get_args, get_origin

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from loopgolf.atomic import atomic_write
from loopgolf.errors import LoopgolfError, first_line
from loopgolf.orchestrator.trialdir import STATUSES  # noqa: F401  (the status column's values: part of the schema)
from loopgolf.trial.config import FIXED_SIGNALS, CompressConfig, ModelConfig, TrainConfig

RESULTS_DIR = Path("results")  # in a sweep directory: the ledger and the eval stream
TRIALS_FILE = RESULTS_DIR / "trials.parquet"
CURVES_FILE = RESULTS_DIR / "curves.parquet"
SCHEMA_VERSION = "1"
# The arm column's values (orchestrator/arms.py): the routed configuration, or a control that
# changes its routing alone: no refinement, or a fixed signal in place of the learned one.
ROUTED_ARM = "routed"
NO_REFINE = "no_refine"
CONTROL_ARMS: tuple[str, ...] = (NO_REFINE, *FIXED_SIGNALS)
ARMS: tuple[str, ...] = (ROUTED_ARM, *CONTROL_ARMS)


_TIMESTAMP = pa.timestamp("us", tz="UTC")
_FLOAT_LIST = pa.list_(pa.float64())

IDENTITY_FIELDS: tuple[pa.Field, ...] = (
    pa.field("sweep", pa.string()),
    pa.field("trial_id", pa.string()),
    pa.field("kind", pa.string()),  # builtin (loopgolf's model) or script (the user's; protocol.py)
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),  # null unless failed or rejected
    pa.field("config_id", pa.string()),  # hash of the config without the seed: replicates share it
    pa.field("seed", pa.int64()),
    pa.field("host", pa.string()),
    pa.field("node_id", pa.string()),
    pa.field("started_at", _TIMESTAMP),
    pa.field("ended_at", _TIMESTAMP),
    pa.field("code_version", pa.string()),
    pa.field("raised", pa.bool_()),  # the trial raised an exception: an error, not a research outcome
    # paired control arms (orchestrator/arms.py): routed, no_refine, uniform, stride or random, and the
    # routed configuration's config_id shared by a pair's trials (null for an unpaired trial)
    pa.field("arm", pa.string()),
    pa.field("pair_id", pa.string()),
    # what the report groups by (trials compare only within one): the prepared data, the spec's
    # training budget (the column train_seconds is the measured time) and where the trial ran
    pa.field("data_fingerprint", pa.string()),
    pa.field("train_budget_seconds", pa.float64()),
    pa.field("hardware", pa.string()),
    # a promoted sweep's trial (orchestrator/promote.py): "<source sweep>:<config_id>" it re-runs, and
    # the fields its sweep changed from the source's (JSON); null otherwise
    pa.field("promoted_from", pa.string()),
    pa.field("fidelity", pa.string()),
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
    pa.field("eval_tokens_scored", pa.int64()),  # val tokens the final evaluation scored (config eval_tokens 0: auto)
    pa.field("eval_passes_per_token", pa.float64()),
    pa.field("eval_flops_per_token", pa.float64()),
    pa.field("refine_fraction", pa.float64()),  # measured in eval from the artifact
    pa.field("refine_fraction_prequant", pa.float64()),  # null when the trial did not refine
    pa.field("train_refine_fraction", pa.float64()),  # of the last training step's tokens (EMA threshold)
    pa.field("feasible", pa.bool_()),
)

REFINEMENT_FIELDS: tuple[pa.Field, ...] = (
    # 10 values, decile 0 = lowest router score; null when the trial did not refine
    pa.field("decile_ce_delta", _FLOAT_LIST),  # mean (final CE - base CE) of the decile's tokens
    pa.field("decile_refined_frac", _FLOAT_LIST),  # fraction of the decile's tokens refined
)

METRICS: tuple[str, ...] = tuple(f.name for f in METRIC_FIELDS)


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


# ------------------------------------------- the typed Parquet form: written, and read back


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
        raise LoopgolfError(f"column {name!r}: cannot store as {type_} ({first_line(exc)})") from exc


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
                        f"{source}: column {field.name!r} is {column.type}, expected {field.type} ({first_line(exc)})"
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
