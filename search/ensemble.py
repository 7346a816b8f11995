"""`resnet-hpo ensemble`: combine the best trials of a search into one model.

The top K trials (by the search metric at their best epoch) are loaded from their
checkpoints and evaluated on the data each was trained on (its own resolution and stem).
Their class probabilities are combined by averaging, majority vote, or a logistic
regression fitted on the validation split (stacking). The result is one module
(`trainable.fusion.EnsembleClassifier`: float RGB images in [0, 1] -> class probabilities),
saved as an ensemble directory (`trainable.saved`) and, with --onnx, exported as one graph.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch
from torch import nn

from search.best import SearchRun
from search.rundir import ENSEMBLE_FILE, TRIALS_FILE, RunDir
from trainable.config import TrainConfig
from trainable.data import load_dataset
from trainable.errors import UserError
from trainable.export import export_onnx
from trainable.fusion import (
    METHODS,
    EnsembleClassifier,
    EnsembleSpec,
    StackedLogistic,
    make_combiner,
    stack_features,
)
from trainable.model import ImageClassifier
from trainable.saved import (
    ENSEMBLE_ONNX_FILE,
    SavedModel,
    load_checkpoint_dir,
    save_ensemble_dir,
)
from trainable.train import DeviceImages, Runtime, predict_logits

STACK_MAX_FOLDS = 5


# --- members of a search -------------------------------------------------------------------

@dataclass
class Member:
    trial_id: str
    saved: SavedModel


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


# --- evaluation ----------------------------------------------------------------------------

@dataclass
class SplitProbs:
    labels: torch.Tensor  # (N,)
    probs: torch.Tensor  # (members, N, classes), members in rank order


def member_probabilities(members: list[Member], device: torch.device
                         ) -> tuple[SplitProbs, SplitProbs | None]:
    """Every member's probabilities on the val and test splits of the data it was trained on.

    Members sharing (data, resolution, val_fraction) share one decoded dataset.
    """
    groups: dict[tuple[str, int, float], list[int]] = {}
    for i, m in enumerate(members):
        cfg = m.saved.cfg
        groups.setdefault((cfg.data, cfg.resolution, cfg.val_fraction), []).append(i)
    per_split: dict[str, list[tuple[torch.Tensor, torch.Tensor] | None]] = {
        "val": [None] * len(members), "test": [None] * len(members)}
    for key, indices in groups.items():
        data = load_dataset(*key)
        if data.class_names != members[0].saved.class_names:
            raise UserError(f"data {key[0]}: its classes differ from the checkpoints'; was it "
                            "changed since the search?")
        for name, split in (("val", data.val), ("test", data.test)):
            if split is None:
                continue
            images = DeviceImages(split, device)
            for i in indices:
                cfg = members[i].saved.cfg
                logits = predict_logits(members[i].saved.model.to(device), images,
                                        eval_runtime(cfg, device), 2 * cfg.batch_size)
                per_split[name][i] = (images.labels.cpu(), logits.softmax(-1).cpu())
    return _combine_split(members, per_split["val"], "val"), (
        _combine_split(members, per_split["test"], "test")
        if any(p is not None for p in per_split["test"]) else None)


def eval_runtime(cfg: TrainConfig, device: torch.device) -> Runtime:
    """The trial's runtime, but fp32 on the CPU, where bf16 is slow and fp16 unsupported."""
    return Runtime.for_config(cfg if device.type == "cuda" else cfg.replace(amp="off"), device)


def _combine_split(members: list[Member],
                   outputs: list[tuple[torch.Tensor, torch.Tensor] | None],
                   split: str) -> SplitProbs:
    present = [out for out in outputs if out is not None]
    for m, out in zip(members, outputs, strict=True):
        if out is None or not torch.equal(out[0], present[0][0]):
            raise UserError(f"trial {m.trial_id}: its {split} split differs from trial "
                            f"{members[0].trial_id}'s (other data or val_fraction); members "
                            "must be evaluated on the same images")
    return SplitProbs(present[0][0], torch.stack([probs for _, probs in present]))


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return (probs.argmax(-1) == labels).double().mean().item()


