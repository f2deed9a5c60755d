#!/usr/bin/env python3
"""Exactness: our resume vs stock ``Trainer.train(resume_from_checkpoint=...)`` after a SIGKILL.

    python bench/exactness.py                       # both configs, kills at steps 13 and 22
    python bench/exactness.py --configs augmented --kill-steps 27

Two configs, both the tests' TINY (from-scratch ViT on 400 digits, 38 steps, 19 an epoch, save every 5):
``plain`` as it is, and ``augmented`` with ``data.augment: standard`` (random resized crop and
flip) and 2 DataLoader workers. For each:
  1. reference: trained uninterrupted;
  2. a second run is SIGKILLed at the given step (after a checkpoint);
  3. ours:  ``python -m worker CONFIG --resume`` continues it;
  4. stock: the same checkpoint resumed by a plain transformers ``Trainer`` built from the same
     model, data and ``TrainingArguments`` (worker.train.prepare / training_arguments) but without
     the SupervisedTrainer overrides or our callbacks;
  5. stock + all weights: the same, except that the checkpoint's weights are loaded completely
     (our strict loader): what is left is the data side of the resume (with augmentation: which
     epoch's draws the resumed epoch sees; accelerate does not tell the dataset on the loader that
     skips the epoch's first batches).
Prints the max abs weight difference of each final model against its config's reference.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c

CONFIGS: dict[str, dict[str, Any]] = {
    "plain": {},
    "augmented": {"data": {"augment": "standard"}, "training": {"dataloader_num_workers": 2}},
}
STOCK = "stock `Trainer(resume_from_checkpoint=)`"
STOCK_ALL_WEIGHTS = "stock, every weight loaded"


def stock_resume(cfg_path: Path, checkpoint: Path, final_dir: Path, all_weights: bool) -> None:
    """Resume ``checkpoint`` with a plain ``Trainer`` and save the final model (run in a child)."""
    from transformers import Trainer

    from supervisor.schema import load_config
    from worker import checkpoint as ckpt
    from worker.cli import setup_logging
    from worker.train import compute_metrics, prepare, training_arguments

    setup_logging()
    import logging

    logging.getLogger("transformers").setLevel(logging.INFO)  # its "missing keys" warning is the point

    class AllWeightsTrainer(Trainer):  # type: ignore[misc]
        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            ckpt.load_weights_strict(model if model is not None else self.model, Path(resume_from_checkpoint))

    cfg = load_config(cfg_path)
    prepared = prepare(cfg)  # same seed, data split and initial weights as the worker
    trainer = (AllWeightsTrainer if all_weights else Trainer)(
        model=prepared.model,
        args=training_arguments(cfg, []),
        train_dataset=prepared.splits.train,
        eval_dataset=prepared.splits.eval,
        compute_metrics=compute_metrics,
    )
    trainer.train(resume_from_checkpoint=str(checkpoint))
    trainer.save_model(str(final_dir))


def kill_run(work: Path, name: str, overrides: dict[str, Any], kill_step: int) -> tuple[Path, int, int, Path]:
    """Start our worker, SIGKILL it at ``kill_step``; (config, step reached, newest checkpoint, a copy of it)."""
    cfg = c.write_config(
        work / f"{name}-kill{kill_step}.yaml",
        c.deep_update(overrides, {"training": {"output_dir": f"{name}-ours-{kill_step}"}}),
    )
    out = c.output_dir(cfg)
    p = c.spawn(c.worker_argv(cfg), work / f"{name}-ours-{kill_step}.log")
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
    saved = work / f"{name}-killed-checkpoint-{ck_step}"
    shutil.copytree(out / f"checkpoint-{ck_step}", saved)  # our resume rotates it away later
    c.say(f"{name}: killed at step {step}; newest checkpoint {ck_step}")
    return cfg, step, ck_step, saved


def stock_run(work: Path, name: str, overrides: dict[str, Any], tag: str, saved: Path, all_weights: bool) -> Path:
    cfg = c.write_config(
        work / f"{name}-{tag}.yaml", c.deep_update(overrides, {"training": {"output_dir": f"{name}-{tag}"}})
    )
    final = c.output_dir(cfg) / "final"
    log = work / f"{name}-{tag}.log"
    argv = [c.PY, __file__, "--stock", str(cfg), str(saved), str(final), "all" if all_weights else "stock"]
    if c.run_worker(cfg, log=log, argv=argv) != 0:
        raise SystemExit(f"the stock Trainer resume failed; see {log}")
    return final


def one_trial(
    work: Path, name: str, overrides: dict[str, Any], ref: dict[str, Any], kill_step: int, final_step: int
) -> list[list[object]]:
    cfg, _step, ck_step, saved = kill_run(work, name, overrides, kill_step)
    out = c.output_dir(cfg)
    if c.run_worker(cfg, "--resume", log=work / f"{name}-ours-{kill_step}.log") != 0:
        raise SystemExit(f"our resume failed; see {work / f'{name}-ours-{kill_step}.log'}")
    finals = {"ours (`vit-train --resume`)": (out / f"checkpoint-{final_step}", cfg)}
    for label, all_weights in ((STOCK, False), (STOCK_ALL_WEIGHTS, True)):
        tag = f"{'all' if all_weights else 'stock'}-{kill_step}"
        final = stock_run(work, name, overrides, tag, saved, all_weights)
        finals[label] = (final, cfg)
    log = (work / f"{name}-stock-{kill_step}.log").read_text(errors="replace")
    m = re.search(r"missing keys in the checkpoint model loaded: \[([^\]]*)\]", log)
    missing = len(m.group(1).split(",")) if m else 0
    rows: list[list[object]] = []
    for label, (final, cfg_path) in finals.items():
        w = c.load_weights(final, cfg_path)
        worst, differ, total = c.weight_diff(w, ref)
        enc = [k for k in w if ".layers." in k]
        enc_worst, enc_differ, _ = c.weight_diff({k: w[k] for k in enc}, {k: ref[k] for k in enc})
        rows.append(
            [
                name,
                kill_step,
                ck_step,
                label,
                f"{worst:.3g}",
                f"{differ}/{total}",
                f"{enc_differ}/{len(enc)} (max {enc_worst:.3g})",
                missing if label == STOCK else 0,
            ]
        )
    # For scale: how far the reference itself moved between the checkpoint and the end.
    moved, _, _ = c.weight_diff(c.load_weights(saved, cfg), ref)
    rows.append(
        [
            name,
            kill_step,
            ck_step,
            f"(for scale: checkpoint-{ck_step} vs the reference final)",
            f"{moved:.3g}",
            "",
            "",
            "",
        ]
    )
    return rows


def one_config(work: Path, name: str, kill_steps: list[int]) -> list[list[object]]:
    overrides = CONFIGS[name]
    ref_cfg = c.write_config(
        work / f"{name}-reference.yaml", c.deep_update(overrides, {"training": {"output_dir": f"{name}-reference"}})
    )
    ref_out = c.output_dir(ref_cfg)
    if c.run_worker(ref_cfg, log=work / f"{name}-reference.log") != 0:
        raise SystemExit(f"reference run failed; see {work / f'{name}-reference.log'}")
    final_step = c.exit_report(ref_out)["step"]
    c.say(f"{name}: reference done at step {final_step}")
    ref = c.load_weights(ref_out / f"checkpoint-{final_step}", ref_cfg)
    rows: list[list[object]] = []
    for k in kill_steps:
        rows += one_trial(work, name, overrides, ref, k, final_step)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kill-steps", default="13,22", help="comma-separated steps to SIGKILL at (default 13,22)")
    ap.add_argument("--configs", default="plain,augmented", help="comma-separated, of: " + ", ".join(CONFIGS))
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument(
        "--stock", nargs=4, metavar=("CONFIG", "CHECKPOINT", "FINAL_DIR", "VARIANT"), help=argparse.SUPPRESS
    )
    a = ap.parse_args(argv)
    if a.stock:
        stock_resume(Path(a.stock[0]), Path(a.stock[1]), Path(a.stock[2]), a.stock[3] == "all")
        return 0
    names = [n for n in a.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown config {', '.join(unknown)}: choose from {', '.join(CONFIGS)}")
    c.banner("Exactness: resume after SIGKILL, ours vs stock transformers Trainer")
    work = c.work_dir("exactness", a.workdir)
    kill_steps = [int(s) for s in a.kill_steps.split(",") if s]
    rows: list[list[object]] = []
    for name in names:
        rows += one_config(work, name, kill_steps)
    print(
        c.table(
            [
                "config",
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
    print(
        "\nconfigs: tests' TINY (38 steps, 19 an epoch, save_steps 5, CPU, OMP_NUM_THREADS=1); augmented: "
        f"data.augment standard, dataloader_num_workers 2; work dir {work}"
    )
    ours_exact = all(r[4] == "0" for r in rows if str(r[3]).startswith("ours"))
    print("ours bit-exact:", "yes" if ours_exact else "NO")
    return 0 if ours_exact else 1


if __name__ == "__main__":
    sys.exit(main())
