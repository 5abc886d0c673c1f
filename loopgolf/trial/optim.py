"""The optimizers and their schedules for one trial's training.

    build_optimizers(model, config) -> [Muon for the block matrices, AdamW for the rest]
    lr_scale(step, elapsed, config) -> the LR multiplier (warm-up, then warmdown)
    muon_momentum(step, config)     -> Muon's momentum (warm-up from muon_momentum_start)

Parameters get their optimizer by role (parameter_role), not by shape. The warmdown is
keyed to elapsed training time as in the challenge, or to steps when the step budget is
the one nearer its end (budget_spent). train.py runs the loop that uses them.
"""

from __future__ import annotations

import torch

from loopgolf.trial.blocks import QATLinear
from loopgolf.trial.config import TrialConfig


def budget_spent(step: int, elapsed: float, config: TrialConfig) -> float:
    """Fraction of the budget spent: of train_seconds, or of max_steps when that one is further along."""
    train = config.train
    spent = elapsed / train.train_seconds
    return max(spent, step / train.max_steps) if train.max_steps else spent


def lr_scale(step: int, elapsed: float, config: TrialConfig) -> float:
    """LR multiplier: warm-up by steps, then a warmdown to 0 over the last part of the budget."""
    train = config.train
    warm = min(1.0, (step + 1) / train.warmup_steps) if train.warmup_steps else 1.0
    if train.warmdown_steps:
        return warm * _challenge_warmdown(step, elapsed, config)
    if train.max_steps:  # remaining and warmdown as fractions of the budget
        remaining, warmdown = 1.0 - budget_spent(step, elapsed, config), train.warmdown_frac
        down = 1.0 if warmdown <= 0 or remaining >= warmdown else max(0.0, remaining / warmdown)
        return warm * down
    warmdown_seconds = train.warmdown_frac * train.train_seconds
    remaining = train.train_seconds - elapsed
    down = 1.0 if warmdown_seconds <= 0 or remaining >= warmdown_seconds else max(0.0, remaining / warmdown_seconds)
    return warm * down


def _challenge_warmdown(step: int, elapsed: float, config: TrialConfig) -> float:
    """train_gpt.py's warmdown: over the time `warmdown_steps` take at the mean step time so far.

    A slow step (mean step time x warmdown_steps > the budget) starts the decay at once, as
    in the challenge. With `max_steps`, the decay over the last warmdown_steps steps applies
    too, and the lower of the two wins (the budget nearer its end).
    """
    train = config.train
    warmdown_seconds = train.warmdown_steps * elapsed / max(step, 1)
    remaining = max(train.train_seconds - elapsed, 0.0)
    down = remaining / max(warmdown_seconds, 1e-9) if remaining <= warmdown_seconds else 1.0
    if train.max_steps:
        down = min(down, max(0.0, (train.max_steps - step) / train.warmdown_steps))
    return min(down, 1.0)


def muon_momentum(step: int, config: TrialConfig) -> float:
    """Muon's momentum at `step`: linear from muon_momentum_start over the warm-up steps."""
    train = config.train
    done = min(step / train.muon_momentum_warmup_steps, 1.0) if train.muon_momentum_warmup_steps else 1.0
    return (1.0 - done) * train.muon_momentum_start + done * train.muon_momentum


def parameter_role(model: torch.nn.Module) -> dict[str, str]:
    """Each parameter's role, which picks its optimizer (by role, not by shape).

    embedding: the token embedding and an untied head. matrix: the weight of a block's
    linear layer. per_pass: phase conditioning (gains, LoRA factors, pass embeddings).
    control: every other tensor (attn_scale, mlp_scale, resid_mix, q_gain, skip_weights).
    """
    linear = {id(m.weight) for m in model.modules() if isinstance(m, QATLinear)}
    roles = {}
    for name, param in model.named_parameters():
        if name.startswith(("tok_emb.", "lm_head.")):
            roles[name] = "embedding"
        elif id(param) in linear:
            roles[name] = "matrix"
        elif name.startswith("phase."):
            roles[name] = "per_pass"
        else:
            roles[name] = "control"
    return roles


def build_optimizers(model: torch.nn.Module, config: TrialConfig) -> list[torch.optim.Optimizer]:
    """Muon for the block matrices (as the challenge does); AdamW for embeddings, control
    tensors and per-pass parameters. Every param group names its role."""
    train = config.train
    roles = parameter_role(model)
    by_role: dict[str, list[torch.nn.Parameter]] = {"embedding": [], "matrix": [], "control": [], "per_pass": []}
    for name, param in model.named_parameters():
        by_role[roles[name]].append(param)
    fused = next(model.parameters()).is_cuda  # one kernel for every Adam tensor on CUDA
    adam = {"betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0, "fused": fused}
    groups = [
        {"params": by_role["embedding"], "lr": train.lr_embed, "role": "embedding"},
        {"params": by_role["control"], "lr": train.lr_scalar, "role": "control"},
        {"params": by_role["per_pass"], "lr": train.lr_scalar, "role": "per_pass"},
    ]
    groups = [g for g in groups if g["params"]]
    if train.optimizer == "muon":
        muon = torch.optim.Muon(
            by_role["matrix"], lr=train.lr_matrix, weight_decay=train.weight_decay, momentum=0.95,
            adjust_lr_fn="original",
        )
        muon.param_groups[0]["role"] = "matrix"
        optimizers: list[torch.optim.Optimizer] = [muon, torch.optim.AdamW(groups, **adam)]
    else:
        groups.append(
            {"params": by_role["matrix"], "lr": train.lr_matrix, "weight_decay": train.weight_decay, "role": "matrix"}
        )
        optimizers = [torch.optim.AdamW(groups, **adam)]
    for opt in optimizers:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers
