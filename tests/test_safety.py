"""Safety: no code runs from a weights or YAML file, a local Ray stays private, and a run
name cannot escape its storage directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torchvision.models import resnet18

from search.run.request import check_name
from trainable import TrainConfig
from trainable.config import read_yaml_mapping
from trainable.errors import UserError
from trainable.model import build_model

SENTINEL = "resnet_hpo_pwned"
REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Pickles to a call of os.system: loading it without weights_only would run it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (f"touch {SENTINEL}",)


def test_a_weights_file_with_code_is_refused_without_running_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": Payload()}, path)
    with pytest.raises(UserError, match="not a loadable PyTorch file"):
        build_model(TrainConfig(weights=str(path)), 10)
    assert not (tmp_path / SENTINEL).exists()


def test_a_state_dict_of_another_model_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "resnet34.pth"
    torch.save({"layer9.weight": torch.zeros(1), **resnet18().state_dict()}, path)
    with pytest.raises(UserError, match=r"not a ResNet18 state dict \(unexpected key layer9"):
        build_model(TrainConfig(weights=str(path)), 10)


def test_yaml_is_read_with_the_safe_loader(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(f"lr: !!python/object/apply:os.system ['touch {SENTINEL}']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        read_yaml_mapping(path)
    assert not (tmp_path / SENTINEL).exists()


# Run in a fresh process: start_ray(None) as `resnet-hpo search` without --address calls it,
# then knock on the new cluster's GCS port the way anyone on the network could.
LOCAL_RAY_PROBE = """
import json
from pathlib import Path

import grpc
import ray

from search.run.cluster import start_ray

start_ray(None)
node = ray._private.worker._global_node
token_file = Path.home() / ".ray" / "auth_token"  # where Ray keeps the token it generated
token = token_file.read_text().strip() if token_file.exists() else "none"


def call_gcs(address, metadata):
    with grpc.insecure_channel(address) as channel:
        method = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId",
                                     request_serializer=lambda b: b,
                                     response_deserializer=lambda b: b)
        try:
            method(b"", metadata=metadata, timeout=60)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name


gcs = node.address_info["gcs_address"]
print(json.dumps({
    "session_dir": node.address_info["session_dir"],
    "webui_url": node.address_info["webui_url"] or "",
    "dashboard_host": node._ray_params.dashboard_host,
    "no_token": call_gcs(gcs, ()),
    "wrong_token": call_gcs(gcs, (("authorization", "Bearer wrong"),)),
    "token": call_gcs(gcs, (("authorization", "Bearer " + token),)),
}))
ray.shutdown()
"""


@pytest.mark.slow
@pytest.mark.ray
def test_a_local_ray_binds_its_dashboard_to_localhost_and_keeps_token_auth() -> None:
    # Short paths: Ray's Unix sockets live under RAY_TMPDIR (at most 107 characters).
    home, ray_tmp = tempfile.mkdtemp(prefix="rh-home"), tempfile.mkdtemp(prefix="rh-ray")
    env = {k: v for k, v in os.environ.items()  # the test session's Ray sets RAY_AUTH_MODE
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    # A temporary home for the token Ray generates; RAY_TMPDIR keeps the new cluster apart
    # from any `ray start` cluster on this machine, which ray.init() would otherwise join.
    env.update(HOME=home, RAY_TMPDIR=ray_tmp, PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    try:
        done = subprocess.run([sys.executable, "-c", LOCAL_RAY_PROBE], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["session_dir"].startswith(ray_tmp)  # a new local cluster, not one joined
    # The GCS listens beyond loopback (Ray needs it for workers); the token keeps it closed.
    assert (probe["no_token"], probe["wrong_token"], probe["token"]) == (
        "UNAUTHENTICATED", "UNAUTHENTICATED", "OK")
    # The dashboard runs only when Ray's dashboard extras are installed; it is bound to
    # loopback either way.
    assert probe["dashboard_host"] == "127.0.0.1"
    assert probe["webui_url"] == "" or probe["webui_url"].startswith("127.0.0.1:")


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "/abs", ".hidden", ""])
def test_a_run_name_cannot_leave_the_storage_directory(name: str) -> None:
    with pytest.raises(UserError, match="use letters, digits"):
        check_name(name)
