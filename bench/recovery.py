#!/usr/bin/env python3
"""Recovery: time from SIGKILL of the worker to its first new optimizer step, side by side.

    python bench/recovery.py                                  # configs/demo.yaml, 3 rounds x 2 kills per method
    python bench/recovery.py --methods supervisor --rounds 2 --kills 3
    python bench/recovery.py --config configs/tiny.yaml       # any config (e.g. tracking off)

The config is the product's demo as shipped (configs/demo.yaml: wandb offline, evaluation
and a checkpoint every epoch) with three changes that only make it measurable: its own
output folder, enough epochs for every kill, and a heartbeat at every step
(``supervisor.heartbeat_interval_s: 0``) so that the first new step is seen within
milliseconds. The same worker and config, restarted by:
  supervisor          ``vit-supervisor start CONFIG`` (product defaults: standby worker on; a worker
                      that had made progress is restarted without back-off)
  supervisor-cold     the same with ``supervisor.standby: false`` (a cold ``python -m worker --resume``)
  supervisor-nice     (only if named in --methods) the standby prepares at nice 10 instead of
                      SCHED_IDLE (``VIT_STANDBY_PRIORITY=nice``): the replacement standby's cost
  torchrun            ``torchrun --standalone --nproc_per_node=1 --max-restarts=100 -m worker CONFIG --resume``
  shell loop          ``until python -m worker CONFIG --resume; do :; done``
Methods take turns round by round (each round launches every method afresh), so a
change in the machine's background load hits all of them alike. Each kill lands at a
random moment once the worker has trained for a while (for the supervisor: once its
standby is ready). Recovery ends at the first heartbeat from a new process with a step
above the checkpoint it resumed from (heartbeat written at every step, polled every 2 ms).
Also printed: steps lost per kill (step at the kill − checkpoint resumed from), and for
every take-over by a standby where the time went, from the standby's log: kill → go
(the supervisor notices the death and writes the go), go → tracker ready (``wandb.init``
done), tracker ready → first new step (checkpoint load, Trainer set-up, one step).

Under the supervisor, each kill's cost is also read from the product's own accounting
(``goodput`` in ``run/state.json``, supervisor/goodput.py): the growth of its lost buckets
(redo, restart, detection, backoff, disk wait, unsupervised) over the kill, beside the
external cost: kill → the first heartbeat of the new worker at the killed step (it has
redone what was lost). Per launch, the share of its wall time not lost to the kills, both
ways: the product's 1 − lost buckets ÷ their sum, and 1 − the external costs ÷ the time
from launching the supervisor to the last reading.

With ``--after S`` each kill also measures what the restart costs training beyond the
recovery itself: the step rate in the S seconds after the first new step (while the
supervisor's replacement standby prepares) ÷ the rate in the 10 s before the kill (a ready,
idle standby); the kill then waits for those 10 s.
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c

from supervisor import goodput, protocol

METHODS = ("supervisor", "supervisor-cold", "torchrun", "shell-loop")
EXTRA_METHODS = ("supervisor-nice",)  # the standby prepares at nice 10 only (before SCHED_IDLE), by --methods

DEMO = c.REPO / "configs" / "demo.yaml"

# A slower-than-TINY run without tracking or evaluation (about 25 steps/s on 2 cores): this
# benchmark's default before it ran the demo as shipped; bench/footprint.py still runs it.
CONFIG: dict[str, Any] = {
    "model": {
        "scratch": {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 128}
    },
    "data": {"limit": None},
    "training": {
        "max_steps": 100000,
        "per_device_train_batch_size": 32,
        "save_steps": 20,
        "eval_strategy": "no",
        "save_total_limit": 2,
    },
    "supervisor": {
        "backoff_initial_s": 1.0,
        "backoff_max_s": 60.0,
        "heartbeat_interval_s": 0.0,
        "term_grace_s": 10,
        "hang_timeout_s": 600,
        "startup_timeout_s": 900,
    },
}

# Only what makes the run measurable; everything else is the config as given.
MEASURABLE: dict[str, Any] = {
    "training": {"num_train_epochs": 1000},
    "supervisor": {"heartbeat_interval_s": 0.0},
}


def base_config(path: Path) -> dict[str, Any]:
    """The config at ``path`` with its relative paths made absolute (the copy lives elsewhere)."""
    raw: dict[str, Any] = yaml.safe_load(path.read_text())
    data = raw.get("data") or {}
    for key in ("path", "image_root"):
        if data.get(key) and not Path(data[key]).is_absolute():
            data[key] = str((path.parent / data[key]).resolve())
    return raw


def launch(method: str, cfg: Path, log: Path, environ: dict[str, str]) -> subprocess.Popen[bytes]:
    if method == "supervisor-nice":
        return c.spawn(c.supervisor_argv(cfg), log, {**environ, "VIT_STANDBY_PRIORITY": "nice"})
    if method.startswith("supervisor"):
        return c.spawn(c.supervisor_argv(cfg), log, environ)
    if method == "torchrun":
        torchrun = Path(c.PY).with_name("torchrun")
        return c.spawn(
            [
                str(torchrun),
                "--standalone",
                "--nproc_per_node=1",
                "--max-restarts=100",
                "-m",
                "worker",
                str(cfg),
                "--resume",
            ],
            log,
            environ,
        )
    if method == "shell-loop":
        return c.spawn(["bash", "-c", f"until {c.PY} -m worker {cfg} --resume; do :; done"], log, environ)
    raise ValueError(method)


def teardown(p: subprocess.Popen[bytes]) -> None:
    """SIGKILL the launcher and every descendant (the data is thrown away)."""
    try:
        procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for pr in procs:
        try:
            pr.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    c.kill_group(p)


def ready(method: str, out: Path, since_step: int) -> bool:
    """Trained past ``since_step`` (and, under the supervisor with a standby, the standby is ready)."""
    hb = c.heartbeat(out)
    if hb.get("state") != protocol.HB_TRAINING or (hb.get("global_step") or 0) < since_step:
        return False
    if method in ("supervisor", "supervisor-nice"):
        st = protocol.read_json(protocol.state_path(out)) or {}
        return bool((st.get("standby") or {}).get("ready"))
    return True


_STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"


def standby_breakdown(out: Path, pid: int) -> tuple[float, float] | None:
    """(wall time of the go, of "Tracker ready" or None) from the log of the standby ``pid``."""
    for log in (protocol.supervisor_dir(out, 0) / protocol.LOGS_SUBDIR).glob("standby-*.log"):
        text = log.read_text(errors="replace")
        if f"(pid {pid})" not in text:
            continue
        go = re.search(_STAMP + r" INFO vit_train: Standby got a go", text)
        if go is None:
            return None
        ready = re.search(_STAMP + r" INFO vit_train: Tracker ready", text[go.end() :])
        stamp = lambda m: datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()  # noqa: E731
        return stamp(go), stamp(ready) if ready else None
    return None


def step_at(records: list[tuple[float, float, int, int]], wall: float, pid: int) -> int | None:
    """The newest step ``pid``'s heartbeat showed at wall time ``wall``."""
    steps = [step for t, _, p, step in records if t <= wall and p == pid]
    return steps[-1] if steps else None


