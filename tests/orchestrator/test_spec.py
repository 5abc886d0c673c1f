"""orchestrator/spec.py: every rule of a sweep spec, its YAML layout, `--set` overrides, the space check.

In-process and without Ray: a spec needs only a prepared data directory. The
CLI's side of the same errors (one line on stderr, no sweep directory) is in test_sweep.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from loopgolf.orchestrator.spec import METRICS, SpecError, SweepSpec
from loopgolf.orchestrator.spec_file import load_spec, spec_from_dict
from loopgolf.search_spaces.spaces import SpaceError, apply_overrides, named_space, smallest_predicted_bytes
from loopgolf.trial.config import ConfigError, TrialConfig


@pytest.fixture
def data(corpus_data: Path) -> Path:
    """A prepared data directory (the suite's built-in corpus): specs check its manifest and shards."""
    return corpus_data


def spec(data: Path, **fields: Any) -> SweepSpec:
    return SweepSpec(**({"name": "s", "data": data} | fields))


ALL_METRICS = ", ".join(METRICS)
ONE_GPU = "expected 0 or 1 (GPUs per worker; each data-parallel rank drives one whole GPU)"

# One row per rule of SweepSpec.__post_init__: the first bad value and the whole message.
REJECTED = [
    ({"name": ""}, "name='': expected letters, digits, '-', '_' or '.' (not only dots)"),
    ({"name": "a b"}, "name='a b': expected letters, digits, '-', '_' or '.' (not only dots)"),
    ({"name": "a/b"}, "name='a/b': expected letters, digits, '-', '_' or '.' (not only dots)"),
    ({"algorithm": "cma"}, "search.algorithm='cma': expected one of tpe, nsga2, random, grid"),
    ({"objectives": {}}, f"search.objectives: expected at least one of {ALL_METRICS}"),
    ({"objectives": {"bpb": "min"}}, f"search.objectives: unknown metric 'bpb'; expected one of {ALL_METRICS}"),
    ({"objectives": {"val_bpb": "lowest"}}, "search.objectives.val_bpb='lowest': expected min or max"),
    ({"num_samples": 0}, "num_samples=0: expected an integer >= 1"),
    ({"num_samples": 2.0}, "num_samples=2.0: expected an integer >= 1"),
    ({"seeds": 0}, "seeds=0: expected an integer >= 1"),
    ({"max_concurrent": 0}, "max_concurrent=0: expected an integer >= 1"),
    ({"max_concurrent": "2"}, "max_concurrent='2': expected an integer >= 1"),
    ({"artifact_bytes": 0}, "budget.artifact_bytes=0: expected >= 1"),
    ({"train_seconds": 0.0}, "budget: expected train_seconds > 0 and eval_seconds >= 0"),
    ({"eval_seconds": -0.5}, "budget: expected train_seconds > 0 and eval_seconds >= 0"),
    ({"cpu": 0.0}, "resources: cpu=0.0, gpu=0.0: expected cpu > 0 and gpu >= 0"),
    ({"gpu": -1.0}, "resources: cpu=1.0, gpu=-1.0: expected cpu > 0 and gpu >= 0"),
    ({"workers": 0}, "resources.workers=0: expected an integer >= 1"),
    ({"workers": True}, "resources.workers=True: expected an integer >= 1"),
    ({"workers": 2.0}, "resources.workers=2.0: expected an integer >= 1"),
    ({"workers": 2, "gpu": 0.5}, f"resources.gpu=0.5 with workers=2: {ONE_GPU}"),
    ({"workers": 2, "gpu": 2.0}, f"resources.gpu=2.0 with workers=2: {ONE_GPU}"),
    ({"early_stopping": "hyperband"},
     "early_stopping='hyperband': expected null, asha or {algorithm: pareto_halving, ...}"),
    ({"early_stopping": "asha", "objectives": {"val_bpb": "min", "artifact_bytes": "min"}},
     "early_stopping=asha is refused with several objectives: ASHA ranks trials on one metric, and the trials it "
     "stops would enter the multi-objective study with truncated values"),
    ({"early_stopping": "asha", "objectives": {"artifact_bytes": "min"}},
     "early_stopping=asha needs objectives {val_bpb: min}: it compares quick val bpb over time"),
    ({"controls": ["dense"]},
     "controls: unknown arm 'dense'; expected a subset of ['no_refine', 'uniform', 'stride', 'random']"),
    ({"controls": "random"}, "controls='random': expected a list, a subset of ['no_refine', 'uniform', 'stride', "
     "'random']"),
]  # fmt: skip

# The bound of each rule, accepted.
ACCEPTED = [
    {"name": "a-b_c.1"},
    {"algorithm": "grid"}, {"algorithm": "nsga2"},
    {"objectives": {"val_bpb": "max", "refine_fraction": "min"}},
    {"num_samples": 1, "seeds": 1, "max_concurrent": 1},
    {"artifact_bytes": 1},
    {"train_seconds": 0.01, "eval_seconds": 0.0},
    {"cpu": 0.1, "gpu": 0.0},
    {"workers": 1, "gpu": 0.5},  # fractional GPUs are fine for one process
    {"workers": 2, "gpu": 1.0}, {"workers": 2, "gpu": 0.0},
    {"early_stopping": None}, {"early_stopping": "asha"},
    {"controls": None}, {"controls": ()}, {"controls": ("no_refine", "random")},
]  # fmt: skip


@pytest.mark.parametrize(("fields", "message"), REJECTED)
def test_every_spec_rule_fails_with_its_one_line(data: Path, fields: dict, message: str) -> None:
    with pytest.raises(SpecError) as info:
        spec(data, **fields)
    assert str(info.value) == message


@pytest.mark.parametrize("fields", ACCEPTED)
def test_the_bound_of_every_spec_rule_is_accepted(data: Path, fields: dict) -> None:
    made = spec(data, **fields)
    assert {k: getattr(made, k) for k in fields} == fields


def test_the_data_directory_must_be_prepared(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        spec(tmp_path / "none")
    prepare = "(run `loopgolf data prepare --out ...`)"
    assert str(info.value) == f"data={str(tmp_path / 'none')!r}: no such directory {prepare}"
    with pytest.raises(SpecError) as info:
        spec(tmp_path)
    assert str(info.value) == f"data={str(tmp_path)!r}: no manifest.json {prepare}"


@pytest.mark.parametrize(
    ("storage", "sweep_dir", "local"),
    [("runs/sweeps", "runs/sweeps/s", True), ("runs/", "runs/s", True), ("s3://bucket/x/", "s3://bucket/x/s", False)],
)
def test_sweep_dir_and_locality(data: Path, storage: str, sweep_dir: str, local: bool) -> None:
    made = spec(data, storage=storage)
    assert (made.sweep_dir, made.is_local) == (sweep_dir, local)


def test_base_config_is_the_base_fields_under_the_sweeps_budgets(data: Path) -> None:
    base = {"preset": "middle_loop", "batch_size": 4.0, "mlp_mult": 3, "train_seconds": 99, "max_artifact_bytes": 5}
    made = spec(data, base=base, artifact_bytes=3_000_000, train_seconds=7, eval_seconds=2)
    config = made.base_config()
    assert config.model.n_prelude == 3 and config.train.batch_size == 4 and config.model.mlp_mult == 3.0
    assert (config.train.train_seconds, config.compress.max_artifact_bytes, config.train.max_eval_seconds) == (
        7.0, 3_000_000, 2.0)  # fmt: skip
    assert type(config.train.batch_size) is int and type(config.train.train_seconds) is float
    assert dict(made.base)["preset"] == "middle_loop"  # the spec's own mapping is not consumed
    plain = spec(data, base={"n_blocks": 3}).base_config()
    assert plain == TrialConfig().replace(n_blocks=3, train_seconds=20.0, max_eval_seconds=0.0)


# ------------------------------------------------------------------- the YAML layout


def _raw(data: Path, **changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "s", "data": str(data), "overrides": {"d_model": [32, 64], "n_blocks": [1, 2]},
        "base": {"preset": "tiny"}, "budget": {"artifact_bytes": 16_000_000, "train_seconds": 3},
    }  # fmt: skip
    return raw | changes


def test_nested_sections_map_to_fields(data: Path) -> None:
    made = spec_from_dict(_raw(data, search={"algorithm": "random", "objectives": {"val_bpb": "max"},
                                             "num_samples": 4, "seed": 9},
                               resources={"cpu": 2, "gpu": 0, "workers": 1}, seeds=3))  # fmt: skip
    assert (made.algorithm, dict(made.objectives), made.num_samples, made.search_seed) == (
        "random", {"val_bpb": "max"}, 4, 9)  # fmt: skip
    assert (made.cpu, made.gpu, made.workers, made.seeds, made.train_seconds) == (2, 0, 1, 3, 3)
    assert made.data == data.resolve()


@pytest.mark.parametrize(
    ("objectives", "expected"),
    [("val_bpb", {"val_bpb": "min"}), (["val_bpb", "artifact_bytes"], {"val_bpb": "min", "artifact_bytes": "min"})],
)
def test_objectives_by_name_are_minimized(data: Path, objectives: Any, expected: dict) -> None:
    assert dict(spec_from_dict(_raw(data, search={"objectives": objectives})).objectives) == expected


def test_the_yaml_dict_round_trips(data: Path) -> None:
    made = spec_from_dict(_raw(data, search={"algorithm": "nsga2", "objectives": {"val_bpb": "min", "params": "max"},
                                             "num_samples": 5, "seed": 2},
                               resources={"cpu": 2.0, "gpu": 0.0, "workers": 2}, seeds=2, max_concurrent=3,
                               storage="elsewhere", equal_bytes=True, tracking_uri="sqlite:///x.db"))  # fmt: skip
    again = spec_from_dict(yaml.safe_load(yaml.safe_dump(made.to_yaml_dict())))
    assert again == made


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"budget": 3}, "budget: expected a mapping, got 3"),
        ({"budget": {"artifact_bytes": "big"}}, "artifact_bytes='big': expected a number"),
        ({"search": {"seeds": 2}},
         "search.seeds: unknown field; expected one of ['algorithm', 'num_samples', 'objectives', 'seed']"),
        ({"resources": {"cpus": 2}}, "resources.cpus: unknown field; expected one of ['cpu', 'gpu', 'workers']"),
        ({"sead": 2},
         "unknown spec field 'sead'; expected one of ['base', 'budget', 'controls', 'data', 'early_stopping', "
         "'equal_bytes', 'max_concurrent', 'name', 'overrides', 'promotion', 'resources', 'search', 'seeds', 'space', "
         "'storage', 'tracking_uri', 'trial']"),
        ({"overrides": [1, 2]}, "overrides: expected a mapping of config field: value"),
        ({"base": "tiny"}, "base: expected a mapping of config field: value"),
        ({"base": {"n_blockz": 1}}, "base: unknown config field 'n_blockz'"),
        ({"base": {"n_passes": 0}}, "base: ModelConfig.n_passes=0: expected an integer >= 1"),
        ({"base": {"preset": "tiny", "batch_size": 9}, "resources": {"workers": 2}},
         "base.batch_size=9 with resources.workers=2: expected a multiple of workers (each data-parallel worker "
         "trains on an equal slice of the global batch)"),
    ],
)
def test_bad_layouts_fail_with_one_line(data: Path, changes: dict, message: str) -> None:
    with pytest.raises(SpecError) as info:
        spec_from_dict(_raw(data, **changes))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


