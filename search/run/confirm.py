"""`--confirm K`: after a search, its top K configs train again with new seeds, and the one
with the best mean is handed over.

The search's best trial is the luckiest of many noisy evaluations (the winner's curse), and
a trial ASHA stopped early was judged on a few epochs. Confirming trains each of the K best
distinct configs (the run's one ranking, SearchRun.ranked) for the scheduler's max_epochs
with the same R new seeds (none a search trial used), and picks the config whose best-epoch
metric has the best mean over them. The runs go through the same trainable and callbacks
as the search's trials, as a second Tune run in RUN/confirm/ (its own trials.parquet and
epochs.parquet; TensorBoard beside the search's trials). search.json's "confirm" records
the plan before the runs start (so `--resume` confirms the same configs) and their outcome
after; SearchRun.handed_over reads it. No Ray here.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from search.defaults import DEFAULT_CONFIRM_SEEDS
from search.rundir import TRIALS_FILE, SearchRun, Trial
from search.views.best import trial_config
from trainable import result_keys
from trainable.config import TrainConfig
from trainable.errors import UserError
from trainable.ranking import best_of

CONFIRM_DIR = "confirm"  # RUN/confirm: the confirm stage's Tune run and Parquet files


def check_confirm(top: int | None, seeds: int | None, trials: int | None) -> tuple[int, int]:
    """(K, R) of --confirm K --confirm-seeds R, checked before the search starts: K 0 or
    none confirms nothing; K above the trials the search will run (when --trials, or its
    default, bounds it) cannot be confirmed. A budget's share for the confirm is known only
    from the first epoch's time on (search/run/budget.py), so no budget is refused here."""
    if seeds is not None and seeds < 1:
        raise UserError(f"--confirm-seeds must be >= 1, got {seeds}")
    if top is None:
        if seeds is not None:
            raise UserError(f"--confirm-seeds {seeds} needs --confirm K (how many of the best "
                            "configs to train again)")
        return 0, DEFAULT_CONFIRM_SEEDS
    if top < 0:
        raise UserError(f"--confirm must be >= 0 (the best configs to train again), got {top}")
    if trials is not None and top > trials:
        raise UserError(f"--confirm {top}: the search runs {trials} trials (--trials), so it "
                        f"has at most {trials} configs to confirm; give --confirm {trials} or "
                        "fewer, or more --trials")
    return top, DEFAULT_CONFIRM_SEEDS if seeds is None else seeds


def new_seeds(used: set[int], count: int) -> list[int]:
    """The `count` smallest seeds >= 0 that no search trial used."""
    seeds: list[int] = []
    seed = 0
    while len(seeds) < count:
        if seed not in used:
            seeds.append(seed)
        seed += 1
    return seeds


def normalised(cfg: TrainConfig, epochs: int) -> TrainConfig:
    """A config as the confirm stage compares configs: whatever its seed and epochs."""
    return cfg.replace(seed=0, epochs=epochs)


@dataclass(frozen=True)
class ConfirmPlan:
    trial_ids: list[str]  # the search trials whose configs are confirmed, best first
    seeds: list[int]  # the same for every config
    epochs: int

    @classmethod
    def make(cls, run: SearchRun, top: int, seeds: int, epochs: int) -> ConfirmPlan:
        """The `top` best distinct configs of the run (two trials that differ only in their
        seed are one config)."""
        chosen: list[Trial] = []
        seen: list[TrainConfig] = []
        for trial in run.ranked:
            if trial["status"] != result_keys.TERMINATED:
                continue
            cfg = normalised(run_config(run, trial), epochs)
            if cfg not in seen:
                seen.append(cfg)
                chosen.append(trial)
            if len(chosen) == top:
                break
        used = {int(t["seed"]) for t in run.trials if t.get("seed") is not None}
        return cls([t["trial_id"] for t in chosen], new_seeds(used, seeds), epochs)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ConfirmPlan:
        return cls(list(record["trial_ids"]), list(record["seeds"]), int(record["epochs"]))

    def record(self) -> dict[str, Any]:
        return {"trial_ids": self.trial_ids, "seeds": self.seeds, "epochs": self.epochs}

    def configs(self, run: SearchRun) -> list[dict[str, Any]]:
        """The confirm runs' configs: each config with each seed, at full epochs."""
        return [run_config(run, trial).replace(seed=seed, epochs=self.epochs).to_dict()
                for trial in self.trials(run) for seed in self.seeds]

    def trials(self, run: SearchRun) -> list[Trial]:
        by_id = {t["trial_id"]: t for t in run.trials}
        return [by_id[trial_id] for trial_id in self.trial_ids]

    def outcome(self, run: SearchRun, confirm_rows: list[Trial]) -> dict[str, Any]:
        """search.json's "confirm" once the runs have ended: per config its found value, the
        best-epoch metric of each confirm run, their mean and standard error; and the
        config handed over (the best mean; none when no confirm run scored)."""
        configs = []
        for trial in self.trials(run):
            key = normalised(run_config(run, trial), self.epochs)
            runs = [{"trial_id": row["trial_id"], "seed": row["seed"],
                     "best_metric": row["best_metric"]} for row in confirm_rows
                    if normalised(trial_config(row, CONFIRM_DIR), self.epochs) == key]
            scores = [r["best_metric"] for r in runs if r["best_metric"] is not None
                      and math.isfinite(r["best_metric"])]
            configs.append({
                "trial_id": trial["trial_id"], "found": trial["best_metric"], "runs": runs,
                "mean": statistics.fmean(scores) if scores else None,
                "stderr": (statistics.stdev(scores) / math.sqrt(len(scores))
                           if len(scores) > 1 else None)})
        best = best_of(configs, lambda c: c["mean"], run.mode)
        return {**self.record(), "configs": configs,
                "handed_over": None if best is None else best["trial_id"]}


def run_config(run: SearchRun, trial: Trial) -> TrainConfig:
    return trial_config(trial, run.rundir.uri_of(TRIALS_FILE))
