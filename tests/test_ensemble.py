"""`resnet-hpo ensemble`: combiners against hand computations, stacking's honesty, and the
command on a run directory whose trials are real (tiny) checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import sklearn.linear_model
import torch
import torch.nn.functional as F
import yaml

from search.cli import main
from search.ensembles.ensemble import best_index, ensemble_command, gain_over_best_member
from search.ensembles.evaluation import (
    MemberOutputs,
    Scores,
    SplitOutputs,
    accuracy,
    combine,
    fit_weights,
    stacked_module,
)
from search.ensembles.member_diversity import confusion_matrix, pairwise_disagreement
from search.rundir import ENSEMBLE_FILE, SEARCH_FILE, TRIALS_FILE, RunDir, trials_schema
from tests.conftest import write_class_tree
from trainable import TrainConfig, UserError, fit, load_dataset
from trainable.device_images import DeviceImages
from trainable.fusion import (
    FeatureHead,
    MajorityVote,
    MeanProbabilities,
    WeightedAverage,
)
from trainable.model import ImageClassifier, build_model
from trainable.model_files import ENSEMBLE_METHODS
from trainable.runtime import Runtime
from trainable.saved import load_ensemble_dir
from trainable.train import SaveCheckpoint, evaluate

# (trial_id, search metric, config changes): members differ in resolution and stem.
MEMBERS: list[tuple[str, float, dict[str, Any]]] = [
    ("t0", 0.9, {"resolution": 16}),
    ("t1", 0.8, {"resolution": 16, "stem": "cifar", "seed": 1}),
    ("t2", 0.7, {"resolution": 8, "seed": 2}),
]


def softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def test_average_is_the_mean_of_member_probabilities() -> None:
    logits = [[[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]],  # member 0, two images
              [[-1.0, 1.5, 0.0], [3.0, 0.0, 0.0]]]  # member 1
    expected = [[(a + b) / 2 for a, b in zip(softmax(logits[0][i]), softmax(logits[1][i]),
                                             strict=True)] for i in range(2)]
    probs = torch.tensor(logits).softmax(-1)
    averaged = MeanProbabilities()(probs)
    assert averaged.numpy() == pytest.approx(np.array(expected), abs=1e-6)
    # image 0: member 0 says class 0 (0.844), member 1 class 1 (0.766); the mean picks 0
    assert averaged[0].tolist() == pytest.approx([0.4533, 0.4402, 0.1065], abs=1e-4)
    assert averaged.argmax(-1).tolist() == [0, 0]


def test_vote_takes_the_majority_and_breaks_ties_by_mean_probability() -> None:
    three = torch.tensor([[[0.5, 0.4, 0.1]], [[0.4, 0.3, 0.3]], [[0.0, 1.0, 0.0]]])
    # two votes for class 0 beat class 1's higher mean probability (0.567 vs 0.3)
    assert MajorityVote()(three).argmax(-1).tolist() == [0]
    tied = torch.tensor([[[0.6, 0.4]], [[0.1, 0.9]]])  # one vote each; mean (0.35, 0.65)
    out = MajorityVote()(tied)
    assert out.argmax(-1).tolist() == [1]
    assert out[0].tolist() == pytest.approx([(1 + 0.35) / 3, (1 + 0.65) / 3])


def random_split(n: int, members: int, classes: int, seed: int) -> SplitOutputs:
    """Member probabilities that lean towards the true class, so stacking has signal."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    logits = torch.randn(members, n, classes, generator=gen)
    logits[:, torch.arange(n), labels] += 1.5
    return SplitOutputs(labels, logits.softmax(-1))


def test_weighted_average_applies_its_weights() -> None:
    probs = torch.tensor([[[0.9, 0.1]], [[0.2, 0.8]]])
    weighted = WeightedAverage(2)
    weighted.weights.copy_(torch.tensor([0.25, 0.75]))
    assert weighted(probs)[0].tolist() == pytest.approx([0.25 * 0.9 + 0.75 * 0.2,
                                                         0.25 * 0.1 + 0.75 * 0.8])


