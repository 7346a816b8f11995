"""The guides' recipes a new search tries first (search/priors.py)."""

from __future__ import annotations

import optuna
import pytest

from search.priors import PRIORS, enqueue_priors, prior_params
from search.warm_start import fits
from spaces import DefineByRun, load_space, parse_space


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


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_a_study_asks_the_priors_first_except_with_the_random_sampler(sampler: str) -> None:
    space = load_space("quick").replace(sampler=sampler)
    study = optuna.create_study()
    enqueued = enqueue_priors(study, space, "digits")
    assert enqueued == (0 if sampler == "random" else len(PRIORS))
    define = DefineByRun(space)
    first = [define(study.ask()) for _ in range(len(PRIORS))]
    searched = [{p.name: config[p.name] for p in space.params} for config in first]
    priors = prior_params(space, "digits")
    assert (searched == priors) is (sampler != "random")
