#!/usr/bin/env python3
"""Goodput: the same supervised run uninterrupted and with a SIGKILL of its worker every minute.

    python bench/goodput.py                    # 3 rounds, configs/demo.yaml x 40 epochs, a kill every 60 s
    python bench/goodput.py --rounds 5 --every 60
    python bench/goodput.py --quick            # smoke run: 1 round of 3 epochs, a kill every 15 s

Each round runs ``vit-supervisor start`` on configs/demo.yaml as shipped (wandb offline,
evaluation and a checkpoint every epoch, the standby worker on) with snapshots at every
step (``snapshot.every_steps: 1``) and more epochs, twice: first uninterrupted (the
reference), then with the worker SIGKILLed every ``--every`` seconds while it trains
(faulted). Time is from launching the supervisor to its exit (run completed, final model
saved). Goodput of a round = reference time / faulted time: 1.0 means the kills cost
nothing. Rounds alternate reference and faulted runs so that a change in the machine's
load hits both; the figure to quote is the median over rounds, with the load average.

Also per round: kills, how many were taken over by the standby, steps redone (the killed
worker's last heartbeat step − the step its successor resumed from; a lower bound, the
heartbeat being written every second) and the recoveries (kill → first new step, from
the supervisor's record).

Beside that external measurement, the product's own accounting (``goodput`` in each run's
``run/state.json``, see supervisor/goodput.py): its wall time (the buckets' sum, against the
time measured here), its goodput (training ÷ total) for both runs, and its share of the
faulted run not lost to faults (1 − redo, restart, detection, backoff, disk wait and
unsupervised time ÷ total): the figure an uninterrupted run of the same work would take as a
share of the faulted one, i.e. the product's own estimate of reference time ÷ faulted time,
measured from the faulted run alone. The same share is measured from outside too, without a
reference run (whose machine load differs): 1 − the time from each kill until a new worker's
heartbeat is back at the step reached before it ÷ the faulted wall time. "agree" is the
product's share − that one.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c
from recovery import base_config

from supervisor import goodput, protocol

_RESUMED = re.compile(r"resume from (?:snapshot step (\d+)|checkpoint: \S*checkpoint-(\d+))")


def run_once(cfg: Path, log: Path, environ: dict[str, str], every: float | None) -> dict[str, Any]:
    """Run the supervisor to its end, killing its worker every ``every`` s; the run's figures."""
    out = c.output_dir(cfg)
    t0 = time.monotonic()
    p = c.spawn(c.supervisor_argv(cfg), log, environ)
    kills: list[tuple[float, int, int]] = []  # (wall time, pid, heartbeat step)
    first_seen: dict[int, int] = {}  # pid -> its first training heartbeat's step
    seen: list[tuple[float, int, int]] = []  # every heartbeat (pid, step) change: (its write time, pid, step)
    next_kill = t0 + every if every else None
    try:
        while p.poll() is None:
            hb = c.heartbeat(out)
            pid, step = hb.get("pid"), int(hb.get("global_step") or 0)
            if isinstance(pid, int) and hb.get("state") == protocol.HB_TRAINING:
                first_seen.setdefault(pid, step)  # the step it starts training from
                if not seen or seen[-1][1:] != (pid, step):
                    seen.append((float(hb.get("time") or time.time()), pid, step))
            # Only a worker that has made a step of its own: a kill during a restart is another fault.
            if (
                next_kill is not None
                and time.monotonic() >= next_kill
                and isinstance(pid, int)
                and hb.get("state") == protocol.HB_TRAINING
                and step > first_seen.get(pid, step)
                and pid not in {k[1] for k in kills}
            ):
                try:
                    os.kill(pid, signal.SIGKILL)
                    kills.append((time.time(), pid, step))
                    next_kill += every  # type: ignore[operator]
                except ProcessLookupError:
                    pass
            if time.monotonic() - t0 > 3600:
                raise TimeoutError(f"the run in {out} did not end within an hour; see {log}")
            time.sleep(0.05)
    finally:
        if p.poll() is None:
            c.kill_group(p)
    elapsed = time.monotonic() - t0
    st = protocol.read_json(protocol.state_path(out)) or {}
    if p.returncode != 0 or st.get("state") != "completed":
        raise SystemExit(f"the run in {out} ended with exit {p.returncode}, state {st.get('state')}; see {log}")
    lost = fault_cost(kills, seen)
    return {"seconds": elapsed, "fault_s": lost, **_attempts(st, kills), **product(st)}


def fault_cost(kills: list[tuple[float, int, int]], seen: list[tuple[float, int, int]]) -> float:
    """Seconds the kills cost, measured from outside: from each kill until a later worker's heartbeat
    is back at the highest step any heartbeat showed before it (cut short by the next kill)."""
    cost, killed = 0.0, set()
    for i, (t_kill, pid, _) in enumerate(kills):
        killed.add(pid)
        high = max((s for t, _, s in seen if t <= t_kill), default=0)
        back = next((t for t, p, s in seen if t > t_kill and p not in killed and s >= high), None)
        ends = [x for x in (back, kills[i + 1][0] if i + 1 < len(kills) else None) if x is not None]
        cost += max(0.0, min(ends) - t_kill) if ends else 0.0
    return cost


def product(st: dict[str, Any]) -> dict[str, Any]:
    """The product's own figures from a finished run's state.json: its wall time, goodput and fault-free share."""
    buckets = goodput.clean(st.get("goodput") if isinstance(st.get("goodput"), dict) else None)
    return {
        "buckets": buckets,
        "product_s": goodput.total(buckets),
        "product_goodput": goodput.ratio(buckets),
        "fault_free": goodput.fault_free_share(buckets),
    }


