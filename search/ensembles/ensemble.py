"""`resnet-hpo ensemble`: combine the best trials of a search into one model.

The top K trials (by the search metric at their best epoch) are loaded from their
checkpoints and evaluated on the data each was trained on (decoded at the search's
resolution, resized to its own, with its own stem; `search.ensembles.evaluation`). The result
is one module (`trainable.fusion.EnsembleClassifier`: float RGB images in [0, 1] -> class
probabilities), saved as an ensemble directory (`trainable.saved`) and, with --onnx,
exported as one graph. With --method all every method is evaluated on the same members and
the one with the best value of the search's metric on val is saved; the best member, which
the gain is measured against, is chosen the same way.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from search.ensembles.evaluation import (
    Fitted,
    Member,
    MemberOutputs,
    Scores,
    accuracy,
    combine,
    member_outputs,
    scores_of_members,
)
from search.ensembles.member_diversity import (
    confusion_matrix,
    disagreement_text,
    pairwise_disagreement,
)
from search.rundir import CONFUSION_MATRICES_FILE, ENSEMBLE_FILE, TRIALS_FILE, SearchRun
from search.views.plots import confusion_matrices, png_bytes, write_plot
from trainable.errors import UserError
from trainable.export import export_onnx
from trainable.fusion import EnsembleClassifier, EnsembleSpec, WeightedAverage
from trainable.model import ImageClassifier
from trainable.model_files import ENSEMBLE_METHODS, ENSEMBLE_ONNX_FILE
from trainable.ranking import best_of, metric_mode
from trainable.saved import load_checkpoint_dir, save_ensemble_dir
from trainable.storage import local_dir


def load_members(run: SearchRun, top: int) -> list[Member]:
    """The best `top` trials that left a checkpoint, best first."""
    ranked = [t for t in run.ranked if t.get("checkpoint_path")]
    if len(ranked) < 2:
        raise UserError(f"{run.rundir.uri_of(TRIALS_FILE)}: an ensemble needs at least 2 "
                        f"trials with a checkpoint, found {len(ranked)}")
    if top > len(ranked):
        warnings.warn(f"--top {top}: only {len(ranked)} trials have a checkpoint; using them "
                      "all", stacklevel=2)
    members = [load_member(t) for t in ranked[:top]]
    names = members[0].saved.class_names
    for m in members[1:]:
        if m.saved.class_names != names:
            raise UserError(f"trial {m.trial_id}: its classes differ from trial "
                            f"{members[0].trial_id}'s; members must share their classes")
    return members


def load_member(trial: dict[str, Any]) -> Member:
    """The trial's best-epoch weights, from its checkpoint on this disk or in object storage."""
    try:
        with local_dir(trial["checkpoint_path"]) as directory:
            return Member(trial["trial_id"], load_checkpoint_dir(directory))
    except UserError as e:
        raise UserError(f"trial {trial['trial_id']}: cannot read its checkpoint ({e})") from None


def ensemble_metric(run: SearchRun) -> str:
    """The search's metric as members and methods are scored: on the validation split, so a
    search on train_loss is ranked by val_loss."""
    return "val_acc" if run.metric == "val_acc" else "val_loss"


def best_index(scores: list[Scores], metric: str) -> int:
    """Which of `scores` is best by `metric` (the first of equals)."""
    best = best_of(range(len(scores)), lambda i: getattr(scores[i], metric), metric_mode(metric))
    assert best is not None, "accuracies and losses of probabilities are finite"
    return best


def gain_over_best_member(scores: Scores, best_member: Scores) -> float:
    """The ensemble's accuracy minus the best member's: on test when there is one, else val."""
    if scores.test_acc is not None and best_member.test_acc is not None:
        return scores.test_acc - best_member.test_acc
    return scores.val_acc - best_member.val_acc


def method_row(fit: Fitted, best_member: Scores) -> dict[str, Any]:
    row = {"method": fit.method, "val_acc": fit.scores.val_acc,
           "val_loss": fit.scores.val_loss, "test_acc": fit.scores.test_acc,
           "gain": gain_over_best_member(fit.scores, best_member),
           "fit_seconds": fit.fit_seconds}
    if isinstance(fit.combiner, WeightedAverage):
        row["weights"] = fit.combiner.weights.tolist()
    return row


