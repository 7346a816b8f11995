"""benchmarks/search_efficiency.py: epochs to reach a target, and a tiny end-to-end run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks.search_efficiency import best_so_far, epochs_to_reach, main
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


@pytest.mark.slow
@pytest.mark.ray
def test_three_searches_print_the_ratio(tmp_path: Path, ray_session: None,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    space = search_space_file(tmp_path, max_epochs=1, grace_period=1)
    main(["--space", str(space), "--trials", "1", "--resolution", "8",
          "--output", str(tmp_path / "out")])
    out = capsys.readouterr().out
    for strategy in ("tpe+asha", "random+asha", "random+fifo"):
        assert f"  ran {strategy} seed 0: 1 epochs" in out
    assert "epochs ratio (tpe+asha / random+fifo): " in out.splitlines()[-1]
    assert (tmp_path / "out" / "search_efficiency.png").stat().st_size > 0
    assert (tmp_path / "out" / "search_efficiency.txt").read_text().startswith("# ")
