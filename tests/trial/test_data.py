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
    ByteTable,
    DataError,
    ShardError,
    TrainBatches,
    byte_table,
    default_corpus,
    list_shards,
    load_tokenizer,
    read_shard,
    shard_name,
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


def _tiny_train_dir(tmp_path: Path, lengths: list[int]) -> Path:
    """Train shards whose token at position i of shard k is 1000 * k + i (so a row names its source)."""
    for k, n in enumerate(lengths):
        write_shard(tmp_path / shard_name("train", k), 1000 * k + np.arange(n))
    return tmp_path


def test_train_rows_are_exactly_the_shards_windows_each_reachable(tmp_path: Path) -> None:
    """Reference: every window of seq_len + 1 tokens that starts before len - seq_len - 1, in any shard."""
    seq_len, lengths = 8, [40, 5, 10, 60]  # shard 1 is shorter than a window; shard 2 has exactly one
    data = _tiny_train_dir(tmp_path, lengths)
    loader = TrainBatches(data, batch_size=16, seq_len=seq_len, seed=0)
    assert loader.total_tokens == sum(lengths)
    seen: set[tuple[int, int]] = set()
    for step in range(60):
        x, y = loader.batch(step)
        assert x.shape == y.shape == (16, seq_len) and x.dtype == y.dtype == np.int64
        assert np.array_equal(x[:, 1:], y[:, :-1])
        rows = np.concatenate([x, y[:, -1:]], axis=1)
        shard, start = rows[:, 0] // 1000, rows[:, 0] % 1000
        assert np.array_equal(rows, rows[:, :1] + np.arange(seq_len + 1))  # contiguous, inside one shard
        seen |= set(zip(shard.tolist(), start.tolist(), strict=True))
    expected = {(k, s) for k, n in enumerate(lengths) for s in range(max(0, n - seq_len - 1))}
    assert seen == expected


def test_train_batches_are_a_pure_function_of_seed_and_step(tmp_path: Path) -> None:
    data = _tiny_train_dir(tmp_path, [5000, 3000])
    a = TrainBatches(data, batch_size=4, seq_len=32, seed=1)
    b = TrainBatches(data, batch_size=4, seq_len=32, seed=1)
    for step in (0, 5, 5, 1000):  # any order, any repetition, any fresh loader
        assert np.array_equal(a.batch(step)[0], b.batch(step)[0])
    assert np.array_equal(a.batch(7)[1], TrainBatches(data, 4, 32, seed=1).batch(7)[1])


def test_different_seeds_draw_independent_batch_streams(tmp_path: Path) -> None:
    """Seeds s and s + 1 share no batch at any step offset, and their windows overlap only by chance.

    A seed + step rule would make seed s + 1 at step t replay seed s at step t + 1: seed-to-seed
    variance would then be understated and differences between seeds overstated.
    """
    data = _tiny_train_dir(tmp_path, [20_000])
    steps, batch = 40, 8
    starts = {
        seed: [TrainBatches(data, batch, 16, seed=seed).batch(t)[0][:, 0] for t in range(steps)] for seed in (3, 4, 5)
    }
    for s, other in ((3, 4), (4, 5), (3, 5)):
        for t in range(steps):
            for u in range(steps):
                if (s, t) != (other, u):
                    assert not np.array_equal(starts[s][t], starts[other][u]), (s, t, other, u)
    # 320 draws each from ~20k windows: expected shared windows ~5; a shifted stream would share ~all
    shared = set(np.concatenate(starts[3]).tolist()) & set(np.concatenate(starts[4]).tolist())
    assert len(shared) < 30


def test_train_shards_shorter_than_a_window_are_one_clear_error(tmp_path: Path) -> None:
    data = _tiny_train_dir(tmp_path, [9, 4])
    with pytest.raises(DataError) as info:
        TrainBatches(data, batch_size=2, seq_len=9, seed=0)
    assert str(info.value) == f"data dir {str(data)!r}: train shards are shorter than seq_len+1=10"
    assert TrainBatches(data, batch_size=2, seq_len=7, seed=0).batch(0)[0].tolist() == [list(range(7))] * 2


