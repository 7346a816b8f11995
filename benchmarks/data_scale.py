"""The decoded-data file at scale: the driver's memory, the decode rate and the data path's
speed as the number of images grows, and a search whose data is twice Ray's object store.

    python -m benchmarks.data_scale [--sizes 5000,20000,80000] [--resolution 64]
    python -m benchmarks.data_scale --search [--object-store-mb 80]

For each N, N generated JPEGs (90% train, 10% val, class-per-folder; generating them is not
timed) are decoded by `decode_dataset` in a fresh process, as the search driver does, which
reports its peak RSS (VmHWM, imports included) and the decode rate. Then this process
times the data-only path of training on the CPU, one thread: batches of 256 random indices
gathered and converted to float, from the mapped file against an in-memory numpy copy
(the path before the mapped file: an array in memory, from Ray's object store). After an
untimed full pass of each, the repeats alternate the two and each path's best repeat counts;
the clock is this process's CPU time unless `--clock wall`. The last lines are the
ratios the issue asks for: peak RSS at the largest N over the smallest (<= 1.3) and mapped
over in-memory images/s (>= 0.8, the lowest over N).

`--search` runs a small real search (2 trials of 1 epoch, 64px, fc only, 1 CPU each) on
generated images whose decoded size is twice the object store, in a fresh driver process
with `ray.init(object_store_memory=...)`. While it runs it samples every process that maps
the decoded file (/proc/PID/status and smaps) and prints the trial workers' memory and their
mapping of the file: file-backed pages shared by the node's trials, or anonymous ones (a
private copy). A worker's peak RssAnon varies by about 100 MiB between two trials of the
same search (the allocator), so the data path of a trial (DeviceImages of train and val, one
pass of batches) is then measured alone, in a fresh process each: the anonymous memory it
adds from the mapped file, and from an in-memory copy of it (the path before).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.common import JPEG_QUALITY, Stopwatch, balanced_labels, synthetic_images
from trainable import Split
from trainable.data import DecodedData, decode_dataset
from trainable.data_file import IMAGES_FILE
from trainable.device_images import DeviceImages

MIB = 2**20
NUM_CLASSES = 10
BATCH = 256
GENERATE_CHUNK = 1000  # images generated at once
SEARCH_BATCH = 128
RSS_RATIO_MAX = 1.3
MAPPED_RATIO_MIN = 0.8


def write_images(root: Path, count: int, size: int, seed: int = 0) -> Path:
    """root/{train,val}/c<k>/<i>.jpg: `count` generated JPEGs, 10% in val, a chunk at a time
    (benchmarks.common.write_image_tree holds every image of a split at once)."""
    def save(job: tuple[Path, np.ndarray]) -> None:
        Image.fromarray(job[1]).save(job[0], quality=JPEG_QUALITY)

    with ThreadPoolExecutor() as pool:
        for offset, (split, n) in enumerate((("train", count - count // 10),
                                             ("val", count // 10))):
            labels = balanced_labels(n, NUM_CLASSES)
            for k in range(NUM_CLASSES):
                (root / split / f"c{k}").mkdir(parents=True, exist_ok=True)
            for start in range(0, n, GENERATE_CHUNK):
                chunk = labels[start:start + GENERATE_CHUNK]
                pixels = synthetic_images(chunk, size, seed + 1000 * offset + start)
                list(pool.map(save, [(root / split / f"c{label}" / f"{start + i:06d}.jpg", image)
                                     for i, (label, image) in enumerate(zip(chunk, pixels,
                                                                            strict=True))]))
    return root


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries a parent's
    peak across fork and exec into it, and this process's parent generated the images."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def decode_child(root: Path, resolution: int) -> None:
    """Decode as the search driver does; print peak RSS and timing as one JSON line."""
    start = time.perf_counter()
    decoded = decode_dataset(f"imagefolder:{root}", resolution, 0.1)
    seconds = time.perf_counter() - start
    data = decoded.open()
    print(json.dumps({"key": decoded.key, "seconds": seconds,
                      "images": len(data.train) + len(data.val),
                      "bytes": data.train.images.nbytes + data.val.images.nbytes,
                      "peak_rss_mib": peak_rss_mib()}))


def run_child(*args: str, env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "benchmarks.data_scale", *args],
                          capture_output=True, text=True, env={**os.environ, **env},
                          check=False)
    if done.returncode:
        raise SystemExit(f"child {args} failed:\n{done.stdout}\n{done.stderr}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def data_only_rates(paths: dict[str, Split], batches: int, repeats: int,
                    cpu_clock: bool) -> dict[str, float]:
    """Best images/s of each path, gathering `batches` random batches and making floats.
    A full untimed pass first maps every page of the file into this process, as a trial's
    first epoch does."""
    devices = {name: DeviceImages(split, torch.device("cpu")) for name, split in paths.items()}
    generator = torch.Generator().manual_seed(0)

    def run(images: DeviceImages, steps: int) -> float:
        order = torch.randperm(len(images), generator=generator)[:steps * BATCH]
        clock = Stopwatch(torch.device("cpu"), cpu_clock)
        clock.start()
        for uint8, _ in images.batches(order.view(steps, BATCH)):
            uint8.float().div_(255)
        return steps * BATCH / clock.seconds()

    for images in devices.values():
        run(images, len(images) // BATCH)
    best = dict.fromkeys(paths, 0.0)
    for _ in range(repeats):
        for name, images in devices.items():
            best[name] = max(best[name], run(images, min(batches, len(images) // BATCH)))
    return best


def scale(args: argparse.Namespace) -> None:
    sizes = [int(n) for n in args.sizes.split(",")]
    torch.set_num_threads(1)
    print(f"data scale: {args.resolution}px JPEGs, {NUM_CLASSES} classes, 90% train / 10% val; "
          f"data-only: batches of {BATCH}, up to {args.batches} a repeat, a full warm-up pass + "
          f"{args.repeats} repeats, 1 thread, {args.clock} clock; {os.cpu_count()} CPUs",
          flush=True)
    print(f"{'N':>7} {'decoded MiB':>11} {'peak RSS MiB':>12} {'decode images/s':>15} "
          f"{'mapped images/s':>15} {'in-memory images/s':>18} {'mapped/in-memory':>16}",
          flush=True)
    peaks: dict[int, float] = {}
    ratios: list[float] = []
    with tempfile.TemporaryDirectory(prefix="data-scale-") as tmp:
        cache = Path(tmp) / "cache"
        os.environ["RESNET_HPO_CACHE"] = str(cache)
        for n in sizes:
            root = write_images(Path(tmp) / f"n{n}", n, args.resolution)
            child = run_child("--decode", str(root), "--resolution", str(args.resolution),
                              env={"RESNET_HPO_CACHE": str(cache)})
            data = DecodedData(str(child["key"])).open()
            rates = data_only_rates({"mapped": data.train, "memory": Split(
                np.array(data.train.images), np.array(data.train.labels))}, args.batches,
                args.repeats, args.clock == "cpu")
            peaks[n] = float(child["peak_rss_mib"])
            ratio = rates["mapped"] / rates["memory"]
            ratios.append(ratio)
            decode_rate = float(child["images"]) / float(child["seconds"])
            print(f"{n:>7} {float(child['bytes']) / MIB:>11.0f} {peaks[n]:>12.0f} "
                  f"{decode_rate:>15,.0f} {rates['mapped']:>15,.0f} {rates['memory']:>18,.0f} "
                  f"{ratio:>16.2f}", flush=True)
            del data
            for path in sorted(root.rglob("*"), reverse=True):  # keep the disk use flat
                path.unlink() if path.is_file() else path.rmdir()
    low, high = min(sizes), max(sizes)
    print(f"driver peak RSS at N={high} / N={low}: {peaks[high] / peaks[low]:.2f} "
          f"(at most {RSS_RATIO_MAX})")
    print(f"mapped / in-memory data-only images/s, lowest over N: {min(ratios):.2f} "
          f"(at least {MAPPED_RATIO_MIN})")


# --- --search ------------------------------------------------------------------------------

SEARCH_SPACE = """
metric: val_acc
sampler: random
scheduler: {{name: fifo, max_epochs: 1}}
resources: {{cpus_per_trial: 1}}
fixed: {{resolution: {resolution}, weights: none, unfreeze_depth: 0,
        batch_size: {batch_size}, warmup_epochs: 0}}
