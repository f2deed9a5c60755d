#!/usr/bin/env python3
"""Chaos run: train under ``vit-supervisor start`` while injecting real faults on a seeded schedule.

    python bench/chaos.py                      # 20+ faults of every kind, prints a table, exit 1 on any miss
    python bench/chaos.py --faults 30 --seed 7
    python bench/chaos.py --short              # the quick version the test suite runs (the reference beside it)
    python bench/chaos.py --snapshots 0        # the same without shared-memory snapshots, to compare

Snapshots are on (``snapshot.every_steps: 1``, set explicitly: a snapshot of the training state in
shared memory after every step), so a fault that gives the worker no chance to save (SIGKILL,
SIGSEGV, a hang) loses at most one optimizer step, and a kill in the middle of a save none (a step
is snapshotted before its disk save begins).

Faults, all by real mechanisms: SIGKILL, SIGSEGV, SIGTERM and SIGINT to the worker; a real
allocator out-of-memory (the worker's address space is capped with prlimit(2)
while it trains, so its next allocation fails in torch's CPU allocator); SIGKILL
in the middle of a checkpoint save; a hang (SIGSTOP); SIGKILL of the supervisor
followed by a new ``start``; a truncated newest checkpoint; a full disk (the run
lives on a small tmpfs that a ballast file fills, then frees).

Checks, each a loud failure:
  - the run completed the configured steps;
  - while the batch was unchanged, every checkpoint the chaos run committed is
    bit-identical to the uninterrupted reference run's checkpoint of the same step;
  - after out-of-memory batch changes the effective batch never changed and the final
    eval metric is within --tolerance of the reference;
  - exactly one tracker run id; no checkpoint loaded that did not validate;
  - never two workers at once; no fault lost more than one step with snapshots on (after an
    out-of-memory the batch changes and the snapshot no longer applies: the save interval; a kill
    that landed in the middle of a save: none), and without them no more than the save interval
    (twice that after a corrupted checkpoint).
Figures per fault type: count, detection latency (fault → supervisor acts), recovery
time (fault → first new optimizer step), steps lost; the run's goodput (reference wall
time ÷ chaos wall time) and lost-work share (goal with snapshots: <= 0.1 % of steps redone).
Beside the goodput, the product's own accounting of the chaos run (``goodput`` in its
``run/state.json``, supervisor/goodput.py): the buckets' sum against the chaos wall time
measured here, goodput (training ÷ total), and the share not lost to faults (1 − redo,
restart, detection, backoff, disk wait and unsupervised time ÷ total), which is the product's
estimate of an uninterrupted supervised run's time ÷ the chaos run's. Measured here the same
share is 1 − the sum of the faults' recovery times (fault → first new step) ÷ the chaos wall
time. The reference ratio differs from both by more than the faults: the reference is a plain
worker without tracking, run at another moment's machine load.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import run_progress, wait_exit, wait_for

from supervisor import goodput, protocol

PY = sys.executable
KINDS = [
    "sigkill",
    "sigsegv",
    "sigterm",
    "sigint",
    "kill_during_save",
    "hang",
    "supervisor_kill",
    "truncate_checkpoint",
    "low_disk",
    "oom",
]
BATCH_CHANGING = {"oom"}
INSTANT_KINDS = {"sigkill", "sigsegv", "sigterm", "sigint", "hang", "truncate_checkpoint"}
"""Faults aimed at a random moment within a step (the others wait for their own moment: a save, ...)."""
MID_SAVE = "(landed mid-save)"


def config(
    out: Path, steps: int, save_steps: int, keep: int | None, tracking: bool, snapshots: int, snapshot_root: Path
) -> dict[str, Any]:
    return {
        "model": {
            "model_name": "scratch",
            "num_labels": 10,
            "scratch": {
                "image_size": 8,
                "patch_size": 2,
                "num_channels": 1,
                "hidden_size": 64,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
                "intermediate_size": 128,
            },
        },
        "data": {"source": "digits", "train_test_split": 0.25, "random_seed": 7, "limit": 640},
        "training": {
            "output_dir": str(out),
            "max_steps": steps,
            "per_device_train_batch_size": 16,
            "gradient_accumulation_steps": 1,
            "per_device_eval_batch_size": 160,
            "learning_rate": 2e-3,
            "warmup_ratio": 0.05,
            "logging_steps": 5,
            "eval_strategy": "steps",
            "eval_steps": 30,
            "save_strategy": "steps",
            "save_steps": save_steps,
            "save_total_limit": keep,
            "seed": 3,
        },
        "tracking": {"backend": "wandb" if tracking else "none", "mode": "offline"},
        # Explicit, whatever the default: the lost-work figures depend on it.
        "snapshot": {"every_steps": snapshots, "root": str(snapshot_root)},
        "disk": {"reserve_mb": 2, "on_low": "wait", "recheck_s": 0.2},
        "supervisor": {
            "backoff_initial_s": 0.0,
            "backoff_max_s": 1.0,
            "max_failures_without_progress": 6,
            "hang_timeout_s": 4.0,
            "startup_timeout_s": 120,
            "eval_timeout_s": 60,
            "term_grace_s": 3,
            "heartbeat_interval_s": 0.0,
            "min_per_device_batch": 2,
        },
    }


@dataclass
class Event:
    kind: str
    t: float
    step: int
    pid: int
    detail: str = ""
    wall: float = field(default_factory=time.time)
    detected: float | None = None
    recovered: float | None = None
    resumed_from: int | None = None


def become_subreaper() -> None:
    """Adopt orphaned descendants, as systemd or a normal init does.

    When the supervisor is SIGKILLed its worker is orphaned and must be free to finish
    its checkpoint; some container inits kill adopted orphans outright.
    """
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def reap_adopted(own: set[int]) -> None:
    """Collect exited orphans we adopted (never our own Popen children: Popen waits for those)."""
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid in own:
            return
        try:
            os.waitpid(info.si_pid, 0)
        except ChildProcessError:
            return


@dataclass
class Watch:
    """Polls the heartbeat and the process table in a thread: the ground truth of the run."""

    out: Path
    cfg_path: Path
    steps: list[tuple[float, int, int]] = field(default_factory=list)  # (time, pid, step)
    max_workers: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    own: set[int] = field(default_factory=set)

    def run(self) -> None:
        hb_path = protocol.heartbeat_path(self.out)
        last = None
        while not self.stop.is_set():
            hb = protocol.read_json(hb_path) or {}
            key = (hb.get("pid"), hb.get("global_step"))
            if hb.get("global_step") is not None and key != last:
                self.steps.append((time.monotonic(), hb["pid"], hb["global_step"]))
                last = key
            self.max_workers = max(self.max_workers, count_workers(self.cfg_path))
            reap_adopted(self.own)
            time.sleep(0.01)

    def step_now(self) -> tuple[int | None, int]:
        hb = protocol.read_json(protocol.heartbeat_path(self.out)) or {}
        return hb.get("pid"), int(hb.get("global_step") or 0)

    def step_seconds(self, pid: int | None) -> float:
        """The median time between this worker's recent steps (0.05 s before it has any)."""
        times = [ts for ts, p, _ in self.steps[-12:] if p == pid]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        return statistics.median(gaps) if gaps else 0.05

    def first_step_after(self, t: float, not_pid: int | None) -> tuple[float, int] | None:
        """The first new optimizer step by another process than ``not_pid`` after ``t``."""
        seen: dict[int, int] = {}
        for ts, pid, step in self.steps:
            if pid == not_pid:
                continue
            if ts < t:
                continue
            if pid in seen and step > seen[pid]:
                return ts, step
            seen.setdefault(pid, step)
        return None


