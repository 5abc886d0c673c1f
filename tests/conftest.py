"""Shared fixtures: the real tokenizers and text in ../shared, and prepared shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# One intra-op thread: on a 2-core machine, two torch threads racing any other process
# make steps ~10x slower, and wall-clock-budgeted trials would then measure the noise.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TOKENIZERS = SHARED / "data" / "tokenizers"
CORPORA = SHARED / "data" / "corpora"
SHAKESPEARE = CORPORA / "tinyshakespeare.txt"


def tokenizer_path(vocab: int) -> Path:
    path = TOKENIZERS / f"fineweb_{vocab}_bpe.model"
    if not path.is_file():
        pytest.fail(f"missing {path}: tests read the real tokenizers from ../shared beside the repo")
    return path


@pytest.fixture(scope="session")
def shakespeare_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tinyshakespeare prepared with the challenge's 1024-piece tokenizer (shared by tests)."""
    from loopgolf.trial.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("data") / "shakespeare_sp1024"
    prepare(PrepareConfig(out_dir=out, text_files=(SHAKESPEARE,), tokenizer=tokenizer_path(1024)))
    return out
