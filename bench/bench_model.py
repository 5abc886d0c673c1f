"""Cost figures of RecurrentLM on this machine (not a test; prints, asserts nothing).

1. Refinement vs depth, T=1024, B=8, d=256, as ratios in one run: the extra time of a
   model that refines a fraction f of the tokens once (`stride` at f: exactly f of every
   prefix) over the same model without refinement, divided by the extra time of one more
   dense core pass (n_passes + 1). The ideal ratio is f. For the eval forward and for a
   training step (forward + backward). Goals at f = 0.25: <= 1.3 x 0.25 (eval) and
   <= 1.5 x 0.25 (training).
2. Routing overhead per forward (entropy score, threshold and causal cap, building the
   selection, gathering rows and scattering logits) as a fraction of one core pass.
3. Training throughput: analytic model FLOP/s of a training step (3 x forward FLOPs x
   tokens / step time; forward, backward and optimizer) divided by the FLOP/s torch.matmul
   reaches on the model's own matmul shapes in the same run. Goal: >= 0.5 for d >= 256.

    python bench/bench_model.py [--threads N] [--reps N] [--no-throughput]

Runs with one thread by default and then times with the thread's CPU clock, so the
figures hold on a machine shared with other jobs (wall-clock medians there are noise).
On glibc the allocator is told to keep freed memory (`mallopt`): otherwise every forward
maps its large tensors afresh and the kernel's page zeroing, charged to this thread,
swung one forward's time by up to 15% between repetitions on a shared machine.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import statistics
import time
from collections.abc import Callable

import torch
from common import dense_matmuls, training_matmul_shapes  # bench/common.py (the script's own directory)

from loopgolf.trial.config import ModelConfig
from loopgolf.trial.flops import flops_per_token
from loopgolf.trial.model import RecurrentLM
from loopgolf.trial.selection import RecordKV, Selection

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to reuse freed memory instead of returning it to the kernel."""
    name = ctypes.util.find_library("c")
    if name is None or "libc.so" not in name:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30))


