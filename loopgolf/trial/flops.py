"""Analytic forward FLOPs per token of a RecurrentLM configuration: its matmuls, causal
attention and LM head, with refinement's extra blocks and head at a refined fraction.

model.py's ForwardStats reports a forward's cost with this count, so loading an artifact
imports this file (it is one of code_bytes.CODE_FILES). It needs only the configuration.
"""

from __future__ import annotations

from loopgolf.trial.config import ModelConfig


def block_flops_per_token(config: ModelConfig, seq_len: int | None = None) -> float:
    """Forward FLOPs of one block application on one token: its matmuls plus causal attention.

    A query at position t attends to t + 1 keys, (T + 1) / 2 on average; QK^T and AV cost
    2 * d each per key. Norms, RoPE and activations are not counted.
    """
    c = config
    t = c.seq_len if seq_len is None else seq_len
    kv_dim = c.n_kv_heads * c.head_dim
    matmuls = 2 * (2 * c.d_model * c.d_model + 2 * c.d_model * kv_dim + 2 * c.d_model * c.mlp_hidden)
    return matmuls + 4 * c.d_model * (t + 1) / 2


def forward_flops(c: ModelConfig, refined_fraction: float, passes: int, seq_len: int) -> float:
    """FLOPs per token of one forward with `passes` core passes at `seq_len` (what ForwardStats reports)."""
    block = block_flops_per_token(c, seq_len)
    head = 2 * c.d_model * c.vocab_size
    lora = 0.0
    if c.phase == "lora":  # x A^T then (.) B^T on q, v and fc
        kv_dim = c.n_kv_heads * c.head_dim
        lora = 2 * c.lora_rank * ((c.d_model + c.d_model) + (c.d_model + kv_dim) + (c.d_model + c.mlp_hidden))
    core = block + lora
    total = (c.n_prelude + c.n_coda) * block + c.n_blocks * passes * core + head
    if c.refine_passes:
        total += refined_fraction * (c.n_blocks * c.refine_passes * core + c.n_coda * block + head)
        if c.signal == "kl":  # the head on the previous pass's state, and on the last if a coda sits between
            total += head * (2 if c.n_coda else 1)
    return float(total)


def flops_per_token(config: ModelConfig, refined_fraction: float = 0.0, looping: bool = True) -> float:
    """Analytic forward FLOPs per token at config.seq_len: matmuls, causal attention, LM head.

    Refinement adds its blocks and head at `refined_fraction`; the `kl` router adds its
    extra head(s). Softmax-based router scores (entropy, margin) are not counted.
    """
    if not 0.0 <= refined_fraction <= 1.0:
        raise ValueError(f"flops_per_token: refined_fraction={refined_fraction!r}: expected a fraction in [0, 1]")
    return forward_flops(config, refined_fraction, config.n_passes if looping else 1, config.seq_len)
