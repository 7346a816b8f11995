"""The samplers a search builds by name (the space's `sampler`, --sampler): what the driver
gives the study, and what the benchmarks replay, so they measure what ships."""

from __future__ import annotations

import optuna


def startup_trials(trials: int) -> int:
    """TPE's random trials before it models anything: a quarter of the search, 2 to 10
    (Optuna's own default is 10, which leaves a 12-trial search with 2 model-based trials)."""
    return max(2, min(10, trials // 4))


def make_sampler(name: str, seed: int, trials: int) -> optuna.samplers.BaseSampler:
    """The sampler of a search of `trials` trials (TPE and GP start with startup_trials
    random ones)."""
    if name == "tpe":
        # constant_liar keeps parallel trials from sampling the same point. Independent
        # TPE, not Optuna 5's multivariate default: as good or better on the single-seed
        # curves of 2026-12-05 (not rechecked since). On the noisy tables of 2026-12-07 it
        # handed over a better model than random search at 8 trials only, so spaces sample
        # at random unless they say otherwise (README: How the default search spends its
        # trials).
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials(trials),
                                          multivariate=False, constant_liar=True)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup_trials(trials))
    return optuna.samplers.RandomSampler(seed=seed)
