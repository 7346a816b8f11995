"""`resnet-hpo ensemble`: combine the best trials of a search into one model.

The top K trials (by the search metric at their best epoch) are loaded from their
checkpoints and evaluated on the data each was trained on (its own resolution and stem).
Their class probabilities are combined by averaging, majority vote, or a logistic
regression fitted on the validation split (stacking). The result is saved as one module,
EnsembleClassifier, that takes float RGB images in [0, 1] and returns class probabilities;
each member resizes and normalises its own input, so it exports as one ONNX graph.

    DIR/ensemble.yaml   method, class names, input resolution, every member's TrainConfig
    DIR/ensemble.pt     state dict of the EnsembleClassifier
    DIR/metrics.json    the evaluation, as written to RUN/ensemble.json
    DIR/ensemble.onnx   with --onnx: input `images`, output `probabilities`
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from search.best import SearchRun
from search.rundir import ENSEMBLE_FILE, TRIALS_FILE, RunDir
from trainable.config import TrainConfig
from trainable.data import load_dataset
from trainable.errors import UserError
from trainable.export import ImageClassifier
from trainable.model import build_model
from trainable.saved import SavedModel, load_checkpoint_dir
from trainable.train import DeviceImages, Runtime, predict_logits

METHODS = ("average", "vote", "stack")
CONFIG_FILE = "ensemble.yaml"
WEIGHTS_FILE = "ensemble.pt"
METRICS_FILE = "metrics.json"
ONNX_FILE = "ensemble.onnx"
STACK_MAX_FOLDS = 5


# --- combiners: member probabilities (members, N, classes) -> probabilities (N, classes) ---

class MeanProbabilities(nn.Module):
    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        return probs.mean(0)


class MajorityVote(nn.Module):
    """Each member votes for its argmax; ties go to the higher mean probability.

    Returns (votes + mean probability) / (members + 1): a distribution whose argmax is the
    vote's winner, since a class with one vote more always outscores the mean-probability
    difference (which is below one).
    """

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        votes = F.one_hot(probs.argmax(-1), probs.shape[-1]).sum(0).to(probs.dtype)
        return (votes + probs.mean(0)) / (probs.shape[0] + 1)


class StackedLogistic(nn.Module):
    """A multinomial logistic regression on the members' probabilities, side by side."""

    def __init__(self, members: int, classes: int):
        super().__init__()
        self.linear = nn.Linear(members * classes, classes)

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        return self.linear(stack_features(probs)).softmax(-1)


def stack_features(probs: torch.Tensor) -> torch.Tensor:
    """(members, N, classes) -> (N, members * classes), member by member."""
    return probs.permute(1, 0, 2).flatten(1)


def make_combiner(method: str, members: int, classes: int) -> nn.Module:
    if method == "average":
        return MeanProbabilities()
    if method == "vote":
        return MajorityVote()
    return StackedLogistic(members, classes)


class EnsembleClassifier(nn.Module):
    """RGB images as float in [0, 1], N x 3 x R x R -> class probabilities (N, classes)."""

    def __init__(self, members: list[ImageClassifier], combiner: nn.Module):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.combiner = combiner

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([member(images).float().softmax(-1) for member in self.members])
        return self.combiner(probs)


# --- the ensemble on disk ------------------------------------------------------------------

@dataclass
class EnsembleSpec:
    """What rebuilds an ensemble: the method, the classes and each member's config."""
    method: str
    class_names: list[str]
    trial_ids: list[str]
    configs: list[TrainConfig]

    @property
    def resolution(self) -> int:
        """Input side length: the largest member's, so no member upsamples its input."""
        return max(cfg.resolution for cfg in self.configs)

    def build(self) -> EnsembleClassifier:
        """The module with fresh weights, ready for a state dict."""
        members = [ImageClassifier(build_model(cfg.replace(weights="none"),
                                               len(self.class_names)), cfg.resolution)
                   for cfg in self.configs]
        combiner = make_combiner(self.method, len(members), len(self.class_names))
        return EnsembleClassifier(members, combiner)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "class_names": self.class_names,
                "input_resolution": self.resolution,
                "members": [{"trial_id": t, "config": cfg.to_dict()}
                            for t, cfg in zip(self.trial_ids, self.configs, strict=True)]}


@dataclass
class SavedEnsemble:
    spec: EnsembleSpec
    module: EnsembleClassifier


def save_ensemble_dir(directory: Path, spec: EnsembleSpec, module: EnsembleClassifier,
                      metrics: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    torch.save(module.state_dict(), directory / WEIGHTS_FILE)
    (directory / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")


def load_ensemble_dir(directory: Path) -> SavedEnsemble:
    """Load an ensemble written by `resnet-hpo ensemble`, on the CPU, in eval mode."""
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise UserError(f"{directory}: not an ensemble directory (no {name}); use one "
                            "written by resnet-hpo ensemble")
    values = yaml.safe_load((directory / CONFIG_FILE).read_text())
    source = str(directory / CONFIG_FILE)
    spec = EnsembleSpec(values["method"], list(values["class_names"]),
                        [str(m["trial_id"]) for m in values["members"]],
                        [TrainConfig.from_dict(m["config"], source=source)
                         for m in values["members"]])
    module = spec.build()
    module.load_state_dict(torch.load(directory / WEIGHTS_FILE, map_location="cpu",
                                      weights_only=True))
    return SavedEnsemble(spec, module.eval())


def export_ensemble_onnx(module: EnsembleClassifier, resolution: int, path: Path) -> None:
    """Write `path`: input `images` (N x 3 x R x R float in [0, 1]), output `probabilities`."""
    try:
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise UserError("--onnx needs the onnx extra: pip install 'resnet-hpo[onnx]'") from None
    example = torch.rand(2, 3, resolution, resolution)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.cpu().eval(), (example,), str(path), input_names=["images"],
                          output_names=["probabilities"], dynamo=True, verbose=False,
                          dynamic_shapes={"images": {0: torch.export.Dim("batch")}})


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
        export_ensemble_onnx(module, spec.resolution, out / ONNX_FILE)
    run.rundir.write_json(ENSEMBLE_FILE, result)
    print_table(result)
    print(f"ensemble in {out}/" + (f" (with {ONNX_FILE})" if onnx else ""))
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
    parser.add_argument("--onnx", action="store_true", help=f"also export {ONNX_FILE}")
    parser.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda if available)")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> None:
    ensemble_command(args.run_dir, args.top, args.method, args.output, onnx=args.onnx,
                     device=args.device)