@pytest.mark.parametrize("missing", ["name", "data"])
def test_name_and_data_are_required(data: Path, missing: str) -> None:
    raw = _raw(data)
    del raw[missing]
    with pytest.raises(SpecError, match=r"^spec: expected at least `name` and `data`$"):
        spec_from_dict(raw)


def test_a_grid_search_needs_choices(data: Path) -> None:
    raw = _raw(data, search={"algorithm": "grid"}, overrides={"n_blocks": {"low": 1, "high": 3}})
    with pytest.raises(SpaceError, match="algorithm=grid: field 'n_blocks' is a range"):
        spec_from_dict(raw)


def test_the_byte_cap_check_is_at_the_smallest_configuration(data: Path) -> None:
    raw = _raw(data, base={"preset": "tiny", "bits": 4, "codec": "lzma"})  # the base's own compression counts
    space = apply_overrides(named_space("shared_vs_unique"), raw["overrides"])
    smallest = smallest_predicted_bytes(space, spec_from_dict(raw).base_config(), equal_bytes=False)
    assert spec_from_dict(raw | {"budget": {"artifact_bytes": smallest}}).artifact_bytes == smallest
    with pytest.raises(SpecError) as info:
        spec_from_dict(raw | {"budget": {"artifact_bytes": smallest - 1}})
    assert str(info.value) == (f"space 'shared_vs_unique': no configuration fits budget.artifact_bytes="
                               f"{smallest - 1:,}; the smallest predicts {smallest:,} bytes")  # fmt: skip


