"""`--budget`: how long a search may run, in wall time or GPU-hours, and what it has spent.

A BudgetAccount is shared by the search's searcher (search/run/study_search.py), which asks it
whether a new trial may start, and its BudgetStopper (search/run/budget_stopper.py), which
stops the running trials once the budget is spent. No Ray here, so it is tested with a fake
clock.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from trainable.errors import UserError

BUDGET_FORMS = "a wall time (45s, 90m, 2h) or GPU-hours (1.5gpu-h), greater than 0"
BUDGET_PATTERN = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(s|m|h|gpu-h)")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "gpu-h": 3600}


@dataclass(frozen=True)
class Budget:
    seconds: float  # of wall time, or GPU-seconds (GPU-hours x 3600)
    unit: Literal["wall", "gpu-h"]

    def __str__(self) -> str:
        if self.unit == "gpu-h":
            return f"{self.seconds / 3600:g}gpu-h"
        return format_duration(self.seconds)


def parse_budget(text: str) -> Budget:
    match = BUDGET_PATTERN.fullmatch(text.strip())
    amount = float(match.group(1)) if match else 0.0
    if match is None or amount <= 0:
        raise UserError(f"--budget {text!r}: give {BUDGET_FORMS}")
    suffix = match.group(2)
    return Budget(amount * UNIT_SECONDS[suffix], "gpu-h" if suffix == "gpu-h" else "wall")


def format_duration(seconds: float) -> str:
    """45s, 2m05s, 1h58m: to the second under an hour, to the minute above."""
    if seconds < 3600:
        minutes, secs = divmod(round(seconds), 60)
        if not minutes:
            return f"{secs}s"
        return f"{minutes}m{secs:02d}s" if secs else f"{minutes}m"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours}h{minutes:02d}m" if minutes else f"{hours}h"


@dataclass(frozen=True)
class ConfirmCost:
    """What a search's confirm stage (search/run/confirm.py) will run: `runs` trials of `epochs`
    epochs each, `slots` at a time."""
    runs: int
    epochs: int
    slots: int


class BudgetAccount:
    """The time a search has spent against its budget, from when the account was opened
    (just before the tuner runs).

    Wall time is the clock since then; GPU time is each trial's time from when the searcher
    started it to its end, times gpus_per_trial. A new trial may start while the time spent
    plus an estimate of the trial's own stays within the budget: the mean duration of the
    trials finished so far, or before any has finished, the longest epoch reported (0
    before the first report, so the first trial always starts).

    With a confirm stage (`confirm`), its cost is held back: K x R runs of the full epochs
    at the mean epoch time reported so far, in waves of `slots` for wall time. It is 0
    before the first report (no epoch time is known before), so the first trial always
    starts; from then on no trial starts, and running trials are stopped, once the time
    spent plus the confirm's would pass the budget.

    Pickled (Tune saves the searcher and the run config), it keeps the budget and what has
    been spent; the clock restarts where it is unpickled, and trials then running count
    again from their next report.
    """

    # class defaults: an account pickled before the confirm stage existed lacks them
    confirm: ConfirmCost | None = None
    epoch_s_total = 0.0
    epochs_reported = 0
    confirm_spent_s: float | None = None  # in the budget's unit, once the confirm has run

    def __init__(self, budget: Budget, gpus_per_trial: float,
                 clock: Callable[[], float] = time.monotonic,
                 confirm: ConfirmCost | None = None):
        self.budget, self.gpus_per_trial, self.confirm = budget, gpus_per_trial, confirm
        self._open(clock)
        self.earlier_wall_s = 0.0  # spent before the last unpickling
        self.earlier_gpu_s = 0.0  # by trials that were running then
        self.finished_trial_s: list[float] = []
        self.longest_epoch_s = 0.0
        self.trial_ids: set[str] = set()  # every trial started on this budget
        self.stopped_by_budget: set[str] = set()

    def _open(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.opened = clock()
        self.running: dict[str, float] = {}  # trial id -> clock when it started

    def __getstate__(self) -> dict[str, Any]:
        state = {key: value for key, value in self.__dict__.items()
                 if key not in ("clock", "opened", "running")}
        state.update(earlier_wall_s=self.wall_spent_s,
                     earlier_gpu_s=self.earlier_gpu_s + self._running_s() * self.gpus_per_trial)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open(time.monotonic)

    def carry_over(self, saved: BudgetAccount) -> None:
        """Go on from what `saved` (the same search's account, saved before it was
        interrupted) had spent."""
        self.__dict__.update(saved.__getstate__())
        self._open(self.clock)

    @property
    def wall_spent_s(self) -> float:
        return self.earlier_wall_s + self.clock() - self.opened

    @property
    def gpu_spent_s(self) -> float:
        trial_s = sum(self.finished_trial_s) + self._running_s()
        return self.earlier_gpu_s + trial_s * self.gpus_per_trial

    def _running_s(self) -> float:
        now = self.clock()
        return sum(now - started for started in self.running.values())

    @property
    def spent(self) -> float:
        """Seconds spent in the budget's unit (GPU-seconds for a GPU-hour budget)."""
        return self.gpu_spent_s if self.budget.unit == "gpu-h" else self.wall_spent_s

    @property
    def reserved(self) -> float:
        """The confirm stage's estimated cost in the budget's unit (0 without one, or before
        the first report)."""
        if self.confirm is None or not self.epochs_reported:
            return 0.0
        run_s = self.confirm.epochs * self.epoch_s_total / self.epochs_reported
        if self.budget.unit == "gpu-h":
            return self.confirm.runs * run_s * self.gpus_per_trial
        return math.ceil(self.confirm.runs / self.confirm.slots) * run_s

    def exhausted(self) -> bool:
        return self.spent + self.reserved >= self.budget.seconds

    def may_start(self) -> bool:
        estimate = (sum(self.finished_trial_s) / len(self.finished_trial_s)
                    if self.finished_trial_s else self.longest_epoch_s)
        if self.budget.unit == "gpu-h":
            estimate *= self.gpus_per_trial
        return self.spent + self.reserved + estimate < self.budget.seconds

    def trial_started(self, trial_id: str) -> None:
        self.running[trial_id] = self.clock()
        self.trial_ids.add(trial_id)

    def epoch_reported(self, trial_id: str, epoch_s: float) -> None:
        self.longest_epoch_s = max(self.longest_epoch_s, epoch_s)
        self.epoch_s_total += epoch_s
        self.epochs_reported += 1
        if trial_id not in self.running:  # restored by --resume, which started it again
            self.trial_started(trial_id)

    def trial_finished(self, trial_id: str) -> None:
        started = self.running.pop(trial_id, None)
        if started is not None:
            self.finished_trial_s.append(self.clock() - started)

    def confirm_ran(self, spent_before: float, gpu_hours: float) -> None:
        """The confirm stage has ended: its trials' GPU-hours count (it started them itself,
        not the searcher), and what it spent is kept for the summary."""
        self.earlier_gpu_s += gpu_hours * 3600
        self.confirm_spent_s = self.spent - spent_before

    def summary_line(self, stopped_early: Iterable[str]) -> str:
        """What the budget bought; `stopped_early`: the ids of trials that ended before
        their last epoch without an error (the scheduler's or the budget's doing)."""
        spent = format_duration(self.wall_spent_s)
        if self.budget.unit == "gpu-h":
            spent = f"{self.gpu_spent_s / 3600:.2f}gpu-h ({spent} wall time)"
        by_scheduler, by_budget = self._stopped(stopped_early)
        how = [f"{by_scheduler} stopped early by ASHA"] if by_scheduler else []
        how += [f"{by_budget} stopped by the budget"] if by_budget else []
        trials = f"{len(self.trial_ids)} trial{'s' * (len(self.trial_ids) != 1)}"
        confirm = "" if self.confirm_spent_s is None else (
            f" and the confirm stage's {self.confirm.runs if self.confirm else 0} runs "
            f"({self._format(self.confirm_spent_s)} of it)")
        return f"budget {self.budget}: spent {spent} on {trials}" + (
            f" ({', '.join(how)})" if how else "") + confirm

    def _format(self, seconds: float) -> str:
        """`seconds` in the budget's unit, as the user gave it."""
        if self.budget.unit == "gpu-h":
            return f"{seconds / 3600:.2f}gpu-h"
        return format_duration(seconds)

    def record(self, stopped_early: Iterable[str]) -> dict[str, Any]:
        """The entry for search.json's `budgets_spent` (one per search or extension)."""
        by_scheduler, by_budget = self._stopped(stopped_early)
        return {"budget": str(self.budget), "unit": self.budget.unit,
                "wall_s": round(self.wall_spent_s, 1),
                "gpu_hours": round(self.gpu_spent_s / 3600, 4),
                "trials": len(self.trial_ids), "stopped_early_by_scheduler": by_scheduler,
                "stopped_by_budget": by_budget,
                "confirm_s": None if self.confirm_spent_s is None else round(
                    self.confirm_spent_s, 1),
                "ended": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def _stopped(self, stopped_early: Iterable[str]) -> tuple[int, int]:
        """Of this budget's trials that stopped early, how many the scheduler stopped and
        how many the budget did (a trial the budget stopped at its last epoch ran whole)."""
        stopped = set(stopped_early) & self.trial_ids
        return len(stopped - self.stopped_by_budget), len(stopped & self.stopped_by_budget)