search:
  lr: {{type: float, low: 0.01, high: 0.1, log: true}}
"""


def search_driver(source: str, runs: Path, resolution: int, object_store_mb: int) -> None:
    """A search driver process on its own local Ray with a small object store."""
    import logging

    import pyarrow.parquet as pq
    import ray

    from search.cli import main

    ray.init(address="local", num_cpus=2, num_gpus=0, object_store_memory=object_store_mb * MIB,
             include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    space = runs / "space.yaml"
    space.write_text(SEARCH_SPACE.format(resolution=resolution, batch_size=SEARCH_BATCH))
    start = time.perf_counter()
    main(["search", "--space", str(space), "--data", source, "--trials", "2", "--storage",
          str(runs), "--name", "scale"])
    statuses = pq.read_table(runs / "scale" / "trials.parquet").column("status").to_pylist()
    print(json.dumps({"statuses": statuses, "seconds": time.perf_counter() - start,
                      "peak_rss_mib": peak_rss_mib()}))


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, RssShmem of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[name] = int(value.split()[0])
    return fields


def mapping(pid: int, path: str) -> dict[str, int]:
    """Rss, Anonymous and Private_Dirty (KiB) of a process's mappings of `path`."""
    totals = dict.fromkeys(("Rss", "Anonymous", "Private_Dirty"), 0)
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:  # a mapping
            inside = " ".join(head[5:]) == path
        elif inside and head and head[0].rstrip(":") in totals:
            totals[head[0].rstrip(":")] += int(head[1])
    return totals


class MapSampler(threading.Thread):
    """Peak memory of every process that maps files under `folder`, sampled until stopped."""

    def __init__(self, folder: Path, interval_s: float = 0.25):
        super().__init__(daemon=True)
        self.folder, self.interval_s = str(folder), interval_s
        self.peaks: dict[int, dict[str, int]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval_s):
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                pid = int(entry.name)
                try:
                    maps = (entry / "maps").read_text()
                    if self.folder not in maps:
                        continue
                    path = next(line.split(maxsplit=5)[5] for line in maps.splitlines()
                                if line.endswith(IMAGES_FILE) and self.folder in line)
                    sample = {**proc_status(pid), **{f"map_{k}": v
                                                     for k, v in mapping(pid, path).items()}}
                except (OSError, StopIteration, IndexError):
                    continue
                peak = self.peaks.setdefault(pid, {})
                for key, value in sample.items():
                    peak[key] = max(peak.get(key, 0), value)


def one_search(tmp: Path, source: str, args: argparse.Namespace
               ) -> tuple[dict[str, Any], dict[int, dict[str, int]], int]:
    cache, runs = tmp / "cache", tmp / "runs"
    runs.mkdir()
    sampler = MapSampler(cache / "decoded")
    sampler.start()
    driver = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.data_scale", "--search-driver", source, str(runs),
         "--resolution", str(args.resolution), "--object-store-mb", str(args.object_store_mb)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "RESNET_HPO_CACHE": str(cache)})
    out, err = driver.communicate()
    sampler.stop.set()
    sampler.join()
    if driver.returncode:
        raise SystemExit(f"search on {source} failed:\n{out}\n{err}")
    return dict(json.loads(out.strip().splitlines()[-1])), sampler.peaks, driver.pid


def data_path_child(key: str, mode: str) -> None:
    """RssAnon and RssFile before and after the data path of `fit` (DeviceImages of train
    and val, one pass of batches over each), from the mapped file or an in-memory copy."""
    before = proc_status(os.getpid())
    data = DecodedData(key).open()
    splits = [data.train, data.val]
    if mode == "memory":
        splits = [Split(np.array(split.images), np.array(split.labels)) for split in splits]
    for split in splits:
        images = DeviceImages(split, torch.device("cpu"))
        steps = len(images) // SEARCH_BATCH
        for uint8, _ in images.batches(torch.randperm(len(images))[:steps * SEARCH_BATCH]
                                       .view(steps, SEARCH_BATCH)):
            uint8.float().div_(255)
    after = proc_status(os.getpid())
    print(json.dumps({f"{k}_{when}": v for when, status in (("before", before),
                                                             ("after", after))
                      for k, v in status.items()}))