def test_fitted_weights_minimise_the_validation_nll() -> None:
    val = random_split(60, 2, 3, seed=3)
    val.probs[1] = torch.randn(60, 3, generator=torch.Generator().manual_seed(4)).softmax(-1)
    weights = fit_weights(val).weights
    assert weights.min() >= 0 and weights.sum().item() == pytest.approx(1)

    def nll(w0: float) -> float:
        mixed = w0 * val.probs[0] + (1 - w0) * val.probs[1]
        return -mixed[torch.arange(60), val.labels].log().mean().item()

    grid = [nll(w / 100) for w in range(101)]
    assert nll(weights[0].item()) <= min(grid) + 1e-9
    assert weights[0] > weights[1]


def leaky_if_scored_on_fit_rows(n_val: int, n_test: int, classes: int) -> MemberOutputs:
    """One member per image, confidently right on that image only and near-uniform (with a
    small bump on a wrong class) elsewhere. Fitted on a set of images, weighted and stack
    trust the members of those images: they label those images right and every other image
    wrong. So a score that includes images the combiner was fitted on is above 0."""
    n = n_val + n_test
    labels = torch.arange(n) % classes
    probs = torch.full((n, n, classes), 0.99 / classes)
    probs[:, torch.arange(n), (labels + 1) % classes] += 0.01
    probs[torch.arange(n), torch.arange(n)] = F.one_hot(labels, classes).float()
    return MemberOutputs(None, SplitOutputs(labels[:n_val], probs[:, :n_val]),
                         SplitOutputs(labels[n_val:], probs[:, n_val:]))


@pytest.mark.parametrize("method", ["weighted", "stack"])
def test_fitted_combiners_never_score_images_they_were_fitted_on(method: str) -> None:
    outputs = leaky_if_scored_on_fit_rows(30, 12, 3)
    result = combine(method, outputs)
    assert result.scores.val_acc == 0  # every val image predicted by a fit without it
    assert result.scores.test_acc == 0  # test predicted by a fit on val alone
    # the kept combiner (fitted on all of val) would have scored val perfectly
    assert accuracy(result.combiner(outputs.val.probs), outputs.val.labels) == 1
    assert result.fit_seconds > 0


def test_concat_head_learns_from_the_training_split_only() -> None:
    """Features 0-2 say the class on every split; features 3-5 are zero on train but say
    the label on val and test, whose labels follow another rule. A head fitted on train
    predicts by features 0-2 and gets every val and test image wrong; one that was fitted
    on val or test images would have used features 3-5 and got them right."""
    gen = torch.Generator().manual_seed(0)

    def split(n: int, shifted: bool) -> SplitOutputs:
        signal = torch.arange(n) % 3
        labels = (signal + 1) % 3 if shifted else signal
        features = torch.zeros(n, 6)
        features[:, :3] = 3 * F.one_hot(signal, 3) + 0.3 * torch.randn(n, 3, generator=gen)
        if shifted:
            features[:, 3:] = 3 * F.one_hot(labels, 3).float()
        return SplitOutputs(labels, torch.full((1, n, 3), 1 / 3), features)

    outputs = MemberOutputs(split(60, False), split(30, True), split(30, True))
    result = combine("concat", outputs)
    assert result.scores.val_acc == 0 and result.scores.test_acc == 0
    assert isinstance(result.combiner, FeatureHead)
    assert result.combiner.linear.weight[:, 3:].abs().max() == 0
    train = outputs.train
    assert train is not None and train.features is not None
    assert accuracy(result.combiner(train.features), train.labels) == 1


