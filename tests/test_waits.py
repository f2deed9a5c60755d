"""The suite's own waits: a stall limit that restarts on progress, a hard cap, useful failures."""

from __future__ import annotations

import itertools
import time

import pytest

from tests.conftest import wait_for


def test_plain_wait_returns_the_first_truthy_value() -> None:
    calls = itertools.count()
    assert wait_for(lambda: next(calls) >= 3 and "done", 5, "three calls", interval=0.001) == "done"


def test_plain_wait_fails_naming_what_it_waited_for() -> None:
    with pytest.raises(AssertionError, match=r"timed out after 0s waiting for nothing"):
        wait_for(lambda: None, 0.05, "nothing", interval=0.01)


def test_progress_restarts_the_stall_limit_so_a_slow_run_is_waited_for() -> None:
    start = time.monotonic()
    elapsed = lambda: time.monotonic() - start  # noqa: E731
    # Done after 0.5 s, far past the 0.2 s stall limit, but it moves every 0.05 s.
    value = wait_for(lambda: elapsed() > 0.5, 0.2, "a slow run", interval=0.01, progress=lambda: int(elapsed() * 20))
    assert value is True


def test_a_run_that_stops_moving_fails_after_the_stall_limit_with_its_context() -> None:
    with pytest.raises(AssertionError, match=r"waiting for a stuck run: no progress for 0s") as err:
        wait_for(lambda: None, 0.2, "a stuck run", interval=0.01, progress=lambda: "step 7", context=lambda: "LOG")
    assert "last progress step 7" in str(err.value) and str(err.value).endswith("\nLOG")


def test_a_livelock_that_keeps_moving_fails_at_the_hard_cap() -> None:
    ticks = itertools.count()
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"still moving at the hard cap"):
        wait_for(lambda: None, 0.2, "a crash loop", interval=0.01, progress=lambda: next(ticks), cap=0.3)
    assert time.monotonic() - start < 2
