"""Frozen stages computed once (trainable.frozen) and the model's split into them."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import trainable.frozen as frozen
import trainable.model as model_module
import trainable.train as train_module
from tests.conftest import all_at_the_node_lock, patch_build_model
from trainable import Dataset, Split, TrainConfig, UserError, fit, load_dataset
from trainable.augment import normalize
from trainable.data import cache_dir
from trainable.device_images import DeviceImages
from trainable.model import build_model, split_frozen
from trainable.model_files import CHECKPOINT_FILE
from trainable.runtime import Runtime
from trainable.train import SaveCheckpoint

PLAIN: dict[str, Any] = {"crop": "none", "flip": "none"}  # not augmented: outputs cached
LOSSES = ("train_loss", "val_loss")


def tiny_config(**changes: Any) -> TrainConfig:
    base: dict[str, Any] = {"data": "tiny", "resolution": 16, "weights": "none", "epochs": 2,
                            "batch_size": 8, "warmup_epochs": 0.0, "lr": 0.05}
    return TrainConfig(**(base | changes))


def count_stem_images(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch sizes that each run of the model's conv1 (the first frozen stage) saw."""
    seen: list[int] = []
    build = model_module.build_model  # as patched so far

    def counting_build(*args: Any) -> torch.nn.Module:
        model = build(*args)
        model.conv1.register_forward_pre_hook(lambda _, inputs: seen.append(len(inputs[0])))
        return model

    patch_build_model(monkeypatch, counting_build)
    return seen


def uncached_history(cfg: TrainConfig, data: Dataset,
                     monkeypatch: pytest.MonkeyPatch) -> list[dict[str, float]]:
    with monkeypatch.context() as patch:
        patch.setattr(frozen, "CACHE_OUTPUTS", False)
        return fit(cfg, data=data).history


def assert_same_results(cached: list[dict[str, float]], uncached: list[dict[str, float]],
                        tolerance: float) -> None:
    assert [m["val_acc"] for m in cached] == [m["val_acc"] for m in uncached]
    for c, u in zip(cached, uncached, strict=True):
        for key in LOSSES:
            assert c[key] == pytest.approx(u[key], abs=tolerance), key


@pytest.mark.parametrize(("depth", "stem"), [(d, "imagenet") for d in range(6)] + [(0, "cifar")])
def test_the_frozen_prefix_and_the_trainable_rest_make_the_whole_model(depth: int,
                                                                       stem: str) -> None:
    cfg = tiny_config(unfreeze_depth=depth, stem=stem)
    model = build_model(cfg, 3).eval()
    prefix, rest = split_frozen(model, depth)
    assert not any(p.requires_grad for p in prefix.parameters())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable <= {id(p) for p in rest.parameters()}
    if stem == "cifar" or depth == 5:  # the CIFAR stem trains at every depth
        assert len(prefix) == 0
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(rest(prefix(x)), model(x), atol=1e-6)
    if depth == 0 and stem == "imagenet":
        assert prefix(x).shape == (2, 512) and list(rest) == [model.fc]


