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
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loopgolf.trial.artifact import load_artifact_with_config
from loopgolf.trial.config import TrialConfig
from loopgolf.trial.data import ByteTable, DataError, byte_table, load_tokenizer, token_bytes, val_tokens, val_windows
from loopgolf.trial.eval_tokens import AUTO_EVAL_LIMIT, TokenScores
from loopgolf.trial.model import RecurrentLM
from loopgolf.trial.prepare import check_data, tokenizer_path

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
    token_scores: TokenScores | None = None  # per scored position, with keep_tokens


@dataclasses.dataclass(frozen=True)
class ValData:
    """The val split of a prepared data directory, as the scorer reads it."""

    table: ByteTable
    val: np.ndarray  # the first eval_tokens of the val split (eval_tokens=0: eval_size's default)
    quick_val: np.ndarray  # the head of it that progress reports score (at least one window)
    pieces: int  # the tokenizer's vocab: every token id is below it


def read_val_data(data_dir: Path, config: TrialConfig) -> ValData:
    """The val tokens and byte table, after the whole data directory is checked (check_data)."""
    manifest = check_data(data_dir, config.model.vocab_size)
    pieces = int(manifest["tokenizer"]["vocab_size"])
    table = byte_table(load_tokenizer(tokenizer_path(data_dir)), config.model.vocab_size)
    val = val_tokens(data_dir, config.train.eval_tokens or AUTO_EVAL_LIMIT)
    if len(val) and int(val.max()) >= pieces:  # the manifest said otherwise: the shards changed since
        raise DataError(f"data dir {str(data_dir)!r}: val token id {int(val.max())} >= the tokenizer's {pieces} pieces")
    quick_val = val[: config.train.quick_eval_tokens + 1]
    if len(quick_val) <= config.model.seq_len:
        quick_val = val[: config.model.seq_len + 1]
    return ValData(table, val, quick_val, pieces)


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise DataError("device='cuda' but CUDA is not available on this machine")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


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
    model: RecurrentLM,
    tokens: np.ndarray,
    table: ByteTable,
    *,
    batch_size: int,
    device: torch.device,
    keep_tokens: bool = False,
) -> EvalResult:
    """Score `tokens` in windows of the model's seq_len; the model is put in eval mode.
    With `keep_tokens`, the result carries every scored position's CE, base CE, routing
    and bytes (eval_tokens.py writes them)."""
    was_training = model.training
    model.eval()
    model.restart_draws()  # the `random` control draws the same masks in every evaluation of a model
    seq_len = model.config.seq_len
    start = time.perf_counter()
    nats = 0.0
    n_bytes = n_tokens = 0
    passes = flops = refined_tokens = 0.0
    stats: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    stat_tokens = 0
    kept: list[tuple[np.ndarray, ...]] = []
    for x_np, y_np in val_windows(tokens, seq_len, batch_size):
        x = torch.from_numpy(x_np).to(device)
        y = torch.from_numpy(y_np).to(device)
        with autocast_for(device):
            out = model(x, y, return_token_ce=True)
        count = y.numel()
        nats += float(out.token_ce.double().sum())
        window_bytes = token_bytes(y_np, x_np, table)
        n_bytes += int(window_bytes.sum())
        if keep_tokens:
            kept.append(_token_rows(out, window_bytes))
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
        token_scores=_token_scores(kept) if keep_tokens else None,
    )


def _token_rows(out: Any, window_bytes: np.ndarray) -> tuple[np.ndarray, ...]:
    """One batch of windows' per-token columns, flattened in scoring order."""
    ce = out.token_ce.float().flatten().cpu().numpy()
    base = out.base_token_ce.float().flatten().cpu().numpy()
    refined = out.refined.flatten().cpu().numpy() if out.refined is not None else np.zeros(ce.shape, bool)
    score = out.router_score.float().flatten().cpu().numpy() if out.router_score is not None else None
    return ce, base, refined, score, window_bytes.reshape(-1)


def _token_scores(kept: list[tuple[np.ndarray, ...]]) -> TokenScores:
    ce, base, refined, score, nbytes = zip(*kept, strict=True)
    return TokenScores(
        ce=np.concatenate(ce).astype(np.float32), base_ce=np.concatenate(base).astype(np.float32),
        refined=np.concatenate(refined).astype(bool),
        router_score=None if score[0] is None else np.concatenate(score).astype(np.float32),
        bytes=np.concatenate(nbytes).astype(np.int32),
    )


def eval_metrics(result: EvalResult, suffix: str = "") -> dict[str, Any]:
    """An evaluation as metrics (names suffixed with `suffix`)."""
    return {
        f"val_loss{suffix}": result.val_loss,
        f"val_bpb{suffix}": result.val_bpb,
        f"eval_seconds{suffix}": result.seconds,
        f"eval_passes_per_token{suffix}": result.passes_per_token,
        f"eval_flops_per_token{suffix}": result.flops_per_token,
        f"refine_fraction{suffix}": result.refine_fraction,
    }


def evaluate_artifact(
    artifact: str | os.PathLike[str], data_dir: str | os.PathLike[str], eval_tokens: int | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """val_bpb from the artifact file alone (its config travels inside it)."""
    model, config = load_artifact_with_config(artifact)
    if eval_tokens is not None:
        config = config.replace(eval_tokens=eval_tokens)
    data = read_val_data(Path(data_dir), config)
    torch_device = resolve_device(device)
    result = evaluate(model.to(torch_device), data.val, data.table, batch_size=config.train.batch_size,
                      device=torch_device)
    scored = {"eval_tokens_scored": result.tokens, "eval_bytes": result.bytes}
    return eval_metrics(result) | scored | {"artifact": str(artifact)}
