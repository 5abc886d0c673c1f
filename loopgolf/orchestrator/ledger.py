"""The ledger: results/trials.parquet and curves.parquet; their schema, writer and Tune callback.

Truth lives in each trial's directory (trialdir.py): its config, final metrics and
progress reports. The Parquet files are an index over those: one row per trial with every config field
and metric (`trials_schema()`), and the curves in long format (`curves_schema()`). They
are rewritten whole on every finished trial (read, upsert by trial id, write a
temporary file, fsync, rename), so a reader never sees half a file and a trial that
finishes twice around a crash is still one row. A ledger that cannot be read is
rebuilt from the trial directories, with a warning; the ledger never raises into Tune
(an exception there would count as a trial failure and retrain the trial).

This module imports Ray only to build the Tune callback, so analysis can import the
schema on a machine without Ray.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from loopgolf.atomic import atomic_write
from loopgolf.errors import LoopgolfError, first_line
from loopgolf.orchestrator.arms import arm_of
from loopgolf.orchestrator.protocol import TrialRequest, trial_key
from loopgolf.orchestrator.trialdir import (  # noqa: F401  (STATUSES and the file names are part of the ledger's API)
    METRICS_FILE,
    PROGRESS_FILE,
    STATUSES,
    TRIAL_FILE,
    TRIAL_RECORD,
    TRIALS_DIR,
    final_metrics,
    progress_lines,
    read_json,
    trial_dir,
    write_json,
)
from loopgolf.trial.config import CompressConfig, ModelConfig, TrainConfig

TRIALS_FILE = Path("results") / "trials.parquet"
CURVES_FILE = Path("results") / "curves.parquet"
SCHEMA_VERSION = "1"


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


# ------------------------------------------------------------------------- reading


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


PROGRESS_METRICS = ("train_loss", "quick_val_bpb", "refine_fraction", "lr_scale")


def trial_row(sweep: str, code_version: str, directory: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """One trials.parquet row: identity, status, every config field, every metric."""
    config = read_json(directory / TRIAL_FILE) or {}
    flat = dict(config.get("trial_config", {}))
    row: dict[str, Any] = {**flat, **{k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}}
    for key, value in metrics.items():  # list-valued metrics the schema knows (decile statistics)
        if isinstance(value, list):
            row[key] = value
    row |= {
        "sweep": sweep,
        "trial_id": directory.name,
        "kind": config.get("kind") or "builtin",
        "status": metrics["status"],
        "error": metrics.get("error"),
        "config_id": config.get("config_id"),
        "seed": flat.get("seed", metrics.get("seed")),
        "code_version": code_version,
        "predicted_artifact_bytes": metrics.get("predicted_artifact_bytes", config.get("predicted_artifact_bytes")),
        "raised": bool(metrics.get("raised", False)),
        "arm": _arm(config, flat),
        "pair_id": config.get("pair_id"),
        "data_fingerprint": config.get("data_fingerprint"),
        "train_budget_seconds": flat.get("train_seconds"),
        "hardware": config.get("hardware"),
        "promoted_from": config.get("promoted_from"),
        "fidelity": config.get("fidelity"),
    }
    for field in trials_schema():  # a list column a trial lacks is null, not NaN (Arrow casts no float to a list)
        if pa.types.is_list(field.type) and row.get(field.name) is None:
            row[field.name] = None
    for key in ("artifact_path", "eval_tokens_path"):  # relative to the sweep directory: it may be moved
        if metrics.get(key):
            path = Path(metrics[key])  # absolute: a file in the trial's directory; relative: below it
            row[key] = f"{TRIALS_DIR}/{directory.name}/{path.name if path.is_absolute() else path.as_posix()}"
    for key in ("started_at", "ended_at"):
        row[key] = pd.Timestamp(row[key]) if row.get(key) else pd.NaT
    return row


def _arm(record: dict[str, Any], flat: dict[str, Any]) -> str | None:
    """The trial's arm; a builtin record written before arms were recorded has it in its config."""
    request = TrialRequest.from_tune(record, fallback_key="?")
    if request.arm or request.kind != "builtin":
        return request.arm
    return arm_of(flat) if flat else None


def curve_rows(sweep: str, directory: Path) -> list[dict[str, Any]]:
    """The learning curve; after a resume the re-run's value of a step replaces the lost run's."""
    latest: dict[tuple[int, str], dict[str, Any]] = {}
    for result in progress_lines(directory):
        if "elapsed_seconds" not in result or "step" not in result:
            continue
        for metric in PROGRESS_METRICS:
            value = result.get(metric)
            if value is None or not math.isfinite(float(value)):
                continue
            latest[(int(result["step"]), metric)] = {
                "sweep": sweep, "trial_id": directory.name, "step": int(result["step"]),
                "elapsed_seconds": float(result["elapsed_seconds"]), "train_tokens": int(result.get("train_tokens", 0)),
                "metric": metric, "value": float(value),
            }  # fmt: skip
    return [latest[k] for k in sorted(latest)]


# ------------------------------------------------------------------------- the ledger