def randomize(model: RecurrentLM, seed: int = 0) -> None:
    """Non-zero output projections, so every block does real work."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)


CLOCK = time.perf_counter  # main() switches to the thread's CPU clock when torch runs on one thread


def interleaved_medians(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function, timed in alternation so a busy machine hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = CLOCK()
            fn()
            times[name].append(CLOCK() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _shape(d: int, seq_len: int, **changes: object) -> ModelConfig:
    base: dict[str, object] = dict(
        d_model=d, n_heads=d // 64, n_kv_heads=max(1, d // 128), n_blocks=3, n_passes=2, seq_len=seq_len
    )
    return ModelConfig(**{**base, **changes})  # type: ignore[arg-type]


def _models(d: int, seq_len: int, fractions: tuple[float, ...]) -> dict[str, RecurrentLM]:
    """Dense at n_passes and n_passes + 1, and refined at each f: the same weights throughout."""
    dense = RecurrentLM(_shape(d, seq_len))
    randomize(dense)
    state = dense.state_dict()
    models = {"dense": dense}
    extra = RecurrentLM(_shape(d, seq_len, n_passes=3))
    extra.load_state_dict(state)
    models["dense+1"] = extra
    for f in fractions:
        refined = RecurrentLM(_shape(d, seq_len, refine_passes=1, signal="stride", refine_target=f, refine_cap=f))
        refined.load_state_dict(state, strict=False)  # phase "none": the same tensors, plus the threshold
        models[str(f)] = refined
    return models


def bench_refinement(d: int, seq_len: int, batch: int, reps: int) -> None:
    fractions = (0.1, 0.25, 0.5, 1.0)
    models = _models(d, seq_len, fractions)
    idx = torch.randint(0, 1024, (batch, seq_len))
    tgt = torch.randint(0, 1024, (batch, seq_len))
    print(f"refinement vs one more core pass  d={d} T={seq_len} B={batch} blocks=3x2 heads={d // 64}/{max(1, d // 128)}"
          f"  (median of {reps})")

    def forward(model: RecurrentLM) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                return model.eval()(idx)

        return run

    def train_step(model: RecurrentLM) -> Callable[[], object]:
        def run() -> object:
            out = model.train()(idx, tgt)
            assert out.loss is not None
            out.loss.backward()
            model.zero_grad(set_to_none=True)
            return None

        return run

    for label, make, goal in (("eval forward", forward, 1.3), ("training step", train_step, 1.5)):
        t = interleaved_medians({name: make(m) for name, m in models.items()}, reps)
        pass_cost = t["dense+1"] - t["dense"]
        print(f"  {label}: base {t['dense'] * 1e3:.1f} ms, one more core pass +{pass_cost * 1e3:.1f} ms")
        for f in fractions:
            ratio = (t[str(f)] - t["dense"]) / pass_cost
            note = f"  (goal <= {goal * f:.3f})" if f == 0.25 else ""
            print(f"    refine f={f:<4}  +{(t[str(f)] - t['dense']) * 1e3:7.1f} ms   ratio {ratio:.3f}   "
                  f"ratio/f {ratio / f:.2f}{note}")


def bench_routing_overhead(d: int, seq_len: int, batch: int, reps: int, fraction: float = 0.25) -> None:
    """Score, threshold + cap, selection, gather and scatter, against one core pass."""
    config = _shape(d, seq_len, refine_passes=1, signal="entropy", refine_target=fraction, refine_cap=0.5)
    model = RecurrentLM(config).eval()
    randomize(model)
    idx = torch.randint(0, config.vocab_size, (batch, seq_len))
    with torch.inference_mode():
        x0 = torch.nn.functional.rms_norm(model.tok_emb(idx), (d,))
        cos, sin = model._rope(seq_len, x0)
        base = model._base_pass(x0, cos, sin, record_kv=True)
        score = model._router_score(base)
        model.router_threshold.fill_(torch.quantile(score.flatten().float(), 1 - fraction).item())
        recorders = [RecordKV() for _ in model.core]

        def core_pass() -> object:
            x = base.h_prev
            for block, rec in zip(model.core, recorders, strict=True):
                x = block(x, x0, cos, sin, rec)
            return x

        sel = Selection.from_mask(model.select(score))
        refined_logits = model._logits(sel.gather(base.h_last))  # the refinement's own work, not timed
        final_logits = base.logits.clone()  # the forward writes the refined logits into the base ones

        def gather_scatter() -> object:
            return sel.gather(base.h_last), sel.scatter_(final_logits, refined_logits)

        parts = {
            "score": lambda: model._router_score(base),
            "threshold + cap + selection": lambda: Selection.from_mask(model.select(score)),
            "gather + scatter": gather_scatter,
        }
        t = interleaved_medians({"core": core_pass, **parts}, reps)
    total = sum(t[name] for name in parts)
    print(f"routing overhead  entropy at f={fraction} (refined {sel.n / idx.numel():.3f}): "
          f"{total * 1e3:.2f} ms per forward = {total / t['core']:.3f} of a core pass ({t['core'] * 1e3:.1f} ms)")
    for name in parts:
        print(f"    {name:<28} {t[name] * 1e3:7.2f} ms   {t[name] / t['core']:.3f}")


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
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--no-throughput", action="store_true", help="only the refinement and routing figures")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    if torch.get_num_threads() == 1:  # every op runs on this thread: its CPU time ignores other jobs' load
        CLOCK = time.thread_time
    print(f"clock: {CLOCK.__name__}; allocator keeps freed memory: {keep_freed_memory()}")
    torch.manual_seed(0)
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, load {load:.1f}")
    if load > 0.5:  # other jobs on the cores: multi-threaded CPU timings degrade badly, --threads 1 much less
        print("  note: the machine is busy; figures are pessimistic")
    bench_refinement(d=256, seq_len=1024, batch=8, reps=args.reps)
    bench_routing_overhead(d=256, seq_len=1024, batch=8, reps=args.reps)
    if not args.no_throughput:
        for d in (256, 512):
            bench_training(d=d, seq_len=256, batch=16, reps=args.reps)


if __name__ == "__main__":
    main()
