"""The challenge's data: shard files, bits-per-byte accounting, and token loaders.

Shard format (Parameter Golf, `write_datafile` / `load_data_shard`): a header of 256
little-endian int32 (magic 20240520, version 1, token count), then the tokens as
little-endian uint16. Files are `fineweb_train_NNNNNN.bin` and `fineweb_val_NNNNNN.bin`.

Bytes per token follow the challenge's `build_sentencepiece_luts` rule exactly: a
piece counts the UTF-8 length of its text without a leading U+2581, plus one byte for
that stripped space unless the previous token is a boundary (control/unknown/unused)
token; byte-fallback pieces count one byte; boundary tokens count zero.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from loopgolf.atomic import atomic_write
from loopgolf.errors import LoopgolfError, first_line

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
SPACE_MARKER = "\u2581"
_SHARD_NAME = re.compile(r"^fineweb_(train|val)_(\d{6})\.bin$")


class ShardError(LoopgolfError):
    """A shard file is not in the challenge's format."""


class DataError(LoopgolfError):
    """A data directory is missing, empty or inconsistent."""


# ---------------------------------------------------------------------------- shards


def shard_name(split: str, index: int) -> str:
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}: expected 'train' or 'val'")
    return f"fineweb_{split}_{index:06d}.bin"


def write_shard(path: str | os.PathLike[str], tokens: np.ndarray) -> None:
    """Write tokens (all < 65536) as one shard, atomically (temp file, then rename)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ShardError(f"{path}: tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 1 << 16):
        raise ShardError(f"{path}: token ids must be in [0, 65535], got [{tokens.min()}, {tokens.max()}]")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, tokens.size

    def write(fh: BinaryIO) -> None:
        fh.write(header.tobytes())
        fh.write(tokens.astype("<u2").tobytes())

    atomic_write(path, write)


def read_shard(path: str | os.PathLike[str]) -> np.ndarray:
    """Memory-map a shard's tokens (uint16), after checking header and file length."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ShardError(f"{path}: no such shard file") from None
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise ShardError(f"{path}: bad magic {header[0]}, expected {SHARD_MAGIC}")
    if header[1] != SHARD_VERSION:
        raise ShardError(f"{path}: unsupported version {header[1]}, expected {SHARD_VERSION}")
    n_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * n_tokens
    if n_tokens < 0 or size != expected:
        raise ShardError(f"{path}: file is {size} bytes, header says {n_tokens} tokens ({expected} bytes)")
    if n_tokens == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def list_shards(data_dir: str | os.PathLike[str], split: str) -> list[Path]:
    """The split's shard files in index order; a clear error if there are none."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data dir {str(data_dir)!r}: not a directory (run `loopgolf data prepare` first)")
    found = sorted(p for p in data_dir.iterdir() if (m := _SHARD_NAME.match(p.name)) and m.group(1) == split)
    if not found:
        raise DataError(f"data dir {str(data_dir)!r}: no fineweb_{split}_NNNNNN.bin shards")
    return found


# ---------------------------------------------------------------------- byte accounting


@dataclasses.dataclass(frozen=True)
class ByteTable:
    """Per-token-id lookup tables for the challenge's bytes-per-token rule."""

    base_bytes: np.ndarray  # int32[V]: UTF-8 bytes of the piece without its leading space marker
    has_leading_space: np.ndarray  # bool[V]: the piece starts with U+2581
    is_boundary: np.ndarray  # bool[V]: control / unknown / unused ids (0 bytes)

    @property
    def vocab_size(self) -> int:
        return int(self.base_bytes.shape[0])