@dataclasses.dataclass(frozen=True)
class Ledger:
    """The results tables of one sweep directory."""

    sweep_dir: Path
    sweep: str
    code_version: str

    @property
    def trials_file(self) -> Path:
        return self.sweep_dir / TRIALS_FILE

    @property
    def curves_file(self) -> Path:
        return self.sweep_dir / CURVES_FILE

    def finished_dirs(self) -> list[tuple[Path, dict[str, Any]]]:
        """Every trial directory with final metrics, in key order."""
        root = self.sweep_dir / TRIALS_DIR
        found = []
        for directory in sorted(root.iterdir()) if root.is_dir() else []:
            metrics = final_metrics(directory) if directory.is_dir() else None
            if metrics is not None:
                found.append((directory, metrics))
        return found

    def rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Trial rows and curve rows of every finished trial, from the trial directories."""
        trials, curves = [], []
        for directory, metrics in self.finished_dirs():
            trials.append(trial_row(self.sweep, self.code_version, directory, metrics))
            curves.extend(curve_rows(self.sweep, directory))
        return trials, curves

    def rebuild(self) -> int:
        """Rewrite both tables from the trial directories; returns the number of trials."""
        trials, curves = self.rows()
        write_table(pd.DataFrame(trials), self.trials_file, schema=trials_schema())
        write_table(pd.DataFrame(curves), self.curves_file, schema=curves_schema())
        return len(trials)

    def record(self, trial_id: str) -> None:
        """Upsert one finished trial; an unreadable table is rebuilt from the trial directories."""
        directory = trial_dir(self.sweep_dir, trial_id)
        metrics = final_metrics(directory)
        if metrics is None:
            raise LoopgolfError(f"{directory / METRICS_FILE}: the trial has no final metrics")
        try:
            old_trials = _read_table(self.trials_file)
            old_curves = _read_table(self.curves_file)
        except LoopgolfError as exc:
            print(f"loopgolf: warning: {exc}; rebuilding the ledger from the trial directories", file=sys.stderr)
            self.rebuild()
            return
        row = trial_row(self.sweep, self.code_version, directory, metrics)
        _upsert(old_trials, [row], trial_id, self.trials_file, trials_schema())
        _upsert(old_curves, curve_rows(self.sweep, directory), trial_id, self.curves_file, curves_schema())

    def record_failure(self, trial_id: str, config: dict[str, Any], error: str, raised: bool) -> None:
        """A trial that raised (after its retries), without final metrics of its own: the driver writes them."""
        directory = trial_dir(self.sweep_dir, trial_id)
        if read_json(directory / TRIAL_FILE) is None:
            write_json(directory / TRIAL_FILE, config)
        write_json(directory / METRICS_FILE, {"status": "failed", "error": error, "raised": raised})
        self.record(trial_id)

    def record_stopped(self, trial_id: str, config: dict[str, Any]) -> None:
        """A trial the scheduler stopped: its last quick metrics, status `stopped` (never compared)."""
        directory = trial_dir(self.sweep_dir, trial_id)
        if read_json(directory / TRIAL_FILE) is None:
            write_json(directory / TRIAL_FILE, config)
        write_json(directory / METRICS_FILE, stopped_metrics(directory))
        self.record(trial_id)


def stopped_metrics(directory: Path) -> dict[str, Any]:
    """A stopped trial's record: status `stopped` and where its curve ended (last quick bpb,
    the training seconds and steps it spent), so the compute it took is counted."""
    last = next((p for p in reversed(progress_lines(directory)) if "elapsed_seconds" in p), {})
    return {
        "status": "stopped", "error": "stopped before its final metrics (early stopping)", "raised": False,
        "quick_val_bpb": last.get("quick_val_bpb"), "train_seconds": last.get("elapsed_seconds", 0.0),
        "train_steps": last.get("step", 0), "train_tokens": last.get("train_tokens", 0),
    }  # fmt: skip


def _read_table(path: Path) -> pd.DataFrame | None:
    if not path.exists():
        return None
    try:
        return pq.read_table(path).to_pandas()
    except (OSError, pa.ArrowException) as exc:
        raise LoopgolfError(f"{path}: unreadable ({first_line(exc)})") from exc


def _upsert(old: pd.DataFrame | None, rows: list[dict[str, Any]], trial_id: str, path: Path, schema: pa.Schema) -> None:
    frames = [old[old["trial_id"] != trial_id]] if old is not None and "trial_id" in old else []
    frames = [f for f in frames if len(f)] + ([pd.DataFrame(rows)] if rows else [])
    write_table(pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(rows), path, schema=schema)


def ledger_callback(ledger: Ledger) -> Any:
    """A Tune callback that records each finished trial; it never raises into Tune."""
    from ray.tune import Callback

    class ResultsLedger(Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._record(trial, None)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._record(trial, _error_line(trial))

        def _record(self, trial: Any, error: str | None) -> None:
            trial_id = trial_key(trial)
            try:
                if error is not None:
                    ledger.record_failure(trial_id, _config_record(trial.config), error, raised=True)
                elif final_metrics(trial_dir(ledger.sweep_dir, trial_id)) is None:  # stopped early
                    ledger.record_stopped(trial_id, _config_record(trial.config))
                else:
                    ledger.record(trial_id)
            except Exception as exc:  # the trial is over; the ledger is rebuilt when the sweep ends
                print(f"loopgolf: warning: ledger: trial {trial_id}: {first_line(exc)}", file=sys.stderr)

    return ResultsLedger()


def _config_record(config: dict[str, Any]) -> dict[str, Any]:
    return {k: config[k] for k in TRIAL_RECORD if k in config}


def _error_line(trial: Any) -> str:
    path = Path(trial.error_file) if getattr(trial, "error_file", None) else None
    if path is not None and path.is_file():
        lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        if lines:
            return lines[-1][:500]
    return "the trial raised (see its error.txt)"
