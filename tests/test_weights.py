"""Weights of our own: a model directory, a trial checkpoint (directory or file) and a search's
run directory (its best trial's checkpoint) as `weights`, locally or in storage; what of them
trains; and bad weights refused in one line before anything is written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pyarrow.fs as pafs
import pytest
import torch
import yaml
from torchvision.models import resnet34, resnet50

import trainable.storage
from search.cli import main
from search.run.request import SearchRequest
from tests.conftest import one_line_error, search_space_file, write_class_tree
from tests.rundir_fixture import search_json, trial_rows, write_run
from trainable import TrainConfig, UserError
from trainable.model import build_model
from trainable.saved import save_model_dir, write_checkpoint

Weights = dict[str, torch.Tensor]
Stem = Literal["imagenet", "cifar"]


def random_weights(seed: int, stem: Stem = "imagenet") -> Weights:
    """A state dict of ours: a ResNet18 with this stem and a 3-way fc."""
    torch.manual_seed(seed)
    cfg = TrainConfig(weights="none", stem=stem)
    return {k: v.clone() for k, v in build_model(cfg, 3).state_dict().items()}


def model_dir(directory: Path, state: Weights, stem: Stem = "imagenet") -> Path:
    """What `resnet-hpo train --output DIR` writes."""
    cfg = TrainConfig(weights="none", stem=stem)
    model = build_model(cfg, len(state["fc.bias"]))
    model.load_state_dict(state)
    save_model_dir(directory, cfg, model, {"class_names": ["a", "b", "c"]})
    return directory


def checkpoint_dir(directory: Path, best: Weights, last: Weights) -> Path:
    """A trial's checkpoint: its last epoch's weights (`model`), its best epoch's
    (`best_model`)."""
    write_checkpoint(directory, TrainConfig(weights="none"), {
        "model": last, "optimizer": {}, "scaler": {}, "best_model": best, "epoch": 3,
        "history": [], "class_names": ["a", "b", "c"]})
    return directory


def run_dir(run: Path, checkpoints: dict[str, tuple[float, str | None]]) -> Path:
    """A finished search whose trials (id -> (best val_acc, checkpoint path or None)) ran 3
    epochs each; a trial with peak 0 failed."""
    trials, epochs = [], []
    for trial_id, (peak, checkpoint) in checkpoints.items():
        cfg = TrainConfig(weights="none", epochs=3).to_dict()
        trial, rows = trial_rows(cfg, trial_id, peak or 0.5, 2, 3, failed=peak == 0)
        trials.append({**trial, "checkpoint_path": checkpoint})
        epochs += rows
    return write_run(run, trials, epochs, search_json("quick", run.name, ["lr"]))


def assert_backbone(model: torch.nn.Module, state: Weights, classes: int) -> None:
    """The model holds `state` but for fc, which is new."""
    loaded = model.state_dict()
    for key, value in state.items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key
    assert loaded["fc.weight"].shape == (classes, 512)
    assert not torch.equal(loaded["fc.weight"][:3], state["fc.weight"])


def test_a_model_directory_loads_its_model_pt(tmp_path: Path) -> None:
    state = random_weights(1)
    model = build_model(TrainConfig(weights=str(model_dir(tmp_path / "backbone", state))), 5)
    assert_backbone(model, state, 5)


def test_a_trial_checkpoint_loads_its_best_epoch_as_a_directory_and_as_a_file(
        tmp_path: Path) -> None:
    best, last = random_weights(1), random_weights(2)
    directory = checkpoint_dir(tmp_path / "checkpoint_000002", best, last)
    for weights in (directory, directory / "checkpoint.pt"):
        assert_backbone(build_model(TrainConfig(weights=str(weights)), 4), best, 4)


def test_a_relative_location_is_absolute_in_the_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert TrainConfig(weights="backbone/").weights == str(tmp_path / "backbone")
    assert TrainConfig(weights="s3://bucket/backbone").weights == "s3://bucket/backbone"


def test_weights_in_storage_are_copied_and_errors_name_the_uri(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = random_weights(1)
    model_dir(tmp_path / "bucket" / "backbone", state)
    (tmp_path / "bucket" / "empty").mkdir()
    # A filesystem that is not LocalFileSystem stands in for s3://.
    remote = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    monkeypatch.setattr(trainable.storage, "open_uri",
                        lambda uri: (remote, str(uri).removeprefix("s3://bucket/")))
    model = build_model(TrainConfig(weights="s3://bucket/backbone"), 3)
    assert_backbone(model, state, 3)
    with pytest.raises(UserError) as err:
        build_model(TrainConfig(weights="s3://bucket/empty"), 3)
    assert str(err.value).startswith("weights s3://bucket/empty: a directory with neither "
                                     "model.pt (a model directory) nor checkpoint.pt")


@pytest.mark.parametrize("depth", range(6))
def test_a_loaded_cifar_stem_is_frozen_like_the_other_stages(tmp_path: Path,
                                                             depth: int) -> None:
    state = random_weights(1, stem="cifar")
    backbone = model_dir(tmp_path / "cifar-backbone", state, stem="cifar")
    model = build_model(TrainConfig(weights=str(backbone), stem="cifar",
                                    unfreeze_depth=depth), 3)
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    assert model.conv1.weight.requires_grad == (depth == 5)
    assert model.bn1.weight.requires_grad == (depth == 5)


def test_imagenet_stem_weights_leave_the_cifar_stem_new_and_trained(
        resnet18_weights_file: Path) -> None:
    model = build_model(TrainConfig(weights=str(resnet18_weights_file), stem="cifar",
                                    unfreeze_depth=0), 3)
    assert model.conv1.weight.shape == (64, 3, 3, 3) and model.conv1.weight.requires_grad
    assert not model.bn1.weight.requires_grad and not model.layer1[0].conv1.weight.requires_grad


def test_a_run_directory_gives_its_best_trials_checkpoint_to_train_and_search(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    best, other = random_weights(1), random_weights(2)
    best_checkpoint = checkpoint_dir(tmp_path / "t-best" / "checkpoint_000002", best,
                                     random_weights(3))
    other_checkpoint = checkpoint_dir(tmp_path / "t-other" / "checkpoint_000002", other, other)
    run_dir(tmp_path / "runs" / "first", {"t-other": (0.7, str(other_checkpoint)),
                                          "t-best": (0.9, str(best_checkpoint)),
                                          "t-failed": (0.0, str(other_checkpoint))})
    monkeypatch.chdir(tmp_path)
    requests: list[SearchRequest] = []
    monkeypatch.setattr("search.run.driver.new_search", requests.append)
    main(["search", "--space", str(search_space_file(tmp_path)), "--data", "digits",
          "--weights", "runs/first", "--storage", "runs"])
    assert requests[0].space.fixed["weights"] == str(best_checkpoint)

    data = write_class_tree(tmp_path / "images", per_class=4, size=16)
    main(["train", "--data", f"imagefolder:{data}", "--weights", "runs/first",
          "--unfreeze-depth", "0", "--epochs", "1", "--resolution", "16", "--batch-size", "8",
          "--device", "cpu", "--output", "model"])
    assert TrainConfig.from_yaml(tmp_path / "model" / "config.yaml").weights == str(
        best_checkpoint)
    # unfreeze_depth 0 trains fc only: the rest is the best trial's best epoch
    trained = torch.load(tmp_path / "model" / "model.pt", weights_only=True)
    for key, value in best.items():
        if not key.startswith("fc."):
            assert torch.equal(trained[key], value), key


def test_best_yaml_and_its_retrain_command_name_the_searchs_weights(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    backbone = str(tmp_path / "backbone")
    trial, rows = trial_rows(TrainConfig(weights=backbone, epochs=3).to_dict(), "t0", 0.9, 2, 3)
    write_run(tmp_path / "runs" / "tuned", [trial], rows, search_json("quick", "tuned", ["lr"]))
    monkeypatch.chdir(tmp_path / "runs")
    main(["best", "tuned"])
    lines = capsys.readouterr().out.splitlines()
    assert f"weights: {backbone} (the search's backbone, which the config names)" in lines
    assert lines[-1].startswith("resnet-hpo train --config tuned/best.yaml ")
    assert yaml.safe_load((tmp_path / "runs/tuned/best.yaml").read_text())["weights"] == backbone


def state_dict_file(tmp_path: Path, state: Weights) -> str:
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    return str(path)


def garbage_file(path: Path) -> str:
    path.write_text("not written by torch.save")
    return str(path)


def unfinished_run(tmp_path: Path) -> str:
    return str(run_dir(tmp_path / "unfinished", {"t0": (0.0, None)}))


BAD_WEIGHTS = [
    pytest.param(lambda tmp: state_dict_file(tmp, resnet34().state_dict()),
                 "weights.pth: not a ResNet18 state dict (unexpected key layer1.2.bn1.bias)",
                 id="resnet34"),
    pytest.param(lambda tmp: state_dict_file(tmp, resnet50().state_dict()),
                 "weights.pth: not a ResNet18 state dict (unexpected key layer1.0.bn3.bias)",
                 id="resnet50"),
    pytest.param(lambda tmp: str(model_dir(tmp / "cifar", random_weights(1, stem="cifar"),
                                           stem="cifar")),
                 "cifar: its conv1 is the CIFAR stem's (3x3), which the ImageNet stem (7x7) "
                 "cannot take; use stem cifar", id="cifar-stem"),
    pytest.param(lambda tmp: str(tmp),
                 "a directory with neither model.pt (a model directory) nor checkpoint.pt (a "
                 "trial checkpoint); use imagenet, none, or ResNet18 weights", id="other-dir"),
    pytest.param(unfinished_run,
                 "unfinished: no trial of this search has a checkpoint and a score yet",
                 id="unfinished-run"),
    pytest.param(lambda tmp: garbage_file(tmp / "model.pt"),
                 "model.pt: not a loadable PyTorch file (", id="unreadable"),
    pytest.param(lambda tmp: str(tmp / "absent"),
                 "absent: no such file or directory; use imagenet, none", id="missing"),
]


@pytest.mark.parametrize(("make_weights", "message"), BAD_WEIGHTS)
def test_bad_weights_for_train_are_one_line_and_nothing_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        make_weights: Callable[[Path], str], message: str) -> None:
    monkeypatch.setattr("search.commands.train.load_dataset", never("read the data"))
    (tmp_path / "made").mkdir()
    weights = make_weights(tmp_path / "made")
    err = one_line_error(capsys, ["train", "--data", "digits", "--weights", weights,
                                  "--output", str(tmp_path / "out")])
    assert weights in err and message in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("make_weights", "message"), BAD_WEIGHTS)
def test_bad_weights_for_search_are_one_line_and_nothing_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        make_weights: Callable[[Path], str], message: str) -> None:
    monkeypatch.setattr("search.run.driver.new_search", never("open the run or start Ray"))
    (tmp_path / "made").mkdir()
    weights = make_weights(tmp_path / "made")
    err = one_line_error(capsys, ["search", "--space", str(search_space_file(tmp_path)),
                                  "--data", "digits", "--weights", weights,
                                  "--storage", str(tmp_path / "runs")])
    assert weights in err and message in err
    assert not (tmp_path / "runs").exists()


def test_a_searched_weights_choice_must_be_written_as_a_config_holds_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        resnet18_weights_file: Path) -> None:
    monkeypatch.setattr("search.run.driver.new_search", never("open the run or start Ray"))
    monkeypatch.chdir(resnet18_weights_file.parent)
    space = search_space_file(tmp_path)
    space.write_text(space.read_text().replace("weights: none, ", "") + (
        f"  weights: {{type: categorical, choices: [none, {resnet18_weights_file.name}]}}\n"))
    err = one_line_error(capsys, ["search", "--space", str(space), "--data", "digits"])
    assert (f"key 'search.weights': the choice '{resnet18_weights_file.name}' stands for "
            f"{resnet18_weights_file}; write it so") in err


def never(what: str) -> Callable[..., Any]:
    def called(*args: object, **kwargs: object) -> None:
        pytest.fail(f"bad weights should be refused before anything tries to {what}")
    return called
