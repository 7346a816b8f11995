"""Helpers shared by the benchmarks (and tests): synthetic image data, device timing and
memory, a local S3 server.

The benchmarks run from a plain copy of the repository (no `pip install`, no Ray), so this
module and the scripts import nothing from the project but `trainable`.
"""

from __future__ import annotations

import contextlib
import platform
import re
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainable import Dataset, Split

GIB = 2**30
JPEG_QUALITY = 90


def class_colours(num_classes: int) -> np.ndarray:
    """One distinct RGB colour per class (num_classes x 3, float)."""
    hues = np.arange(num_classes) / num_classes
    phases = np.array([0.0, 1 / 3, 2 / 3])
    return 128 + 90 * np.cos(2 * np.pi * (hues[:, None] - phases[None, :]))


def synthetic_images(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """uint8 N x size x size x 3: smooth colour fields around each label's colour, plus
    pixel noise, so that JPEG/PNG decoding costs about what it costs for photographs."""
    rng = np.random.default_rng(seed)
    colours = class_colours(int(labels.max()) + 1)[labels]
    coarse = colours[:, None, None, :] + rng.normal(0, 40, (len(labels), 4, 4, 3))
    fields = torch.from_numpy(coarse.transpose(0, 3, 1, 2).astype(np.float32))
    smooth = torch.nn.functional.interpolate(fields, size=(size, size), mode="bicubic",
                                             align_corners=False).numpy().transpose(0, 2, 3, 1)
    noisy = smooth + rng.normal(0, 12, smooth.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def balanced_labels(count: int, num_classes: int) -> np.ndarray:
    return np.arange(count, dtype=np.int64) % num_classes


def write_image_tree(root: Path, splits: dict[str, int], num_classes: int, size: int,
                     image_format: str = "jpeg", seed: int = 0) -> Path:
    """root/<split>/c<k>/<i>.<ext>: a class-per-folder tree with `splits[name]` images in
    each split, as an `imagefolder:` source and torchvision's ImageFolder both read it."""
    suffix = {"jpeg": ".jpg", "png": ".png"}[image_format]
    jobs: list[tuple[Path, np.ndarray]] = []
    for offset, (split, count) in enumerate(splits.items()):
        labels = balanced_labels(count, num_classes)
        pixels = synthetic_images(labels, size, seed + offset)
        for i, (label, image) in enumerate(zip(labels, pixels, strict=True)):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs.append((folder / f"{i:06d}{suffix}", image))

    def save(job: tuple[Path, np.ndarray]) -> None:
        Image.fromarray(job[1]).save(job[0], quality=JPEG_QUALITY)

    with ThreadPoolExecutor() as pool:
        list(pool.map(save, jobs))
    return root


def synthetic_dataset(n_train: int, n_val: int, num_classes: int, resolution: int,
                      seed: int = 0) -> Dataset:
    """The same kind of images as `write_image_tree`, already decoded (no files)."""
    def split(count: int, split_seed: int) -> Split:
        labels = balanced_labels(count, num_classes)
        images = synthetic_images(labels, resolution, split_seed).transpose(0, 3, 1, 2)
        return Split(np.ascontiguousarray(images), labels)

    return Dataset("synthetic", resolution, [f"c{k}" for k in range(num_classes)],
                   split(n_train, seed), split(n_val, seed + 1), None)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that a host timer read next covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Seconds since `start()`, counting the device work queued before each reading.

    `cpu_time` counts the CPU time of this process instead of wall time: on a busy shared
    machine, time spent waiting for a core then does not count. It is only meaningful for
    work done in this process on the CPU.
    """

    def __init__(self, device: torch.device, cpu_time: bool = False):
        self.device = device
        self.timer = time.process_time if cpu_time else time.perf_counter
        self.started = 0.0

    def read(self) -> float:
        synchronize(self.device)
        return self.timer()

    def start(self) -> None:
        self.started = self.read()

    def seconds(self) -> float:
        return self.read() - self.started


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by PyTorch on CUDA (since the last reset); on the CPU the
    process's peak resident set, which includes the Python interpreter and libraries."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{torch.get_num_threads()}-thread {platform.machine()} CPU"


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to PyTorch")
    return torch.device(name)


@contextlib.contextmanager
def moto_s3(log: Path) -> Iterator[dict[str, str]]:
    """A moto S3 server on a free port of 127.0.0.1, its output in `log`: yields the
    environment that points pyarrow, boto3 and child processes at it, as a user exports it."""
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        while not (found := re.search(r"Running on http://127\.0\.0\.1:(\d+)", log.read_text())):
            if server.poll() is not None:
                raise RuntimeError(f"the moto server exited ({server.returncode}): "
                                   f"{log.read_text()}")
            time.sleep(0.1)
        yield {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{found[1]}",
               "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    finally:
        server.terminate()
        server.wait()
