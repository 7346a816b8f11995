"""The search's Tune searcher: Ray's OptunaSearch on the run's study (search/study.py)."""

from __future__ import annotations

from typing import Any

from ray.tune.search.optuna import OptunaSearch

from search.study import TRIAL_ID_ATTR

EPOCH = "epoch"  # the step of a trial's intermediate values: the epoch its result is for


class StudySearch(OptunaSearch):
    """OptunaSearch that names each study trial after its Tune trial, and records every epoch
    a trial reports as the trial's intermediate value at step = epoch, once.

    OptunaSearch reports only the results Tune passes to on_trial_result, and Tune passes a
    result on which the scheduler stops the trial (ASHA at a rung or at max_epochs) to
    on_trial_complete alone: that epoch would be missing from the study's learning curves.
    An epoch the study holds already (run again from a checkpoint after a restore), and a
    trial the study has finished (told before a kill, run again from its checkpoint because
    Tune's saved state is older), are left as they are."""

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        new = trial_id not in self._ot_trials
        config = super().suggest(trial_id)
        if new:
            self._ot_trials[trial_id].set_user_attr(TRIAL_ID_ATTR, trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self.record_epoch(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        if result:
            self.record_epoch(trial_id, result)
        super().on_trial_complete(trial_id, result, error)

    def record_epoch(self, trial_id: str, result: dict[str, Any]) -> None:
        value, epoch = result.get(self.metric), result.get(EPOCH)
        if value is None or epoch is None or trial_id in self._completed_trials:
            return
        trial = self._ot_trials[trial_id]
        stored = trial.storage.get_trial(trial._trial_id)  # the journal, not a pickled copy
        if not stored.state.is_finished() and epoch not in stored.intermediate_values:
            trial.report(value, epoch)