@dataclass
class Scores:
    val_acc: float
    test_acc: float | None


def combine(method: str, val: SplitProbs, test: SplitProbs | None
            ) -> tuple[nn.Module, Scores]:
    """The fitted combiner and the ensemble's accuracy. Stacking's val_acc is cross-validated
    and its test_acc comes from a fit on all of val, so it never scores data it was fit on."""
    if method == "stack":
        return fit_stack(val, test)
    members, _, classes = val.probs.shape
    combiner = make_combiner(method, members, classes)
    test_acc = accuracy(combiner(test.probs), test.labels) if test is not None else None
    return combiner, Scores(accuracy(combiner(val.probs), val.labels), test_acc)


def fit_stack(val: SplitProbs, test: SplitProbs | None) -> tuple[StackedLogistic, Scores]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    members, _, classes = val.probs.shape
    features, labels = stack_features(val.probs).numpy(), val.labels.numpy()
    folds = min(STACK_MAX_FOLDS, int(np.bincount(labels, minlength=classes).min()))
    if folds < 2:
        raise UserError("--method stack: needs at least 2 validation images of every class "
                        "for cross-validation; use average or vote")
    regression = LogisticRegression(max_iter=1000)
    held_out = cross_val_predict(regression, features, labels,
                                 cv=StratifiedKFold(folds, shuffle=True, random_state=0))
    regression.fit(features, labels)
    test_acc = (float(regression.score(stack_features(test.probs).numpy(), test.labels.numpy()))
                if test is not None else None)
    return (stacked_module(regression, members, classes),
            Scores(float(np.mean(held_out == labels)), test_acc))


def stacked_module(regression: Any, members: int, classes: int) -> StackedLogistic:
    """The fitted regression as a torch Linear (so it exports to ONNX)."""
    coef, intercept = regression.coef_, regression.intercept_
    if classes == 2:  # sklearn fits one logit z for class 1; softmax(-z/2, z/2) = sigmoid(z)
        coef, intercept = np.concatenate([-coef, coef]) / 2, np.concatenate([-intercept,
                                                                             intercept]) / 2
    module = StackedLogistic(members, classes)
    with torch.no_grad():
        module.linear.weight.copy_(torch.from_numpy(coef))
        module.linear.bias.copy_(torch.from_numpy(intercept))
    return module


# --- the command ---------------------------------------------------------------------------

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
    member_scores = [Scores(accuracy(val.probs[i], val.labels),
                            accuracy(test.probs[i], test.labels) if test is not None else None)
                     for i in range(len(members))]
    combiner, scores = combine(method, val, test)
    out = Path(output) if output else default_output(run)
    result = summary(method, top, members, member_scores, scores, str(out))
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


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "ensemble", help="combine the best trials of a search and evaluate the ensemble",
        description="Load the best-epoch checkpoints of the top K trials, evaluate each and "
                    "their ensemble on the validation split (and the test split when there "
                    "is one), save the ensemble as one module and record the result in "
                    f"RUN/{ENSEMBLE_FILE}.")
    parser.add_argument("run_dir", metavar="RUN", help="run directory of a search (STORAGE/NAME)")
    parser.add_argument("--top", type=int, default=3, metavar="K",
                        help="members: the K best trials by the search metric (default 3)")
    parser.add_argument("--method", choices=METHODS, default="average",
                        help="average the probabilities, majority vote, or stack with a "
                             "logistic regression fitted on the validation split "
                             "(default average)")
    parser.add_argument("--output", metavar="DIR",
                        help="directory for the ensemble (default: RUN/ensemble)")
    parser.add_argument("--onnx", action="store_true", help=f"also export {ENSEMBLE_ONNX_FILE}")
    parser.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda if available)")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> None:
    ensemble_command(args.run_dir, args.top, args.method, args.output, onnx=args.onnx,
                     device=args.device)
