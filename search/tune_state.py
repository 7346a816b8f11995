"""The Ray Tune state of a search in its run directory, checked before `--resume`.

Ray Tune (2.60) writes its state in the driver's staging directory and copies it into the
run directory file by file, after every trial checkpoint, by writing each file in place. A
driver killed during such a copy leaves a file cut short. `Tuner.restore` then fails, logs
"Failed to restore the run state", and runs a new search with a fresh sampler in the same
run directory, which then reports success. A cut-off file is found here first, without
unpickling anything: only the newest file of each kind is read, as Tune reads them.
"""

from __future__ import annotations

import fnmatch
import json
import pickletools

import pyarrow.fs as pafs

from search.rundir import RunDir

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


def tune_state_problem(run: RunDir) -> str | None:
    """None if every Tune state file `--resume` needs is whole, else one line naming the
    first cut-off file."""
    names = [info.base_name for info in run.fs.get_file_info(pafs.FileSelector(run.path))
             if info.type == pafs.FileType.File]
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
