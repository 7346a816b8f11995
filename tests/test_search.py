"""`resnet-hpo search` end to end on the shared test Ray: results, packing, samplers, errors."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import optuna
import pyarrow.parquet as pq
import pytest
import torch
from optuna.trial import TrialState
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

import search.run.driver as driver
from search.cli import main
from search.ensembles.ensemble import ensemble_command
from search.record.progress import ProgressPrinter
from search.run.cluster import check_resources
from search.run.driver import search_metadata
from search.run.request import SearchRequest, request_from_args
from search.run.study_search import StudySearch
from search.rundir import EPOCHS_FILE, SEARCH_FILE, TRIALS_FILE
from search.sampling.samplers import make_sampler, startup_trials
from spaces import DefineByRun, load_space
from tests.conftest import (
    COLOURS,
    one_line_error,
    search_space_file,
    tiny_dataset,
    write_class_tree,
)
from trainable import TrainConfig, load_dataset
from trainable.data import DecodedData, decode_dataset
from trainable.data_file import IMAGES_FILE, RUN_DATA_DIR
from trainable.device_images import DeviceImages
from trainable.errors import UserError
from trainable.model import ImageClassifier
from trainable.runtime import Runtime
from trainable.saved import load_checkpoint_dir, load_classifier, load_ensemble_dir
from trainable.train import evaluate, fit

pytestmark = pytest.mark.ray


def search(tmp_path: Path, *flags: str) -> Path:
    main(["search", "--storage", str(tmp_path / "runs"), "--name", "t", *flags])
    return tmp_path / "runs" / "t"


@pytest.mark.slow
def test_search_writes_parquet_tensorboard_and_stops_weak_trials_early(
        tmp_path: Path, ray_session: None, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    given: list[object] = []
    build = driver.build_trainable

    def recording_build(request: SearchRequest, data: DecodedData) -> object:
        given.append(data)
        return build(request, data)

    monkeypatch.setattr(driver, "build_trainable", recording_build)
    # ASHA's one rung is epoch 2, where (batch 32) lr 3.9e-6 is still at chance (0.15) and lrs
    # 0.078 and 0.031 are at 0.38 and 0.78; a trial is stopped there when it is below the
    # median of those recorded before it. Seeded 6, the random sampler gives the first two
    # trials those strong lrs, then 3.9e-6: two at a time (the session's Ray has 4 CPU slots,
    # and with 4 the third raced the first two to the rung), the third starts after one of
    # them ended, so it is stopped, with a margin no machine's numerics close.
    space = search_space_file(tmp_path, max_epochs=3, grace_period=2)
    space.write_text(space.read_text().replace("low: 0.01, high: 0.3", "low: 1.0e-6, high: 0.3")
                     .replace("batch_size: 128", "batch_size: 32")
                     .replace("metric: val_acc", "metric: val_acc\nsampler: random"))
    run = search(tmp_path, "--space", str(space), "--data", "digits", "--trials", "6",
                 "--cpus-per-trial", "1", "--max-concurrent", "2", "--sampler-seed", "6")
    out = capsys.readouterr().out
    # Trials get where the decoded file is, not the arrays; the run holds it (a hard link).
    decoded = decode_dataset("digits", 8, TrainConfig().val_fraction)
    assert given == [DecodedData(decoded.key, str(run))]
    assert (run / RUN_DATA_DIR / decoded.key / IMAGES_FILE).samefile(
        decoded.directory / IMAGES_FILE)
    assert "best trial" in out and f"run directory: {run}" in out

    trials = pq.read_table(run / TRIALS_FILE).to_pandas()
    epochs = pq.read_table(run / EPOCHS_FILE).to_pandas()
    assert len(trials) == 6 and set(trials.status) == {"TERMINATED"}
    assert (trials.epochs_run < 3).any(), "ASHA stopped no trial early"
    assert set(trials[trials.epochs_run < 3].epochs_run) == {2}
    assert trials.loc[trials.lr.idxmin()].epochs_run == 2, (  # the at-chance lr, as planned
        trials[["trial_id", "lr", "epochs_run", "best_val_acc"]].to_string())
    assert trials.stopped_early.sum() == (trials.epochs_run < 3).sum()
    assert len(epochs) == trials.epochs_run.sum()
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    for row in trials.itertuples():
        assert (Path(row.checkpoint_path) / "checkpoint.pt").is_file()
        best = epochs[(epochs.trial_id == row.trial_id) & (epochs.epoch == row.best_epoch)]
        assert best.val_acc.item() == row.best_val_acc == row.best_metric
    assert trials.best_val_acc.max() > 0.3  # 10 classes: well above chance

    relation = duckdb.sql(f"DESCRIBE SELECT * FROM '{run / TRIALS_FILE}'")
    assert relation is not None
    described = relation.fetchall()
    types = {row[0]: row[1] for row in described}
    assert types["lr"] == "DOUBLE" and types["epochs_run"] == "BIGINT"
    assert types["nesterov"] == "BOOLEAN" and types["optimizer"] == "VARCHAR"
    meta = json.loads((run / SEARCH_FILE).read_text())
    assert meta["searched"] == ["lr", "label_smoothing"] and "search" in meta["command"]

    for trial_id in trials.trial_id:
        events = EventAccumulator(str(run / "tensorboard" / trial_id))
        events.Reload()
        assert len(events.Scalars("val_acc")) == trials.set_index("trial_id").epochs_run[trial_id]
        plugins = events.PluginTagToContent("hparams")
        experiment = hparams_metadata.parse_experiment_plugin_data(
            plugins[hparams_metadata.EXPERIMENT_TAG])
        assert [h.name for h in experiment.hparam_infos] == ["lr", "label_smoothing"]
        assert experiment.metric_infos[0].name.tag == "best_val_acc"
        start = hparams_metadata.parse_session_start_info_plugin_data(
            plugins[hparams_metadata.SESSION_START_INFO_TAG])
        assert start.hparams["lr"].number_value == trials.set_index("trial_id").lr[trial_id]
        assert set(start.hparams) == {"lr", "label_smoothing"}


# val_loss as the search metric, on images whose colour gives the class in train/ and the
# next colour's class in val/: the better a trial learns, the higher its val_loss, so the
# lowest is never the last epoch's (whatever the numerics of the machine).
VAL_LOSS_SPACE = """
metric: val_loss
sampler: random
scheduler: {name: fifo, max_epochs: 3}
resources: {cpus_per_trial: 1}
fixed: {resolution: 8, weights: none, batch_size: 32, unfreeze_depth: 0, warmup_epochs: 0,
        label_smoothing: 0.0, lr: 0.1, min_lr: 0.1, crop: none, flip: none}
