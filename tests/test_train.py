import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import trainable.model as model_module
import trainable.train as train_module
from tests.conftest import patch_build_model
from trainable import Dataset, Split, TrainConfig, TrainingDiverged, UserError, fit, load_dataset
from trainable.augment import normalize
from trainable.device_images import DeviceImages
from trainable.model import ImageClassifier, build_model
from trainable.model_files import CHECKPOINT_FILE
from trainable.runtime import Runtime
from trainable.train import SaveCheckpoint, predict_outputs

METRIC_KEYS = {"epoch", "train_loss", "val_loss", "val_acc", "lr", "images_per_s",
               "epoch_time_s"}


def tiny_config(**changes: Any) -> TrainConfig:
    base: dict[str, Any] = {"data": "tiny", "resolution": 16, "weights": "none", "epochs": 1,
                            "batch_size": 8, "warmup_epochs": 0.0, "lr": 0.01}
    return TrainConfig(**(base | changes))


def record_optimizer_steps(monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[int, float]]]:
    """(stage, lr) of every param group at each optimizer step that `fit` takes."""
    steps: list[list[tuple[int, float]]] = []
    build = train_module.build_optimizer

    def recording_build(*args: Any) -> torch.optim.Optimizer:
        optimizer = build(*args)
        optimizer.register_step_pre_hook(lambda opt, *_: steps.append(
            [(group["stage"], group["lr"]) for group in opt.param_groups]))
        return optimizer

    monkeypatch.setattr(train_module, "build_optimizer", recording_build)
    return steps


def test_report_gets_every_metric_each_epoch(tiny: Dataset) -> None:
    reports: list[dict[str, float]] = []
    result = fit(tiny_config(epochs=2), lambda metrics, _: reports.append(metrics), data=tiny)
    assert [r["epoch"] for r in reports] == [1, 2] and result.history == reports
    for metrics in reports:
        assert set(metrics) == METRIC_KEYS
        assert all(math.isfinite(v) for v in metrics.values())
        assert 0 <= metrics["val_acc"] <= 1 and metrics["images_per_s"] > 0


