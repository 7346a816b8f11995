"""A trial's frozen stages run once, not every epoch.

When a trial's training images are the same in every epoch (no crop, flip or mixing), the
output of its frozen prefix (`trainable.model.split_frozen`) for an image never changes: it
is computed once per train and val image, in the trial's precision, and each epoch runs only
the trainable rest on it. The outputs stay on the trial's device when they fit what its
images leave of its budget (`resident_budget`). Larger ones go to memory-mapped files in the
node's cache, cache_dir()/frozen/KEY/{train,val}.npy, keyed by everything they depend on;
like the decoded data (`trainable.data_file`) they are written in a hidden sibling directory
that is renamed when complete, under the node's lock, so the trials of a node with the same
key compute them once and a killed writer's files are never read. Splits that are no decoded
file's (no key) keep them in host memory.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models import ResNet, ResNet18_Weights

from trainable.config import TrainConfig
from trainable.data import CACHE_WRITE_ERRORS, Dataset, cache_dir
from trainable.data_file import node_lock, written_whole
from trainable.device_images import DeviceImages
from trainable.errors import UserError
from trainable.model import split_frozen
from trainable.runtime import Runtime
from trainable.storage import is_uri
from trainable.weights import weights_file

CACHE_OUTPUTS = True  # False: frozen stages run every epoch, as for augmented images
CACHE_FORMAT = "v1"  # part of every key: a new layout never reads an old one
NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16,
                torch.bfloat16: np.int16}  # numpy has no bfloat16: its files hold the bits

Fill = Callable[[DeviceImages, torch.Tensor], torch.Tensor]  # (images, out) -> out, filled


def augments(cfg: TrainConfig) -> bool:
    """Whether a trial's training images differ between epochs: random crops, flips,
    mixing, an augmentation policy or random erasing (`cfg` as augment.resolved makes it)."""
    mixes = (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0) and cfg.mix_prob > 0
    return (cfg.crop != "none" or cfg.flip != "none" or mixes or cfg.augment != "none"
            or cfg.random_erasing > 0)


def caches_outputs(cfg: TrainConfig) -> bool:
    """Whether frozen stages (if any) run once per image rather than every epoch."""
    return CACHE_OUTPUTS and not augments(cfg)


def trial_module(model: ResNet, cfg: TrainConfig) -> nn.Module:
    """The module a trial's batches go through: the whole model; its frozen stages without
    autograd, then the rest; or the rest alone, on the frozen stages' outputs."""
    prefix, rest = split_frozen(model, cfg.unfreeze_depth)
    if len(prefix) == 0:
        return model
    return rest if caches_outputs(cfg) else nn.Sequential(WithoutGrad(prefix), rest)


class WithoutGrad(nn.Module):
    """Frozen stages run without autograd: they keep no activations for a backward pass."""

    def __init__(self, stages: nn.Module):
        super().__init__()
        self.stages = stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.stages(x)


def trial_inputs(model: ResNet, cfg: TrainConfig, data: Dataset, rt: Runtime,
                 budget: int) -> tuple[nn.Module, DeviceImages, DeviceImages]:
    """(the module a trial's batches go through, its train batches, its val batches): the
    trainable stages and the frozen stages' outputs, computed once, where the images are not
    augmented; else the whole model, its frozen stages run without autograd, and the images.
    `budget`: the bytes of data the trial may keep on its device."""
    train = DeviceImages(data.train, rt.device, budget)
    val = DeviceImages(data.val, rt.device, budget - train.device_bytes)
    module = trial_module(model, cfg)
    prefix, _ = split_frozen(model, cfg.unfreeze_depth)
    if len(prefix) == 0 or not caches_outputs(cfg):
        if len(prefix) and CACHE_OUTPUTS and not augments(
                cfg.replace(augment="none", random_erasing=0.0)):
            warnings.warn(f"augment {cfg.augment}, random_erasing {cfg.random_erasing}: the "
                          "images change every epoch, so the frozen stages (unfreeze_depth "
                          f"{cfg.unfreeze_depth}) run every epoch, not once", stacklevel=2)
        return module, train, val
    prefix.eval()  # frozen BatchNorm: its running statistics
    dtype = rt.amp_dtype or torch.float32
    with torch.inference_mode(), rt.autocast():
        row_shape = prefix(torch.zeros(1, 3, rt.resolution, rt.resolution,
                                       device=rt.device)).shape[1:]
    left = budget - train.device_bytes - val.device_bytes  # the images stay while we compute
    nbytes = (len(train) + len(val)) * row_shape.numel() * dtype.itemsize
    key = cache_key(cfg, rt, data)
    images = {"train": train, "val": val}
    fill = functools.partial(_fill, prefix, rt, cfg.eval_batch_size)
    if nbytes <= left or key is None:
        where = rt.device if nbytes <= left else torch.device("cpu")
        outputs = {name: fill(split, torch.empty((len(split), *row_shape), dtype=dtype,
                                                 device=where))
                   for name, split in images.items()}
    else:
        outputs = _mapped(cache_dir() / "frozen" / key, images, fill, row_shape, dtype)
    train = DeviceImages(data.train, rt.device, left, rows=outputs["train"])
    val = DeviceImages(data.val, rt.device, left - train.device_bytes, rows=outputs["val"])
    return module, train, val


