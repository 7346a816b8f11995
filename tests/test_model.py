import posixpath
import shutil
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

import pytest
import torch
from torch import nn
from torchvision.models import ResNet18_Weights

from trainable import TrainConfig, UserError
from trainable.model import build_model, build_optimizer, param_groups, set_train_mode

# The file name torchvision caches the ImageNet weights under.
IMAGENET_FILE = posixpath.basename(urlparse(ResNet18_Weights.IMAGENET1K_V1.url).path)

TRAINED_PREFIXES = {
    0: ("fc.",),
    1: ("fc.", "layer4."),
    2: ("fc.", "layer4.", "layer3."),
    3: ("fc.", "layer4.", "layer3.", "layer2."),
    4: ("fc.", "layer4.", "layer3.", "layer2.", "layer1."),
    5: ("fc.", "layer4.", "layer3.", "layer2.", "layer1.", "conv1.", "bn1."),
}


@pytest.mark.parametrize("depth", range(6))
def test_unfreeze_depth_trains_exactly_the_stages_counted_from_the_head(depth: int) -> None:
    model = build_model(TrainConfig(weights="none", unfreeze_depth=depth), num_classes=7)
    for name, param in model.named_parameters():
        assert param.requires_grad == name.startswith(TRAINED_PREFIXES[depth]), name
    assert model.fc.out_features == 7


def test_a_cifar_stem_without_weights_is_new_and_always_trains() -> None:
    model = build_model(TrainConfig(weights="none", stem="cifar", unfreeze_depth=0), 10)
    assert model.conv1.kernel_size == (3, 3) and isinstance(model.maxpool, nn.Identity)
    assert model.conv1.weight.requires_grad and not model.bn1.weight.requires_grad


def test_frozen_batchnorm_keeps_its_statistics_after_a_training_step() -> None:
    cfg = TrainConfig(weights="none", unfreeze_depth=1, lr=0.1)
    model = build_model(cfg, 3)
    frozen_bn, trained_bn = model.layer3[0].bn1, model.layer4[0].bn1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, cfg)
    set_train_mode(model, True)
    assert not frozen_bn.training and trained_bn.training
    loss = model(torch.randn(4, 3, 32, 32) * 3 + 1).logsumexp(1).mean()
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    for key in ("layer3.0.bn1.running_mean", "layer3.0.bn1.running_var", "layer3.0.bn1.weight",
                "bn1.running_mean", "layer1.0.conv1.weight"):
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["layer4.0.bn1.running_mean"], after["layer4.0.bn1.running_mean"])
    assert not torch.equal(before["fc.weight"], after["fc.weight"])


def test_param_groups_scale_lr_by_layer_decay_and_skip_decay_on_norms_and_biases() -> None:
    cfg = TrainConfig(weights="none", unfreeze_depth=5, layer_decay=0.5, lr=0.1,
                      weight_decay=0.01)
    model = build_model(cfg, 3)
    optimizer = build_optimizer(model, cfg)
    stages = {g["stage"] for g in optimizer.param_groups}
    assert stages == set(range(6))
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(0.1 * 0.5 ** group["stage"])
        assert group["weight_decay"] == (0.01 if group["params"][0].ndim > 1 else 0.0)
        assert all((p.ndim > 1) == (group["weight_decay"] > 0) for p in group["params"])
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in param_groups(model, cfg)) == n_trainable


def test_frozen_parameters_get_no_optimizer_state() -> None:
    cfg = TrainConfig(weights="none", unfreeze_depth=0)
    model = build_model(cfg, 3)
    optimizer = build_optimizer(model, cfg)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(model.fc.weight), id(model.fc.bias)}


def test_state_dict_weights_file_loads_everything_but_fc(resnet18_weights_file: Path) -> None:
    saved = torch.load(resnet18_weights_file, weights_only=True)
    model = build_model(TrainConfig(weights=str(resnet18_weights_file)), 5)
    state = model.state_dict()
    for key in ("conv1.weight", "layer2.1.conv2.weight", "layer4.1.bn2.running_var"):
        assert torch.equal(state[key], saved[key])
    assert state["fc.weight"].shape == (5, 512)


