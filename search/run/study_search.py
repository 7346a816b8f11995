"""The search's Tune searcher: Optuna's ask and tell on the run's study (search/study.py)."""

from __future__ import annotations

import math
import pickle
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from search.run.budget import running_account
from search.study import SUPERSEDES_ATTR, TRIAL_ID_ATTR
from spaces import DefineByRun
from trainable.ranking import study_direction

EPOCH = "epoch"  # the step of a trial's intermediate values: the epoch its result is for


class StudySearch(Searcher):
    """Each Tune trial is a study trial asked of the sampler (enqueued priors or warm-start
    configs first), named after the Tune trial (TRIAL_ID_ATTR); every epoch a trial reports
    is its intermediate value at step = epoch, once. A trial that ran its whole epoch budget
    is told COMPLETE with the metric of its last result, its running best; one that ended
    before it (stopped by ASHA or early stopping, or diverged after its first epoch) is told
    PRUNED, so that TPE ranks it by the epoch it reached and its value there, below the
    complete ones. (Ray's OptunaSearch tells a stopped trial COMPLETE with its value at the
    rung, as if a finished trial had reached only that.)

    Tune passes a result on which the scheduler stops the trial (ASHA at a rung or at
    max_epochs) to on_trial_complete alone, so that is recorded too. The journal, not this
    searcher's saved state, says what the study holds: an epoch it holds already (run again
    from a checkpoint after a restore) is left as it is. A trial it has finished but Tune's
    older saved state runs again after a kill (stopped by ASHA at a rung, or failed, then
    restored as running) can end otherwise this time, say COMPLETE after all its epochs:
    Optuna changes no finished trial, so that ending is added as a new study trial with the
    same params and Tune trial id (SUPERSEDES_ATTR: the number of the one it replaces), and
    readers take a Tune trial's latest (search.study.latest_trials).

    Tune saves the searcher with pickle: the study's storage reopens the run's journal and
    its sampler keeps its random state. Each Tune trial's optuna.Trial is kept with it, as
    Optuna reopens no running trial through its public API.

    With a budget (the running search's account, search/run/budget.py), suggest returns
    Searcher.FINISHED once the account refuses a new trial, and Tune ends the search when
    the running trials have ended."""

    def __init__(self, space: DefineByRun, metric: str, mode: str,
                 storage: str | optuna.storages.BaseStorage | None = None,
                 study_name: str | None = None,
                 sampler: optuna.samplers.BaseSampler | None = None):
        super().__init__(metric=metric, mode=mode)
        self.space = space
        self.study = optuna.create_study(
            storage=storage, sampler=sampler, pruner=optuna.pruners.NopPruner(),
            study_name=study_name, load_if_exists=True,
            direction=study_direction(mode))
        self.trials: dict[str, optuna.Trial] = {}  # Tune trial id -> its study trial
        # Tune trial id -> epoch -> value, reported after the journal had finished its trial
        self.late_epochs: dict[str, dict[int, float]] = {}

    def suggest(self, trial_id: str) -> dict[str, Any]:
        account = running_account()
        if account is not None:
            if not account.may_start():
                # a str: Ray types suggest as returning a dict, but documents FINISHED
                return Searcher.FINISHED  # type: ignore[return-value]
            account.trial_started(trial_id)
        trial = self.study.ask()
        trial.set_user_attr(TRIAL_ID_ATTR, trial_id)
        self.trials[trial_id] = trial
        return self.space(trial)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self.record_epoch(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        account = running_account()
        if account is not None:
            account.trial_finished(trial_id)
        trial, result = self.trials[trial_id], result or {}
        if result:
            self.record_epoch(trial_id, result)
        state = self.outcome(result, error)
        value = result[self.metric] if state == TrialState.COMPLETE else None
        stored = self.stored(trial)
        if not stored.state.is_finished():
            # told PRUNED, the study takes its last intermediate value as the trial's
            self.study.tell(trial, value, state=state)
            return
        late = self.late_epochs.pop(trial_id, {})
        if state != stored.state or max(late, default=0) > max(stored.intermediate_values,
                                                                 default=0):
            self.supersede(stored, state, value, late)

    def supersede(self, stored: optuna.trial.FrozenTrial, state: TrialState,
                  value: float | None, late: dict[int, float]) -> None:
        """Add the trial's new ending to the study as a trial of its own (see the class)."""
        values = {**stored.intermediate_values, **late}
        if state == TrialState.PRUNED and values and math.isfinite(values[max(values)]):
            value = values[max(values)]  # as tell does
        self.study.add_trial(optuna.trial.create_trial(
            state=state, value=value, params=stored.params,
            distributions=stored.distributions, intermediate_values=values,
            user_attrs={**stored.user_attrs, SUPERSEDES_ATTR: stored.number}))

    def outcome(self, result: dict[str, Any], error: bool) -> TrialState:
        """What a trial that ended on `result` (empty: before its first) is told as."""
        value = result.get(self.metric)
        if value is None:  # failed, or removed before its first result
            return TrialState.FAIL if error else TrialState.PRUNED
        if math.isnan(value):  # diverged in its first epoch: Optuna takes no NaN value
            return TrialState.FAIL
        if result.get(EPOCH, 0) < self.space.space.scheduler.max_epochs:
            return TrialState.PRUNED
        return TrialState.COMPLETE

    def record_epoch(self, trial_id: str, result: dict[str, Any]) -> None:
        value, epoch = result.get(self.metric), result.get(EPOCH)
        if value is None or epoch is None:
            return
        trial = self.trials[trial_id]
        stored = self.stored(trial)
        if stored.state.is_finished():
            self.late_epochs.setdefault(trial_id, {})[epoch] = value
        elif epoch not in stored.intermediate_values:
            trial.report(value, epoch)

    def stored(self, trial: optuna.Trial) -> optuna.trial.FrozenTrial:
        """The trial as the journal holds it now (a restored Trial caches an older copy)."""
        return self.study.get_trials(deepcopy=False)[trial.number]

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        state.pop("account", None)  # saved before the account was kept in the run
        self.__dict__.update(state)
