"""`resnet-hpo best`: the best trial at its best epoch, best.yaml, and a retrain command that
runs as printed and trains the trial's config."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest
import yaml

from search.cli import main
from search.rundir import RunDir, SearchRun
from tests.conftest import write_class_tree
from tests.rundir_fixture import search_json, trial_rows, write_run
from trainable.config import TrainConfig

SEARCHED = ["lr", "weight_decay", "label_smoothing", "warmup_epochs"]


def config(**changes: Any) -> dict[str, Any]:
    return TrainConfig(**{"weights": "none", "epochs": 6, **changes}).to_dict()


def make_run(run: Path, trials: list[tuple[dict[str, Any], str, float, int, int, bool]],
             **search: Any) -> Path:
    """trials: (config, trial_id, peak, best_epoch, epochs_run, failed)."""
    rows, epochs = [], []
    for cfg, trial_id, peak, best_epoch, epochs_run, failed in trials:
        row, rows_of_epochs = trial_rows(cfg, trial_id, peak, best_epoch, epochs_run, failed)
        rows.append(row)
        epochs += rows_of_epochs
    return write_run(run, rows, epochs, {**search_json("quick", run.name, SEARCHED), **search})


def best_output(capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    main(["best", *argv])
    return capsys.readouterr().out.strip().splitlines()


def test_best_is_chosen_at_its_best_epoch_not_its_last(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # t-peak: best 0.9 at epoch 2, then sags to 0.86 by epoch 6; t-steady: 0.88 at the end.
    make_run(tmp_path / "runs" / "demo", [
        (config(lr=0.1), "t-peak", 0.9, 2, 6, False),
        (config(lr=0.02), "t-steady", 0.88, 6, 6, False),
        (config(lr=0.05), "t-failed", 0.95, 3, 3, True)])
    lines = best_output(capsys, "runs/demo")
    assert lines[0].startswith("best trial t-peak of 3: val_acc 0.9000 at epoch 2")
    assert lines[-1] == ("resnet-hpo train --config runs/demo/best.yaml --epochs 2 "
                         "--output runs/demo/best-model")
    assert any("cosine schedule now ends at epoch 2 instead of 6" in line for line in lines)
    written = yaml.safe_load((tmp_path / "runs/demo/best.yaml").read_text())
    assert written == config(lr=0.1)


def test_min_mode_picks_the_lowest_metric(tmp_path: Path) -> None:
    run = make_run(tmp_path / "demo", [
        (config(lr=0.1), "t-high", 0.9, 2, 6, False),
        (config(lr=0.02), "t-low", 0.5, 6, 6, False)], metric="val_loss", mode="min")
    assert [t["trial_id"] for t in SearchRun.open(str(run)).ranked] == ["t-low", "t-high"]


def test_output_file_and_warmup_longer_than_the_best_epoch(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "demo", [(config(lr=0.1, warmup_epochs=2.5), "t0", 0.9, 1, 6,
                                        False)])
    out = tmp_path / "chosen.yaml"
    lines = best_output(capsys, str(run), "--output", str(out))
    assert TrainConfig.from_yaml(out).warmup_epochs == 2.5
    assert not (run / "best.yaml").exists()
    assert any("--epochs 3, not 1: the warmup (2.5 epochs)" in line for line in lines)
    assert shlex.split(lines[-1])[2:6] == ["--config", str(out), "--epochs", "3"]


def test_no_scored_trial_is_a_one_line_error(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "demo", [(config(), "t0", 0.9, 2, 2, True)])
    with pytest.raises(SystemExit) as exit_info:
        main(["best", str(run)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("resnet-hpo: error: ") and "no trial has reported val_acc" in err
    assert err.count("\n") == 1


def test_remote_run_dir_also_writes_a_local_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    make_run(tmp_path / "bucket" / "demo", [(config(lr=0.1), "t0", 0.9, 2, 6, False)])
    # A filesystem that is not LocalFileSystem stands in for s3://.
    remote = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    monkeypatch.setattr(RunDir, "open", classmethod(
        lambda cls, uri: cls(remote, "demo", "s3://bucket/demo")))
    monkeypatch.chdir(tmp_path)
    lines = best_output(capsys, "s3://bucket/demo")
    assert (tmp_path / "bucket/demo/best.yaml").read_text() == (tmp_path / "best-demo.yaml"
                                                                ).read_text()
    assert lines[-1] == ("resnet-hpo train --config best-demo.yaml --epochs 2 "
                         "--output best-demo-model")


@pytest.mark.slow
def test_printed_command_retrains_the_best_trials_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_class_tree(tmp_path / "my images", per_class=4, size=16)
    tiny = dict(data=f"imagefolder:{data}", resolution=16, val_fraction=0.25, batch_size=8,
                unfreeze_depth=1, epochs=3, warmup_epochs=0.5, seed=7)
    make_run(tmp_path / "runs" / "my demo", [
        (config(**{**tiny, "lr": 0.03, "label_smoothing": 0.05}), "t-best", 0.9, 2, 3, False),
        (config(**{**tiny, "lr": 0.01}), "t-other", 0.6, 3, 3, False)])
    monkeypatch.chdir(tmp_path)
    command = shlex.split(best_output(capsys, "runs/my demo")[-1])
    assert command[:2] == ["resnet-hpo", "train"]
    main(command[1:])
    retrained = yaml.safe_load((tmp_path / "runs/my demo/best-model/config.yaml").read_text())
    trial = SearchRun.open("runs/my demo").ranked[0]
    assert trial["trial_id"] == "t-best"
    for key, value in retrained.items():
        expected = trial["best_epoch"] if key == "epochs" else trial[key]
        assert value == expected, key


def test_a_best_trial_still_improving_at_its_last_epoch_is_noted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from search.run.driver import print_summary

    peaked_late = make_run(tmp_path / "late", [(config(lr=0.1), "t-late", 0.9, 6, 6, False),
                                               (config(lr=0.02), "t-early", 0.8, 2, 6, False)])
    note = ("note: trial t-late was best at its last epoch (6 of 6), so more epochs may help: "
            "search with --max-epochs 12, or retrain with --epochs 12")
    lines = best_output(capsys, str(peaked_late))
    assert note in lines
    assert lines[-1].startswith("resnet-hpo train --config") and "--epochs 6" in lines[-1]
    print_summary(SearchRun.open(str(peaked_late)))
    main(["results", str(peaked_late)])
    assert capsys.readouterr().out.count(note) == 2

    peaked_early = make_run(tmp_path / "early", [(config(lr=0.1), "t0", 0.9, 4, 6, False)])
    print_summary(SearchRun.open(str(peaked_early)))
    main(["results", str(peaked_early)])
    assert "note: trial" not in capsys.readouterr().out + "\n".join(
        best_output(capsys, str(peaked_early)))
