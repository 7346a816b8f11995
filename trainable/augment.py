"""Batched augmentation on the training device: resize, crop, flip, normalise, mixup/CutMix.

Everything takes a whole uint8 batch already on the device, so a GPU trial never waits on
per-sample PIL work in CPU workers. Random numbers for per-sample crops come from a
device-side generator; the per-batch mixing draws come from a host generator, so nothing
here synchronises the host with the device.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from trainable.config import TrainConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZED_CROP_MIN_AREA = 0.25
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W in uint8 units (0-255) -> float32, standardised with ImageNet's channel
    statistics."""
    mean, inv_std = _channel_statistics(images.device)
    return (images.float() - mean) * inv_std


def resize(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """N x 3 x H x W (uint8 or float) -> float N x 3 x R x R, antialiased bilinear; unchanged
    when already R x R. The one resize of a batch: a trial, `predict` and ONNX all use it."""
    if images.shape[-2:] == (resolution, resolution):
        return images
    return F.interpolate(images.float(), size=(resolution, resolution), mode="bilinear",
                         antialias=True, align_corners=False)


def resize_uint8(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """`resize`, rounded back to uint8: for the augmentation policies, which work on uint8
    images at the model's resolution, as torchvision's do."""
    if images.shape[-2:] == (resolution, resolution):
        return images
    return resize(images, resolution).round_().clamp_(0, 255).to(torch.uint8)


@functools.cache
def _channel_statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1 / std) in uint8 units, made once per device: a tensor built from Python
    numbers on a GPU is a blocking copy, which would stall the host at every step."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    inv_std = 1 / (torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255)
    return mean, inv_std


def resolved(cfg: TrainConfig, source: str) -> TrainConfig:
    """`cfg` as a run on the data of `source` trains it: flip and crop `auto` made concrete.
    `auto` flips natural images but not digits (a mirrored 2 is no digit), and crops by
    padding up to 64px (the CIFAR recipe) and by resizing above (the ImageNet recipe)."""
    flip = cfg.flip if cfg.flip != "auto" else "none" if source == "digits" else "horizontal"
    crop = cfg.crop if cfg.crop != "auto" else "pad" if cfg.resolution <= 64 else "resized"
    return cfg.replace(flip=flip, crop=crop)


def crop_and_flip(x: torch.Tensor, crop: str, hflip: bool,
                  generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop and flip of a float batch, as one affine resampling.

    `resized` is torchvision's RandomResizedCrop (area 0.25-1, aspect 3/4-4/3); `pad` shifts
    by whole pixels up to 1/8 of the side, filling with the mean colour, like the classic
    pad-4-and-crop for CIFAR. Whole-pixel shifts and flips sample exact pixel centres, so
    they do not blur.
    """
    n, _, h, w = x.shape
    if crop == "none" and not hflip:
        return x

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, device=x.device, generator=generator) * (high - low) + low

    flip = torch.ones(n, device=x.device)
    if hflip:
        flip = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0)
    if crop == "none":
        return torch.where(flip.view(n, 1, 1, 1) < 0, x.flip(3), x)
    if crop == "resized":
        area = uniform(RESIZED_CROP_MIN_AREA, 1.0)
        ratio = torch.exp(uniform(*(math.log(r) for r in RESIZED_CROP_RATIO)))
        scale_x = torch.sqrt(area * ratio).clamp(max=1.0)
        scale_y = torch.sqrt(area / ratio).clamp(max=1.0)
        shift_x = uniform(-1, 1) * (1 - scale_x)
        shift_y = uniform(-1, 1) * (1 - scale_y)
    else:
        pad = max(1, h // 8)
        scale_x = scale_y = torch.ones(n, device=x.device)
        shift_x = torch.randint(-pad, pad + 1, (n,), device=x.device, generator=generator) * 2 / w
        shift_y = torch.randint(-pad, pad + 1, (n,), device=x.device, generator=generator) * 2 / h
    zeros = torch.zeros(n, device=x.device)
    theta = torch.stack([torch.stack([scale_x * flip, zeros, shift_x], 1),
                         torch.stack([zeros, scale_y, shift_y], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """One-hot targets with label smoothing; every row sums to one."""
    off = smoothing / num_classes
    targets = torch.full((len(labels), num_classes), off, device=labels.device)
    return targets.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


def mix(x: torch.Tensor, targets: torch.Tensor, mixup_alpha: float, cutmix_alpha: float,
        mix_prob: float, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix of a batch with its reverse (one lambda per batch, as timm does).

    With both alphas > 0 each mixed batch picks one of the two with equal chance. The
    targets are mixed with the lambda of the pixels actually pasted, so they sum to one.
    """
    if (mixup_alpha <= 0 and cutmix_alpha <= 0) or rng.random() >= mix_prob:
        return x, targets
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if use_cutmix
                else rng.beta(mixup_alpha, mixup_alpha))
    partner = x.flip(0)
    if use_cutmix:
        h, w = x.shape[-2:]
        cut = math.sqrt(1 - lam)
        cut_h, cut_w = round(h * cut), round(w * cut)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = partner[:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        x = x * lam + partner * (1 - lam)
    return x, targets * lam + targets.flip(0) * (1 - lam)
