"""Per-token evaluation files, so that trials pair by token.

Every trial of a sweep scores the same val tokens in the same windows (`eval_size`), so
position i of one trial's per-token file is position i of every other's: two arms of one
configuration compare token by token, and the sweep's `eval_stream.parquet` says which
document, position in document and frequency bucket each scored token is.

- `<trial>/eval_tokens.parquet` (`eval_tokens_schema`): per scored position, in scoring
  order: `ce` (float32, nats, final logits), `base_ce` (the base pass's CE: equal to ce
  when nothing is refined), `refined` (bool), `router_score` (float32; NaN, not null, when
  the model does not refine: refine_passes = 0), `bytes`.
- `<sweep>/results/eval_stream.parquet` (`eval_stream_schema`): per scored position:
  `token` (id), `document` (index of its document in the val split), `position` (its
  position there; the document's BOS is position 0), `freq_bucket` (decile of the token's
  frequency in the training split, 0 = rarest; tokens absent from it are bucket 0).

These schemas are the contract with the analysis (analysis/tokens.py reads them). PyArrow
is imported where a table is made: a trial that never writes one runs without it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from loopgolf.atomic import atomic_write
from loopgolf.trial.data import list_shards, read_shard, val_tokens
from loopgolf.trial.prepare import read_manifest

if TYPE_CHECKING:
    import pyarrow as pa

EVAL_TOKENS_NAME = "eval_tokens.parquet"
STREAM_NAME = "eval_stream.parquet"
AUTO_EVAL_LIMIT = 1 << 20  # eval_tokens=0: the whole val split up to this many tokens
N_FREQ_BUCKETS = 10


def eval_size(n_val: int, eval_tokens: int) -> int:
    """Val tokens an evaluation reads: eval_tokens when set, else the whole split when it
    has at most AUTO_EVAL_LIMIT tokens, else its first AUTO_EVAL_LIMIT."""
    return min(n_val, eval_tokens or AUTO_EVAL_LIMIT)


@dataclasses.dataclass(frozen=True)
class TokenScores:
    """Per scored position, in scoring order (window by window, position by position)."""

    ce: np.ndarray  # float32
    base_ce: np.ndarray  # float32
    refined: np.ndarray  # bool
    router_score: np.ndarray | None  # float32, None without refinement (written as NaN)
    bytes: np.ndarray  # int32


def eval_tokens_schema() -> pa.Schema:
    """One row per scored position of one trial (stream order)."""
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("ce", pa.float32()),  # cross-entropy in nats of the final logits
            pa.field("base_ce", pa.float32()),  # of the base pass (before any refinement)
            pa.field("refined", pa.bool_()),
            pa.field("router_score", pa.float32()),  # NaN when the trial does not route
            pa.field("bytes", pa.int32()),  # UTF-8 bytes the target token stands for (bpb's denominator)
        ],
        metadata={"loopgolf.table": "eval_tokens"},
    )


def eval_stream_schema() -> pa.Schema:
    """One row per scored position of the sweep's shared evaluation stream."""
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("token", pa.int32()),  # the target token id
            pa.field("document", pa.int64()),  # index of its document in the val split
            pa.field("position", pa.int32()),  # its position in that document (0 = first token)
            pa.field("freq_bucket", pa.int16()),  # frequency bucket of the token in the training split
        ],
        metadata={"loopgolf.table": "eval_stream"},
    )


def _write_parquet(table: pa.Table, path: Path) -> Path:
    import pyarrow.parquet as pq

    atomic_write(path, lambda fh: pq.write_table(table, fh))
    return path


def write_token_scores(scores: TokenScores, path: str | os.PathLike[str]) -> Path:
    """The per-token file (written to a temp file, fsynced, renamed)."""
    import pyarrow as pa

    n = len(scores.ce)
    router = scores.router_score if scores.router_score is not None else np.full(n, np.nan, np.float32)
    table = pa.table({
        "ce": pa.array(scores.ce.astype(np.float32)),
        "base_ce": pa.array(scores.base_ce.astype(np.float32)),
        "refined": pa.array(scores.refined.astype(bool)),
        "router_score": pa.array(router.astype(np.float32)),
        "bytes": pa.array(scores.bytes.astype(np.int32)),
    }, schema=eval_tokens_schema())
    return _write_parquet(table, Path(path))


def frequency_buckets(data_dir: str | os.PathLike[str], vocab_size: int) -> np.ndarray:
    """Per token id, the decile of its count in the training split (0 = rarest, absent = 0)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for path in list_shards(data_dir, "train"):
        counts += np.bincount(np.asarray(read_shard(path)), minlength=vocab_size)[:vocab_size]
    ranks = np.argsort(np.argsort(counts, kind="stable"), kind="stable")  # 0 = rarest
    buckets = ranks * N_FREQ_BUCKETS // vocab_size
    buckets[counts == 0] = 0
    return buckets.astype(np.int16)


def stream_table(data_dir: str | os.PathLike[str], eval_tokens: int, seq_len: int, bos_id: int,
                 vocab_size: int) -> pa.Table:
    """What every trial's per-token file is aligned to: the scored targets of val_windows."""
    import pyarrow as pa

    tokens = val_tokens(data_dir, 0)
    tokens = tokens[: eval_size(len(tokens), eval_tokens)]
    n_scored = (len(tokens) - 1) // seq_len * seq_len
    is_bos = tokens == bos_id
    document = np.cumsum(is_bos) - int(is_bos[0])  # text before a first BOS is document 0
    last_start = np.maximum.accumulate(np.where(is_bos, np.arange(len(tokens)), 0))
    position = np.arange(len(tokens)) - last_start
    targets = slice(1, 1 + n_scored)
    buckets = frequency_buckets(data_dir, vocab_size)
    return pa.table({
        "token": pa.array(tokens[targets].astype(np.int32)),
        "document": pa.array(document[targets].astype(np.int64)),
        "position": pa.array(position[targets].astype(np.int32)),
        "freq_bucket": pa.array(buckets[tokens[targets]].astype(np.int16)),
    }, schema=eval_stream_schema())


def write_stream(sweep_results: str | os.PathLike[str], data_dir: str | os.PathLike[str], eval_tokens: int,
                 seq_len: int) -> Path:
    """`<results>/eval_stream.parquet`, written once: an existing file is kept."""
    path = Path(sweep_results) / STREAM_NAME
    if path.is_file():
        return path
    manifest = read_manifest(Path(data_dir))
    vocab = int(manifest["tokenizer"]["vocab_size"])
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_parquet(stream_table(data_dir, eval_tokens, seq_len, int(manifest["bos_id"]), vocab), path)
