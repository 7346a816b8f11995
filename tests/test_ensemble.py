"""`resnet-hpo ensemble`: combiners against hand computations, stacking's honesty, and the
command on a run directory whose trials are real (tiny) checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pytest
import sklearn.linear_model
import torch

from search.cli import main
from search.ensemble import SplitProbs, combine, ensemble_command, fit_stack, stacked_module
from search.rundir import ENSEMBLE_FILE, SEARCH_FILE, TRIALS_FILE, RunDir, trials_schema
from tests.conftest import write_class_tree
from trainable import TrainConfig, UserError, fit, load_dataset
from trainable.fusion import MajorityVote, MeanProbabilities
from trainable.model import ImageClassifier
from trainable.saved import load_ensemble_dir
from trainable.train import DeviceImages, Runtime, SaveCheckpoint, evaluate

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


def random_split(n: int, members: int, classes: int, seed: int) -> SplitProbs:
    """Member probabilities that lean towards the true class, so stacking has signal."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    logits = torch.randn(members, n, classes, generator=gen)
    logits[:, torch.arange(n), labels] += 1.5
    return SplitProbs(labels, logits.softmax(-1))


class SpyRegression(sklearn.linear_model.LogisticRegression):
    """Records every row a fitted instance is asked to score that it was fitted on."""
    violations: ClassVar[list[int]] = []
    predicted_rows: ClassVar[int] = 0

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> SpyRegression:
        self.fitted_rows = {row.tobytes() for row in np.asarray(X)}
        return super().fit(X, y, sample_weight)  # type: ignore[no-any-return]

    def predict(self, X: Any) -> Any:
        rows = [row.tobytes() for row in np.asarray(X)]
        SpyRegression.violations += [i for i, row in enumerate(rows) if row in self.fitted_rows]
        SpyRegression.predicted_rows += len(rows)
        return super().predict(X)


def test_stack_never_scores_on_its_own_training_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sklearn.linear_model, "LogisticRegression", SpyRegression)
    val, test = random_split(30, 3, 3, seed=0), random_split(15, 3, 3, seed=1)
    _, scores = fit_stack(val, test)
    assert SpyRegression.violations == []
    assert SpyRegression.predicted_rows == 30 + 15  # every val row once out of fold, then test
    assert 0.5 < scores.val_acc <= 1 and scores.test_acc is not None


@pytest.mark.parametrize("classes", [2, 3])
def test_stacked_module_reproduces_the_regression(classes: int) -> None:
    val = random_split(40, 2, classes, seed=2)
    features = val.probs.permute(1, 0, 2).flatten(1).numpy()
    regression = sklearn.linear_model.LogisticRegression(max_iter=1000).fit(
        features, val.labels.numpy())
    module = stacked_module(regression, 2, classes)
    assert module(val.probs).detach().numpy() == pytest.approx(
        regression.predict_proba(features), abs=1e-5)


def test_stack_needs_two_validation_images_per_class() -> None:
    val = SplitProbs(torch.tensor([0, 1, 1, 2, 2]), torch.rand(2, 5, 3).softmax(-1))
    with pytest.raises(UserError, match="2 validation images of every class"):
        combine("stack", val, None)


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
    assert set(saved) == {"method", "top", "members", "val_acc", "test_acc",
                          "best_member_val_acc", "best_member_test_acc", "gain", "output_dir"}
    assert saved["best_member_test_acc"] == max(m["test_acc"] for m in saved["members"])
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


def test_saved_ensemble_reproduces_its_score(run: Path, tmp_path: Path) -> None:
    # the top 2 share one resolution, so the module sees exactly the images they were scored on
    result = ensemble_command(str(run), 2, "stack", str(tmp_path / "ens"))
    ensemble = load_ensemble_dir(tmp_path / "ens")
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
    assert lines[0].split() == ["member", "val_acc", "test_acc"]
    assert [line.split()[0] for line in lines[1:4]] == ["t0", "t1", "t2"]
    assert lines[4].startswith("average of 3") and "gain over the best member (test)" in lines[5]


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
def test_onnx_export_matches_the_module(run: Path, tmp_path: Path) -> None:
    import onnxruntime

    # vote (argmax, one-hot) over members that resize to 16 and 8 pixels: one graph
    ensemble_command(str(run), 3, "vote", str(tmp_path / "ens"), onnx=True)
    ensemble = load_ensemble_dir(tmp_path / "ens")
    images = torch.rand(3, 3, 16, 16)
    session = onnxruntime.InferenceSession(str(tmp_path / "ens" / "ensemble.onnx"))
    (onnx_probs,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        assert onnx_probs == pytest.approx(ensemble.module(images).numpy(), abs=1e-4)
