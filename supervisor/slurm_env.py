"""Where this supervisor sits in a SLURM job, read from SLURM's environment variables.

With ``launcher: torchrun`` and ``distributed.from_slurm: true``, each ``srun`` task runs one
``vit-supervisor start CONFIG``, and each such task is one torchrun *node*:

- **nnodes, node_rank.** Normally one task per node (``srun --ntasks-per-node=1``): nnodes is
  the step's node count (``SLURM_STEP_NUM_NODES``, else ``SLURM_NNODES`` /
  ``SLURM_JOB_NUM_NODES``) and node_rank is ``SLURM_NODEID``. When several tasks share a node
  (more tasks than nodes: e.g. two "nodes" on one test machine), ``SLURM_NODEID`` is the same for
  all of them, so the tasks are the nodes: nnodes is the task count and node_rank is the task's
  ``SLURM_PROCID``, unique within the step (``SLURM_LOCALID`` only numbers tasks within a node).
  Run straight from the batch script (no ``srun``) there is one supervisor, which suits a
  one-node job only.
- **Rendezvous host.** The first host of the step's node list (``SLURM_STEP_NODELIST``, else
  ``SLURM_JOB_NODELIST``), where task 0 (node rank 0) runs under SLURM's block and cyclic
  distributions. The compact form (``gpu[01-04]``) is expanded by ``scontrol show hostnames``;
  where scontrol is missing (containers) by :func:`expand_nodelist`.
- **Rendezvous id and port.** The id is the job's (``ARRAYJOB_TASK`` for an array task), which a
  requeue keeps. The port is ``distributed.rdzv_endpoint``'s when the config gives one, else one
  derived from the job id, so that two jobs sharing node 0 do not meet at the same port.
- **Processes per node.** ``SLURM_GPUS_ON_NODE`` when SLURM allocated GPUs (``--gpus-per-node``):
  one rank per GPU. Without GPUs (CPU and gloo), ``distributed.nproc_per_node``: SLURM has no
  rank count to offer there (``SLURM_NTASKS_PER_NODE`` counts the supervisors, one per node, and
  ``SLURM_CPUS_ON_NODE`` counts cores).

Everything here is a pure function of an environment mapping (and a host-list expander), so the
unit tests drive it with dicts; inconsistent variables are :class:`~supervisor.schema.ConfigError`
with one line naming the variables.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from supervisor.schema import DEFAULT_RDZV_ENDPOINT, ConfigError, DistributedConfig

PORT_BASE = 29500
PORT_SPAN = 2000
"""A default rendezvous port is ``PORT_BASE + job id % PORT_SPAN``: torchrun's usual 29500 and up."""

SRUN_HINT = "srun --ntasks-per-node=1 vit-supervisor start CONFIG"


@dataclass(frozen=True)
class Placement:
    """This supervisor's torchrun node, as SLURM placed it."""

    job: str
    """The job's id (``ARRAYJOB_TASK`` for an array task): the rendezvous id."""
    nnodes: int
    node_rank: int
    host: str
    """The rendezvous host: where node rank 0 runs."""
    port: int
    nproc_per_node: int
    shared_node: bool
    """Several supervisor tasks on one node: node ranks are task ranks (SLURM_PROCID)."""

    @property
    def rdzv_endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def describe(self) -> str:
        how = "SLURM_PROCID: several tasks per node" if self.shared_node else "SLURM_NODEID"
        return (
            f"SLURM job {self.job}: node {self.node_rank} of {self.nnodes} (from {how}), "
            f"{self.nproc_per_node} process(es) per node, rendezvous {self.rdzv_endpoint}"
        )


def in_slurm(environ: Mapping[str, str]) -> bool:
    """Whether this process runs inside a SLURM job (batch script, ``srun`` step or ``salloc``)."""
    return bool(environ.get("SLURM_JOB_ID", "").strip())


def job_key(environ: Mapping[str, str]) -> str:
    """The job's id as users see it: ``1234``, or ``1234_7`` for task 7 of array job 1234."""
    array_job, task = environ.get("SLURM_ARRAY_JOB_ID", "").strip(), environ.get("SLURM_ARRAY_TASK_ID", "").strip()
    if array_job and task:
        return f"{array_job}_{task}"
    return environ.get("SLURM_JOB_ID", "").strip()


