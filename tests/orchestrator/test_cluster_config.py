"""cluster.yaml, checked offline the way `ray up` checks it before it talks to AWS, plus the
properties that make it safe to launch: 8-GPU workers, token auth on every node, a dashboard on
127.0.0.1 only, no credentials, and paths that agree with docs/cluster.md."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"
DOCS = REPO / "docs" / "cluster.md"
# The paths docs/cluster.md tells users to pass as --storage and --data.
SWEEP_STORAGE = "/mnt/loopgolf/sweeps"
DATA_DIR = "/home/ubuntu/data/fineweb10B_sp1024"
COMMAND_LISTS = (
    "initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
    "head_start_ray_commands", "worker_start_ray_commands",
)  # fmt: skip


def load_raw() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text(encoding="utf-8"))


def ray_validate(config: dict[str, Any]) -> dict[str, Any]:
    """The schema on the raw YAML first (prepare_config can crash with a TypeError on malformed
    input), then what `ray up` does before provider.bootstrap_config (which needs AWS)."""
    schema_path = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")
    with open(schema_path, encoding="utf-8") as f:
        jsonschema.validate(config, json.load(f))
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def prepared() -> dict[str, Any]:
    return ray_validate(load_raw())


def test_cluster_yaml_passes_rays_own_validation(prepared: dict[str, Any]) -> None:
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["cache_stopped_nodes"] is False
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        pytest.param(lambda c: c["available_node_types"]["gpu_8xh100"].update(min_wrkers=1),
                     "'min_wrkers' was unexpected", id="typo-in-node-type"),
        pytest.param(lambda c: c.update(head_start_ray_command=c.pop("head_start_ray_commands")),
                     "'head_start_ray_command' was unexpected", id="typo-at-top-level"),
        pytest.param(lambda c: c.update(setup_commands="pip install loopgolf"),
                     "is not of type 'array'", id="commands-as-a-string"),
        pytest.param(lambda c: c.update(head_node_type="cpu_head"),
                     "`head_node_type` must be one of `available_node_types`", id="unknown-head-type"),
        pytest.param(lambda c: (c.update(max_workers=1), c["available_node_types"]["gpu_8xh100"].update(min_workers=2)),
                     "smaller than the sum of `min_workers`", id="max-below-min"),
    ],
)  # fmt: skip
def test_validation_rejects_a_broken_config(mutate: Any, match: str) -> None:
    config = load_raw()
    mutate(config)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(match)):
        ray_validate(config)


def test_every_command_list_and_file_mount_is_explicit() -> None:
    # prepare_config merges ray's defaults.yaml shallowly: a list left out of cluster.yaml comes
    # from there (a system-pip boto3 install, a dashboard on 0.0.0.0, no token auth).
    raw = load_raw()
    missing = [key for key in (*COMMAND_LISTS, "file_mounts") if key not in raw]
    assert not missing, f"cluster.yaml must set {missing} itself"


def test_trials_run_on_8xh100_workers_not_on_the_head(prepared: dict[str, Any]) -> None:
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}, "the head runs the driver, not trials (a trial asks cpu > 0)"
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert list(gpu_types) == ["gpu_8xh100"]
    worker = gpu_types["gpu_8xh100"]
    assert worker["resources"]["GPU"] == 8
    assert worker["resources"]["CPU"] == 192
    assert worker["node_config"]["InstanceType"] == "p5.48xlarge"
    assert worker["min_workers"] == 0, "GPU nodes only while trials want them"
    assert 1 <= worker["max_workers"] <= prepared["max_workers"]


def _ray_start_commands(prepared: dict[str, Any], key: str) -> list[str]:
    commands = [c for c in prepared[key] if re.search(r"\bray start\b", c)]
    assert len(commands) == 1, f"{key}: expected one `ray start`, got {commands}"
    return commands


def test_dashboard_listens_on_localhost_only(prepared: dict[str, Any]) -> None:
    (head_start,) = _ray_start_commands(prepared, "head_start_ray_commands")
    assert "--head" in head_start
    assert re.search(r"--dashboard-host[= ]127\.0\.0\.1(\s|$)", head_start), head_start
    assert "0.0.0.0" not in CLUSTER_YAML.read_text(encoding="utf-8")


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_every_node_starts_ray_with_token_auth(prepared: dict[str, Any], key: str) -> None:
    (start,) = _ray_start_commands(prepared, key)
    before = start[: re.search(r"\bray start\b", start).start()]  # type: ignore[union-attr]
    assert re.search(r"\bRAY_AUTH_MODE=token\b", before), f"{key}: RAY_AUTH_MODE=token must precede `ray start`"
    assert "RAY_AUTH_MODE=disabled" not in start


def test_the_token_file_reaches_every_node(prepared: dict[str, Any]) -> None:
    # file_mounts go to the head from the user's machine, then from the head to each worker.
    assert prepared["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


def test_code_mounts_exist_in_the_repo(prepared: dict[str, Any]) -> None:
    # `ray up` (run from the repo root) hashes and rsyncs these; a missing one crashes it.
    # .git is left out: a source tarball has none, and only the recorded code version needs it.
    local = [p for p in prepared["file_mounts"].values() if not p.startswith("~") and p != "./.git"]
    assert "./loopgolf" in local and "./pyproject.toml" in local
    assert [p for p in local if not (REPO / p).exists()] == []


def test_docs_and_config_agree_on_storage_and_data_paths() -> None:
    text = CLUSTER_YAML.read_text(encoding="utf-8")
    setup = " ".join(load_raw()["setup_commands"])
    assert f"mkdir -p {SWEEP_STORAGE}" in setup
    assert DATA_DIR.replace("/home/ubuntu", "~") in setup
    assert f"--storage {SWEEP_STORAGE}" in text
    docs = DOCS.read_text(encoding="utf-8")
    assert f"--storage {SWEEP_STORAGE}" in docs
    assert f"--data {DATA_DIR}" in docs


# ------------------------------------------------------------------------------ no credentials

SECRET_KEY_NAMES = re.compile(
    r"access_key|secret|password|passwd|session_token|private_key|api_key|auth_token|credential", re.IGNORECASE
)
SECRET_VALUES = [
    ("AWS access key id", re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")),
    ("private key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")),
    ("hex token (a Ray auth token is 64 hex digits)", re.compile(r"\b[0-9a-fA-F]{32,}\b")),
    ("AWS secret key", re.compile(r"(?<![A-Za-z0-9/+])(?=[A-Za-z0-9/+]*\d)(?=[A-Za-z0-9/+]*[a-z])"
                                  r"(?=[A-Za-z0-9/+]*[A-Z])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")),
    ("inline credential variable", re.compile(r"\b(?:AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|RAY_AUTH_TOKEN)\s*=")),
]  # fmt: skip


def find_credentials(config: Any, text: str) -> list[str]:
    found: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if SECRET_KEY_NAMES.search(str(key)):
                    found.append(f"key {path}{key}")
                walk(value, f"{path}{key}.")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}{i}.")

    walk(config, "")
    # The whole text, comments included: a pasted secret in a comment is still a leak.
    found += [f"{what}: {m.group(0)[:8]}..." for what, pattern in SECRET_VALUES for m in pattern.finditer(text)]
    return found


def test_no_credentials_in_cluster_yaml() -> None:
    text = CLUSTER_YAML.read_text(encoding="utf-8")
    raw = load_raw()
    raw["file_mounts"].pop("~/.ray/auth_token", None)  # a path to the token, not a token
    assert "ssh_private_key" not in raw["auth"]
    assert find_credentials(raw, text) == []


@pytest.mark.parametrize(
    ("key", "value", "what"),
    [
        ("aws_access_key_id", "x", "key"),
        ("note", "AKIA" + "ABCDEFGHIJKLMNOP", "AWS access key id"),
        ("note", "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "EXAMPLEKEY", "AWS secret key"),
        ("note", "3f" * 32, "hex token"),
        ("note", "export RAY_AUTH_TOKEN=abc", "inline credential variable"),
    ],
)
def test_the_credential_scan_can_fail(key: str, value: str, what: str) -> None:
    raw = load_raw()
    raw["auth"][key] = value
    text = CLUSTER_YAML.read_text(encoding="utf-8") + f"\n# {value}\n"
    assert any(hit.startswith(what) for hit in find_credentials(raw, text))
