"""`loopgolf data prepare`: text files -> challenge-format shards + manifest.json.

Text is split into documents (blank-line-separated blocks). Each document goes to
val or train by a hash of its own text, so the split is deterministic, independent
of file order, and a document repeated verbatim can never sit on both sides. Every
document gets a BOS id first, as in the challenge's export; documents are
concatenated and cut into shards of `shard_tokens` tokens.

The data directory is self-contained: the tokenizer is copied in as
`tokenizer.model`, so a trial (or `loopgolf artifact eval`) needs nothing else.
Everything is written into a temporary directory beside the target and renamed
into place at the end, so an interrupted prepare leaves nothing half-written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loopgolf.atomic import atomic_directory
from loopgolf.errors import first_line
from loopgolf.trial.data import (
    DataError,
    byte_table,
    default_corpus,
    load_tokenizer,
    read_shard,
    shard_name,
    split_documents,
    stream_bytes,
    write_shard,
)

MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    out_dir: Path
    text_files: tuple[Path, ...] = ()  # empty: the built-in default corpus
    tokenizer: Path | None = None
    vocab_size: int | None = None
    byte_fallback: bool = True  # only with vocab_size: False leaves unseen characters as unknown pieces
    val_fraction: float = 0.1
    shard_tokens: int = 100_000_000  # the challenge's shard size
    overwrite: bool = False

    def __post_init__(self) -> None:
        if (self.tokenizer is None) == (self.vocab_size is None):
            raise DataError("prepare: expected exactly one of --tokenizer MODEL or --vocab-size N")
        if self.tokenizer is not None and not self.byte_fallback:
            raise DataError("prepare: --no-byte-fallback applies to a trained tokenizer (--vocab-size) only")
        if self.vocab_size is not None and not 260 <= self.vocab_size <= 65_536:
            raise DataError(f"prepare: vocab_size={self.vocab_size}: expected 260..65536 (byte fallback needs 256 ids)")
        if not 0.0 < self.val_fraction < 1.0:
            raise DataError(f"prepare: val_fraction={self.val_fraction}: expected a fraction in (0, 1)")
        if self.shard_tokens < 1:
            raise DataError(f"prepare: shard_tokens={self.shard_tokens}: expected >= 1")
        for path in self.text_files:
            if not Path(path).is_file():
                raise DataError(f"prepare: text file {str(path)!r}: no such file")
        if self.tokenizer is not None and not Path(self.tokenizer).is_file():
            raise DataError(f"prepare: tokenizer {str(self.tokenizer)!r}: no such file")
        out = Path(self.out_dir)
        if out.exists() and any(out.iterdir()) and not self.overwrite:
            raise DataError(f"prepare: out dir {str(out)!r} is not empty (pass --overwrite to replace it)")


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_val_document(doc: str, val_fraction: float) -> bool:
    """Deterministic split by the document's own text."""
    digest = hashlib.sha256(doc.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def read_sources(text_files: Sequence[Path]) -> list[tuple[str, str]]:
    if not text_files:
        return default_corpus()
    return [(str(p), Path(p).read_text(encoding="utf-8")) for p in text_files]


def train_tokenizer(train_docs: Sequence[str], vocab_size: int, model_path: Path, byte_fallback: bool = True) -> None:
    """SentencePiece BPE with the challenge's settings (NFKC, no dummy prefix; byte fallback by default)."""
    import sentencepiece as spm

    prefix = str(model_path.with_suffix(""))
    try:
        _train_bpe(spm, train_docs, vocab_size, prefix, byte_fallback)
    except RuntimeError as exc:  # SentencePiece reports bad settings as a multi-line internal error
        raise DataError(f"--vocab-size {vocab_size}: {_trainer_problem(str(exc))}") from exc
    Path(prefix + ".vocab").unlink(missing_ok=True)
    sp = load_tokenizer(model_path)
    if sp.piece_to_id("\u2581") == sp.unk_id():  # type: ignore[attr-defined]
        raise DataError("prepare: trained tokenizer has no standalone space-marker piece; bpb would be wrong")


def _trainer_problem(message: str) -> str:
    """One line from SentencePiece's trainer error: the minimum vocabulary when it says one."""
    needed = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if needed:
        return f"the text has {needed.group(2)} characters and special pieces; expected a vocabulary of at least that"
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return f"SentencePiece could not train a tokenizer ({lines[-1] if lines else 'no message'})"


def _train_bpe(spm: Any, train_docs: Sequence[str], vocab_size: int, prefix: str, byte_fallback: bool) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(train_docs),
        model_prefix=prefix,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=byte_fallback,
        split_digits=True,
        normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=False,
        character_coverage=0.999,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        max_sentence_length=1 << 20,
        shuffle_input_sentence=False,
        num_threads=1,  # deterministic merges
        minloglevel=2,
    )


