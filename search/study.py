"""The Optuna study of a search, kept in its run directory (STUDY_FILE: Optuna's journal file
storage, which concurrent readers such as optuna-dashboard do not lock as SQLite does).

The driver is the only writer. A local run directory holds the journal itself; for a remote
one (s3://...) the journal lives on the driver's disk (under $RESNET_HPO_CACHE) and the
results writer copies it into the run directory whenever it writes the Parquet files.

Ray Tune pickles the searcher (search/run/study_search.py) into its saved state, the study's
storage with it. The journal pickles as the run's URI, so a restored search reopens the
journal of the run, not a path on the machine that pickled it. The journal can be ahead of
Tune's saved state (the driver appends every ask and tell at once; Tune saves every few
seconds): `close_orphans` fails the trials the sampler started that Tune's saved state never
heard of, so that TPE's constant liar does not count them as running forever.

`resnet-hpo dashboard` reads the study through this module too, and imports neither Ray nor
torch through it.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage

from search.rundir import STUDY_FILE, STUDY_NAME, RunDir
from trainable.errors import UserError
from trainable.ranking import study_direction
from trainable.storage import LOCAL, copy_file

if TYPE_CHECKING:
    from spaces import SearchSpace

TRIAL_ID_ATTR = "trial_id"  # a study trial's user attribute: its Tune trial id (trials.parquet)
# of a study trial that records a Tune trial's ending anew (search/run/study_search.py): the
# number of the study trial it replaces
SUPERSEDES_ATTR = "supersedes"


def journal_path(run: RunDir) -> Path:
    """The journal the driver appends to: in the run directory when it is on this disk."""
    local = run.local_path(STUDY_FILE)
    if local is not None:
        return local
    from trainable.data import cache_dir  # imports torch: only for a remote run

    key = hashlib.sha256(run.uri.encode()).hexdigest()[:16]
    return cache_dir() / "studies" / key / STUDY_FILE


class RunJournal(JournalFileBackend):
    """The journal of the run at `run_uri`; pickles as that URI."""

    def __init__(self, run_uri: str):
        self.run_uri = run_uri
        path = journal_path(RunDir.open(run_uri))
        path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(str(path))

    def __reduce__(self) -> tuple[Any, ...]:
        return (RunJournal, (self.run_uri,))


def pull_journal(run: RunDir) -> None:
    """Bring a remote run's journal to the driver's disk, unless the copy there already
    starts with it (the journal only grows: the longer one is the newer)."""
    if run.local_path() is not None or not run.exists(STUDY_FILE):
        return
    local = journal_path(run)
    local.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pull-", dir=local.parent) as pulled:
        remote = Path(pulled) / STUDY_FILE
        copy_file(run.fs, run.join(STUDY_FILE), LOCAL, str(remote))
        if not (local.exists() and local.read_bytes().startswith(remote.read_bytes())):
            remote.replace(local)


def driver_journal(run: RunDir) -> bytes | None:
    """The driver's journal of a remote run, as it is now, for `push_journal`; None for a
    local run (it holds the journal) or before the first trial."""
    local = journal_path(run)
    if run.local_path() is not None or not local.exists():
        return None
    return local.read_bytes()


def push_journal(run: RunDir, journal: bytes) -> None:
    """Write the driver's journal (`driver_journal`) into the remote run directory."""
    run.write_bytes(STUDY_FILE, journal)


def check_journal(run: RunDir) -> None:
    """One line naming the run's study file when it is not a whole Optuna journal with the
    search's study. Reads only; call pull_journal first for a remote run."""
    path, where = journal_path(run), run.uri_of(STUDY_FILE)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{where}: cannot read the search's Optuna study ({e.strerror or e})"
                        ) from None
    lines = data.split(b"\n")
    if lines[-1]:
        raise UserError(f"{where} is corrupt: its last line ({len(lines)}) is cut off; the "
                        "trials in trials.parquet are intact")
    for number, line in enumerate(lines[:-1], 1):
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or not isinstance(entry.get("op_code"), int):
                raise ValueError("not an operation")
        except ValueError:
            raise UserError(f"{where} is corrupt: line {number} is not an Optuna journal "
                            "operation; the trials in trials.parquet are intact") from None
    try:
        storage = JournalStorage(JournalFileBackend(str(path)))  # replays it
    except Exception as e:  # a journal that parses but does not add up
        raise UserError(f"{where} is corrupt: Optuna cannot replay it ({type(e).__name__}: "
                        f"{e})") from None
    try:
        optuna.load_study(study_name=STUDY_NAME, storage=storage)
    except KeyError:
        raise UserError(f"{where} holds no study named {STUDY_NAME!r}; is this the study "
                        "file of a search?") from None


def open_storage(run: RunDir) -> JournalStorage:
    return JournalStorage(RunJournal(run.uri))


def open_study(storage: JournalStorage, space: SearchSpace) -> optuna.Study:
    """The run's study (created if the journal has none yet), its objective named as the
    trials report it (best_val_acc, ...), which optuna-dashboard puts on its axes."""
    from trainable.ranking import objective_name

    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, load_if_exists=True,
                                direction=study_direction(space.mode))
    if study.metric_names is None:  # a new study, or one from before studies were named
        with warnings.catch_warnings():  # experimental since Optuna 3.2, and the only way
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([objective_name(space.metric)])
    return study


def close_orphans(study: optuna.Study, known: set[str]) -> int:
    """Fail the study's running trials whose Tune trial is not in `known` (the trials Tune
    will go on with); returns how many."""
    orphans = [t for t in study.get_trials(deepcopy=False,
                                           states=(optuna.trial.TrialState.RUNNING,))
               if t.user_attrs.get(TRIAL_ID_ATTR) not in known]
    for trial in orphans:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    return len(orphans)



def latest_trials(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    """Each Tune trial's study trial, by Tune trial id: the latest where a trial's ending
    was recorded anew (SUPERSEDES_ATTR)."""
    return {t.user_attrs[TRIAL_ID_ATTR]: t for t in study.get_trials(deepcopy=False)
            if TRIAL_ID_ATTR in t.user_attrs}