def _int(environ: Mapping[str, str], *names: str) -> int | None:
    """The first of ``names`` that is set, as an int; None when none is set."""
    for name in names:
        raw = environ.get(name, "").strip()
        if not raw:
            continue
        # SLURM writes some counts with a repeat suffix ("2(x3)"); these are plain counts.
        if not raw.isdigit():
            raise ConfigError(f"{name} is {raw!r}, not a count: is this environment really SLURM's?")
        return int(raw)
    return None


def _same(environ: Mapping[str, str], a: str, b: str) -> int | None:
    """Two names SLURM sets to the same value; inconsistent values are an error."""
    va, vb = _int(environ, a), _int(environ, b)
    if va is not None and vb is not None and va != vb:
        raise ConfigError(f"{a} is {va} but {b} is {vb}: they must agree; is this environment really SLURM's?")
    return va if va is not None else vb


def node_counts(environ: Mapping[str, str]) -> tuple[int, int, bool]:
    """(nnodes, node_rank, shared_node) of this task's torchrun node; see the module docstring."""
    step_tasks = _int(environ, "SLURM_STEP_NUM_TASKS")
    job_nodes = _same(environ, "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    nodes = _int(environ, "SLURM_STEP_NUM_NODES") or job_nodes or 1
    if step_tasks is None:
        # The batch script itself (or salloc's shell): one supervisor, on the first node.
        if nodes > 1:
            raise ConfigError(
                f"distributed.from_slurm: this job has {nodes} nodes (SLURM_NNODES) but the supervisor runs once, "
                f"in the batch script: start one per node with `{SRUN_HINT}`"
            )
        return 1, 0, False
    procid = _int(environ, "SLURM_PROCID")
    if procid is None:
        raise ConfigError("SLURM_STEP_NUM_TASKS is set but SLURM_PROCID is not: is this environment really SLURM's?")
    if not 0 <= procid < step_tasks:
        raise ConfigError(f"SLURM_PROCID {procid} is not below SLURM_STEP_NUM_TASKS {step_tasks}: inconsistent")
    if step_tasks < nodes:
        raise ConfigError(f"SLURM_STEP_NUM_TASKS {step_tasks} is below the step's node count {nodes}: inconsistent")
    if step_tasks > nodes:
        return step_tasks, procid, True
    nodeid = _int(environ, "SLURM_NODEID")
    if nodeid is None or not 0 <= nodeid < nodes:
        raise ConfigError(
            f"SLURM_NODEID is {environ.get('SLURM_NODEID')!r}; with {nodes} node(s) it must be 0 .. {nodes - 1}"
        )
    return nodes, nodeid, False


# ----------------------------------------------------------------------------- node lists

_ITEM = re.compile(r"([^\[\],]*)(?:\[([^\]]*)\])?")


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compact host list (``gpu[01-03,7],login1``) expanded; the fallback for ``scontrol
    show hostnames``. Handles comma-separated items, bracketed ranges with zero padding and
    several bracket groups in one name (``r[1-2]n[1-2]``: r1n1, r1n2, r2n1, r2n2)."""
    hosts: list[str] = []
    pos, text = 0, nodelist.strip()
    if not text:
        raise ConfigError("the SLURM node list is empty: is this environment really SLURM's?")
    while pos < len(text):
        names = [""]
        while pos < len(text) and text[pos] != ",":
            m = _ITEM.match(text, pos)
            if m is None or m.end() == pos:
                raise ConfigError(f"cannot read the SLURM node list {nodelist!r} at {text[pos:]!r}")
            prefix, ranges = m.group(1), m.group(2)
            parts = [prefix] if ranges is None else [prefix + n for n in _expand_ranges(ranges, nodelist)]
            names = [a + b for a in names for b in parts]
            pos = m.end()
        hosts += [n for n in names if n]  # "a,,b" is a and b, as scontrol reads it
        pos += 1  # the comma
    if not hosts:
        raise ConfigError(f"the SLURM node list {nodelist!r} names no host")
    return hosts


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    out: list[str] = []
    for part in ranges.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()) or (sep and int(hi) < int(lo)):
            raise ConfigError(f"cannot read the range {part!r} in the SLURM node list {nodelist!r}")
        width = len(lo)  # "01-03": zero-padded to the width of the lower bound, as SLURM writes it
        out += [str(n).zfill(width) for n in range(int(lo), int(hi if sep else lo) + 1)]
    return out


def scontrol_hostnames(nodelist: str) -> list[str] | None:
    """``scontrol show hostnames NODELIST``: SLURM's own expansion; None where scontrol is missing or fails."""
    exe = shutil.which("scontrol")
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    hosts = done.stdout.split()
    return hosts if done.returncode == 0 and hosts else None


def scontrol_node_addr(name: str) -> str | None:
    """SLURM's ``NodeAddr`` of node ``name`` (``scontrol show node``); None where scontrol is missing or fails."""
    exe = shutil.which("scontrol")
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe, "show", "node", "--oneliner", name], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"\bNodeAddr=(\S+)", done.stdout)
    return m.group(1) if done.returncode == 0 and m else None


