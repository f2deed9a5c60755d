"""Resume guard: a checkpoint only resumes the run it belongs to.

The settings a checkpoint depends on (model, labels, fusion, data fingerprint,
split) are recorded in ``run/guard.json`` when a run starts from scratch. A
resume that changes any of them is refused, naming each key with its old and new
value; settings that are safe to change (learning rate, batch size) only warn.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from supervisor import protocol
from supervisor.schema import Config

log = logging.getLogger("vit_train")


class IncompatibleCheckpoint(Exception):
    """A resume would continue a run under different resume-critical settings."""


def current(cfg: Config, fingerprint: str) -> dict[str, Any]:
    return {
        "critical": {**cfg.resume_critical(), "data_fingerprint": fingerprint},
        "soft": {
            "learning_rate": cfg.training.learning_rate,
            "effective_batch": cfg.training.effective_batch,
            "num_train_epochs": cfg.training.num_train_epochs,
            # What the model sees changes, not what the checkpoint holds: a resume under other
            # augmentation or preprocessing trains on, but it is not the run it was (warned).
            "data.augment": cfg.data.augment,
            "data.pair_augment": cfg.data.pair_augment,
            "data.image_size": cfg.data.image_size,
            "data.image_mean": cfg.data.image_mean,
            "data.image_std": cfg.data.image_std,
        },
    }


def path(output_dir: Path) -> Path:
    return protocol.run_dir(output_dir) / protocol.GUARD


def record(output_dir: Path, cfg: Config, fingerprint: str) -> None:
    protocol.atomic_write_json(path(output_dir), current(cfg, fingerprint))


def check(output_dir: Path, cfg: Config, fingerprint: str) -> None:
    """Raise IncompatibleCheckpoint if a resume would change a critical setting."""
    old = protocol.read_json(path(output_dir))
    if old is None and not path(output_dir).exists():
        log.warning(
            "No resume guard in %s (run started by an older version?); recording the current settings", output_dir
        )
        record(output_dir, cfg, fingerprint)
        return
    if old is None or not isinstance(old.get("critical"), dict):
        # Damaged (or written by hand): nothing in it can be compared. Kept aside, not trusted, not lost.
        aside = path(output_dir).with_name(f"{protocol.GUARD}.malformed")
        path(output_dir).replace(aside)
        log.warning(
            "The resume guard %s is malformed (kept as %s); recording the current settings",
            path(output_dir),
            aside.name,
        )
        record(output_dir, cfg, fingerprint)
        return
    new = current(cfg, fingerprint)
    changed = [
        f"{k}: {old['critical'].get(k)!r} -> {v!r}" for k, v in new["critical"].items() if old["critical"].get(k) != v
    ]
    if changed:
        raise IncompatibleCheckpoint(
            f"the checkpoints in {output_dir} were trained with other resume-critical settings ("
            + "; ".join(changed)
            + "): restore those settings, or use a new training.output_dir"
        )
    recorded = old.get("soft")
    soft: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
    for k, v in new["soft"].items():
        if k not in soft or k == "num_train_epochs":
            continue  # a guard recorded by an older version has no such key: nothing to compare
        was = soft[k]
        if was != v:
            log.warning("Resuming with %s changed: %r -> %r", k, was, v)
    if any(k not in soft for k in new["soft"]):
        record(output_dir, cfg, fingerprint)  # the keys an older guard lacks, from this attempt on
