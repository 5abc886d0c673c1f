"""Partial sharing (`share`): attention shared with an MLP per pass, or the reverse.

Counts against an independent count (a `share: all` model of the same shape plus the untied
copies, built as modules), the state dict against estimate.py's inventory, causality with
routing in each mode, the artifact roundtrip, the optimizer roles, loop_start, and
equal-bytes fill at 1 MB and 16 MB. The dense refinement oracle covers each mode in
test_refine_oracle.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from loopgolf.search_spaces import spaces
from loopgolf.search_spaces.budget import EQUAL_BYTES_MARGIN, FILL, bytes_with_margin
from loopgolf.trial import artifact as A
from loopgolf.trial.blocks import MLP, Attention
from loopgolf.trial.config import ModelConfig, TrialConfig, preset
from loopgolf.trial.estimate import count_params, inventory, predict_artifact_bytes
from loopgolf.trial.model import RecurrentLM
from loopgolf.trial.optim import parameter_role

MODES = ("attn", "mlp")


def shape(share: str, **changes: object) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, n_prelude=1, n_blocks=2, n_passes=3, n_coda=1,
                seq_len=24, phase="lora", lora_rank=2, refine_passes=1, unet_skips=True, share=share)  # fmt: skip
    return ModelConfig(**{**base, **changes})  # type: ignore[arg-type]


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("share", MODES)
@pytest.mark.parametrize(("n_blocks", "n_passes"), [(1, 2), (2, 3), (3, 4), (2, 1)])
def test_params_are_the_fully_shared_model_plus_the_untied_copies(share: str, n_blocks: int, n_passes: int) -> None:
    config = shape(share, n_blocks=n_blocks, n_passes=n_passes)
    full = RecurrentLM(dataclasses.replace(config, share="all"))
    part = MLP(config) if share == "attn" else Attention(config)
    expected = full.unique_params() + (n_passes - 1) * n_blocks * numel(part)
    model = RecurrentLM(config)
    assert model.unique_params() == expected == count_params(config).total
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {s.name: s.shape for s in inventory(config)}
    untied = sorted({k.split(".")[1] for k in model.state_dict() if k.startswith("untied.")})
    assert untied == [f"pass{p}" for p in range(1, n_passes)]  # the names say which pass a tensor is
    assert model.effective_params() == full.effective_params()  # the unrolled path is the same size


@pytest.mark.parametrize("share", MODES)
def test_each_pass_uses_its_own_part_and_refinement_the_last_passes(share: str) -> None:
    model = RecurrentLM(shape(share))
    assert model.own_parts(0, 1) is None
    assert model.own_parts(1, 1) is model.untied["pass1"][1] and model.own_parts(2, 0) is model.untied["pass2"][0]
    assert model.own_parts(3, 0) is model.untied["pass2"][0]  # refinement pass 0 (p = n_passes)
    kind = MLP if share == "attn" else Attention
    assert all(isinstance(m, kind) for passes in model.untied.values() for m in passes)
    model.train()
    model.set_looping(False)  # before loop_start: the core runs once, with pass 0's parts
    assert model.own_parts(1, 0) is None


@pytest.mark.parametrize("share", MODES)
@pytest.mark.parametrize("signal", ["entropy", "kl", "random"])
def test_routed_refinement_is_causal_in_each_mode(share: str, signal: str) -> None:
    config = shape(share, signal=signal, refine_passes=2, refine_target=0.3, refine_cap=0.3)
    torch.manual_seed(0)
    model = RecurrentLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.router_threshold.fill_(-1e9)  # every token passes; the causal cap decides
    model.eval()
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, config.vocab_size, (2, config.seq_len), generator=gen)
    model.restart_draws()
    out = model(idx)
    assert out.refined is not None and 0 < out.refined.sum() < out.refined.numel()
    for t in (0, 7, config.seq_len - 2):
        other = idx.clone()
        other[:, t + 1 :] = torch.randint(0, config.vocab_size, other[:, t + 1 :].shape, generator=gen)
        model.restart_draws()
        alt = model(other)
        assert torch.equal(out.refined[:, : t + 1], alt.refined[:, : t + 1])  # type: ignore[index]
        torch.testing.assert_close(out.logits[:, : t + 1], alt.logits[:, : t + 1], atol=1e-10, rtol=0)


@pytest.mark.parametrize("share", MODES)
def test_the_artifact_roundtrips_each_mode_and_refuses_another_mode(share: str, tmp_path: Path) -> None:
    config = TrialConfig(model=shape(share)).replace(bits=6, codec="zlib", small_tensor_numel=256)
    torch.manual_seed(0)
    model = RecurrentLM(config.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.router_threshold.fill_(0.5)
    A.save_artifact(model, config, tmp_path / "a.lga")
    loaded, loaded_config = A.load_artifact_with_config(tmp_path / "a.lga")
    assert loaded_config == config and loaded_config.model.share == share
    assert loaded.state_dict().keys() == model.state_dict().keys()
    x = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.isfinite(loaded(x).logits).all()
    other = RecurrentLM(dataclasses.replace(config.model, share="all"))
    with pytest.raises(RuntimeError, match="untied"):  # a config/weights mismatch is refused, as for any field
        other.load_state_dict(loaded.state_dict())


@pytest.mark.parametrize("share", MODES)
def test_untied_matrices_are_muon_matrices(share: str) -> None:
    roles = parameter_role(RecurrentLM(shape(share)))
    untied = {name: role for name, role in roles.items() if name.startswith("untied.")}
    assert untied and all(role == ("control" if name.endswith("q_gain") else "matrix") for name, role in untied.items())


@pytest.mark.parametrize("share", ["all", *MODES])
@pytest.mark.parametrize("cap", [1_000_000, 16_000_000])
def test_equal_bytes_fills_the_cap_in_each_mode(share: str, cap: int) -> None:
    """The solver trades width against the untied parts: each mode fills the same cap, and
    the partially shared model is narrower than the fully shared one of the same shape."""
    base = preset("small").replace(bits=6, codec="lzma")
    values = {"n_blocks": 2, "n_passes": 3, "n_prelude": 0, "n_coda": 0, "d_model": 64, "share": share}
    solved = spaces.derive(values, base, equal_bytes=True, byte_budget=cap)
    assert solved.model.share == share
    fill = bytes_with_margin(solved, EQUAL_BYTES_MARGIN) / cap
    assert FILL <= fill <= 1.0, (share, cap, fill)
    assert predict_artifact_bytes(solved) <= cap
    if share != "all":
        full = spaces.derive(values | {"share": "all"}, base, equal_bytes=True, byte_budget=cap)
        assert (solved.model.d_model, solved.model.mlp_hidden) < (full.model.d_model, full.model.mlp_hidden)


def test_a_configuration_says_what_its_passes_share() -> None:
    from loopgolf.analysis.evidence import describe_config  # the analysis layer: only where a test needs it

    row = {"d_model": 256, "n_prelude": 0, "n_blocks": 2, "n_passes": 3, "n_coda": 0, "bits": 6, "codec": "lzma"}
    assert describe_config(row | {"share": "attn"}) == "d256 0+2x3+0 share:attn int6/lzma"
    assert describe_config(row | {"share": "all"}) == describe_config(row) == "d256 0+2x3+0 int6/lzma"
    assert describe_config(row | {"share": "mlp", "n_passes": 1}) == "d256 0+2x1+0 int6/lzma"  # nothing untied
