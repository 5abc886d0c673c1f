"""Bits per byte of a model on the val split, with the compute it spent.

val_bpb = (summed CE in nats over the scored tokens) / ln 2 / (UTF-8 bytes those
tokens stand for), scored over non-overlapping windows of seq_len tokens, as the
challenge's baseline does. Beside the number it records what the analysis needs to
say where refinement helps: the mean CE change from refinement per decile of the
router's score.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time

import numpy as np
import torch

from loopgolf.trial.data import ByteTable, token_bytes, val_windows

N_SCORE_BINS = 10
MAX_STAT_TOKENS = 1 << 20  # per-token router statistics use at most the first 1M scored tokens


@dataclasses.dataclass(frozen=True)
class EvalResult:
    val_loss: float  # mean CE in nats per scored token
    val_bpb: float
    tokens: int
    bytes: int
    seconds: float
    passes_per_token: float  # block applications per token, refinement included
    flops_per_token: float
    refine_fraction: float
    decile_ce_delta: tuple[float, ...] | None  # mean (final CE - base CE) per router-score decile
    decile_refined_frac: tuple[float, ...] | None


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full precision on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def score_deciles(
    score: np.ndarray, ce_delta: np.ndarray, refined: np.ndarray
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean CE change and refined fraction per decile of the router score (decile 0 = lowest)."""
    order = np.argsort(score, kind="stable")
    bins = np.array_split(order, N_SCORE_BINS)
    delta = tuple(float(ce_delta[b].mean()) if b.size else math.nan for b in bins)
    frac = tuple(float(refined[b].mean()) if b.size else math.nan for b in bins)
    return delta, frac


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    tokens: np.ndarray,
    table: ByteTable,
    *,
    batch_size: int,
    device: torch.device,
) -> EvalResult:
    """Score `tokens` in windows of the model's seq_len; the model is put in eval mode."""
    was_training = model.training
    model.eval()
    seq_len = model.config.seq_len  # type: ignore[attr-defined]
    start = time.perf_counter()
    nats = 0.0
    n_bytes = n_tokens = 0
    passes = flops = refined_tokens = 0.0
    stats: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    stat_tokens = 0
    for x_np, y_np in val_windows(tokens, seq_len, batch_size):
        x = torch.from_numpy(x_np).to(device)
        y = torch.from_numpy(y_np).to(device)
        with autocast_for(device):
            out = model(x, y, return_token_ce=True)
        count = y.numel()
        nats += float(out.token_ce.double().sum())
        n_bytes += int(token_bytes(y_np, x_np, table).sum())
        n_tokens += count
        passes += out.stats.block_applications_per_token * count
        flops += out.stats.flops_per_token * count
        refined_tokens += out.stats.refined_fraction * count
        if out.router_score is not None and stat_tokens < MAX_STAT_TOKENS:
            delta = (out.token_ce.float() - out.base_token_ce.float()).flatten().cpu().numpy()
            stats.append((out.router_score.float().flatten().cpu().numpy(), delta, out.refined.flatten().cpu().numpy()))
            stat_tokens += count
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    model.train(was_training)
    deciles: tuple[tuple[float, ...], tuple[float, ...]] | tuple[None, None] = (None, None)
    if stats:
        score, delta, refined = (np.concatenate(parts) for parts in zip(*stats, strict=True))
        deciles = score_deciles(score, delta, refined.astype(np.float64))
    return EvalResult(
        val_loss=nats / n_tokens,
        val_bpb=nats / math.log(2) / n_bytes,
        tokens=n_tokens,
        bytes=n_bytes,
        seconds=seconds,
        passes_per_token=passes / n_tokens,
        flops_per_token=flops / n_tokens,
        refine_fraction=refined_tokens / n_tokens,
        decile_ce_delta=deciles[0],
        decile_refined_frac=deciles[1],
    )
