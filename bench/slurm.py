#!/usr/bin/env python3
"""SLURM's time-limit signal: how long from the signal to the committed checkpoint, to the job's
exit, and from the requeued job's start to its first new step.

    python bench/slurm.py                           # configs/demo.yaml, 3 rounds
    python bench/slurm.py --config configs/tiny.yaml --rounds 5

Runs against a private single-node SLURM on this machine (tests/slurm_cluster.py: Debian's
munge, slurmctld and slurmd; installed with apt when missing; root only). Each round submits
the shipped template (systemd/vit-supervisor.sbatch) with the config (its own output folder,
a heartbeat at every step, enough epochs), waits until the worker has trained for
``--train-s`` seconds, then sends the signal the way ``--signal=B:USR1@N`` does:
``scancel --signal=USR1 --batch JOB`` (SIGUSR1 to the batch script, which is the supervisor). A
real time limit would time the signal only to SLURM's 30-s resolution; the delivery path is the
same. The requeued job starts again by itself once SLURM's requeue delay is over (the job
credential's lifetime + 1 s: 11 s on this cluster, 121 s with SLURM's default ``cred_expire``);
the round waits for its first new step, and cancels it.

Measured, all on this machine's wall clock (the supervisor's and worker's log timestamps):
  signal -> seen        the supervisor's "signal" log line
  signal -> checkpoint  the worker's "Committed checkpoint" line of the stop
  signal -> worker out  the supervisor's line on the worker's exit
  signal -> requeued    the supervisor's "slurm requeued" line (after the worker exited)
  signal -> exit        the supervisor's last line, just before the job's batch step ends
  requeue -> start      SLURM's requeue delay: the requeue to the requeued job's batch script start
                        (the template's timestamp); set by the cluster (cred_expire + 1 s)
  start -> supervisor   the batch script start to the supervisor's first line
  start -> first step   the requeued job's batch script start to its
                        worker's first new optimizer step (state.json's first_step_at)
  steps lost            the step the stop reached minus the step the requeued job resumed from
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import banner, deep_update, env, say, table
from supervisor.host import poll_until
from supervisor.protocol import read_json

TEMPLATE = REPO / "systemd" / "vit-supervisor.sbatch"
_WORKER_TIME = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO vit_train: Committed checkpoint checkpoint-(\d+)"
)
_SCRIPT_START = re.compile(r"vit-supervisor\.sbatch: job \d+ \(restart (\d+)\) on \S+ at (\S+):")


def _local(stamp: str) -> float:
    """A local-time ISO timestamp (the logs') as epoch seconds."""
    return datetime.datetime.fromisoformat(stamp.replace(",", ".")).timestamp()


def _events(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def _config(src: Path, d: Path) -> Path:
    raw = yaml.safe_load(src.read_text())
    raw = deep_update(
        raw,
        {
            "training": {"output_dir": str(d / "out"), "num_train_epochs": 50},
            "supervisor": {"heartbeat_interval_s": 0.0},
            "snapshot": {"root": str(d / "shm")},
        },
    )
    path = d / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def one_round(cluster: Any, src: Path, d: Path, train_s: float, stall: float) -> dict[str, Any]:
    d.mkdir(parents=True)
    cfg = _config(src, d)
    out = d / "out"
    job_env = env(VIT_SUPERVISOR=f"{sys.executable} -m supervisor.cli", PYTHONPATH=str(REPO), XDG_STATE_HOME=str(d))
    for k in [k for k in job_env if k.startswith("SLURM_")]:
        del job_env[k]
    job = cluster.sbatch(
        TEMPLATE,
        "--time=30",
        f"--chdir={d}",
        "--cpus-per-task=1",
        f"--output={d}/slurm-%j.out",
        args=[str(cfg)],
        env=job_env,
    )
    log = d / f"slurm-{job}.out"

    def state() -> dict[str, Any]:
        return read_json(out / "run" / "state.json") or {}

    def hb() -> dict[str, Any]:
        return read_json(out / "run" / "heartbeat.json") or {}

    first = poll_until(lambda: (state().get("attempts") or [{}])[0].get("first_step_at"), stall, interval=0.05)
    if not first:
        raise SystemExit(f"no first step within {stall:.0f}s; see {log}")
    time.sleep(max(0.0, first + train_s - time.time()))
    step_at_signal = hb().get("global_step")
    t_signal = time.time()
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    if not poll_until(
        lambda: int(cluster.job(job).get("Restarts", "0") or 0) >= 1,
        stall,
        interval=0.1,
    ):
        raise SystemExit(f"job {job} was not requeued within {stall:.0f}s; see {log}")

    def resumed() -> float | None:
        atts = state().get("attempts", [])
        return atts[-1].get("first_step_at") if len(atts) >= 2 else None

    if not poll_until(resumed, stall, interval=0.05):
        raise SystemExit(f"the requeued job made no step within {stall:.0f}s; see {log}")
    cluster.run("scancel", job)
    poll_until(lambda: cluster.job(job).get("JobState") in ("CANCELLED", "COMPLETED"), stall, interval=0.2)

    st = state()
    stop, again = st["attempts"][0], st["attempts"][-1]
    events = _events(log)
    seen = next(_local(e["timestamp"]) for e in events if e.get("event") == "signal")
    requeued = next(
        _local(e["timestamp"]) for e in events if e.get("event") == "slurm" and e.get("action") == "requeued"
    )
    exits = [_local(e["timestamp"]) for e in events if e.get("event") == "exit" and "code" in e]
    worker_out = next(
        _local(e["timestamp"]) for e in events if e.get("event") == "exit" and e.get("pid") == stop["pid"]
    )
    worker_log = Path(stop["log"]).read_text(errors="replace")
    commits = [(_local(m.group(1)), int(m.group(2))) for m in map(_WORKER_TIME.match, worker_log.splitlines()) if m]
    committed = next(t for t, step in commits if step == stop["step_reached"])
    starts = {int(m.group(1)): _local(m.group(2)) for m in map(_SCRIPT_START.search, log.read_text().splitlines()) if m}
    return {
        "job": job,
        "step_at_signal": step_at_signal,
        "stop_step": stop["step_reached"],
        "resume_step": again["step_start"],
        "seen_s": seen - t_signal,
        "checkpoint_s": committed - t_signal,
        "worker_exit_s": worker_out - t_signal,
        "requeued_s": requeued - t_signal,
        "exit_s": exits[0] - t_signal,
        "requeue_to_start_s": starts[1] - requeued,
        "start_to_step_s": again["first_step_at"] - starts[1],
        "start_to_supervisor_s": next(
            _local(e["timestamp"])
            for e in events
            if e.get("event") == "slurm" and "requeue_signal" in e and e["resumes"]
        )
        - starts[1],
        "launch_to_step_s": again["first_step_at"] - again["start"],
        "load": os.getloadavg()[0],
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train-s", type=float, default=5.0, help="train this long before the signal (default 5)")
    ap.add_argument("--stall", type=float, default=180.0, help="give up a wait after this many seconds")
    ap.add_argument(
        "--workdir", type=Path, help="keep the runs and the cluster's logs here (default: a temporary folder)"
    )
    args = ap.parse_args()
    # A SIGTERM (a timeout, a kill) must still stop the private cluster: the finally below.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    from tests.slurm_cluster import SlurmCluster, ensure_installed

    try:
        ensure_installed()
    except BaseException as exc:  # pytest.skip's exception: the reason is its message
        if type(exc).__name__ != "Skipped":
            raise
        raise SystemExit(f"bench/slurm.py: {exc}") from None
    banner("SLURM time-limit signal: checkpoint, requeue, resume")
    load_before = os.getloadavg()
    rows = []
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    tmp = str(args.workdir.resolve() if args.workdir else tempfile.mkdtemp(prefix="vit-bench-slurm-"))
    cluster = SlurmCluster(Path(tmp) / "cluster")
    try:
        cluster.start()
        for n in range(args.rounds):
            r = one_round(cluster, args.config.resolve(), Path(tmp) / f"round-{n}", args.train_s, args.stall)
            say(f"round {n + 1}: {r}")
            rows.append(r)
    finally:
        cluster.stop()
    load_after = os.getloadavg()
    cols = (
        "seen_s",
        "checkpoint_s",
        "worker_exit_s",
        "requeued_s",
        "exit_s",
        "requeue_to_start_s",
        "start_to_supervisor_s",
        "start_to_step_s",
    )
    names = {
        "seen_s": "signal -> seen",
        "checkpoint_s": "-> checkpoint",
        "worker_exit_s": "-> worker out",
        "requeued_s": "-> requeued",
        "exit_s": "-> exit",
        "requeue_to_start_s": "requeue -> start",
        "start_to_supervisor_s": "start -> supervisor up",
        "start_to_step_s": "start -> first new step",
    }
    print(f"config: {args.config} (heartbeat every step, its own output folder); {args.rounds} rounds")
    print(
        f"load average before: {load_before[0]:.2f} {load_before[1]:.2f}; after: {load_after[0]:.2f} {load_after[1]:.2f}\n"
    )
    print(
        table(
            ["round", "step at signal", "stop step", "resumed from", *(names[c] for c in cols), "load"],
            [
                [i + 1, r["step_at_signal"], r["stop_step"], r["resume_step"], *(r[c] for c in cols), r["load"]]
                for i, r in enumerate(rows)
            ],
        )
    )
    print()
    print(
        table(
            ["median", *(names[c] for c in cols)],
            [["", *(statistics.median(r[c] for r in rows) for c in cols)]],
        )
    )
    lost = [r["stop_step"] - r["resume_step"] for r in rows]
    print(f"\nseconds; steps lost to the cut: {lost}")
    print(f"runs and the cluster's logs: {tmp}")
    return 0 if all(n == 0 for n in lost) else 1


if __name__ == "__main__":
    sys.exit(main())