search:
  momentum: {type: categorical, choices: [0.9, 0.8]}
"""


def misleading_val_tree(root: Path) -> Path:
    """train/ as write_class_tree makes it; val/ with each class's images in the folder of
    the class before it."""
    write_class_tree(root / "train", per_class=30, size=12, seed=0)
    write_class_tree(root / "val", per_class=10, size=12, seed=1)
    names = list(COLOURS)
    for name in names:
        (root / "val" / name).rename(root / "val" / f"_{name}")
    for name, shown_as in zip(names, names[1:] + names[:1], strict=True):
        (root / "val" / f"_{name}").rename(root / "val" / shown_as)
    return root


@pytest.mark.slow
def test_a_val_loss_search_keeps_ranks_and_loads_the_lowest_val_loss_epoch(
        tmp_path: Path, ray_session: None, capsys: pytest.CaptureFixture[str]) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(VAL_LOSS_SPACE)
    source = f"imagefolder:{misleading_val_tree(tmp_path / 'images')}"
    run = search(tmp_path, "--space", str(space), "--data", source, "--trials", "2",
                 "--seed", "0", "--max-concurrent", "2")
    trials = pq.read_table(run / TRIALS_FILE).to_pandas()
    epochs = pq.read_table(run / EPOCHS_FILE).to_pandas()
    assert sorted(trials.momentum) == [0.8, 0.9] and set(trials.status) == {"TERMINATED"}
    data = load_dataset(source, 8, TrainConfig().val_fraction)
    members = {m["trial_id"]: m for m in ensemble_command(
        str(run), 2, "average", str(tmp_path / "ensemble"), device="cpu")["members"]}
    for row in trials.itertuples():
        mine = epochs[epochs.trial_id == row.trial_id].sort_values("epoch")
        assert list(mine.epoch) == [1, 2, 3]
        lowest, last = mine.loc[mine.val_loss.idxmin()], mine.iloc[-1]
        assert row.best_metric == row.best_val_loss == lowest.val_loss
        assert (row.best_epoch, row.best_val_acc) == (lowest.epoch, lowest.val_acc)

        # `ensemble` and `predict` load a trial's checkpoint: the lowest-val_loss weights
        saved = load_checkpoint_dir(Path(row.checkpoint_path))
        assert saved.metrics["best_epoch"] == row.best_epoch
        rt = Runtime.for_config(saved.cfg, "cpu")
        val_loss, val_acc = evaluate(saved.model, DeviceImages(data.val, rt.device), rt,
                                     2 * saved.cfg.batch_size)
        assert (val_loss, val_acc) == (pytest.approx(lowest.val_loss, rel=1e-5),
                                       pytest.approx(lowest.val_acc))
        if last.val_loss != lowest.val_loss:
            assert val_loss != pytest.approx(last.val_loss, rel=1e-3)
        classifier = load_classifier(Path(row.checkpoint_path))  # what `predict` runs
        with torch.no_grad():
            probs = classifier.module(torch.from_numpy(data.val.images).float() / 255)
        nll = -probs[torch.arange(len(probs)), torch.from_numpy(data.val.labels)].log().mean()
        assert nll.item() == pytest.approx(lowest.val_loss, rel=1e-4)
        assert members[row.trial_id]["val_acc"] == pytest.approx(lowest.val_acc)
    assert (trials.best_epoch < 3).any(), "val_loss fell every epoch: best and last coincide"

    main(["best", str(run)])
    best = trials.loc[trials.best_metric.idxmin()]
    assert (f"best trial {best.trial_id} of 2: val_loss {best.best_metric:.4f} at epoch "
            f"{best.best_epoch}") in capsys.readouterr().out


# fc only on random features: 2 epochs at 16-32px reach 0.4-0.8 val_acc on digits in seconds
RESOLUTION_SPACE = """
metric: val_acc
sampler: random
scheduler: {name: fifo, max_epochs: 2}
resources: {cpus_per_trial: 1}
fixed: {weights: none, unfreeze_depth: 0, batch_size: 64, lr: 0.05, warmup_epochs: 0,
        label_smoothing: 0.0}
