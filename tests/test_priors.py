"""The guides' recipes a new search tries first (search/sampling/priors.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState

from search.cli import main
from search.rundir import STUDY_NAME, RunDir
from search.sampling.priors import PRIORS, enqueue_priors, prior_params
from search.study import open_storage
from spaces import DefineByRun, fits, load_space, parse_space


def test_priors_are_the_recipes_in_the_spaces_ranges_in_order() -> None:
    space = load_space("quick")  # lr 0.01..0.3 at 32px
    priors = prior_params(space, "digits")
    assert len(priors) == len(PRIORS)
    assert [p["lr"] for p in priors] == [0.05, 0.01, 0.1]  # the recipe (defaults) first
    assert {(p["flip"], p["crop"]) for p in priors} == {("none", "pad")}  # `auto` for digits
    for params in priors:
        assert set(params) == {p.name for p in space.params}
        assert all(fits(params[p.name], p.distribution) for p in space.params)
    photos = prior_params(load_space("default"), "imagefolder:/photos")  # 224px
    assert {(p["flip"], p["crop"]) for p in photos} == {("horizontal", "resized")}
    assert [p["unfreeze_depth"] for p in photos] == [5, 5, 0]  # the last a linear probe


def test_priors_are_clipped_into_the_space_and_equal_ones_tried_once() -> None:
    space = parse_space("search:\n  lr: {type: float, low: 0.2, high: 0.5}\n"
                        "  crop: {type: categorical, choices: [resized, none]}\n", "s.yaml")
    # every lr is clipped to 0.2; `pad` is not a choice here, so the sampler picks the crop
    assert prior_params(space, "digits") == [{"lr": 0.2}]


@pytest.mark.parametrize(("sampler", "weights"), [("tpe", "imagenet"), ("random", "imagenet"),
                                                  ("tpe", "none")])
def test_a_study_asks_the_priors_first_whichever_the_sampler_except_from_random_weights(
        sampler: str, weights: str) -> None:
    quick = load_space("quick")
    space = quick.replace(sampler=sampler, fixed={**quick.fixed, "weights": weights})
    study = optuna.create_study()
    enqueued = enqueue_priors(study, space, "digits")
    tried = weights != "none"
    assert enqueued == (len(PRIORS) if tried else 0)
    define = DefineByRun(space)
    first = [define(study.ask()) for _ in range(len(PRIORS))]
    searched = [{p.name: config[p.name] for p in space.params} for config in first]
    assert (searched == prior_params(space, "digits")) is tried


@pytest.mark.ray
def test_a_new_search_from_a_backbone_enqueues_the_priors_in_its_study(
        tmp_path: Path, ray_session: None, resnet18_weights_file: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The driver's road for a new search, up to the tuner (which would ask them first)."""
    monkeypatch.setattr("search.run.driver.build_tuner",
                        lambda *args: SimpleNamespace(fit=lambda: None))
    monkeypatch.setattr("search.run.driver.finish_search", lambda *args: None)
    main(["search", "--space", "quick", "--data", "digits", "--trials", "4",
          "--weights", str(resnet18_weights_file), "--storage", str(tmp_path), "--name", "p"])
    assert "the guides' recipes first: 3 prior configs" in capsys.readouterr().out
    study = optuna.load_study(study_name=STUDY_NAME,
                              storage=open_storage(RunDir.open(tmp_path / "p")))
    space = load_space("quick")
    assert len(study.get_trials(states=[TrialState.WAITING])) == len(PRIORS)
    asked = [DefineByRun(space)(study.ask()) for _ in PRIORS]
    assert [{p.name: config[p.name] for p in space.params} for config in asked] == prior_params(
        space, "digits")