def count_workers(cfg_path: Path) -> int:
    """Training processes of this run. Workers name themselves ``vit-train`` (an idle standby is
    ``vit-standby`` until its go); DataLoader children inherit the name and are skipped."""
    n = 0
    for p in psutil.process_iter(["cmdline", "name", "ppid", "status"]):
        try:
            if p.info["name"] != "vit-train" or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if str(cfg_path) not in (p.info["cmdline"] or []):
                continue
            if psutil.Process(p.info["ppid"]).name() == "vit-train":
                continue
            n += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return n


def mount_tmpfs(path: Path, mb: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def supervisor(cfg_path: Path, log: Path) -> subprocess.Popen[bytes]:
    # A fixed mmap threshold makes every sizeable allocation a fresh mapping, so a worker whose
    # address space gets capped (the OOM fault) fails on its next one instead of reusing freed heap.
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        WANDB_SILENT="true",
        OMP_NUM_THREADS="1",
        XDG_STATE_HOME=str(log.parent / "state"),
        MALLOC_MMAP_THRESHOLD_="65536",
    )
    return subprocess.Popen(
        [PY, "-m", "supervisor.cli", "start", str(cfg_path)],
        cwd=REPO,
        env=env,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def schedule(n: int, rng: random.Random, kinds: list[str]) -> list[str]:
    """Every kind at least once; batch-changing faults last so exactness can be checked before them."""
    plain = [k for k in kinds if k not in BATCH_CHANGING]
    changing = [k for k in kinds if k in BATCH_CHANGING]
    body = list(plain)
    while len(body) + len(changing) < n:
        body.append(rng.choice([k for k in plain if k not in ("low_disk", "supervisor_kill")] or plain))
    rng.shuffle(body)
    return body + changing


def newest_ckpt(out: Path) -> Path | None:
    c = [(int(p.name.split("-")[1]), p) for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(c)[1] if c else None


def weights_equal(a: Path, b: Path) -> bool:
    from safetensors.numpy import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--faults", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--steps", type=int, default=0, help="optimizer steps (default: 260 per fault, 14 with --no-standby-wait)"
    )
    ap.add_argument("--save-steps", type=int, default=6)
    ap.add_argument(
        "--snapshots", type=int, default=1, metavar="N", help="snapshot.every_steps (default 1; 0 = off, to compare)"
    )
    ap.add_argument(
        "--snapshot-root",
        type=Path,
        default=None,
        help="tmpfs folder for the snapshots (default: a fresh folder in /dev/shm, removed at the end)",
    )
    ap.add_argument("--tolerance", type=float, default=0.1, help="allowed eval accuracy difference after OOMs")
    ap.add_argument(
        "--short",
        action="store_true",
        help="5 faults, one of each of the quick kinds, over fewer steps; the reference runs beside the chaos run "
        "(its checkpoints are compared at the end), so the goodput figures mean nothing there",
    )
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--no-tracking", action="store_true")
    ap.add_argument("--report", action="store_true", help="render the run report (PNG + HTML) at the end")
    ap.add_argument(
        "--no-standby-wait",
        dest="standby_ready",
        action="store_false",
        help="inject faults without waiting for the standby worker to be ready",
    )
    a = ap.parse_args(argv)
    rng = random.Random(a.seed)
    become_subreaper()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="vit-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    kinds = list(KINDS)
    if a.short:
        kinds = ["sigkill", "sigterm", "kill_during_save", "truncate_checkpoint", "oom"]
        a.faults = len(kinds)
    disk = work / "disk"
    mounted = "low_disk" in kinds and mount_tmpfs(disk, 96)
    if not mounted and "low_disk" in kinds:
        kinds.remove("low_disk")
        print("chaos: cannot mount a tmpfs here (needs root); skipping the low-disk fault", file=sys.stderr)
    base = disk if mounted else work
    # Waiting for the standby before each fault costs seconds of training: budget the steps for it.
    # --short: a fault every 10 steps or so (seed 3: 12, 22, 30, 41, 51), so 84 leave room to spare.
    steps = a.steps or (84 if a.short else max(120, (260 if a.standby_ready else 14) * a.faults))
    faults = schedule(a.faults, rng, kinds)
    own_root = a.snapshot_root is None
    if own_root:
        a.snapshot_root = Path(
            tempfile.mkdtemp(prefix="vit-chaos-", dir="/dev/shm" if Path("/dev/shm").is_dir() else work)
        )
    try:
        return run(a, work, base, steps, faults, rng)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], check=False)
        if own_root:
            shutil.rmtree(a.snapshot_root, ignore_errors=True)