def cache_key(cfg: TrainConfig, rt: Runtime, data: Dataset) -> str | None:
    """Everything the frozen stages' outputs depend on, hashed; None for splits that are no
    decoded file's."""
    if data.train.key is None or data.val.key is None:
        return None
    parts = (CACHE_FORMAT, torch.__version__, data.train.key, data.val.key,
             weights_identity(cfg), cfg.resolution, cfg.stem, cfg.unfreeze_depth, rt.amp_dtype)
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:24]


def weights_identity(cfg: TrainConfig) -> str:
    """Where the frozen weights come from: a local file by its path, size and mtime; one in
    storage by its URI; with weights `none`, torch's initialisation from the seed."""
    if cfg.weights == "none":
        return f"none, seed {cfg.seed}"
    if cfg.weights == "imagenet":
        return ResNet18_Weights.IMAGENET1K_V1.url
    if is_uri(cfg.weights):
        return cfg.weights
    path = weights_file(Path(cfg.weights)).resolve()
    stat = path.stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def _fill(prefix: nn.Module, rt: Runtime, batch_size: int, images: DeviceImages,
          out: torch.Tensor) -> torch.Tensor:
    """`out`, filled with the prefix's outputs for the images, in order."""
    start = 0
    for uint8, _ in images.batches(torch.arange(len(images), device=images.index_device)
                                   .split(batch_size)):
        with torch.inference_mode(), rt.autocast():
            outputs = prefix(rt.prepare(uint8))
        out[start:start + len(outputs)] = outputs
        start += len(outputs)
    return out


def _mapped(directory: Path, images: dict[str, DeviceImages], fill: Fill,
            row_shape: torch.Size, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The outputs, mapped from this node's cache; the first trial that needs them computes
    them there while the others wait for it."""
    if not directory.is_dir():  # it has its final name only once complete
        try:
            with node_lock(directory):
                if not directory.is_dir():
                    _write(directory, images, fill, row_shape, dtype)
        except OSError as e:
            if e.errno in CACHE_WRITE_ERRORS:
                raise UserError(f"{cache_dir()}: cannot write the frozen stages' outputs there "
                                f"({e.strerror}); free some space or set RESNET_HPO_CACHE to "
                                "another folder") from None
            raise
    with warnings.catch_warnings():  # read-only maps; we never write
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return {name: torch.from_numpy(np.load(directory / f"{name}.npy", mmap_mode="r"))
                .view(dtype) for name in images}


def _write(directory: Path, images: dict[str, DeviceImages], fill: Fill,
           row_shape: torch.Size, dtype: torch.dtype) -> None:
    """Compute the outputs into a hidden sibling of `directory`, then rename it (hold its
    node_lock)."""
    with written_whole(directory) as hidden:
        for name, split in images.items():
            path = hidden / f"{name}.npy"
            array = np.lib.format.open_memmap(path, mode="w+", dtype=NUMPY_DTYPES[dtype],
                                              shape=(len(split), *row_shape))
            with open(path, "r+b") as file:  # a full disk fails here, not as a SIGBUS in fill
                os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)
            fill(split, torch.from_numpy(array).view(dtype))
            array.flush()
            with open(path, "rb") as file:
                os.fsync(file.fileno())