def _attempts(st: dict[str, Any], kills: list[tuple[float, int, int]]) -> dict[str, Any]:
    """Per kill: the successor's take-over kind, steps redone and recovery time."""
    attempts = st.get("attempts") or []
    by_pid = {a.get("pid"): i for i, a in enumerate(attempts)}
    redone, recovery, standby = [], [], 0
    for t_kill, pid, step in kills:
        i = by_pid.get(pid)
        if i is None or i + 1 >= len(attempts):
            continue
        nxt = attempts[i + 1]
        standby += bool(nxt.get("standby"))
        resumed = _resumed_step(nxt.get("log"))
        if resumed is not None:
            redone.append(max(0, max(step, attempts[i].get("step_reached") or 0) - resumed))
        if nxt.get("first_step_at"):
            recovery.append(nxt["first_step_at"] - t_kill)
    return {"kills": len(kills), "standby": standby, "redone": redone, "recovery": recovery}


def _resumed_step(log: str | None) -> int | None:
    try:
        text = Path(log or "").read_text(errors="replace")
    except OSError:
        return None
    m = _RESUMED.search(text)
    return int(m.group(1) or m.group(2)) if m else 0 if "starting from scratch" in text else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="reference + faulted pairs (default 3)")
    ap.add_argument("--every", type=float, default=60.0, help="seconds between kills (default 60)")
    ap.add_argument("--epochs", type=int, default=40, help="training.num_train_epochs (default 40)")
    ap.add_argument("--config", type=Path, default=c.REPO / "configs" / "demo.yaml")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, 3 epochs, a kill every 15 s")
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.quick:
        a.rounds, a.epochs, a.every = 1, 3, 15.0
    c.banner("Goodput: uninterrupted vs a SIGKILL of the worker every minute, under vit-supervisor")
    work = c.work_dir("goodput", a.workdir)
    environ = c.env(XDG_STATE_HOME=str(work / "state"))
    base = base_config(a.config)
    rows, ratios, gaps = [], [], []
    bucket_rows: list[list[Any]] = []
    for rnd in range(a.rounds):
        figures = {}
        for kind, every in (("reference", None), ("faulted", a.every)):
            over = {
                "training": {"output_dir": f"{kind}-{rnd}", "num_train_epochs": a.epochs},
                "snapshot": {"every_steps": 1},
            }
            cfg = c.write_config(work / f"{kind}-{rnd}.yaml", over, base=base)
            load = os.getloadavg()[0]
            figures[kind] = {**run_once(cfg, work / f"{kind}-{rnd}.log", environ, every), "load": load}
            c.say(f"round {rnd} {kind}: {figures[kind]['seconds']:.1f}s (load {load:.1f})")
        ref, flt = figures["reference"], figures["faulted"]
        ratio = ref["seconds"] / flt["seconds"]
        ratios.append(ratio)
        outside = 1 - flt["fault_s"] / flt["seconds"]
        gaps.append(flt["fault_free"] - outside)
        rows.append(
            [
                rnd,
                ref["seconds"],
                flt["seconds"],
                ratio,
                outside,
                flt["fault_free"],
                flt["fault_free"] - outside,
                f"{ref['product_goodput']:.3f} / {flt['product_goodput']:.3f}",
                f"{ref['product_s'] / ref['seconds']:.3f} / {flt['product_s'] / flt['seconds']:.3f}",
                f"{flt['kills']} ({flt['standby']} standby)",
                sum(flt["redone"]),
                c.median(flt["recovery"]),
                f"{ref['load']:.1f} / {flt['load']:.1f}",
            ]
        )
        for kind, fig in (("reference", ref), ("faulted", flt)):
            total = fig["product_s"] or 1.0
            bucket_rows.append(
                [rnd, kind] + [f"{fig['buckets'][b]:.1f} ({fig['buckets'][b] / total:.1%})" for b in goodput.BUCKETS]
            )
    print(
        c.table(
            [
                "round",
                "reference s",
                "faulted s",
                "goodput",
                "fault-free outside",
                "product fault-free",
                "agree",
                "product goodput ref / faulted",
                "product s / wall ref / faulted",
                "kills",
                "steps redone (>=)",
                "median recovery s",
                "load avg ref / faulted",
            ],
            rows,
        )
    )
    # Where the two runs' time went, side by side: the strict goodput (training / all) of a faulted
    # run falls by more than its fault buckets when start-up, evaluation or checkpoints took longer.
    print("\nThe product's buckets per run, seconds (share of the run's booked time):")
    print(c.table(["round", "run", *goodput.BUCKETS], bucket_rows))
    print(
        f"\ngoodput median {c.median(ratios):.3f} over {len(ratios)} rounds (min {min(ratios):.3f}, "
        f"max {max(ratios):.3f}); config {a.config} x {a.epochs} epochs with snapshot.every_steps 1; "
        f"a kill every {a.every:.0f}s; work dir {work}"
    )
    print(
        f"agree = product fault-free share - the same share measured outside: median {c.median(gaps):+.3f} "
        f"(largest {max(gaps, key=abs):+.3f}).\n"
        "goodput = reference s / faulted s (wall time, launch -> exit: the machine's load differs between the two);\n"
        "fault-free outside = 1 - (each kill -> a new worker's heartbeat back at the step reached before it) / faulted s;\n"
        "product fault-free = 1 - (redo + restart + detection + backoff + disk_wait + unsupervised) / the buckets' sum, "
        "from the faulted run's state.json"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
