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
   small tensors.
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

import copy
import json
import math
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loopgolf.trial.config import TrialConfig
from loopgolf.trial.data import ByteTable, DataError, TrainBatches, byte_table, load_tokenizer, val_tokens
from loopgolf.trial.distributed import DataParallel, check_divisible
from loopgolf.trial.evaluate import EvalResult, autocast_for, evaluate
from loopgolf.trial.prepare import read_manifest, tokenizer_path

Reporter = Callable[[dict[str, Any], "dict[str, Any] | None"], None]
ARTIFACT_NAME = "model.lgart"
METRICS_NAME = "metrics.json"


# ----------------------------------------------------------------------------- pieces


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise DataError("device='cuda' but CUDA is not available on this machine")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def budget_spent(step: int, elapsed: float, config: TrialConfig) -> float:
    """Fraction of the budget spent: of train_seconds, or of max_steps when that one is further along."""
    train = config.train
    spent = elapsed / train.train_seconds
    return max(spent, step / train.max_steps) if train.max_steps else spent


def lr_scale(step: int, elapsed: float, config: TrialConfig) -> float:
    """LR multiplier: warm-up by steps, then a warmdown to 0 over the last part of the budget."""
    train = config.train
    warm = min(1.0, (step + 1) / train.warmup_steps) if train.warmup_steps else 1.0
    if train.max_steps:  # remaining and warmdown as fractions of the budget
        remaining, warmdown = 1.0 - budget_spent(step, elapsed, config), train.warmdown_frac
        down = 1.0 if warmdown <= 0 or remaining >= warmdown else max(0.0, remaining / warmdown)
        return warm * down
    warmdown_seconds = train.warmdown_frac * train.train_seconds
    remaining = train.train_seconds - elapsed
    down = 1.0 if warmdown_seconds <= 0 or remaining >= warmdown_seconds else max(0.0, remaining / warmdown_seconds)
    return warm * down


