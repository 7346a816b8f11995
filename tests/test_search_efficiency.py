"""benchmarks/search_efficiency.py: epochs to reach a target, and a tiny end-to-end run."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
from optuna.distributions import FloatDistribution

from benchmarks.search_efficiency import (
    TASK,
    best_so_far,
    epochs_to_reach,
    main,
    median_ratio,
    ratio,
)
from spaces import load_space
from tests.conftest import search_space_file


def rows(*epochs: tuple[float, float]) -> list[dict[str, Any]]:
    """(end_time, val_acc) pairs, shuffled out of order as epochs.parquet may hold them."""
    return [{"trial_id": "t", "end_time": end, "val_acc": acc} for end, acc in reversed(epochs)]


def test_epochs_are_counted_in_the_order_they_ended() -> None:
    spent = rows((1.0, 0.2), (2.0, 0.5), (3.0, 0.4), (4.0, 0.9), (5.0, 0.7))
    assert best_so_far(spent) == [0.2, 0.5, 0.5, 0.9, 0.9]
    assert epochs_to_reach(spent, 0.5) == 2
    assert epochs_to_reach(spent, 0.6) == 4
    assert epochs_to_reach(spent, 0.9) == 4
    assert epochs_to_reach(spent, 0.95) is None


def test_unscored_epochs_are_spent_but_reach_nothing() -> None:
    spent = rows((1.0, math.nan), (2.0, 0.3))
    spent.append({"trial_id": "u", "end_time": 1.5, "val_acc": None})
    assert best_so_far(spent)[:2] == [-math.inf, -math.inf]
    assert epochs_to_reach(spent, 0.3) == 3
    assert epochs_to_reach([], 0.0) is None


def test_the_median_ratio_counts_a_seed_that_never_reached_the_target_as_the_worst() -> None:
    assert ratio(6, 8) == 0.75 and ratio(None, 8) == math.inf
    assert median_ratio([0.5, math.inf, 0.7]) == "0.70"
    assert median_ratio([0.4, 0.6]) == "0.50"
    assert median_ratio([0.5, math.inf]) == "never"
    assert median_ratio([0.5, 0.6, math.inf, math.inf]) == "never"


def test_the_benchmark_task_is_a_space_with_a_bad_lr_region() -> None:
    space = load_space(str(TASK))
    lr = next(p.distribution for p in space.params if p.name == "lr")
    assert space.config({}).val_fraction == 0.5 and space.scheduler.max_epochs == 3
    assert lr == FloatDistribution(1e-4, 1.0, log=True)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.long
def test_three_searches_print_the_ratio(tmp_path: Path, ray_session: None,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    space = search_space_file(tmp_path, max_epochs=1, grace_period=1)
    main(["--space", str(space), "--trials", "1", "--resolution", "8", "--repeats", "1",
          "--retrain-seeds", "1", "--output", str(tmp_path / "out")])
    out = capsys.readouterr().out
    for strategy in ("tpe+asha", "random+asha", "random+fifo"):
        assert re.search(rf"  ran {re.escape(strategy)} seed 0: 1 epochs, \d+ s, hands over "
                         r"test_acc 0\.\d{4}\n", out), strategy
    lines = out.splitlines()
    assert re.fullmatch(r"epochs ratio \(tpe\+asha / random\+fifo\), median of 1 seed: "
                        r"(\d+\.\d\d|never)", lines[-6])
    assert re.fullmatch(r"handed-over \(tpe\+asha - random\+asha\), mean of 1 seed: "
                        r"[+-]\d\.\d{4} \+- 0\.0000", lines[-1])
    assert (tmp_path / "out" / "search_efficiency.png").stat().st_size > 0
    assert (tmp_path / "out" / "search_efficiency.txt").read_text().startswith("# ")
