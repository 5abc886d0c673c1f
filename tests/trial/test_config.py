"""trial/config.py: every validation rule of every field, the flat view, overrides, presets.

The rule tables hold one row per rule: the first value past the bound, with the whole
one-line message it must produce; a second table holds the bound itself, which must be
accepted. Together they pin both the comparison and its direction.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, get_args

import pytest

from loopgolf.errors import LoopgolfError
from loopgolf.trial.config import (
    FIELD_SECTION,
    FIXED_SIGNALS,
    PRESETS,
    ROUTED_SIGNALS,
    CompressConfig,
    ConfigError,
    ModelConfig,
    RouterSignal,
    TrainConfig,
    TrialConfig,
    coerce_field,
    load_trial_config,
    parse_override,
    preset,
    read_yaml_mapping,
)

SECTIONS = {"model": ModelConfig, "compress": CompressConfig, "train": TrainConfig}


def _rejects(cls: type, fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        cls(**fields)
    assert str(info.value) == message
    assert isinstance(info.value, LoopgolfError)


# ----------------------------------------------------------------- ModelConfig rules

MODEL_REJECTED = [
    # type rules (one field of each annotation)
    ({"d_model": 128.0}, "ModelConfig.d_model=128.0: expected an integer"),
    ({"n_blocks": True}, "ModelConfig.n_blocks=True: expected an integer"),
    ({"seq_len": "256"}, "ModelConfig.seq_len='256': expected an integer"),
    ({"mlp_mult": "2"}, "ModelConfig.mlp_mult='2': expected a finite number"),
    ({"mlp_mult": True}, "ModelConfig.mlp_mult=True: expected a finite number"),
    ({"rope_base": math.inf}, "ModelConfig.rope_base=inf: expected a finite number"),
    ({"logit_softcap": math.nan}, "ModelConfig.logit_softcap=nan: expected a finite number"),
    ({"unet_skips": 1}, "ModelConfig.unet_skips=1: expected true or false"),
    ({"tie_embeddings": "yes"}, "ModelConfig.tie_embeddings='yes': expected true or false"),
    # integers >= 1
    ({"vocab_size": 0}, "ModelConfig.vocab_size=0: expected an integer >= 1"),
    ({"d_model": 0, "n_heads": 1}, "ModelConfig.d_model=0: expected an integer >= 1"),
    ({"n_heads": 0}, "ModelConfig.n_heads=0: expected an integer >= 1"),
    ({"n_kv_heads": 0}, "ModelConfig.n_kv_heads=0: expected an integer >= 1"),
    ({"n_blocks": 0}, "ModelConfig.n_blocks=0: expected an integer >= 1"),
    ({"n_passes": 0}, "ModelConfig.n_passes=0: expected an integer >= 1"),
    ({"seq_len": 0}, "ModelConfig.seq_len=0: expected an integer >= 1"),
    ({"vocab_size": 65_537}, "ModelConfig.vocab_size=65537: expected <= 65536 (shards store uint16 tokens)"),
    # integers >= 0
    ({"n_prelude": -1}, "ModelConfig.n_prelude=-1: expected an integer >= 0"),
    ({"n_coda": -1}, "ModelConfig.n_coda=-1: expected an integer >= 0"),
    ({"refine_passes": -1}, "ModelConfig.refine_passes=-1: expected an integer >= 0"),
    # head geometry
    ({"d_model": 130, "n_heads": 4}, "ModelConfig.d_model=130: expected a multiple of n_heads=4"),
    ({"d_model": 12, "n_heads": 4, "n_kv_heads": 1}, "ModelConfig.d_model=12: expected an even head dim (d_model / n_heads) for RoPE"),  # noqa: E501
    ({"n_heads": 4, "n_kv_heads": 3}, "ModelConfig.n_kv_heads=3: expected a divisor of n_heads=4"),
    # ranges of the floats
    ({"mlp_mult": 0.0}, "ModelConfig.mlp_mult=0.0: expected > 0"),
    ({"logit_softcap": -0.5}, "ModelConfig.logit_softcap=-0.5: expected >= 0"),
    ({"rope_base": 1.0}, "ModelConfig.rope_base=1.0: expected > 1"),
    ({"loop_start": 1.0}, "ModelConfig.loop_start=1.0: expected a fraction in [0, 1)"),
    ({"loop_start": -0.1}, "ModelConfig.loop_start=-0.1: expected a fraction in [0, 1)"),
    ({"lora_rank": 0}, "ModelConfig.lora_rank=0: expected an integer >= 1"),
    ({"refine_target": 0.0}, "ModelConfig.refine_target=0.0: expected a fraction in (0, 1]"),
    ({"refine_target": 1.5}, "ModelConfig.refine_target=1.5: expected a fraction in (0, 1]"),
    ({"refine_cap": 0.2}, "ModelConfig.refine_cap=0.2: expected a fraction in [refine_target=0.25, 1]"),
    ({"refine_cap": 1.5}, "ModelConfig.refine_cap=1.5: expected a fraction in [refine_target=0.25, 1]"),
    ({"aux_loss": -0.1}, "ModelConfig.aux_loss=-0.1: expected >= 0"),
]

# The bound of every rule above, which must pass.
MODEL_ACCEPTED = [
    {"vocab_size": 1},
    {"vocab_size": 65_536},
    {"d_model": 2, "n_heads": 1, "n_kv_heads": 1},
    {"n_heads": 1, "n_kv_heads": 1, "d_model": 2},
    {"n_blocks": 1, "n_passes": 1, "seq_len": 1},
    {"n_prelude": 0, "n_coda": 0, "refine_passes": 0},
    {"n_heads": 4, "n_kv_heads": 4},
    {"n_heads": 4, "n_kv_heads": 1},
    {"mlp_mult": 0.01},
    {"mlp_mult": 3},  # an int where a float is expected is a number
    {"logit_softcap": 0.0},
    {"rope_base": 1.5},
    {"loop_start": 0.0},
    {"loop_start": 0.99},
    {"lora_rank": 1},
    {"refine_target": 1.0, "refine_cap": 1.0},
    {"refine_target": 0.3, "refine_cap": 0.3},
    {"refine_target": 0.01, "refine_cap": 0.01},
    {"aux_loss": 0.0},
]


@pytest.mark.parametrize(("fields", "message"), MODEL_REJECTED)
def test_model_config_rejects_with_one_line_naming_field_value_and_rule(fields: dict, message: str) -> None:
    _rejects(ModelConfig, fields, message)


@pytest.mark.parametrize("fields", MODEL_ACCEPTED)
def test_model_config_accepts_each_bound(fields: dict) -> None:
    config = ModelConfig(**fields)
    assert {k: getattr(config, k) for k in fields} == fields


@pytest.mark.parametrize(
    ("field", "value"), [("activation", "tanh"), ("phase", "full"), ("signal", "zzz")]
)
def test_model_literal_fields_name_their_choices(field: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        ModelConfig(**{field: value})
    text = str(info.value)
    assert text.startswith(f"ModelConfig.{field}={value!r}: expected one of [")
    default = getattr(ModelConfig(), field)
    assert repr(default) in text  # the valid choices are listed


def test_model_derived_sizes() -> None:
    config = ModelConfig(d_model=96, n_heads=3, n_kv_heads=1, mlp_mult=2.5, n_prelude=1, n_blocks=3,
                         n_passes=4, n_coda=2)  # fmt: skip
    assert (config.head_dim, config.mlp_hidden, config.effective_depth) == (32, 240, 1 + 12 + 2)


# -------------------------------------------------------------- CompressConfig rules

COMPRESS_REJECTED = [
    ({"bits": 7}, "CompressConfig.bits=7: expected one of [4, 5, 6, 8]"),
    ({"bits": 3}, "CompressConfig.bits=3: expected one of [4, 5, 6, 8]"),
    ({"bits": 16}, "CompressConfig.bits=16: expected one of [4, 5, 6, 8]"),
    ({"bits": 8.0}, "CompressConfig.bits=8.0: expected an integer"),
    ({"protect_bits": 4}, "CompressConfig.protect_bits=4: expected 8 or 16"),
    ({"protect_bits": 12}, "CompressConfig.protect_bits=12: expected 8 or 16"),
    ({"clip_sigma": -0.5}, "CompressConfig.clip_sigma=-0.5: expected >= 0"),
    ({"small_tensor_numel": -1}, "CompressConfig.small_tensor_numel=-1: expected >= 0"),
    ({"max_artifact_bytes": 0}, "CompressConfig.max_artifact_bytes=0: expected >= 1"),
    ({"protect": ("",)}, "CompressConfig.protect=('',): expected a list of parameter-name globs"),
    ({"protect": ("a", 3)}, "CompressConfig.protect=('a', 3): expected a list of parameter-name globs"),
    ({"allow_over_cap": "no"}, "CompressConfig.allow_over_cap='no': expected true or false"),
]
COMPRESS_ACCEPTED = [
    {"bits": 4}, {"bits": 5}, {"bits": 6}, {"bits": 8},
    {"protect_bits": 8}, {"protect_bits": 16},
    {"clip_sigma": 0.0}, {"small_tensor_numel": 0}, {"max_artifact_bytes": 1},
    {"protect": ()}, {"protect": ("tok_emb.weight", "blocks.*")},
]  # fmt: skip


@pytest.mark.parametrize(("fields", "message"), COMPRESS_REJECTED)
def test_compress_config_rejects_with_one_line(fields: dict, message: str) -> None:
    _rejects(CompressConfig, fields, message)


@pytest.mark.parametrize("fields", COMPRESS_ACCEPTED)
def test_compress_config_accepts_each_bound(fields: dict) -> None:
    config = CompressConfig(**fields)
    assert {k: getattr(config, k) for k in fields} == fields


@pytest.mark.parametrize(("field", "value"), [("codec", "zzz"), ("qat", "full")])
def test_compress_literal_fields_name_their_choices(field: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        CompressConfig(**{field: value})
    assert str(info.value).startswith(f"CompressConfig.{field}={value!r}: expected one of [")
    assert repr(getattr(CompressConfig(), field)) in str(info.value)


@pytest.mark.parametrize(
    ("given", "stored"), [(["a", "b.*"], ("a", "b.*")), ("tok_emb.weight", ("tok_emb.weight",)), ((), ())]
)
def test_protect_from_yaml_lists_and_single_names_becomes_a_tuple(given: Any, stored: tuple) -> None:
    config = CompressConfig(protect=given)
    assert config.protect == stored and isinstance(config.protect, tuple)


# ----------------------------------------------------------------- TrainConfig rules

TRAIN_REJECTED = [
    ({"train_seconds": 0.0}, "TrainConfig.train_seconds=0.0: expected > 0"),
    ({"batch_size": 0}, "TrainConfig.batch_size=0: expected an integer >= 1"),
    ({"lr_matrix": 0.0}, "TrainConfig.lr_matrix=0.0: expected > 0"),
    ({"lr_embed": 0.0}, "TrainConfig.lr_embed=0.0: expected > 0"),
    ({"lr_scalar": 0.0}, "TrainConfig.lr_scalar=0.0: expected > 0"),
    ({"weight_decay": -0.1}, "TrainConfig.weight_decay=-0.1: expected >= 0"),
    ({"grad_clip": -0.1}, "TrainConfig.grad_clip=-0.1: expected >= 0"),
    ({"max_eval_seconds": -0.1}, "TrainConfig.max_eval_seconds=-0.1: expected >= 0"),
    ({"max_steps": -1}, "TrainConfig.max_steps=-1: expected an integer >= 0"),
    ({"warmup_steps": -1}, "TrainConfig.warmup_steps=-1: expected an integer >= 0"),
    ({"eval_tokens": -1}, "TrainConfig.eval_tokens=-1: expected an integer >= 0"),
    ({"quick_eval_tokens": -1}, "TrainConfig.quick_eval_tokens=-1: expected an integer >= 0"),
    ({"seed": -1}, "TrainConfig.seed=-1: expected an integer >= 0"),
    ({"warmdown_frac": -0.1}, "TrainConfig.warmdown_frac=-0.1: expected a fraction in [0, 1]"),
    ({"warmdown_frac": 1.1}, "TrainConfig.warmdown_frac=1.1: expected a fraction in [0, 1]"),
    ({"report_every_seconds": 0.0}, "TrainConfig.report_every_seconds=0.0: expected > 0"),
    ({"checkpoint_every_seconds": 0.0}, "TrainConfig.checkpoint_every_seconds=0.0: expected > 0"),
    ({"batch_size": 8.0}, "TrainConfig.batch_size=8.0: expected an integer"),
    ({"compile": "false"}, "TrainConfig.compile='false': expected one of ['auto', 'on', 'off']"),
]
TRAIN_ACCEPTED = [
    {"train_seconds": 0.001}, {"batch_size": 1},
    {"lr_matrix": 1e-6, "lr_embed": 1e-6, "lr_scalar": 1e-6},
    {"weight_decay": 0.0, "grad_clip": 0.0, "max_eval_seconds": 0.0},
    {"max_steps": 0, "warmup_steps": 0, "eval_tokens": 0, "quick_eval_tokens": 0, "seed": 0},
    {"warmdown_frac": 0.0}, {"warmdown_frac": 1.0},
    {"report_every_seconds": 0.01, "checkpoint_every_seconds": 0.01},
]  # fmt: skip


@pytest.mark.parametrize(("fields", "message"), TRAIN_REJECTED)
def test_train_config_rejects_with_one_line(fields: dict, message: str) -> None:
    _rejects(TrainConfig, fields, message)


@pytest.mark.parametrize("fields", TRAIN_ACCEPTED)
def test_train_config_accepts_each_bound(fields: dict) -> None:
    config = TrainConfig(**fields)
    assert {k: getattr(config, k) for k in fields} == fields


@pytest.mark.parametrize(("field", "value"), [("optimizer", "sgd"), ("device", "tpu")])
def test_train_literal_fields_name_their_choices(field: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        TrainConfig(**{field: value})
    assert str(info.value).startswith(f"TrainConfig.{field}={value!r}: expected one of [")
    assert repr(getattr(TrainConfig(), field)) in str(info.value)


# ------------------------------------------------------------------ the flat view


def test_every_field_belongs_to_exactly_its_section() -> None:
    expected = {f.name: section for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert dict(FIELD_SECTION) == expected
    assert sum(len(dataclasses.fields(cls)) for cls in SECTIONS.values()) == len(FIELD_SECTION)


@pytest.mark.parametrize("section", ["model", "compress", "train"])
def test_trial_config_rejects_a_section_of_the_wrong_type(section: str) -> None:
    wrong = {"model": CompressConfig(), "compress": TrainConfig(), "train": ModelConfig()}[section]
    expected = SECTIONS[section].__name__
    with pytest.raises(ConfigError) as info:
        TrialConfig(**{section: wrong})
    assert str(info.value) == f"TrialConfig.{section}={wrong!r}: expected a {expected}"


def test_from_flat_sets_each_field_in_its_section_on_top_of_the_base() -> None:
    base = preset("tiny").replace(seed=7)
    config = TrialConfig.from_flat({"n_blocks": 3, "codec": "lzma", "batch_size": 4}, base=base)
    assert (config.model.n_blocks, config.compress.codec, config.train.batch_size) == (3, "lzma", 4)
    assert config.model.d_model == 64 and config.train.seed == 7  # the base's other fields stay
    assert TrialConfig.from_flat({}) == TrialConfig()


def test_to_flat_round_trips_and_writes_tuples_as_lists() -> None:
    config = preset("middle_loop").replace(protect=("tok_emb.weight",), lr_embed=0.05, codec="zstd")
    flat = config.to_flat()
    assert set(flat) == set(FIELD_SECTION)
    assert flat["protect"] == ["tok_emb.weight"] and flat["n_coda"] == 3 and flat["lr_embed"] == 0.05
    assert TrialConfig.from_flat(flat) == config


@pytest.mark.parametrize("field", ["n_blockz", "Seed", "model"])
def test_an_unknown_flat_field_is_an_error_not_ignored(field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^unknown config field {field!r}: expected one of \["):
        TrialConfig().replace(**{field: 1})
    with pytest.raises(ConfigError, match="unknown config field"):
        coerce_field(field, 1)


def test_replace_validates_the_new_value() -> None:
    with pytest.raises(ConfigError, match=r"^ModelConfig\.n_passes=0: expected an integer >= 1$"):
        TrialConfig().replace(n_passes=0)


# ---------------------------------------------------------------- overrides and files


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("n_blocks=3", ("n_blocks", 3)),
        (" mlp_mult = 2.5 ", ("mlp_mult", 2.5)),
        ("compile=true", ("compile", True)),
        ("protect=[a, b]", ("protect", ["a", "b"])),
        ("codec=zstd", ("codec", "zstd")),
        ("codec=", ("codec", "")),
        ("name=a=b", ("name", "a=b")),
    ],
)
def test_parse_override_reads_the_value_as_yaml(text: str, parsed: tuple) -> None:
    assert parse_override(text) == parsed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("n_blocks", "override 'n_blocks': expected key=value"),
        ("=3", "override '=3': expected key=value"),
        (" =3", "override ' =3': expected key=value"),
        ("protect=[a", "override 'protect=[a': value is not valid YAML (ParserError)"),
    ],
)
def test_parse_override_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_override(text)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("key", "value", "coerced"),
    [
        ("mlp_mult", 2, 2.0),  # an int for a float field becomes a float
        ("d_model", 128.0, 128),  # an integral float for an int field becomes an int
        ("d_model", 128.5, 128.5),  # not integral: left for validation to refuse
        ("mlp_mult", True, True),  # a bool is not a number to coerce
        ("d_model", True, True),
        ("codec", "zstd", "zstd"),
        ("n_blocks", 3, 3),
    ],
)
def test_coerce_field(key: str, value: Any, coerced: Any) -> None:
    result = coerce_field(key, value)
    assert result == coerced and type(result) is type(coerced)


def test_read_yaml_mapping_errors_name_the_file(tmp_path: Path) -> None:
    class Custom(LoopgolfError):
        pass

    missing = tmp_path / "none.yaml"
    with pytest.raises(Custom, match=rf"^thing '{re.escape(str(missing))}': file not found$"):
        read_yaml_mapping(missing, "thing", Custom)
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1\n")
    with pytest.raises(ConfigError, match=r"^trial config '.*bad\.yaml': not valid YAML \(ParserError\)$"):
        read_yaml_mapping(bad, "trial config")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml': expected a mapping of field: value, got list$"):
        read_yaml_mapping(listing, "trial config")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert read_yaml_mapping(empty, "trial config") == {}


def test_load_trial_config_applies_preset_file_values_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "trial.yaml"
    path.write_text("preset: middle_loop\nmlp_mult: 3\nd_model: 96.0\nn_heads: 3\nn_kv_heads: 1\nbits: 6\n")
    config = load_trial_config(str(path), ["bits=4", "train_seconds=5", "protect=tok_emb.weight"])
    assert config.model.n_prelude == 3 and config.model.n_coda == 3  # from the preset
    assert config.model.mlp_mult == 3.0 and isinstance(config.model.mlp_mult, float)
    assert config.model.d_model == 96 and isinstance(config.model.d_model, int)
    assert config.compress.bits == 4  # the override wins over the file
    assert config.train.train_seconds == 5.0 and isinstance(config.train.train_seconds, float)
    assert config.compress.protect == ("tok_emb.weight",)
    plain = tmp_path / "plain.yaml"
    plain.write_text("n_blocks: 3\n")
    assert load_trial_config(str(plain)) == TrialConfig().replace(n_blocks=3)


def test_load_trial_config_rejects_an_unknown_field_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "trial.yaml"
    path.write_text("n_blockz: 3\n")
    with pytest.raises(ConfigError, match="unknown config field 'n_blockz'"):
        load_trial_config(str(path))
    with pytest.raises(ConfigError, match=r"^trial config '.*none\.yaml': file not found$"):
        load_trial_config(str(tmp_path / "none.yaml"))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_its_shape_on_the_defaults(name: str) -> None:
    config = preset(name)
    flat = config.to_flat()
    assert {k: flat[k] for k in PRESETS[name]} == dict(PRESETS[name])
    defaults = TrialConfig().to_flat()
    assert {k: v for k, v in flat.items() if k not in PRESETS[name]} == {
        k: v for k, v in defaults.items() if k not in PRESETS[name]
    }


def test_the_challenge_baseline_preset() -> None:
    model = preset("pg_baseline").model
    assert (model.d_model, model.n_heads, model.n_kv_heads, model.n_blocks, model.n_passes) == (512, 8, 4, 9, 1)
    assert model.unet_skips and model.tie_embeddings and model.seq_len == 1024 and model.effective_depth == 9


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match=r"^preset 'huge': expected one of \['d256', 'middle_loop'"):
        preset("huge")


def test_the_signal_types_partition_the_router_signal() -> None:
    """RouterSignal is the routed and the fixed signals together, in that order, each once."""
    assert get_args(RouterSignal) == ROUTED_SIGNALS + FIXED_SIGNALS
    assert not set(ROUTED_SIGNALS) & set(FIXED_SIGNALS)
