"""Data checked before compute is spent: manifest shape, shards, tokenizer, token ids."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loopgolf.errors import LoopgolfError
from loopgolf.orchestrator.spec_file import load_spec
from loopgolf.trial.config import preset
from loopgolf.trial.data import DataError, TrainBatches, read_shard, write_shard
from loopgolf.trial.prepare import check_data, read_manifest
from loopgolf.trial.train import run_trial
from tests.orchestrator.sweeps import cli, write_spec


@pytest.fixture
def data(corpus_data: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(corpus_data, copy)
    return copy


def _edit_manifest(data: Path, change: Any) -> None:
    manifest = json.loads((data / "manifest.json").read_text())
    change(manifest)
    (data / "manifest.json").write_text(json.dumps(manifest))


def _plant_id(data: Path, split: str, token: int) -> Path:
    """Put one out-of-vocab id into the middle of the split's first shard."""
    path = data / read_manifest(data)["splits"][split]["shards"][0]
    tokens = np.array(read_shard(path), dtype=np.int64)
    tokens[len(tokens) // 2] = token
    write_shard(path, tokens)
    return path


def test_prepare_records_each_shards_largest_token_id(corpus_data: Path) -> None:
    manifest = read_manifest(corpus_data)
    for split in ("train", "val"):
        entry = manifest["splits"][split]
        actual = [int(np.max(read_shard(corpus_data / name))) for name in entry["shards"]]
        assert entry["max_token_ids"] == actual and max(actual) < manifest["tokenizer"]["vocab_size"]
    assert check_data(corpus_data, 1024)["tokenizer"]["vocab_size"] == 1024


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded-at-prepare", "older-manifest"])
def test_a_token_id_beyond_the_tokenizer_is_refused_before_training(data: Path, recorded: bool) -> None:
    # vocab_size 2048 > the tokenizer's 1024: the id would have been scored as 0 bytes, silently.
    shard = _plant_id(data, "val", 1500)
    _edit_manifest(data, lambda m: m["splits"]["val"].update(max_token_ids=[1500] if recorded else None))
    with pytest.raises(DataError, match=f"{shard}: token id 1500 >= the tokenizer's 1024 pieces"):
        check_data(data, 2048)
    config = preset("tiny").replace(vocab_size=2048, train_seconds=600.0)  # would train 10 minutes
    with pytest.raises(DataError, match="token id 1500"):
        run_trial(config, data, data.parent / "trial")
    assert not (data.parent / "trial" / "metrics.json").exists()


def test_a_manifest_that_hides_a_bad_id_is_caught_when_the_tokens_load(data: Path) -> None:
    _plant_id(data, "val", 1024)  # the manifest still says the old maximum
    check_data(data, 1024)
    with pytest.raises(DataError, match="val token id 1024 >= the tokenizer's 1024"):
        run_trial(preset("tiny").replace(train_seconds=600.0), data, data.parent / "trial")
    _plant_id(data, "train", 1024)
    batches = TrainBatches(data, batch_size=64, seq_len=1024, seed=0, vocab_size=1024)
    with pytest.raises(DataError, match="train shards: token id 1024 >= vocab 1024"):
        for step in range(200):  # the planted id is drawn within a few batches of 64 x 1025 tokens
            batches.batch(step)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "manifest.json").write_text("[1, 2]"), "manifest.json: expected {tokenizer"),
        (lambda d: (d / "manifest.json").write_text("{not json"), "manifest.json: not valid JSON"),
        (lambda d: _edit_manifest(d, lambda m: m["splits"]["val"].update(shards=[])),
         "manifest.json: splits.val.shards: expected a non-empty list"),
        (lambda d: _edit_manifest(d, lambda m: m["tokenizer"].update(vocab_size=4096)),
         "tokenizer.model: the tokenizer has 1024 pieces but manifest.json says vocab_size=4096"),
        (lambda d: (d / "tokenizer.model").write_bytes(b"\x00garbage" * 100), "tokenizer.model"),
        (lambda d: (d / read_manifest(d)["splits"]["train"]["shards"][0]).unlink(), "no such shard"),
    ],
    ids=["manifest-shape", "manifest-json", "no-val-shard", "vocab-disagrees", "garbage-tokenizer", "missing-shard"],
)  # fmt: skip
def test_bad_data_is_one_line_naming_the_file_at_spec_validation(
    data: Path, tmp_path: Path, damage: Any, message: str
) -> None:
    damage(data)
    with pytest.raises(LoopgolfError, match=re.escape(message)):
        check_data(data, 1024)
    spec = write_spec(tmp_path / "spec.yaml", data, tmp_path / "sweeps")
    with pytest.raises(LoopgolfError, match=r"manifest|tokenizer|shard"):
        load_spec(spec)
    proc = cli("sweep", str(spec))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert not (tmp_path / "sweeps").exists()


def test_a_tokenizer_larger_than_vocab_size_is_refused(data: Path) -> None:
    with pytest.raises(DataError, match="uses a 1024-piece tokenizer but vocab_size=512"):
        check_data(data, 512)
