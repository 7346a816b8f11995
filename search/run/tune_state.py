"""The Ray Tune state of a search in its run directory, checked and mended before `--resume`.

Two moments of a Ray Tune (2.60) run leave a state that Tune cannot restore from when the
driver is killed in them:

- Tune writes its state in the driver's staging directory and copies it into the run
  directory file by file, after every trial checkpoint, writing each file in place. A kill
  during a copy leaves a file cut short; `Tuner.restore` then fails, logs "Failed to restore
  the run state", and runs a new search with a fresh sampler in the same run directory,
  which then reports success. `tune_state_problem` finds such a file first, without
  unpickling anything (only the newest file of each kind, as Tune reads them).
- With num_to_keep=1 Tune deletes a trial's previous checkpoint as it registers the new one,
  before that state reaches the run directory. A kill in between leaves a state that names
  the deleted checkpoint: Tune fails to restore the trial, and the results writer finds no
  rows there. `mend_trial_checkpoints` puts the trial's newest whole checkpoint (the one
  Tune registered) under the name the state gives; the trial goes on from there.
"""

from __future__ import annotations

import fnmatch
import json
import pickletools
import posixpath
import zipfile
from typing import Any

import pyarrow.fs as pafs

from search.rundir import RunDir
from trainable import result_keys
from trainable.model_files import CHECKPOINT_FILE, CONFIG_FILE, TRIAL_EPOCHS_FILE

# (pattern, format) of the files Tune restores from; of each pattern Tune reads the newest
# by name (the names hold the session's start time).
TUNE_STATE_FILES = (("experiment_state-*.json", "json"), ("search_gen_state-*.json", "pickle"),
                    ("searcher-state-*.pkl", "pickle"), ("tuner.pkl", "pickle"))


def _whole(data: bytes, kind: str) -> str | None:
    """None if `data` is a complete file of its kind, else what is wrong."""
    if not data:
        return "empty"
    try:
        if kind == "json":
            json.loads(data)
        else:
            for _ in pickletools.genops(data):  # reads opcodes to STOP; runs nothing
                pass
    except ValueError as e:
        return str(e)
    return None


def _file_names(run: RunDir) -> list[str]:
    return [info.base_name for info in run.fs.get_file_info(pafs.FileSelector(run.path))
            if info.type == pafs.FileType.File]


def _saved_trials(run: RunDir) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(trial, metadata) of every trial in Tune's newest saved state, as Tune reads it."""
    states = fnmatch.filter(_file_names(run), "experiment_state-*.json")
    if not states:
        return []
    with run.fs.open_input_stream(run.join(max(states))) as f:
        trial_data = json.loads(f.read())["trial_data"]
    return [(json.loads(trial), json.loads(metadata)) for trial, metadata in trial_data]


def tune_state_problem(run: RunDir) -> str | None:
    """None if every Tune state file `--resume` needs is whole, else one line naming the
    first cut-off file."""
    names = _file_names(run)
    for pattern, kind in TUNE_STATE_FILES:
        matching = fnmatch.filter(names, pattern)
        if not matching:
            continue
        newest = max(matching)
        with run.fs.open_input_stream(run.join(newest)) as f:
            problem = _whole(f.read(), kind)
        if problem:
            return f"{run.uri_of(newest)} is cut off ({problem})"
    return None


def whole_checkpoint(fs: pafs.FileSystem, path: str) -> bool:
    """A trial checkpoint directory with all its files, none cut short (checkpoint.pt is a
    zip archive: its directory is at the end)."""
    try:
        with fs.open_input_stream(posixpath.join(path, TRIAL_EPOCHS_FILE)) as f:
            if not isinstance(json.loads(f.read()), list):
                return False
        if fs.get_file_info(posixpath.join(path, CONFIG_FILE)).type != pafs.FileType.File:
            return False
        with fs.open_input_file(posixpath.join(path, CHECKPOINT_FILE)) as f:
            return zipfile.is_zipfile(f)
    except (OSError, ValueError):
        return False


def saved_trial_ids(run: RunDir) -> set[str]:
    """The trials of Tune's newest saved state: those `--resume` goes on with."""
    return {trial["trial_id"] for trial, _ in _saved_trials(run)}


def mend_trial_checkpoints(run: RunDir, trial_dirname: str = "trial_{}") -> list[str]:
    """Give every unfinished trial whose checkpoint (as Tune's newest state names it) is gone
    or cut short its newest whole checkpoint under that name. Returns one line per trial
    mended. `trial_dirname`: the trial folders' names, as search.run.driver.trial_dirname makes
    them."""
    mended = []
    for trial, metadata in _saved_trials(run):
        named = (metadata.get("last_result") or {}).get("checkpoint_dir_name")
        if trial.get("status") == result_keys.TERMINATED or not named:
            continue
        trial_dir = run.join(trial_dirname.format(trial["trial_id"]))
        target = posixpath.join(trial_dir, named)
        if whole_checkpoint(run.fs, target):
            continue
        siblings = sorted((info.path for info in run.fs.get_file_info(
            pafs.FileSelector(trial_dir, allow_not_found=True))
            if info.type == pafs.FileType.Directory and info.base_name.startswith(
                "checkpoint_")), reverse=True)
        newest = next((path for path in siblings if whole_checkpoint(run.fs, path)), None)
        if newest is None:
            continue  # nothing to go on from: Tune reports the trial failed
        if run.fs.get_file_info(target).type != pafs.FileType.NotFound:
            run.fs.delete_dir(target)
        run.fs.create_dir(target, recursive=True)
        pafs.copy_files(newest, target, source_filesystem=run.fs,
                        destination_filesystem=run.fs)
        mended.append(f"trial {trial['trial_id']} goes on from {posixpath.basename(newest)}: "
                      f"Tune's state names {named}, which was gone or cut short")
    return mended