def summary(method: str, metric: str, top: int, members: list[Member], outputs: MemberOutputs,
            fits: list[Fitted], chosen: Fitted, output_dir: Path,
            confusion_pngs: list[str]) -> dict[str, Any]:
    """The evaluation as RUN/ensemble.json holds it: the saved ensemble (`chosen`) at the top
    level, every evaluated method under `methods`."""
    member_scores = scores_of_members(outputs)
    best = best_index(member_scores, metric)
    return {
        "method": chosen.method, "requested": method, "metric": metric, "top": top,
        "members": [{"trial_id": m.trial_id, "val_acc": s.val_acc, "val_loss": s.val_loss,
                     "test_acc": s.test_acc}
                    for m, s in zip(members, member_scores, strict=True)],
        "val_acc": chosen.scores.val_acc, "val_loss": chosen.scores.val_loss,
        "test_acc": chosen.scores.test_acc, "best_member": members[best].trial_id,
        "best_member_val_acc": member_scores[best].val_acc,
        "best_member_test_acc": member_scores[best].test_acc,
        "gain": gain_over_best_member(chosen.scores, member_scores[best]),
        "fit_seconds": chosen.fit_seconds,
        "methods": [method_row(f, member_scores[best]) for f in fits],
        "train_features_seconds": outputs.train_seconds,
        "train_images": len(outputs.train.labels) if outputs.train is not None else None,
        "val_images": len(outputs.val.labels),
        "val_disagreement": pairwise_disagreement(outputs.val.probs).tolist(),
        "confusion_matrices": confusion_pngs, "output_dir": str(output_dir)}


def acc(value: float | None) -> str:
    return f"{value:8.4f}" if value is not None else f"{'-':>8}"


def print_report(result: dict[str, Any]) -> None:
    width = max(12, *(len(m["trial_id"]) for m in result["members"]))
    print(f"{'member':<{width}}  {'val_acc':>8}  {'val_loss':>8}  {'test_acc':>8}")
    for m in result["members"]:
        print(f"{m['trial_id']:<{width}}  {acc(m['val_acc'])}  {acc(m['val_loss'])}  "
              f"{acc(m['test_acc'])}")
    split = "test" if result["test_acc"] is not None else "val"
    if result["requested"] == "all":
        print()
        print_methods(result["methods"])
        print(f"gain: over the best member ({result['best_member']}, by {result['metric']}) "
              f"on {split}; fit_s: seconds spent fitting the combiner")
    else:
        name = f"{result['method']} of {len(result['members'])}"
        print(f"{name:<{width}}  {acc(result['val_acc'])}  {acc(result['val_loss'])}  "
              f"{acc(result['test_acc'])}")
        print(f"gain over the best member ({split}): {result['gain']:+.4f}; the best member "
              f"is {result['best_member']}, by {result['metric']}")
    for line in method_notes(result):
        print(line)
    if result["requested"] == "all":
        print(f"saved: {result['method']}, the best {result['metric']} (of equals, the first "
              "listed)")
    print()
    trial_ids = [m["trial_id"] for m in result["members"]]
    print(disagreement_text(trial_ids, np.array(result["val_disagreement"]), "val",
                            result["val_images"]))
    print(f"confusion matrices: {' and '.join(result['confusion_matrices'])}")


def print_methods(rows: list[dict[str, Any]]) -> None:
    print(f"{'method':<8}  {'val_acc':>8}  {'val_loss':>8}  {'test_acc':>8}  {'gain':>7}  "
          f"{'fit_s':>6}")
    for row in rows:
        print(f"{row['method']:<8}  {acc(row['val_acc'])}  {acc(row['val_loss'])}  "
              f"{acc(row['test_acc'])}  "
              f"{row['gain']:+7.4f}  {row['fit_seconds']:6.2f}")


