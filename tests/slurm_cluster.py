"""A real single-node SLURM on this machine, for the end-to-end tests: Debian's munge, slurmctld and slurmd.

Use it from a test module with ``from tests.slurm_cluster import slurm_cluster  # noqa: F401``
(a session-scoped fixture: one cluster per test process, started on first use, stopped at the end).

What the fixture does:

1. Installs the Debian packages (``slurmctld slurmd slurm-client munge``) with ``apt-get`` when
   a program is missing (:mod:`tests.debtools`: one lock for every test process, no service
   started by the packages). Where that is impossible (not root, no apt-get, no package source)
   the test is skipped with the reason; nothing else skips.
2. Writes a private cluster into a temporary folder: a munge key and socket, a ``slurm.conf``
   with ports chosen free on localhost, its own state, spool, pid and log files. Nothing in
   ``/etc`` is used or changed, so several clusters (other test processes, other checkouts)
   run side by side; every client command gets ``SLURM_CONF`` from :attr:`SlurmCluster.env`.
3. Starts ``munged``, ``slurmctld`` and ``slurmd`` in the foreground as children and waits for
   ``sinfo`` to show the node idle.
4. At the end cancels every job, waits for them to leave, stops the daemons (SIGTERM, then
   SIGKILL after a deadline) and kills any ``slurmstepd`` of this cluster that outlived its
   slurmd (found by its socket in this cluster's spool folder): nothing is left running.

The node advertises more CPUs than the machine has (``SlurmdParameters=config_overrides``)
so that a few small jobs, and two-task jobs, run at the same time.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from filelock import FileLock

from supervisor.host import poll_until
from tests import debtools
from tests.pacing import pacing_env

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel")
NODE = "vitnode"
NODE_CPUS = 8
"""CPUs the node advertises (more than the machine has: the jobs here mostly wait)."""
CRED_EXPIRE_S = 10
"""SLURM holds a requeued job back for the job credential's lifetime (+1 s; default 120 s): the node
refuses to start a job whose previous run's credential it revoked ("Job credential revoked").
Shortened so that a requeued job starts again about 11 s after its requeue, by SLURM's own rules."""
SLURM_CONF = """\
ClusterName=vittest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire={cred_expire_s}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=300
KillWait=30
OverTimeLimit=0
InactiveLimit=0
SlurmctldTimeout=10
SlurmdTimeout=60
NodeName={node} NodeAddr=127.0.0.1 NodeHostname={hostname} CPUs={cpus} RealMemory=1024 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""
"""KillWait is SLURM's default (30 s from SIGTERM to SIGKILL at a cancel or the time limit: the
worker saves within it); MinJobAge keeps finished jobs visible to ``scontrol show job``."""


def _missing() -> list[str]:
    return [p for p in PROGRAMS if shutil.which(p) is None]


def ensure_installed() -> None:
    """Install Debian's SLURM and munge when a program is missing; ``pytest.skip`` only where that is impossible.

    Through :mod:`tests.debtools`: its one lock for every apt-get of the test processes, and its
    ``policy-rc.d`` that keeps the packages from starting system-wide munged/slurmctld/slurmd services.
    """
    if not _missing():
        return
    with FileLock(str(debtools._LOCK), timeout=debtools._APT_TIMEOUT_S):
        if not _missing():  # another test process installed them meanwhile
            return
        why = debtools._install(list(PACKAGES))
    if _missing():
        pytest.skip(f"SLURM is missing ({', '.join(_missing())}) and could not be installed: {why or 'not on PATH'}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SlurmCluster:
    """A private SLURM cluster in ``root``: daemons, configuration and client commands."""

    root: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "sock" / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for name in list(self.env):  # a test process inside an allocation must not leak its job into these
            if name.startswith("SLURM_") and name != "SLURM_CONF":
                del self.env[name]

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        d = self.root
        for sub in ("munge", "sock", "state", "spool", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "munge").chmod(0o700)
        (d / "sock").chmod(0o755)  # munged insists that everyone may reach its socket
        key = d / "munge" / "munge.key"
        self._run(["mungekey", "--create", "--keyfile", str(key)])
        self.conf.write_text(
            SLURM_CONF.format(
                d=d,
                ctld_port=_free_port(),
                slurmd_port=_free_port(),
                munge_socket=self.munge_socket,
                cred_expire_s=CRED_EXPIRE_S,
                node=NODE,
                hostname=socket.gethostname(),
                cpus=NODE_CPUS,
            )
        )
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={d / 'munge' / 'munged.pid'}",
                f"--log-file={d / 'log' / 'munged.log'}",
                f"--seed-file={d / 'munge' / 'munged.seed'}",
            ],
        )
        self._wait(lambda: self.munge_socket.exists(), 30, "munged's socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self._wait(lambda: "UP" in self._quiet(["scontrol", "ping"]), 60, "slurmctld to answer")
        self._spawn("slurmd", ["slurmd", "-D", "-N", NODE])
        self._wait(lambda: self.node_state() == "idle", 90, f"node {NODE} idle in sinfo")

    def stop(self) -> None:
        """Cancel every job, stop the daemons, kill this cluster's leftover ``slurmstepd`` processes."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self._quiet(["scancel", "--full", "--user", "root"])
            poll_until(lambda: self._quiet(["squeue", "-h", "-o", "%i"]).strip() == "", 45, interval=0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for p in self._stepds():
            try:
                p.kill()
            except psutil.Error:
                pass

    def _stepds(self) -> list[psutil.Process]:
        """This cluster's ``slurmstepd`` processes: those with a socket in its spool folder."""
        spool = f"{self.root / 'spool'}/"
        found = []
        for p in psutil.process_iter(["name"]):
            try:
                if p.info["name"] == "slurmstepd" and any(
                    isinstance(c.laddr, str) and c.laddr.startswith(spool) for c in p.net_connections("unix")
                ):
                    found.append(p)
            except psutil.Error:
                continue
        return found

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "wb")  # noqa: SIM115 - the child keeps it
        self.procs[name] = subprocess.Popen(
            argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )

    def _wait(self, ready: Any, timeout: float, what: str) -> None:
        def check() -> bool:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}:\n{self.logs()}")
            return bool(ready())

        if not poll_until(check, timeout, interval=0.2):
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}:\n{self.logs()}")

    def logs(self, n: int = 2000) -> str:
        parts = []
        for p in sorted((self.root / "log").glob("*")):
            try:
                parts.append(f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}")
            except OSError:
                pass
        return "\n".join(parts)

    # ------------------------------------------------------------------ client commands

    def _run(self, argv: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=timeout)

    def _quiet(self, argv: Sequence[str]) -> str:
        """stdout of a client command, "" when it fails (for polling)."""
        try:
            done = self._run(argv, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout if done.returncode == 0 else ""

    def run(self, *argv: str, timeout: float = 60) -> str:
        """A client command's stdout; raises with its stderr when it fails."""
        done = self._run(argv, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def node_state(self) -> str:
        return self._quiet(["sinfo", "-h", "-N", "-n", NODE, "-o", "%T"]).strip()

    def job_env(self, base: Path, pace_s: float, *, oom_array_task: int | None = None) -> dict[str, str]:
        """The environment a test's jobs inherit: the worker's, paced in first allocations at ``pace_s``
        seconds per training forward, with the first worker of array task ``oom_array_task`` out of
        memory (tests/pacing.py), a private state home, this cluster's slurm.conf and none of an
        enclosing job's SLURM_ variables."""
        from tests.conftest import PYTHON, worker_env

        env = worker_env(
            **pacing_env(base, pace_s, oom_array_task=oom_array_task),
            VIT_SUPERVISOR=f"{PYTHON} -m supervisor.cli",
            XDG_STATE_HOME=str(base / "xdg"),
            SLURM_CONF=str(self.conf),
        )
        env.pop("STATE_DIRECTORY", None)
        for name in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            del env[name]
        return env

    def sbatch(self, script: Path, *options: str, args: Sequence[str] = (), env: dict[str, str] | None = None) -> str:
        """Submit ``script`` with its ``args`` (``options`` override its ``#SBATCH`` lines); return the
        job id (an array's id for ``--array``). ``env`` is what the job inherits (sbatch's default)."""
        job_env = dict(env if env is not None else self.env, SLURM_CONF=str(self.conf))
        done = subprocess.run(
            ["sbatch", "--parsable", *options, str(script), *args],
            env=job_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"sbatch {script} exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (``{}`` when the job is unknown). An array's id gives its
        first task; use ``ARRAYJOB_TASK`` for one task."""
        out = self._quiet(["scontrol", "show", "job", "-o", job_id])
        line = out.strip().splitlines()[0] if out.strip() else ""
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def start_now(self, job_id: str) -> None:
        """``scontrol update StartTime=now``: not needed here (:data:`CRED_EXPIRE_S` keeps the requeue
        delay short), and racy right after a requeue: the node may still refuse the job ("Job
        credential revoked") and SLURM then fails it."""
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A running single-node SLURM for this test process; stopped (nothing left running) at the end."""
    ensure_installed()
    # A short root: SLURM and munge put socket paths under it (a Unix socket path has ~100 bytes).
    root = Path(tmp_path_factory.mktemp("slurm", numbered=True))
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