def test_each_group_lr_follows_layer_decay_warmup_and_cosine(
        tiny: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = record_optimizer_steps(monkeypatch)
    cfg = tiny_config(epochs=3, batch_size=4, warmup_epochs=1.0, lr=0.01, min_lr=0.001,
                      layer_decay=0.5, unfreeze_depth=2)
    fit(cfg, data=tiny)
    per_epoch, warmup, total = 6, 6, 18  # 24 images in batches of 4
    assert len(steps) == total
    for step in (0, 2, 5, 6, 9, 12, 17):
        if step < warmup:
            factor = (step + 1) / warmup
        else:
            cosine = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
            factor = 0.1 + 0.9 * cosine  # min_lr / lr = 0.1
        assert {stage for stage, _ in steps[step]} == {0, 1, 2}
        for stage, lr in steps[step]:
            assert lr == pytest.approx(0.01 * 0.5 ** stage * factor), (step, stage)
    assert steps[per_epoch - 1][0][1] == pytest.approx(0.01)  # peak at the end of warmup


def test_frozen_stages_keep_weights_and_batchnorm_statistics_during_fit(tiny: Dataset) -> None:
    cfg = tiny_config(unfreeze_depth=1, lr=0.1)
    torch.manual_seed(cfg.seed)
    before = build_model(cfg, tiny.num_classes).state_dict()
    after = fit(cfg, data=tiny).model.state_dict()
    for key in ("layer3.1.bn2.running_mean", "layer3.1.bn2.running_var", "bn1.running_var",
                "layer1.0.bn1.num_batches_tracked", "layer3.0.conv1.weight", "conv1.weight"):
        assert torch.equal(before[key], after[key]), key
    for key in ("layer4.1.bn2.running_mean", "layer4.0.conv1.weight", "fc.weight"):
        assert not torch.equal(before[key], after[key]), key


def test_a_process_builds_a_seeds_model_once_and_each_run_trains_as_from_a_fresh_build(
        tiny: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reused trial actor runs `fit` again and again: the second run of a seed copies the
    model the first built, and trains exactly as the first did."""
    built: list[int] = []
    build = model_module.build_model  # as patched so far

    def counting_build(cfg: TrainConfig, num_classes: int) -> Any:
        built.append(cfg.seed)
        return build(cfg, num_classes)

    patch_build_model(monkeypatch, counting_build)
    cfg = tiny_config(lr=0.1, mixup_alpha=0.2)
    runs = [fit(cfg, data=tiny), fit(cfg.replace(seed=1), data=tiny), fit(cfg, data=tiny),
            fit(cfg, data=tiny)]
    assert built == [cfg.seed, 1, cfg.seed]  # the last run copied the third's model
    first, _, third, fourth = (run.model.state_dict() for run in runs)
    for key in first:
        assert torch.equal(first[key], third[key]) and torch.equal(first[key], fourth[key]), key
    assert runs[0].history[0]["train_loss"] == runs[3].history[0]["train_loss"]
    assert not torch.equal(first["fc.weight"], runs[1].model.state_dict()["fc.weight"])


def test_mixed_targets_sum_to_one_and_validation_is_never_mixed(
        tiny: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    mixed_batches: list[torch.Tensor] = []
    mix = train_module.mix

    def spying_mix(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, targets = mix(*args)
        mixed_batches.append(targets)
        return x, targets

    monkeypatch.setattr(train_module, "mix", spying_mix)
    cfg = tiny_config(batch_size=4, mixup_alpha=0.4, cutmix_alpha=1.0, label_smoothing=0.1)
    result = fit(cfg, data=tiny)
    assert len(mixed_batches) == len(tiny.train) // 4  # training batches only
    for targets in mixed_batches:
        assert torch.allclose(targets.sum(1), torch.ones(len(targets)))
    assert any(t.max() < 0.9 for t in mixed_batches)  # some batch was really mixed
    # The reported validation loss is that of plain, unaugmented validation images.
    with torch.no_grad():
        logits = result.model.eval()(normalize(torch.from_numpy(tiny.val.images)))
    plain_loss = F.cross_entropy(logits, torch.from_numpy(tiny.val.labels)).item()
    assert result.history[0]["val_loss"] == pytest.approx(plain_loss, rel=1e-5)


def test_bf16_autocast_runs_on_the_cpu(tiny: Dataset) -> None:
    # One step: the loss checked is a fresh model's, which says whether autocast ran, not
    # how bf16 training fares (once, on CI's CPU, the loss after a step was NaN).
    cfg = tiny_config(amp="bf16", batch_size=24)
    head_dtypes: set[torch.dtype] = set()
    build = model_module.build_model  # as patched so far

    def spying_build(*args: Any) -> torch.nn.Module:
        model = build(*args)
        model.fc.register_forward_hook(lambda m, i, out: head_dtypes.add(out.dtype))
        return model

    with pytest.MonkeyPatch.context() as patch:
        patch_build_model(patch, spying_build)
        result = fit(cfg, data=tiny, device="cpu")
    assert head_dtypes == {torch.bfloat16}
    assert math.isfinite(result.history[0]["train_loss"])


def test_fp16_on_the_cpu_is_a_user_error(tiny: Dataset) -> None:
    with pytest.raises(UserError, match="config key 'amp': fp16 needs CUDA"):
        fit(tiny_config(amp="fp16"), data=tiny, device="cpu")


def test_a_state_dict_weights_file_is_what_a_linear_probe_starts_from(
        tiny: Dataset, resnet18_weights_file: Path) -> None:
    result = fit(tiny_config(weights=str(resnet18_weights_file), unfreeze_depth=0), data=tiny)
    saved = torch.load(resnet18_weights_file, weights_only=True)
    state = result.model.state_dict()
    for key in ("conv1.weight", "layer4.1.conv2.weight", "layer2.0.bn1.running_mean"):
        assert torch.equal(state[key], saved[key]), key
    assert state["fc.weight"].shape == (3, 512)


def test_a_resolution_above_the_decoded_one_is_refused(tiny: Dataset) -> None:
    with pytest.raises(UserError, match=r"^config key 'resolution': the data was decoded at "
                       r"16px, the config asks for 32px; a run can only use that resolution "
                       r"or a smaller one$"):
        fit(tiny_config(resolution=32), data=tiny)


def test_a_run_below_the_decoded_resolution_trains_and_evaluates_resized_batches(
        tiny: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[tuple[int, int]] = []
    build = model_module.build_model  # as patched so far

    def recording_build(*args: Any) -> torch.nn.Module:
        model = build(*args)
        model.conv1.register_forward_pre_hook(lambda _, inputs: sizes.append(
            tuple(inputs[0].shape[-2:])))
        return model

    patch_build_model(monkeypatch, recording_build)
    cfg = tiny_config(resolution=8, crop="resized", flip="horizontal")
    result = fit(cfg, data=tiny)
    steps, val_batches = len(tiny.train) // cfg.batch_size, 1
    assert sizes == [(8, 8)] * (steps + val_batches)
    # the trial's own evaluation is what predict, ensemble and ONNX compute: the model at
    # its resolution (ImageClassifier) on images decoded larger
    rt = Runtime.for_config(cfg, "cpu")
    logits = predict_outputs(result.model, DeviceImages(tiny.val, rt.device), rt, 5)
    with torch.no_grad():
        expected = ImageClassifier(result.model, 8)(torch.from_numpy(tiny.val.images) / 255)
    assert torch.allclose(logits, expected, atol=1e-4)


@pytest.mark.parametrize(("amp", "advice"), [("off", "lower lr$"),
                                            ("bf16", "lower lr or use amp off$")])
def test_nan_loss_raises_training_diverged_with_advice_for_its_precision(
        tiny: Dataset, monkeypatch: pytest.MonkeyPatch, amp: str, advice: str) -> None:
    build = model_module.build_model  # as patched so far

    def nan_logits_build(*args: Any) -> torch.nn.Module:
        model = build(*args)
        model.fc.register_forward_hook(lambda m, i, out: out * float("nan"))
        return model

    patch_build_model(monkeypatch, nan_logits_build)
    with pytest.raises(TrainingDiverged, match=r"training loss became nan in epoch 1 \(lr "
                       r"[0-9.e-]+\); " + advice):
        fit(tiny_config(amp=amp), data=tiny)


def saving_at(epoch: int, directory: Path, stop: bool = False) -> Any:
    def report(metrics: dict[str, float], save: SaveCheckpoint) -> None:
        if metrics["epoch"] == epoch:
            save(directory)
            if stop:
                raise KeyboardInterrupt  # the trial dies right after its checkpoint
    return report


def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(tmp_path: Path,
                                                               tiny: Dataset) -> None:
    cfg = tiny_config(epochs=3, batch_size=6, lr=0.05, warmup_epochs=1.0, mixup_alpha=0.3)
    fit(cfg, saving_at(3, tmp_path / "straight"), data=tiny)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, saving_at(1, tmp_path / "interrupted", stop=True), data=tiny)
    resumed = fit(cfg, saving_at(3, tmp_path / "resumed"), data=tiny,
                  resume_from=tmp_path / "interrupted")
    assert [m["epoch"] for m in resumed.history] == [1, 2, 3]  # the whole run's history
    straight = torch.load(tmp_path / "straight" / CHECKPOINT_FILE, weights_only=True)
    again = torch.load(tmp_path / "resumed" / CHECKPOINT_FILE, weights_only=True)
    assert straight["epoch"] == again["epoch"] == 3

    def accuracies(history: list[dict[str, float]]) -> list[tuple[float, float]]:
        return [(m["epoch"], m["val_acc"]) for m in history]

    assert accuracies(straight["history"]) == accuracies(again["history"])
    for key, value in straight["model"].items():
        assert torch.equal(value, again["model"][key]), key
    assert (tmp_path / "interrupted" / "config.yaml").is_file()


@pytest.mark.parametrize("policy", ["trivial", "randaugment", "autoaugment"])
def test_a_policy_augments_uint8_batches_at_the_models_resolution(
        tiny: Dataset, monkeypatch: pytest.MonkeyPatch, policy: str) -> None:
    seen: list[tuple[torch.dtype, tuple[int, ...]]] = []
    augment = train_module.auto_augment

    def recording(images: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append((images.dtype, tuple(images.shape[1:])))
        return augment(images, *args, **kwargs)

    monkeypatch.setattr(train_module, "auto_augment", recording)
    cfg = tiny_config(resolution=8, augment=policy, random_erasing=0.5)
    fit(cfg, data=tiny)  # decoded at 16px, trained at 8px
    assert len(seen) == len(tiny.train) // cfg.batch_size  # each batch, once
    assert set(seen) == {(torch.uint8, (3, 8, 8))}


def test_a_run_with_a_policy_erasing_and_ema_resumes_exactly(tmp_path: Path,
                                                            tiny: Dataset) -> None:
    cfg = tiny_config(epochs=3, batch_size=6, lr=0.05, warmup_epochs=0.5, augment="trivial",
                      random_erasing=0.3, ema_decay=0.8, ema_steps=2)
    fit(cfg, saving_at(3, tmp_path / "straight"), data=tiny)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, saving_at(2, tmp_path / "interrupted", stop=True), data=tiny)
    fit(cfg, saving_at(3, tmp_path / "resumed"), data=tiny, resume_from=tmp_path / "interrupted")
    straight = torch.load(tmp_path / "straight" / CHECKPOINT_FILE, weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / CHECKPOINT_FILE, weights_only=True)
    assert [(m["epoch"], m["val_loss"]) for m in straight["history"]] == [
        (m["epoch"], m["val_loss"]) for m in resumed["history"]]
    for part in ("model", "ema", "best_model"):
        assert straight[part].keys() == resumed[part].keys()
        for key, value in straight[part].items():
            assert torch.equal(value, resumed[part][key]), (part, key)
    assert int(straight["ema"]["n_averaged"]) > 0


def fc_weights_after_each_step(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """A copy of the fc weights after every optimizer step that `fit` takes."""
    weights: list[torch.Tensor] = []
    build = train_module.build_optimizer

    def recording_build(*args: Any) -> torch.optim.Optimizer:
        optimizer = build(*args)
        fc = next(p for g in optimizer.param_groups for p in g["params"] if p.shape == (3, 512))
        optimizer.register_step_post_hook(lambda *_: weights.append(fc.detach().clone()))
        return optimizer

    monkeypatch.setattr(train_module, "build_optimizer", recording_build)
    return weights


def test_ema_scores_and_keeps_the_moving_average_of_the_weights(
        tiny: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = fc_weights_after_each_step(monkeypatch)
    decay = 0.6
    result = fit(tiny_config(batch_size=4, ema_decay=decay, metric="train_loss"), data=tiny)
    assert len(weights) == 6
    expected = weights[0]  # the first update copies the weights
    for w in weights[1:]:
        expected = decay * expected + (1 - decay) * w
    assert torch.allclose(result.model.fc.weight, expected, atol=1e-6)
    assert not torch.allclose(result.model.fc.weight, weights[-1], atol=1e-4)


def test_ema_updates_every_k_steps_and_restarts_during_warmup(
        tiny: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = fc_weights_after_each_step(monkeypatch)
    cfg = tiny_config(batch_size=4, epochs=2, ema_decay=0.7, ema_steps=2, warmup_epochs=1.0,
                      metric="train_loss", early_stop_patience=0)
    result = fit(cfg, data=tiny)
    assert len(weights) == 12  # 6 a epoch; warmup is the first 6
    # updates after steps 2, 4, 6 (warmup: each restarts the average), 8 (a copy), 10 and
    # 12, each by 0.7**2
    expected = weights[7]
    for w in (weights[9], weights[11]):
        expected = 0.49 * expected + 0.51 * w
    best = result.best_epoch
    assert best in (1, 2)
    if best == 2:
        assert torch.allclose(result.model.fc.weight, expected, atol=1e-6)
    else:
        assert torch.equal(result.model.fc.weight, weights[5])  # the copy at warmup's end


def test_early_stop_patience_stops_a_run_that_stopped_improving(
        tiny: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_module, "evaluate", lambda *args: (1.0, 0.5))
    result = fit(tiny_config(epochs=10, early_stop_patience=2), data=tiny)
    assert len(result.history) == 3 and result.best_epoch == 1
    assert len(fit(tiny_config(epochs=4), data=tiny).history) == 4  # 0 = off


def test_accumulated_micro_batches_step_like_one_large_batch(
        tiny: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only fc trains and every BatchNorm is frozen, so two micro-batches of 4 must give the
    # gradient of one batch of 8: the same weights after an epoch.
    common: dict[str, Any] = {"unfreeze_depth": 0, "crop": "none", "flip": "none", "lr": 0.5,
                              "momentum": 0.0, "epochs": 2}
    steps = record_optimizer_steps(monkeypatch)
    large = fit(tiny_config(batch_size=8, **common), data=tiny).model
    assert len(steps) == 6
    steps.clear()
    small = fit(tiny_config(batch_size=4, accumulate_steps=2, **common), data=tiny).model
    assert len(steps) == 6  # 24 images: 6 micro-batches a epoch, one step per two
    assert torch.allclose(large.state_dict()["fc.weight"], small.state_dict()["fc.weight"],
                          atol=1e-6)
    steps.clear()
    fit(tiny_config(batch_size=4, accumulate_steps=4, **common), data=tiny)
    assert len(steps) == 4  # 6 micro-batches: a step after 4, then one after the last 2


def subsample(split: Split, n: int) -> Split:
    return Split(split.images[:n], split.labels[:n])


@pytest.mark.slow
def test_a_short_digits_run_learns() -> None:
    data = load_dataset("digits", 16, 0.1)
    assert data.test is not None
    data.train = subsample(data.train, 512)
    cfg = TrainConfig(data="digits", resolution=16, weights="none", epochs=4, batch_size=16,
                      warmup_epochs=0.5, lr=0.02)
    result = fit(cfg, data=data)
    assert result.best["val_acc"] > 0.6  # chance is 0.1
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert np.isfinite([m["val_loss"] for m in result.history]).all()
