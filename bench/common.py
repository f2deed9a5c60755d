"""What the benchmark scripts share: configs, real processes, heartbeat polling, weights, tables.

Every benchmark drives real worker/supervisor processes (``python -m worker``,
``python -m supervisor.cli``) in a temporary directory and prints a small
table plus the command line, date and machine that produced it. Timings are
only ever compared inside one run (ratios, side by side): the machines these
run on are shared.
"""

from __future__ import annotations

import atexit
import copy
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from supervisor import protocol
from supervisor.host import poll_until

# The test suite's tiny from-scratch ViT (configs/tiny.yaml): about 20 steps a second on 2 cores,
# a worker reaches its first step in a few seconds (mostly imports).
TINY: dict[str, Any] = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
TINY["training"]["output_dir"] = "out"  # relative to each copy's own folder

# ViT-base-sized from-scratch architecture (86M parameters at 224 px, patch 16, 3 channels).
VIT_BASE: dict[str, int] = {
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
}


def deep_update(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in, recursively (neither is modified)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_update(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def write_config(path: Path, overrides: dict[str, Any] | None = None, base: dict[str, Any] = TINY) -> Path:
    """Write ``base`` + ``overrides`` as YAML to ``path``; return the path.

    A config that names no ``snapshot.root`` gets this bench's own folder on the same tmpfs
    (:func:`bench_shm`), removed when the bench exits: a bench stops its runs in ways that keep a
    store on purpose (a stop newer than the newest disk checkpoint), and these would otherwise
    pile up in the user's /dev/shm."""
    cfg = deep_update(base, overrides or {})
    snap = cfg.get("snapshot")
    if snap is None or (isinstance(snap, dict) and "root" not in snap):
        cfg["snapshot"] = {**(snap or {}), "root": str(bench_shm())}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


_SHM: Path | None = None


def bench_shm() -> Path:
    """A fresh folder for this bench process's snapshot stores, in /dev/shm where there is one (the
    product's default file system for them), removed at exit."""
    global _SHM
    if _SHM is None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        _SHM = Path(tempfile.mkdtemp(prefix="vit-bench-shm-", dir=base))
        atexit.register(shutil.rmtree, _SHM, True)
    return _SHM


def output_dir(cfg_path: Path) -> Path:
    """The config's ``training.output_dir``, resolved the way the worker resolves it."""
    raw = yaml.safe_load(cfg_path.read_text())["training"]["output_dir"]
    p = Path(raw)
    return p if p.is_absolute() else (cfg_path.parent / p).resolve()


def work_dir(prefix: str, keep: Path | None = None) -> Path:
    """A fresh scratch folder (``keep`` if given)."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        return keep.resolve()
    return Path(tempfile.mkdtemp(prefix=f"vit-bench-{prefix}-")).resolve()


# ----------------------------------------------------------------------------- processes


def env(**extra: str) -> dict[str, str]:
    """The environment every benchmark child gets: quiet, offline, one BLAS thread per process
    (two processes on two cores must not fight over threads)."""
    e = dict(os.environ)
    e.update(
        {
            "PYTHONUNBUFFERED": "1",
            "WANDB_SILENT": "true",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        }
    )
    e.update(extra)
    return e


def spawn(
    argv: Sequence[str | os.PathLike[str]],
    log: Path,
    environ: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session (so it can be killed as a group), output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        return subprocess.Popen(
            [str(a) for a in argv],
            cwd=REPO,
            env=environ or env(),
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def worker_argv(cfg: Path, *args: str | os.PathLike[str]) -> list[str]:
    return [PY, "-m", "worker", str(cfg), *map(str, args)]


def supervisor_argv(cfg: Path) -> list[str]:
    return [PY, "-m", "supervisor.cli", "start", str(cfg)]


def run_worker(
    cfg: Path,
    *args: str | os.PathLike[str],
    log: Path,
    timeout: float = 600,
    environ: dict[str, str] | None = None,
    argv: list[str] | None = None,
) -> int:
    """Run a worker to its end; return its exit code. ``timeout`` is a stall limit: it restarts
    whenever the run's heartbeat moves."""
    p = spawn(argv or worker_argv(cfg, *args), log, environ)
    out = output_dir(cfg)
    try:
        return wait_exit(p, timeout, out)
    except TimeoutError:
        kill_group(p, signal.SIGKILL)
        raise


def wait_exit(p: subprocess.Popen[Any], stall: float, out: Path) -> int:
    """``p``'s exit code; TimeoutError once the run in ``out`` has not moved for ``stall`` s."""
    wait_for(lambda: p.poll() is not None, stall, f"pid {p.pid} to exit", 0.05, progress=lambda: run_progress(out))
    return p.returncode


def kill_group(p: subprocess.Popen[Any], sig: int = signal.SIGKILL, wait: float = 30) -> None:
    """Signal ``p``'s whole session (it was started with its own); "no such process" is fine."""
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(wait)
    except subprocess.TimeoutExpired:
        pass


def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.005,
    *,
    progress: Callable[[], object] | None = None,
) -> Any:
    """Poll ``predicate`` until it returns something truthy; TimeoutError after ``timeout`` s.

    With ``progress`` (e.g. ``lambda: run_progress(out)``) ``timeout`` is a stall limit: it
    restarts whenever the run moves, so a loaded machine is waited for and a stuck run is not.
    """
    value = poll_until(predicate, timeout, interval=interval, progress=progress)
    if not value:
        stalled = "without progress " if progress is not None else ""
        raise TimeoutError(f"timed out after {timeout:.0f}s {stalled}waiting for {what}")
    return value


def run_progress(out: Path) -> tuple[object, ...]:
    """What moves while a run is alive: the heartbeat's (step, state, pid) and ``state.json``'s
    (state, attempt). A wait keyed on it restarts its stall clock whenever one of them changes."""
    hb = protocol.read_json(protocol.heartbeat_path(out)) or {}
    st = protocol.read_json(protocol.state_path(out)) or {}
    return hb.get("global_step"), hb.get("state"), hb.get("pid"), st.get("state"), st.get("attempt")


def heartbeat(out: Path) -> dict[str, Any]:
    return protocol.read_json(protocol.heartbeat_path(out)) or {}


@dataclass
class StepWatch:
    """Polls ``run/heartbeat.json`` in a thread and records every (pid, global_step) change.

    A record is (wall time of the heartbeat write, monotonic time seen here, pid, step).
    The heartbeat is rewritten at every step (``heartbeat_interval_s: 0``), so this is
    the ground truth of which process made which optimizer step when.
    """

    out: Path
    interval: float = 0.002
    records: list[tuple[float, float, int, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> StepWatch:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        path = protocol.heartbeat_path(self.out)
        last: tuple[Any, Any] | None = None
        while not self._stop.is_set():
            hb = protocol.read_json(path) or {}
            key = (hb.get("pid"), hb.get("global_step"))
            if isinstance(key[0], int) and isinstance(key[1], int) and key != last:
                self.records.append((float(hb.get("time") or time.time()), time.monotonic(), key[0], key[1]))
                last = key
            time.sleep(self.interval)

    def now(self) -> tuple[int | None, int]:
        """(pid, step) of the newest heartbeat."""
        hb = heartbeat(self.out)
        return hb.get("pid"), int(hb.get("global_step") or 0)

    def first_step_after(self, wall: float, not_pid: int, above: int) -> tuple[float, int, int] | None:
        """The first heartbeat after wall time ``wall`` from another process than ``not_pid`` with a
        step above ``above``: (heartbeat wall time, pid, step)."""
        for t, _, pid, step in list(self.records):
            if t >= wall and pid != not_pid and step > above:
                return t, pid, step
        return None


def newest_checkpoint_step(out: Path) -> int:
    return protocol.newest_checkpoint_step(out)


# ----------------------------------------------------------------------------- logs and reports

_COMMITTED = re.compile(r"Committed checkpoint checkpoint-(\d+) \(([\d.]+) MiB, ([\d.]+)s\)")


def committed_checkpoints(log_text: str) -> list[tuple[int, float, float]]:
    """(step, MiB, seconds) of every "Committed checkpoint checkpoint-N (X MiB, Ys)" log line."""
    return [(int(m.group(1)), float(m.group(2)), float(m.group(3))) for m in _COMMITTED.finditer(log_text)]


def exit_report(out: Path) -> dict[str, Any]:
    return protocol.read_json(protocol.exit_report_path(out)) or {}


# ----------------------------------------------------------------------------- weights


def load_weights(checkpoint: Path, cfg_path: Path) -> dict[str, Any]:
    """The in-memory state dict of a saved model, read through ``from_pretrained`` (which maps
    transformers 5's on-disk names to the module's names)."""
    from transformers.utils import logging as hf_logging

    from supervisor.schema import load_config
    from worker import model as model_mod

    hf_logging.disable_progress_bar()
    cfg = load_config(cfg_path)
    return model_mod.model_class(cfg).from_pretrained(str(checkpoint)).state_dict()


def weight_diff(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, int, int]:
    """(max abs difference, tensors that differ, tensors compared) between two state dicts."""
    import torch

    if a.keys() != b.keys():
        raise ValueError(f"different tensors: {sorted(a.keys() ^ b.keys())[:5]}")
    worst, differ = 0.0, 0
    for k in a:
        d = (a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0
        if not torch.equal(a[k], b[k]):
            differ += 1
        worst = max(worst, d)
    return worst, differ, len(a)


# ----------------------------------------------------------------------------- figures and tables


def median(xs: Iterable[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x: Any) -> str:
    """A figure for a table: None as "-", floats to about three significant digits."""
    if x is None:
        return "-"
    if isinstance(x, float):
        if x == 0 or abs(x) >= 100:
            return f"{x:.0f}"
        if abs(x) >= 1:
            return f"{x:.2f}"
        return f"{x:.3g}"
    return str(x)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (readable as plain text too)."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda cs: "| " + " | ".join(c.ljust(w) for c, w in zip(cs, widths, strict=False)) + " |"  # noqa: E731
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def machine() -> str:
    """One line: host CPU count, memory, Python, torch and transformers versions."""
    mem = ""
    try:
        import psutil

        mem = f", {psutil.virtual_memory().total / 2**30:.0f} GiB"
    except ImportError:
        pass
    versions = []
    for mod in ("torch", "transformers"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            pass
    return f"{platform.machine()} Linux, {os.cpu_count()} CPUs{mem}, Python {platform.python_version()}, " + ", ".join(
        versions
    )


def banner(title: str) -> None:
    """Print what is measured, the exact command line, the date and the machine."""
    cmd = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    print(
        f"# {title}\n\ncommand: `{cmd}`\ndate:    {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}\n"
        f"machine: {machine()}\n",
        flush=True,
    )


def say(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def dump_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
