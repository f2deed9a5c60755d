"""The worker's side of the fault contract: stop signals, parent death, heartbeat, exit report.

Nothing here imports torch, so the entry point can report a config error in
milliseconds.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

from supervisor import protocol


class StopRequest:
    """Records stop signals; the training loop polls it at each step boundary.

    The first SIGTERM/SIGINT asks for "save at the end of this step, then exit".
    A second one restores the default action and re-raises it: the process dies
    by that signal, which is safe because a checkpoint is only ever committed by
    a rename.

    The same signal again before the training loop has taken the stop (at the step end), and
    within :attr:`SAME_REQUEST_S`, is the same request delivered twice, not a second one: SLURM
    (a cancel, the time limit) signals every process of the job, and the supervisor forwards
    the same stop a moment later.
    """

    SAME_REQUEST_S = 2.0

    def __init__(self) -> None:
        self.signum: int | None = None
        self.reason: str | None = None
        self.received_at: float | None = None
        self.taken = False

    def take(self) -> None:
        """The training loop acts on the stop now (saves, then exits): a repeat from now on forces."""
        self.taken = True

    @property
    def requested(self) -> bool:
        return self.signum is not None or self.reason is not None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        signal.signal(ParentWatch.DEATH_SIGNAL, self._parent_died)

    def _parent_died(self, signum: int, frame: FrameType | None) -> None:
        # Its own signal, never a "second signal": Linux repeats the parent-death signal as each
        # thread of a multi-threaded parent exits, and a repeat must not force anything.
        if not self.requested:
            self.reason = "the supervisor process is gone"
            self.received_at = time.monotonic()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if (
            self.signum == signum
            and not self.taken
            and time.monotonic() - (self.received_at or 0.0) < self.SAME_REQUEST_S
        ):
            return  # the same stop delivered twice (see the class docstring)
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        self.received_at = time.monotonic()

    def request(self, reason: str) -> None:
        """A stop that does not come from a signal (e.g. the supervisor is gone)."""
        if not self.requested:
            self.reason = reason
            self.received_at = time.monotonic()

    def describe(self) -> str:
        if self.signum is not None:
            return f"stop requested by {signal.Signals(self.signum).name}"
        return f"stop requested: {self.reason}"


def rank() -> int:
    """This process's global rank under torchrun (0 otherwise)."""
    raw = os.environ.get("RANK", "0")
    return int(raw) if raw.isdigit() else 0


def world_size() -> int:
    raw = os.environ.get("WORLD_SIZE", "1")
    return int(raw) if raw.isdigit() else 1


