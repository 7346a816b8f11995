"""Space files: shipped spaces load, bad files fail with one line naming file and key."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from spaces import DefineByRun, load_space
from trainable.errors import UserError

optuna.logging.set_verbosity(optuna.logging.WARNING)

GOOD = """
metric: val_acc
sampler: tpe
scheduler: {name: asha, max_epochs: 4, grace_period: 1, reduction_factor: 2}
fixed: {resolution: 16, weights: none}
search:
  lr:        {type: float, low: 1e-3, high: 1.0e-1, log: true}
  optimizer: {type: categorical, choices: [sgd, adamw]}
  momentum:  {type: float, low: 0.8, high: 0.99, when: {optimizer: sgd}}
  unfreeze_depth: {type: int, low: 0, high: 5}
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name", ["quick", "default", "cifar10"])
def test_shipped_spaces_load_by_name_and_sample_valid_configs(name: str) -> None:
    space = load_space(name)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    for _ in range(5):
        config = space.config(DefineByRun(space)(study.ask()))
        assert config.epochs == space.scheduler.max_epochs


def test_yaml_1e_notation_is_a_number_and_when_conditions_apply(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, GOOD))
    lr = next(p for p in space.params if p.name == "lr")
    assert lr.distribution.low == pytest.approx(1e-3)  # type: ignore[attr-defined]
    names = [p.name for p in space.params]
    assert names.index("optimizer") < names.index("momentum")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(1))
    for _ in range(10):
        sampled = DefineByRun(space)(study.ask())
        assert ("momentum" in sampled) == (sampled["optimizer"] == "sgd")


def test_flag_override_fixes_a_searched_key_and_keeps_conditions_it_meets(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, GOOD))
    assert "momentum" in [p.name for p in space.replace(fixed={"optimizer": "sgd"}).params]
    adamw = space.replace(fixed={"optimizer": "adamw"})
    assert [p.name for p in adamw.params] == ["lr", "unfreeze_depth"]
    assert adamw.config({}).optimizer == "adamw"


RESOLUTIONS = """
scheduler: {name: fifo, max_epochs: 2}
fixed: {weights: none}
search:
  resolution: %s
"""


@pytest.mark.parametrize(("spec", "decoded"), [
    ("{type: categorical, choices: [24, 16, 32]}", 32),
    ("{type: int, low: 16, high: 40, step: 8}", 40),
])
def test_resolution_is_searched_from_one_decode_at_the_largest(tmp_path: Path, spec: str,
                                                               decoded: int) -> None:
    space = load_space(write(tmp_path, RESOLUTIONS % spec))
    assert space.decode_resolution == decoded
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(0))
    sampled = {space.config(DefineByRun(space)(study.ask())).resolution for _ in range(20)}
    assert len(sampled) > 1 and max(sampled) <= decoded
    assert space.replace(fixed={"resolution": 24}).decode_resolution == 24  # --resolution 24


def test_a_conditional_resolution_decodes_for_the_trials_without_it_too(tmp_path: Path) -> None:
    text = RESOLUTIONS % "{type: categorical, choices: [8, 16], when: {stem: cifar}}"
    space = load_space(write(tmp_path, text + "  stem: {type: categorical, choices: "
                                              "[cifar, imagenet]}\n"))
    assert space.decode_resolution == 32  # the default, which imagenet-stem trials keep


@pytest.mark.parametrize(("change", "expected"), [
    ("search:\n  resolution: {type: categorical, choices: [16, 2048]}",
     "key 'search.resolution': must be in [8, 1024], got 2048"),
    ("search:\n  epochs: {type: int, low: 1, high: 3}", "key 'search.epochs' cannot be searched"),
    ("search:\n  val_fraction: {type: float, low: 0.1, high: 0.3}",
     "key 'search.val_fraction' cannot be searched"),
    ("search:\n  warmup_epoch: {type: float, low: 0, high: 1}",
     "unknown key 'warmup_epoch'; did you mean 'warmup_epochs'?"),
    ("search:\n  lr: {type: float, low: 0.5, high: 0.1}", "key 'search.lr': low (0.5) must be < "
                                                         "high (0.1)"),
    ("search:\n  lr: {type: float, low: -1.0, high: 0.1}",
     "key 'search.lr.low': must be in (0, 10], got -1.0"),
    ("search:\n  lr: {type: float, low: abc, high: 0.1}",
     "key 'search.lr.low': must be a finite number, got 'abc'"),
    ("search:\n  resolution: {type: int, low: 16, high: 64, step: 0.5}",
     "key 'search.resolution.step': must be an integer, got 0.5"),
    ("search:\n  optimizer: {type: float, low: 0, high: 1}", "type float does not fit"),
    ("search:\n  lr: {type: float, low: 0.1, high: 1.0, when: {optimiser: sgd}}",
     "key 'search.lr.when' refers to 'optimiser'"),
    ("search:\n  optimizer: {type: categorical, choices: [sgd, lion]}", "key 'search.optimizer'"),
    ("sampler: annealing", "key 'sampler' must be one of tpe, cmaes, random, qmc, gp"),
    ("scheduler: {name: hyperband}", "key 'scheduler.name' must be one of asha, fifo"),
    ("fixed: {batch_size: -4}", "config key 'batch_size'"),
    ("search:\n  augment: {type: categorical, choices: [none, augmix]}",
     "key 'search.augment': must be one of none, trivial, randaugment, autoaugment, got 'augmix'"),
    ("search:\n  random_erasing: {type: float, low: 0.0, high: 1.5}",
     "key 'search.random_erasing.high': must be in [0, 1], got 1.5"),
    ("search:\n  randaugment_m: {type: int, low: 5, high: 40}",
     "key 'search.randaugment_m.high': must be in [0, 30], got 40"),
    ("fixed: {ema_decay: 1.0}", "config key 'ema_decay': must be in [0, 1), got 1.0"),
    ("fixed: {epochs: 3}", "set scheduler.max_epochs"),
    ("trials: 3", "unknown key 'trials'"),
    ("search: [lr]", "key 'search' must be a mapping"),
    ("search:\n  lr: {type: float, low: 0.1, high: 1.0, lg: true}", "unknown key 'lg'"),
])
def test_bad_space_fails_with_one_line_naming_file_and_key(tmp_path: Path, change: str,
                                                           expected: str) -> None:
    path = write(tmp_path, change + "\n")
    with pytest.raises(UserError) as e:
        load_space(path)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(path)
    assert expected in message


def test_missing_and_unparsable_space_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such shipped space; use one of cifar10, default"):
        load_space("nosuch")
    with pytest.raises(UserError, match="cannot read"):
        load_space(str(tmp_path / "missing.yaml"))
    with pytest.raises(UserError, match="not valid YAML at line"):
        load_space(write(tmp_path, "search: {lr: [\n"))
