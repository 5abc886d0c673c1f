"""What the benchmarks share: the data they run on, the dense-matmul reference a model's
FLOP/s is compared with, and the tiny sweep spec.

The challenge's tokenizers and text are read from the folder LOOPGOLF_CHALLENGE_DATA names
(holding `tokenizers/` and `corpora/`); benchmarks that only need some real text fall back
to the built-in corpus without it, and say so.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from loopgolf.trial.config import ModelConfig

CHALLENGE_ENV = "LOOPGOLF_CHALLENGE_DATA"


def challenge_data(required: bool = True) -> Path | None:
    """The challenge's data folder; without it, exit with one line (or None when not required)."""
    value = os.environ.get(CHALLENGE_ENV, "")
    root = Path(value).expanduser().resolve() if value else None
    if root is not None and all((root / name).is_dir() for name in ("tokenizers", "corpora")):
        return root
    if required:
        sys.exit(f"bench: {CHALLENGE_ENV}={value!r}: expected a folder holding tokenizers/ and corpora/")
    return None


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


def prepare_shakespeare(out: Path) -> Path:
    """tinyshakespeare as challenge shards with the challenge's 1024-piece tokenizer; without the
    challenge's data, the built-in corpus with a trained 1024-piece BPE."""
    from loopgolf.trial.prepare import PrepareConfig, prepare

    root = challenge_data(required=False)
    if root is None:
        print(f"data: the built-in corpus with a trained 1024-piece BPE ({CHALLENGE_ENV} not set)", file=sys.stderr)
        prepare(PrepareConfig(out, vocab_size=1024))
    else:
        prepare(PrepareConfig(out, (root / "corpora" / "tinyshakespeare.txt",),
                              root / "tokenizers" / "fineweb_1024_bpe.model"))  # fmt: skip
    return out


def tiny_sweep_spec(name: str, data: Path, storage: Path, seconds: float, trials: int, concurrency: int) -> dict:
    """The benchmarks' sweep: `trials` tiny trials of `seconds`, one CPU each."""
    return {
        "name": name, "data": str(data), "storage": str(storage), "space": "shared_vs_unique",
        "overrides": {"n_blocks": [1, 2], "n_passes": [1, 2], "n_prelude": 0, "n_coda": 0, "d_model": 64},
        "base": {"preset": "tiny", "batch_size": 16, "eval_tokens": 8192, "quick_eval_tokens": 2048,
                 "report_every_seconds": max(2.0, seconds / 6), "checkpoint_every_seconds": max(4.0, seconds / 3)},
        "budget": {"artifact_bytes": 16_000_000, "train_seconds": seconds},
        "search": {"algorithm": "random", "objectives": {"val_bpb": "min"}, "num_samples": trials, "seed": 0},
        "max_concurrent": concurrency, "resources": {"cpu": 1},
    }  # fmt: skip
