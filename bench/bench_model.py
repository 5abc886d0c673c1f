"""Two cost figures of RecurrentLM on this machine (not a test; prints, asserts nothing).

1. Refinement cost: one refinement pass over a fraction f of the tokens (the causal cap,
   building the selection, gathering its rows, the core blocks on them with KV reuse)
   divided by one full core pass over all tokens, on the same base state, T=1024. The
   design promises cost that grows with f, not with T; goal at f=0.25: <= 0.325.
2. Training throughput: analytic model FLOP/s of a training step (3 x forward FLOPs x
   tokens / step time; forward, backward and optimizer) divided by the FLOP/s torch.matmul
   reaches on the model's own matmul shapes in the same run. Goal: >= 0.5 for d >= 256.

    python bench/bench_model.py [--threads N] [--reps N]

On a shared machine, run with --threads 1: with other jobs on the cores, torch's
multi-threaded CPU kernels slow down far more than one thread does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from common import dense_matmuls, training_matmul_shapes  # bench/common.py (the script's own directory)

from loopgolf.trial.config import ModelConfig
from loopgolf.trial.model import RecordKV, RecurrentLM, Selection, flops_per_token
from loopgolf.trial.routing import causal_cap


def randomize(model: RecurrentLM, seed: int = 0) -> None:
    """Non-zero output projections, so every block does real work."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)


def interleaved_medians(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function, timed in alternation so a busy machine hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_refinement(d: int, seq_len: int, batch: int, reps: int) -> None:
    config = ModelConfig(
        d_model=d, n_heads=d // 64, n_kv_heads=max(1, d // 128), n_blocks=3, n_passes=2,
        seq_len=seq_len, refine_passes=1, signal="uniform",
    )
    model = RecurrentLM(config).eval()
    randomize(model)
    idx = torch.randint(0, config.vocab_size, (batch, seq_len))
    print(f"refinement cost  d={d} T={seq_len} batch={batch} blocks={config.n_blocks} "
          f"heads={config.n_heads}/{config.n_kv_heads}  (median of {reps})")
    with torch.inference_mode():
        x0 = torch.nn.functional.rms_norm(model.tok_emb(idx), (d,))
        cos, sin = model._rope(seq_len, x0)
        base = model._base_pass(x0, cos, sin, record_kv=True)
        recorders = [RecordKV() for _ in model.core]

        def full_pass() -> torch.Tensor:
            x = base.h_prev
            for block, rec in zip(model.core, recorders, strict=True):
                x = block(x, x0, cos, sin, rec)
            return x

        def refine_pass(fraction: float) -> torch.Tensor:
            sel = Selection.from_mask(causal_cap(torch.ones(batch, seq_len, dtype=torch.bool), fraction))
            return model._refine(base, x0, cos, sin, sel)

        fractions = (0.1, 0.25, 0.5, 1.0)
        fns: dict[str, Callable[[], object]] = {"full": full_pass}
        fns.update({str(f): (lambda f=f: refine_pass(f)) for f in fractions})
        t = interleaved_medians(fns, reps)
    t_full = t["full"]
    print(f"  full core pass  {t_full * 1e3:8.2f} ms")
    for f in fractions:
        ratio = t[str(f)] / t_full
        goal = "  (goal <= 0.325)" if f == 0.25 else ""
        print(f"  refine f={f:<4}  {t[str(f)] * 1e3:8.2f} ms   ratio {ratio:.3f}   ratio/f {ratio / f:.2f}{goal}")


def bench_training(d: int, seq_len: int, batch: int, reps: int) -> None:
    config = ModelConfig(
        d_model=d, n_heads=d // 64, n_kv_heads=max(1, d // 128), n_blocks=3, n_passes=2, seq_len=seq_len
    )
    model = RecurrentLM(config).train()
    randomize(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, config.vocab_size, (batch, seq_len))
    tgt = torch.randint(0, config.vocab_size, (batch, seq_len))

    def step() -> None:
        out = model(idx, tgt)
        opt.zero_grad(set_to_none=True)
        assert out.loss is not None
        out.loss.backward()
        opt.step()

    # The same matmuls the step runs (M = tokens, K -> N per linear), forward and both backward products.
    tokens = batch * seq_len
    matmuls, matmul_flops = dense_matmuls(training_matmul_shapes(config), tokens)

    t = interleaved_medians({"step": step, "matmul": matmuls}, reps)
    model_flops = 3 * flops_per_token(config) * tokens / t["step"]
    dense = matmul_flops / t["matmul"]
    print(f"training step    d={d} T={seq_len} batch={batch} blocks={config.n_blocks}x{config.n_passes}  "
          f"{t['step'] * 1e3:.1f} ms/step, {tokens / t['step']:,.0f} tok/s")
    print(f"  model {model_flops / 1e9:6.2f} GFLOP/s   dense matmul {dense / 1e9:6.2f} GFLOP/s   "
          f"ratio {model_flops / dense:.3f}  (goal >= 0.5)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, load {load:.1f}")
    if load > 0.5:  # other jobs on the cores: multi-threaded CPU timings degrade badly, --threads 1 much less
        print("  note: the machine is busy; figures are pessimistic")
    bench_refinement(d=256, seq_len=1024, batch=4, reps=args.reps)
    for d in (256, 512):
        bench_training(d=d, seq_len=256, batch=16, reps=args.reps)


if __name__ == "__main__":
    main()