def rate_ratio(
    watch: c.StepWatch, t_kill: float, killed: int, first: tuple[float, int, int], after: float
) -> float | None:
    """Steps/s in ``after`` s from the first new step ÷ steps/s in the 10 s before the kill."""
    c.wait_for(lambda: time.time() >= first[0] + after + 0.2, after + 60, "the rate window")
    b0, b1 = step_at(watch.records, t_kill - 10, killed), step_at(watch.records, t_kill, killed)
    a1 = step_at(watch.records, first[0] + after, first[1])
    if b0 is None or b1 is None or a1 is None or b1 <= b0:
        return None
    return ((a1 - first[2]) / after) / ((b1 - b0) / 10)


def product_buckets(out: Path) -> dict[str, float]:
    """The goodput buckets of the run's state.json (all zero when there are none yet)."""
    raw = (protocol.read_json(protocol.state_path(out)) or {}).get("goodput")
    return goodput.clean(raw if isinstance(raw, dict) else None)


def lost_s(out: Path) -> float:
    b = product_buckets(out)
    return sum(b[k] for k in goodput.LOST)


def caught_up(watch: c.StepWatch, wall: float, killed: int, step: int) -> float | None:
    """Wall time of the first heartbeat after ``wall`` from a new worker at step ``step`` or later."""
    for t, _, pid, s in list(watch.records):
        if t >= wall and pid != killed and s >= step:
            return t
    return None


