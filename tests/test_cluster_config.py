"""cluster.yaml passes the Ray cluster launcher's own validation and matches this project.

`prepare_config` + `validate_config` are what `ray up` runs on the file before it asks AWS
anything (filling in the AWS defaults, then Ray's JSON schema); neither touches the network.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
IMAGE = re.compile(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<major>3)(?P<minor>\d+)-gpu")


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    return config


@pytest.fixture(scope="module")
def prepared(raw: dict[str, Any]) -> dict[str, Any]:
    return prepare_config(copy.deepcopy(raw))


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def image_tag(raw: dict[str, Any]) -> re.Match[str]:
    docker = raw["docker"]
    assert not {"head_image", "worker_image"} & docker.keys(), "one image for every node"
    match = IMAGE.fullmatch(docker["image"])
    assert match, f"{docker['image']!r} is not a pinned rayproject/ray:X.Y.Z-pyNNN-gpu image"
    return match


def test_ray_validates_the_config(prepared: dict[str, Any]) -> None:
    validate_config(prepared)


def test_validation_catches_a_misspelt_key(raw: dict[str, Any]) -> None:
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["ray.worker.gpu"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(broken))


def test_image_ray_is_the_installed_ray(raw: dict[str, Any]) -> None:
    assert image_tag(raw)["ray"] == ray.__version__


def test_pyproject_admits_the_image_ray(raw: dict[str, Any], pyproject: dict[str, Any]) -> None:
    (ray_req,) = [r for r in map(Requirement, pyproject["dependencies"]) if r.name == "ray"]
    assert ray_req.specifier.contains(image_tag(raw)["ray"]), (
        "pip would replace the image's Ray while installing the project")


def test_image_python_meets_requires_python(raw: dict[str, Any],
                                            pyproject: dict[str, Any]) -> None:
    tag = image_tag(raw)
    assert SpecifierSet(pyproject["requires-python"]).contains(f"{tag['major']}.{tag['minor']}")


def test_head_runs_no_trials(prepared: dict[str, Any]) -> None:
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert head["max_workers"] == 0


def test_workers_are_autoscaling_spot_gpu_nodes(prepared: dict[str, Any]) -> None:
    workers = {name: spec for name, spec in prepared["available_node_types"].items()
               if name != prepared["head_node_type"]}
    assert workers
    for name, spec in workers.items():
        assert spec["resources"].get("GPU", 0) >= 1, name
        assert spec["resources"].get("CPU", 0) >= 1, name
        assert spec["min_workers"] == 0 < spec["max_workers"] <= prepared["max_workers"], name
        node = spec["node_config"]
        assert node["InstanceMarketOptions"]["MarketType"] == "spot", name
        assert node["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name


def test_every_node_has_an_explicit_ami(prepared: dict[str, Any]) -> None:
    for name, spec in prepared["available_node_types"].items():
        assert spec["node_config"]["ImageId"].startswith("ami-"), name


def test_setup_installs_the_shipped_project(prepared: dict[str, Any]) -> None:
    shipped = {remote for remote, local in prepared["file_mounts"].items()
               if (ROOT / local).resolve() == ROOT}
    assert shipped, "file_mounts must ship the repository root"
    installs = [shlex.split(command) for command in prepared["setup_commands"]]
    editable = {words[words.index("-e") + 1] for words in installs
                if words[:2] == ["pip", "install"] and "-e" in words}
    assert shipped & editable, f"setup_commands must `pip install -e` one of {sorted(shipped)}"
    for commands in ("head_setup_commands", "worker_setup_commands"):
        assert set(prepared["setup_commands"]) <= set(prepared[commands])
