"""`resnet-hpo`: the search and the commands around it, in rooms by job (tests/test_layout.py
checks which may import which):

    rundir.py, study.py  the run directory's files and its Optuna study (everything reads them)
    defaults.py          the defaults the CLI shows, without heavy imports
    views/               a finished run read back: best, results (leaderboard, plots), dashboard
    record/              the Tune callbacks that write a run as it goes: progress, Parquet,
                         TensorBoard
    ensembles/           `resnet-hpo ensemble`
    sampling/            what a search samples first and how: samplers, priors, warm start
    run/                 a search run: request, cluster, Tuner and searcher, budget, confirm
                         stage, Tune's saved state
    commands/            `resnet-hpo train` and `resnet-hpo predict`
    cli.py               the command line
"""

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Any

# Where each module of the flat layout before 2026-12-07 lives now. Ray Tune pickles the
# searcher, the callbacks and the stopper into a run's saved state by their module path, so
# `--resume` of a search interrupted under the old layout imports them by their old names.
MOVED = {
    "best": "views.best", "searched": "views.searched_params", "leaderboard": "views.leaderboard",
    "plots": "views.plots", "report": "views.results", "dashboard": "views.dashboard",
    "progress": "record.progress", "results_writer": "record.results_writer",
    "tensorboard_writer": "record.tensorboard_writer", "ensemble": "ensembles.ensemble",
    "ensemble_evaluation": "ensembles.evaluation", "diversity": "ensembles.member_diversity",
    "request": "run.request", "driver": "run.driver", "cluster": "run.cluster",
    "budget": "run.budget", "budget_stopper": "run.budget_stopper", "confirm": "run.confirm",
    "config_queue": "run.config_queue", "tune_state": "run.tune_state",
    "study_search": "run.study_search", "samplers": "sampling.samplers",
    "priors": "sampling.priors", "warm_start": "sampling.warm_start",
    "retrain": "commands.train", "predict": "commands.predict",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports `search.<old name>` as the module it became (the same module object)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        package, _, name = fullname.partition(".")
        if package != __name__ or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> ModuleType:
        return importlib.import_module(f"{__name__}.{MOVED[spec.name.partition('.')[2]]}")

    def exec_module(self, module: ModuleType) -> None:
        pass  # imported whole by create_module


sys.meta_path.append(_MovedModules())