def test_val_windows_score_every_target_once(corpus_data: Path) -> None:
    tokens = val_tokens(corpus_data, max_tokens=1000)
    assert len(tokens) == 1000
    targets = np.concatenate([y.ravel() for _, y in val_windows(tokens, seq_len=64, batch_size=3)])
    n = (len(tokens) - 1) // 64 * 64
    assert np.array_equal(targets, tokens[1 : n + 1])


def test_missing_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        list_shards(tmp_path / "nope", "train")
    hint = "(run `loopgolf data prepare` first)"
    assert str(info.value) == f"data dir {str(tmp_path / 'nope')!r}: not a directory {hint}"
    with pytest.raises(DataError) as info:
        list_shards(tmp_path, "val")
    assert str(info.value) == f"data dir {str(tmp_path)!r}: no fineweb_val_NNNNNN.bin shards"


def _val_dir(tmp_path: Path, lengths: list[int]) -> tuple[Path, np.ndarray]:
    parts = [np.arange(n) + 1000 * k for k, n in enumerate(lengths)]
    for k, part in enumerate(parts):
        write_shard(tmp_path / shard_name("val", k), part)
    return tmp_path, np.concatenate(parts)


@pytest.mark.parametrize("max_tokens", [0, 1, 99, 100, 101, 150, 250, 300, 10_000])
def test_val_tokens_takes_the_first_max_tokens_across_shards(tmp_path: Path, max_tokens: int) -> None:
    data, everything = _val_dir(tmp_path, [100, 100, 100])
    tokens = val_tokens(data, max_tokens=max_tokens)
    expected = everything if max_tokens == 0 else everything[:max_tokens]
    assert tokens.dtype == np.int64 and tokens.tolist() == expected.tolist()


@pytest.mark.parametrize(
    ("n_tokens", "batch_size", "sizes"),
    [(65, 3, [3, 3, 2]), (64, 3, [3, 3, 1]), (9, 5, [1]), (16, 1, [1]), (17, 1, [1, 1])],
)
def test_val_windows_group_windows_into_batches(n_tokens: int, batch_size: int, sizes: list[int]) -> None:
    tokens = np.arange(n_tokens)
    batches = list(val_windows(tokens, seq_len=8, batch_size=batch_size))
    assert [len(x) for x, _ in batches] == sizes
    x, y = batches[0]
    assert x[0].tolist() == list(range(8)) and y[0].tolist() == list(range(1, 9))


def test_val_windows_need_one_whole_window() -> None:
    with pytest.raises(DataError, match=r"^val split has 8 tokens, fewer than seq_len\+1=9$"):
        list(val_windows(np.arange(8), seq_len=8, batch_size=1))


@pytest.mark.parametrize("bad", [65_536, -1])
def test_write_shard_rejects_the_first_id_outside_uint16(tmp_path: Path, bad: int) -> None:
    expected = rf"token ids must be in \[0, 65535\], got \[{min(bad, 0)}, {max(bad, 3)}\]"
    with pytest.raises(ShardError, match=expected):
        write_shard(tmp_path / "x.bin", np.array([0, 3, bad]))
    with pytest.raises(ShardError, match=r"tokens must be 1-D, got shape \(1, 2\)"):
        write_shard(tmp_path / "x.bin", np.array([[1, 2]]))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("n", [0, 1, 2])
def test_short_shards_roundtrip_read_only_as_uint16(tmp_path: Path, n: int) -> None:
    path = tmp_path / shard_name("val", 0)
    write_shard(path, np.arange(7, 7 + n))
    assert path.stat().st_size == HEADER_BYTES + 2 * n
    tokens = read_shard(path)
    assert tokens.tolist() == list(range(7, 7 + n)) and tokens.dtype == np.uint16
    assert n == 0 or not tokens.flags.writeable  # a loader cannot write into the data