def byte_table(sp: object, vocab_size: int | None = None) -> ByteTable:
    """Build the tables from a SentencePieceProcessor; ids >= its size are boundary tokens."""
    n = int(sp.get_piece_size())  # type: ignore[attr-defined]
    size = max(n, vocab_size or 0)
    base = np.zeros(size, dtype=np.int32)
    space = np.zeros(size, dtype=bool)
    boundary = np.ones(size, dtype=bool)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):  # type: ignore[attr-defined]
            continue
        boundary[i] = False
        if sp.is_byte(i):  # type: ignore[attr-defined]
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)  # type: ignore[attr-defined]
        if piece.startswith(SPACE_MARKER):
            space[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteTable(base, space, boundary)


def load_tokenizer(path: str | os.PathLike[str]) -> object:
    import sentencepiece as spm

    if not Path(path).is_file():
        raise DataError(f"tokenizer {str(path)!r}: no such file")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as exc:  # sentencepiece's parse errors are RuntimeError
        first = first_line(exc)
        raise DataError(f"tokenizer {str(path)!r}: not a SentencePiece model ({first})") from None


def token_bytes(targets: np.ndarray, previous: np.ndarray, table: ByteTable) -> np.ndarray:
    """UTF-8 bytes each target token stands for, given the token before it (same shape)."""
    targets = np.asarray(targets, dtype=np.int64)
    previous = np.asarray(previous, dtype=np.int64)
    nbytes = table.base_bytes[targets].astype(np.int64)
    nbytes += table.has_leading_space[targets] & ~table.is_boundary[previous]
    return nbytes


def stream_bytes(tokens: np.ndarray, table: ByteTable) -> int:
    """Bytes of every token of a stream after the first (the first has no predecessor)."""
    tokens = np.asarray(tokens)
    return int(token_bytes(tokens[1:], tokens[:-1], table).sum()) if tokens.size > 1 else 0


# ------------------------------------------------------------------------------ loaders


HOLDOUT_SLICES = 16  # a topic-sorted corpus's tail is no sample of it: hold out across the split


def holdout_spans(lengths: list[int], holdout: int, seq_len: int) -> list[tuple[int, int, int]]:
    """(shard, start, stop) of the held-out windows of seq_len + 1 tokens: about `holdout`
    tokens (at most half the split) in up to HOLDOUT_SLICES runs of whole windows, the runs
    centred at evenly spaced points of the concatenated split, each inside one shard."""
    width = seq_len + 1
    n_windows = min(holdout // width, sum(lengths) // 2 // width) if holdout > 0 else 0
    if n_windows == 0:
        return []
    n_runs = min(HOLDOUT_SLICES, n_windows)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    spans: list[tuple[int, int, int]] = []
    for run, count in enumerate(np.diff(np.linspace(0, n_windows, n_runs + 1).round().astype(int))):
        centre = (run + 0.5) * starts[-1] / n_runs
        shard = min(int(np.searchsorted(starts, centre, side="right")) - 1, len(lengths) - 1)
        count = min(int(count), lengths[shard] // width)
        first = int(centre - starts[shard]) - count * width // 2
        first = max(0, min(first, lengths[shard] - count * width))
        spans += [(shard, first + k * width, first + (k + 1) * width) for k in range(count)]
    return _without_overlaps(spans)


def _without_overlaps(spans: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Drop a window that overlaps an earlier one (runs pushed together inside a short shard)."""
    kept: list[tuple[int, int, int]] = []
    for span in sorted(spans):
        if not kept or kept[-1][0] != span[0] or kept[-1][2] <= span[1]:
            kept.append(span)
    return kept


def training_segments(shards: list[np.ndarray], spans: list[tuple[int, int, int]]) -> list[np.ndarray]:
    """The shards with the held-out spans cut out, as contiguous segments (a training window
    never bridges a cut, so it never sees held-out text or joins text that was not adjacent)."""
    segments: list[np.ndarray] = []
    for index, shard in enumerate(shards):
        at = 0
        for _, a, b in (span for span in spans if span[0] == index):
            segments.append(shard[at:a])
            at = b
        segments.append(shard[at:])
    return [s for s in segments if len(s)]


class TrainBatches:
    """Seeded training batches: batch `step` is a pure function of (seed, step).

    Each row is a window of seq_len + 1 tokens from one shard (chosen with probability
    proportional to its length), so a resumed run only needs the step number to
    continue with exactly the batches it would have seen.
    """

    def __init__(
        self, data_dir: str | os.PathLike[str], batch_size: int, seq_len: int, seed: int, holdout: int = 0,
        vocab_size: int = 1 << 16,
    ) -> None:
        shards = [np.asarray(read_shard(p)) for p in list_shards(data_dir, "train")]
        self.batch_size, self.seq_len, self.seed, self.vocab_size = batch_size, seq_len, seed, vocab_size
        # Held out: whole windows spread evenly over the split, never inside a training window;
        # the router's threshold is calibrated on them after training (trial/calibrate.py).
        spans = holdout_spans([len(s) for s in shards], holdout, seq_len)
        self.heldout_windows = (
            np.stack([shards[i][a:b] for i, a, b in spans]).astype(np.int64)
            if spans else np.zeros((0, seq_len + 1), dtype=np.int64)
        )
        self.shards = training_segments(shards, spans)
        windows = np.array([max(0, len(s) - seq_len - 1) for s in self.shards], dtype=np.int64)
        if windows.sum() == 0:
            raise DataError(f"data dir {str(data_dir)!r}: train shards are shorter than seq_len+1={seq_len + 1}")
        self._cum_windows = np.cumsum(windows)

    @property
    def total_tokens(self) -> int:
        return int(sum(len(s) for s in self.shards))

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets), each int64 of shape (batch_size, seq_len)."""
        rng = np.random.default_rng([self.seed, step])
        picks = rng.integers(0, self._cum_windows[-1], size=self.batch_size)
        shard_idx = np.searchsorted(self._cum_windows, picks, side="right")
        starts = picks - np.concatenate([[0], self._cum_windows[:-1]])[shard_idx]
        rows = np.stack([self.shards[i][s : s + self.seq_len + 1] for i, s in zip(shard_idx, starts, strict=True)])
        rows = rows.astype(np.int64)
        if rows.max() >= self.vocab_size:  # cheap beside a step; the manifest's max ids were checked at start
            raise DataError(f"train shards: token id {int(rows.max())} >= vocab {self.vocab_size} (batch {step})")
        return rows[:, :-1], rows[:, 1:]


def val_tokens(data_dir: str | os.PathLike[str], max_tokens: int = 0) -> np.ndarray:
    """The val split's tokens in order, concatenated, optionally only the first max_tokens."""
    parts: list[np.ndarray] = []
    have = 0
    for path in list_shards(data_dir, "val"):
        shard = read_shard(path)
        take = len(shard) if not max_tokens else min(len(shard), max_tokens - have)
        parts.append(np.asarray(shard[:take]))
        have += take
        if max_tokens and have >= max_tokens:
            break
    return np.concatenate(parts).astype(np.int64)


def val_windows(
    tokens: np.ndarray, seq_len: int, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Non-overlapping windows of seq_len targets, as the challenge's baseline scores them.

    Every token after the first is a target exactly once, except for a tail shorter than
    a window, which is dropped (the baseline truncates to a multiple of seq_len).
    """
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        raise DataError(f"val split has {len(tokens)} tokens, fewer than seq_len+1={seq_len + 1}")
    for first in range(0, n_windows, batch_size):
        idx = np.arange(first, min(first + batch_size, n_windows))
        rows = np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in idx])
        yield rows[:, :-1], rows[:, 1:]


def split_documents(text: str) -> list[str]:
    """Documents of a text file: blocks separated by blank lines, stripped, non-empty."""
    return [doc.strip() for doc in re.split(r"\n\s*\n", text) if doc.strip()]


def default_corpus() -> list[tuple[str, str]]:
    """English text every Python installation has: the standard library's doc topics."""
    from pydoc_data.topics import topics  # here: about 750 KB, read only for the built-in corpus

    return [(f"pydoc_data.topics:{name}", topics[name]) for name in sorted(topics)]
