"""The Tune stopper of a search with --budget: it stops each running trial at its next
report once the budget is spent."""

from __future__ import annotations

from typing import Any

from ray.tune.stopper import Stopper

from search.run.budget import running_account


class BudgetStopper(Stopper):
    """Stops trials one by one, at their reports, and never the whole experiment at once:
    Tune's stop_all ends running trials without telling the searcher or the callbacks
    (Ray 2.60, TuneController._stop_experiment_if_needed), which would leave them RUNNING in
    the study and in trials.parquet. The searcher starts no trial once the account refuses
    one, so the search ends when the last running trial has been stopped.

    It asks the running search's account (search/run/budget.py) rather than holding one:
    Tune pickles it with the run's config, apart from the searcher."""

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        account = running_account()
        if account is None:
            return False
        account.epoch_reported(trial_id, float(result.get("time_this_iter_s", 0.0)))
        if not account.exhausted():
            return False
        account.stopped_by_budget.add(trial_id)
        return True

    def stop_all(self) -> bool:
        return False