def test_imagenet_weights_file_into_cifar_stem_keeps_the_rest(resnet18_weights_file: Path) -> None:
    model = build_model(TrainConfig(weights=str(resnet18_weights_file), stem="cifar"), 5)
    saved = torch.load(resnet18_weights_file, weights_only=True)
    assert torch.equal(model.layer1[0].conv1.weight, saved["layer1.0.conv1.weight"])
    assert model.conv1.weight.shape == (64, 3, 3, 3)


@pytest.mark.parametrize("content, message", [
    ("not a pickle", "not a loadable PyTorch file"),
    ({"conv1.weight": torch.zeros(64, 3, 7, 7)}, "not a ResNet18 state dict (missing"),
    ([1, 2, 3], "not a ResNet18 state dict (expected a mapping"),
])
def test_a_file_that_is_not_a_resnet18_state_dict_is_one_clear_error(
        tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "w.pth"
    if isinstance(content, str):
        path.write_text(content)
    else:
        torch.save(content, path)
    with pytest.raises(UserError) as err:
        build_model(TrainConfig(weights=str(path)), 3)
    assert str(path) in str(err.value) and message in str(err.value)


def test_a_resnet50_state_dict_is_rejected(tmp_path: Path) -> None:
    from torchvision.models import resnet50

    torch.save(resnet50().state_dict(), tmp_path / "r50.pth")
    with pytest.raises(UserError, match="not a ResNet18 state dict"):
        build_model(TrainConfig(weights=str(tmp_path / "r50.pth")), 3)


def test_missing_weights_file_names_the_alternatives(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"absent\.pth: no such file or directory; use imagenet, "
                                        "none, or ResNet18 weights: a state-dict file"):
        build_model(TrainConfig(weights=str(tmp_path / "absent.pth")), 3)


@pytest.fixture
def empty_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """torchvision's weights cache in an empty directory: TORCH_HOME/hub/checkpoints."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # no torch.hub.set_dir from elsewhere
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_imagenet_weights_offline_suggest_a_file_or_none(
        monkeypatch: pytest.MonkeyPatch, empty_torch_home: Path) -> None:
    downloads: list[tuple[str, str]] = []

    def offline(url: str, dst: str, *args: object, **kwargs: object) -> None:
        downloads.append((url, dst))
        raise URLError("[Errno 101] Network is unreachable")

    # torch.hub.load_state_dict_from_url downloads through this on any machine, online or not
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError) as err:
        build_model(TrainConfig(weights="imagenet"), 3)
    message = str(err.value)
    assert downloads == [(ResNet18_Weights.IMAGENET1K_V1.url,
                          str(empty_torch_home / IMAGENET_FILE))]
    assert "\n" not in message and message.startswith("weights 'imagenet': not in torchvision's "
                                                      f"cache ({empty_torch_home.parent})")
    assert "Network is unreachable" in message
    assert "--weights PATH" in message and "--weights none" in message


def test_imagenet_weights_in_the_cache_load_without_the_network(
        monkeypatch: pytest.MonkeyPatch, empty_torch_home: Path,
        resnet18_weights_file: Path) -> None:
    empty_torch_home.mkdir(parents=True)
    shutil.copy(resnet18_weights_file, empty_torch_home / IMAGENET_FILE)

    def no_network(*args: object, **kwargs: object) -> None:
        pytest.fail("the cached weights should have been used")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    model = build_model(TrainConfig(weights="imagenet"), 3)
    saved = torch.load(resnet18_weights_file, weights_only=True)
    assert torch.equal(model.layer4[1].conv2.weight, saved["layer4.1.conv2.weight"])
    assert torch.equal(model.bn1.running_var, saved["bn1.running_var"])
    assert model.fc.out_features == 3
