"""Safety: no code runs from a weights or YAML file, a local Ray stays private, and a run
name cannot escape its storage directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torchvision.models import resnet18

from search import driver
from trainable import TrainConfig
from trainable.config import read_yaml_mapping
from trainable.errors import UserError
from trainable.model import build_model

SENTINEL = "resnet_hpo_pwned"


class Payload:
    """Pickles to a call of os.system: loading it without weights_only would run it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (f"touch {SENTINEL}",)


def test_a_weights_file_with_code_is_refused_without_running_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": Payload()}, path)
    with pytest.raises(UserError, match="not a loadable PyTorch state dict"):
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


def test_a_local_ray_binds_its_dashboard_to_localhost_and_keeps_token_auth(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    driver.start_ray(None)
    assert calls[0]["dashboard_host"] == "127.0.0.1"
    assert "RAY_AUTH_MODE" not in os.environ  # Ray's default: token authentication


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "/abs", ".hidden", ""])
def test_a_run_name_cannot_leave_the_storage_directory(name: str) -> None:
    with pytest.raises(UserError, match="use letters, digits"):
        driver.check_name(name)
