"""`--budget`: how long a search may run, in wall time or GPU-hours, and what it has spent.

The driver opens the running search's BudgetAccount (`running`); the searcher
(search/run/study_search.py) asks it whether a new trial may start, and the BudgetStopper
(search/run/budget_stopper.py) whether the running trials must stop. Tune saves and restores
those two separately (pickled), so they hold no account: they ask `running_account()`. What
a part of the search (the search, or one --add-trials) spends is kept in the run: in
SPENDING_DIR while it runs, so that --resume goes on from it, then in search.json's
`budgets_spent` once it has ended. No Ray here, so it is tested with a fake clock.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from search.rundir import RunDir
from trainable.errors import UserError

BUDGET_FORMS = "a wall time (45s, 90m, 2h) or GPU-hours (1.5gpu-h), greater than 0"
BUDGET_PATTERN = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(s|m|h|gpu-h)")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "gpu-h": 3600}
# A folder of the run: a resumed Tune run copies the run's top-level .json files back over
# themselves each time it saves its state (search/rundir.py, RunDir.write_json), which would
# undo what the account writes while it runs.
SPENDING_DIR = "budget"
SPENDING_FILE = "spending.json"
SAVE_EVERY_S = 10.0  # what a kill may lose of the spending


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

    With a run directory (`run`), what has been spent is written to its SPENDING_FILE at
    the first event of its trials SAVE_EVERY_S after the last write, and when the search is
    interrupted (driver.finish_search); an account opened again for the same part of
    the search (--resume after a kill or Ctrl-C) goes on from it, its clock restarted, and
    trials then running count again from their next report.
    """

    def __init__(self, budget: Budget, gpus_per_trial: float,
                 clock: Callable[[], float] = time.monotonic,
                 confirm: ConfirmCost | None = None, run: RunDir | None = None,
                 part: int = 0):
        self.budget, self.gpus_per_trial, self.confirm = budget, gpus_per_trial, confirm
        self.clock, self.part = clock, part
        self.opened = self.saved_at = clock()
        self.running: dict[str, float] = {}  # trial id -> clock when it started
        self.earlier_wall_s = 0.0  # spent before this account was opened (--resume)
        self.earlier_gpu_s = 0.0  # by trials that were running then, and the confirm's
        self.finished_trial_s: list[float] = []
        self.longest_epoch_s = 0.0
        self.epoch_s_total = 0.0
        self.epochs_reported = 0
        self.trial_ids: set[str] = set()  # every trial started on this budget
        self.stopped_by_budget: set[str] = set()
        self.confirm_spent_s: float | None = None  # in the budget's unit, once it has run
        self.spending = None if run is None else RunDir.open(run.uri_of(SPENDING_DIR))
        if self.spending is not None and self.spending.exists(SPENDING_FILE):
            self._go_on_from(self.spending.read_json(SPENDING_FILE))

    def _state(self) -> dict[str, Any]:
        """What has been spent, as SPENDING_FILE holds it: trials running now count as spent
        up to now."""
        return {"part": self.part, "budget": str(self.budget),
                "earlier_wall_s": self.wall_spent_s,
                "earlier_gpu_s": self.earlier_gpu_s + self._running_s() * self.gpus_per_trial,
                "finished_trial_s": self.finished_trial_s,
                "longest_epoch_s": self.longest_epoch_s, "epoch_s_total": self.epoch_s_total,
                "epochs_reported": self.epochs_reported, "trial_ids": sorted(self.trial_ids),
                "stopped_by_budget": sorted(self.stopped_by_budget),
                "confirm_spent_s": self.confirm_spent_s}

    def _go_on_from(self, state: dict[str, Any]) -> None:
        """Take over every attribute `_state` wrote."""
        if (state.pop("part", None), state.pop("budget", None)) != (self.part, str(self.budget)):
            return  # an earlier part's, whose end was not recorded
        for key, value in state.items():
            setattr(self, key, set(value) if isinstance(getattr(self, key), set) else value)

    def save(self) -> None:
        """Write what has been spent to the run."""
        if self.spending is not None:
            self.saved_at = self.clock()
            self.spending.write_json(SPENDING_FILE, self._state())

    def _save_if_due(self) -> None:
        # Not at every event: each is on Tune's event loop, between a trial and the next.
        if self.clock() - self.saved_at >= SAVE_EVERY_S:
            self.save()

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
        self._save_if_due()

    def epoch_reported(self, trial_id: str, epoch_s: float) -> None:
        self.longest_epoch_s = max(self.longest_epoch_s, epoch_s)
        self.epoch_s_total += epoch_s
        self.epochs_reported += 1
        if trial_id not in self.running:  # restored by --resume, which started it again
            self.trial_started(trial_id)
        self._save_if_due()

    def trial_finished(self, trial_id: str) -> None:
        started = self.running.pop(trial_id, None)
        if started is not None:
            self.finished_trial_s.append(self.clock() - started)
        self._save_if_due()

    def confirm_ran(self, spent_before: float, gpu_hours: float) -> None:
        """The confirm stage has ended: its trials' GPU-hours count (it started them itself,
        not the searcher), and what it spent is kept for the summary."""
        self.earlier_gpu_s += gpu_hours * 3600
        self.confirm_spent_s = self.spent - spent_before

    def end(self) -> None:
        """What the part spent is in search.json's budgets_spent (its `record`) now."""
        if self.spending is not None and self.spending.exists():
            self.spending.fs.delete_dir(self.spending.path)

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


_running: BudgetAccount | None = None


@contextmanager
def running(account: BudgetAccount | None) -> Iterator[BudgetAccount | None]:
    """`account` is the running search's while the block runs (a search without a budget
    has None)."""
    global _running
    _running = account
    try:
        yield account
    finally:
        _running = None


def running_account() -> BudgetAccount | None:
    return _running