def test_with_equal_bytes_the_check_is_at_the_narrowest_width(data: Path) -> None:
    raw = _raw(data, overrides={"d_model": [256], "n_blocks": [1]})
    base = spec_from_dict(raw).base_config()
    space = apply_overrides(named_space("shared_vs_unique"), raw["overrides"])
    narrowest = smallest_predicted_bytes(space, base, equal_bytes=True)
    assert narrowest < smallest_predicted_bytes(space, base, equal_bytes=False)
    budget = {"artifact_bytes": narrowest}
    assert spec_from_dict(raw | {"budget": budget, "equal_bytes": True}).equal_bytes
    with pytest.raises(SpecError, match="no configuration fits"):
        spec_from_dict(raw | {"budget": budget})


# ------------------------------------------------------------------- files and --set


def test_load_spec_applies_dotted_overrides_then_fields(data: Path, tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_raw(data)))
    made = load_spec(path, ["budget.train_seconds=5", "search.num_samples=7", "resources.cpu=2", "seeds=2",
                            "base.batch_size=4"], name="other", storage=None)  # fmt: skip
    assert (made.train_seconds, made.num_samples, made.cpu, made.seeds, made.name) == (5, 7, 2, 2, "other")
    assert made.artifact_bytes == 16_000_000 and made.storage == "runs/sweeps"  # untouched; None is no change
    assert made.base_config().train.batch_size == 4


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("name.x=1", "--set name.x: 'name' is not a mapping in the spec"),
        ("budget", "override 'budget': expected key=value"),
        ("seeds=[1", "override 'seeds=[1': value is not valid YAML (ParserError)"),
    ],
)
def test_bad_set_overrides(data: Path, tmp_path: Path, override: str, message: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_raw(data)))
    with pytest.raises(SpecError, match=f"^{re.escape(message)}$"):
        load_spec(path, [override])