def run(a: argparse.Namespace, work: Path, base: Path, steps: int, faults: list[str], rng: random.Random) -> int:
    tracking = not a.no_tracking
    ref_out, out = work / "reference", base / "chaos"
    ref_cfg, cfg_path = work / "reference.yaml", work / "chaos.yaml"
    # The reference takes snapshots too (a store of its own): goodput compares like with like.
    root = a.snapshot_root
    ref_cfg.write_text(yaml.safe_dump(config(ref_out, steps, a.save_steps, None, False, a.snapshots, root / "ref")))
    cfg_path.write_text(yaml.safe_dump(config(out, steps, a.save_steps, 3, tracking, a.snapshots, root / "chaos")))
    print(
        f"chaos: {len(faults)} faults over {steps} steps, save every {a.save_steps}, "
        f"snapshot every {a.snapshots or '- (off)'}; work dir {work}",
        flush=True,
    )

    reference = Reference(ref_cfg, ref_out, work / "reference.log")
    if not a.short:  # alone, so that its wall time is a fair measure for the goodput
        reference.finish()

    watch = Watch(out, cfg_path)
    th = threading.Thread(target=watch.run, daemon=True)
    th.start()
    sup_log = work / "supervisor.log"
    t_start = time.monotonic()
    sup = supervisor(cfg_path, sup_log)
    watch.own.add(sup.pid)
    events: list[Event] = []
    misses: list[str] = []
    truncated: set[str] = set()
    taken: list[tuple[str, dict[str, Any]]] = []  # the chaos run's checkpoints' weights, as they were when seen
    batch_changed = False
    oom_budget = 2

    def moved() -> tuple[object, ...]:
        return run_progress(out)

    try:
        attempts_before = 0
        for kind in faults:
            if kind == "oom" and oom_budget == 0:
                kind = "sigkill"
            if events and events[-1].kind != "low_disk":
                # The last fault's restart must have happened before the next fault is aimed.
                wait_for(
                    lambda: (
                        len((protocol.read_json(protocol.state_path(out)) or {}).get("attempts") or [])
                        > attempts_before
                    ),
                    180,
                    "the restart after the last fault",
                    progress=moved,
                )
            # Let the current worker make some progress first, and (as in a real run, where faults
            # are hours apart) its standby get ready.
            _pid0, s0 = wait_for(lambda: (p := watch.step_now())[0] and p, 180, "a running worker", progress=moved)
            if a.standby_ready:
                try:  # a fixed allowance, not a budget: the fault goes ahead without a standby
                    wait_for(
                        lambda: (
                            (protocol.read_json(protocol.state_path(out)) or {}).get("standby", {})
                            and (protocol.read_json(protocol.state_path(out)) or {})["standby"].get("ready")
                        ),
                        60,
                        "a ready standby",
                    )
                except TimeoutError:
                    pass
                _pid0, s0 = watch.step_now()
            target = s0 + rng.randint(2, 2 * a.save_steps)
            if target >= steps - 3:
                print(f"chaos: out of steps before fault {len(events) + 1} ({kind}); ending the schedule")
                break
            pid, step = wait_for(
                lambda: (p := watch.step_now())[1] >= target and p, 180, f"step {target}", progress=moved
            )
            if not batch_changed:
                take_weights(out, taken)
            if kind in INSTANT_KINDS:
                # A real fault strikes at any moment of a step, not the instant its heartbeat lands
                # (which is just before the step's snapshot is written: the one moment a kill always
                # costs that step).
                time.sleep(rng.uniform(0.0, watch.step_seconds(pid)))
                now_pid, now_step = watch.step_now()
                if now_pid == pid:
                    step = now_step
            attempts_before = len((protocol.read_json(protocol.state_path(out)) or {}).get("attempts") or [])
            ev = inject(kind, out, cfg_path, pid, step, sup, watch, truncated, work)
            if ev.kind == "supervisor_kill":
                sup = ev.detail_proc  # type: ignore[attr-defined]
                watch.own.add(sup.pid)
            if kind == "oom":
                oom_budget -= 1
                batch_changed = True
            events.append(ev)
            print(f"chaos: {len(events):2d} {ev.kind:<20s} at step {ev.step:4d} {ev.detail}", flush=True)
        code = wait_exit(sup, 180, out)
    finally:
        watch.stop.set()
        th.join()
        if sup.poll() is None:
            sup.kill()
        if sys.exc_info()[0] is not None and reference.proc.poll() is None:
            reference.proc.kill()
            reference.proc.wait()
    chaos_wall = time.monotonic() - t_start
    ref_report, ref_wall = reference.finish()
    exact_checked = check_exact(taken, ref_out, misses)
    state = protocol.read_json(protocol.state_path(out)) or {}
    attempts = state.get("attempts") or []
    finish_events(events, attempts, watch)
    check_final(a, out, ref_out, ref_report, state, code, watch, events, truncated, misses, tracking, steps)
    print_table(events, ref_wall, chaos_wall, steps, watch, exact_checked, a.snapshots)
    if a.short:
        print("(--short: the reference ran beside the chaos run, so neither goodput figure measures anything)")
    print_product(state, ref_wall, chaos_wall, events)
    if a.report:
        from supervisor.report import render

        png, page = render(out)
        shutil.copy(png, work / "report.png")
        shutil.copy(page, work / "report.html")
        shutil.copy(protocol.state_path(out), work / "state.json")
        print(f"chaos: report {png} and {page}")
    if misses:
        print("\nCHAOS FAILED:")
        for m in misses:
            print("  -", m)
        return 1
    print(f"\nchaos: all checks passed ({len(events)} faults)")
    return 0


