#!/usr/bin/env python3
"""Step cost: training time under supervision against a stock transformers ``Trainer``.

    python bench/step_cost.py                   # 5 rounds, configs/demo.yaml for 20 epochs
    python bench/step_cost.py --rounds 7 --epochs 30
    python bench/step_cost.py --quick           # smoke: 1 round, 2 epochs

The same config (configs/demo.yaml: tiny from-scratch ViT on the digits, wandb offline,
evaluation and a save every epoch, ``--epochs`` epochs) trained by:
  stock        a plain transformers ``Trainer`` in a child process: the same model, data and
               ``TrainingArguments`` (``worker.train.prepare`` / ``training_arguments``), the
               same wandb run settings, none of our callbacks (a callback of its own keeps the
               time of every logging step in memory and writes them once, at the end)
  vit-train    ``python -m worker CONFIG`` alone
  supervisor   ``vit-supervisor start CONFIG``, default settings (standby on)
  sup+snap1    the same with ``snapshot.every_steps: 1``
Methods take turns round by round (the order rotates), so a change in the machine's load
hits all of them alike.

Step times come from each run's training log rows (``logging_steps`` 10: ``run/metrics.jsonl``
for ours, the stock child's own list): seconds per step is the median over 10-step intervals
(intervals with an evaluation or a save are the slow tail the median ignores), and train time
runs from the first to the last logged step (evaluations and saves included). Under the
supervisor, intervals that start after the standby announced itself ready
(``run/standby-PID.json``'s time) are the steady state; those that end before it are "standby
preparing". The stock Trainer and ``vit-train`` alone have no standby: all their intervals
count for both. Ratios are against the stock Trainer of the same round, then the median over
rounds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c

from supervisor import protocol

METHODS = ("stock", "vit-train", "supervisor", "sup+snap1")
DEMO: dict[str, Any] = yaml.safe_load((c.REPO / "configs" / "demo.yaml").read_text())
STOCK_TIMES = "stock-steps.jsonl"


# ----------------------------------------------------------------------------- the stock child


def stock_child(cfg_path: Path) -> int:
    """Train ``cfg_path`` with a plain ``Trainer``; write (step, time) of every training log row."""
    import logging

    from transformers import Trainer, TrainerCallback

    from supervisor.schema import load_config
    from worker import tracking
    from worker.train import compute_metrics, prepare, training_arguments

    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(cfg_path)
    protocol.run_dir(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    prepared = prepare(cfg)
    report_to = ["wandb"] if tracking.enabled(cfg) else []
    args = training_arguments(cfg, report_to)
    if report_to:  # the same wandb run settings as ours (the Trainer's WandbCallback reuses the run)
        tracking.init(cfg, tracking.tracker_run_id(cfg.output_dir))
    rows: list[dict[str, float]] = []

    class StepClock(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                rows.append({"step": state.global_step, "time": time.time(), "loss": float(logs["loss"])})

    trainer = Trainer(
        model=prepared.model,
        args=args,
        train_dataset=prepared.splits.train,
        eval_dataset=prepared.splits.eval,
        compute_metrics=compute_metrics,
        callbacks=[StepClock()],
    )
    trainer.train()
    tracking.finish(0)
    (cfg.output_dir / STOCK_TIMES).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


# ----------------------------------------------------------------------------- one run


class ReadyWatch:
    """Notes the time of the first standby announcement (``run/standby-PID.json``) of a run."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.ready_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ReadyWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        run = protocol.run_dir(self.out)
        while self.ready_at is None and not self._stop.wait(0.25):
            for path in run.glob("standby-*.json") if run.is_dir() else []:
                rec = protocol.read_json(path) or {}
                if isinstance(rec.get("time"), (int, float)):
                    self.ready_at = float(rec["time"])
                    return


def config_for(method: str, work: Path, rnd: int, epochs: int) -> Path:
    name = f"{method.replace('+', '-')}-{rnd}"
    over: dict[str, Any] = {
        "training": {"output_dir": str(work / name), "num_train_epochs": epochs},
        "tracking": {"project": "vit-bench-step-cost"},
    }
    if method == "sup+snap1":
        over["snapshot"] = {"every_steps": 1}
    return c.write_config(work / f"{name}.yaml", over, base=DEMO)


def argv_for(method: str, cfg: Path) -> list[str]:
    if method == "stock":
        return [c.PY, str(Path(__file__).resolve()), "--stock-child", str(cfg)]
    if method == "vit-train":
        return c.worker_argv(cfg)
    return c.supervisor_argv(cfg)


def log_rows(method: str, out: Path) -> list[tuple[int, float]]:
    """(step, wall time) of every training log row, in order."""
    path = out / STOCK_TIMES if method == "stock" else protocol.metrics_path(out)
    rows = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if "loss" in r and isinstance(r.get("step"), int) and isinstance(r.get("time"), (int, float)):
            rows.append((r["step"], float(r["time"])))
    return rows


