"""Shared fixtures: the real tokenizers and text in ../shared, and prepared shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loopgolf.trial.config import TrialConfig, preset
from loopgolf.trial.model import RecurrentLM

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


def trained_like(config: TrialConfig, seed: int = 0) -> RecurrentLM:
    """A model whose every tensor moved off its init (zero-init projections included)."""
    torch.manual_seed(seed)
    model = RecurrentLM(config.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if config.model.refine_passes:
        model.router_threshold.fill_(1.2345678)  # a calibrated threshold travels exactly
    return model.eval()


# For the artifact and QAT tests, every tensor kind: prelude/coda, unet skips, lora phase,
# an untied head, the router buffer; a low small-tensor threshold so the block matrices
# are quantized.
RICH = preset("small").replace(
    d_model=64, n_heads=4, n_kv_heads=2, n_prelude=1, n_coda=1, unet_skips=True, phase="lora",
    tie_embeddings=False, refine_passes=1, small_tensor_numel=2048, seq_len=32,
)