def test_a_set_override_may_create_a_section(data: Path, tmp_path: Path) -> None:
    raw = _raw(data)
    del raw["budget"]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    made = load_spec(path, ["budget.artifact_bytes=15000000"])
    assert made.artifact_bytes == 15_000_000 and made.train_seconds == 20.0


def test_a_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"^spec '.*none\.yaml': file not found$"):
        load_spec(tmp_path / "none.yaml")


def test_a_base_error_is_a_config_error_reported_as_a_spec_error(data: Path) -> None:
    with pytest.raises(SpecError) as info:
        spec_from_dict(_raw(data, base={"codec": "zzz"}))
    assert not isinstance(info.value, ConfigError) and str(info.value).startswith("base: CompressConfig.codec='zzz'")


HALVING = {"early_stopping": "pareto_halving"}
HALVING_OBJECTIVE = (
    "cannot be ranked at a rung; expected val_bpb, artifact_bytes, eval_flops_per_token minimised (quick bpb, "
    "predicted bytes, analytic eval FLOPs)"
)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (HALVING | {"halving_eta": 1}, "early_stopping.eta=1: expected an integer >= 2"),
        (HALVING | {"halving_eta": 2.5}, "early_stopping.eta=2.5: expected an integer >= 2"),
        (HALVING | {"halving_eta": True}, "early_stopping.eta=True: expected an integer >= 2"),
        (HALVING | {"halving_min_seconds": 0}, "early_stopping.min_seconds=0: expected a number of seconds > 0"),
        (HALVING | {"halving_min_seconds": "soon"},
         "early_stopping.min_seconds='soon': expected a number of seconds > 0"),
        (HALVING | {"train_seconds": 9.0, "halving_min_seconds": 3.5},
         "early_stopping.min_seconds=3.5: expected <= budget.train_seconds / eta = 3 (the last rung), or no trial "
         "would ever be stopped"),
        (HALVING | {"objectives": {"val_bpb": "min", "params": "min"}},
         f"early_stopping=pareto_halving: objective params: min {HALVING_OBJECTIVE}"),
        (HALVING | {"objectives": {"val_bpb": "max"}},
         f"early_stopping=pareto_halving: objective val_bpb: max {HALVING_OBJECTIVE}"),
        (HALVING | {"objectives": {"artifact_bytes": "min", "eval_flops_per_token": "min"}},
         "early_stopping=pareto_halving needs val_bpb among the objectives: it is the one learned over time; the "
         "others are known before training"),
    ],
)  # fmt: skip
def test_pareto_halving_rules(data: Path, fields: dict, message: str) -> None:
    with pytest.raises(SpecError) as info:
        spec(data, **fields)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"algorithm": "pareto_halving", "rungs": 3}, "early_stopping.rungs: unknown field; expected one of "
         "['algorithm', 'eta', 'min_seconds']"),
        ({"eta": 3}, "early_stopping: expected an algorithm (asha or pareto_halving)"),
        ({"algorithm": "asha", "eta": 3}, "early_stopping: eta and min_seconds are pareto_halving's; algorithm='asha'"),
        ({"algorithm": "median"}, "early_stopping='median': expected null, asha or {algorithm: pareto_halving, ...}"),
    ],
)  # fmt: skip
def test_early_stopping_mapping_is_checked(data: Path, raw: dict, message: str) -> None:
    with pytest.raises(SpecError) as info:
        spec_from_dict({"name": "s", "data": str(data), "early_stopping": raw})
    assert str(info.value) == message


