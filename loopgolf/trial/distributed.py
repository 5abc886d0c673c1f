"""Data parallelism for one trial: N ranks, one global batch, identical replicas.

    parallel = DataParallel.from_process_group()     # after torch.distributed.init_process_group
    run_trial(config, data_dir, out_dir, reporter, parallel=parallel)

The trial stays one Python function; a rank differs from the single-process run in
six places only, all here:

- Data: every rank draws the same global batch (`TrainBatches.batch(step)`, a pure
  function of seed and step) and keeps its contiguous slice of rows, so the data order
  is that of one process with the same `batch_size`. `batch_size % world_size == 0`.
- Gradients: averaged over ranks, in buckets whose all-reduces start while backward is
  still running (`GradientBuckets`, DDP's scheme on torch's public grad hooks). The loss
  is a mean over equally many tokens per rank, so the average of the ranks' gradients is
  the gradient of the global batch, and the optimizers see exactly the single-process
  gradient. A parameter no rank computed a gradient for keeps `None` (the optimizers
  skip it, as in one process); one that only some ranks touched counts zeros from the
  others.
- Muon is sharded (`step_sharded`): each rank orthogonalizes its share of the block
  matrices (matrix i on rank i mod world, as the challenge deals them) and one
  all-gather brings every rank the stepped matrices; AdamW (the small tensors) runs whole on every
  rank. Before a checkpoint the ranks complete rank 0's copy of the momentum buffers
  (`gather_optimizer_state`), so a resumed run continues exactly.
- Agreement: after every step the ranks exchange (loss, step time, float buffers) in one
  small collective. All ranks then hold the mean loss, the slowest rank's step time (so
  the clock, hence the stopping step, report and checkpoint times, and the LR schedule,
  are the same everywhere) and the mean of each float buffer (the router's training
  threshold: each rank tracks it on its slice; the mean keeps the replicas identical).
- Start: rank 0's parameters and buffers are broadcast, so the replicas start equal.
- Output: only rank 0 evaluates, writes the artifact and metrics.json.

No process group is created here: `torch.distributed.init_process_group` belongs to the
launcher (Ray Train's TorchTrainer, torchrun, a test's spawned processes). Backend:
gloo on CPU, nccl on CUDA (`backend_for`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from loopgolf.trial.config import ConfigError, TrialConfig


def backend_for(use_gpu: bool) -> str:
    return "nccl" if use_gpu else "gloo"


def grad_accum_steps(config: TrialConfig, world_size: int) -> int:
    """Micro-batches per rank per optimizer step: batch_size / (micro_batch_size x ranks).

    One clear error when the global batch does not split evenly over the ranks and their
    micro-batches.
    """
    batch, micro = config.train.batch_size, config.train.micro_batch_size
    if world_size > 1 and batch % world_size:
        raise ConfigError(
            f"TrainConfig.batch_size={batch}: expected a multiple of the {world_size} data-parallel workers "
            "(each worker trains on an equal slice of the global batch)"
        )
    if not micro:
        return 1
    if batch % (micro * world_size):
        raise ConfigError(
            f"TrainConfig.micro_batch_size={micro}: expected batch_size={batch} to be a multiple of "
            f"micro_batch_size x {world_size} data-parallel worker(s)"
        )
    return batch // (micro * world_size)


def check_divisible(config: TrialConfig, world_size: int) -> None:
    """Fail early (one line) when the batch does not split over `world_size` ranks and micro-batches."""
    grad_accum_steps(config, world_size)


@dataclasses.dataclass(frozen=True)
class StepAgreement:
    loss: float  # mean over ranks of the ranks' mean losses = the global batch's mean loss
    seconds: float  # the slowest rank's step time
    means: tuple[float, ...]  # the rank means of the `means` passed in


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel trial, over an initialized process group."""

    rank: int
    world_size: int
    device: torch.device | None = None  # None: TrainConfig.device decides
    group: dist.ProcessGroup | None = None  # None: the default group

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"DataParallel: rank={self.rank}, world_size={self.world_size}")

    @classmethod
    def from_process_group(
        cls, device: torch.device | str | None = None, group: dist.ProcessGroup | None = None
    ) -> DataParallel:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DataParallel.from_process_group: torch.distributed is not initialized")
        return cls(
            rank=dist.get_rank(group),
            world_size=dist.get_world_size(group),
            device=torch.device(device) if device is not None else None,
            group=group,
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- data

    def shard(self, batch: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """This rank's contiguous slice of the global batch's rows."""
        x, y = batch
        per = x.shape[0] // self.world_size
        rows = slice(self.rank * per, (self.rank + 1) * per)
        return x[rows], y[rows]

    # ---- collectives (every rank must call each one, in the same order)

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers to every rank."""
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(
                    tensor.data, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group
                )

    def average_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Average .grad over ranks in place (one flat all-reduce); see the module docstring."""
        if not params:
            return
        flat = pack_gradients(params)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        unpack_average(flat, params, self.world_size)

    # ---- Muon, sharded: each rank orthogonalizes its share of the matrices

    def owns(self, index: int) -> bool:
        """Whether this rank steps matrix `index` of the Muon group (round robin, as the challenge deals them)."""
        return index % self.world_size == self.rank

    def step_sharded(self, optimizer: torch.optim.Optimizer) -> None:
        """One step of `optimizer` (Muon) on this rank's share, then the new values to every rank.

        The other matrices' gradients are set aside (the optimizer skips a parameter without
        one, and keeps no momentum for it), so each rank runs Newton-Schulz on 1/world of the
        matrices. Then one all-gather brings every rank the others' stepped matrices, exactly
        (fp32), so every replica holds the owner's result bit for bit, which is the
        single-process step (Muon treats each matrix alone). An all-gather moves half the
        bytes of an all-reduce of the same tensors.
        """
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for index, p in enumerate(params):
            if not self.owns(index):
                p.grad = None
        optimizer.step()
        self.gather_owned([p.data for p in params], [i % self.world_size for i in range(len(params))])

    def gather_optimizer_state(self, optimizer: torch.optim.Optimizer, key: str = "momentum_buffer") -> None:
        """Complete every rank's copy of a sharded optimizer's per-matrix state (before a checkpoint:
        rank 0's state then resumes every rank exactly). A matrix no rank has stepped yet has none."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        present = torch.tensor([float(key in optimizer.state.get(p, {})) for p in params], device=params[0].device)
        dist.all_reduce(present, op=dist.ReduceOp.MAX, group=self.group)
        stepped = [(i, p) for i, (p, flag) in enumerate(zip(params, present.tolist(), strict=True)) if flag]
        for _, p in stepped:
            optimizer.state[p].setdefault(key, torch.zeros_like(p))
        buffers = [optimizer.state[p][key] for _, p in stepped]
        self.gather_owned(buffers, [i % self.world_size for i, _ in stepped])

    def gather_owned(self, tensors: Sequence[torch.Tensor], owners: Sequence[int]) -> None:
        """Each tensor from the rank that owns it to every rank: one all-gather of the owners'
        flat fp32 pieces (padded to the largest share)."""
        if not tensors:
            return
        device = tensors[0].device
        sizes = [sum(t.numel() for t, o in zip(tensors, owners, strict=True) if o == r) for r in range(self.world_size)]
        mine = [t.reshape(-1).float() for t, o in zip(tensors, owners, strict=True) if o == self.rank]
        local = torch.zeros(max(sizes), device=device)
        if mine:
            local[: sizes[self.rank]] = torch.cat(mine)
        pieces = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(pieces, local, group=self.group)
        offsets = [0] * self.world_size
        with torch.no_grad():
            for t, owner in zip(tensors, owners, strict=True):
                n = t.numel()
                if owner != self.rank:
                    t.copy_(pieces[owner][offsets[owner] : offsets[owner] + n].view_as(t))
                offsets[owner] += n

    def barrier(self, device: torch.device) -> None:
        """Wait for every rank (a one-element all-reduce on the training device: any backend, no warnings)."""
        dist.all_reduce(torch.zeros(1, device=device), group=self.group)

    def agree_step(
        self,
        loss: float,
        seconds: float,
        buffers: Sequence[torch.Tensor],
        device: torch.device,
        means: Sequence[float] = (),
    ) -> StepAgreement:
        """Mean loss, slowest step time and means of `means` over ranks; float buffers set to their rank mean."""
        floats = [b for b in buffers if b.is_floating_point()]
        row = torch.cat(
            [torch.tensor([loss, seconds, *means], dtype=torch.float64, device=device)]
            + [b.detach().reshape(-1).to(torch.float64) for b in floats]
        )
        table = torch.zeros(self.world_size, row.numel(), dtype=torch.float64, device=device)
        table[self.rank] = row  # each rank fills its own row: a SUM gathers the table everywhere
        dist.all_reduce(table, op=dist.ReduceOp.SUM, group=self.group)
        offset = 2 + len(means)
        with torch.no_grad():
            for b in floats:
                n = b.numel()
                b.copy_(table[:, offset : offset + n].mean(0).view_as(b).to(b.dtype))
                offset += n
        return StepAgreement(
            loss=float(table[:, 0].mean()),
            seconds=float(table[:, 1].max()),
            means=tuple(table[:, 2 : 2 + len(means)].mean(0).tolist()),
        )

    def replica_drift(self, module: torch.nn.Module) -> float:
        """Largest relative difference of a parameter fingerprint from rank 0's (0.0: identical replicas)."""
        with torch.no_grad():
            total = sum((p.detach().double().sum() for p in module.parameters()), torch.zeros((), dtype=torch.float64))
            squares = sum(
                (p.detach().double().square().sum() for p in module.parameters()), torch.zeros((), dtype=torch.float64)
            )
            device = next(module.parameters()).device
            table = torch.zeros(self.world_size, 2, dtype=torch.float64, device=device)
            table[self.rank, 0], table[self.rank, 1] = total.to(device), squares.to(device)
            dist.all_reduce(table, op=dist.ReduceOp.SUM, group=self.group)
            scale = table[0].abs().clamp_min(1e-30)
            return float(((table - table[0]).abs() / scale).max())


# ------------------------------------------------------------------ gradients, overlapped with backward


def pack_gradients(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """One flat fp32 tensor to sum over ranks: every gradient (zeros where this rank has none),
    then a has-a-gradient flag per parameter."""
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    pieces = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float32) for p in params]
    return torch.cat([*pieces, has_grad])


def unpack_average(flat: torch.Tensor, params: Sequence[torch.nn.Parameter], world_size: int) -> None:
    """The summed `pack_gradients` tensor as averaged gradients; a parameter no rank had a
    gradient for keeps `None`, as in one process."""
    counted = flat[-len(params) :].tolist()
    values = flat[: -len(params)].div_(world_size)
    offset = 0
    for p, any_grad in zip(params, counted, strict=True):
        n = p.numel()
        if any_grad > 0:
            p.grad = values[offset : offset + n].view_as(p).to(p.dtype)
        offset += n

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size


class GradientBuckets:
    """Averages gradients over ranks while backward still runs, in buckets (what DDP does).

    Parameters go into buckets of about BUCKET_BYTES in reverse order (the order backward
    produces their gradients). A post-accumulate-grad hook (`Tensor.register_post_accumulate_grad_hook`,
    torch's public mechanism) marks a parameter ready; when a bucket and every bucket
    before it are ready, its all-reduce starts asynchronously, so communication overlaps
    the rest of backward. `finish()` starts what is left, in the same order (a bucket with a
    parameter this rank did not use sends zeros for it), waits, and writes the averages:
    exactly `DataParallel.average_gradients`, bucket by bucket. Every rank starts the
    buckets in one order, so the collectives match whatever each rank's backward did.
    Only the last micro-batch's backward communicates: `arm()` before it.
    """

    def __init__(self, parallel: DataParallel, params: Sequence[torch.nn.Parameter]) -> None:
        self.parallel = parallel
        self.buckets: list[list[torch.nn.Parameter]] = []
        size = 0
        for p in reversed(list(params)):
            if not self.buckets or size + p.numel() * 4 > BUCKET_BYTES:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * 4
        self.bucket_of = {id(p): b for b, bucket in enumerate(self.buckets) for p in bucket}
        self.handles: list[tuple[dist.Work, torch.Tensor]] = []
        self.ready: list[set[int]] = [set() for _ in self.buckets]
        self.armed = False
        self.hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]

    def arm(self) -> None:
        """The next backward is the step's last: its gradients are final and go out as they come."""
        self.armed, self.handles, self.ready = True, [], [set() for _ in self.buckets]

    def _on_grad(self, param: torch.Tensor) -> None:
        if not self.armed:
            return
        self.ready[self.bucket_of[id(param)]].add(id(param))  # a set: a hook firing twice counts once
        while len(self.handles) < len(self.buckets) and len(self.ready[len(self.handles)]) == len(
            self.buckets[len(self.handles)]
        ):
            self._start(len(self.handles))

    def _start(self, b: int) -> None:
        flat = pack_gradients(self.buckets[b])
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.parallel.group, async_op=True)
        self.handles.append((work, flat))

    def finish(self) -> None:
        """Start the buckets backward did not complete, wait for all, write the averaged gradients."""
        while len(self.handles) < len(self.buckets):
            self._start(len(self.handles))
        for (work, flat), bucket in zip(self.handles, self.buckets, strict=True):
            work.wait()
            unpack_average(flat, bucket, self.parallel.world_size)
        self.armed, self.handles = False, []

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()