def resumed_at(out: Path, killed: int) -> tuple[int] | None:
    """``(step,)``: the step a worker other than ``killed`` started training from (its heartbeat's
    start_step), as a tuple so that step 0 is a truthy answer for :func:`common.wait_for`."""
    hb = c.heartbeat(out)
    start = hb.get("start_step")
    if hb.get("pid") in (None, killed) or not isinstance(start, int) or isinstance(start, bool):
        return None
    return (start,)


def run_method(
    method: str,
    work: Path,
    rnd: int,
    kills: int,
    rng: random.Random,
    environ: dict[str, str],
    base: dict[str, Any],
    after: float = 0.0,
) -> list[dict[str, float]]:
    over = c.deep_update(MEASURABLE, {"training": {"output_dir": f"{method}-{rnd}"}})
    if method == "supervisor-cold":
        over["supervisor"]["standby"] = False
    cfg = c.write_config(work / f"{method}-{rnd}.yaml", over, base=base)
    out = c.output_dir(cfg)
    watch = c.StepWatch(out).start()
    supervised = method.startswith("supervisor")
    t_launch = time.time()
    p = launch(method, cfg, work / f"{method}-{rnd}.log", environ)
    results: list[dict[str, Any]] = []
    try:
        floor = 30
        for _ in range(kills):
            c.wait_for(
                lambda: ready(method, out, floor),
                240,
                f"{method}: a trained worker",
                progress=lambda: c.run_progress(out),
            )
            # Settle (a standby's start-up is done; with --after, 10 s of steady rate), then a random moment.
            time.sleep((10.0 if after else 1.0) + rng.random())
            hb = c.heartbeat(out)
            pid, step = hb["pid"], hb["global_step"]
            lost_before = lost_s(out) if supervised else 0.0
            t_kill = time.time()
            os.kill(pid, signal.SIGKILL)
            c.wait_for(
                lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                10,
                "the kill",
            )
            # Where the new worker resumes: a snapshot (newer than any disk checkpoint) or the newest
            # committed checkpoint. Its heartbeat says which, from its first write (at train begin, with
            # global_step = start_step): that write is not a new step, the next one is.
            resume = c.wait_for(
                lambda: resumed_at(out, pid),
                240,
                f"{method}: a new worker's first heartbeat",
                progress=lambda: c.run_progress(out),
            )[0]
            first = c.wait_for(
                lambda: watch.first_step_after(t_kill, pid, resume),
                240,
                f"{method}: recovery",
                progress=lambda: c.run_progress(out),
            )
            res: dict[str, Any] = {"recovery_s": first[0] - t_kill, "lost": step - resume, "step": step}
            if supervised:
                caught = c.wait_for(lambda: caught_up(watch, t_kill, pid, step), 240, f"{method}: back at step {step}")
                c.wait_for(  # the supervisor has booked past the catch-up
                    lambda: ((protocol.read_json(protocol.state_path(out)) or {}).get("updated") or 0) > caught + 0.2,
                    60,
                    "the state file after the catch-up",
                )
                res["external_cost_s"] = caught - t_kill
                res["product_cost_s"] = lost_s(out) - lost_before
            if after:
                res["rate_after"] = rate_ratio(watch, t_kill, pid, first, after)
            parts = standby_breakdown(out, first[1]) if method in ("supervisor", "supervisor-nice") else None
            if parts is not None:
                go, tracker = parts
                res["to_go"] = go - t_kill
                if tracker is not None:
                    res["go_to_tracker"], res["tracker_to_step"] = tracker - go, first[0] - tracker
                else:
                    res["go_to_step"] = first[0] - go
            results.append(res)
            c.say(
                f"{method} round {rnd}: killed pid {pid} at step {step}; pid {first[1]} made step {first[2]} "
                f"after {first[0] - t_kill:.2f}s (resumed from {resume}); "
                + ", ".join(
                    f"{k} {v:.3f}" for k, v in res.items() if k not in ("recovery_s", "lost", "step") and v is not None
                )
            )
            floor = first[2] + 20
        if supervised and results:
            b, t_end = product_buckets(out), time.time()
            results[-1]["share_product"] = goodput.fault_free_share(b)
            results[-1]["share_external"] = 1 - sum(r["external_cost_s"] for r in results) / (t_end - t_launch)
            results[-1]["booked_over_wall"] = goodput.total(b) / (t_end - t_launch)
    finally:
        watch.stop()
        teardown(p)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=DEMO, help="the config to run (default configs/demo.yaml)")
    ap.add_argument("--rounds", type=int, default=3, help="launches per method (default 3)")
    ap.add_argument("--kills", type=int, default=2, help="SIGKILLs per launch (default 2)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--after", type=float, default=0.0, help="also measure the step rate for S s after each recovery (e.g. 30)"
    )
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args(argv)
    c.banner("Recovery after SIGKILL: vit-supervisor vs torchrun vs a shell retry loop")
    rng = random.Random(a.seed)
    work = c.work_dir("recovery", a.workdir)
    environ = c.env(XDG_STATE_HOME=str(work / "state"))  # keep the status registry out of ~/.local
    methods = a.methods.split(",")
    base = base_config(a.config)
    res: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    loads = [os.getloadavg()[0]]
    for rnd in range(a.rounds):
        for m in methods:
            res[m] += run_method(m, work, rnd, a.kills, rng, environ, base, a.after)
            loads.append(os.getloadavg()[0])
    first = c.median(r["recovery_s"] for r in res.get("supervisor") or res[methods[0]])
    rows = []
    for m in methods:
        rec = [r["recovery_s"] for r in res[m]]
        med = c.median(rec)
        rows.append(
            [
                m,
                len(rec),
                med,
                min(rec),
                max(rec),
                med / first if first else None,
                c.median(r["lost"] for r in res[m]),
                c.median(r.get("rate_after") for r in res[m]),
            ]
        )
    heads = ["restarted by", "kills", "median s", "min s", "max s", f"x {methods[0]}", "median steps lost"]
    if a.after:
        heads.append(f"rate {a.after:.0f}s after / before")
    else:
        rows = [r[:-1] for r in rows]
    print(c.table(heads, rows))
    took = [r for r in res.get("supervisor", []) if "to_go" in r]
    if took:
        keys = ("to_go", "go_to_tracker", "tracker_to_step", "go_to_step")
        print("\nWhere a standby's take-over goes (medians over the kills it took over):\n")
        print(
            c.table(
                ["kills", "kill -> go s", "go -> tracker ready s", "tracker ready -> first step s", "go -> step s"],
                [[len(took), *(c.median(r[k] for r in took if k in r) for k in keys)]],
            )
        )
    accounted = [(m, r) for m in methods for r in res[m] if "product_cost_s" in r]
    if accounted:
        print("\nThe product's own accounting beside the external measurement (medians over the kills):\n")
        rows = []
        for m in methods:
            rs = [r for mm, r in accounted if mm == m]
            if not rs:
                continue
            runs = [r for r in rs if r.get("share_product") is not None]
            rows.append(
                [
                    m,
                    len(rs),
                    c.median(r["external_cost_s"] for r in rs),
                    c.median(r["product_cost_s"] for r in rs),
                    c.median(r["product_cost_s"] - r["external_cost_s"] for r in rs),
                    c.median(r["share_external"] for r in runs),
                    c.median(r["share_product"] for r in runs),
                    c.median(r["booked_over_wall"] for r in runs),
                ]
            )
        print(
            c.table(
                [
                    "restarted by",
                    "kills",
                    "external cost s",
                    "product cost s",
                    "product - external s",
                    "share not lost, external",
                    "share not lost, product",
                    "booked / wall",
                ],
                rows,
            )
        )
        print(
            "external cost: kill -> the new worker's heartbeat at the killed step; product cost: growth of the "
            "lost buckets over the kill; shares per launch (launch -> last reading), median over launches"
        )
    print(
        f"\nconfig {a.config} (+ {MEASURABLE}); seed {a.seed}; load average (1 min) during the run: "
        f"{min(loads):.1f}-{max(loads):.1f}; work dir {work}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
