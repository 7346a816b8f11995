"""`resnet-hpo results`: leaderboard, importances, totals, ensemble line and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from search.cli import main
from search.rundir import SEARCH_FILE, SearchRun
from search.views.leaderboard import leaderboard
from search.views.searched_params import searched_params
from spaces.space import load_space
from tests.rundir_fixture import read_search, sampled_run

PLOTS = ("learning_curves.png", "metric_vs_params.png", "parallel_coordinates.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def results(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    main(["results", *argv])
    return capsys.readouterr().out


def test_results_prints_the_leaderboard_and_writes_the_plots(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = sampled_run(tmp_path / "demo", n_trials=12)
    out = results(capsys, str(run), "--top", "4")
    assert "12 trials (11 TERMINATED, 1 ERROR); 7 stopped early;" in out
    assert "failed: t011: RuntimeError: CUDA out of memory" in out
    lines = out.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("#  trial")))
    for name in ("optimizer", "lr", "momentum", "unfreeze_depth", "val_acc", "GPU-h"):
        assert name in lines[header].split()
    rows = lines[header + 1:header + 5]
    column = lines[header].split().index("val_acc")
    metrics = [float(row.split()[column]) for row in rows]
    assert metrics == sorted(metrics, reverse=True)
    assert lines[header + 5] == ""
    assert "hyperparameter importances (fANOVA over 11 finished trials" in out
    assert "ensemble" not in out
    for name in PLOTS:
        png = (run / "plots" / name).read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 10_000, name


ONE_PARAM_SPACE = """
metric: val_acc
scheduler: {name: asha, max_epochs: 6, grace_period: 2}
search:
  lr: {type: float, low: 0.001, high: 0.3, log: true}
"""


def test_plot_titles_wrap_inside_the_figure(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """One searched hyperparameter makes the narrowest figures; a long title used to run off
    both edges of them."""
    space = tmp_path / "one.yaml"
    space.write_text(ONE_PARAM_SPACE)
    run = sampled_run(tmp_path / "search-20261125-014500", n_trials=6, space_name=str(space))
    results(capsys, str(run))
    for name in PLOTS:
        grey = np.asarray(Image.open(run / "plots" / name).convert("L"))
        assert (grey[:, [0, -1]] > 250).all(), f"{name}: something is cut at its left or right edge"


def test_conditional_parameters_a_trial_did_not_use_show_as_a_dash(tmp_path: Path) -> None:
    run = SearchRun.open(str(sampled_run(tmp_path / "demo", n_trials=12)))
    table = leaderboard(run, searched_params(run), top=20).splitlines()
    momentum = table[1].split().index("momentum")
    for line in table[2:]:
        cells = line.split()
        optimizer = cells[table[1].split().index("optimizer")]
        assert (cells[momentum] == "-") == (optimizer == "adamw")


def test_few_trials_get_a_note_instead_of_importances(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = sampled_run(tmp_path / "demo", n_trials=3)  # the last one fails
    out = results(capsys, str(run))
    assert "hyperparameter importances: need at least 3 finished trials, have 2" in out
    assert all((run / "plots" / name).exists() for name in PLOTS)


def test_the_ensemble_gain_is_mentioned(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    run = sampled_run(tmp_path / "demo", n_trials=4, space_name="quick")
    members = [{"trial_id": f"t00{i}", "val_acc": 0.9, "test_acc": 0.9} for i in range(3)]
    ensemble = {"method": "average", "top": 3, "members": members,
                "val_acc": 0.95, "test_acc": 0.94, "best_member_val_acc": 0.93,
                "best_member_test_acc": 0.92, "gain": 0.02, "output_dir": "runs/demo/ensemble"}
    (run / "ensemble.json").write_text(json.dumps(ensemble))
    out = results(capsys, str(run))
    assert "ensemble of the top 3 (average: t000, t001, t002): val_acc 0.9500" in out
    assert "gain +0.0200 on test" in out
    assert "confusion_matrices.png" not in out
    (run / "ensemble.json").write_text(json.dumps(ensemble | {"requested": "all"}))
    (run / "plots" / "confusion_matrices.png").write_bytes(PNG_MAGIC)
    out = results(capsys, str(run))
    assert "(average, the best val_acc of all methods: t000, t001, t002)" in out
    assert (f"{run}/plots/confusion_matrices.png (the last ensemble's, written by resnet-hpo "
            "ensemble)") in out


def test_without_a_recorded_space_the_varying_columns_are_shown(tmp_path: Path) -> None:
    run_path = sampled_run(tmp_path / "demo", n_trials=5, space_name="quick")
    info = read_search(run_path)
    del info["searched"], info["space_text"]
    (run_path / SEARCH_FILE).write_text(json.dumps(info))
    names = [p.name for p in searched_params(SearchRun.open(str(run_path)))]
    assert set(names) == {p.name for p in load_space("quick").params}


def test_a_directory_that_is_no_run_is_a_one_line_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["results", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"resnet-hpo: error: {tmp_path}: no search.json here; is this the run "
                   "directory of a search (STORAGE/NAME)?\n")