def inject(
    kind: str,
    out: Path,
    cfg_path: Path,
    pid: int,
    step: int,
    sup: subprocess.Popen[bytes],
    watch: Watch,
    truncated: set[str],
    work: Path,
) -> Event:
    now = time.monotonic
    if kind in ("sigkill", "sigsegv", "sigterm", "sigint"):
        sig = {"sigkill": signal.SIGKILL, "sigsegv": signal.SIGSEGV, "sigterm": signal.SIGTERM, "sigint": signal.SIGINT}
        if kind == "sigsegv":
            # The default action of SIGSEGV, as when the worker faults itself; no core file in the repo.
            resource.prlimit(pid, resource.RLIMIT_CORE, (0, 0))
        ev = Event(kind, now(), step, pid)
        os.kill(pid, sig[kind])
        return ev
    if kind == "kill_during_save":
        hb = wait_for(
            lambda: (
                (h := protocol.read_json(protocol.heartbeat_path(out)) or {}).get("state") == "saving"
                and h.get("pid") == pid
                and h
            ),
            120,
            "a save",
            progress=lambda: run_progress(out),
        )
        ev = Event(kind, now(), hb["global_step"], pid)
        os.kill(pid, signal.SIGKILL)
        mid = bool(list(out.glob(".staging-checkpoint-*")))
        ev.detail = MID_SAVE if mid else "(save had just finished)"
        return ev
    if kind == "hang":
        ev = Event(kind, now(), step, pid)
        os.kill(pid, signal.SIGSTOP)
        return ev
    if kind == "oom":
        # Cap the running worker's address space just above what it uses: its next sizeable
        # allocation fails inside torch's CPU allocator, exactly as a real OOM does.
        # The floor of its address space over a few steps, not one sample: a sample taken while a
        # step's transient buffers (the snapshot's copy among them, ~1 MiB each step) are mapped
        # leaves room for the whole loop, and then no allocation ever fails.
        proc = psutil.Process(pid)
        samples = []
        for _ in range(20):  # about 0.2 s: several steps of the tiny model
            samples.append(proc.memory_info().vms)
            time.sleep(0.01)
        vsz = min(samples)
        lim = vsz + (256 << 10)
        ev = Event(kind, now(), step, pid, detail=f"(address space capped at {lim >> 20} MiB)")
        resource.prlimit(pid, resource.RLIMIT_AS, (lim, lim))
        return ev
    if kind == "truncate_checkpoint":
        ck = newest_ckpt(out)
        ev = Event(kind, now(), step, pid)
        if ck is not None:
            f = ck / "model.safetensors"
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
            truncated.add(ck.name)
            ev.detail = f"({ck.name}/model.safetensors cut in half, then SIGKILL)"
        os.kill(pid, signal.SIGKILL)
        return ev
    if kind == "supervisor_kill":
        ev = Event(kind, now(), step, pid)
        os.kill(sup.pid, signal.SIGKILL)
        sup.wait()
        new = supervisor(cfg_path, work / "supervisor.log")
        ev.detail = f"(supervisor {sup.pid} killed; new supervisor {new.pid})"
        ev.detail_proc = new  # type: ignore[attr-defined]
        return ev
    if kind == "low_disk":
        ballast = out.parent / "ballast"
        st = os.statvfs(out)
        free = st.f_bavail * st.f_frsize
        ev = Event(kind, now(), step, pid)
        with open(ballast, "wb") as f:
            f.truncate(0)
            f.write(b"\0" * max(0, free - (1 << 20)))
        try:
            wait_for(
                lambda: (protocol.read_json(protocol.heartbeat_path(out)) or {}).get("state") == "waiting_for_disk",
                60,
                "waiting_for_disk",
                progress=lambda: run_progress(out),
            )
            ev.detected = now()
            time.sleep(0.5)  # hold the disk full for a moment: training must stay paused
        finally:
            ballast.unlink()
        ev.detail = "(tmpfs filled by a ballast file, freed after the pause)"
        ev.freed = now()  # type: ignore[attr-defined]
        return ev
    raise ValueError(kind)