def search(args: argparse.Namespace) -> None:
    image_bytes = 3 * args.resolution**2
    count = math.ceil(2 * args.object_store_mb * MIB / image_bytes)
    data_mib = count * image_bytes / MIB
    print(f"data scale --search: Ray object store {args.object_store_mb} MiB; {count} generated "
          f"images at {args.resolution}px = {data_mib:.0f} MiB decoded "
          f"({data_mib / args.object_store_mb:.1f}x the object store); 2 trials of 1 epoch, fc "
          f"only, batch {SEARCH_BATCH}, 1 CPU each; processes mapping the data sampled every "
          "0.25 s", flush=True)
    with tempfile.TemporaryDirectory(prefix="data-scale-search-") as tmp_name:
        tmp = Path(tmp_name)
        images = write_images(tmp / "images", count, args.resolution)
        result, peaks, driver_pid = one_search(tmp, f"imagefolder:{images}", args)
        workers = {pid: peak for pid, peak in peaks.items() if pid != driver_pid}
        print(f"search: {result['seconds']:.0f} s, trials {result['statuses']}; driver peak RSS "
              f"{result['peak_rss_mib']:.0f} MiB, its map of {IMAGES_FILE}: Rss "
              f"{peaks.get(driver_pid, {}).get('map_Rss', 0) / 1024:.1f} MiB (it never reads "
              "the pixels)", flush=True)
        for pid, peak in sorted(workers.items()):
            print(f"  trial worker {pid}: peak VmRSS {peak['VmRSS'] / 1024:.0f} MiB = RssAnon "
                  f"{peak['RssAnon'] / 1024:.0f} + RssFile {peak['RssFile'] / 1024:.0f} + "
                  f"RssShmem {peak['RssShmem'] / 1024:.0f}; its map of {IMAGES_FILE}: Rss "
                  f"{peak['map_Rss'] / 1024:.0f} MiB, Anonymous {peak['map_Anonymous']} KiB, "
                  f"Private_Dirty {peak['map_Private_Dirty']} KiB")
        if not workers:
            raise SystemExit("no trial worker was seen mapping the data")
        if set(result["statuses"]) != {"TERMINATED"}:
            raise SystemExit("the search did not finish every trial")
        [key] = [p.name for p in (tmp / "runs" / "scale" / "data").iterdir()]
        grown = {}
        for mode in ("mapped", "memory"):
            child = run_child("--data-path", key, mode,
                              env={"RESNET_HPO_CACHE": str(tmp / "cache")})
            grown[mode] = {k: (child[f"{k}_after"] - child[f"{k}_before"]) / 1024
                           for k in ("RssAnon", "RssFile")}
    print(f"the trial's data path alone (DeviceImages of train and val, one pass of batches), "
          f"{data_mib:.0f} MiB of data: from the mapped file RssAnon "
          f"{grown['mapped']['RssAnon']:+.0f} MiB, RssFile {grown['mapped']['RssFile']:+.0f} "
          f"MiB; from an in-memory copy (the path before) RssAnon "
          f"{grown['memory']['RssAnon']:+.0f} MiB")
    private = max(p["map_Anonymous"] + p["map_Private_Dirty"] for p in workers.values())
    print(f"trial workers' private pages of {IMAGES_FILE}: {private} KiB (its pages are the "
          f"page cache's); anonymous memory of the data path: "
          f"{grown['mapped']['RssAnon']:+.0f} MiB mapped, {grown['memory']['RssAnon']:+.0f} MiB "
          f"with a copy, for {data_mib:.0f} MiB of data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5000,20000,80000")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batches", type=int, default=200, help="per repeat, at most")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: this process's CPU time, fair on a shared machine")
    parser.add_argument("--search", action="store_true")
    parser.add_argument("--object-store-mb", type=int, default=80)
    parser.add_argument("--data-path", nargs=2, metavar=("KEY", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--decode", metavar="ROOT", help=argparse.SUPPRESS)
    parser.add_argument("--search-driver", nargs=2, metavar=("SOURCE", "RUNS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.decode:
        decode_child(Path(args.decode), args.resolution)
    elif args.search_driver:
        search_driver(args.search_driver[0], Path(args.search_driver[1]), args.resolution,
                      args.object_store_mb)
    elif args.data_path:
        data_path_child(*args.data_path)
    elif args.search:
        search(args)
    else:
        scale(args)


if __name__ == "__main__":
    main()
