"""Shared fixtures: small generated data, weights files, and nothing from the network."""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import resnet18

from trainable import Dataset, Split, configure_torch

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


@pytest.fixture(autouse=True, scope="session")
def _torch_configured() -> None:
    """The tests call `fit` directly, so they set up torch as the CLI and a trial do."""
    configure_torch()


@pytest.fixture(autouse=True, scope="session")
def _ray_workers_at_normal_priority() -> Iterator[None]:
    """Ray starts its workers at niceness 15: on a machine busy with anything else, the
    tests' trials would get a few percent of a core and every timed step would crawl. The
    tests' Ray instances (in process and in the searches they start) run them at the
    tests' own priority, as Ray's job submission does for its drivers."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_worker_niceness", "0")
        yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoded-image caches go to a temporary directory, never the user's home."""
    monkeypatch.setenv("RESNET_HPO_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def write_class_tree(root: Path, per_class: int, size: int = 20, seed: int = 0) -> Path:
    """root/<colour>/<i>.png: noisy images whose mean colour gives the class."""
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(rgb, 40, (size, size + 4, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def flat_tree(tmp_path: Path) -> Path:
    """A class-per-folder tree with no split folders (10 images a class)."""
    return write_class_tree(tmp_path / "flat", per_class=10)


@pytest.fixture
def split_tree(tmp_path: Path) -> Path:
    """train/ val/ test/ folders, each class-per-folder."""
    root = tmp_path / "split"
    for split, n, seed in (("train", 8, 0), ("val", 3, 1), ("test", 4, 2)):
        write_class_tree(root / split, per_class=n, seed=seed)
    return root


def tiny_dataset(resolution: int = 16, n_train: int = 24, n_val: int = 12,
                 num_classes: int = 3, seed: int = 0) -> Dataset:
    """Random uint8 images whose class is their brightest channel: fast and learnable."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> Split:
        labels = np.arange(n) % num_classes
        images = rng.integers(0, 80, (n, 3, resolution, resolution), dtype=np.uint8)
        images[np.arange(n), labels % 3] += 150
        return Split(images, labels.astype(np.int64))

    return Dataset("tiny", resolution, [f"c{i}" for i in range(num_classes)],
                   split(n_train), split(n_val), split(n_val))


@pytest.fixture
def tiny() -> Dataset:
    return tiny_dataset()


@pytest.fixture(scope="session")
def resnet18_weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision ResNet18 state dict (random weights, 1000-class fc), as a user would
    save ImageNet weights for an air-gapped cluster."""
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.manual_seed(123)
    torch.save(resnet18().state_dict(), path)
    return path


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for the whole test session: 4 CPU slots and one declared GPU (none is
    there: trials given a GPU share fall back to the CPU), so fractional-GPU packing is
    testable on a GPU-less machine. `resnet-hpo search` joins it instead of starting one."""
    import ray

    # address="local": always a new instance, never a cluster another process started
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False,
             log_to_driver=False, logging_level=logging.ERROR)
    yield
    ray.shutdown()


def patch_build_model(patch: pytest.MonkeyPatch, build: Callable[..., Any]) -> None:
    """`fit` builds its models with `build` (as trainable.model.build_model), and keeps them
    in a cache of built models (trainable.model.initial_model) that ends with the patch."""
    import trainable.model as model_module

    patch.setattr(model_module, "_initial", {})
    patch.setattr(model_module, "build_model", build)


def search_space_file(tmp_path: Path, max_epochs: int = 2, grace_period: int = 1,
                      extra_fixed: str = "") -> Path:
    """A tiny space for searches in tests: 8px digits, two searched keys."""
    path = tmp_path / "space.yaml"
    path.write_text(f"""
metric: val_acc
scheduler: {{name: asha, max_epochs: {max_epochs}, grace_period: {grace_period},
            reduction_factor: 2}}
resources: {{cpus_per_trial: 1}}
fixed: {{resolution: 8, weights: none, batch_size: 128{extra_fixed}}}
search:
  lr:              {{type: float, low: 0.01, high: 0.3, log: true}}
  label_smoothing: {{type: float, low: 0.0, high: 0.2}}
""")
    return path


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """What `resnet-hpo ARGV` printed when it exited with a usage error: one line."""
    from search.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("resnet-hpo: error: "), err
    return err


def checkpoint_rows(run: Path) -> dict[str, list[dict[str, Any]]]:
    """trial_id -> the epoch rows in its latest checkpoint (epochs.json), read from the trial
    folders of a run directory. A trial writes its checkpoint before its report reaches the
    driver, so this is current while epochs.parquet (flushed every few seconds) is not. A
    checkpoint still being copied is skipped."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for trial_dir in run.glob("trial_*"):
        trial_id = trial_dir.name.removeprefix("trial_")
        for checkpoint in trial_dir.glob("checkpoint_*"):
            try:
                saved = json.loads((checkpoint / "epochs.json").read_text())
            except (OSError, ValueError):
                continue
            if saved and saved[-1]["epoch"] > max((r["epoch"] for r in rows.get(trial_id, [])),
                                                  default=0):
                rows[trial_id] = saved
    return rows


def reported_epochs(run: Path) -> dict[str, int]:
    """trial_id -> the last epoch its checkpoints hold."""
    return {trial_id: rows[-1]["epoch"] for trial_id, rows in checkpoint_rows(run).items()}


def descendant_processes(pid: int | None = None) -> dict[int, str]:
    """pid -> command line of every live descendant of `pid` (default: this process), from
    /proc. The test session's Ray runs under this process, so its trial workers are here and
    no other session's are."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:  # the command name may hold spaces and parentheses: split after the last ')'
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1]
                                               .split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = {}, [os.getpid() if pid is None else pid]
    while frontier:
        parent = frontier.pop()
        for child in [c for c, p in parents.items() if p == parent]:
            try:
                found[child] = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(
                    b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            frontier.append(child)
    return found


def trial_worker_pids(pid: int | None = None) -> list[int]:
    """The Ray workers running a trial (the `ray::ImplicitFunc` actors) under `pid`."""
    return [p for p, cmd in descendant_processes(pid).items() if "ImplicitFunc" in cmd]


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    """The process is frozen (SIGSTOP) inside the block and goes on after it, if alive. A
    stopped driver lets each trial finish at most the epoch it is in: a trial's report waits
    for the driver to take it."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def all_at_the_node_lock(monkeypatch: pytest.MonkeyPatch, threads: int) -> Callable[[], None]:
    """A wait that returns once `threads` threads have asked for trainable.data_file's node
    lock (fcntl.flock): called by the thread holding it, it makes the others wait on the lock
    for as long as the holder works, however the threads are scheduled."""
    import fcntl
    import threading

    asked = threading.Condition()
    count = 0
    flock = fcntl.flock

    def counting_flock(fd: Any, operation: int) -> None:
        nonlocal count
        if operation == fcntl.LOCK_EX:
            with asked:
                count += 1
                asked.notify_all()
        flock(fd, operation)

    def wait() -> None:
        with asked:
            assert asked.wait_for(lambda: count >= threads, timeout=60), count

    monkeypatch.setattr(fcntl, "flock", counting_flock)
    return wait