def resolves(host: str) -> bool:
    """Whether this machine can resolve ``host`` to an address."""
    try:
        return bool(socket.getaddrinfo(host, None))
    except (OSError, UnicodeError):
        return False


@dataclass(frozen=True)
class Lookups:
    """What :func:`placement` asks of SLURM's tools and the resolver: replaced by plain functions in unit tests."""

    hostnames: Callable[[str], list[str] | None] = scontrol_hostnames
    node_addr: Callable[[str], str | None] = scontrol_node_addr
    resolves: Callable[[str], bool] = resolves


REAL = Lookups()
"""The real scontrol and resolver."""


def first_host(nodelist: str, look: Lookups = REAL) -> str:
    """The first node of ``nodelist`` (``scontrol show hostnames``, else :func:`expand_nodelist`), as an
    address torchrun can reach: the node's name, or SLURM's ``NodeAddr`` for it where the name does not
    resolve (clusters that name nodes apart from their host names)."""
    name = (look.hostnames(nodelist) or expand_nodelist(nodelist))[0]
    if look.resolves(name):
        return name
    addr = look.node_addr(name)
    if addr:
        return addr
    raise ConfigError(
        f"the job's first node {name!r} (the rendezvous host) does not resolve here and scontrol gives no "
        "NodeAddr for it: fix the node's name resolution, or give nnodes, node_rank and rdzv_endpoint "
        "without from_slurm"
    )


# ----------------------------------------------------------------------------- the placement


def default_port(environ: Mapping[str, str]) -> int:
    """A rendezvous port from the job id: the same on every node of the job, different for most neighbours."""
    raw = environ.get("SLURM_JOB_ID", "").strip()
    return PORT_BASE + (int(raw) % PORT_SPAN if raw.isdigit() else 0)


def nproc_per_node(environ: Mapping[str, str], configured: int, shared_node: bool) -> int:
    """One rank per GPU SLURM allocated on this node; the config's count where it allocated none."""
    gpus = _int(environ, "SLURM_GPUS_ON_NODE")
    if not gpus:
        return configured
    if shared_node:
        raise ConfigError(
            f"SLURM gave this node {gpus} GPU(s) (SLURM_GPUS_ON_NODE) and several supervisor tasks share it: "
            f"their ranks would share the GPUs; start one task per node with `{SRUN_HINT}`"
        )
    if configured not in (1, gpus):
        raise ConfigError(
            f"distributed.nproc_per_node is {configured} but SLURM gave this node {gpus} GPU(s) "
            "(SLURM_GPUS_ON_NODE): drop nproc_per_node (one rank per GPU) or make them equal"
        )
    return gpus


def placement(
    environ: Mapping[str, str],
    dist: DistributedConfig,
    look: Lookups = REAL,
) -> Placement:
    """This task's torchrun node from SLURM's variables and the config's ``distributed`` section."""
    if not in_slurm(environ):
        raise ConfigError(
            "distributed.from_slurm is true but this is not a SLURM job (no SLURM_JOB_ID): run it with sbatch "
            f"(`{SRUN_HINT}` in the batch script), or set from_slurm: false and give nnodes and node_rank"
        )
    nnodes, node_rank, shared = node_counts(environ)
    nodelist = next(
        (environ[n] for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if environ.get(n)), ""
    )
    if not nodelist:
        raise ConfigError("SLURM_JOB_ID is set but SLURM_JOB_NODELIST is not: is this environment really SLURM's?")
    if dist.rdzv_endpoint == DEFAULT_RDZV_ENDPOINT:
        port = default_port(environ)
    else:
        port = int(dist.rdzv_endpoint.rpartition(":")[2])
    return Placement(
        job=job_key(environ),
        nnodes=nnodes,
        node_rank=node_rank,
        host=first_host(nodelist, look) if nnodes > 1 else "127.0.0.1",
        port=port,
        nproc_per_node=nproc_per_node(environ, dist.nproc_per_node, shared),
        shared_node=shared,
    )