def one_run(method: str, work: Path, rnd: int, epochs: int, environ: dict[str, str]) -> dict[str, Any]:
    cfg = config_for(method, work, rnd, epochs)
    out = c.output_dir(cfg)
    log = work / f"{method.replace('+', '-')}-{rnd}.log"
    t0 = time.monotonic()
    with ReadyWatch(out) as watch:
        p = c.spawn(argv_for(method, cfg), log, environ)
        try:
            code = c.wait_exit(p, 300, out)
        except TimeoutError:
            c.kill_group(p)
            raise
    wall = time.monotonic() - t0
    if code != 0:
        raise SystemExit(f"{method} round {rnd} exited {code}; see {log}")
    rows = log_rows(method, out)
    if len(rows) < 3:
        raise SystemExit(f"{method} round {rnd}: only {len(rows)} log rows in {out}")
    return {**step_times(rows, watch.ready_at), "wall": wall}


def step_times(rows: list[tuple[int, float]], ready: float | None) -> dict[str, Any]:
    """Seconds per step from (step, wall time) log rows: the median over the intervals that start
    after ``ready`` (steady) and over those that end before it (standby preparing); without a
    standby (``ready`` None) every interval counts for both. ``train``: first to last row."""
    steady, first = [], []
    for (s1, t1), (s2, t2) in itertools.pairwise(rows):
        per_step = (t2 - t1) / max(s2 - s1, 1)
        if ready is None or t1 >= ready:
            steady.append(per_step)
        if ready is None or t2 <= ready:
            first.append(per_step)
    (s_first, t_first), (s_last, t_last) = rows[0], rows[-1]
    return {
        "steady": c.median(steady),
        "first": c.median(first),
        "train": (t_last - t_first) / max(s_last - s_first, 1),
        "steps": s_last,
        "ready_after": (ready - t_first) if ready is not None else None,
    }


# ----------------------------------------------------------------------------- report


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def report(results: dict[str, list[dict[str, Any]]], load: list[str]) -> bool:
    rounds = len(results["stock"])
    rows, ok = [], True
    for m in results:
        rs = results[m]
        per_round = {
            k: c.median(ratio(r[k], s[k]) for r, s in zip(rs, results["stock"], strict=True))
            for k in ("steady", "first", "train", "wall")
        }
        rows.append(
            [
                m,
                1000 * (c.median(r["steady"] for r in rs) or 0),
                per_round["steady"],
                1000 * (c.median(r["first"] for r in rs) or 0),
                per_round["first"],
                c.median(r["train"] * 1000 for r in rs),
                per_round["train"],
                c.median(r["wall"] for r in rs),
                per_round["wall"],
                c.median(r["ready_after"] for r in rs),
            ]
        )
        if m == "sup+snap1" and (per_round["steady"] or 99) > 1.03:
            ok = False
    print(
        c.table(
            [
                "method",
                "steady ms/step",
                "x stock",
                "standby preparing ms/step",
                "x stock",
                "train ms/step (eval, saves)",
                "x stock",
                "process wall s",
                "x stock",
                "standby ready after s",
            ],
            rows,
        )
    )
    steps = c.median(r["steps"] for r in results["stock"])
    print(
        f"\n{rounds} round(s), {steps} steps per run; medians over rounds (ratios: per round against that "
        "round's stock run, then the median).\nload average at the start of each round: " + "; ".join(load)
    )
    return ok


def uptime() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=20, help="num_train_epochs of the demo config (45 steps each)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 round of 2 epochs")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--stock-child", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.stock_child is not None:
        return stock_child(a.stock_child)
    if a.quick:
        a.rounds, a.epochs = 1, 2
    methods = [m for m in a.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or "stock" not in methods:
        ap.error(f"--methods: unknown {unknown}" if unknown else "--methods must include stock (the reference)")
    c.banner("Step cost: supervision against a stock transformers Trainer")
    work = c.work_dir("step-cost", a.workdir)
    environ = c.env(XDG_STATE_HOME=str(work / "state"), WANDB_MODE="offline")
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS if m in methods}
    load = []
    for rnd in range(a.rounds):
        load.append(uptime())
        order = methods[rnd % len(methods) :] + methods[: rnd % len(methods)]
        for m in order:
            c.say(f"round {rnd + 1}/{a.rounds}: {m} (load {uptime()})")
            results[m].append(one_run(m, work, rnd, a.epochs, environ))
            c.dump_json(work / "results.json", {"results": results, "load": load})  # figures so far
            r = results[m][-1]
            c.say(
                f"  steady {1000 * (r['steady'] or 0):.2f} ms/step, wall {r['wall']:.1f}s, "
                f"standby ready after {c.fmt(r['ready_after'])}s of training"
            )
    ok = report(results, load)
    print(f"\nwork dir {work}")
    return 0 if ok or a.quick else 1


if __name__ == "__main__":
    sys.exit(main())