def finish_events(events: list[Event], attempts: list[dict[str, Any]], watch: Watch) -> None:
    for ev in events:
        if ev.kind == "low_disk":
            nxt = next((ts for ts, p, s in watch.steps if ts > ev.freed and s > ev.step), None)  # type: ignore
            ev.recovered = nxt
            continue
        att = next((x for x in attempts if x.get("pid") == ev.pid), None)
        if att is not None and att.get("end"):
            ev.detected = ev.t + max(0.0, att["end"] - ev.wall)  # state.json times are wall clock
        nxt = watch.first_step_after(ev.t, ev.pid)
        if nxt is not None:
            ev.recovered, _ = nxt
        following = [x for x in attempts if x.get("start") and att is not None and x["attempt"] > att["attempt"]]
        if following:
            ev.resumed_from = resumed_step(following[0])
            if att.get("step_reached") is not None:
                ev.step = max(ev.step, int(att["step_reached"]))  # the step the worker really died at


_RESUMED = re.compile(r"Training will resume from (?:snapshot step (\d+)|checkpoint: \S*checkpoint-(\d+))")


def resumed_step(attempt: dict[str, Any]) -> int | None:
    """The step an attempt resumed from, by its worker's own log line (snapshot or checkpoint).

    Not ``step_start`` in ``state.json``: the supervisor records the newest disk checkpoint at
    launch there, and the worker then takes a newer snapshot when there is one.
    """
    try:
        text = Path(attempt.get("log") or "").read_text(errors="replace")
    except OSError:
        text = ""
    m = _RESUMED.search(text)
    if m:
        return int(m.group(1) or m.group(2))
    step = attempt.get("step_start")
    return int(step) if isinstance(step, int) else None


