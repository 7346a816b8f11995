"""`resnet-hpo dashboard RUN`: optuna-dashboard on the run's Optuna study (RUN/study.journal),
with its history, hyperparameter importances and parallel coordinates; it reads the journal
again on every page, so it follows a running search."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from search.rundir import SEARCH_FILE, STUDY_FILE, RunDir
from search.study import check_journal, journal_path, open_storage, pull_journal
from trainable.errors import UserError

if TYPE_CHECKING:
    from optuna.storages import JournalStorage


def dashboard_command(run_uri: str, host: str, port: int) -> None:
    try:
        import optuna_dashboard
    except ImportError:
        raise UserError("optuna-dashboard is not installed: pip install 'resnet-hpo[dashboard]' "
                        "(or pip install optuna-dashboard)") from None
    run = RunDir.open(run_uri)
    storage = run_storage(run)
    check_address(host, port)
    print(f"optuna-dashboard of {run.uri} on http://{host}:{port}/dashboard/ (Ctrl-c "
          "stops it)", flush=True)
    optuna_dashboard.run_server(storage, host=host, port=port)


def check_address(host: str, port: int) -> None:
    """Fail in one line before the server prints that it listens: it binds as this does."""
    try:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); "
                        "choose another --port") from None


def run_storage(run: RunDir) -> JournalStorage:
    """The run's study as the driver opens it (search/study.py): its journal, or for a remote
    run the copy on this machine's disk, brought up to date with the run's; one line naming
    the file when it is missing or corrupt."""
    if not run.exists(STUDY_FILE):
        if run.exists(SEARCH_FILE):
            raise UserError(f"{run.uri}: no {STUDY_FILE} here; the search was run before "
                            "searches kept their Optuna study (`resnet-hpo results` reads its "
                            "trials)")
        run.require(STUDY_FILE)
    pull_journal(run)
    check_journal(run)
    if run.local_path() is None:
        print(f"{run.uri_of(STUDY_FILE)}: showing this machine's copy, {journal_path(run)}; "
              "it follows a search whose driver runs here, else run the command again for "
              "newer trials", flush=True)
    return open_storage(run)
