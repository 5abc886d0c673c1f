"""Shard format, the challenge's bytes-per-token rule, loaders and `data prepare`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loopgolf.trial.data import (
    HEADER_BYTES,
    SHARD_MAGIC,
    DataError,
    ShardError,
    TrainBatches,
    byte_table,
    default_corpus,
    list_shards,
    load_tokenizer,
    read_shard,
    split_documents,
    stream_bytes,
    token_bytes,
    val_tokens,
    val_windows,
    write_shard,
)
from loopgolf.trial.prepare import PrepareConfig, prepare, read_manifest
from tests.conftest import VOCAB, Challenge

# ------------------------------------------------------------------------- shards


def test_shard_roundtrip_is_exact_on_disk(tmp_path: Path) -> None:
    tokens = np.array([0, 1, 65535, 1024, 7], dtype=np.int64)
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, tokens)
    raw = path.read_bytes()
    assert len(raw) == HEADER_BYTES + 2 * len(tokens)
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert (header[0], header[1], header[2]) == (SHARD_MAGIC, 1, len(tokens))
    assert not header[3:].any()
    assert np.frombuffer(raw[HEADER_BYTES:], dtype="<u2").tolist() == tokens.tolist()
    assert read_shard(path).tolist() == tokens.tolist()


def _corrupt(path: Path, offset: int, value: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 4] = np.array([value], dtype="<i4").tobytes()
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: _corrupt(p, 0, 12345), "bad magic 12345"),
        (lambda p: _corrupt(p, 4, 2), "unsupported version 2"),
        (lambda p: p.write_bytes(p.read_bytes()[:-1]), "header says 3 tokens"),
        (lambda p: p.write_bytes(p.read_bytes()[:100]), "truncated"),
        (lambda p: p.write_bytes(p.read_bytes() + b"\0\0"), "header says 3 tokens"),
    ],
)
def test_bad_shards_fail_with_one_clear_error_naming_the_file(tmp_path: Path, damage, message: str) -> None:
    path = tmp_path / "fineweb_val_000000.bin"
    write_shard(path, np.array([1, 2, 3]))
    damage(path)
    with pytest.raises(ShardError, match=message) as info:
        read_shard(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_write_shard_rejects_ids_beyond_uint16(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="65535"):
        write_shard(tmp_path / "x.bin", np.array([70000]))
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------- byte accounting


def _tokenizer(source: str, request: pytest.FixtureRequest):
    """A tokenizer under test and real text to encode: built-in ones always, the challenge's with its data."""
    if source.startswith("challenge"):
        challenge: Challenge = request.getfixturevalue("challenge")
        vocab = int(source.split("-")[1])
        return load_tokenizer(challenge.tokenizer(vocab)), challenge.shakespeare.read_text(encoding="utf-8")
    data = request.getfixturevalue("corpus_data" if source == "builtin-fallback" else "corpus_data_no_fallback")
    corpus = "\n\n".join(text for _, text in default_corpus())
    return load_tokenizer(data / "tokenizer.model"), corpus


CHALLENGE = pytest.mark.challenge
SOURCES = ["builtin-fallback", "builtin-no-fallback", pytest.param("challenge-1024", marks=CHALLENGE),
           pytest.param("challenge-8192", marks=CHALLENGE)]


@pytest.mark.parametrize("source", SOURCES)
def test_counted_bytes_equal_utf8_length_of_decoded_text(source: str, request: pytest.FixtureRequest) -> None:
    """The invariant bpb rests on, over real documents, each preceded by BOS."""
    sp, text = _tokenizer(source, request)
    table = byte_table(sp)
    docs = split_documents(text)[:1500]
    docs.append("Caf\u00e9 na\u00efve \u2014 \ufb01ne  spaced\n\nand   tabs\there 12345")
    checked = 0
    for doc in docs:
        ids = sp.encode(doc)
        if sp.unk_id() in ids:
            continue
        stream = np.array([sp.bos_id(), *ids])
        assert stream_bytes(stream, table) == len(sp.decode(ids).encode("utf-8")), doc[:60]
        checked += 1
    assert checked >= 0.85 * len(docs)  # documents with an unknown piece (no byte fallback) are skipped


