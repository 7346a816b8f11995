"""Training throughput of `trainable.fit` against the plain loop of the classic fine-tuning
guides, on the same images, batch size, resolution and number of steps.

    python -m benchmarks.throughput --device cpu|cuda [--data-only] [--compile]

(a) ours: the images are decoded once into a uint8 array (timed and printed apart), then
    `trainable.fit` trains from it: batches gathered on the device, augmented there in one
    batched resampling, bf16 autocast, channels_last and no per-step host sync on CUDA.
(b) plain: torchvision's ImageFolder with per-sample PIL transforms (random crop, flip,
    ToTensor, Normalize), a DataLoader, fp32 and `loss.item()` every step.

Both train ResNet18 from scratch (no weights to download) on generated JPEGs, in epochs of
`--steps` steps: the first epoch warms up and is not timed, each later one is. `--data-only`
times the two data paths alone: batches of augmented, normalised tensors on the device, no
model. The last line is `ratio: X.XX`, ours over plain, each path's best timed epoch in
images/s. The repeats alternate the two paths, so both see the same load on a shared machine.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms
from torchvision.models import resnet18

from benchmarks.common import (
    Stopwatch,
    describe_device,
    peak_memory_gib,
    reset_peak_memory,
    resolve_device,
    write_image_tree,
)
from trainable import Dataset, TrainConfig, configure_torch, fit, load_dataset
from trainable.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    crop_and_flip,
    mix,
    resolved,
    soft_targets,
)
from trainable.device_images import DeviceImages
from trainable.runtime import Runtime

NUM_CLASSES = 10
# Dense bf16 tensor-core peaks from the vendor's data sheets, by device-name substring.
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
                    ("L40S", 362.0), ("L4", 121.0))


@dataclass(frozen=True)
class Defaults:
    resolution: int
    batch_size: int
    steps: int  # per epoch, training
    data_steps: int  # per epoch, --data-only
    workers: int
    threads: int | None  # None: torch's default


DEFAULTS = {"cpu": Defaults(resolution=32, batch_size=64, steps=6, data_steps=30, workers=0,
                            threads=1),
            "cuda": Defaults(resolution=224, batch_size=256, steps=40, data_steps=40, workers=4,
                             threads=None)}


@dataclass
class Measurement:
    images_per_s: list[float]  # one per timed epoch
    peak_gib: float = 0.0
    note: str = ""

    @property
    def best(self) -> float:
        return max(self.images_per_s)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_torch()
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"throughput: {describe_device(device)}, torch {torch.__version__}, "
          f"{'data path only' if args.data_only else 'training'}, {args.resolution}px, batch "
          f"{args.batch_size}, epochs of {args.steps} steps: 1 warm-up + {args.epochs} timed, "
          f"{args.repeats} repeats, {args.clock} clock")
    with tempfile.TemporaryDirectory(prefix="resnet-hpo-bench-") as tmp:
        root = Path(tmp)
        os.environ["RESNET_HPO_CACHE"] = str(root / "cache")  # measure a real first decode
        n_train, n_val = args.steps * args.batch_size, NUM_CLASSES
        write_image_tree(root / "images", {"train": n_train, "val": n_val}, NUM_CLASSES,
                         args.resolution, args.image_format)
        start = time.perf_counter()
        data = load_dataset(f"imagefolder:{root / 'images'}", args.resolution, 0.1)
        decode_s = time.perf_counter() - start
        print(f"ours: decode once {decode_s:.2f} s for {n_train + n_val} "
              f"{args.image_format} images (not in the timing below)")
        train, val = plain_loaders(root / "images", args, device)
        epochs = 1 + args.epochs
        if args.data_only:
            paths = {"ours": lambda: our_data_path(data, args, device, epochs),
                     "plain": lambda: plain_data_path(train, args, device, epochs)}
        else:
            paths = {"ours": lambda: our_training(data, args, device, epochs),
                     "plain": lambda: plain_training(train, val, args, device, epochs)}
        best = measure(paths, args.repeats)
    report(best, args, device)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--data-only", action="store_true",
                        help="time the data paths alone (augmented batches, no model)")
    parser.add_argument("--resolution", type=int, help="px; default 32 on cpu, 224 on cuda")
    parser.add_argument("--batch-size", type=int, help="default 64 on cpu, 256 on cuda")
    parser.add_argument("--steps", type=int, help="steps per epoch; default 6 (30 with "
                        "--data-only) on cpu, 40 on cuda")
    parser.add_argument("--epochs", type=int, default=3,
                        help="timed epochs after the warm-up epoch, per repeat")
    parser.add_argument("--repeats", type=int, default=3,
                        help="measure both paths this many times, alternating")
    parser.add_argument("--workers", type=int,
                        help="DataLoader workers of the plain path; default 0 on cpu, 4 on cuda")
    parser.add_argument("--threads", type=int, help="torch threads of this process; default 1 "
                        "on cpu (one core per path, as a 1-CPU Ray trial gets; torch's own default "
                        "on cuda)")
    parser.add_argument("--clock", choices=["cpu", "wall"],
                        help="cpu: CPU seconds of this process, robust to other load on a "
                        "shared machine (default on cpu with 1 thread and 0 workers); wall: "
                        "elapsed seconds (default otherwise)")
    parser.add_argument("--image-format", choices=["jpeg", "png"], default="jpeg")
    parser.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                        help="ours only; auto = bf16 on cuda, off on cpu (the plain loop is fp32)")
    parser.add_argument("--compile", action="store_true", help="ours: torch.compile the model")
    parser.add_argument("--peak-tflops", type=float,
                        help="the GPU's dense bf16 peak, where its name is not in the table")
    args = parser.parse_args(argv)
    defaults = DEFAULTS[args.device]
    args.resolution = args.resolution or defaults.resolution
    args.batch_size = args.batch_size or defaults.batch_size
    args.steps = args.steps or (defaults.data_steps if args.data_only else defaults.steps)
    args.workers = defaults.workers if args.workers is None else args.workers
    args.threads = args.threads or defaults.threads
    in_process = args.device == "cpu" and args.threads == 1 and args.workers == 0
    args.clock = args.clock or ("cpu" if in_process else "wall")
    if args.clock == "cpu" and not in_process:
        parser.error("--clock cpu needs --device cpu, --threads 1 and --workers 0")
    if args.steps * args.batch_size < NUM_CLASSES:
        parser.error(f"steps * batch size must be at least {NUM_CLASSES}, the number of classes")
    return args


def measure(paths: dict[str, Callable[[], Measurement]], repeats: int) -> dict[str, Measurement]:
    """Run every path `repeats` times, alternating, so that both see the same machine load.

    Each path's best timed epoch counts: on a shared machine the fastest epoch is the one
    least disturbed by other work.
    """
    results: dict[str, Measurement] = {}
    for repeat in range(repeats):
        for name, run in paths.items():
            result = run()
            rates = " ".join(f"{rate:.1f}" for rate in result.images_per_s)
            print(f"  repeat {repeat + 1} {name:5s} images/s per epoch: {rates}{result.note}",
                  flush=True)
            if name in results:
                result.images_per_s += results[name].images_per_s
                result.peak_gib = max(result.peak_gib, results[name].peak_gib)
            results[name] = result
    return results


def our_config(data: Dataset, args: argparse.Namespace, epochs: int) -> TrainConfig:
    # Plain momentum, as in the plain loop: Nesterov's extra pass over the weights costs a
    # few percent of a step on the CPU, and the optimizer is no part of what is compared.
    return TrainConfig(data=data.source, resolution=args.resolution, weights="none",
                       batch_size=args.batch_size, epochs=epochs, nesterov=False, amp=args.amp,
                       compile=args.compile)


def our_training(data: Dataset, args: argparse.Namespace, device: torch.device,
                 epochs: int) -> Measurement:
    """`trainable.fit`; images/s of every epoch after the first, each from the end of the
    one before to its own end (its validation pass included, as in `plain_training`)."""
    clock = Stopwatch(device, args.clock == "cpu")
    ends: list[float] = []
    reset_peak_memory(device)
    history = fit(our_config(data, args, epochs), lambda _metrics, _save: ends.append(
        clock.read()), data=data, device=device).history
    images = len(data.train) // args.batch_size * args.batch_size
    later = sorted(h["epoch_time_s"] for h in history[1:])
    overhead = history[0]["epoch_time_s"] - later[len(later) // 2]
    return Measurement([images / (end - start) for start, end in itertools.pairwise(ends)],
                       peak_memory_gib(device), f"  (first epoch {overhead:+.2f} s: warm-up, "
                       "compile)")


def our_data_path(data: Dataset, args: argparse.Namespace, device: torch.device,
                  epochs: int) -> Measurement:
    """What `fit` does before the model sees a batch: gather uint8 on the device, normalise,
    crop and flip per sample in one batched resampling, mix, make soft targets."""
    cfg = our_config(data, args, epochs)
    rt = Runtime.for_config(cfg, device)
    reset_peak_memory(device)
    clock = Stopwatch(device, args.clock == "cpu")
    clock.start()
    images = DeviceImages(data.train, device)
    upload_s = clock.seconds()
    generator = torch.Generator(device).manual_seed(0)
    mix_rng = np.random.default_rng(0)
    trained = resolved(cfg, data.source)
    bs = args.batch_size
    rates = []
    for _ in range(epochs):
        clock.start()
        steps = len(images) // bs
        order = torch.randperm(len(images)).to(images.index_device)[:steps * bs]
        for uint8, labels in images.batches(order.view(steps, bs)):
            x = crop_and_flip(rt.prepare(uint8), trained.crop, trained.flip == "horizontal",
                              generator)
            x, _ = mix(x, soft_targets(labels, data.num_classes, cfg.label_smoothing),
                       cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_prob, mix_rng)
        rates.append(steps * bs / clock.seconds())
    return Measurement(rates[1:], peak_memory_gib(device),
                       f"  (upload to {device.type} {upload_s:.2f} s, not timed)")


def plain_loaders(root: Path, args: argparse.Namespace,
                  device: torch.device) -> tuple[DataLoader, DataLoader]:
    """The data path of the classic guides: ImageFolder, per-sample PIL transforms."""
    if resolved(TrainConfig(resolution=args.resolution), "").crop == "pad":  # the CIFAR recipe
        crop: nn.Module = transforms.RandomCrop(args.resolution, padding=args.resolution // 8)
    else:  # the ImageNet recipe
        crop = transforms.RandomResizedCrop(args.resolution, scale=(0.25, 1.0))
    to_input = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    augment = transforms.Compose([crop, transforms.RandomHorizontalFlip(), *to_input])
    # Persistent workers spare the baseline a worker start-up in every timed epoch.
    options: dict[str, Any] = {"batch_size": args.batch_size, "num_workers": args.workers,
                               "pin_memory": device.type == "cuda",
                               "persistent_workers": args.workers > 0}
    train = DataLoader(datasets.ImageFolder(str(root / "train"), augment), shuffle=True,
                       drop_last=True, **options)
    val = DataLoader(datasets.ImageFolder(str(root / "val"), transforms.Compose(to_input)),
                     **options)
    return train, val


def plain_training(train: DataLoader, val: DataLoader, args: argparse.Namespace,
                   device: torch.device, epochs: int) -> Measurement:
    """The classic loop: fp32, blocking copies, `loss.item()` every step, and a validation
    pass after every epoch."""
    torch.manual_seed(0)
    model = resnet18(num_classes=NUM_CLASSES).to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-5)
    reset_peak_memory(device)
    clock = Stopwatch(device, args.clock == "cpu")
    rates = []
    for _ in range(epochs):
        clock.start()
        model.train()
        running_loss, images = 0.0, 0
        for inputs, labels in train:
            inputs, labels = inputs.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(model(inputs), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item() * inputs.size(0)
            images += inputs.size(0)
        model.eval()
        correct = 0
        with torch.no_grad():
            for inputs, labels in val:
                outputs = model(inputs.to(device))
                correct += (outputs.argmax(1).cpu() == labels).sum().item()
        rates.append(images / clock.seconds())
    return Measurement(rates[1:], peak_memory_gib(device))


def plain_data_path(loader: DataLoader, args: argparse.Namespace, device: torch.device,
                    epochs: int) -> Measurement:
    """Iterate the plain DataLoader, landing each batch on the device."""
    reset_peak_memory(device)
    clock = Stopwatch(device, args.clock == "cpu")
    rates = []
    for _ in range(epochs):
        clock.start()
        images = 0
        for inputs, _ in loader:
            inputs.to(device, non_blocking=True)
            images += inputs.size(0)
        rates.append(images / clock.seconds())
    return Measurement(rates[1:], peak_memory_gib(device))


def resnet18_training_flops(resolution: int) -> float:
    """FLOPs of one forward and backward pass of one image (counted on the meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = 2  # BatchNorm refuses a training batch of one 1x1 feature map
    with torch.device("meta"):
        model = resnet18(num_classes=NUM_CLASSES)
        x = torch.empty(batch, 3, resolution, resolution)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / batch


def bf16_peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in BF16_PEAK_TFLOPS if key in name), None)


def report(best: dict[str, Measurement], args: argparse.Namespace,
           device: torch.device) -> None:
    ours, plain = best["ours"], best["plain"]
    print(f"ours:  {ours.best:9.1f} images/s (best timed epoch)")
    print(f"plain: {plain.best:9.1f} images/s (best timed epoch; {args.workers} DataLoader "
          "workers)")
    if device.type == "cuda":
        print(f"peak GPU memory: ours {ours.peak_gib:.2f} GiB (with the uint8 training set on "
              f"the GPU), plain {plain.peak_gib:.2f} GiB")
        if not args.data_only:
            flops = resnet18_training_flops(args.resolution)
            peak = bf16_peak_flops(device, args.peak_tflops)
            reached = ours.best * flops
            share = (f"{reached / peak:.1%} of the bf16 peak ({peak / 1e12:.0f} TFLOP/s)"
                     if peak else "unknown bf16 peak: pass --peak-tflops")
            print(f"ours: {flops / 1e9:.2f} GFLOP per image (forward + backward) -> "
                  f"{reached / 1e12:.1f} TFLOP/s, {share}")
    print(f"ratio: {ours.best / plain.best:.2f}")


if __name__ == "__main__":
    main()
