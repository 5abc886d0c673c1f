"""One trial: train for a wall-clock budget, compress, and evaluate from the artifact.

    run_trial(config, data_dir, out_dir, reporter, resume_state, parallel) -> metrics

1. Reject early: estimate.py predicts the artifact's bytes; a config predicted over the
   cap is not trained (status "rejected") unless `allow_over_cap`.
2. Train for `train_seconds` of training time, to within half a step, or for `max_steps`
   steps when that comes first. The clock runs only during optimizer steps: start-up,
   periodic evaluation and checkpointing are excluded and recorded. LR: linear warm-up
   over `warmup_steps`, constant, then a linear warmdown over the last `warmdown_frac`
   of the budget, keyed to elapsed time as in the challenge (or to steps, when the step
   budget is the one nearer its end). Muon for block matrices, AdamW for embeddings and
   small tensors (optim.py holds the optimizers and schedules). Compiled (`compile`,
   compiled.py), every graph is built before the clock starts and a compile on the clock
   raises; on one CUDA device the loss is read (a host sync) every LOSS_READ_EVERY steps,
   and every step whose end could cross the budget is read.
3. Evaluate the in-memory model (`val_bpb_prequant`), write the artifact, reload it
   from disk, and evaluate that (`val_bpb`, the number that counts).

A non-finite loss ends the trial as "failed" with a reason instead of raising, so a
sweep goes on. A `reporter(metrics, state)` receives progress every
`report_every_seconds`, and a resumable training state every
`checkpoint_every_seconds`; `resume_state` continues from one with the remaining
budget. Batches are a pure function of (seed, step), so the step is the data position.

Data parallel (`parallel`, see distributed.py): every rank calls `run_trial` with the
same arguments; each trains on its slice of the global batch with averaged gradients,
and all ranks agree on the clock, so they stop, report and checkpoint at the same steps.
The reporter, when given, is called on every rank at those steps (it may itself be a
collective, such as `ray.train.report`); rank 0's progress alone carries
`quick_val_bpb` and rank 0 alone gets the resumable state. Rank 0 evaluates, writes the
artifact and metrics.json and returns the full metrics; other ranks write nothing and
return the training part (status, steps, tokens, loss).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loopgolf.atomic import atomic_write_json
from loopgolf.jsonio import json_default
from loopgolf.trial.artifact import load_artifact, require_codec, save_artifact
from loopgolf.trial.calibrate import threshold_metrics
from loopgolf.trial.compiled import compiled_forward, compiles, loss_read_every, prime_compiled
from loopgolf.trial.config import TrialConfig
from loopgolf.trial.data import TrainBatches
from loopgolf.trial.distributed import DataParallel, GradientBuckets, check_divisible, grad_accum_steps
from loopgolf.trial.estimate import predict_artifact_bytes
from loopgolf.trial.eval_tokens import EVAL_TOKENS_NAME, write_token_scores
from loopgolf.trial.evaluate import ValData, autocast_for, eval_metrics, evaluate, read_val_data, resolve_device
from loopgolf.trial.model import RecurrentLM
from loopgolf.trial.optim import budget_spent, build_optimizers, lr_scale, muon_momentum
from loopgolf.trial.qat import install_qat, quantized_model, remove_qat

Reporter = Callable[[dict[str, Any], "dict[str, Any] | None"], None]
ARTIFACT_NAME = "model.lgart"
METRICS_NAME = "metrics.json"
TRAIN_CLOCK: Callable[[], float] = time.perf_counter  # times the optimizer steps (tests give steps a fixed time)


# ---------------------------------------------------------------------------- the trial


@dataclasses.dataclass
class _Run:
    """One trial in progress: what its phases share, and the training state they advance."""

    config: TrialConfig
    out: Path
    parallel: DataParallel | None
    val: ValData
    batches: TrainBatches
    device: torch.device
    model: RecurrentLM
    optimizers: list[torch.optim.Optimizer]
    wall_start: float
    forward: Callable[..., Any] = dataclasses.field(init=False)  # the model, or its compiled graph
    params: list[torch.nn.Parameter] = dataclasses.field(init=False)
    buffers: list[torch.Tensor] = dataclasses.field(init=False)
    grad_accum: int = dataclasses.field(init=False)  # micro-batches per rank per step
    buckets: GradientBuckets | None = dataclasses.field(init=False)  # data parallel: all-reduce during backward
    step: int = 0
    elapsed: float = 0.0  # training clock: optimizer steps only
    train_tokens: int = 0
    loss: float = math.nan
    refine_fraction: float = 0.0
    failure: str | None = None
    startup_seconds: float = 0.0
    compiled: bool = False
    # Steps run since the loss was last read: their losses and refined shares stay on the
    # device, and the clock has run since the first of them started (see _read_clock).
    pending_steps: int = 0
    pending_loss: torch.Tensor | float = 0.0
    pending_refined: torch.Tensor | float = 0.0
    pending_since: float = 0.0

    def __post_init__(self) -> None:
        self.forward = self.model
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.buffers = list(self.model.buffers())
        self.grad_accum = grad_accum_steps(self.config, self.world)
        self.buckets = GradientBuckets(self.parallel, self.params) if self.parallel is not None else None

    @property
    def world(self) -> int:
        return self.parallel.world_size if self.parallel else 1

    @property
    def is_main(self) -> bool:
        return self.parallel is None or self.parallel.is_main

    def batch(self, at: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's part of global batch `at`."""
        full = self.batches.batch(at)
        return self.parallel.shard(full) if self.parallel is not None else full

    def micro_batch(self, at: int) -> tuple[np.ndarray, np.ndarray]:
        """The first micro-batch of this rank's part of global batch `at` (the compiled shape)."""
        x, y = self.batch(at)
        rows = x.shape[0] // self.grad_accum
        return x[:rows], y[:rows]

    def training_state(self) -> dict[str, Any]:
        """What `resume` needs to continue exactly where this run is."""
        return {
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "step": self.step,
            "elapsed": self.elapsed,
            "train_tokens": self.train_tokens,
            "torch_rng": torch.get_rng_state(),
            "router_draws": self.model.train_draws,
        }

    def resume(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        for opt, opt_state in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        self.step, self.elapsed, self.train_tokens = state["step"], state["elapsed"], state["train_tokens"]
        torch.set_rng_state(state["torch_rng"])
        self.model.train_draws = state["router_draws"]


def _reject_over_cap(config: TrialConfig, base: dict[str, Any]) -> dict[str, Any] | None:
    """The metrics of a trial not trained because its predicted bytes exceed the cap, or None."""
    cap, predicted = config.compress.max_artifact_bytes, base["predicted_artifact_bytes"]
    if predicted <= cap or config.compress.allow_over_cap:
        return None
    return base | {
        "status": "rejected",
        "feasible": False,
        "byte_violation": predicted - cap,
        "error": f"predicted {predicted:,} bytes > cap {cap:,} (not trained)",
    }


def _set_up(
    config: TrialConfig, data_dir: Path, out: Path, parallel: DataParallel | None,
    resume_state: dict[str, Any] | None, wall_start: float,
) -> _Run:
    """Data, device, model (with QAT), optimizers, resumed state; compiled and primed; ranks in step."""
    val = read_val_data(data_dir, config)
    batches = TrainBatches(
        data_dir, config.train.batch_size, config.model.seq_len, config.train.seed,
        holdout=config.train.calibration_tokens, vocab_size=val.pieces,
    )
    device = parallel.device if parallel is not None and parallel.device is not None else None
    device = device or resolve_device(config.train.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    torch.manual_seed(config.train.seed)
    model = RecurrentLM(config.model, router_seed=config.train.seed).to(device)
    if config.compress.qat != "none":
        install_qat(model, config.compress)
    run = _Run(config, out, parallel, val, batches, device, model, build_optimizers(model, config), wall_start)
    if resume_state is not None:
        run.resume(resume_state)
    if parallel is not None:
        parallel.broadcast_module(model)
    if device.type == "cuda":  # TF32 for any fp32 matmul left outside bf16 autocast
        torch.set_float32_matmul_precision("high")
    if compiles(config, device):
        run.forward, run.compiled = compiled_forward(model), True
        prime_compiled(run.forward, model, run.optimizers, run.micro_batch(0), device, config)
    if parallel is not None:  # start the clocks together
        parallel.barrier(device)
    run.startup_seconds = time.perf_counter() - wall_start
    return run


def _accumulate(run: _Run, x_all: torch.Tensor, y_all: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
    """Forward and backward over this rank's micro-batches; gradients of the mean loss.

    Every micro-batch holds as many tokens, so the mean of their mean losses is the rank's
    mean loss, and scaling each backward by 1 / accum sums to its gradient. The losses
    stay on the device (no host sync per micro-batch).
    """
    config = run.config
    accum = run.grad_accum
    losses: list[torch.Tensor] = []
    refined: torch.Tensor | float = 0.0
    for i, (x, y) in enumerate(zip(x_all.chunk(accum), y_all.chunk(accum), strict=True)):
        with autocast_for(run.device):
            out = run.forward(x, y)
            objective = out.loss + config.model.aux_loss * out.base_loss
        if run.buckets is not None and i == accum - 1:  # the last backward: its gradients go out as they come
            run.buckets.arm()
        (objective / accum if accum > 1 else objective).backward()
        losses.append(out.loss.detach())
        share = out.stats.refined_share
        refined = refined + (share.detach() if isinstance(share, torch.Tensor) else share) / accum
    return torch.stack(losses).mean(), refined


def _step(run: _Run, scale: float) -> None:
    """One optimizer step at LR multiplier `scale`, left pending: its loss is read (and its
    time put on the clock) by the next _read_clock."""
    config, model, device = run.config, run.model, run.device
    model.set_looping(budget_spent(run.step, run.elapsed, config) >= config.model.loop_start)
    momentum = muon_momentum(run.step, config)
    for opt in run.optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * scale
            if isinstance(opt, torch.optim.Muon):
                group["momentum"] = momentum
    x_np, y_np = run.batch(run.step)
    if run.pending_steps == 0:
        run.pending_since = TRAIN_CLOCK()
    x, y = torch.from_numpy(x_np).to(device), torch.from_numpy(y_np).to(device)
    mean_loss, refine_fraction = _accumulate(run, x, y)
    if run.buckets is not None:
        run.buckets.finish()  # the buckets backward did not start, then the averaged gradients
    if config.train.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
    for opt in run.optimizers:
        if run.parallel is not None and isinstance(opt, torch.optim.Muon):
            run.parallel.step_sharded(opt)  # this rank's share of Newton-Schulz; the rest gathered
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    run.pending_loss = run.pending_loss + mean_loss
    run.pending_refined = run.pending_refined + refine_fraction
    run.pending_steps += 1
    run.step += 1
    run.train_tokens += x.numel() * run.world


def _read_clock(run: _Run) -> float:
    """Read the pending steps' mean loss; put their time on the clock; return seconds per step.

    The read waits for the device, so the clock is honest: it counts from the start of the
    first pending step to the end of the last (the host's batch preparation between them
    included; each read ends a span, and reports and checkpoints fall between spans).
    """
    n = run.pending_steps
    loss = float(run.pending_loss) / n  # synchronizes
    refine_fraction = float(run.pending_refined) / n
    took = TRAIN_CLOCK() - run.pending_since
    if run.parallel is not None:  # one clock, one loss, one router threshold on every rank
        agreed = run.parallel.agree_step(loss, took, run.buffers, run.device, means=(refine_fraction,))
        loss, took, (refine_fraction,) = agreed.loss, agreed.seconds, agreed.means
    run.loss, run.refine_fraction = loss, refine_fraction
    run.elapsed += took
    run.pending_steps, run.pending_loss, run.pending_refined = 0, 0.0, 0.0
    return took / n


def _report(run: _Run, reporter: Reporter, scale: float, checkpoint: bool) -> None:
    """Progress (rank 0 adds a quick val_bpb) and, when `checkpoint`, rank 0's resumable state."""
    progress = {
        "step": run.step,
        "elapsed_seconds": run.elapsed,
        "train_loss": run.loss,
        "train_tokens": run.train_tokens,
        "refine_fraction": run.refine_fraction,
        "lr_scale": scale,
    }
    if run.is_main:
        quick = evaluate(run.model, run.val.quick_val, run.val.table, batch_size=run.config.train.batch_size,
                         device=run.device)
        progress["quick_val_bpb"] = quick.val_bpb
    if checkpoint and run.parallel is not None:  # every rank: rank 0's copy of the sharded Muon state, whole
        for opt in run.optimizers:
            if isinstance(opt, torch.optim.Muon):
                run.parallel.gather_optimizer_state(opt)
    reporter(progress, run.training_state() if checkpoint and run.is_main else None)
    if run.parallel is not None:  # rank 0's quick eval and checkpoint stay off every rank's clock
        run.parallel.barrier(run.device)


def _train(run: _Run, reporter: Reporter | None) -> None:
    """Step until the budget is spent or the loss is non-finite; report and checkpoint on the clock."""
    train = run.config.train
    next_report = (math.floor(run.elapsed / train.report_every_seconds) + 1) * train.report_every_seconds
    next_checkpoint = (math.floor(run.elapsed / train.checkpoint_every_seconds) + 1) * train.checkpoint_every_seconds
    run.model.train()
    read_every = loss_read_every(run.device, run.parallel)
    step_seconds = 0.0  # running mean of one step's time
    # Stop where the budget is nearest: before a step that would end more than half a step
    # late. Between reads of the clock, elapsed time is predicted at the mean step time; a
    # read comes whenever a step could cross the budget, a report or a checkpoint, so every
    # stop, report and checkpoint is decided on the read clock.
    while run.elapsed + (run.pending_steps + 0.5) * step_seconds < train.train_seconds and not (
        train.max_steps and run.step >= train.max_steps
    ):
        predicted = run.elapsed + run.pending_steps * step_seconds
        scale = lr_scale(run.step, predicted, run.config)
        _step(run, scale)
        predicted += step_seconds
        due = min(train.train_seconds, next_report, next_checkpoint)
        if not (
            run.pending_steps >= read_every or step_seconds == 0.0 or predicted + 1.5 * step_seconds >= due
            or (train.max_steps and run.step >= train.max_steps)
        ):
            continue
        took = _read_clock(run)
        step_seconds = took if step_seconds == 0.0 else 0.9 * step_seconds + 0.1 * took
        if not math.isfinite(run.loss):
            run.failure = f"non-finite training loss ({run.loss}) at step {run.step}"
            return
        checkpoint_due = run.elapsed >= next_checkpoint
        if reporter is not None and (run.elapsed >= next_report or checkpoint_due):
            while next_report <= run.elapsed:
                next_report += train.report_every_seconds
            while checkpoint_due and next_checkpoint <= run.elapsed:
                next_checkpoint += train.checkpoint_every_seconds
            _report(run, reporter, scale, checkpoint_due)
    if run.pending_steps:  # a step time that grew between reads: the last steps are read all the same
        _read_clock(run)


def _training_metrics(run: _Run) -> dict[str, Any]:
    return {
        "status": "complete",
        "device": str(run.device),
        "params": run.model.unique_params(),
        "effective_params": run.model.effective_params(),
        "train_seconds": run.elapsed,
        "train_steps": run.step,
        "train_tokens": run.train_tokens,
        "train_loss": run.loss,
        "train_refine_fraction": run.refine_fraction,  # of the last step's tokens
        "startup_seconds": run.startup_seconds,
        "tokens_per_second": run.train_tokens / run.elapsed if run.elapsed > 0 else 0.0,
    }


def _finish(run: _Run, metrics: dict[str, Any]) -> dict[str, Any]:
    """Rank 0: evaluate in memory, write the artifact, reload it from disk, evaluate that.

    A routed threshold is calibrated for each model as it is evaluated: the trained one,
    then the dequantized one, whose threshold the artifact carries.
    """
    config, val, device = run.config, run.val, run.device
    batch_size, path = config.train.batch_size, run.out / ARTIFACT_NAME
    if config.compress.qat != "none":
        remove_qat(run.model)
    windows = run.batches.heldout_windows
    calibration = threshold_metrics(run.model, windows, config, device)
    prequant = evaluate(run.model, val.val, val.table, batch_size=batch_size, device=device)
    if calibration:
        prequant_threshold = calibration["refine_threshold"]
        calibration = threshold_metrics(quantized_model(run.model, config.compress), windows, config, device)
        calibration["refine_threshold_prequant"] = prequant_threshold
        run.model.router_threshold.fill_(calibration["refine_threshold"])
    tick = time.perf_counter()
    info = save_artifact(run.model, config, path)
    compress_seconds = time.perf_counter() - tick
    final = evaluate(load_artifact(path).to(device), val.val, val.table, batch_size=batch_size, device=device,
                     keep_tokens=True)
    assert final.token_scores is not None
    tokens_path = write_token_scores(final.token_scores, run.out / EVAL_TOKENS_NAME)
    eval_cap = config.train.max_eval_seconds
    metrics = metrics | eval_metrics(final) | calibration | {
        "val_bpb_prequant": prequant.val_bpb,
        "val_loss_prequant": prequant.val_loss,
        "refine_fraction_prequant": prequant.refine_fraction,
        "eval_flops_per_token_prequant": prequant.flops_per_token,
        "eval_tokens_scored": final.tokens,  # not `eval_tokens`: that is the config field (0 = auto)
        "eval_bytes": final.bytes,
        "artifact_path": str(path),
        "eval_tokens_path": str(tokens_path),
        "artifact_bytes": info.artifact_bytes,
        "model_bytes": info.model_bytes,
        "code_bytes": info.code_bytes,
        "compress_seconds": compress_seconds,
        "byte_violation": info.artifact_bytes - config.compress.max_artifact_bytes,
        "byte_fill": info.artifact_bytes / config.compress.max_artifact_bytes,  # equal bytes: 0.98-1.0
        "eval_violation": final.seconds - eval_cap if eval_cap else 0.0,
        "decile_ce_delta": final.decile_ce_delta,
        "decile_refined_frac": final.decile_refined_frac,
    }
    metrics["feasible"] = metrics["byte_violation"] <= 0 and metrics["eval_violation"] <= 0
    metrics["wall_seconds"] = time.perf_counter() - run.wall_start
    atomic_write_json(run.out / METRICS_NAME, metrics, default=json_default)
    return metrics


def run_trial(
    config: TrialConfig,
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    reporter: Reporter | None = None,
    resume_state: dict[str, Any] | None = None,
    parallel: DataParallel | None = None,
) -> dict[str, Any]:
    """Train, compress, evaluate from the artifact; write metrics.json; return the metrics.

    `parallel`: this process is one rank of a data-parallel trial (module docstring).
    """
    if parallel is not None and parallel.world_size == 1:
        parallel = None
    world = parallel.world_size if parallel else 1
    check_divisible(config, world)
    require_codec(config.compress.codec)  # before training: a missing codec package is known now
    is_main = parallel is None or parallel.is_main
    wall_start = time.perf_counter()
    out = Path(out_dir)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    base: dict[str, Any] = {
        "host": socket.gethostname(),
        "max_artifact_bytes": config.compress.max_artifact_bytes,
        "predicted_artifact_bytes": predict_artifact_bytes(config),
        "world_size": world,
    }
    rejected = _reject_over_cap(config, base)
    if rejected is not None:
        if is_main:
            atomic_write_json(out / METRICS_NAME, rejected, default=json_default)
        return rejected

    run = _set_up(config, Path(data_dir), out, parallel, resume_state, wall_start)
    # Priming compiled every graph: a compile on the clock would be a bug, so it raises.
    with torch.compiler.set_stance("fail_on_recompile") if run.compiled else contextlib.nullcontext():
        _train(run, reporter)
    metrics = base | _training_metrics(run)
    if parallel is not None:  # the last collective: after it, rank 0 goes on alone
        metrics["replica_drift"] = parallel.replica_drift(run.model)
    if run.failure is not None:
        metrics |= {"status": "failed", "feasible": False, "error": run.failure}
        if is_main:
            atomic_write_json(out / METRICS_NAME, metrics, default=json_default)
        return metrics
    return _finish(run, metrics) if is_main else metrics