def method_notes(result: dict[str, Any]) -> list[str]:
    """What the fitted methods' scores mean, for those in the result."""
    rows = {row["method"]: row for row in result["methods"]}
    fitted_on_val = [m for m in ("weighted", "stack") if m in rows]
    notes = []
    if fitted_on_val:
        notes.append(f"{' and '.join(fitted_on_val)}: val_acc is cross-validated on the "
                     "validation split; test_acc comes from a fit on all of it")
    if "weighted" in rows:
        notes.append("weighted: the members' weights (fitted on all of val) are "
                     + ", ".join(f"{w:.3f}" for w in rows["weighted"]["weights"]))
    if "concat" in rows:
        notes.append(f"concat: a linear head on the members' features of the "
                     f"{result['train_images']} training images, trained in "
                     f"{rows['concat']['fit_seconds']:.1f}s after "
                     f"{result['train_features_seconds']:.1f}s computing the features; val "
                     "chose when it stopped")
    return notes


def write_confusion_matrices(run: SearchRun, out: Path, members: list[Member],
                             outputs: MemberOutputs, chosen: Fitted) -> list[str]:
    """out/confusion_matrices.png and RUN/plots/confusion_matrices.png: each member and the
    ensemble, on test when there is one (no combiner was fitted there), else on val."""
    split, probs = ((outputs.test, chosen.test_probs)
                    if outputs.test is not None and chosen.test_probs is not None
                    else (outputs.val, chosen.val_probs))
    name = "test" if split is outputs.test else "val"
    classes = members[0].saved.class_names
    panels = [(f"trial {m.trial_id}: accuracy {accuracy(split.probs[i], split.labels):.4f}",
               confusion_matrix(split.probs[i], split.labels, len(classes)))
              for i, m in enumerate(members)]
    panels.append((f"ensemble ({chosen.method}): accuracy {accuracy(probs, split.labels):.4f}",
                   confusion_matrix(probs, split.labels, len(classes))))
    png = png_bytes(confusion_matrices(
        panels, classes, f"{run.name}: confusion matrices on the {name} split "
        f"({len(split.labels)} images), in % of each true class"))
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFUSION_MATRICES_FILE).write_bytes(png)
    return [str(out / CONFUSION_MATRICES_FILE), write_plot(run.rundir, CONFUSION_MATRICES_FILE,
                                                           png)]


def default_output(run: SearchRun) -> Path:
    local = run.rundir.local_path("ensemble")
    return local if local is not None else Path(f"{run.name}-ensemble")


def ensemble_command(run_uri: str, top: int, method: str, output: str | None,
                     onnx: bool = False, device: str | None = None) -> dict[str, Any]:
    """Evaluate `method` (or every method, with "all") on the top trials and save one
    ensemble: the method asked for, or with "all" the best by the search's metric."""
    if top < 2:
        raise UserError(f"--top {top}: an ensemble needs at least 2 members")
    run = SearchRun.open(run_uri)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    members = load_members(run, top)
    methods = ENSEMBLE_METHODS if method == "all" else (method,)
    outputs = member_outputs(members, dev, run.info.get("resolution"),
                             with_features="concat" in methods)
    fits = [combine(m, outputs) for m in methods]
    metric = ensemble_metric(run)
    chosen = fits[best_index([f.scores for f in fits], metric)]  # of equals the simplest
    out = Path(output) if output else default_output(run)
    pngs = write_confusion_matrices(run, out, members, outputs, chosen)
    result = summary(method, metric, top, members, outputs, fits, chosen, out, pngs)
    spec = EnsembleSpec(chosen.method, members[0].saved.class_names,
                        [m.trial_id for m in members], [m.saved.cfg for m in members])
    module = EnsembleClassifier([ImageClassifier(m.saved.model.cpu(), m.saved.cfg.resolution)
                                 for m in members], chosen.combiner).eval()
    save_ensemble_dir(out, spec, module, result)
    if onnx:
        export_onnx(module, spec.resolution, out / ENSEMBLE_ONNX_FILE, "probabilities")
    run.rundir.write_json(ENSEMBLE_FILE, result)
    print_report(result)
    print(f"ensemble in {out}/" + (f" (with {ENSEMBLE_ONNX_FILE})" if onnx else ""))
    return result
