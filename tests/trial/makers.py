"""Small models and configurations the trial tests share."""

from __future__ import annotations

import math
from typing import Any

import torch

from loopgolf.trial.config import ModelConfig, TrialConfig, preset
from loopgolf.trial.model import RecurrentLM


def tiny(**values: Any) -> TrialConfig:
    """The `tiny` preset at a CPU test's batch, evaluation and codec."""
    base = {"batch_size": 8, "eval_tokens": 8192, "quick_eval_tokens": 2048, "bits": 8, "codec": "zlib"}
    return preset("tiny").replace(**(base | values))


def small(**overrides: object) -> ModelConfig:
    """A model a float64 forward answers in milliseconds."""
    base: dict[str, object] = dict(
        vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, n_blocks=2, n_passes=2, seq_len=48
    )
    return ModelConfig(**{**base, **overrides})  # type: ignore[arg-type]


def build(config: ModelConfig, seed: int = 0) -> RecurrentLM:
    """A float64 model with every parameter perturbed, so each part changes the output."""
    torch.manual_seed(seed)
    model = RecurrentLM(config).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if name == "tok_emb.weight" else (0.5 / math.sqrt(p.shape[-1]) if p.ndim >= 2 else 0.2)
            p.add_(torch.randn_like(p) * scale)
    return model


def tokens(config: ModelConfig, batch: int = 3, seed: int = 1) -> torch.Tensor:
    """Random token ids at the config's sequence length."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, config.seq_len), generator=gen)
