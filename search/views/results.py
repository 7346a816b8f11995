"""`resnet-hpo results`: leaderboard, hyperparameter importances and plots of a search."""

from __future__ import annotations

from search.rundir import CONFUSION_MATRICES_FILE, ENSEMBLE_FILE, PLOTS_DIR, SearchRun
from search.views.leaderboard import ensemble_text, importance_text, leaderboard, summary
from search.views.plots import write_plots
from search.views.searched_params import searched_params
from trainable.errors import UserError


def results_command(run_uri: str, top: int) -> None:
    if top < 1:
        raise UserError(f"--top {top}: must be >= 1")
    run = SearchRun.open(run_uri)
    params = searched_params(run)
    print(summary(run))
    print()
    print(leaderboard(run, params, top))
    print()
    print(importance_text(run, params))
    if run.rundir.exists(ENSEMBLE_FILE):
        print()
        print(ensemble_text(run.rundir.read_json(ENSEMBLE_FILE)))
    written = write_plots(run, params, top)
    if run.rundir.exists(PLOTS_DIR, CONFUSION_MATRICES_FILE):
        written.append(f"{run.rundir.uri_of(PLOTS_DIR, CONFUSION_MATRICES_FILE)} (the last "
                       "ensemble's, written by resnet-hpo ensemble)")
    if written:
        print()
        print("plots: " + ", ".join(written))