def test_stacked_logistic_reproduces_the_regression_for_2_and_3_classes() -> None:
    for classes in (2, 3):
        val = random_split(40, 2, classes, seed=2)
        features = val.probs.permute(1, 0, 2).flatten(1).numpy()
        regression = sklearn.linear_model.LogisticRegression(max_iter=1000).fit(
            features, val.labels.numpy())
        module = stacked_module(regression, 2, classes)
        assert module(val.probs).detach().numpy() == pytest.approx(
            regression.predict_proba(features), abs=1e-5)


@pytest.mark.parametrize("method", ["weighted", "stack"])
def test_fitting_on_val_needs_two_validation_images_per_class(method: str) -> None:
    val = SplitOutputs(torch.tensor([0, 1, 1, 2, 2]), torch.rand(2, 5, 3).softmax(-1))
    with pytest.raises(UserError, match=f"--method {method}: needs at least 2 validation"):
        combine(method, MemberOutputs(None, val, None))


def test_pairwise_disagreement_and_confusion_matrix() -> None:
    predictions = torch.tensor([[0, 1, 2, 2], [0, 1, 1, 2], [1, 0, 1, 2]])
    probs = F.one_hot(predictions, 3).float()
    assert pairwise_disagreement(probs).tolist() == [[0, 0.25, 0.75], [0.25, 0, 0.5],
                                                     [0.75, 0.5, 0]]
    labels = torch.tensor([0, 1, 1, 2])
    assert confusion_matrix(probs[0], labels, 4).tolist() == [
        [1, 0, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 1, 0], [0, 0, 0, 0]]


def test_penultimate_features_are_what_fc_reads() -> None:
    for stem in ("imagenet", "cifar"):
        model = build_model(TrainConfig(weights="none", stem=stem), 3).eval()
        classifier = ImageClassifier(model, 16)
        images = torch.rand(2, 3, 24, 24)
        with torch.no_grad():
            features = classifier.features(images)
            assert features.shape == (2, 512)
            assert model.fc(features) == pytest.approx(classifier(images), abs=1e-5)


# --- the command on a run directory --------------------------------------------------------

def train_trial(tmp: Path, data: str, trial_id: str, metric: float,
                changes: dict[str, Any]) -> dict[str, Any]:
    """A trials.parquet row whose checkpoint is a real (1-epoch, fc-only) training run."""
    cfg = TrainConfig(data=data, weights="none", unfreeze_depth=0, epochs=1, batch_size=8,
                      warmup_epochs=0, **changes)
    directory = tmp / "checkpoints" / trial_id

    def report(_metrics: dict[str, float], save: SaveCheckpoint) -> None:
        save(directory)

    fit(cfg, report)
    return trial_row(trial_id, metric, cfg, str(directory))