@pytest.mark.parametrize("source", SOURCES[:3])
def test_space_byte_is_charged_only_after_a_non_boundary_token(source: str, request: pytest.FixtureRequest) -> None:
    sp, _ = _tokenizer(source, request)
    table = byte_table(sp)
    the = sp.piece_to_id("\u2581the")
    assert the != sp.unk_id() and table.has_leading_space[the] and table.base_bytes[the] == 3
    bos, word = sp.bos_id(), sp.piece_to_id("e")
    assert not table.is_boundary[word]
    assert token_bytes(np.array([the, the]), np.array([bos, word]), table).tolist() == [3, 4]
    assert table.is_boundary[[0, 1, 2, 3]].all() and table.base_bytes[[0, 1, 2, 3]].sum() == 0


@pytest.mark.parametrize(("fallback", "no_fallback"), [
    ("builtin-fallback", "builtin-no-fallback"), pytest.param("challenge-8192", "challenge-1024", marks=CHALLENGE)])
def test_byte_fallback_pieces_count_one_byte_and_unknown_zero(
    fallback: str, no_fallback: str, request: pytest.FixtureRequest
) -> None:
    sp, _ = _tokenizer(fallback, request)
    table = byte_table(sp)
    ids = sp.encode("\u2603")  # a snowman: not a piece, so byte fallback (3 UTF-8 bytes)
    assert all(sp.is_byte(i) for i in ids)
    assert stream_bytes(np.array([sp.bos_id(), *ids]), table) == 3
    sp, _ = _tokenizer(no_fallback, request)  # no byte fallback: the snowman is unknown
    assert not any(sp.is_byte(i) for i in range(sp.get_piece_size()))
    ids = sp.encode("a\u2603")
    assert sp.unk_id() in ids
    assert stream_bytes(np.array([sp.bos_id(), *ids]), byte_table(sp)) == 1


# ------------------------------------------------------------------------ loaders


def test_train_batches_are_a_pure_function_of_seed_and_step(corpus_data: Path) -> None:
    a = TrainBatches(corpus_data, batch_size=4, seq_len=32, seed=1)
    b = TrainBatches(corpus_data, batch_size=4, seq_len=32, seed=1)
    x0, y0 = a.batch(0)
    assert x0.shape == y0.shape == (4, 32)
    assert np.array_equal(x0[:, 1:], y0[:, :-1])
    assert np.array_equal(b.batch(5)[0], a.batch(5)[0])
    assert not np.array_equal(a.batch(6)[0], a.batch(5)[0])
    assert not np.array_equal(TrainBatches(corpus_data, 4, 32, seed=2).batch(5)[0], a.batch(5)[0])


def test_val_windows_score_every_target_once(corpus_data: Path) -> None:
    tokens = val_tokens(corpus_data, max_tokens=1000)
    assert len(tokens) == 1000
    targets = np.concatenate([y.ravel() for _, y in val_windows(tokens, seq_len=64, batch_size=3)])
    n = (len(tokens) - 1) // 64 * 64
    assert np.array_equal(targets, tokens[1 : n + 1])


def test_missing_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a directory"):
        list_shards(tmp_path / "nope", "train")
    with pytest.raises(DataError, match=r"no fineweb_val_NNNNNN\.bin"):
        list_shards(tmp_path, "val")


# ------------------------------------------------------------------------ prepare


@pytest.mark.parametrize("data", ["corpus_data", "corpus_data_no_fallback",
                                  pytest.param("challenge_data", marks=CHALLENGE)])
