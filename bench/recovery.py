#!/usr/bin/env python3
"""Recovery: time from SIGKILL of the worker to its first new optimizer step, side by side.

    python bench/recovery.py                        # 2 rounds x 2 kills per method, seed 0
    python bench/recovery.py --rounds 3 --kills 3

The same worker and config (a small from-scratch ViT on the digits), restarted by:
  supervisor          ``vit-supervisor start CONFIG`` (product defaults: standby worker on; a worker
                      that had made progress is restarted without back-off)
  supervisor-cold     the same with ``supervisor.standby: false`` (a cold ``python -m worker --resume``)
  torchrun            ``torchrun --standalone --nproc_per_node=1 --max-restarts=100 -m worker CONFIG --resume``
  shell loop          ``until python -m worker CONFIG --resume; do :; done``
Methods take turns round by round (each round launches every method afresh), so a
change in the machine's background load hits all of them alike. Each kill lands at a
random moment once the worker has trained for a while (for the supervisor: once its
standby is ready). Recovery ends at the first heartbeat from a new process with a step
above the checkpoint it resumed from (heartbeat written at every step, polled every 2 ms).
Also printed: steps lost per kill (step at the kill − checkpoint resumed from).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c

from supervisor import protocol

METHODS = ("supervisor", "supervisor-cold", "torchrun", "shell-loop")

# Slower than TINY (about 25 steps/s on 2 cores) so a kill lands inside a step, not between
# hundred-per-second steps; the product's supervisor defaults except a heartbeat at every step.
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


def launch(method: str, cfg: Path, log: Path, environ: dict[str, str]) -> subprocess.Popen[bytes]:
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
    if method == "supervisor":
        st = protocol.read_json(protocol.state_path(out)) or {}
        return bool((st.get("standby") or {}).get("ready"))
    return True


def run_method(
    method: str, work: Path, rnd: int, kills: int, rng: random.Random, environ: dict[str, str]
) -> list[dict[str, float]]:
    over = c.deep_update(CONFIG, {"training": {"output_dir": f"{method}-{rnd}"}})
    if method == "supervisor-cold":
        over["supervisor"]["standby"] = False
    cfg = c.write_config(work / f"{method}-{rnd}.yaml", over)
    out = c.output_dir(cfg)
    watch = c.StepWatch(out).start()
    p = launch(method, cfg, work / f"{method}-{rnd}.log", environ)
    results = []
    try:
        floor = 30
        for _ in range(kills):
            c.wait_for(
                lambda: ready(method, out, floor),
                240,
                f"{method}: a trained worker",
                progress=lambda: c.run_progress(out),
            )
            time.sleep(1.0 + rng.random())  # settle (a standby's start-up is done), then a random moment
            hb = c.heartbeat(out)
            pid, step = hb["pid"], hb["global_step"]
            t_kill = time.time()
            os.kill(pid, signal.SIGKILL)
            c.wait_for(
                lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                10,
                "the kill",
            )
            resume = c.newest_checkpoint_step(out)  # the newest committed one: what the new worker loads
            first = c.wait_for(
                lambda: watch.first_step_after(t_kill, pid, resume),
                240,
                f"{method}: recovery",
                progress=lambda: c.run_progress(out),
            )
            results.append({"recovery_s": first[0] - t_kill, "lost": step - resume, "step": step})
            c.say(
                f"{method} round {rnd}: killed pid {pid} at step {step}; pid {first[1]} made step {first[2]} "
                f"after {first[0] - t_kill:.2f}s (resumed from {resume})"
            )
            floor = first[2] + 20
    finally:
        watch.stop()
        teardown(p)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="launches per method (default 2)")
    ap.add_argument("--kills", type=int, default=2, help="SIGKILLs per launch (default 2)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args(argv)
    c.banner("Recovery after SIGKILL: vit-supervisor vs torchrun vs a shell retry loop")
    rng = random.Random(a.seed)
    work = c.work_dir("recovery", a.workdir)
    environ = c.env(XDG_STATE_HOME=str(work / "state"))  # keep the status registry out of ~/.local
    methods = a.methods.split(",")
    res: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    for rnd in range(a.rounds):
        for m in methods:
            res[m] += run_method(m, work, rnd, a.kills, rng, environ)
    base = c.median(r["recovery_s"] for r in res.get("supervisor") or res[methods[0]])
    rows = []
    for m in methods:
        rec = [r["recovery_s"] for r in res[m]]
        med = c.median(rec)
        rows.append(
            [m, len(rec), med, min(rec), max(rec), med / base if base else None, c.median(r["lost"] for r in res[m])]
        )
    print(
        c.table(["restarted by", "kills", "median s", "min s", "max s", f"x {methods[0]}", "median steps lost"], rows)
    )
    print(f"\nsave_steps {CONFIG['training']['save_steps']}; seed {a.seed}; work dir {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
