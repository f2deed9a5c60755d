"""The supervisor's :class:`protocol.LaunchOrder` on the worker's side.

A cold start receives the order as flags and environment, a standby as its go
line; both become the same record and are applied the same way, so a standby
that takes over is configured exactly like a cold worker of that attempt.
"""

from __future__ import annotations

import os

from supervisor import protocol
from supervisor.schema import Config
from worker import fault


def from_cli(cfg: Config, *, resume: bool) -> protocol.LaunchOrder | None:
    """The order a supervisor gave through flags (already applied to ``cfg``) and environment;
    None for a run started by hand."""
    raw_pid = os.environ.get(protocol.ENV_SUPERVISOR_PID, "")
    if not raw_pid.isdigit():
        return None
    # The path as given, not this rank's: under torchrun each rank derives its own from it.
    report = os.environ.get(protocol.ENV_EXIT_REPORT) or str(protocol.exit_report_path(cfg.output_dir))
    return protocol.LaunchOrder(
        attempt=max(fault.attempt(), 1),
        exit_report=report,
        supervisor_pid=int(raw_pid),
        per_device_train_batch_size=cfg.training.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
        resume=resume,
    )


def apply(cfg: Config, order: protocol.LaunchOrder) -> None:
    """Make this process the worker the order describes: batch, accumulation, environment."""
    cfg.training.per_device_train_batch_size = order.per_device_train_batch_size
    cfg.training.gradient_accumulation_steps = order.gradient_accumulation_steps
    os.environ.update(order.env())
