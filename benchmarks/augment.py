"""Images per second of the batched augmentation policies (`trainable.autoaugment`) against
torchvision's v2 policies applied image by image, on the same device and images.

    python -m benchmarks.augment [--device cpu|cuda] [--sizes 32,224] [--batch-size 128]

A DataLoader worker runs torchvision's TrivialAugmentWide or RandAugment on one image at a
time; resnet-hpo runs the same policy on a whole uint8 batch, each image with its own draws.
Both get the same uint8 batches (smooth colour fields with noise, as
benchmarks/common.py makes them), already on the device; the per-image path ends with
the images stacked into a batch, as a DataLoader's collation would. Each measurement is the
fastest of `--repeats` passes over `--batches` batches. On the CPU with one thread (the
default) the timer counts this process's CPU seconds, robust to other load on a shared
machine. The last line is `ratio: X.XX`: batched over per-image images/s at the smallest
size, for the policy where batching gains least.
"""

from __future__ import annotations

import argparse
import functools
import itertools
from collections.abc import Callable

import numpy as np
import torch
from torchvision.transforms import v2

from benchmarks.common import Stopwatch, describe_device, resolve_device, synthetic_images
from trainable.autoaugment import auto_augment

TARGET_RATIO = 5.0  # batched / per-image images/s on the CPU at 32px
TORCHVISION = {"trivial": v2.TrivialAugmentWide, "randaugment": v2.RandAugment}

Augment = Callable[[torch.Tensor], torch.Tensor]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    cpu_clock = device.type == "cpu" and args.threads == 1
    print(f"augment: {describe_device(device)}, torch {torch.__version__}, batch "
          f"{args.batch_size}, {args.batches} batches, fastest of {args.repeats}, "
          f"{'cpu' if cpu_clock else 'wall'} clock")
    ratios: dict[tuple[int, str], float] = {}
    for size, policy in itertools.product(args.sizes, args.policies):
        batches = [torch.from_numpy(synthetic_images(
            np.arange(args.batch_size) % 10, size, seed=i).transpose(0, 3, 1, 2)).to(device)
                   for i in range(args.batches)]
        generator = torch.Generator().manual_seed(0)
        torch.manual_seed(0)  # torchvision's policies draw from the global generator
        paths: dict[str, Augment] = {
            "batched": functools.partial(auto_augment, policy=policy, generator=generator),
            "per-image": functools.partial(image_by_image, TORCHVISION[policy]())}
        rates = {name: images_per_s(fn, batches, device, args.repeats, cpu_clock)
                 for name, fn in paths.items()}
        ratios[size, policy] = rates["batched"] / rates["per-image"]
        print(f"{size:4d}px {policy:12s} batched {rates['batched']:10.0f} images/s, "
              f"torchvision per image {rates['per-image']:8.0f} images/s: "
              f"{ratios[size, policy]:.2f}x", flush=True)
    smallest = min(args.sizes)
    worst = min(ratios[smallest, p] for p in args.policies)
    print(f"ratio: {worst:.2f}" + (f" (target >= {TARGET_RATIO:g} on the CPU at 32px)"
                                   if device.type == "cpu" and smallest == 32 else ""))


def image_by_image(transform: Callable[[torch.Tensor], torch.Tensor],
                   batch: torch.Tensor) -> torch.Tensor:
    return torch.stack([transform(image) for image in batch])


def images_per_s(augment: Augment, batches: list[torch.Tensor], device: torch.device,
                 repeats: int, cpu_clock: bool) -> float:
    augment(batches[0])  # warm up (allocations, kernels' first launch)
    clock = Stopwatch(device, cpu_clock)
    fastest = float("inf")
    for _ in range(repeats):
        clock.start()
        for batch in batches:
            augment(batch)
        fastest = min(fastest, clock.seconds())
    return sum(len(b) for b in batches) / fastest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                        default=[32, 224], help="image sides in px, comma-separated")
    parser.add_argument("--policies", type=lambda s: s.split(","),
                        default=list(TORCHVISION), help="trivial,randaugment")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=4, help="batches per timed pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; with 1 on the "
                        "CPU the timer counts this process's CPU seconds, else elapsed seconds")
    args = parser.parse_args(argv)
    if unknown := set(args.policies) - set(TORCHVISION):
        parser.error(f"--policies: {', '.join(sorted(unknown))} is not one of "
                     f"{', '.join(TORCHVISION)}")
    return args


if __name__ == "__main__":
    main()
