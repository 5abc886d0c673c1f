"""What the benchmarks share: the dense-matmul reference a model's FLOP/s is compared with."""

from __future__ import annotations

import torch

from loopgolf.trial.config import ModelConfig


def training_matmul_shapes(config: ModelConfig, looping: bool = True) -> list[tuple[int, int]]:
    """(K, N) of every linear a training step runs per token row: blocks, unrolled, and the head."""
    d, kv_dim = config.d_model, config.n_kv_heads * config.head_dim
    per_block = [(d, d), (d, kv_dim), (d, kv_dim), (d, d), (d, config.mlp_hidden), (config.mlp_hidden, d)]
    blocks = config.n_prelude + config.n_blocks * (config.n_passes if looping else 1) + config.n_coda
    return per_block * blocks + [(d, config.vocab_size)]


def dense_matmuls(shapes: list[tuple[int, int]], tokens: int) -> tuple[object, float]:
    """A callable running the step's matmuls (forward and both backward products), and its FLOPs."""
    mats = [(torch.randn(tokens, k), torch.randn(k, n), torch.randn(tokens, n)) for k, n in shapes]

    def run() -> None:
        for a, b, g in mats:
            torch.matmul(a, b)  # forward
            torch.matmul(g, b.T)  # grad wrt input
            torch.matmul(a.T, g)  # grad wrt weight

    return run, float(sum(6 * tokens * k * n for k, n in shapes))