def test_pareto_halving_yaml_roundtrip_and_rungs(data: Path) -> None:
    raw = {"name": "s", "data": str(data), "budget": {"train_seconds": 27},
           "search": {"objectives": {"val_bpb": "min", "artifact_bytes": "min", "eval_flops_per_token": "min"}},
           "early_stopping": {"algorithm": "pareto_halving", "eta": "3", "min_seconds": "1e0"}}  # fmt: skip
    made = spec_from_dict(raw)
    assert (made.early_stopping, made.halving_eta, made.halving_min_seconds) == ("pareto_halving", 3, 1.0)
    assert made.halving_rungs() == pytest.approx((1.0, 3.0, 9.0))
    again = spec_from_dict(yaml.safe_load(yaml.safe_dump(made.to_yaml_dict())))
    assert again == made
    default = spec_from_dict(raw | {"early_stopping": {"algorithm": "pareto_halving"}})
    assert default.halving_min_seconds is None and default.halving_rungs() == pytest.approx((3.0, 9.0))
    assert spec_from_dict(raw | {"early_stopping": "pareto_halving"}) == default
    asha = spec_from_dict(raw | {"early_stopping": {"algorithm": "asha"}, "search": {"objectives": ["val_bpb"]}})
    assert asha.early_stopping == "asha" and asha.to_yaml_dict()["early_stopping"] == "asha"


def test_controls_default_to_every_arm_when_the_space_routes(data: Path) -> None:
    routes = {"space": "routing", "overrides": {"refine_passes": 1, "signal": ["entropy", "kl"]}}
    assert spec_from_dict(_raw(data, **routes)).control_arms() == ("no_refine", "uniform", "stride", "random")
    assert spec_from_dict(_raw(data, **routes, controls=["random", "no_refine"])).control_arms() == (
        "no_refine", "random")  # fmt: skip
    assert spec_from_dict(_raw(data, **routes, controls=[])).control_arms() == ()
    assert spec_from_dict(_raw(data)).control_arms() == ()  # shared_vs_unique never routes
    made = spec_from_dict(_raw(data, **routes, controls=["uniform"]))
    assert spec_from_dict(yaml.safe_load(yaml.safe_dump(made.to_yaml_dict()))) == made
    with pytest.raises(SpecError, match=r"^controls=\['uniform'\]: space 'shared_vs_unique' never proposes a routed "):
        spec_from_dict(_raw(data, controls=["uniform"]))
