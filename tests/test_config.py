from pathlib import Path

import pytest

from trainable import TrainConfig, UserError


def test_defaults_are_valid_and_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = TrainConfig(lr=0.02, unfreeze_depth=2, optimizer="adamw", amp="off")
    cfg.to_yaml(tmp_path / "c.yaml")
    assert TrainConfig.from_yaml(tmp_path / "c.yaml") == cfg


def test_from_dict_casts_yaml_and_cli_scalars() -> None:
    cfg = TrainConfig.from_dict({"lr": "1e-3", "epochs": "4", "nesterov": "false",
                                 "batch_size": 32.0, "warmup_epochs": 0})
    assert (cfg.lr, cfg.epochs, cfg.nesterov, cfg.batch_size) == (1e-3, 4, False, 32)
    assert isinstance(cfg.warmup_epochs, float)


@pytest.mark.parametrize("values, message", [
    ({"lr": -0.1}, "config key 'lr': must be in (0, 10], got -0.1"),
    ({"unfreeze_depth": 6}, "config key 'unfreeze_depth': must be in [0, 5], got 6"),
    ({"optimizer": "adam"}, "config key 'optimizer': must be one of sgd, adamw, got 'adam'"),
    ({"epochs": 2.5}, "config key 'epochs': must be an integer, got 2.5"),
    ({"epochs": float("inf")}, "config key 'epochs': must be an integer, got inf"),
    ({"lr": "fast"}, "config key 'lr': must be a finite number, got 'fast'"),
    ({"nesterov": "maybe"}, "config key 'nesterov': must be true or false, got 'maybe'"),
    ({"learning_rate": 0.1}, "unknown key 'learning_rate'"),
    ({"lr": 0.01, "min_lr": 0.1}, "config key 'min_lr': must be <= lr (0.01), got 0.1"),
    ({"augment": "augmix"}, "config key 'augment': must be one of none, trivial, randaugment, "
                            "autoaugment, got 'augmix'"),
    ({"randaugment_m": 31}, "config key 'randaugment_m': must be in [0, 30], got 31"),
    ({"randaugment_n": 0}, "config key 'randaugment_n': must be in [1, 16], got 0"),
    ({"random_erasing": 1.5}, "config key 'random_erasing': must be in [0, 1], got 1.5"),
    ({"ema_decay": 1.0}, "config key 'ema_decay': must be in [0, 1), got 1.0"),
    ({"ema_decay": -0.1}, "config key 'ema_decay': must be in [0, 1), got -0.1"),
    ({"ema_steps": 0}, "config key 'ema_steps': must be in [1, 100000], got 0"),
])
def test_bad_values_name_the_key_and_what_is_allowed(values: dict, message: str) -> None:
    with pytest.raises(UserError) as err:
        TrainConfig.from_dict(values, source="my.yaml")
    assert str(err.value).startswith("my.yaml: " + message)
    assert "\n" not in str(err.value)


def test_unknown_key_suggests_the_closest_field() -> None:
    with pytest.raises(UserError, match="did you mean 'layer_decay'"):
        TrainConfig.from_dict({"layer_decy": 0.5})