def test_a_missing_tokenizer_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_tokenizer(tmp_path / "none.model")
    assert str(info.value) == f"tokenizer {str(tmp_path / 'none.model')!r}: no such file"


def test_a_missing_shard_is_named(tmp_path: Path) -> None:
    with pytest.raises(ShardError) as info:
        read_shard(tmp_path / "fineweb_val_000000.bin")
    assert str(info.value) == f"{tmp_path / 'fineweb_val_000000.bin'}: no such shard file"


def test_val_tokens_reads_the_whole_split_by_default_and_no_shard_past_max_tokens(tmp_path: Path) -> None:
    data, everything = _val_dir(tmp_path, [100, 100])
    assert val_tokens(data).tolist() == everything.tolist()
    (data / shard_name("val", 1)).write_bytes(b"broken")  # never opened: the first shard has enough
    assert val_tokens(data, max_tokens=100).tolist() == everything[:100].tolist()
    with pytest.raises(ShardError, match="truncated"):
        val_tokens(data, max_tokens=101)


def test_list_shards_keeps_its_split_in_index_order(tmp_path: Path) -> None:
    for name in ("fineweb_val_000002.bin", "fineweb_val_000000.bin", "fineweb_train_000001.bin",
                 "fineweb_val_1.bin", "fineweb_val_000003.bin.tmp", "other.bin"):  # fmt: skip
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_shards(tmp_path, "val")] == ["fineweb_val_000000.bin", "fineweb_val_000002.bin"]
    assert [p.name for p in list_shards(tmp_path, "train")] == ["fineweb_train_000001.bin"]


def test_shard_names() -> None:
    assert shard_name("train", 3) == "fineweb_train_000003.bin"
    assert shard_name("val", 123456) == "fineweb_val_123456.bin"
    with pytest.raises(ValueError, match="split='test': expected 'train' or 'val'"):
        shard_name("test", 0)


def test_a_stream_of_one_token_has_no_bytes() -> None:
    table = ByteTable(np.array([1, 2, 3]), np.array([False, True, True]), np.array([True, False, False]))
    assert stream_bytes(np.array([2]), table) == 0 and stream_bytes(np.array([], dtype=np.int64), table) == 0
    assert stream_bytes(np.array([0, 2]), table) == 3  # after a boundary: no space byte
    assert stream_bytes(np.array([0, 2, 1, 2]), table) == 3 + (2 + 1) + (3 + 1)
    assert table.vocab_size == 3


def test_split_documents_on_blank_lines() -> None:
    text = "  first doc\nline two \n\n\n second\n \t \nthird\n\n   \n"
    assert split_documents(text) == ["first doc\nline two", "second", "third"]


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
        (["--vocab-size", "320"], "--vocab-size 320: the text has "),  # fewer pieces than characters
        ([], "exactly one of --tokenizer MODEL or --vocab-size N"),
        (["--tokenizer", "/no/such.model", "--no-byte-fallback"], "--no-byte-fallback applies to a trained tokenizer"),
        (["--vocab-size", "512", "--val-fraction", "1.5"], "val_fraction=1.5"),
    ],
)
def test_prepare_cli_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "loopgolf.cli", "data", "prepare", *args, "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    *progress, error = proc.stderr.strip().splitlines()
    assert message in error and all(line.startswith("preparing ") for line in progress)  # no traceback
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_prepare_cli_writes_shards_and_summary(corpus_data: Path, tmp_path: Path) -> None:
    out, text = tmp_path / "out", tmp_path / "corpus.txt"
    text.write_text("\n\n".join(t for _, t in default_corpus()), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "loopgolf.cli", "data", "prepare", "--text", str(text),
         "--tokenizer", str(corpus_data / "tokenizer.model"), "--out", str(out)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "train:" in proc.stdout and "val  :" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    shards = manifest["splits"]["train"]["shards"] + manifest["splits"]["val"]["shards"]
    assert {p.name for p in out.iterdir()} == {"manifest.json", "tokenizer.model", *shards}
