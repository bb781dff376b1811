"""ray_cluster.yaml: valid for the installed Ray's cluster launcher, GPU workers, nothing open to the world."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from search.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def _strings(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    else:
        yield str(node)


def test_valid_for_the_launcher_schema(config):
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # what the user wrote
    prepared = prepare_config(config)  # what `ray up` builds from it: merged with the AWS defaults
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"
    assert prepared["available_node_types"]["head"]["max_workers"] == 0


def test_gpu_workers_and_an_idle_head(config):
    types = config["available_node_types"]
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(t["resources"]["GPU"] >= 1 for t in workers)
    assert all(0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"] for t in workers)
    assert types[config["head_node_type"]]["resources"]["CPU"] == 0  # trials never land on the head


def test_nothing_open_to_the_world(config):
    text = list(_strings(config))
    assert not [s for s in text if "0.0.0.0" in s or "::/0" in s]
    # Without SecurityGroupIds, `ray up` creates a group whose SSH rule is open to 0.0.0.0/0.
    for name, t in config["available_node_types"].items():
        assert t["node_config"].get("SecurityGroupIds"), f"node type {name} lacks SecurityGroupIds"
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        assert all(r["CidrIp"] != "0.0.0.0/0" for r in rule.get("IpRanges", []))
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    # Ray's token auth on every node: the token file travels, and the mode is set for every command
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("export RAY_AUTH_MODE=token" in c for c in config["setup_commands"])


def test_setup_installs_torch_first_then_the_project(config):
    steps = config["setup_commands"]
    torch = next(i for i, c in enumerate(steps) if "torch==" in c)
    project = next(i for i, c in enumerate(steps) if "pip install -e ~/ecgsearch" in c)
    assert torch < project
    assert config["file_mounts"]["~/ecgsearch"] == "."


def test_head_starts_mlflow_server_on_loopback_from_postgres_env(config):
    line = next(c for c in config["head_start_ray_commands"] if "ecgsearch server" in c)
    words = shlex.split(line.split("&&", 1)[1].split(">", 1)[0])
    assert words[:2] == ["nohup", "ecgsearch"]
    args = build_parser().parse_args(words[2:])  # the CLI accepts exactly this command line
    assert args.host == "127.0.0.1"
    assert args.backend_store_uri == "$ECGSEARCH_BACKEND_STORE_URI"  # from the env file, never in this yaml
    assert args.artifacts_destination.startswith("/mnt/efs/")  # shared storage
    assert not any("postgresql://" in c for c in config["head_start_ray_commands"])