search:
  resolution: {type: categorical, choices: [16, 24, 32]}
"""


@pytest.mark.slow
def test_a_search_over_resolution_decodes_once_and_its_ensemble_predicts(
        tmp_path: Path, ray_session: None, capsys: pytest.CaptureFixture[str]) -> None:
    import onnxruntime

    space = tmp_path / "space.yaml"
    space.write_text(RESOLUTION_SPACE)
    run = search(tmp_path, "--space", str(space), "--data", "digits", "--trials", "3",
                 "--seed", "1", "--max-concurrent", "3")
    assert "359 test images at 32px" in capsys.readouterr().out  # one decode, at the largest
    meta = json.loads((run / SEARCH_FILE).read_text())
    assert meta["resolution"] == 32 and meta["searched"] == ["resolution"]
    trials = pq.read_table(run / TRIALS_FILE).to_pandas()
    assert set(trials.status) == {"TERMINATED"}
    assert sorted(trials.resolution) == [16, 24, 32], "seed 1 no longer draws all three"
    for row in trials.itertuples():
        assert load_checkpoint_dir(Path(row.checkpoint_path)).cfg.resolution == row.resolution

    result = ensemble_command(str(run), 3, "average", str(tmp_path / "ens"), onnx=True,
                              device="cpu")
    # every member is scored as its trial scored itself: decoded at 32px, resized to its own
    best_val_acc = trials.set_index("trial_id").best_val_acc
    for member in result["members"]:
        assert member["val_acc"] == pytest.approx(best_val_acc[member["trial_id"]])
    ensemble = load_ensemble_dir(tmp_path / "ens")
    members = [m for m in ensemble.module.members if isinstance(m, ImageClassifier)]
    assert sorted(m.resolution for m in members) == [16, 24, 32]
    test = load_dataset("digits", 32, TrainConfig().val_fraction).test
    assert test is not None
    images = torch.from_numpy(test.images).float() / 255
    with torch.no_grad():
        probs = ensemble.module(images)
    accuracy = (probs.argmax(-1) == torch.from_numpy(test.labels)).double().mean().item()
    assert accuracy == pytest.approx(result["test_acc"], abs=1.5 / len(test))

    originals = load_dataset("digits", 8, TrainConfig().val_fraction).test  # 8x8, as files
    assert originals is not None
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for i, image in enumerate(originals.images):
        Image.fromarray(image[0]).save(folder / f"{i:03d}.png")
    main(["predict", str(tmp_path / "ens"), str(folder), "--output", str(tmp_path / "p.csv"),
          "--probabilities"])
    with (tmp_path / "p.csv").open() as f:
        rows = list(csv.DictReader(f))
    predicted = torch.tensor([[float(row[c]) for c in ensemble.spec.class_names] for row in rows])
    assert torch.allclose(predicted, probs, atol=1e-4)

    session = onnxruntime.InferenceSession(str(tmp_path / "ens" / "ensemble.onnx"))
    (onnx_probs,) = session.run(None, {"images": images[:16].numpy()})
    assert onnx_probs == pytest.approx(probs[:16].numpy(), abs=1e-4)


@pytest.mark.slow
def test_quarter_gpu_trials_run_side_by_side(tmp_path: Path, ray_session: None) -> None:
    """The shared Ray declares one GPU: 0.25 per trial packs four trials at once."""
    space = search_space_file(tmp_path, max_epochs=2, grace_period=2)
    run = search(tmp_path, "--space", str(space), "--data", "digits", "--trials", "4",
                 "--gpus-per-trial", "0.25", "--cpus-per-trial", "0.5", "--scheduler", "fifo")
    epochs = pq.read_table(run / EPOCHS_FILE).to_pandas()
    spans = epochs.groupby("trial_id").agg(start=("start_time", "min"), end=("end_time", "max"))
    assert len(spans) == 4
    assert spans.start.max() < spans.end.min(), f"trials did not overlap:\n{spans}"
    trials = pq.read_table(run / TRIALS_FILE).to_pandas()
    assert (trials.gpu_fraction == 0.25).all()
    assert (trials.gpu_hours == trials.wall_time_s * 0.25 / 3600).all()


@pytest.mark.slow
def test_a_reused_trial_actor_trains_each_next_trials_own_config(
        tmp_path: Path, ray_session: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three trials one after another run in one actor (reuse_actors), and each reports
    the lr, validation accuracy and weights that a fresh `fit` of its own config gives,
    not those of the trial before."""
    results: list[tuple[str, dict[str, object], dict[str, object]]] = []
    on_result = ProgressPrinter.on_trial_result

    def recording(self: ProgressPrinter, iteration: int, trials: list[Any], trial: Any,
                  result: dict[str, object], **info: object) -> None:
        results.append((trial.trial_id, dict(trial.config), result))
        on_result(self, iteration, trials, trial, result, **info)

    monkeypatch.setattr(ProgressPrinter, "on_trial_result", recording)
    space = tmp_path / "space.yaml"
    space.write_text("""
metric: val_acc
sampler: random
scheduler: {name: fifo, max_epochs: 1}
resources: {cpus_per_trial: 1}
fixed: {resolution: 8, weights: none, batch_size: 128, val_fraction: 0.8}
search:
  lr:   {type: float, low: 0.01, high: 0.3, log: true}
  seed: {type: int, low: 0, high: 1000}
""")
    run = search(tmp_path, "--space", str(space), "--data", "digits", "--trials", "3",
                 "--max-concurrent", "1", "--sampler-seed", "0")
    reports = [(trial_id, config, result) for trial_id, config, result in results
               if "epoch" in result]
    assert len({config["seed"] for _, config, _ in reports}) == 3, reports
    pids = {result["startup"]["pid"] for _, _, result in reports}  # type: ignore[index]
    assert len(pids) == 1, "the trials did not run in one reused actor"
    trials = pq.read_table(run / TRIALS_FILE).to_pandas().set_index("trial_id")
    data = decode_dataset("digits", 8, 0.8).open()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a trial with one CPU (Ray's OMP_NUM_THREADS)
    try:
        fresh = {trial_id: fit(TrainConfig.from_dict(config), data=data, device="cpu")
                 for trial_id, config, _ in reports}
    finally:
        torch.set_num_threads(threads)
    for trial_id, _, result in reports:
        expected = fresh[trial_id].history[0]
        assert result["lr"] == expected["lr"]
        assert result["val_acc"] == pytest.approx(expected["val_acc"], abs=0.01)
        saved = load_checkpoint_dir(Path(trials.checkpoint_path[trial_id])).model.state_dict()
        for other, run_of_other in fresh.items():
            weights = run_of_other.model.state_dict()
            same = all(torch.allclose(saved[k].float(), weights[k].float(), atol=1e-4)
                       for k in saved)
            assert same == (other == trial_id), (trial_id, other)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize("sampler", ["tpe", "cmaes", "random", "qmc", "gp"])
def test_each_sampler_is_seeded(sampler: str) -> None:
    space = load_space("default")

    def first_configs(seed: int) -> list[dict]:
        study = optuna.create_study(direction="maximize",
                                    sampler=make_sampler(sampler, seed, 12))
        configs = []
        for _ in range(3):
            trial = study.ask()
            configs.append(DefineByRun(space)(trial))
            study.tell(trial, 0.5)
        return configs

    assert first_configs(7) == first_configs(7)
    assert first_configs(7) != first_configs(8)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize("sampler", ["tpe", "cmaes", "random", "qmc", "gp"])
def test_each_sampler_drives_the_searcher_past_its_random_start(sampler: str) -> None:
    """The searcher a search builds, asked and told as Tune would, on the full default space
    (conditional momentum, categoricals, log ranges), for more trials than TPE's and GP's
    random start: every config it returns is a valid TrainConfig."""
    space = load_space("default")
    trials = 8
    searcher = StudySearch(space=DefineByRun(space), metric="best_val_acc", mode="max",
                           sampler=make_sampler(sampler, 0, trials))
    assert startup_trials(trials) < trials
    for i in range(trials):
        config = searcher.suggest(f"t{i}")
        assert config is not None
        cfg = TrainConfig.from_dict(config)
        searcher.on_trial_complete(f"t{i}", {"epoch": cfg.epochs,
                                             "best_val_acc": cfg.lr * (1 + cfg.label_smoothing)})
    assert [t.state for t in searcher.study.trials] == [TrialState.COMPLETE] * trials


def test_more_gpus_than_any_node_fails_at_once(tmp_path: Path, ray_session: None,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    space = search_space_file(tmp_path)
    err = one_line_error(capsys, ["search", "--space", str(space), "--data", "digits",
                                  "--gpus-per-trial", "2", "--storage", str(tmp_path)])
    assert "--gpus-per-trial 2" in err and "largest has 4 CPUs and 1 GPUs" in err


def test_a_gpu_share_on_a_cluster_without_gpus_fails(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.setattr("search.run.cluster.node_capacity", lambda: [{"CPU": 2.0}])
    monkeypatch.setattr("search.run.cluster.autoscaler_node_types", lambda: [])
    args = type("Args", (), dict(space=str(search_space_file(tmp_path)), scheduler=None,
                                 max_epochs=None, sampler=None, trials=4, gpus_per_trial=0.25,
                                 cpus_per_trial=1.0, max_concurrent=None, max_failures=0,
                                 storage=str(tmp_path), name="x", address=None, seed=0,
                                 sampler_seed=None,
                                 command_line="resnet-hpo search", warm_start=None,
                                 warm_start_top=4, budget=None, confirm=None,
                                 confirm_seeds=None, keep_checkpoints=None))
    with pytest.raises(UserError, match=r"0 GPUs in all.*use --gpus-per-trial 0"):
        check_resources(request_from_args(args, {}))


@pytest.mark.parametrize(("flags", "expected"), [
    (["--space", "quick", "--name", "../escape"], "--name '../escape': use letters"),
    (["--name", "nosuch", "--resume"], "--resume: there is no search named 'nosuch'"),
    (["--name", "x", "--resume", "--lr", "0.1", "--seed", "3"],
     "--resume goes on with the search's own space, resources and history; leave out --seed, "
     "--lr"),
    (["--name", "x", "--add-trials", "2", "--gpus-per-trial", "1"],
     "leave out --gpus-per-trial"),
    (["--space", "nosuch"], "--space nosuch: no such shipped space"),
    (["--space", "quick", "--sampler", "anneal"], "key 'sampler' must be one of"),
    (["--space", "quick", "--scheduler", "pbt"], "key 'scheduler.name' must be one of"),
    (["--space", "quick", "--lr", "-1"], "config key 'lr': must be in (0, 10]"),
    (["--space", "quick", "--max-concurrent", "0"], "--max-concurrent must be >= 1, got 0"),
    (["--space", "quick", "--keep-checkpoints", "none"],
     "--keep-checkpoints must be 'all' or a whole number >= 1, got 'none'"),
    (["--space", "quick", "--confirm", "3", "--keep-checkpoints", "2"],
     "--keep-checkpoints must be 'all' or a whole number >= 3 (--confirm 3), got '2'"),
    (["--space", "quick", "--data", "imagefolder:/no/such/dir"], "/no/such/dir"),
])
def test_bad_search_input_is_one_line_before_ray_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str],
        expected: str) -> None:
    err = one_line_error(capsys, ["search", "--storage", str(tmp_path), *flags])
    assert expected in err


def seed_space_file(tmp_path: Path) -> Path:
    """search_space_file's space, also searching every trial's training seed."""
    space = tmp_path / "seed_space.yaml"
    space.write_text(search_space_file(tmp_path).read_text()
                     + "  seed:            {type: int, low: 0, high: 9}\n")
    return space


@pytest.mark.parametrize(("flag", "value", "key"), [
    ("--seed", "3", "seed"), ("--lr", "0.05", "lr"),
    ("--label_smoothing", "0.1", "label_smoothing")])
def test_a_flag_that_fixes_a_searched_key_is_refused_naming_both(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        flag: str, value: str, key: str) -> None:
    monkeypatch.setattr("search.run.cluster.start_ray", never("start or join Ray"))
    monkeypatch.setattr("search.run.driver.decode_dataset", never("decode the data"))
    space = seed_space_file(tmp_path)
    err = one_line_error(capsys, ["search", "--space", str(space), "--data", "digits", flag,
                                  value, "--storage", str(tmp_path / "runs")])
    assert (f"--{key.replace('_', '-')} {value} fixes config key '{key}', which the space "
            f"{space} searches; leave it out, or remove '{key}' from the space's search") in err
    assert ("--sampler-seed 3 seeds only the sampler" in err) == (key == "seed")
    assert not (tmp_path / "runs").exists()


def test_seed_fixes_every_trials_seed_and_sampler_seed_seeds_only_the_sampler(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    requests: list[SearchRequest] = []
    monkeypatch.setattr("search.run.driver.new_search", requests.append)
    seed_searched, seed_fixed = seed_space_file(tmp_path), search_space_file(tmp_path)
    for space, flags in ((seed_searched, ["--sampler-seed", "3"]), (seed_fixed, ["--seed", "3"]),
                         (seed_fixed, ["--seed", "3", "--sampler-seed", "5"]),
                         (seed_fixed, [])):
        main(["search", "--space", str(space), "--data", "digits", "--storage", str(tmp_path),
              *flags])
    searched, fixed, both, neither = requests
    assert searched.seed == 3 and "seed" not in searched.space.fixed
    assert "seed" in [p.name for p in searched.space.params]
    assert (fixed.seed, fixed.space.fixed["seed"]) == (3, 3)
    assert (both.seed, both.space.fixed["seed"]) == (5, 3)
    assert neither.seed == 0 and "seed" not in neither.space.fixed
    assert search_metadata(searched, tiny_dataset())["seed"] == 3  # search.json's: the sampler's


def never(what: str) -> Callable[..., None]:
    def called(*args: object, **kwargs: object) -> None:
        pytest.fail(f"a bad input should be refused before anything tries to {what}")
    return called


@pytest.mark.parametrize(("lines", "expected"), [
    ("search:\n  warmup_epoch: {type: float, low: 0, high: 1}",
     "search: unknown key 'warmup_epoch'; did you mean 'warmup_epochs'?"),
    ("search:\n  lr: {type: float, low: -0.1, high: 0.1}",
     "key 'search.lr.low': must be in (0, 10], got -0.1"),
    ("fixed: {lr: -0.1}", "config key 'lr': must be in (0, 10], got -0.1"),
    ("search:\n  momentum: {type: float, low: 0.8, high: 0.99, when: {optimiser: sgd}}",
     "key 'search.momentum.when' refers to 'optimiser'"),
])
def test_a_bad_space_file_is_refused_before_ray_starts_or_data_is_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        lines: str, expected: str) -> None:
    import ray

    monkeypatch.setattr("search.run.cluster.start_ray", never("start or join Ray"))
    monkeypatch.setattr(ray, "init", never("start or join Ray"))
    monkeypatch.setattr("search.run.driver.decode_dataset", never("decode the data"))
    space = tmp_path / "space.yaml"
    space.write_text(f"fixed: {{weights: none}}\n{lines}\n")
    err = one_line_error(capsys, ["search", "--space", str(space), "--data", "digits",
                                  "--storage", str(tmp_path / "runs"), "--name", "bad"])
    assert err.startswith(f"resnet-hpo: error: {space}: ") and expected in err
    assert not (tmp_path / "runs").exists()


def test_an_existing_run_is_never_overwritten(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "runs" / "t"
    run.mkdir(parents=True)
    (run / SEARCH_FILE).write_text("{}")
    err = one_line_error(capsys, ["search", "--space", "quick", "--storage",
                                  str(tmp_path / "runs"), "--name", "t"])
    assert "already holds a search; add --resume" in err
    assert (run / SEARCH_FILE).read_text() == "{}"


def test_max_concurrent_trials_is_also_how_many_trials_tune_keeps_pending(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """build_tuner relies on it (Ray 2.60): with a search algorithm, Tune keeps one trial
    pending unless max_concurrent_trials wraps the searcher in a ConcurrencyLimiter, so
    fractional-GPU trials would otherwise start one at a time."""
    from ray.tune.execution.tune_controller import _get_max_pending_trials
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.search_generator import SearchGenerator

    monkeypatch.delenv("TUNE_MAX_PENDING_TRIALS_PG", raising=False)
    searcher = StudySearch(space=DefineByRun(load_space("quick")), metric="best_val_acc",
                           mode="max")
    assert _get_max_pending_trials(SearchGenerator(searcher)) == 1
    assert _get_max_pending_trials(SearchGenerator(ConcurrencyLimiter(searcher, 4))) == 4


@pytest.mark.slow
def test_the_default_space_searches_the_policy_erasing_and_ema_and_best_yaml_retrains_them(
        tmp_path: Path, ray_session: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """From a fresh clone: the default space as shipped, but on digits from random weights at
    16px, 2 trials of 2 epochs on the CPU (and warmup within them)."""
    import yaml

    import trainable.train as train_module
    from spaces.space import SHIPPED_DIR

    space = yaml.safe_load((SHIPPED_DIR / "default.yaml").read_text())
    space["fixed"] |= {"resolution": 16, "weights": "none", "amp": "off"}
    space["resources"] = {"gpus_per_trial": 0, "cpus_per_trial": 1}
    space["scheduler"] |= {"max_epochs": 2, "grace_period": 1}
    space["search"]["warmup_epochs"]["high"] = 1.0
    (tmp_path / "default.yaml").write_text(yaml.safe_dump(space))
    run = search(tmp_path, "--space", str(tmp_path / "default.yaml"), "--data", "digits",
                 "--trials", "2", "--max-concurrent", "2", "--seed", "3")
    assert {"augment", "random_erasing", "ema_decay"} <= set(
        json.loads((run / SEARCH_FILE).read_text())["searched"])
    trials = pq.read_table(run / TRIALS_FILE).to_pandas()
    assert set(trials.status) == {"TERMINATED"}
    assert set(trials.augment) <= {"none", "trivial", "randaugment"}
    assert (trials.augment != "none").any() and (trials.ema_decay > 0).any(), (
        "seed 3 no longer draws a policy and an average")
    main(["best", str(run)])
    best = TrainConfig.from_yaml(run / "best.yaml")
    row = trials.loc[trials.best_metric.idxmax()]
    assert (best.augment, best.random_erasing, best.ema_decay) == (
        row.augment, row.random_erasing, row.ema_decay)

    policies: list[str] = []
    averages: list[float] = []
    augment, average = train_module.auto_augment, train_module.WeightAverage

    def recording_augment(images: torch.Tensor, policy: str, *args: Any, **kwargs: Any
                          ) -> torch.Tensor:
        policies.append(policy)
        return augment(images, policy, *args, **kwargs)

    def recording_average(model: torch.nn.Module, decay: float, every: int) -> Any:
        averages.append(decay)
        return average(model, decay, every)

    monkeypatch.setattr(train_module, "auto_augment", recording_augment)
    monkeypatch.setattr(train_module, "WeightAverage", recording_average)
    main(["train", "--config", str(run / "best.yaml"), "--epochs", "1", "--device", "cpu",
          "--output", str(tmp_path / "model")])
    assert set(policies) == ({best.augment} if best.augment != "none" else set())
    assert averages == ([best.ema_decay] if best.ema_decay > 0 else [])
    retrained = TrainConfig.from_yaml(tmp_path / "model" / "config.yaml")
    assert retrained == best.replace(epochs=1)
