"""Priors: the recipes the fine-tuning guides teach, the first trials of a new search.

A new search enqueues them before the sampler draws anything (as --warm-start enqueues an
earlier run's best configs, which replace them), whichever the sampler: with the small
budgets users run (8-32 trials), starting from what the literature recommends beats random
draws, and TPE counts them among its startup trials. Each prior is a set of TrainConfig
values over its defaults; only the keys the space searches are taken, clipped into the
space's ranges, a choice the space lacks left to the sampler (search/sampling/warm_start.py
enqueued_params), and priors that end up equal are tried once. A space that trains from
random weights (`weights: none`) gets none: the recipes are for fine-tuning a pretrained
backbone. On the replay's noisy tables of 2026-12-07 (100 paired seeds, README: How the
default search spends its trials) random search with the recipes first handed over a better
model than random search alone on both fine-tuning tasks at 8 and 16 trials, with ASHA's
reduction factor 3 of spaces/default.yaml.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import optuna

from search.sampling.warm_start import enqueued_params
from spaces import SearchSpace
from trainable.augment import resolved

PRIORS: tuple[dict[str, Any], ...] = (
    # TrainConfig's defaults: torchvision's fine-tuning recipe (SGD with Nesterov momentum
    # 0.9, lr 0.05, weight decay 5e-5, a warmup epoch, label smoothing 0.1, flip and crop
    # as `auto` picks them, every stage trained).
    {},
    # Gentler fine-tuning (Li et al., ICLR 2020; timm's layer decay 0.75): a fifth of the lr,
    # the lower stages slower still.
    {"lr": 0.01, "layer_decay": 0.75, "weight_decay": 1.0e-4},
    # A linear probe with a high lr (Kornblith et al., CVPR 2019): the strongest strategy
    # with a few images a class; where the backbone is fixed to train, the recipe at 2x lr.
    {"lr": 0.1, "unfreeze_depth": 0},
)


def prior_params(space: SearchSpace, data_source: str) -> list[dict[str, Any]]:
    """The priors as parameters of `space`, in order, without repeats."""
    configs = []
    for prior in PRIORS:
        cfg = dataclasses.asdict(resolved(space.config(prior), data_source))
        params, _ = enqueued_params(cfg, space)
        if params and params not in configs:
            configs.append(params)
    return configs


def enqueue_priors(study: optuna.Study, space: SearchSpace, data_source: str) -> int:
    """Enqueue the priors (none from random weights); returns how many."""
    if space.config({}).weights == "none":
        return 0
    configs = prior_params(space, data_source)
    for params in configs:
        study.enqueue_trial(params, skip_if_exists=False)
    return len(configs)
