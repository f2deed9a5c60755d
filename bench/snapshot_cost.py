#!/usr/bin/env python3
"""Snapshot cost: training time with shared-memory snapshots on (``every_steps: auto``) ÷ off,
per model size, with the snapshot's size, copy time, exposed time and the interval ``auto`` chose.

    python bench/snapshot_cost.py                     # tiny, demo, small, ViT-S/16-like, ViT-B/16-like; 3 rounds
    python bench/snapshot_cost.py --sizes tiny,demo --rounds 5
    python bench/snapshot_cost.py --quick             # smoke run: tiny and small, few steps, 1 round

Each run is a real worker (``python -m worker``) training a from-scratch ViT on the digits
(``demo`` is configs/demo.yaml's model and batch)
(no evaluation, no disk save before the last step, one BLAS thread), once with
``snapshot.every_steps: 0`` and once with ``auto``; the two take turns within each round and
the order alternates from round to round, so load from elsewhere falls on both alike.
Training time: from the metrics row of the first logged step to that of the last step
(``run/metrics.jsonl``, written at each logging step before any save), so start-up and the
final save are left out. The snapshot figures come from the worker's closing log line
(``Snapshots: N taken, ... copy median, exposed median, interval``): copy = boundary ->
committed (the part in the copy thread included); exposed = what training waited for (the
synchronous capture plus any wait for the copy before the next optimizer step). Snapshots go to
a fresh folder under /dev/shm, removed at the end. Goal (issue 12): on ÷ off <= 1.02 per size.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c
import yaml

GOAL = 1.02
# ViT-S/16 and ViT-B/16 widths and depths on 64-pixel images, so a CPU step takes a second or
# two: the state (weights, AdamW moments) is nearly that of the 224-pixel models.
DEMO = yaml.safe_load((c.REPO / "configs" / "demo.yaml").read_text())
# The small models' steps take milliseconds: their windows are long enough to hold many snapshots and
# to average the machine's noise (a one-second window measured noise, not snapshots).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"arch": dict(c.TINY["model"]["scratch"]), "batch": 16, "steps": 1500, "log": 50},
    "demo": {"arch": dict(DEMO["model"]["scratch"]), "batch": 32, "steps": 800, "log": 50},
    "small": {
        "arch": {
            "image_size": 32,
            "patch_size": 4,
            "num_channels": 1,
            "hidden_size": 192,
            "num_hidden_layers": 6,
            "num_attention_heads": 3,
            "intermediate_size": 768,
        },
        "batch": 8,
        "steps": 40,
        "log": 5,
    },
    "vit-s/16": {
        "arch": {
            **c.VIT_BASE,
            "image_size": 64,
            "hidden_size": 384,
            "num_attention_heads": 6,
            "intermediate_size": 1536,
        },
        "batch": 4,
        "steps": 60,
        "log": 4,
    },
    # Enough steps that the steady state (both slots filled, the interval settled) outweighs the first
    # fills: about 30 s of training per run on a quiet 2-core box, a minute with start-up.
    "vit-b/16": {"arch": {**c.VIT_BASE, "image_size": 64}, "batch": 2, "steps": 60, "log": 4},
}
QUICK = {"tiny": 100, "small": 15}  # multiples of the sizes' logging steps
SUMMARY = re.compile(
    r"Snapshots: (\d+) taken, newest of step \S+, ([\d.]+) MiB; copy median ([\d.]+) ms, "
    r"exposed median ([\d.]+) ms; interval (\d+)"
)


def run(work: Path, shm: Path, name: str, spec: dict[str, Any], steps: int, method: str, rnd: int) -> dict[str, Any]:
    slug = f"{name.replace('/', '')}-{method}-r{rnd}"
    cfg = c.write_config(
        work / f"{slug}.yaml",
        {
            "model": {"scratch": spec["arch"]},
            "data": {"limit": 400},
            "training": {
                "output_dir": slug,
                "max_steps": steps,
                "per_device_train_batch_size": spec["batch"],
                "eval_strategy": "no",
                "save_steps": 10 * steps,
                "logging_steps": spec["log"],
                "warmup_ratio": 0.0,
            },
            "snapshot": {"every_steps": 0 if method == "off" else "auto", "root": str(shm)},
        },
    )
    log = work / f"{slug}.log"
    if c.run_worker(cfg, log=log) != 0:
        raise SystemExit(f"{name} {method}: the worker failed; see {log}")
    out = c.output_dir(cfg)
    rows = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    times = {r["step"]: r["time"] for r in rows if "loss" in r}
    first, last = min(times), max(times)
    if last != steps or first == last:
        raise SystemExit(f"{name} {method}: logged steps {sorted(times)}; see {log}")
    result: dict[str, Any] = {"seconds": times[last] - times[first], "steps": last - first}
    m = SUMMARY.search(log.read_text())
    if method == "auto":
        if m is None:
            raise SystemExit(f"{name}: no snapshot summary in {log}")
        result.update(taken=int(m[1]), mib=float(m[2]), copy_ms=float(m[3]), exposed_ms=float(m[4]), interval=int(m[5]))
    shutil.rmtree(out, ignore_errors=True)  # a ViT-B checkpoint is a gigabyte
    c.say(f"{name} round {rnd} {method}: {result['seconds']:.2f}s for {result['steps']} steps")
    return result


def size_row(work: Path, shm: Path, name: str, steps: int, rounds: int) -> list[Any]:
    spec = SIZES[name]
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "auto": []}
    for rnd in range(rounds):
        for method in ("off", "auto") if rnd % 2 == 0 else ("auto", "off"):
            runs[method].append(run(work, shm, name, spec, steps, method, rnd))
    ratios = [a["seconds"] / o["seconds"] for a, o in zip(runs["auto"], runs["off"], strict=True)]
    on = runs["auto"]
    step_s = c.median(r["seconds"] / r["steps"] for r in runs["off"])
    interval = c.median(r["interval"] for r in on)
    exposed = c.median(r["exposed_ms"] for r in on)
    return [
        name,
        c.median(r["mib"] for r in on),
        step_s,
        c.median(r["copy_ms"] for r in on),
        exposed,
        1e-3 * exposed / step_s if step_s else None,
        "/".join(str(r["interval"]) for r in on),
        c.median(r["taken"] for r in on),
        c.median(r["seconds"] for r in runs["off"]),
        c.median(r["seconds"] for r in on),
        c.median(ratios),
        f"{min(ratios):.3f}-{max(ratios):.3f}",
        "ok" if (c.median(ratios) or 0) <= GOAL else "MISS",
        interval,
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each runs off and auto once, order alternating")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny and small, few steps, one round")
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args(argv)
    c.banner("Snapshot cost: training time with snapshots on (auto) ÷ off")
    sizes = list(QUICK) if a.quick else a.sizes.split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"unknown sizes {unknown}; choose from {', '.join(SIZES)}")
    rounds = 1 if a.quick else a.rounds
    work = c.work_dir("snapcost", a.workdir)
    base = Path("/dev/shm") if os.path.isdir("/dev/shm") else work
    shm = Path(tempfile.mkdtemp(prefix="vit-bench-snapcost-", dir=base))
    load = [os.getloadavg()]
    try:
        rows = [size_row(work, shm, n, QUICK[n] if a.quick else SIZES[n]["steps"], rounds) for n in sizes]
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    load.append(os.getloadavg())
    print(
        c.table(
            [
                "model",
                "snapshot MiB",
                "step s (off)",
                "copy ms (median)",
                "exposed ms per snapshot",
                "exposed ÷ step",
                "interval auto chose (per round)",
                "snapshots per run",
                "training s off",
                "training s auto",
                "auto ÷ off (median of rounds)",
                "range",
                f"<= {GOAL}",
            ],
            [r[:-1] for r in rows],
        )
    )
    print(
        f"\n{rounds} round(s), methods alternating; load average (1/5/15 min) at start "
        f"{'/'.join(f'{x:.1f}' for x in load[0])}, at end {'/'.join(f'{x:.1f}' for x in load[-1])}; "
        f"2 cores shared with other work: compare within this table only. Work dir {work}"
    )
    return 0 if a.quick or all(r[12] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
