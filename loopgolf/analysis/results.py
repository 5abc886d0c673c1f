"""Load the results tables of one or many sweeps into typed pandas DataFrames.

Every sweep has two Parquet files, written by `loopgolf.orchestrator.ledger` to the schema
that `loopgolf.orchestrator.ledger_schema` owns:

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

The schema is imported from ledger_schema, which imports no Ray: analysis stays usable
on a machine with only pandas and pyarrow.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from loopgolf.errors import LoopgolfError, first_line
from loopgolf.orchestrator.ledger_schema import (  # noqa: F401  (re-exported: the analysis API names them)
    CONTROL_ARMS,
    CURVES_FILE,
    IDENTITY_FIELDS,
    METRIC_FIELDS,
    METRICS,
    NO_REFINE,
    REFINEMENT_FIELDS,
    RESULTS_DIR,
    ROUTED_ARM,
    STATUSES,
    TRIALS_FILE,
    _conform,
    config_fields,
    curves_schema,
    trials_schema,
    write_table,
)

TRIALS_REQUIRED = ("trial_id", "status")
CURVES_REQUIRED = ("trial_id", "metric", "value")


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
    return file.parent.parent.name if file.parent.name == RESULTS_DIR.name else file.parent.name


def _read(file: Path, schema: pa.Schema, required: tuple[str, ...]) -> pa.Table:
    if not file.is_file():
        raise LoopgolfError(f"{file}: no such file (has this sweep written results yet?)")
    try:
        table = pq.read_table(file)
    except (OSError, pa.ArrowException) as exc:
        raise LoopgolfError(f"{file}: cannot read Parquet ({first_line(exc)})") from exc
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
        raise LoopgolfError(f"cannot combine {[str(f) for f in files]}: {first_line(exc)}") from exc
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
