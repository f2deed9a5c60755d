#!/usr/bin/env python3
"""Supervisor footprint: its RSS and CPU while the worker trains, and ``vit-supervisor status`` latency.

    python bench/footprint.py                   # 15 s of sampling per heartbeat interval, 20 status calls
    python bench/footprint.py --seconds 30 --calls 40

Starts ``vit-supervisor start`` on a small from-scratch ViT (the recovery benchmark's config,
standby on), once with a heartbeat at every step (about 70 steps/s: the supervisor's busiest
case) and once with the default ``heartbeat_interval_s`` of 1 s, waits until the worker
trains and the standby is ready, then samples every process of the run with psutil: RSS and
CPU (user+system time over the window ÷ wall time, 100 % = one core). The worker and the
standby are shown beside the supervisor. Then times ``vit-supervisor status CONFIG`` (the
whole process, wall clock) ``--calls`` times while the worker still trains, interleaved with
``python -c pass`` as the interpreter's own start-up floor.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c
from recovery import CONFIG, ready, teardown

from supervisor import protocol


def sample(pids: dict[str, int], seconds: float) -> dict[str, dict[str, float]]:
    """RSS (median, max) and CPU% over ``seconds`` for each named pid."""
    procs = {name: psutil.Process(pid) for name, pid in pids.items()}
    t0 = time.monotonic()
    cpu0 = {n: sum(p.cpu_times()[:2]) for n, p in procs.items()}
    rss: dict[str, list[int]] = {n: [] for n in procs}
    while time.monotonic() - t0 < seconds:
        for n, p in procs.items():
            rss[n].append(p.memory_info().rss)
        time.sleep(0.25)
    wall = time.monotonic() - t0
    return {
        n: {
            "rss_mib": statistics.median(rss[n]) / 2**20,
            "rss_max_mib": max(rss[n]) / 2**20,
            "cpu_pct": 100 * (sum(p.cpu_times()[:2]) - cpu0[n]) / wall,
        }
        for n, p in procs.items()
    }


def timed(argv: list[str], environ: dict[str, str]) -> tuple[float, int]:
    t0 = time.monotonic()
    r = subprocess.run(argv, env=environ, cwd=c.REPO, capture_output=True)
    return time.monotonic() - t0, r.returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument(
        "--heartbeat-intervals",
        default="0,1",
        help="supervisor.heartbeat_interval_s values to sample under (default 0,1; 1 is the default)",
    )
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args(argv)
    c.banner("Supervisor footprint and status latency")
    work = c.work_dir("footprint", a.workdir)
    environ = c.env(XDG_STATE_HOME=str(work / "state"))
    rows, ratios, codes = [], [], set()
    lat: list[float] = []
    base: list[float] = []
    for hb_s in [float(x) for x in a.heartbeat_intervals.split(",")]:
        name = f"hb{hb_s:g}"
        cfg = c.write_config(
            work / f"{name}.yaml",
            c.deep_update(CONFIG, {"training": {"output_dir": name}, "supervisor": {"heartbeat_interval_s": hb_s}}),
        )
        out = c.output_dir(cfg)
        sup = c.spawn(c.supervisor_argv(cfg), work / f"{name}.log", environ)
        try:
            c.wait_for(
                lambda: ready("supervisor", out, 30),
                240,
                "a training worker and a ready standby",
                progress=lambda: c.run_progress(out),
            )
            time.sleep(1.0)
            st = protocol.read_json(protocol.state_path(out)) or {}
            pids = {"supervisor": sup.pid, "worker": st["worker_pid"], "standby (idle)": st["standby"]["pid"]}
            steps0 = c.heartbeat(out).get("global_step") or 0
            fig = sample(pids, a.seconds)
            steps = (c.heartbeat(out).get("global_step") or 0) - steps0
            if not lat:  # status latency once, while this worker trains
                status_argv = [str(Path(c.PY).with_name("vit-supervisor")), "status", str(cfg)]
                for _ in range(a.calls):
                    dt, rc = timed(status_argv, environ)
                    lat.append(dt)
                    codes.add(rc)
                    base.append(timed([c.PY, "-c", "pass"], environ)[0])
        finally:
            teardown(sup)
        rows += [[f"{hb_s:g} s", n, f["rss_mib"], f["rss_max_mib"], f["cpu_pct"]] for n, f in fig.items()]
        s, w = fig["supervisor"], fig["worker"]
        ratios.append(
            f"heartbeat_interval_s {hb_s:g}: supervisor/worker RSS {s['rss_mib'] / w['rss_mib']:.3f}, "
            f"CPU {s['cpu_pct'] / max(w['cpu_pct'], 1e-9):.4f} ({steps / a.seconds:.0f} steps/s "
            f"over {a.seconds:.0f}s)"
        )
    print(c.table(["heartbeat_interval_s", "process", "RSS MiB (median)", "RSS MiB (max)", "CPU % of one core"], rows))
    print("\n" + "\n".join(ratios) + "\n")
    ml, mb = statistics.median(lat), statistics.median(base)
    print(
        c.table(
            ["command", "calls", "median ms", "min ms", "max ms", "x python -c pass"],
            [
                ["vit-supervisor status CONFIG", len(lat), 1000 * ml, 1000 * min(lat), 1000 * max(lat), ml / mb],
                ["python -c pass (floor)", len(base), 1000 * mb, 1000 * min(base), 1000 * max(base), 1.0],
            ],
        )
    )
    print(f"\nstatus exit codes seen: {sorted(codes)} (0 = running); work dir {work}")
    return 0 if codes == {0} else 1


if __name__ == "__main__":
    sys.exit(main())
