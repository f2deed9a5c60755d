#!/usr/bin/env python3
"""Checkpoint overhead and scale: share of training time spent saving, save time vs size,
and a new worker's time to its first step, from a tiny ViT up to a ViT-base-sized one.

    python bench/checkpoint_overhead.py                   # all sizes (tiny .. base), about 3 minutes on 2 cores
    python bench/checkpoint_overhead.py --sizes tiny,small

Part 1, measured share: the tests' TINY model trained 1000 steps with the default
``save_steps`` (500) and with the tests' 5; share = sum of the worker's save times
(exit report ``save_seconds``) ÷ the Trainer's ``train_runtime``.

Part 2, scale: for each size (from-scratch ViT, batch 2, no evaluation, one BLAS thread,
a checkpoint every 2 steps):
  run A  fresh, 4 steps → time from process start to the first step;
  run B  ``--resume`` from checkpoint-4 to step 10 → time from process start to the first
         new step (a cold restart's cost: imports, data, model, validating and loading the
         checkpoint) and the time of one optimizer step (median of the gaps without a save).
Save time and size: the exit reports' ``save_seconds`` (median over both runs, 5 saves; the log
lines "Committed checkpoint checkpoint-N (X MiB, Ys)" say the same) and ``checkpoint_bytes``.
Projected share at the default interval = save ÷ (500 × step + save).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c

DEFAULT_SAVE_STEPS = 500  # supervisor/schema.py TrainingConfig.save_steps
SCALE_SAVE_STEPS = 2

SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(c.TINY["model"]["scratch"]),
    "small": {
        "image_size": 32,
        "patch_size": 4,
        "num_channels": 1,
        "hidden_size": 192,
        "num_hidden_layers": 6,
        "num_attention_heads": 3,
        "intermediate_size": 768,
    },
    "vit-s/16": {
        "image_size": 224,
        "patch_size": 16,
        "num_channels": 3,
        "hidden_size": 384,
        "num_hidden_layers": 12,
        "num_attention_heads": 6,
        "intermediate_size": 1536,
    },
    "vit-b/16": dict(c.VIT_BASE),
}


def measured_share(work: Path, save_steps: int, steps: int) -> list[Any]:
    cfg = c.write_config(
        work / f"share-{save_steps}.yaml",
        {
            "training": {
                "output_dir": f"share-{save_steps}",
                "max_steps": steps,
                "save_steps": save_steps,
                "eval_strategy": "no",
                "logging_steps": 50,
            }
        },
    )
    out = c.output_dir(cfg)
    if c.run_worker(cfg, log=work / f"share-{save_steps}.log") != 0:
        raise SystemExit(f"share run failed; see {work / f'share-{save_steps}.log'}")
    rep = c.exit_report(out)
    runtime = None
    for line in (out / "run" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        runtime = row.get("train_runtime", runtime)
    saves = rep.get("save_seconds") or []
    return ["tiny", save_steps, steps, len(saves), sum(saves), runtime, 100 * sum(saves) / runtime]


def time_to_step(cfg: Path, args: list[str], log: Path, target: int) -> tuple[float, dict[int, float], int]:
    """Run a worker to its end; (seconds from spawn to the heartbeat of step ``target``,
    {step: heartbeat wall time} of this process, exit code)."""
    out = c.output_dir(cfg)
    watch = c.StepWatch(out, interval=0.005).start()
    t0 = time.time()
    p = c.spawn(c.worker_argv(cfg, *args), log)
    try:
        rc = p.wait(900)
    finally:
        watch.stop()
        c.kill_group(p)
    times: dict[int, float] = {}
    for t, _, pid, step in watch.records:
        if pid == p.pid:
            times.setdefault(step, t)
    if target not in times:
        raise SystemExit(f"worker never reported step {target} (exit {rc}); see {log}")
    return times[target] - t0, times, rc


def scale_row(work: Path, name: str, arch: dict[str, int]) -> list[Any]:
    slug = name.replace("/", "")
    over = {
        "model": {"scratch": arch},
        "data": {"limit": 64},
        "training": {
            "output_dir": f"scale-{slug}",
            "max_steps": 4,
            "save_steps": SCALE_SAVE_STEPS,
            "per_device_train_batch_size": 2,
            "per_device_eval_batch_size": 2,
            "eval_strategy": "no",
            "logging_steps": 1,
            "warmup_ratio": 0.0,
        },
    }
    cfg = c.write_config(work / f"{slug}.yaml", over)
    log = work / f"scale-{slug}.log"
    fresh_s, _, rc = time_to_step(cfg, [], log, 1)
    if rc != 0:
        raise SystemExit(f"{name}: run A failed (exit {rc}); see {log}")
    save_secs = list(c.exit_report(c.output_dir(cfg)).get("save_seconds") or [])
    # save_steps must stay as it was: a resumed Trainer takes it from the checkpoint's trainer_state.json.
    c.write_config(cfg, c.deep_update(over, {"training": {"max_steps": 10}}))
    resume_s, times, rc = time_to_step(cfg, ["--resume"], log, 5)
    if rc != 0:
        raise SystemExit(f"{name}: run B failed (exit {rc}); see {log}")
    # The save of step s runs after its heartbeat, so only gaps s -> s+1 with no save at s are pure steps.
    step_s = c.median(times[s + 1] - times[s] for s in times if s + 1 in times and s >= 5 and s % SCALE_SAVE_STEPS)
    rep = c.exit_report(c.output_dir(cfg))
    save_secs += rep.get("save_seconds") or []
    save_s = c.median(save_secs)
    mib = (rep.get("checkpoint_bytes") or 0) / 2**20
    share = 100 * save_s / (DEFAULT_SAVE_STEPS * step_s + save_s) if step_s else None
    c.say(
        f"{name}: {mib:.1f} MiB, save {save_s:.2f}s, step {step_s:.3f}s, fresh {fresh_s:.1f}s, resume {resume_s:.1f}s"
    )
    return [
        name,
        mib,
        len(save_secs),
        save_s,
        mib / save_s if save_s else None,
        step_s,
        save_s / step_s if step_s else None,
        share,
        fresh_s,
        resume_s,
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    ap.add_argument("--share-steps", type=int, default=1000, help="steps of the measured-share runs (0: skip)")
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args(argv)
    c.banner("Checkpoint overhead and scale")
    work = c.work_dir("ckpt-overhead", a.workdir)
    if a.share_steps:
        rows = [measured_share(work, s, a.share_steps) for s in (DEFAULT_SAVE_STEPS, 5)]
        print(
            c.table(
                [
                    "model",
                    "save_steps",
                    "steps",
                    "saves",
                    "save s (sum)",
                    "train_runtime s",
                    "% of training time saving",
                ],
                rows,
            )
        )
        print()
    rows = [scale_row(work, n, SIZES[n]) for n in a.sizes.split(",")]
    print(
        c.table(
            [
                "model",
                "checkpoint MiB",
                "saves",
                "save s (median)",
                "MiB/s",
                "step s (batch 2)",
                "save ÷ step",
                f"projected % saving at save_steps {DEFAULT_SAVE_STEPS}",
                "start → 1st step s (fresh)",
                "start → 1st new step s (--resume)",
            ],
            rows,
        )
    )
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        print(
            f"\n{last[0]} vs {first[0]}: checkpoint x{last[1] / first[1]:.0f}, save time x{last[3] / first[3]:.0f}, "
            f"cold restart (--resume) x{last[9] / first[9]:.1f}"
        )
    if a.workdir is None:  # the ViT-B run leaves gigabytes of checkpoints: keep only configs and logs
        for d in work.glob("scale-*"):
            if d.is_dir():
                shutil.rmtree(d)
    print(f"\nwork dir {work}" + ("" if a.workdir else " (checkpoints removed; --workdir DIR keeps them)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
