"""bench/step_cost.py's arithmetic: which 10-step intervals are steady state and which are not."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from step_cost import step_times


def test_intervals_after_the_standby_is_ready_are_steady_and_those_before_are_not() -> None:
    # 10-step intervals: 2 s each while the standby prepares (until t=4), then 1 s each.
    rows = [(10, 0.0), (20, 2.0), (30, 4.0), (40, 5.0), (50, 6.0), (60, 7.0)]
    got = step_times(rows, ready=4.0)
    assert got["first"] == pytest.approx(0.2)
    assert got["steady"] == pytest.approx(0.1)
    assert got["train"] == pytest.approx(7.0 / 50)
    assert got["ready_after"] == pytest.approx(4.0)
    assert got["steps"] == 60


def test_an_evaluation_inside_one_interval_does_not_move_the_median() -> None:
    rows = [(10, 0.0), (20, 1.0), (30, 2.0), (40, 8.0), (50, 9.0), (60, 10.0)]
    got = step_times(rows, ready=None)
    assert got["steady"] == got["first"] == pytest.approx(0.1)
    assert got["train"] == pytest.approx(10.0 / 50)
