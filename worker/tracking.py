"""The experiment tracker: one run per output directory, whatever the number of restarts.

Starting wandb costs about a second and a half of CPU at the start of an attempt
(measured with wandb 0.31, offline, 2 cores): importing it (0.4-0.5 s), starting its
``wandb-core`` service process (0.2 s), and inside ``wandb.init`` importing
``wandb.sdk.launch`` to look for staged launch inputs (0.33 s), importing ``requests``
for its telemetry proxy (0.08 s) and listing every installed package for the run's
requirements (0.16 s). None of that depends on the run, so a standby does it in
:func:`warm` before its go, and what remains of ``wandb.init`` at the go is about
0.03-0.1 s. A standby's attempt does not list the packages again: it runs in the
same environment as the run's first attempt, which is never a standby and which
recorded them.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
import time

from supervisor import protocol
from supervisor.schema import Config

log = logging.getLogger("vit_train")

_warmed = False
"""Set by :func:`warm`, i.e. in a standby: its ``wandb.init`` skips the package list."""


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


def warm(cfg: Config) -> None:
    """Everything of the tracker's start that does not depend on the run: imports and the
    service process (for a standby, before its go). Also the evaluation's metrics."""
    import sklearn.metrics  # noqa: F401  # compute_metrics, at the first evaluation
    import transformers.integrations.integration_utils  # noqa: F401  # the Trainer's WandbCallback

    if not enabled(cfg):
        return
    os.environ.setdefault("WANDB_SILENT", "true")
    import requests  # noqa: F401  # wandb.init's telemetry proxy
    import wandb
    import wandb.sdk.launch.inputs.internal  # wandb.init looks for staged launch inputs

    wandb.setup()  # starts the wandb-core service process that wandb.init connects to
    global _warmed
    _warmed = True


def init(cfg: Config, run_id: str) -> None:
    tr = cfg.tracking
    t0 = time.monotonic()
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
            x_transaction_log_flush_interval=tr.flush_interval_s,
            console="off",
            x_disable_stats=True,
            x_save_requirements=not _warmed,
        ),
    )
    log.info("Tracker ready in %.3fs (wandb %s, run %s)", time.monotonic() - t0, tr.mode, run_id)


def finish(code: int) -> None:
    if "wandb" not in sys.modules:
        return  # never started: importing it now would only delay the exit
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=code)
    except Exception as exc:  # the tracker must never turn an outcome into a crash
        log.warning("Tracker did not finish cleanly: %s", exc)
