"""A real trial's throughput and where its wall time goes.

Run: .venv/bin/python bench/bench_trial.py [--seconds 20] [--threads 1]

For `tiny` and a d=256 shape, a real `run_trial` on tinyshakespeare (challenge sp1024
tokenizer) reports tokens/s; model FLOP/s (3 x analytic forward FLOPs per token x
tokens/s) is divided by dense-matmul FLOP/s at the model's own shapes, measured in the
same run; and the trial's wall time is split into start-up, training, evaluation
(in-memory and from the artifact) and compression.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import (  # bench/common.py (the script's own directory)
    dense_matmuls,
    prepare_shakespeare,
    training_matmul_shapes,
)

from loopgolf.trial.config import preset
from loopgolf.trial.flops import flops_per_token
from loopgolf.trial.train import run_trial


def dense_flops_per_second(config, tokens: int, reps: int = 5) -> float:  # type: ignore[no-untyped-def]
    run, flops = dense_matmuls(training_matmul_shapes(config), tokens)
    run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return flops / sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = {
        "tiny": preset("tiny").replace(batch_size=16),
        "d256": preset("d256").replace(batch_size=8),
    }
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare_shakespeare(data)
        for name, config in shapes.items():
            config = config.replace(train_seconds=args.seconds, eval_tokens=32_768, bits=6, codec="lzma")
            m = run_trial(config, data, Path(tmp) / name)
            tokens_per_second = m["train_tokens"] / m["train_seconds"]
            model_flops = 3 * flops_per_token(config.model) * tokens_per_second
            dense = dense_flops_per_second(config.model, config.train.batch_size * config.model.seq_len)
            wall = m["wall_seconds"]
            evaluation = wall - m["startup_seconds"] - m["train_seconds"] - m["compress_seconds"]
            print(f"{name}: d={config.model.d_model} {config.model.n_blocks}x{config.model.n_passes} blocks, "
                  f"{m['params']:,} params, {m['train_steps']} steps")
            print(f"  {tokens_per_second:,.0f} tokens/s   model {model_flops / 1e9:.2f} GFLOP/s   "
                  f"dense matmul {dense / 1e9:.2f} GFLOP/s   ratio {model_flops / dense:.3f}")
            print(f"  wall {wall:.1f} s: start-up {m['startup_seconds'] / wall:.1%}, training "
                  f"{m['train_seconds'] / wall:.1%}, evaluation {evaluation / wall:.1%}, compression "
                  f"{m['compress_seconds'] / wall:.1%}   val_bpb {m['val_bpb']:.4f}")


if __name__ == "__main__":
    main()