def test_a_cached_linear_probe_matches_the_uncached_one(
        tiny: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(unfreeze_depth=0, epochs=3, **PLAIN)
    uncached = uncached_history(cfg, tiny, monkeypatch)
    stem_images = count_stem_images(monkeypatch)
    cached = fit(cfg, data=tiny).history
    # each image went through the frozen stages once (and one zero image gave their shape)
    assert sum(stem_images) == 1 + len(tiny.train) + len(tiny.val)
    assert_same_results(cached, uncached, 1e-5)


@pytest.mark.parametrize("ema_decay", [0.0, 0.7])
def test_a_cached_depth_1_trial_matches_the_uncached_one(
        tiny: Dataset, monkeypatch: pytest.MonkeyPatch, ema_decay: float) -> None:
    cfg = tiny_config(unfreeze_depth=1, ema_decay=ema_decay, **PLAIN)
    assert_same_results(fit(cfg, data=tiny).history, uncached_history(cfg, tiny, monkeypatch),
                        1e-4)


def test_flipped_images_run_the_frozen_stages_every_epoch_without_autograd(
        tiny: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    stem_images = count_stem_images(monkeypatch)
    grad_modes: list[bool] = []
    build = model_module.build_model  # as patched so far

    def recording_build(*args: Any) -> torch.nn.Module:
        model = build(*args)
        model.layer4.register_forward_pre_hook(
            lambda *_: grad_modes.append(torch.is_grad_enabled()))
        return model

    patch_build_model(monkeypatch, recording_build)
    cfg = tiny_config(unfreeze_depth=0, crop="none", flip="horizontal")
    fit(cfg, data=tiny)
    assert sum(stem_images) == cfg.epochs * (len(tiny.train) + len(tiny.val))
    assert grad_modes and not any(grad_modes)


def test_mixing_runs_the_frozen_stages_every_epoch(tiny: Dataset,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    stem_images = count_stem_images(monkeypatch)
    cfg = tiny_config(unfreeze_depth=0, mixup_alpha=0.2, epochs=1, **PLAIN)
    fit(cfg, data=tiny)
    assert sum(stem_images) == len(tiny.train) + len(tiny.val)
    stem_images.clear()
    fit(cfg.replace(mix_prob=0.0, epochs=2), data=tiny)  # never mixes: cached
    assert sum(stem_images) == 1 + len(tiny.train) + len(tiny.val)


@pytest.mark.parametrize("changes", [{"augment": "trivial"}, {"random_erasing": 0.25}])
def test_a_policy_or_erasing_runs_the_frozen_stages_every_epoch_and_says_so_once(
        tiny: Dataset, monkeypatch: pytest.MonkeyPatch, changes: dict[str, Any]) -> None:
    stem_images = count_stem_images(monkeypatch)
    cfg = tiny_config(unfreeze_depth=0, epochs=2, **PLAIN, **changes)
    with pytest.warns(UserWarning, match=r"frozen stages \(unfreeze_depth 0\) run every "
                                         "epoch") as warned:
        fit(cfg, data=tiny)
    assert len([w for w in warned if "frozen stages" in str(w.message)]) == 1
    assert sum(stem_images) == cfg.epochs * (len(tiny.train) + len(tiny.val))


def digits_config(**changes: Any) -> TrainConfig:
    base: dict[str, Any] = {"data": "digits", "resolution": 8, "weights": "none", "epochs": 1,
                            "batch_size": 128, "warmup_epochs": 0.0, "unfreeze_depth": 0}
    return TrainConfig(**(base | PLAIN | changes))


def cached_to_disk(monkeypatch: pytest.MonkeyPatch, cache: Path) -> Dataset:
    """Digits, keyed, in a cache of the test's own, and a device budget too small to keep
    frozen outputs in memory: they go to the cache."""
    monkeypatch.setenv("RESNET_HPO_CACHE", str(cache))
    monkeypatch.setattr(train_module, "resident_budget", lambda *_: 0)
    return load_dataset("digits", 8, 0.1)


def frozen_entries() -> list[Path]:
    return sorted(p for p in (cache_dir() / "frozen").iterdir() if p.suffix != ".lock")


def test_trials_with_the_same_key_compute_the_cache_file_once_and_map_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = cached_to_disk(monkeypatch, tmp_path)
    writes: list[Path] = []
    write = frozen._write

    def recording_write(directory: Path, *args: Any) -> None:
        writes.append(directory)
        write(directory, *args)

    monkeypatch.setattr(frozen, "_write", recording_write)
    cfg = digits_config(seed=7)
    fit(cfg, data=data)
    stem_images = count_stem_images(monkeypatch)
    second = fit(cfg.replace(lr=0.01), data=data).history  # the lr is no part of the key
    assert sum(stem_images) == 1  # the probe for the outputs' shape: the rest was mapped
    assert len(writes) == 1 and frozen_entries() == writes
    assert sorted(p.name for p in writes[0].iterdir()) == ["train.npy", "val.npy"]
    mapped = np.load(writes[0] / "train.npy", mmap_mode="r")
    assert mapped.shape == (len(data.train), 512) and mapped.dtype == np.float32
    assert_same_results(second, uncached_history(cfg.replace(lr=0.01), data, monkeypatch),
                        1e-5)
    fit(cfg.replace(seed=8), data=data)  # random frozen weights of another seed: another key
    assert len(writes) == 2


def test_a_killed_writers_files_are_never_read(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    data = cached_to_disk(monkeypatch, tmp_path)
    cfg = digits_config(amp="bf16")
    key = frozen.cache_key(cfg, Runtime.for_config(cfg, "cpu"), data)
    assert key is not None
    directory = cache_dir() / "frozen" / key
    fill = frozen._fill

    def dying_fill(*args: Any) -> torch.Tensor:
        fill(*args)
        raise KeyboardInterrupt  # killed after the first split was written

    with monkeypatch.context() as patch:
        patch.setattr(frozen, "_fill", dying_fill)
        with pytest.raises(KeyboardInterrupt):
            fit(cfg, data=data)
    assert not directory.exists() and not list(directory.parent.glob(f".{key}.*"))
    # what a SIGKILLed writer leaves: a hidden sibling, here with garbage in it
    leftover = directory.parent / f".{key}.999.deadbeef.tmp"
    leftover.mkdir()
    np.save(leftover / "val.npy", np.full((len(data.val), 512), 7, dtype=np.int16))
    fit(cfg, data=data)
    assert not leftover.exists() and frozen_entries() == [directory]
    torch.manual_seed(cfg.seed)
    prefix, _ = split_frozen(build_model(cfg, data.num_classes), 0)
    images = normalize(torch.from_numpy(data.val.images))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = prefix.eval()(images)
    stored = torch.from_numpy(np.load(directory / "val.npy")).view(torch.bfloat16)
    assert torch.allclose(stored.float(), expected.float(), atol=1e-2)


def test_concurrent_trials_of_a_node_compute_the_outputs_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = {name: DeviceImages(Split(np.zeros((n, 3, 2, 2), np.uint8), np.arange(n)),
                                 torch.device("cpu")) for name, n in (("train", 5), ("val", 2))}
    computed: list[int] = []
    others_waiting = all_at_the_node_lock(monkeypatch, 4)

    def slow_fill(split: DeviceImages, out: torch.Tensor) -> torch.Tensor:
        computed.append(len(split))
        others_waiting()  # the other trials wait on the lock while the first one computes
        return out.copy_(torch.arange(out.numel(), dtype=out.dtype).view(out.shape))

    results: list[dict[str, torch.Tensor]] = []
    trials = [threading.Thread(target=lambda: results.append(frozen._mapped(
        tmp_path / "frozen" / "key", images, slow_fill, torch.Size([4]), torch.bfloat16)))
        for _ in range(4)]
    for trial in trials:
        trial.start()
    for trial in trials:
        trial.join()
    assert sorted(computed) == [2, 5] and len(results) == 4
    for outputs in results:
        assert outputs["train"].dtype == torch.bfloat16
        assert torch.equal(outputs["train"].flatten(), torch.arange(20, dtype=torch.bfloat16))
        assert outputs["val"].shape == (2, 4)


def test_a_full_disk_is_one_clear_line_and_leaves_nothing_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = cached_to_disk(monkeypatch, tmp_path)

    def full(*_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(frozen, "_fill", full)
    with pytest.raises(UserError) as err:
        fit(digits_config(), data=data)
    assert str(err.value) == (f"{tmp_path}: cannot write the frozen stages' outputs there (No "
                              "space left on device); free some space or set RESNET_HPO_CACHE "
                              "to another folder")
    assert [p.suffix for p in (tmp_path / "frozen").iterdir()] == [".lock"]


def test_a_cached_run_resumed_from_a_checkpoint_matches_an_uninterrupted_one(
        tmp_path: Path, tiny: Dataset) -> None:
    cfg = tiny_config(unfreeze_depth=0, epochs=3, **PLAIN)

    def saving_at(epoch: int, directory: Path, stop: bool = False) -> Any:
        def report(metrics: dict[str, float], save: SaveCheckpoint) -> None:
            if metrics["epoch"] == epoch:
                save(directory)
                if stop:
                    raise KeyboardInterrupt
        return report

    straight = fit(cfg, saving_at(3, tmp_path / "straight"), data=tiny)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, saving_at(1, tmp_path / "interrupted", stop=True), data=tiny)
    resumed = fit(cfg, data=tiny, resume_from=tmp_path / "interrupted")
    assert [m["val_acc"] for m in resumed.history] == [m["val_acc"] for m in straight.history]
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    saved = torch.load(tmp_path / "straight" / CHECKPOINT_FILE, weights_only=True)
    assert set(saved["model"]) == set(straight.model.state_dict())  # the whole ResNet


def test_the_cache_key_names_weights_by_their_file_or_uri(tmp_path: Path) -> None:
    model_dir = tmp_path / "backbone"
    model_dir.mkdir()
    torch.save(build_model(tiny_config(), 3).state_dict(), model_dir / "model.pt")
    identity = frozen.weights_identity(tiny_config(weights=str(model_dir)))
    assert identity.startswith(f"{model_dir / 'model.pt'}:")
    stat = (model_dir / "model.pt").stat()  # rewritten: another mtime
    os.utime(model_dir / "model.pt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert frozen.weights_identity(tiny_config(weights=str(model_dir))) != identity
    uri = "s3://bucket/runs/x/trial_1/checkpoint_000002"
    assert frozen.weights_identity(tiny_config(weights=uri)) == uri
    assert frozen.weights_identity(tiny_config(seed=3)) == "none, seed 3"
