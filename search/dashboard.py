"""`resnet-hpo dashboard RUN`: optuna-dashboard on the run's Optuna study (RUN/study.journal),
with its history, hyperparameter importances and parallel coordinates; it reads the journal
again on every page, so it follows a running search."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from search.rundir import SEARCH_FILE, STUDY_FILE, STUDY_NAME, RunDir
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
    with tempfile.TemporaryDirectory(prefix="resnet-hpo-dashboard-") as scratch:
        storage = study_storage(study_file(run, Path(scratch)), run.uri_of(STUDY_FILE))
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


def study_file(run: RunDir, scratch: Path) -> Path:
    """The run's journal on this machine's disk: itself, or a copy of a remote run's in
    `scratch`."""
    if not run.exists(STUDY_FILE):
        if run.exists(SEARCH_FILE):
            raise UserError(f"{run.uri}: no {STUDY_FILE} here; the search was run before "
                            "searches kept their Optuna study (`resnet-hpo results` reads its "
                            "trials)")
        run.require(STUDY_FILE)
    local = run.local_path(STUDY_FILE)
    if local is not None:
        return local
    copy = scratch / STUDY_FILE
    with run.fs.open_input_stream(run.join(STUDY_FILE)) as f:
        copy.write_bytes(f.read())
    print(f"{run.uri_of(STUDY_FILE)}: showing a copy made now; run the command again for "
          "newer trials", flush=True)
    return copy


def study_storage(path: Path, where: str) -> JournalStorage:
    """The journal as Optuna reads it, or one line naming the file when it cannot."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    try:
        storage = JournalStorage(JournalFileBackend(str(path)))
        names = optuna.get_all_study_names(storage)
    except Exception as e:  # a journal cut or edited, or another file under its name
        raise UserError(f"{where} is corrupt: Optuna cannot replay it ({type(e).__name__}: "
                        f"{e})") from None
    if STUDY_NAME not in names:
        raise UserError(f"{where} holds no study named {STUDY_NAME!r}; is this the study file "
                        "of a search?")
    return storage
