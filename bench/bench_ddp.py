"""Data-parallel step cost: Muon whole on every rank (before) vs sharded (after) vs a reference.

    python bench/bench_ddp.py [--steps 3] [--batch 2]

World 1 and 2 (gloo, spawned processes, one thread per rank) on the `pg_baseline` shape
(9 blocks x 512, 54 block matrices). Per world size it times, per rank (the slowest rank):

- optimizer step, before: torch's Muon over every matrix on every rank (loopgolf until
  this change);
- optimizer step, after: `DataParallel.step_sharded` (each rank orthogonalizes matrix i
  when i mod world == its rank; one fp32 all-gather brings every rank the stepped matrices);
- optimizer step, reference: the challenge's algorithm, written here from its description
  (not its code): Nesterov momentum, Newton-Schulz (5 steps, coefficients 3.4445,
  -4.7750, 2.0315) in bfloat16, the update scaled by max(1, rows / cols) ** 0.5, rank r
  orthogonalizing matrix i when i mod world == r, then one all-reduce of the flat bf16
  updates that every rank applies;
- whole step: forward + backward of the model at `--batch` sequences of 1,024 tokens per
  rank, the gradient all-reduce, then the sharded optimizer step.

The goal of the issue: per-rank optimizer time at world 2 <= 0.6x world 1, and within 10%
of the reference at the same world size. One sample per figure (the mean of --steps steps
after one warm-up step): read ratios from one run, and the load average it prints.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loopgolf.trial.config import preset
from loopgolf.trial.distributed import DataParallel
from loopgolf.trial.model import RecurrentLM
from loopgolf.trial.optim import parameter_role

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16()
    x = x / (x.norm() + eps)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class ReferenceMuon:
    """The challenge's sharded Muon step, as its description reads (see the module docstring)."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float, momentum: float, rank: int, world: int) -> None:
        self.params, self.lr, self.momentum, self.rank, self.world = params, lr, momentum, rank, world
        self.buffers = [torch.zeros_like(p) for p in params]

    def step(self) -> None:
        flat = torch.zeros(sum(p.numel() for p in self.params), dtype=torch.bfloat16)
        offset = 0
        for i, (p, buf) in enumerate(zip(self.params, self.buffers, strict=True)):
            n = p.numel()
            if i % self.world == self.rank and p.grad is not None:
                buf.mul_(self.momentum).add_(p.grad)
                g = newton_schulz(p.grad.add(buf, alpha=self.momentum))
                g = g * max(1.0, g.size(0) / g.size(1)) ** 0.5
                flat[offset : offset + n] = g.reshape(-1)
            offset += n
        if self.world > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in self.params:
            n = p.numel()
            p.data.add_(flat[offset : offset + n].view_as(p).to(p.dtype), alpha=-self.lr)
            offset += n


def _timed(fn: object, steps: int, world: int) -> float:
    """Mean seconds of `fn` over `steps` after one warm-up call, the slowest rank's."""
    fn()  # type: ignore[operator]
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        fn()  # type: ignore[operator]
    mine = torch.tensor([(time.perf_counter() - start) / steps])
    if world > 1:
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    return float(mine)


def _rank(rank: int, world: int, init: str, steps: int, batch: int, out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.manual_seed(0)
    config = preset("pg_baseline")
    model = RecurrentLM(config.model)
    roles = parameter_role(model)
    matrices = [p for name, p in model.named_parameters() if roles[name] == "matrix"]
    for p in matrices:
        p.grad = torch.randn_like(p) * 1e-3
    parallel = DataParallel(rank, world) if world > 1 else None
    muon = torch.optim.Muon(matrices, lr=0.02, momentum=0.95, adjust_lr_fn="original")
    reference = ReferenceMuon(matrices, lr=0.02, momentum=0.95, rank=rank, world=world)
    grads = [p.grad.clone() for p in matrices]

    def restore() -> None:
        for p, g in zip(matrices, grads, strict=True):
            p.grad = g.clone()

    def own_share_only() -> None:  # "after" without its all-gather: the Newton-Schulz work alone
        restore()
        for i, p in enumerate(matrices):
            if i % world != rank:
                p.grad = None
        muon.step()

    def gather_only() -> None:  # "after"'s all-gather alone
        if parallel is not None:
            parallel.gather_owned([p.data for p in matrices], [i % world for i in range(len(matrices))])

    figures = {
        "after: own share only": _timed(own_share_only, steps, world),
        "after: all-gather only": _timed(gather_only, steps, world),
        "before": _timed(lambda: (restore(), muon.step()), steps, world),
        "after": _timed(lambda: (restore(), parallel.step_sharded(muon) if parallel else muon.step()), steps, world),
        "reference": _timed(lambda: (restore(), reference.step()), steps, world),
        "whole step": _timed(lambda: _whole_step(model, muon, parallel, batch, config.model.vocab_size), steps, world),
    }
    if rank == 0:
        Path(out, f"world{world}.json").write_text(json.dumps(figures), encoding="utf-8")
    if world > 1:
        dist.destroy_process_group()


def _whole_step(model: RecurrentLM, muon: torch.optim.Muon, parallel: DataParallel | None, batch: int,
                vocab: int) -> None:  # fmt: skip
    idx = torch.randint(0, vocab, (batch, 1024))
    out = model(idx, idx.roll(-1, 1))
    out.loss.backward()
    if parallel is not None:
        parallel.average_gradients([p for p in model.parameters() if p.requires_grad])
        parallel.step_sharded(muon)
    else:
        muon.step()
    model.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2, help="sequences of 1,024 tokens per rank in the whole step")
    args = parser.parse_args()
    out = tempfile.mkdtemp(prefix="bench_ddp-")
    results = {}
    for world in (1, 2):
        init = str(Path(out, f"pg{world}"))
        mp.spawn(_rank, args=(world, init, args.steps, args.batch, out), nprocs=world, join=True)
        results[world] = json.loads(Path(out, f"world{world}.json").read_text(encoding="utf-8"))
    print(f"pg_baseline, gloo, 1 thread per rank; load average {os.getloadavg()[0]:.2f}; mean of {args.steps} steps")
    print(f"{'per rank, seconds':34s} {'world 1':>9s} {'world 2':>9s} {'2 / 1':>7s}")
    for name in ("before", "after", "after: own share only", "after: all-gather only", "reference", "whole step"):
        one, two = results[1][name], results[2][name]
        label = name if name == "whole step" else f"optimizer {name}"
        print(f"{label:34s} {one:9.3f} {two:9.3f} " + (f"{two / one:7.2f}" if one > 1e-3 else "      –"))
    print(f"after / reference at world 2: {results[2]['after'] / results[2]['reference']:.2f}")


if __name__ == "__main__":
    main()