def trial_row(trial_id: str, metric: float, cfg: TrainConfig, checkpoint: str | None,
              status: str = "TERMINATED") -> dict[str, Any]:
    return {"trial_id": trial_id, "status": status, "best_metric": metric, "best_epoch": 1,
            "best_val_acc": metric, "checkpoint_path": checkpoint, **cfg.to_dict()}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of 5 trials: 3 with checkpoints, one failed, one without a checkpoint."""
    tmp = tmp_path_factory.mktemp("ensemble")
    with pytest.MonkeyPatch.context() as mp:  # the autouse cache fixture is per test
        mp.setenv("RESNET_HPO_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        data = "imagefolder:" + str(tmp / "images")
        for split, n, seed in (("train", 8, 0), ("val", 3, 1), ("test", 4, 2)):
            write_class_tree(tmp / "images" / split, per_class=n, size=16, seed=seed)
        rows = [train_trial(tmp, data, t, metric, changes) for t, metric, changes in MEMBERS]
    rows += [trial_row("t3", 0.95, TrainConfig(data=data), "/nowhere", status="ERROR"),
             trial_row("t4", 0.99, TrainConfig(data=data), None, status="RUNNING")]
    rundir = RunDir.open(tmp / "run")
    rundir.write_table(TRIALS_FILE, pa.Table.from_pylist(rows, schema=trials_schema()))
    rundir.write_json(SEARCH_FILE, {"metric": "val_acc", "mode": "max"})
    return tmp / "run"


def test_average_of_the_top_trials(run: Path, tmp_path: Path) -> None:
    result = ensemble_command(str(run), 3, "average", str(tmp_path / "ens"))
    assert [m["trial_id"] for m in result["members"]] == ["t0", "t1", "t2"]
    saved = json.loads((run / ENSEMBLE_FILE).read_text())
    assert saved == json.loads(json.dumps(result))
    assert set(saved) == {"method", "requested", "metric", "top", "members", "val_acc",
                          "val_loss", "test_acc", "best_member", "best_member_val_acc",
                          "best_member_test_acc", "gain", "fit_seconds", "methods",
                          "train_features_seconds", "train_images", "val_images",
                          "val_disagreement", "confusion_matrices", "output_dir"}
    assert saved["fit_seconds"] == 0 and saved["train_images"] is None
    assert saved["metric"] == "val_acc"
    best = max(saved["members"], key=lambda m: m["val_acc"])  # the first of equals
    assert saved["best_member"] == best["trial_id"]
    assert saved["best_member_test_acc"] == best["test_acc"]
    assert saved["gain"] == pytest.approx(saved["test_acc"] - saved["best_member_test_acc"])


def test_each_member_is_scored_on_the_data_it_was_trained_on(run: Path, tmp_path: Path) -> None:
    result = ensemble_command(str(run), 3, "vote", str(tmp_path / "ens"))
    ensemble = load_ensemble_dir(tmp_path / "ens")
    assert [m.resolution for m in ensemble.module.members] == [16, 16, 8]
    assert ensemble.spec.configs[1].stem == "cifar" and ensemble.spec.resolution == 16
    cfg = ensemble.spec.configs[2]
    data = load_dataset(cfg.data, 8, cfg.val_fraction)
    rt = Runtime.for_config(cfg, "cpu")
    member = ensemble.module.members[2]
    assert isinstance(member, ImageClassifier)
    _, val_acc = evaluate(member.model, DeviceImages(data.val, rt.device), rt, 16)
    assert result["members"][2]["val_acc"] == pytest.approx(val_acc)


@pytest.mark.parametrize("method", ["stack", "weighted", "concat"])
def test_saved_ensemble_reproduces_its_score(run: Path, tmp_path: Path, method: str) -> None:
    # the top 2 share one resolution, so the module sees exactly the images they were scored on
    result = ensemble_command(str(run), 2, method, str(tmp_path / "ens"))
    ensemble = load_ensemble_dir(tmp_path / "ens")  # rebuilt from ensemble.yaml
    assert ensemble.spec.method == method
    test = load_dataset(ensemble.spec.configs[0].data, 16, 0.1).test
    assert test is not None
    with torch.no_grad():
        probs = ensemble.module(torch.from_numpy(test.images).float() / 255)
    assert probs.sum(-1).tolist() == pytest.approx([1.0] * len(test))
    accuracy = (probs.argmax(-1) == torch.from_numpy(test.labels)).float().mean().item()
    assert accuracy == pytest.approx(result["test_acc"])


def test_cli_prints_members_and_gain(run: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.warns(UserWarning, match="only 3 trials have a checkpoint"):
        main(["ensemble", str(run), "--top", "5", "--output", str(tmp_path / "ens")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["member", "val_acc", "val_loss", "test_acc"]
    assert [line.split()[0] for line in lines[1:4]] == ["t0", "t1", "t2"]
    assert lines[4].startswith("average of 3") and "gain over the best member (test)" in lines[5]


def test_method_all_compares_every_method_and_saves_the_best_val_acc(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["ensemble", str(run), "--top", "3", "--method", "all", "--output",
          str(tmp_path / "ens")])
    lines = capsys.readouterr().out.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("method")))
    assert lines[header].split() == ["method", "val_acc", "val_loss", "test_acc", "gain",
                                     "fit_s"]
    table = [line.split() for line in lines[header + 1:header + 6]]
    assert [row[0] for row in table] == list(ENSEMBLE_METHODS)
    saved = json.loads((run / ENSEMBLE_FILE).read_text())
    rows = saved["methods"]
    for row, cells in zip(rows, table, strict=True):
        assert float(cells[2]) == pytest.approx(row["val_loss"], abs=1e-4)
        assert float(cells[3]) == pytest.approx(row["test_acc"], abs=1e-4)
        assert float(cells[4]) == pytest.approx(row["test_acc"] - saved["best_member_test_acc"],
                                                abs=1e-4)
        assert (float(cells[5]) == 0) == (row["method"] in ("average", "vote"))
    best = max(row["val_acc"] for row in rows)
    assert saved["method"] == next(row["method"] for row in rows if row["val_acc"] == best)
    assert load_ensemble_dir(tmp_path / "ens").spec.method == saved["method"]
    assert f"saved: {saved['method']}, the best val_acc" in "\n".join(lines)
    assert "concat: a linear head on the members' features of the 24 training images" in (
        "\n".join(lines))
    disagreement = lines.index(next(line for line in lines
                                    if line.startswith("pairwise disagreement on val")))
    assert lines[disagreement + 1].split() == ["t0", "t1", "t2"]
    assert lines[disagreement + 2].split()[:2] == ["t0", "-"]
    assert saved["val_disagreement"][0][1] == pytest.approx(float(lines[disagreement + 2]
                                                                  .split()[2]), abs=1e-4)
    for png in (tmp_path / "ens" / "confusion_matrices.png",
                run / "plots" / "confusion_matrices.png"):
        assert png.read_bytes().startswith(b"\x89PNG"), png


def test_the_best_member_and_method_follow_the_search_metric() -> None:
    scores = [Scores(val_acc=0.9, test_acc=0.8, val_loss=0.5),
              Scores(val_acc=0.8, test_acc=0.9, val_loss=0.3),
              Scores(val_acc=0.9, test_acc=0.7, val_loss=0.3)]
    assert best_index(scores, "val_acc") == 0  # the first of equals
    assert best_index(scores, "val_loss") == 1
    assert gain_over_best_member(scores[2], scores[1]) == pytest.approx(0.7 - 0.9)


def test_an_ensemble_of_a_val_loss_search_is_ranked_by_val_loss(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loss_run = tmp_path / "loss-run"
    loss_run.mkdir()
    (loss_run / TRIALS_FILE).write_bytes((run / TRIALS_FILE).read_bytes())
    (loss_run / SEARCH_FILE).write_text(json.dumps({"metric": "val_loss", "mode": "min"}))
    main(["ensemble", str(loss_run), "--top", "3", "--method", "all", "--output",
          str(tmp_path / "ens")])
    out = capsys.readouterr().out
    saved = json.loads((loss_run / ENSEMBLE_FILE).read_text())
    # best_metric is read as a loss now: the trial that was worst by accuracy leads
    assert [m["trial_id"] for m in saved["members"]] == ["t2", "t1", "t0"]
    assert saved["metric"] == "val_loss"
    lowest = min(saved["methods"], key=lambda row: row["val_loss"])
    assert saved["method"] == lowest["method"]
    best = min(saved["members"], key=lambda m: m["val_loss"])
    assert saved["best_member"] == best["trial_id"]
    assert saved["best_member_test_acc"] == best["test_acc"]
    assert f"saved: {saved['method']}, the best val_loss" in out
    assert f"over the best member ({best['trial_id']}, by val_loss)" in out


def test_members_of_different_classes_are_refused(run: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    other = write_class_tree(tmp_path / "other" / "train", per_class=4, size=16)
    (other / "blue").rename(other / "cyan")
    row = train_trial(tmp_path, "imagefolder:" + str(tmp_path / "other"), "u0", 0.99,
                      {"resolution": 16})
    rundir = RunDir.open(tmp_path / "mixed")
    rundir.write_table(TRIALS_FILE, pa.Table.from_pylist([*rundir_rows(run), row],
                                                         schema=trials_schema()))
    rundir.write_json(SEARCH_FILE, {"metric": "val_acc", "mode": "max"})
    with pytest.raises(SystemExit) as exit_info:
        main(["ensemble", str(tmp_path / "mixed"), "--method", "concat"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == ("resnet-hpo: error: trial t0: its classes differ from trial u0's; members "
                   "must share their classes\n")


def test_a_broken_ensemble_directory_is_one_line_in_predict(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ensemble_command(str(run), 2, "concat", str(tmp_path / "ens"))
    images = write_class_tree(tmp_path / "images", per_class=1, size=16)
    config = (tmp_path / "ens" / "ensemble.yaml").read_text()

    def predict_error() -> str:
        with pytest.raises(SystemExit) as exit_info:
            main(["predict", str(tmp_path / "ens"), str(images), "--output",
                  str(tmp_path / "p.csv")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("resnet-hpo: error: "), err
        return err

    spec = yaml.safe_load(config)
    del spec["members"][1]["config"]
    (tmp_path / "ens" / "ensemble.yaml").write_text(yaml.safe_dump(spec))
    assert "ensemble.yaml: member 2 needs a 'config' mapping" in predict_error()
    (tmp_path / "ens" / "ensemble.yaml").write_text(config.replace("method: concat",
                                                                   "method: blend"))
    assert "method 'blend' is not one of average, vote, weighted, stack, concat" in (
        predict_error())
    (tmp_path / "ens" / "ensemble.yaml").write_text(config.replace("method: concat",
                                                                   "method: stack"))
    assert "ensemble.pt: the weights do not fit the config beside them" in predict_error()
    (tmp_path / "ens" / "ensemble.yaml").write_text(config)
    (tmp_path / "ens" / "ensemble.pt").unlink()
    assert "not an ensemble directory written by resnet-hpo ensemble (no ensemble.pt)" in (
        predict_error())


def test_user_errors(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["ensemble", str(run), "--top", "1"])
    assert exit_info.value.code == 2
    assert "resnet-hpo: error: --top 1: an ensemble needs at least 2" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"no search\.json"):
        ensemble_command(str(tmp_path), 2, "average", None)
    rundir = RunDir.open(tmp_path / "broken")
    rows = rundir_rows(run)
    rows[0]["checkpoint_path"] = str(tmp_path / "gone")
    rundir.write_table(TRIALS_FILE, pa.Table.from_pylist(rows, schema=trials_schema()))
    rundir.write_json(SEARCH_FILE, {"metric": "val_acc", "mode": "max"})
    with pytest.raises(UserError, match="trial t0: cannot read its checkpoint"):
        ensemble_command(str(tmp_path / "broken"), 2, "average", None)


def rundir_rows(run: Path) -> list[dict[str, Any]]:
    return list(RunDir.open(run).read_table(TRIALS_FILE).to_pylist())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["vote", "weighted", "concat"])
def test_onnx_export_matches_the_module(run: Path, tmp_path: Path, method: str) -> None:
    import onnxruntime

    # members that resize to 16 and 8 pixels, fused by argmax and one-hot (vote), weights
    # (weighted) or a head on their features (concat): one graph each
    ensemble_command(str(run), 3, method, str(tmp_path / "ens"), onnx=True)
    ensemble = load_ensemble_dir(tmp_path / "ens")
    images = torch.rand(3, 3, 16, 16)
    session = onnxruntime.InferenceSession(str(tmp_path / "ens" / "ensemble.onnx"))
    (onnx_probs,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        assert onnx_probs == pytest.approx(ensemble.module(images).numpy(), abs=1e-4)
