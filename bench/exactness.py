#!/usr/bin/env python3
"""Exactness: our resume vs stock ``Trainer.train(resume_from_checkpoint=...)`` after a SIGKILL.

    python bench/exactness.py                       # kills at steps 13 (mid-epoch) and 22 (after epoch 1)
    python bench/exactness.py --kill-steps 7

Same config (tests' TINY: from-scratch ViT on 400 digits, 38 steps, save every 5):
  1. reference: trained uninterrupted;
  2. a second run is SIGKILLed at the given step (after a checkpoint);
  3. ours:  ``python -m worker CONFIG --resume`` continues it;
  4. stock: the same checkpoint resumed by a plain transformers ``Trainer`` built from the same
     model, data and ``TrainingArguments`` (worker.train.prepare / training_arguments) but without
     the SupervisedTrainer overrides.
Prints the max abs weight difference of each final model against the reference.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c


def stock_resume(cfg_path: Path, checkpoint: Path, final_dir: Path) -> None:
    """Resume ``checkpoint`` with a plain ``Trainer`` and save the final model (run in a child)."""
    from transformers import Trainer

    from supervisor.schema import load_config
    from worker.cli import setup_logging
    from worker.train import compute_metrics, prepare, training_arguments

    setup_logging()
    import logging

    logging.getLogger("transformers").setLevel(logging.INFO)  # its "missing keys" warning is the point
    cfg = load_config(cfg_path)
    prepared = prepare(cfg)  # same seed, data split and initial weights as the worker
    trainer = Trainer(
        model=prepared.model,
        args=training_arguments(cfg, []),
        train_dataset=prepared.splits.train,
        eval_dataset=prepared.splits.eval,
        compute_metrics=compute_metrics,
    )
    trainer.train(resume_from_checkpoint=str(checkpoint))
    trainer.save_model(str(final_dir))


def one_trial(work: Path, ref_cfg: Path, ref_final: Path, kill_step: int, final_step: int) -> list[list[object]]:
    cfg = c.write_config(work / f"kill{kill_step}.yaml", {"training": {"output_dir": f"ours-{kill_step}"}})
    out = c.output_dir(cfg)
    p = c.spawn(c.worker_argv(cfg), work / f"ours-{kill_step}.log")
    try:
        _pid, step = c.wait_for(
            lambda: (hb := c.heartbeat(out)).get("global_step", 0) >= kill_step and (hb["pid"], hb["global_step"]),
            300,
            f"step {kill_step}",
            progress=lambda: c.run_progress(out),
        )
        p.send_signal(signal.SIGKILL)
        p.wait()
    finally:
        c.kill_group(p)
    ck_step = c.newest_checkpoint_step(out)
    saved = work / f"killed-checkpoint-{ck_step}"
    shutil.copytree(out / f"checkpoint-{ck_step}", saved)  # our resume rotates it away later
    c.say(f"killed at step {step}; newest checkpoint {ck_step}")

    rc = c.run_worker(cfg, "--resume", log=work / f"ours-{kill_step}.log")
    if rc != 0:
        raise SystemExit(f"our resume failed (exit {rc}); see {work / f'ours-{kill_step}.log'}")
    ours = c.load_weights(out / f"checkpoint-{final_step}", cfg)

    stock_cfg = c.write_config(work / f"stock{kill_step}.yaml", {"training": {"output_dir": f"stock-{kill_step}"}})
    stock_final = c.output_dir(stock_cfg) / "final"
    rc = c.run_worker(
        stock_cfg,
        log=work / f"stock-{kill_step}.log",
        argv=[c.PY, __file__, "--stock", str(stock_cfg), str(saved), str(stock_final)],
    )
    if rc != 0:
        raise SystemExit(f"the stock Trainer resume failed (exit {rc}); see {work / f'stock-{kill_step}.log'}")
    stock = c.load_weights(stock_final, stock_cfg)

    ref = c.load_weights(ref_final, ref_cfg)
    log = (work / f"stock-{kill_step}.log").read_text(errors="replace")
    m = re.search(r"missing keys in the checkpoint model loaded: \[([^\]]*)\]", log)
    missing = len(m.group(1).split(",")) if m else 0
    rows = []
    for name, w in (("ours (`vit-train --resume`)", ours), ("stock `Trainer(resume_from_checkpoint=)`", stock)):
        worst, differ, total = c.weight_diff(w, ref)
        enc = [k for k in w if ".layers." in k]
        enc_worst, enc_differ, _ = c.weight_diff({k: w[k] for k in enc}, {k: ref[k] for k in enc})
        rows.append(
            [
                kill_step,
                ck_step,
                name,
                f"{worst:.3g}",
                f"{differ}/{total}",
                f"{enc_differ}/{len(enc)} (max {enc_worst:.3g})",
                missing if name.startswith("stock") else 0,
            ]
        )
    # For scale: how far the reference itself moved between the checkpoint and the end.
    moved, _, _ = c.weight_diff(c.load_weights(saved, cfg), ref)
    rows.append(
        [kill_step, ck_step, f"(for scale: checkpoint-{ck_step} vs the reference final)", f"{moved:.3g}", "", "", ""]
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kill-steps", default="13,22", help="comma-separated steps to SIGKILL at (default 13,22)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--stock", nargs=3, metavar=("CONFIG", "CHECKPOINT", "FINAL_DIR"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.stock:
        stock_resume(Path(a.stock[0]), Path(a.stock[1]), Path(a.stock[2]))
        return 0
    c.banner("Exactness: resume after SIGKILL, ours vs stock transformers Trainer")
    work = c.work_dir("exactness", a.workdir)
    ref_cfg = c.write_config(work / "reference.yaml", {"training": {"output_dir": "reference"}})
    ref_out = c.output_dir(ref_cfg)
    if c.run_worker(ref_cfg, log=work / "reference.log") != 0:
        raise SystemExit(f"reference run failed; see {work / 'reference.log'}")
    final_step = c.exit_report(ref_out)["step"]
    c.say(f"reference done at step {final_step}")
    rows = []
    for k in [int(s) for s in a.kill_steps.split(",") if s]:
        rows += one_trial(work, ref_cfg, ref_out / f"checkpoint-{final_step}", k, final_step)
    print(
        c.table(
            [
                "killed at step",
                "resumed from",
                "resume by",
                "max abs diff vs reference",
                "tensors differing",
                "encoder-layer tensors differing",
                "keys reported missing at load",
            ],
            rows,
        )
    )
    print(f"\nconfig: tests' TINY ({final_step} steps, save_steps 5, CPU, OMP_NUM_THREADS=1); work dir {work}")
    ours_exact = all(r[3] == "0" for r in rows if r[2].startswith("ours"))
    print("ours bit-exact:", "yes" if ours_exact else "NO")
    return 0 if ours_exact else 1


if __name__ == "__main__":
    sys.exit(main())
