"""A cold worker reads the same LaunchOrder from flags/env that a standby gets as its go."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from supervisor.schema import load_config
from tests.conftest import TINY
from worker import fault, launch


def test_cli_order_keeps_the_given_report_path_and_each_rank_derives_its_own_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    cfg = load_config(cfg_path)
    cfg.training.per_device_train_batch_size = 4  # as --per-device-train-batch-size 4 leaves it
    for k, v in {"VIT_SUPERVISOR_PID": "123", "VIT_ATTEMPT": "3", "VIT_EXIT_REPORT": "/r/exit-3.json"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    order = launch.from_cli(cfg, resume=True)
    assert order is not None
    assert (order.attempt, order.supervisor_pid, order.exit_report) == (3, 123, "/r/exit-3.json")
    assert order.per_device_train_batch_size == 4 and order.resume
    launch.apply(cfg, order)
    assert fault.exit_report_path(cfg.output_dir) == Path("/r/exit-3.rank1.json")


def test_a_run_started_by_hand_has_no_launch_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    monkeypatch.delenv("VIT_SUPERVISOR_PID", raising=False)
    assert launch.from_cli(load_config(cfg_path), resume=False) is None
