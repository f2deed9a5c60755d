"""How a worker is started: pure functions from a launch order and the config to argv and environment.

No processes here; :mod:`supervisor.daemon` spawns what these return through its host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from supervisor import protocol, slurm_env
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


def resolve(
    cfg: Config,
    environ: Mapping[str, str],
    look: slurm_env.Lookups = slurm_env.REAL,
) -> tuple[Config, slurm_env.Placement | None]:
    """The config as this node runs it, and where SLURM placed the node (None without ``from_slurm``).

    With ``distributed.from_slurm`` the ``distributed`` section is filled from SLURM's variables
    (:mod:`supervisor.slurm_env`). Called once, before the supervisor takes its lock, so that the
    node rank also picks the node's own state, logs and locks (``run/node-K/``), exactly as a config
    that gives ``node_rank`` does. Raises ConfigError (one line) outside SLURM or on inconsistent
    variables, before anything is written.
    """
    if not cfg.distributed.from_slurm:
        return cfg, None
    placed = slurm_env.placement(environ, cfg.distributed, look)
    dist = dataclasses.replace(
        cfg.distributed,
        # Resolved: the values below are SLURM's, and they now stand in the config like given ones.
        from_slurm=False,
        nnodes=placed.nnodes,
        node_rank=placed.node_rank,
        nproc_per_node=placed.nproc_per_node,
        rdzv_endpoint=placed.rdzv_endpoint,
        rdzv_id=placed.job,
    )
    return dataclasses.replace(cfg, distributed=dist), placed


IGNORE_USR1 = (
    "import os, signal, sys; signal.signal(signal.SIGUSR1, signal.SIG_IGN); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)
"""Starts torchrun with SIGUSR1 ignored (the disposition survives ``exec``; same pid, same command line).

SLURM's pre-timeout signal without ``B:`` (``--signal=USR1@N``) reaches every process of the step:
the supervisor acts on it, the ranks take it as a stop at the step end (their own handler), but
torchrun has no handler and would die of it, orphaning ranks that are still saving. The ranks
install their handler at start; until then they inherit the ignore, which is harmless."""


def launcher_argv(cfg: Config, python: str) -> list[str]:
    """``python -m worker``, or torchrun around it with its own restarts off (one policy decides)."""
    if cfg.launcher != "torchrun":
        return [python, "-m", "worker"]
    d = cfg.distributed
    argv = [
        python,
        "-c",
        IGNORE_USR1,
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