def build_optimizers(model: torch.nn.Module, config: TrialConfig) -> list[torch.optim.Optimizer]:
    """Muon for 2-D block matrices (as the challenge does); AdamW for embeddings and the rest."""
    train = config.train
    matrices, embeddings, others = [], [], []
    for name, param in model.named_parameters():
        if name.startswith(("tok_emb.", "lm_head.")):
            embeddings.append(param)
        elif param.ndim == 2 and min(param.shape) > 1:
            matrices.append(param)
        else:
            others.append(param)
    adam = {"betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0}
    groups = [{"params": embeddings, "lr": train.lr_embed}, {"params": others, "lr": train.lr_scalar}]
    if train.optimizer == "muon":
        muon = torch.optim.Muon(
            matrices, lr=train.lr_matrix, weight_decay=train.weight_decay, momentum=0.95, adjust_lr_fn="original"
        )
        optimizers: list[torch.optim.Optimizer] = [muon, torch.optim.AdamW(groups, **adam)]
    else:
        groups.append({"params": matrices, "lr": train.lr_matrix, "weight_decay": train.weight_decay})
        optimizers = [torch.optim.AdamW(groups, **adam)]
    for opt in optimizers:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


def _atomic_write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _json_default(value: object) -> object:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def eval_metrics(result: EvalResult, suffix: str = "") -> dict[str, Any]:
    return {
        f"val_loss{suffix}": result.val_loss,
        f"val_bpb{suffix}": result.val_bpb,
        f"eval_seconds{suffix}": result.seconds,
        f"eval_passes_per_token{suffix}": result.passes_per_token,
        f"eval_flops_per_token{suffix}": result.flops_per_token,
        f"refine_fraction{suffix}": result.refine_fraction,
    }


def _prime_compiled(
    forward: Callable[..., Any],
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    batch: tuple[np.ndarray, np.ndarray],
    device: torch.device,
    config: TrialConfig,
) -> None:
    """Compile both graphs (core looped and not) outside the clock, then roll the step back."""
    saved_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
    saved_opts = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
    x, y = (torch.from_numpy(a).to(device) for a in batch)
    for looping in [True] if config.model.loop_start == 0.0 else [False, True]:
        model.set_looping(looping)
        with autocast_for(device):
            out = forward(x, y)
            (out.loss + config.model.aux_loss * out.base_loss).backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    model.load_state_dict(saved_model)
    for opt, state in zip(optimizers, saved_opts, strict=True):
        opt.load_state_dict(state)


class _Data:
    """The trial's view of a prepared data directory."""

    def __init__(self, data_dir: Path, config: TrialConfig, train: bool = True) -> None:
        manifest = read_manifest(data_dir)
        vocab = int(manifest["tokenizer"]["vocab_size"])
        if vocab > config.model.vocab_size:
            raise DataError(
                f"data dir {str(data_dir)!r} uses a {vocab}-piece tokenizer but vocab_size={config.model.vocab_size}"
            )
        self.table: ByteTable = byte_table(load_tokenizer(tokenizer_path(data_dir)), config.model.vocab_size)
        if train:
            self.train = TrainBatches(data_dir, config.train.batch_size, config.model.seq_len, config.train.seed)
        self.val = val_tokens(data_dir, config.train.eval_tokens)
        self.quick_val = self.val[: config.train.quick_eval_tokens + 1]
        if len(self.quick_val) <= config.model.seq_len:
            self.quick_val = self.val[: config.model.seq_len + 1]


# ---------------------------------------------------------------------------- the trial


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
    from loopgolf.trial.artifact import load_artifact, save_artifact
    from loopgolf.trial.estimate import predict_artifact_bytes
    from loopgolf.trial.model import RecurrentLM
    from loopgolf.trial.qat import install_qat, remove_qat

    if parallel is not None and parallel.world_size == 1:
        parallel = None
    world = parallel.world_size if parallel else 1
    check_divisible(config, world)
    is_main = parallel is None or parallel.is_main
    wall_start = time.perf_counter()
    out = Path(out_dir)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    cap = config.compress.max_artifact_bytes
    base: dict[str, Any] = {
        "host": socket.gethostname(),
        "max_artifact_bytes": cap,
        "predicted_artifact_bytes": predict_artifact_bytes(config),
        "world_size": world,
    }
    if base["predicted_artifact_bytes"] > cap and not config.compress.allow_over_cap:
        metrics = base | {
            "status": "rejected",
            "feasible": False,
            "byte_violation": base["predicted_artifact_bytes"] - cap,
            "error": f"predicted {base['predicted_artifact_bytes']:,} bytes > cap {cap:,} (not trained)",
        }
        if is_main:
            _atomic_write_json(out / METRICS_NAME, metrics)
        return metrics

    data = _Data(Path(data_dir), config)
    device = parallel.device if parallel is not None and parallel.device is not None else None
    device = device or resolve_device(config.train.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    torch.manual_seed(config.train.seed)
    model = RecurrentLM(config.model).to(device)
    if config.compress.qat != "none":
        install_qat(model, config.compress)
    optimizers = build_optimizers(model, config)
    step, elapsed, train_tokens = 0, 0.0, 0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        for opt, opt_state in zip(optimizers, resume_state["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        step, elapsed, train_tokens = resume_state["step"], resume_state["elapsed"], resume_state["train_tokens"]
        torch.set_rng_state(resume_state["torch_rng"])
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = list(model.buffers())
    if parallel is not None:
        parallel.broadcast_module(model)

    def batch(at: int) -> tuple[np.ndarray, np.ndarray]:
        full = data.train.batch(at)
        return parallel.shard(full) if parallel is not None else full

    forward = model
    if config.train.compile:
        forward = torch.compile(model)
        _prime_compiled(forward, model, optimizers, batch(0), device, config)
    if parallel is not None:  # start the clocks together
        parallel.barrier(device)
    startup_seconds = time.perf_counter() - wall_start

    def training_state() -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizers": [opt.state_dict() for opt in optimizers],
            "step": step,
            "elapsed": elapsed,
            "train_tokens": train_tokens,
            "torch_rng": torch.get_rng_state(),
        }

    train = config.train
    next_report = (math.floor(elapsed / train.report_every_seconds) + 1) * train.report_every_seconds
    next_checkpoint = (math.floor(elapsed / train.checkpoint_every_seconds) + 1) * train.checkpoint_every_seconds
    loss_value, refine_fraction, failure = math.nan, 0.0, None
    model.train()
    step_seconds = 0.0  # running mean of one step's time
    # Stop where the budget is nearest: before a step that would end more than half a step late.
    while elapsed + 0.5 * step_seconds < train.train_seconds and not (train.max_steps and step >= train.max_steps):
        model.set_looping(budget_spent(step, elapsed, config) >= config.model.loop_start)
        scale = lr_scale(step, elapsed, config)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
        x_np, y_np = batch(step)
        tick = time.perf_counter()
        x, y = torch.from_numpy(x_np).to(device), torch.from_numpy(y_np).to(device)
        with autocast_for(device):
            out_step = forward(x, y)
            objective = out_step.loss + config.model.aux_loss * out_step.base_loss
        objective.backward()
        if parallel is not None:
            parallel.average_gradients(params)
        if train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        loss_value = out_step.loss.detach().item()  # synchronizes, so the clock below is honest on CUDA
        took = time.perf_counter() - tick
        refine_fraction = out_step.stats.refined_fraction
        if parallel is not None:  # one clock, one loss, one router threshold on every rank
            agreed = parallel.agree_step(loss_value, took, buffers, device, means=(refine_fraction,))
            loss_value, took, (refine_fraction,) = agreed.loss, agreed.seconds, agreed.means
        elapsed += took
        step_seconds = took if step_seconds == 0.0 else 0.9 * step_seconds + 0.1 * took
        step += 1
        train_tokens += x.numel() * world
        if not math.isfinite(loss_value):
            failure = f"non-finite training loss ({loss_value}) at step {step}"
            break
        checkpoint_due = elapsed >= next_checkpoint
        if reporter is not None and (elapsed >= next_report or checkpoint_due):
            while next_report <= elapsed:
                next_report += train.report_every_seconds
            progress = {
                "step": step,
                "elapsed_seconds": elapsed,
                "train_loss": loss_value,
                "train_tokens": train_tokens,
                "refine_fraction": refine_fraction,
                "lr_scale": scale,
            }
            if is_main:
                quick = evaluate(model, data.quick_val, data.table, batch_size=train.batch_size, device=device)
                progress["quick_val_bpb"] = quick.val_bpb
            state = None
            if checkpoint_due:
                while next_checkpoint <= elapsed:
                    next_checkpoint += train.checkpoint_every_seconds
                state = training_state() if is_main else None
            reporter(progress, state)
            if parallel is not None:  # rank 0's quick eval and checkpoint stay off every rank's clock
                parallel.barrier(device)

    metrics = base | {
        "status": "complete",
        "device": str(device),
        "params": model.unique_params(),
        "effective_params": model.effective_params(),
        "train_seconds": elapsed,
        "train_steps": step,
        "train_tokens": train_tokens,
        "train_loss": loss_value,
        "startup_seconds": startup_seconds,
        "tokens_per_second": train_tokens / elapsed if elapsed > 0 else 0.0,
    }
    if parallel is not None:  # the last collective: after it, rank 0 goes on alone
        metrics["replica_drift"] = parallel.replica_drift(model)
    if failure is not None:
        metrics |= {"status": "failed", "feasible": False, "error": failure}
        if is_main:
            _atomic_write_json(out / METRICS_NAME, metrics)
        return metrics
    if not is_main:
        return metrics

    batch_size = train.batch_size
    if config.compress.qat != "none":
        remove_qat(model)
    prequant = evaluate(model, data.val, data.table, batch_size=batch_size, device=device)
    tick = time.perf_counter()
    info = save_artifact(model, config, out / ARTIFACT_NAME)
    compress_seconds = time.perf_counter() - tick
    reloaded = load_artifact(out / ARTIFACT_NAME).to(device)
    final = evaluate(reloaded, data.val, data.table, batch_size=batch_size, device=device)
    eval_cap = train.max_eval_seconds
    metrics |= eval_metrics(final) | {
        "val_bpb_prequant": prequant.val_bpb,
        "val_loss_prequant": prequant.val_loss,
        "eval_tokens": final.tokens,
        "eval_bytes": final.bytes,
        "artifact_path": str(out / ARTIFACT_NAME),
        "artifact_bytes": info.artifact_bytes,
        "model_bytes": info.model_bytes,
        "code_bytes": info.code_bytes,
        "compress_seconds": compress_seconds,
        "byte_violation": info.artifact_bytes - cap,
        "eval_violation": final.seconds - eval_cap if eval_cap else 0.0,
        "decile_ce_delta": final.decile_ce_delta,
        "decile_refined_frac": final.decile_refined_frac,
    }
    metrics["feasible"] = metrics["byte_violation"] <= 0 and metrics["eval_violation"] <= 0
    metrics["wall_seconds"] = time.perf_counter() - wall_start
    _atomic_write_json(out / METRICS_NAME, metrics)
    return metrics


def evaluate_artifact(
    artifact: str | os.PathLike[str], data_dir: str | os.PathLike[str], eval_tokens: int | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """val_bpb from the artifact file alone (its config travels inside it)."""
    from loopgolf.trial.artifact import load_artifact_with_config

    model, config = load_artifact_with_config(artifact)
    if eval_tokens is not None:
        config = config.replace(eval_tokens=eval_tokens)
    data = _Data(Path(data_dir), config, train=False)
    torch_device = resolve_device(device)
    result = evaluate(model.to(torch_device), data.val, data.table, batch_size=config.train.batch_size,
                      device=torch_device)
    return eval_metrics(result) | {"eval_tokens": result.tokens, "eval_bytes": result.bytes, "artifact": str(artifact)}
