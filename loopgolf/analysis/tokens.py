"""Per-token evaluation files read for the report, and their reduction to seeds x documents.

Every trial of a sweep scores the same validation tokens with the same windows. A trial's
final evaluation (from its artifact) writes one Parquet file, named by the ledger column
`eval_tokens_path` (absolute, or relative to the sweep directory), with one row per
scored position in stream order (`eval_tokens_schema()`). The sweep writes once
`results/eval_stream.parquet` (`eval_stream_schema()`): which token, document and
position in the document each scored position is, and the token's frequency bucket in
the training split. The report needs nothing else to pair arms token by token. The
schemas and file names are trial/eval_tokens.py's, which writes both files.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from loopgolf.analysis.results import RESULTS_DIR
from loopgolf.errors import LoopgolfError, first_line
from loopgolf.trial.eval_tokens import STREAM_NAME, eval_stream_schema, eval_tokens_schema

STREAM_FILE = RESULTS_DIR / STREAM_NAME  # in a sweep directory
LN2 = math.log(2.0)


def _read(path: Path, schema: pa.Schema) -> pd.DataFrame:
    if not path.is_file():
        raise LoopgolfError(f"{path}: no such per-token file")
    try:
        table = pq.read_table(path, columns=schema.names)
    except (OSError, pa.ArrowException, KeyError) as exc:
        raise LoopgolfError(f"{path}: cannot read {schema.names} ({first_line(exc)})") from exc
    return table.to_pandas()


class TokenStore:
    """Per-token evidence of the trials of one or many sweeps, read lazily and cached.

    `sweep_dirs` maps a trial id to its sweep directory (relative `eval_tokens_path`s and the
    stream resolve against it). Trials without a per-token file give None everywhere.
    """

    def __init__(self, trials: pd.DataFrame, sweep_dirs: dict[str, Path]) -> None:
        self._paths: dict[str, Path] = {}
        self._dirs = sweep_dirs
        if "eval_tokens_path" in trials:
            for trial_id, value in zip(trials["trial_id"], trials["eval_tokens_path"], strict=True):
                if isinstance(value, str) and value and trial_id in sweep_dirs:
                    path = Path(value)
                    self._paths[trial_id] = path if path.is_absolute() else sweep_dirs[trial_id] / path
        self._streams: dict[Path, pd.DataFrame | None] = {}
        self._docs: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def has(self, trial_id: str) -> bool:
        return trial_id in self._paths and self.stream(trial_id) is not None

    def stream(self, trial_id: str) -> pd.DataFrame | None:
        """The evaluation stream of the trial's sweep (None when the sweep wrote none)."""
        directory = self._dirs.get(trial_id)
        if directory is None:
            return None
        if directory not in self._streams:
            path = directory / STREAM_FILE
            self._streams[directory] = _read(path, eval_stream_schema()) if path.is_file() else None
        return self._streams[directory]

    def tokens(self, trial_id: str) -> pd.DataFrame:
        """The trial's per-token rows; one per stream position, else a LoopgolfError."""
        frame = _read(self._paths[trial_id], eval_tokens_schema())
        stream = self.stream(trial_id)
        if stream is None or len(frame) != len(stream):
            expected = "no stream" if stream is None else f"{len(stream)} stream positions"
            raise LoopgolfError(f"{self._paths[trial_id]}: {len(frame)} scored positions, expected {expected}")
        return frame

    def doc_sums(self, trial_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(bits, bytes) per document of the stream, documents in ascending index order."""
        if trial_id not in self._docs:
            stream = self.stream(trial_id)
            assert stream is not None
            _, doc = np.unique(stream["document"].to_numpy(), return_inverse=True)
            frame = self.tokens(trial_id)
            bits = np.bincount(doc, weights=frame["ce"].to_numpy(np.float64)) / LN2
            nbytes = np.bincount(doc, weights=frame["bytes"].to_numpy(np.float64))
            self._docs[trial_id] = (bits, nbytes)
        return self._docs[trial_id]


def document_index(stream: pd.DataFrame) -> np.ndarray:
    """0..D-1 per scored position, in the order of the stream's document ids."""
    return np.unique(stream["document"].to_numpy(), return_inverse=True)[1]


def sweep_dir_of(path: str | os.PathLike[str]) -> Path:
    """A sweep directory from what `load_results` accepts (a directory or its trials.parquet)."""
    p = Path(path)
    if p.suffix == ".parquet":
        return p.parent.parent if p.parent.name == RESULTS_DIR.name else p.parent
    return p
