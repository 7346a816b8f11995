"""`fit`: the one training function that the search, `resnet-hpo train`, the tests and the
benchmarks all call. It knows nothing of Ray: the Tune adapter passes a `report` callback."""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet

from trainable.augment import (
    crop_and_flip,
    mix,
    resize_uint8,
    resolved,
    soft_targets,
)
from trainable.autoaugment import auto_augment, random_erasing
from trainable.config import TrainConfig
from trainable.data import Dataset, load_dataset
from trainable.device_images import DeviceImages, resident_budget
from trainable.ema import WeightAverage
from trainable.errors import UserError
from trainable.frozen import augments, trial_inputs, trial_module
from trainable.model import build_optimizer, initial_model, set_train_mode
from trainable.ranking import best_epoch_row, is_better, metric_mode
from trainable.runtime import Runtime
from trainable.saved import read_checkpoint, write_checkpoint
from trainable.schedule import lr_factor

NAN_CHECK_EVERY = 50  # steps between the only host syncs of an epoch
POLICY_STREAM = 1 << 62  # added to an epoch's seed: the policies' host draws, a stream apart

SaveCheckpoint = Callable[[Path], None]
Report = Callable[[dict[str, float], SaveCheckpoint], None]


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; retrying the same config will not help."""


@dataclass
class FitResult:
    model: ResNet  # with the weights of the best epoch by cfg.metric
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0  # 0 until an epoch has a finite value of cfg.metric

    @property
    def best(self) -> dict[str, float]:
        """The metrics of the best epoch (empty before there is one)."""
        return self.history[self.best_epoch - 1] if self.best_epoch else {}


def fit(cfg: TrainConfig, report: Report | None = None, *, data: Dataset | None = None,
        device: str | torch.device | None = None, resume_from: Path | None = None,
        gpu_share: float = 1.0,
        extra_metrics: Callable[[ResNet], dict[str, float]] | None = None) -> FitResult:
    """Train ResNet18 as `cfg` says; call `report(metrics, save_checkpoint)` after each epoch.
    `gpu_share`: the fraction of the GPU this run has (trials packed on one GPU).
    `extra_metrics(model)`: more metrics of each epoch's scored weights (the average where
    `ema_decay` is on), reported with the others
    (benchmarks score a test split this way; a search never does). The process should have
    called `trainable.configure_torch()` first."""
    rt = Runtime.for_config(cfg, device)
    if data is None:
        data = load_dataset(cfg.data, cfg.resolution, cfg.val_fraction)
    elif data.resolution < cfg.resolution:
        raise UserError(f"config key 'resolution': the data was decoded at {data.resolution}px, "
                        f"the config asks for {cfg.resolution}px; a run can only use that "
                        "resolution or a smaller one")
    trained = resolved(cfg, data.source)  # flip and crop `auto` as this data trains them
    torch.manual_seed(cfg.seed)  # the CUDA generators too
    model, initial_state = initial_model(cfg, data.num_classes)
    model = model.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    ema = WeightAverage(model, cfg.ema_decay, cfg.ema_steps) if cfg.ema_decay > 0 else None
    # what each epoch scores and the best epoch keeps: the averaged weights, where averaging
    scored_model = model if ema is None else ema.module
    result = FitResult(model)
    mode = metric_mode(cfg.metric)
    best_state = initial_state  # until an epoch is the best: read, never written
    start_epoch = 0
    if resume_from is not None:
        state = read_checkpoint(Path(resume_from), map_location=rt.device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        best_state, start_epoch, result.history = (
            state["best_model"], state["epoch"], list(state["history"]))
        best = best_epoch_row(result.history, cfg.metric, mode)
        result.best_epoch = int(best["epoch"]) if best else 0
    # after the resume: frozen stages' outputs are computed from the weights the run goes on with
    module, train, val = trial_inputs(model, trained, data, rt,
                                      resident_budget(rt.device, gpu_share))
    forward: nn.Module = torch.compile(module) if cfg.compile else module  # type: ignore[assignment]
    scored = forward if ema is None else trial_module(ema.module, trained)

    for epoch in range(start_epoch, cfg.epochs):
        start = time.perf_counter()
        train_loss, lr, images_per_s = train_one_epoch(forward, optimizer, scaler, train,
                                                       trained, rt, epoch, data, ema)
        val_loss, val_acc = evaluate(scored, val, rt, cfg.eval_batch_size)
        metrics = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
                   "val_acc": val_acc, "lr": lr, "images_per_s": images_per_s,
                   "epoch_time_s": time.perf_counter() - start}
        if extra_metrics is not None:
            metrics.update(extra_metrics(scored_model))
        if is_better(metrics[cfg.metric], result.best.get(cfg.metric), mode):
            best_state = copy.deepcopy(scored_model.state_dict())
            result.best_epoch = epoch + 1
        result.history.append(metrics)
        if report is not None:
            # The best epoch's weights are the model's when this epoch is the best:
            # torch.save writes tensors that share storage once.
            best_now = (scored_model.state_dict() if result.best_epoch == epoch + 1
                        else best_state)
            report(metrics, functools.partial(
                save_checkpoint, cfg=cfg, epochs_done=epoch + 1, model=model,
                optimizer=optimizer, scaler=scaler, ema=ema, best_state=best_now,
                history=result.history, class_names=data.class_names))
        patience = cfg.early_stop_patience
        if patience and epoch + 1 - result.best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    return result


def save_checkpoint(directory: Path, *, cfg: TrainConfig, epochs_done: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    ema: WeightAverage | None, best_state: dict[str, Any],
                    history: list[dict[str, float]], class_names: list[str]) -> None:
    """What `fit(resume_from=directory)` continues from after `epochs_done` epochs."""
    write_checkpoint(directory, cfg, {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(), "ema": ema.state_dict() if ema else None,
        "best_model": best_state, "epoch": epochs_done, "history": history,
        "class_names": class_names})


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, images: DeviceImages, cfg: TrainConfig,
                    rt: Runtime, epoch: int, data: Dataset,
                    ema: WeightAverage | None = None) -> tuple[float, float, float]:
    """One pass over the training split (images, or the frozen stages' outputs); returns
    (mean loss, last head lr, images/s). `ema` follows the weights after each step. `cfg` as
    augment.resolved makes it."""
    set_train_mode(model, True)
    seed = epoch_seed(cfg.seed, epoch)
    batch_indices = shuffled_batches(images, cfg.batch_size, seed)
    micro_batches, batch_size = batch_indices.shape
    steps = math.ceil(micro_batches / cfg.accumulate_steps)
    augment = augments(cfg)
    device_gen = torch.Generator(rt.device).manual_seed(seed)
    policy_gen = torch.Generator().manual_seed(seed + POLICY_STREAM)
    mix_rng = np.random.default_rng([cfg.seed, epoch])
    loss_sum = torch.zeros((), device=rt.device)
    lr = cfg.lr
    start = time.perf_counter()
    for i, (rows, labels) in enumerate(images.batches(batch_indices)):
        step, micro = divmod(i, cfg.accumulate_steps)
        if micro == 0:
            lr = set_lr(optimizer, cfg, epoch * steps + step, steps)
        if cfg.augment != "none":  # on uint8 at the model's resolution, as torchvision's
            rows = auto_augment(resize_uint8(rows, rt.resolution), cfg.augment, policy_gen,
                                randaugment_n=cfg.randaugment_n,
                                randaugment_m=cfg.randaugment_m)
        x = model_input(rows, rt)
        targets = soft_targets(labels, data.num_classes, cfg.label_smoothing)
        if augment:  # never for frozen stages' outputs
            x = crop_and_flip(x, cfg.crop, cfg.flip == "horizontal", device_gen)
            if cfg.random_erasing > 0:  # after normalisation, where torchvision erases
                x = random_erasing(x, cfg.random_erasing, policy_gen)
            x, targets = mix(x, targets, cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_prob,
                             mix_rng)
        with rt.autocast():
            loss = F.cross_entropy(model(x), targets)
        accumulate = min(cfg.accumulate_steps, micro_batches - step * cfg.accumulate_steps)
        scaler.scale(loss / accumulate).backward()
        loss_sum += loss.detach()
        if micro == accumulate - 1:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.after_step(epoch * steps + step, warmup_steps(cfg, steps))
        if (i + 1) % NAN_CHECK_EVERY == 0 or i + 1 == micro_batches:
            mean_loss = loss_sum.item() / (i + 1)
            if not math.isfinite(mean_loss):
                other_amp = {torch.float16: " or use amp bf16", torch.bfloat16: " or use amp off",
                             None: ""}[rt.amp_dtype]
                raise TrainingDiverged(f"training loss became {mean_loss} in epoch {epoch + 1} "
                                       f"(lr {lr:.3g}); lower lr{other_amp}")
    elapsed = time.perf_counter() - start  # the .item() above waited for the device
    return loss_sum.item() / micro_batches, lr, micro_batches * batch_size / elapsed


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's batch order, crops and policy draws. They (and the mixing)
    derive from (seed, epoch) alone, so a run resumed from a checkpoint continues exactly as
    it would have."""
    return seed * 100_003 + epoch


def shuffled_batches(images: DeviceImages, batch_size: int, seed: int) -> torch.Tensor:
    """Batches x batch size: the indices of an epoch's batches in a random order; the ragged
    last batch is dropped."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    batch_size = min(batch_size, len(images))
    batches = len(images) // batch_size
    # one copy to the device an epoch, not one a step
    return order[:batches * batch_size].view(batches, batch_size).to(images.index_device)


def set_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int,
           steps_per_epoch: int) -> float:
    """Sets every group's lr before optimizer step `step` of the run; returns the head's."""
    factor = lr_factor(step, warmup_steps(cfg, steps_per_epoch), cfg.epochs * steps_per_epoch,
                       cfg.min_lr / cfg.lr)
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * group["lr_scale"] * factor
    return cfg.lr * factor


def warmup_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    return round(cfg.warmup_epochs * steps_per_epoch)


@torch.no_grad()
def predict_outputs(model: nn.Module, images: DeviceImages, rt: Runtime,
                    batch_size: int) -> torch.Tensor:
    """What `model` returns (logits of a classifier, features of a `Backbone`) as float32 on
    the device, in the split's order, never augmented."""
    set_train_mode(model, False)
    outputs = []
    for rows, _ in images.batches(torch.arange(len(images), device=images.index_device)
                                  .split(batch_size)):
        with rt.autocast():
            outputs.append(model(model_input(rows, rt)).float())
    return torch.cat(outputs)


def model_input(rows: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """A batch as the model takes it: uint8 images prepared (resized, normalised); the
    outputs of frozen stages (`trainable.frozen`) as they are."""
    return rt.prepare(rows) if rows.dtype == torch.uint8 else rows


def evaluate(model: nn.Module, images: DeviceImages, rt: Runtime,
             batch_size: int) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on a split."""
    logits = predict_outputs(model, images, rt, batch_size)
    loss = F.cross_entropy(logits, images.labels)
    correct = (logits.argmax(1) == images.labels).sum()
    return loss.item(), correct.item() / len(images)