class Reference:
    """The uninterrupted reference run: a plain worker with the same config but for its own folders,
    started at once (beside the chaos run with ``--short``); :meth:`finish` waits for it."""

    def __init__(self, cfg: Path, out: Path, log: Path) -> None:
        self.out, self.log = out, log
        self.t0 = time.time()
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(
                [PY, "-m", "worker", str(cfg)],
                cwd=REPO,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, OMP_NUM_THREADS="1"),
            )
        self.wall: float | None = None

    def finish(self) -> tuple[dict[str, Any], float]:
        """(its exit report, its wall time); SystemExit when it failed."""
        report = self.out / "run" / "exit_report.json"
        if self.wall is None:
            wait_exit(self.proc, 180, self.out)
            if self.proc.returncode != 0:
                print(self.log.read_text(errors="replace")[-5000:])
                raise SystemExit(f"chaos: the reference run failed (exit {self.proc.returncode})")
            # Start to its exit report (its last write), however long ago it ended.
            self.wall = report.stat().st_mtime - self.t0
            print(f"chaos: reference run {self.wall:.1f}s", flush=True)
        return json.loads(report.read_text()), self.wall


def take_weights(out: Path, taken: list[tuple[str, dict[str, Any]]]) -> None:
    """Keep the weights of the chaos run's newest checkpoint as they are now, for :func:`check_exact`
    (the run rotates and truncates checkpoints; the reference may not have reached that step yet)."""
    from safetensors.numpy import load_file

    ck = newest_ckpt(out)
    if ck is None or any(name == ck.name for name, _ in taken):
        return
    try:
        taken.append((ck.name, load_file(str(ck / "model.safetensors"))))
    except Exception:
        return  # racing a rotation or a truncation; the next look covers it


