"""The width solver: heads derived from width, and the widest width that fits a byte
budget after real compression.

    python -m pytest tests/test_budget.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loopgolf.search_spaces import budget
from loopgolf.search_spaces.budget import BudgetError, derive_heads, solve_width
from loopgolf.trial.artifact import code_bytes, save_artifact
from loopgolf.trial.config import ModelConfig, preset
from loopgolf.trial.estimate import bytes_with_margin
from loopgolf.trial.model import RecurrentLM

# ------------------------------------------------------------------------ widths


@pytest.mark.parametrize(
    ("d_model", "kv_ratio", "expected"),
    [(512, 2, (8, 4)), (256, 2, (4, 2)), (128, 2, (4, 2)), (64, 2, (4, 2)), (384, 2, (6, 3)),
     (320, 2, (5, 1)), (1024, 4, (16, 4)), (768, 1, (12, 12)), (8, 2, (4, 2))],
)
def test_derive_heads_table(d_model: int, kv_ratio: int, expected: tuple[int, int]) -> None:
    assert derive_heads(d_model, 64, kv_ratio, 4) == expected


def test_every_grid_width_makes_a_valid_config() -> None:
    for d in budget.width_grid(64, 4, 2048):
        n_heads, n_kv = derive_heads(d, 64, 2, 4)
        ModelConfig(d_model=d, n_heads=n_heads, n_kv_heads=n_kv)  # validates
    with pytest.raises(ValueError, match="multiple of head_dim"):
        derive_heads(300)
    with pytest.raises(ValueError, match="multiple of 8"):
        derive_heads(100)


SOLVE_CASES = [
    ("tiny", {"bits": 6, "codec": "zstd"}, 150_000),
    ("small", {"bits": 4, "codec": "brotli", "small_tensor_numel": 4096}, 400_000),
    ("middle_loop", {"bits": 8, "codec": "zlib", "phase": "scale", "unet_skips": True}, 900_000),
    ("small", {"bits": 5, "codec": "lzma", "tie_embeddings": False, "refine_passes": 1,
               "protect": ["tok_emb.weight"]}, 700_000),
]


@pytest.mark.parametrize(("name", "overrides", "model_budget"), SOLVE_CASES)
def test_solved_width_fits_after_real_compression(
    name: str, overrides: dict[str, object], model_budget: int, tmp_path: Path
) -> None:
    config = preset(name).replace(seq_len=64, **overrides)
    cap = model_budget + code_bytes()
    solved = solve_width(config, cap)
    torch.manual_seed(0)
    model = RecurrentLM(solved.model)
    with torch.no_grad():  # every tensor off its init, as after training (worse for fp16 gains)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    info = save_artifact(model, solved, tmp_path / "a.lga")
    assert info.artifact_bytes <= cap
    wider = next(d for d in budget.width_grid() if d > solved.model.d_model)
    n_heads, n_kv = derive_heads(wider, 64, config.model.n_heads // config.model.n_kv_heads)
    over = solved.replace(d_model=wider, n_heads=n_heads, n_kv_heads=n_kv)
    assert bytes_with_margin(over) > cap  # the widest that fits


def test_solve_width_says_when_nothing_fits() -> None:
    with pytest.raises(BudgetError, match=r"narrowest, d_model=8, is predicted at [\d,]+ bytes"):
        solve_width(preset("small"), code_bytes() + 1_000)
