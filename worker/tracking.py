"""The experiment tracker: one run per output directory, whatever the number of restarts."""

from __future__ import annotations

import logging
import os
import secrets
import sys

from supervisor import protocol
from supervisor.schema import Config

log = logging.getLogger("vit_train")


def enabled(cfg: Config) -> bool:
    return cfg.tracking.backend == "wandb" and cfg.tracking.mode != "disabled"


def tracker_run_id(output_dir: os.PathLike[str] | str) -> str:
    """The run's tracker id, created by the first attempt and read by every later one."""
    p = protocol.run_dir(output_dir) / protocol.TRACKER_ID
    try:
        existing = p.read_text().strip()
    except OSError:
        existing = ""
    if existing:
        return existing
    # Several ranks may get here at once: create exclusively, and the losers read the winner's id.
    tmp = p.with_name(f".{p.name}.{os.getpid()}")
    tmp.write_text(secrets.token_hex(4) + "\n")
    try:
        os.link(tmp, p)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return p.read_text().strip()


def init(cfg: Config, run_id: str) -> None:
    tr = cfg.tracking
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    wandb.init(
        id=run_id,
        resume="allow",
        mode=tr.mode,
        project=tr.project,
        entity=tr.entity,
        name=tr.run_name or cfg.output_dir.name,
        dir=str(protocol.run_dir(cfg.output_dir)),
        settings=wandb.Settings(
            x_transaction_log_flush_interval=tr.flush_interval_s, console="off", x_disable_stats=True
        ),
    )


def finish(code: int) -> None:
    if "wandb" not in sys.modules:
        return  # never started: importing it now would only delay the exit
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=code)
    except Exception as exc:  # the tracker must never turn an outcome into a crash
        log.warning("Tracker did not finish cleanly: %s", exc)