def _write_split(tokens: np.ndarray, split: str, shard_tokens: int, out: Path) -> list[str]:
    names = []
    for i, first in enumerate(range(0, len(tokens), shard_tokens)):
        names.append(shard_name(split, i))
        write_shard(out / names[-1], tokens[first : first + shard_tokens])
    return names


def _encode_split(
    sp: Any, split: str, docs: list[str], raw_bytes: int, shard_tokens: int, out: Path
) -> dict[str, Any]:
    """Tokenize one split's documents (each after a BOS), write its shards; its manifest entry."""
    bos, unk = sp.bos_id(), sp.unk_id()
    encoded = sp.encode(docs)
    stream = np.fromiter(
        (t for ids in encoded for t in (bos, *ids)), dtype=np.int64, count=sum(len(e) + 1 for e in encoded)
    )
    counted = stream_bytes(stream, byte_table(sp))
    return {
        "documents": len(docs),
        "tokens": int(stream.size),
        "bytes": counted,
        "raw_text_bytes": raw_bytes,
        "bytes_lost_to_normalization_and_unknown": raw_bytes - counted,
        "unknown_tokens": int((stream == unk).sum()),
        "shards": _write_split(stream, split, shard_tokens, out),
        "max_token_ids": [  # checked against the tokenizer before any compute
            int(stream[first : first + shard_tokens].max()) for first in range(0, len(stream), shard_tokens)
        ],
    }


