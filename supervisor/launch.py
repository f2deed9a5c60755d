"""How a worker is started: pure functions from a launch order and the config to argv and environment.

No processes here; :mod:`supervisor.daemon` spawns what these return through its host.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from supervisor import protocol
from supervisor.schema import Config

CLEAN_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")
"""systemd's variables are for the supervisor alone; a worker must never answer in its name."""


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env: dict[str, str]


def _base_env(environ: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in environ.items() if k not in CLEAN_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def launcher_argv(cfg: Config, python: str) -> list[str]:
    """``python -m worker``, or torchrun around it with its own restarts off (one policy decides)."""
    if cfg.launcher != "torchrun":
        return [python, "-m", "worker"]
    d = cfg.distributed
    argv = [
        python,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={d.nproc_per_node}",
        "--max-restarts=0",
        "--monitor-interval=0.5",
    ]
    if d.nnodes == 1:
        argv.append("--standalone")  # a free local port: several jobs may share the machine
    else:
        host, _, port = d.rdzv_endpoint.rpartition(":")
        # Static rendezvous: node ranks are the configured ones, so node 0 always holds rank 0.
        argv += [
            f"--nnodes={d.nnodes}",
            f"--node_rank={d.node_rank}",
            f"--master_addr={host}",
            f"--master_port={port}",
            f"--rdzv_id={d.rdzv_id or Path(cfg.training.output_dir).name}",
        ]
    return [*argv, "-m", "worker"]


def cold_start(order: protocol.LaunchOrder, cfg: Config, *, python: str, environ: Mapping[str, str]) -> Command:
    """A fresh worker (or torchrun) carrying ``order`` as flags and environment."""
    env = _base_env(environ)
    env.update(order.env())
    return Command([*launcher_argv(cfg, python), cfg.source_path, *order.argv()], env)


def standby(cfg: Config, *, python: str, environ: Mapping[str, str], supervisor_pid: int) -> Command:
    """A standby worker: prepares, then waits for a :class:`~supervisor.protocol.LaunchOrder` line on stdin."""
    env = _base_env(environ)
    env[protocol.ENV_SUPERVISOR_PID] = str(supervisor_pid)
    return Command([python, "-m", "worker", cfg.source_path, "--standby"], env)
