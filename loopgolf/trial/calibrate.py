"""After training: calibrate a routed signal's threshold so evaluation refines refine_target.

The EMA threshold of training tracks batch quantiles of a moving model; evaluation needs
the threshold of the model as it will be evaluated (for the artifact: its dequantized
weights), at the fraction the arm promises, after the causal cap. Calibration reads
router scores on held-out *training* tokens (never val: the threshold must not see the
text it is scored on) and sets the threshold whose refined fraction there is nearest
refine_target (routing.threshold_for_fraction). Control arms (uniform, stride, random) need
no calibration: their fraction is fixed by construction.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from loopgolf.trial.config import FIXED_SIGNALS, TrialConfig
from loopgolf.trial.data import DataError
from loopgolf.trial.evaluate import autocast_for
from loopgolf.trial.model import RecurrentLM
from loopgolf.trial.routing import threshold_for_fraction


def needs_calibration(model: RecurrentLM) -> bool:
    return model.config.refine_passes > 0 and model.config.signal not in FIXED_SIGNALS


@torch.inference_mode()
def calibrate_router(model: RecurrentLM, windows: np.ndarray, *, batch_size: int, device: torch.device) -> float:
    """Set `model.router_threshold` from scores on `windows` (held-out training text, rows of
    seq_len + 1 tokens: `TrainBatches.heldout_windows`); return it.

    Scores are read in eval mode, under the autocast evaluation uses, on windows of the
    length evaluation scores.
    """
    if not needs_calibration(model):
        raise ValueError(f"calibrate_router: signal={model.config.signal!r} has no threshold to calibrate")
    was_training = model.training
    model.eval()
    scores = []
    for first in range(0, len(windows), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(windows[first : first + batch_size, :-1]))
        with autocast_for(device):
            scores.append(model.router_scores(x.to(device)).float())
    model.train(was_training)
    c = model.config
    threshold = threshold_for_fraction(torch.cat(scores).cpu(), c.refine_target, c.refine_cap)
    model.router_threshold.fill_(threshold)
    return threshold


def threshold_metrics(
    model: RecurrentLM, windows: np.ndarray, config: TrialConfig, device: torch.device
) -> dict[str, Any]:
    """Calibrate a routed threshold on the held-out training `windows`; {} for the control arms.

    Keys: refine_threshold (the calibrated value) and calibration_tokens (tokens it read).
    """
    if not needs_calibration(model):
        return {}
    if len(windows) == 0:
        raise DataError(
            f"calibration_tokens={config.train.calibration_tokens}: held out no window of "
            f"seq_len+1={config.model.seq_len + 1} training tokens to calibrate signal={config.model.signal!r}"
        )
    threshold = calibrate_router(model, windows, batch_size=config.train.batch_size, device=device)
    return {"refine_threshold": threshold, "calibration_tokens": int(windows[:, :-1].size)}