def prepare(config: PrepareConfig) -> dict:
    """Write shards, tokenizer.model and manifest.json into config.out_dir; return the manifest."""
    sources = read_sources(config.text_files)
    docs: dict[str, list[str]] = {"train": [], "val": []}
    raw_bytes = {"train": 0, "val": 0}
    for _, text in sources:
        for doc in split_documents(text):
            split = "val" if is_val_document(doc, config.val_fraction) else "train"
            docs[split].append(doc)
            raw_bytes[split] += len(doc.encode("utf-8"))
    for split, items in docs.items():
        if not items:
            raise DataError(f"prepare: the {split} split got no documents; use more text or another --val-fraction")

    with atomic_directory(config.out_dir, existing="replace", mode=0o755) as staging:
        tok_path = staging / TOKENIZER_FILE
        if config.tokenizer is not None:
            shutil.copyfile(config.tokenizer, tok_path)
        else:
            assert config.vocab_size is not None
            train_tokenizer(docs["train"], config.vocab_size, tok_path, config.byte_fallback)
        sp = load_tokenizer(tok_path)
        bos = sp.bos_id()  # type: ignore[attr-defined]
        splits = {
            split: _encode_split(sp, split, items, raw_bytes[split], config.shard_tokens, staging)
            for split, items in docs.items()
        }
        manifest = {
            "format": "challenge-shards/1 (int32[256] header: magic 20240520, version 1, count; uint16 tokens)",
            "tokenizer": {
                "file": TOKENIZER_FILE,
                "source": str(config.tokenizer) if config.tokenizer else f"trained BPE, vocab {config.vocab_size}"
                + ("" if config.byte_fallback else ", no byte fallback"),
                "sha256": _sha256_bytes(tok_path.read_bytes()),
                "vocab_size": int(sp.get_piece_size()),  # type: ignore[attr-defined]
            },
            "sources": [
                {"name": name, "bytes": len(text.encode("utf-8")), "sha256": _sha256_bytes(text.encode("utf-8"))}
                for name, text in sources
            ],
            "val_fraction": config.val_fraction,
            "shard_tokens": config.shard_tokens,
            "bos_id": int(bos),
            "splits": splits,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def read_manifest(data_dir: str | os.PathLike[str]) -> dict:
    """The manifest, its shape checked: a tokenizer with its vocab size, train and val shard lists."""
    path = Path(data_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"data dir {str(data_dir)!r}: no {MANIFEST} (run `loopgolf data prepare`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({first_line(exc)})") from None
    vocab = manifest.get("tokenizer", {}).get("vocab_size") if isinstance(manifest, dict) else None
    splits = manifest.get("splits") if isinstance(manifest, dict) else None
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1 or not isinstance(splits, dict):
        raise DataError(f"{path}: expected {{tokenizer: {{vocab_size: int}}, splits: {{train, val}}}} as "
                        "`loopgolf data prepare` writes")  # fmt: skip
    for split in ("train", "val"):
        entry = splits.get(split)
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list) or not shards or not all(isinstance(n, str) for n in shards):
            raise DataError(f"{path}: splits.{split}.shards: expected a non-empty list of shard file names")
        max_ids = entry.get("max_token_ids")
        if max_ids is not None and (not isinstance(max_ids, list) or len(max_ids) != len(shards)):
            raise DataError(f"{path}: splits.{split}.max_token_ids: expected one per shard")
    return manifest


def check_data(data_dir: str | os.PathLike[str], vocab_size: int) -> dict:
    """Everything a trial will read, checked before any compute is spent; returns the manifest.

    The manifest's shape; at least one train and one val shard, each in the challenge's
    format; the tokenizer loads and has the manifest's vocab size, which fits the model's
    `vocab_size`; and every shard's largest token id is below the tokenizer's vocab (an id
    at or above it would be an IndexError after training, or be counted as 0 bytes).
    """
    manifest = read_manifest(data_dir)
    path = tokenizer_path(data_dir)
    pieces = int(load_tokenizer(path).get_piece_size())  # type: ignore[attr-defined]
    declared = manifest["tokenizer"]["vocab_size"]
    if pieces != declared:
        raise DataError(f"{path}: the tokenizer has {pieces} pieces but {MANIFEST} says vocab_size={declared}")
    if pieces > vocab_size:
        raise DataError(f"data dir {str(data_dir)!r} uses a {pieces}-piece tokenizer but vocab_size={vocab_size}")
    for split in ("train", "val"):
        entry = manifest["splits"][split]
        recorded = entry.get("max_token_ids") or [None] * len(entry["shards"])
        for name, max_id in zip(entry["shards"], recorded, strict=True):
            shard = Path(data_dir) / name
            if max_id is None:  # a manifest from before max ids were recorded: read the shard once
                tokens = read_shard(shard)
                max_id = int(tokens.max()) if len(tokens) else -1
            elif not shard.is_file():
                raise DataError(f"{shard}: no such shard (listed in {MANIFEST})")
            if max_id >= pieces:
                raise DataError(f"{shard}: token id {max_id} >= the tokenizer's {pieces} pieces (wrong tokenizer?)")
    return manifest


def tokenizer_path(data_dir: str | os.PathLike[str]) -> Path:
    path = Path(data_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise DataError(f"data dir {str(data_dir)!r}: no {TOKENIZER_FILE} (run `loopgolf data prepare`)")
    return path