def check_exact(taken: list[tuple[str, dict[str, Any]]], ref_out: Path, misses: list[str]) -> int:
    """Compare the weights kept by :func:`take_weights` with the reference's checkpoints of the same
    steps; the number compared (a checkpoint of a step the reference did not save, one committed from
    a snapshot between two saves, is not)."""
    from safetensors.numpy import load_file

    n = 0
    for name, w in taken:
        try:
            ref = load_file(str(ref_out / name / "model.safetensors"))
        except (OSError, ValueError):
            continue
        n += 1
        if w.keys() != ref.keys() or not all((w[k] == ref[k]).all() for k in w):
            misses.append(f"{name} differs from the uninterrupted reference run's {name}")
    return n


def check_final(
    a: argparse.Namespace,
    out: Path,
    ref_out: Path,
    ref_report: dict[str, Any],
    state: dict[str, Any],
    code: int,
    watch: Watch,
    events: list[Event],
    truncated: set[str],
    misses: list[str],
    tracking: bool,
    steps: int,
) -> None:
    if code != 0 or state.get("state") != "completed":
        misses.append(f"supervisor ended with exit {code}, state {state.get('state')}: {state.get('last_error')}")
    reports = sorted((out / "run").glob("exit-*.json"), key=lambda p: p.stat().st_mtime)
    final = json.loads(reports[-1].read_text()) if reports else {}
    if final.get("reason") != "completed" or final.get("step") != steps:
        misses.append(
            f"final exit report is {final.get('reason')} at step {final.get('step')}, wanted completed at {steps}"
        )
    attempts = state.get("attempts") or []
    eff = {(x.get("per_device_train_batch_size") or 0) * (x.get("gradient_accumulation_steps") or 0) for x in attempts}
    if len(eff) != 1:
        misses.append(f"the effective batch changed across attempts: {sorted(eff)}")
    if any(e.kind == "oom" for e in events):
        ra = ref_report.get("metrics", {}).get("eval_accuracy")
        ca = final.get("metrics", {}).get("eval_accuracy")
        if ra is None or ca is None or abs(ra - ca) > a.tolerance:
            misses.append(f"final eval accuracy {ca} vs reference {ra}: beyond tolerance {a.tolerance}")
    elif (out / f"checkpoint-{steps}").is_dir() and not weights_equal(
        out / f"checkpoint-{steps}", ref_out / f"checkpoint-{steps}"
    ):
        misses.append("final weights differ from the reference although no fault changed the batch")
    if tracking:
        ids = {p.name.rsplit("-", 1)[-1] for p in (out / "run" / "wandb").glob("offline-run-*")}
        if len(ids) != 1:
            misses.append(f"tracker run ids: {sorted(ids)} (wanted exactly one)")
    # No checkpoint was loaded that did not validate: every "resume from" line names a checkpoint
    # that was not corrupted at that time; the corrupted ones must have been set aside.
    for log in (out / "run" / "logs").glob("attempt-*.log"):
        for m in re.finditer(r"resume from checkpoint: (\S+)", log.read_text(errors="replace")):
            if Path(m.group(1)).name in truncated and Path(m.group(1)).is_dir():
                misses.append(f"{log.name} resumed from {m.group(1)}, which had been corrupted")
    aside = (
        {p.name.split(".")[0] for p in (out / "set-aside").glob("checkpoint-*")}
        if (out / "set-aside").is_dir()
        else set()
    )
    for name in truncated:
        if name not in aside and (out / name).is_dir():
            misses.append(f"corrupted {name} was neither set aside nor replaced")
    if watch.max_workers > 1:
        misses.append(f"{watch.max_workers} workers ran at once")
    for ev in events:
        if ev.resumed_from is None:
            continue
        if a.snapshots and ev.kind == "kill_during_save" and ev.detail == MID_SAVE:
            allowed = 0  # the step being saved was snapshotted before its save began
        elif a.snapshots and ev.kind not in BATCH_CHANGING:
            allowed = a.snapshots  # the snapshot of the last step (of every N-th) covers any fault
        else:
            allowed = a.save_steps * (2 if ev.kind == "truncate_checkpoint" else 1)
        if ev.step - ev.resumed_from > allowed:
            misses.append(f"{ev.kind} at step {ev.step} resumed from {ev.resumed_from}: lost more than {allowed} steps")


