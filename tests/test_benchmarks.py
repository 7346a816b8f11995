"""Smoke runs of the benchmark scripts on the CPU, with a handful of tiny images."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainable import Split
from trainable.train import DeviceImages

REPO = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--resolution", "16", "--batch-size", "8", "--steps", "2",
        "--epochs", "1"]


def run_script(name: str, *args: str) -> list[str]:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / name), *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()


@pytest.mark.slow
def test_throughput_data_only_prints_a_ratio() -> None:
    lines = run_script("throughput.py", *TINY, "--data-only", "--repeats", "1")
    assert re.fullmatch(r"ratio: \d+\.\d\d", lines[-1])
    assert any(line.startswith("ours: decode once") for line in lines)


@pytest.mark.slow
def test_throughput_training_prints_a_ratio() -> None:
    lines = run_script("throughput.py", *TINY, "--repeats", "1")
    assert re.fullmatch(r"ratio: \d+\.\d\d", lines[-1])
    assert any("first epoch" in line for line in lines)


@pytest.mark.slow
def test_packing_runs_concurrent_trial_processes() -> None:
    lines = run_script("packing.py", *TINY, "--trials", "1,2")
    rows = [line.split() for line in lines if re.match(r"\s*[12] ", line)]
    assert [row[0] for row in rows] == ["1", "2"]
    assert all(float(row[1]) > 0 for row in rows)
    assert re.fullmatch(r"ratio \(2 trials vs 1\): \d+\.\d\d", lines[-1])


@pytest.mark.slow
def test_data_scale_prints_the_driver_memory_and_mapped_throughput_ratios() -> None:
    lines = run_script("data_scale.py", "--sizes", "300,600", "--batches", "1", "--repeats", "1")
    assert re.fullmatch(r"driver peak RSS at N=600 / N=300: \d+\.\d\d \(at most 1\.3\)",
                        lines[-2])
    assert re.fullmatch(r"mapped / in-memory data-only images/s, lowest over N: \d+\.\d\d "
                        r"\(at least 0\.8\)", lines[-1])
    rows = [line.split() for line in lines if re.match(r"\s*(300|600) ", line)]
    assert [row[0] for row in rows] == ["300", "600"]
    assert all(float(row[2]) > 100 for row in rows)  # peak RSS MiB: imports included


def test_results_writer_replay_prints_a_growth() -> None:
    lines = run_script("results_writer.py", "--trials", "20", "--epochs", "5")
    assert re.fullmatch(r"growth: \d+\.\d\d", lines[-1])
    assert float(lines[-1].split()[1]) > 0
    assert any(line.startswith("final flush (100 epoch rows, 20 trials)") for line in lines)


def test_benchmarks_and_trainable_import_neither_ray_nor_optuna() -> None:
    """The GPU machines that run the benchmarks have no Ray, Optuna or project install."""
    check = ("import sys; "
             "import benchmarks.throughput, benchmarks.packing, benchmarks.data_scale, "
             "trainable.train; "
             "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
             "('ray', 'optuna', 'search')); print(bad); sys.exit(bool(bad))")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr


def test_device_images_gather_the_requested_rows_and_labels() -> None:
    images = np.arange(6 * 3 * 2 * 2, dtype=np.uint8).reshape(6, 3, 2, 2)
    split = Split(images, np.array([5, 4, 3, 2, 1, 0]))
    device_images = DeviceImages(split, torch.device("cpu"))
    [(batch, labels)] = device_images.batches([torch.tensor([4, 1])])
    assert torch.equal(batch, torch.from_numpy(images[[4, 1]]))
    assert labels.tolist() == [1, 4]
