"""worker/rng.py: the RNG states at the last step boundary, read cheaply and never guessed."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch

from worker.rng import BoundaryRng
from worker.trainer import snapshot_rng


def draws() -> tuple[float, float, float]:
    """One draw from each generator (what a resumed step would draw next)."""
    return random.random(), float(np.random.random()), float(torch.rand(1))


def restore(states: dict[str, Any]) -> None:
    """What ``Trainer._load_rng_state`` does with ``rng_state.pth`` on the CPU."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.random.set_rng_state(states["cpu"])


@pytest.fixture(autouse=True)
def seeded() -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)


def test_quiet_host_generators_are_read_once_and_still_exact_after_a_torch_draw() -> None:
    rng = BoundaryRng(recheck_steps=50, cuda=False)
    rng.reset()
    for _ in range(5):
        torch.rand(3)  # a step's forward draws from torch only
        rng.capture()
    expected = snapshot_rng()
    torch.rand(7)  # the failed step's forward, before the OOM
    got = rng.at_boundary()
    assert got is not None and not rng.volatile
    restore(got)
    after = draws()
    restore(expected)
    assert after == draws()


def test_a_host_draw_before_a_recheck_makes_the_state_unknown_not_wrong() -> None:
    rng = BoundaryRng(recheck_steps=50, cuda=False)
    rng.reset()
    rng.capture()
    random.random()  # a draw the next capture does not read
    rng.capture()
    assert rng.at_boundary() is None


def test_a_recheck_that_sees_host_draws_reads_them_at_every_boundary_from_then_on() -> None:
    rng = BoundaryRng(recheck_steps=3, cuda=False)
    rng.reset()
    for _ in range(3):
        rng.capture()
    np.random.random()
    rng.capture()  # the recheck: NumPy moved
    assert rng.volatile
    np.random.random()
    rng.capture()
    expected = snapshot_rng()
    np.random.random()  # drawn in the failed forward: must not leak into the boundary state
    got = rng.at_boundary()
    assert got is not None
    restore(got)
    after = draws()
    restore(expected)
    assert after == draws()


def test_a_reset_does_not_count_a_restored_state_as_movement() -> None:
    rng = BoundaryRng(recheck_steps=2, cuda=False)
    rng.reset()
    rng.capture()
    random.seed(99)  # the Trainer restoring a checkpoint's states after on_train_begin
    rng.reset()
    rng.capture()
    rng.capture()
    assert not rng.volatile
    assert rng.at_boundary() is not None


def test_nothing_is_known_before_the_first_capture() -> None:
    rng = BoundaryRng(cuda=False)
    rng.reset()
    assert rng.at_boundary() is None