def test_manifest_bytes_equal_bytes_recomputed_from_the_shards(data: str, request: pytest.FixtureRequest) -> None:
    data_dir: Path = request.getfixturevalue(data)
    manifest = read_manifest(data_dir)
    table = byte_table(load_tokenizer(data_dir / "tokenizer.model"))
    for split in ("train", "val"):
        tokens = np.concatenate([np.asarray(read_shard(p)) for p in list_shards(data_dir, split)])
        info = manifest["splits"][split]
        assert info["tokens"] == len(tokens)
        assert info["bytes"] == stream_bytes(tokens, table)
        assert info["documents"] == int((tokens == 1).sum())
        assert info["raw_text_bytes"] - info["bytes"] == info["bytes_lost_to_normalization_and_unknown"] >= 0
        assert info["unknown_tokens"] == int((tokens == 3).sum())
    assert manifest["tokenizer"]["vocab_size"] == VOCAB


def test_prepare_is_deterministic_and_splits_by_document(corpus_data: Path, tmp_path: Path) -> None:
    def run(out: Path) -> dict[str, bytes]:
        prepare(PrepareConfig(out, (), corpus_data / "tokenizer.model", val_fraction=0.2, shard_tokens=15_000))
        return {p.name: p.read_bytes() for p in sorted(out.iterdir())}

    first, second = run(tmp_path / "a"), run(tmp_path / "b")
    assert first == second
    assert sum(name.startswith("fineweb_train_") for name in first) >= 6  # shards really split

    def documents(split: str) -> set[tuple[int, ...]]:
        tokens = np.concatenate([np.asarray(read_shard(p)) for p in list_shards(tmp_path / "a", split)])
        cuts = np.flatnonzero(tokens == 1)
        return {tuple(d) for d in np.split(tokens, cuts[1:])}

    val, train = documents("val"), documents("train")
    assert len(val) > 100 and not val & train


@pytest.mark.parametrize(("data", "fallback"), [("corpus_data", True), ("corpus_data_no_fallback", False)])
def test_prepare_with_vocab_size_trains_a_challenge_style_tokenizer(
    data: str, fallback: bool, request: pytest.FixtureRequest
) -> None:
    data_dir: Path = request.getfixturevalue(data)  # `prepare` with vocab_size on the built-in corpus
    manifest = read_manifest(data_dir)
    sp = load_tokenizer(data_dir / "tokenizer.model")
    assert sp.get_piece_size() == VOCAB == manifest["tokenizer"]["vocab_size"]
    assert sp.piece_to_id("\u2581") != sp.unk_id()
    assert any(sp.is_byte(i) for i in range(sp.get_piece_size())) == fallback
    assert sp.id_to_piece(sp.encode("a b")[0]) == "a"  # no dummy prefix
    assert manifest["sources"][0]["name"].startswith("pydoc_data.topics:")
    assert manifest["splits"]["val"]["documents"] > 0
    # without byte fallback, characters the tokenizer never kept are unknown and lose their bytes
    assert (manifest["splits"]["train"]["unknown_tokens"] > 0) == (not fallback)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--text", "/no/such.txt", "--vocab-size", "512"], "text file '/no/such.txt': no such file"),
        (["--tokenizer", "/no/such.model"], "tokenizer '/no/such.model': no such file"),
        (["--vocab-size", "100"], "vocab_size=100"),
        ([], "exactly one of --tokenizer MODEL or --vocab-size N"),
        (["--tokenizer", "/no/such.model", "--no-byte-fallback"], "--no-byte-fallback applies to a trained tokenizer"),
        (["--vocab-size", "512", "--val-fraction", "1.5"], "val_fraction=1.5"),
    ],
)
def test_prepare_cli_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "loopgolf.orchestrator.cli", "data", "prepare", *args, "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_prepare_cli_writes_shards_and_summary(corpus_data: Path, tmp_path: Path) -> None:
    out, text = tmp_path / "out", tmp_path / "corpus.txt"
    text.write_text("\n\n".join(t for _, t in default_corpus()), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "loopgolf.orchestrator.cli", "data", "prepare", "--text", str(text),
         "--tokenizer", str(corpus_data / "tokenizer.model"), "--out", str(out)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "train:" in proc.stdout and "val  :" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    shards = manifest["splits"]["train"]["shards"] + manifest["splits"]["val"]["shards"]
    assert {p.name for p in out.iterdir()} == {"manifest.json", "tokenizer.model", *shards}
