import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from search.cli import main
from trainable import TrainConfig

TINY_FLAGS = ["--epochs", "1", "--weights", "none", "--resolution", "16", "--batch-size", "8",
              "--device", "cpu"]


def train(tree: Path, out: Path, *flags: str) -> None:
    main(["train", "--data", f"imagefolder:{tree}", *TINY_FLAGS, "--output", str(out), *flags])


def test_train_writes_config_model_and_metrics(split_tree: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    train(split_tree, out, "--lr", "0.02")
    cfg = TrainConfig.from_yaml(out / "config.yaml")
    assert cfg == TrainConfig(data=f"imagefolder:{split_tree}", epochs=1, weights="none",
                              resolution=16, batch_size=8, lr=0.02)
    assert set(yaml.safe_load((out / "config.yaml").read_text())) == set(cfg.to_dict())
    state = torch.load(out / "model.pt", weights_only=True)
    assert state["fc.weight"].shape == (3, 512)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_epoch"] == 1 and len(metrics["history"]) == 1
    assert metrics["class_names"] == ["blue", "green", "red"]
    assert 0 <= metrics["test_acc"] <= 1
    printed = capsys.readouterr().out
    assert "epoch   1/1" in printed and "test_acc" in printed


def test_without_a_test_split_metrics_hold_the_best_val_acc(flat_tree: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    train(flat_tree, tmp_path / "out")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["test_acc"] is None and 0 <= metrics["best"]["val_acc"] <= 1
    assert "no test split" in capsys.readouterr().out


def test_a_flag_overrides_the_config_file(flat_tree: Path, tmp_path: Path) -> None:
    config = tmp_path / "best.yaml"
    config.write_text(f"data: imagefolder:{flat_tree}\nlr: 1.0e-3\nlabel_smoothing: 0.2\n"
                      "resolution: 32\n")
    main(["train", "--config", str(config), *TINY_FLAGS, "--lr", "0.03",
          "--output", str(tmp_path / "out")])
    cfg = TrainConfig.from_yaml(tmp_path / "out" / "config.yaml")
    assert (cfg.lr, cfg.label_smoothing, cfg.resolution) == (0.03, 0.2, 16)


def bad_config(tmp_path: Path) -> list[str]:
    config = tmp_path / "bad.yaml"
    config.write_text("lr: 0.1\nlearning_rate: 0.1\n")
    return ["--config", str(config)]


def existing_model(tmp_path: Path) -> list[str]:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "model.pt").write_bytes(b"")
    return ["--output", str(tmp_path / "taken")]


@pytest.mark.parametrize("make_flags, message", [
    (lambda tmp: ["--lr", "-0.1"], "flags: config key 'lr': must be in (0, 10], got -0.1"),
    (bad_config, "bad.yaml: unknown key 'learning_rate'"),
    (lambda tmp: ["--amp", "fp16"], "config key 'amp': fp16 needs CUDA"),
    (lambda tmp: ["--augment", "augmix"], "flags: config key 'augment': must be one of none, "
                                          "trivial, randaugment, autoaugment, got 'augmix'"),
    (lambda tmp: ["--ema-decay", "1.5"], "flags: config key 'ema_decay': must be in [0, 1), "
                                          "got 1.5"),
    (lambda tmp: ["--data", f"imagefolder:{tmp / 'absent'}"], "absent: no such folder"),
    (lambda tmp: ["--config", str(tmp)], "cannot read"),
    (lambda tmp: ["--config", str(tmp / "absent.yaml")], "absent.yaml: cannot read"),
    (existing_model, "already holds a model (model.pt)"),
])
def test_bad_input_is_exit_2_and_one_error_line(flat_tree: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                make_flags: Callable[[Path], list[str]],
                                                message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", f"imagefolder:{flat_tree}", *TINY_FLAGS,
              "--output", str(tmp_path / "out"), *make_flags(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("resnet-hpo: error: "), err
    assert message in lines[0]
    assert not (tmp_path / "out" / "model.pt").exists()


@pytest.mark.parametrize("text, message", [
    ("learning_rate: 0.1\n", "unknown key 'learning_rate'"),
    ("lr: -0.1\n", "config key 'lr': must be in (0, 10], got -0.1"),
    ("epochs: many\n", "config key 'epochs': must be an integer, got 'many'"),
    ("[lr, 0.1]\n", "must be a mapping of key: value"),
])
def test_a_bad_config_file_is_refused_before_any_data_is_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        text: str, message: str) -> None:
    def decode(*args: object, **kwargs: object) -> None:
        pytest.fail("a bad config should be refused before the data is decoded")

    monkeypatch.setattr("search.commands.train.load_dataset", decode)
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(config), "--data", "digits",
              "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"resnet-hpo: error: {config}: ")
    assert message in lines[0]
    assert not (tmp_path / "out").exists()