def print_table(
    events: list[Event],
    ref_wall: float,
    chaos_wall: float,
    steps: int,
    watch: Watch,
    exact_checked: int,
    snapshots: int,
) -> None:
    print(f"\n{'fault':<20} {'count':>5} {'detect s':>9} {'recover s':>10} {'steps lost':>11}")
    lost_total = 0
    for kind in KINDS:
        evs = [e for e in events if e.kind == kind]
        if not evs:
            continue
        det = [e.detected - e.t for e in evs if e.detected is not None]
        rec = [e.recovered - e.t for e in evs if e.recovered is not None]
        lost = [max(0, e.step - e.resumed_from) for e in evs if e.resumed_from is not None]
        lost_total += sum(lost)

        def med(xs: list[float]) -> str:
            return f"{statistics.median(xs):.2f}" if xs else "-"

        print(
            f"{kind:<20} {len(evs):>5} {med(det):>9} {med(rec):>10} "
            f"{(f'{sum(lost)} ({max(lost)} max)' if lost else '-'):>11}"
        )
    goodput = ref_wall / chaos_wall if chaos_wall else 0.0
    print(
        f"\nreference wall {ref_wall:.1f}s, chaos wall {chaos_wall:.1f}s: goodput {goodput:.2f}; "
        f"{lost_total} of {steps + lost_total} optimizer steps were redone "
        f"(lost-work share {lost_total / (steps + lost_total):.2%}, snapshots "
        f"{f'every {snapshots} step(s); goal <= 0.1 %' if snapshots else 'off'}); exactness checked at {exact_checked} "
        f"checkpoints; most workers at once: {watch.max_workers}"
    )


def print_product(state: dict[str, Any], ref_wall: float, chaos_wall: float, events: list[Event]) -> None:
    """The product's own goodput accounting of the chaos run, beside the external figures: the
    reference ratio, and the share not lost measured here (1 - each fault -> the first new step after it)."""
    raw = state.get("goodput")
    buckets = goodput.clean(raw if isinstance(raw, dict) else None)
    whole = goodput.total(buckets)
    if whole <= 0:
        print("product goodput: none recorded in state.json")
        return
    share = goodput.fault_free_share(buckets) or 0.0
    external = ref_wall / chaos_wall if chaos_wall else 0.0
    outside = 1 - sum(e.recovered - e.t for e in events if e.recovered is not None) / chaos_wall
    spent = ", ".join(f"{b} {buckets[b]:.1f}s" for b in goodput.BUCKETS if buckets[b] > 0)
    print(
        f"product accounting: {whole:.1f}s booked of {chaos_wall:.1f}s wall ({whole / chaos_wall:.3f}); "
        f"goodput {goodput.ratio(buckets):.3f}; share not lost to faults {share:.3f}, measured here "
        f"{outside:.3f} ({share - outside:+.3f}: 1 - the faults' recover s / chaos wall); reference ratio "
        f"{external:.3f} (plain worker, another moment's load); {spent}"
    )


if __name__ == "__main__":
    sys.exit(main())
