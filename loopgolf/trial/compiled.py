"""A trial compiled: whether it is, the compiled forward, and every graph built before the clock.

Compiled (`compile`), a trial builds every graph the clock will run before training starts
(`prime_compiled`), so a compile on the clock is a bug, not a cost. On one CUDA device the
host reads the loss only every LOSS_READ_EVERY steps: each read waits for the device.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from loopgolf.trial.config import TrialConfig
from loopgolf.trial.distributed import DataParallel
from loopgolf.trial.evaluate import autocast_for
from loopgolf.trial.model import RecurrentLM


def compiles(config: TrialConfig, device: torch.device) -> bool:
    """Whether the trial runs torch.compile'd: `compile`, with "auto" meaning on CUDA.

    Routed trials too: compiled, the model refines in a padded layout whose per-row
    capacity is one of a few rungs (model.refine_capacities), so the graphs are bounded
    and priming builds them all before the clock starts.
    """
    choice = config.train.compile
    if choice == "auto":
        return device.type == "cuda"
    return choice == "on"


COMPILE_BACKEND: str | Callable[..., Any] = "inductor"  # torch.compile's backend (tests count graphs with their own)
LOSS_READ_EVERY = 10  # compiled CUDA steps between host reads of the loss (each read waits for the device)


def compiled_forward(model: torch.nn.Module) -> Callable[..., Any]:
    """The model torch.compile'd. dynamic=False: every shape is static, so each rung of the
    padded capacity is its own graph (prime_compiled builds them all)."""
    return torch.compile(model, dynamic=False, backend=COMPILE_BACKEND)


def loss_read_every(device: torch.device, parallel: DataParallel | None) -> int:
    """Steps between reads of the loss: every step on a CPU (its ops finish as they run, so a
    read costs nothing) and in data parallel (ranks agree on the clock and the router's
    threshold every step); LOSS_READ_EVERY on one CUDA device, which runs ahead of the host."""
    return LOSS_READ_EVERY if device.type == "cuda" and parallel is None else 1


def prime_compiled(
    forward: Callable[..., Any],
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    batch: tuple[np.ndarray, np.ndarray],
    device: torch.device,
    config: TrialConfig,
) -> None:
    """Compile every graph the clock will run outside it, then roll the steps back: the core
    looped and not, and with refinement every rung of the padded capacity (forced per step,
    whatever the batch selects)."""
    assert isinstance(model, RecurrentLM)
    saved_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
    saved_opts = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
    saved_draws = model.train_draws
    x, y = (torch.from_numpy(a).to(device) for a in batch)
    rungs: tuple[int | None, ...] = (None,)
    if config.model.refine_passes:
        rungs = model.refine_capacities(x.size(1))
    for looping in [True] if config.model.loop_start == 0.0 else [False, True]:
        model.set_looping(looping)
        for rung in rungs:
            model.capacity_override = rung
            with autocast_for(device):
                out = forward(x, y)
                (out.loss + config.model.aux_loss * out.base_loss).backward()
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
    model.capacity_override = None
    model.train_draws = saved_draws
    model.load_state_dict(saved_model)
    for opt, state in zip(optimizers, saved_opts, strict=True):
        opt.load_state_dict(state)
