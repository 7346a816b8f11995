"""`resnet-hpo ensemble`: combine the best trials of a search into one model.

The top K trials (by the search metric at their best epoch) are loaded from their
checkpoints and evaluated on the data each was trained on (its own resolution and stem;
`search.ensemble_evaluation`). The result is one module (`trainable.fusion.EnsembleClassifier`:
float RGB images in [0, 1] -> class probabilities), saved as an ensemble directory
(`trainable.saved`) and, with --onnx, exported as one graph.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import torch

from search.best import SearchRun
from search.ensemble_evaluation import (
    Member,
    Scores,
    combine,
    member_probabilities,
    scores_of_members,
)
from search.rundir import ENSEMBLE_FILE, TRIALS_FILE, RunDir
from trainable.errors import UserError
from trainable.export import export_onnx
from trainable.fusion import EnsembleClassifier, EnsembleSpec
from trainable.model import ImageClassifier
from trainable.saved import ENSEMBLE_ONNX_FILE, load_checkpoint_dir, save_ensemble_dir


def load_members(run: SearchRun, top: int, scratch: Path) -> list[Member]:
    """The best `top` trials that left a checkpoint, best first."""
    ranked = [t for t in run.ranked if t.get("checkpoint_path")]
    if len(ranked) < 2:
        raise UserError(f"{run.rundir.uri_of(TRIALS_FILE)}: an ensemble needs at least 2 "
                        f"trials with a checkpoint, found {len(ranked)}")
    if top > len(ranked):
        warnings.warn(f"--top {top}: only {len(ranked)} trials have a checkpoint; using them "
                      "all", stacklevel=2)
    members = [Member(t["trial_id"], load_checkpoint_dir(
        fetch_checkpoint(t["trial_id"], t["checkpoint_path"], run.rundir, scratch)))
        for t in ranked[:top]]
    names = members[0].saved.class_names
    for m in members[1:]:
        if m.saved.class_names != names:
            raise UserError(f"trial {m.trial_id}: its classes differ from trial "
                            f"{members[0].trial_id}'s; members must share their classes")
    return members


def fetch_checkpoint(trial_id: str, path: str, rundir: RunDir, scratch: Path) -> Path:
    """A local directory holding the trial's checkpoint: `path` itself when it is on this
    disk, else a copy from its URI or from the run directory's filesystem."""
    if "://" not in path and Path(path).is_dir():
        return Path(path)
    target = scratch / trial_id
    try:
        fs, inner = pafs.FileSystem.from_uri(path) if "://" in path else (rundir.fs, path)
        pafs.copy_files(inner, str(target), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
    except (OSError, pa.ArrowInvalid) as e:
        raise UserError(f"trial {trial_id}: cannot read its checkpoint {path} ({e})") from None
    return target


def summary(method: str, top: int, members: list[Member], member_scores: list[Scores],
            scores: Scores, output_dir: str) -> dict[str, Any]:
    """The evaluation as RUN/ensemble.json holds it. The best member is the one with the
    highest accuracy on each split; the gain is measured on test, else on val."""
    best_val = max(s.val_acc for s in member_scores)
    best_test = (max(s.test_acc for s in member_scores if s.test_acc is not None)
                 if scores.test_acc is not None else None)
    gain = (scores.test_acc - best_test if scores.test_acc is not None and best_test is not None
            else scores.val_acc - best_val)
    return {"method": method, "top": top,
            "members": [{"trial_id": m.trial_id, "val_acc": s.val_acc, "test_acc": s.test_acc}
                        for m, s in zip(members, member_scores, strict=True)],
            "val_acc": scores.val_acc, "test_acc": scores.test_acc,
            "best_member_val_acc": best_val, "best_member_test_acc": best_test,
            "gain": gain, "output_dir": output_dir}


def print_table(result: dict[str, Any]) -> None:
    def acc(value: float | None) -> str:
        return f"{value:8.4f}" if value is not None else f"{'-':>8}"

    width = max(12, *(len(m["trial_id"]) for m in result["members"]))
    print(f"{'member':<{width}}  {'val_acc':>8}  {'test_acc':>8}")
    for m in result["members"]:
        print(f"{m['trial_id']:<{width}}  {acc(m['val_acc'])}  {acc(m['test_acc'])}")
    name = f"{result['method']} of {len(result['members'])}"
    print(f"{name:<{width}}  {acc(result['val_acc'])}  {acc(result['test_acc'])}")
    split = "test" if result["test_acc"] is not None else "val"
    print(f"gain over the best member ({split}): {result['gain']:+.4f}")
    if result["method"] == "stack":
        print("stack: val_acc is cross-validated on the validation split; test_acc comes from "
              "a fit on all of it")


def default_output(run: SearchRun) -> Path:
    local = run.rundir.local_path("ensemble")
    return local if local is not None else Path(f"{run.name}-ensemble")


def ensemble_command(run_uri: str, top: int, method: str, output: str | None,
                     onnx: bool = False, device: str | None = None) -> dict[str, Any]:
    if top < 2:
        raise UserError(f"--top {top}: an ensemble needs at least 2 members")
    run = SearchRun.open(run_uri)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory(prefix="resnet-hpo-ensemble-") as scratch:
        members = load_members(run, top, Path(scratch))
    val, test = member_probabilities(members, dev)
    combiner, scores = combine(method, val, test)
    out = Path(output) if output else default_output(run)
    result = summary(method, top, members, scores_of_members(val, test), scores, str(out))
    spec = EnsembleSpec(method, members[0].saved.class_names, [m.trial_id for m in members],
                        [m.saved.cfg for m in members])
    module = EnsembleClassifier([ImageClassifier(m.saved.model.cpu(), m.saved.cfg.resolution)
                                 for m in members], combiner).eval()
    save_ensemble_dir(out, spec, module, result)
    if onnx:
        export_onnx(module, spec.resolution, out / ENSEMBLE_ONNX_FILE, "probabilities")
    run.rundir.write_json(ENSEMBLE_FILE, result)
    print_table(result)
    print(f"ensemble in {out}/" + (f" (with {ENSEMBLE_ONNX_FILE})" if onnx else ""))
    return result
