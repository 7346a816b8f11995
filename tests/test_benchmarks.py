"""Smoke runs of the benchmark scripts on the CPU, with a handful of tiny images."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from benchmarks.warm_start import main as warm_start_benchmark
from search.rundir import SEARCH_FILE, TRIALS_FILE
from tests.conftest import search_space_file
from trainable import Split
from trainable.device_images import DeviceImages

REPO = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--resolution", "16", "--batch-size", "8", "--steps", "2",
        "--epochs", "1"]


def run_script(name: str, *args: str) -> list[str]:
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{name.removesuffix('.py')}", *args],
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
def test_frozen_prints_the_depth_1_ratio_then_the_depth_0_ratio() -> None:
    lines = run_script("frozen.py", "--images", "32", "--resolution", "16", "--batch-size", "16",
                       "--epochs", "2", "--repeats", "1")
    assert re.fullmatch(r"depth 1 ratio: \d+\.\d\d \(target >= 1\.5\)", lines[-2])
    assert re.fullmatch(r"ratio: \d+\.\d\d", lines[-1])
    assert any(re.match(r"depth 0 \(fc only\): .* one-time cost [+-]\d", line) for line in lines)


@pytest.mark.slow
def test_transfer_quick_prints_both_tables_and_what_they_teach() -> None:
    lines = run_script("transfer.py", "--quick")
    strategies = ["scratch", "frozen", "partial", "full", "search"]
    headers = [i for i, line in enumerate(lines) if line.split() == ["target", "per", "class",
                                                                     *strategies]]
    assert len(headers) == 2  # test accuracy, then wall seconds
    for header in headers:
        rows = [line.split() for line in lines[header + 1:header + 3]]
        assert [row[:2] for row in rows] == [["similar", "10"], ["dissimilar", "10"]]
        assert all(len(row) == 2 + len(strategies) for row in rows)
    accuracies = [float(v) for line in lines[headers[0] + 1:headers[0] + 3]
                  for v in line.split()[2:]]
    assert all(0 <= acc <= 1 for acc in accuracies)
    assert re.fullmatch(r"  the search matched or beat every fixed strategy in \d of 2 cells, "
                        r"taking \d+\.\d\dx the time of the four fixed strategies together",
                        lines[-1])


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
             "benchmarks.frozen, "
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


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.long
def test_warm_start_benchmark_prints_the_ratio(tmp_path: Path, ray_session: None,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """In this process, on the session's Ray (a script of its own would start another)."""
    space = search_space_file(tmp_path, max_epochs=1, grace_period=1)
    storage = tmp_path / "runs"
    warm_start_benchmark(["--space", str(space), "--trials", "2", "--source-trials", "2",
                          "--warm-start-top", "1", "--repeats", "1", "--resolution", "8",
                          "--retrain-seeds", "1", "--storage", str(storage)])
    lines = capsys.readouterr().out.splitlines()
    for search in ("earlier seed 1000", "cold seed 0", "warm seed 0"):
        assert f"  ran {search}: 2 epochs, " in "\n".join(lines)
    assert re.fullmatch(r"  epochs ratio \(warm / cold\): (\d+\.\d\d|never)", lines[-2])
    assert re.fullmatch(r"epochs ratio \(warm / cold\), median of 1 seed: (\d+\.\d\d|never)",
                        lines[-1])
    source = pq.read_table(storage / "source-seed0" / TRIALS_FILE).to_pandas()
    best = source.sort_values(["best_metric", "trial_id"], ascending=[False, True]).trial_id
    warm = json.loads((storage / "warm-seed0" / SEARCH_FILE).read_text())["warm_start"]
    assert warm["run"] == str(storage / "source-seed0") and warm["enqueued"] == [best.iloc[0]]
    assert "warm_start" not in json.loads((storage / "cold-seed0" / SEARCH_FILE).read_text())


@pytest.mark.slow
def test_augment_prints_each_policy_and_size_then_a_ratio() -> None:
    lines = run_script("augment.py", "--sizes", "16,24", "--batch-size", "8", "--batches", "1",
                       "--repeats", "1")
    rows = [line.split() for line in lines if re.match(r"\s*\d+px ", line)]
    assert [(row[0], row[1]) for row in rows] == [
        ("16px", "trivial"), ("16px", "randaugment"), ("24px", "trivial"),
        ("24px", "randaugment")]
    assert re.fullmatch(r"ratio: \d+\.\d\d", lines[-1])


@pytest.mark.slow
@pytest.mark.parametrize("backbone", [
    "none", pytest.param("pretrained", marks=pytest.mark.long)])
def test_augment_value_prints_each_pieces_mean_and_paired_difference(backbone: str) -> None:
    lines = run_script("augment_value.py", "--backbone", backbone, "--source-epochs", "1",
                       "--seeds", "2", "--epochs", "1", "--per-class", "2")
    header = next(line for line in lines if line.startswith("augment_value:"))
    assert ("digits 32px from random weights" if backbone == "none"
            else "shapes 16px fine-tuned from transfer.py's backbone") in header
    table = lines[lines.index(next(line for line in lines if line.startswith("piece"))) + 1:]
    assert [line[:20].strip() for line in table] == ["none", "trivial", "randaugment",
                                                     "random erasing 0.25", "ema 0.95"]
    assert all(re.fullmatch(r".{20} +\d\.\d{4} +\d\.\d{4} +[+-]\d\.\d{4} +\d\.\d{4}", line)
               for line in table[1:])


def test_turnover_assigns_trials_to_slots_and_measures_the_gaps_between_them() -> None:
    """Two slots: a, b start together; c takes a's slot 2 s after a's last epoch, d takes
    b's 4 s after b's; utilisation is the epochs' seconds over 2 x the span."""
    from benchmarks.turnover import assign_slots, report, trial_times

    def epoch(trial_id: str, start: float, end: float) -> dict[str, object]:
        return {"trial_id": trial_id, "start_time": start, "end_time": end}

    rows = [epoch("a", 0, 10), epoch("a", 10, 20), epoch("b", 1, 11), epoch("c", 22, 32),
            epoch("d", 15, 25)]
    assert assign_slots(trial_times(rows)) == [["a", "c"], ["b", "d"]]
    lines = report(rows, None)
    assert lines[-3:-1] == ["   1        a        c     2.00", "   2        b        d     4.00"]
    # 50 s of epochs, 2 slots x a span of 32 s
    assert lines[-1] == "turnover median 3.00 s, p90 3.80 s, utilisation 0.78"