class ParentWatch:
    """The worker must not train on unsupervised.

    Linux delivers SIGUSR1 when the parent dies (PR_SET_PDEATHSIG), which becomes
    the usual safe stop (a signal of its own: the kernel may send it several times). The parent is the supervisor, or torchrun under it, so at
    every step the worker also checks that its parent is still the one it started
    with and that the supervisor (``VIT_SUPERVISOR_PID``) is alive: the death may
    have happened before prctl ran, or torchrun may outlive the supervisor.
    """

    PR_SET_PDEATHSIG = 1
    DEATH_SIGNAL = signal.SIGUSR1

    def __init__(self) -> None:
        raw = os.environ.get(protocol.ENV_SUPERVISOR_PID)
        self.supervisor = int(raw) if raw and raw.isdigit() else None
        self.initial_parent = os.getppid()

    def arm(self) -> None:
        if self.supervisor is None or not sys.platform.startswith("linux"):
            return
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(self.PR_SET_PDEATHSIG, int(self.DEATH_SIGNAL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the per-step check still covers it

    def parent_gone(self) -> bool:
        if self.supervisor is None:
            return False
        if os.getppid() != self.initial_parent:
            return True
        try:
            os.kill(self.supervisor, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False


class HeartbeatWriter:
    """Writes the :class:`protocol.Heartbeat` record atomically, at most every ``interval``
    seconds unless the state changes (or ``force``).

    Called at every step: an update that does not write only stores its fields (the record
    is built, checked and serialised when it is written)."""

    def __init__(self, output_dir: Path, interval: float, **static: Any) -> None:
        self.path = protocol.heartbeat_path(output_dir)
        self.interval = interval
        self.record = protocol.Heartbeat(pid=os.getpid(), **static)
        self._fields: dict[str, Any] = {}
        self._main = rank() == 0  # one heartbeat per job: rank 0 speaks for all
        self._last_write = 0.0
        self._last_state: str | None = None

    def update(self, force: bool = False, **fields: Any) -> None:
        self._fields.update(fields)
        if not self._main:
            return
        now = time.monotonic()
        state = self._fields.get("state", self.record.state)
        if force or state != self._last_state or now - self._last_write >= self.interval:
            self.record = dataclasses.replace(self.record, **self._fields, time=time.time())
            self._fields.clear()
            try:
                protocol.atomic_write_json(self.path, protocol.record_dict(self.record), durable=False)
            except OSError:
                return  # a full disk must not kill training; the next write retries
            self._last_write = now
            self._last_state = state


def attempt() -> int:
    raw = os.environ.get(protocol.ENV_ATTEMPT, "")
    return int(raw) if raw.isdigit() else 0


def exit_report_path(output_dir: Path | None) -> Path | None:
    """``$VIT_EXIT_REPORT`` or ``run/exit_report.json``; under torchrun one file per rank
    (``{rank}`` in the name is replaced, else ``.rankN`` is inserted before ``.json``)."""
    raw = os.environ.get(protocol.ENV_EXIT_REPORT)
    if raw:
        path = Path(raw)
    elif output_dir is not None:
        path = protocol.exit_report_path(output_dir)
    else:
        return None
    if "{rank}" in path.name:
        return path.with_name(path.name.replace("{rank}", str(rank())))
    if world_size() > 1:
        return path.with_name(f"{path.stem}.rank{rank()}{path.suffix}")
    return path


def exit_report(reason: str, message: str, *, exc: BaseException | None = None, **fields: Any) -> protocol.ExitReport:
    """The exit report for ``reason``, stamped with this process's identity and attempt."""
    if exc is not None:
        tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
        fields = {"exception_type": type(exc).__name__, "traceback": "".join(tb).splitlines()[-25:], **fields}
    return protocol.ExitReport(
        reason=reason,
        message=message,
        exit_code=protocol.EXIT_CODES[reason],
        pid=os.getpid(),
        attempt=attempt(),
        rank=rank(),
        world_size=world_size(),
        time=time.time(),
        **fields,
    )


def save_exit_report(output_dir: Path | None, report: protocol.ExitReport) -> int:
    """Write ``report`` (best effort: a full disk must not hide the exit code) and return its exit code."""
    target = exit_report_path(output_dir)
    if target is not None:
        try:
            protocol.atomic_write_json(target, protocol.record_dict(report))
        except OSError as err:
            print(f"vit-train: could not write exit report {target}: {err}", file=sys.stderr)
    return protocol.EXIT_CODES[report.reason]


def write_exit_report(
    output_dir: Path | None, reason: str, message: str, *, exc: BaseException | None = None, **fields: Any
) -> int:
    """Build, write and return the exit code of an exit report (for exits outside a training run)."""
    return save_exit_report(output_dir, exit_report(reason, message, exc=exc, **fields))


def is_oom(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a RuntimeError). oneDNN's "could not
    create a primitive" counts too where an allocation can fail at all (:func:`allocations_can_fail`):
    its scratch buffer was refused, the same out-of-memory met inside a CPU kernel instead of torch's
    allocator (seen under an address-space limit: which of the two reports it depends on where the
    limit is reached)."""
    name = type(exc).__name__
    if name == "OutOfMemoryError":
        return True
    if isinstance(exc, MemoryError):
        return True
    msg = str(exc)
    if not isinstance(exc, RuntimeError):
        return False
    if (
        "DefaultCPUAllocator: can't allocate memory" in msg
        or "CUDA out of memory" in msg
        or ("out of memory" in msg.lower() and "cuda" in msg.lower())
    ):
        return True
    return "could not create a primitive" in msg and allocations_can_fail()


def allocations_can_fail() -> bool:
    """Whether a host allocation can fail rather than the kernel's OOM killer ending the process: an
    address-space limit (``ulimit -v``, RLIMIT_AS) or strict overcommit (vm.overcommit_memory 2)."""
    import resource

    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            return True
        with open("/proc/sys/vm/overcommit_memory") as f:
            return f.read().strip() == "2"
    except (OSError, ValueError):
        return False


# What CUDA, NCCL, cuBLAS and cuDNN say when the device or its context can no longer be used. Matched
# case-insensitively against the message of the exception and of its causes. A CUDA "sticky" error
# poisons the whole context: every later call on it fails, a copy from the device included.
_DEVICE_FATAL_PATTERNS = (
    "illegal memory access",  # cudaErrorIllegalAddress (also HIP's wording)
    "device-side assert",  # cudaErrorAssert
    "unspecified launch failure",  # cudaErrorLaunchFailure
    "misaligned address",  # cudaErrorMisalignedAddress
    "an illegal instruction was encountered",  # cudaErrorIllegalInstruction
    "hardware stack error",  # cudaErrorHardwareStackError
    "uncorrectable ecc error",  # cudaErrorECCUncorrectable (Xid 48/63/64)
    "fallen off the bus",  # Xid 79 as the driver reports it
    "gpu is lost",  # NVML/driver wording for the same
    "cuda error: unknown error",  # what a context lost to an Xid usually surfaces as
    "cuda driver error",
    "cublas_status_execution_failed",
    "cublas_status_internal_error",
    "cudnn_status_execution_failed",
    "cudnn_status_mapping_error",
    "nccl error",  # torch's prefix for ncclUnhandledCudaError, ncclSystemError, ncclRemoteError, ...
    "ncclunhandledcudaerror",
    "ncclsystemerror",
    "ncclinternalerror",
    "ncclremoteerror",
    "nccl communicator was aborted",
    "watchdog caught collective operation timeout",
)

# torch.AcceleratorError: every failed CUDA/HIP/XPU runtime call (2.8+). torch.distributed's
# DistBackendError: a backend (NCCL) failure. Matched by name along the class hierarchy, so this
# module need not import torch and an exception type that a torch version lacks costs nothing.
_DEVICE_FATAL_TYPES = frozenset({"AcceleratorError", "DistBackendError"})


def is_device_fatal(exc: BaseException) -> bool:
    """The accelerator (or its context, or its collective backend) is unusable after ``exc``.

    Nothing may then be copied from the device: an emergency checkpoint or a snapshot taken now
    would fail again or, worse, save state the failed kernel left half-written. The worker exits
    with ``device_error`` and the restart resumes from the newest snapshot or checkpoint, both
    taken before the fault. An out-of-memory is never device-fatal (the context survives it and
    the OOM path saves what it can). Any ``torch.AcceleratorError`` counts, not only the sticky
    CUDA errors: a failed runtime call means the device's state can no longer be trusted, and
    the snapshot of the last step costs at most that step.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen and len(seen) < 8:
        seen.add(id(e))
        if is_oom(e):
            return False
        if any(cls.__name__ in _DEVICE_FATAL_TYPES for cls in type(e).__mro__):
            return True
        msg = str(e).lower()
        if any(p in msg for p in _DEVICE_FATAL_PATTERNS):
            return True
        e = e.__cause__ or e.__context__
    return False


def set_memory_headroom_from_env() -> int | None:
    """Fault injection: ``VIT_MEMORY_HEADROOM_MB=N`` caps this process's address space at
    its current size + N MiB, so a too-large batch hits a real allocator failure.
    ``VIT_MEMORY_HEADROOM_RANKS=1,3`` limits it to those torchrun ranks."""
    raw = os.environ.get("VIT_MEMORY_HEADROOM_MB")
    if not raw:
        return None
    ranks = os.environ.get("VIT_MEMORY_HEADROOM_RANKS")  # e.g. "1": only rank 1 is capped
    if ranks and str(rank()) not in ranks.split(","):
        return None
    import resource

    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[0])
    limit = pages * os.sysconf("SC_PAGE_SIZE") + int(float(raw) * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return limit


def set_process_name(name: str) -> None:
    """Show as ``name`` in ps/top (Linux comm, at most 15 bytes); best effort."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass
