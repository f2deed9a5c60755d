"""``vit-train``: train a ViT classifier from a YAML config; resume from the newest good checkpoint.

    vit-train configs/demo.yaml                    # start, or continue if checkpoints exist
    vit-train configs/demo.yaml --resume           # newest good checkpoint in output_dir
    vit-train configs/demo.yaml --checkpoint DIR   # exactly that checkpoint

Exit codes (the supervisor relies on them; protocol.EXIT_CODES, README): 0
completed, 1 crash, 2 config/checkpoint/data error or another process holds
the run, 3 interrupted (checkpoint committed), 4 out of memory, 5 disk low,
6 standby stale (a standby found the data changed since it prepared), 7 device
error (the accelerator failed; nothing was saved from it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from supervisor import protocol
from supervisor.schema import ConfigError, load_config
from worker import launch, startup
from worker.fault import StopRequest, set_process_name, write_exit_report


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, like every other user error
        write_exit_report(None, protocol.REASON_CONFIG_ERROR, f"vit-train: {message}")
        self.exit(protocol.EXIT_USER_ERROR, f"vit-train: error: {message} (see vit-train --help)\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="vit-train", description=__doc__.split("\n")[0])
    p.add_argument("config", help="the run's YAML config")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="resume from the newest checkpoint that validates")
    g.add_argument("--checkpoint", type=Path, help="resume from exactly this checkpoint folder")
    p.add_argument(
        "--standby",
        action="store_true",
        help="prepare everything, then wait for a go line on stdin (used by the supervisor)",
    )
    p.add_argument(
        "--per-device-train-batch-size",
        type=int,
        metavar="N",
        help="override training.per_device_train_batch_size (the supervisor's OOM lowering)",
    )
    p.add_argument(
        "--gradient-accumulation-steps", type=int, metavar="N", help="override training.gradient_accumulation_steps"
    )
    p.add_argument(
        "--no-snapshots",
        action="store_true",
        help="no shared-memory snapshots in this run (the supervisor's answer to a too small /dev/shm)",
    )
    return p.parse_args(argv)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "wandb", "urllib3", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("transformers.trainer").setLevel(logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: list[str] | None = None) -> int:
    stop = StopRequest()
    stop.install()  # a Ctrl+C during start-up must not become a traceback
    args = parse_args(argv)
    set_process_name("vit-standby" if args.standby else "vit-train")
    try:
        cfg = load_config(args.config)
        for name, value in (
            ("per_device_train_batch_size", args.per_device_train_batch_size),
            ("gradient_accumulation_steps", args.gradient_accumulation_steps),
        ):
            if value is not None:
                if value < 1:
                    raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
                setattr(cfg.training, name, value)
        if args.no_snapshots:
            cfg.snapshot.every_steps = 0
        if not args.standby:  # a standby gets its order on stdin
            order = launch.from_cli(cfg, resume=args.resume)
            if order is not None:
                launch.apply(cfg, order)
        if args.checkpoint is not None and not args.checkpoint.is_dir():
            raise ConfigError(f"--checkpoint {args.checkpoint} is not a folder")
        if cfg.data.source == "hf_dataset":  # its columns and labels are only known once it is opened
            from worker import hf_source

            hf_source.check(cfg)
    except ConfigError as exc:
        write_exit_report(None, protocol.REASON_CONFIG_ERROR, str(exc))
        print(f"vit-train: error: {exc}", file=sys.stderr)
        return protocol.EXIT_USER_ERROR
    setup_logging()
    if args.no_snapshots:
        logging.getLogger("vit_train").warning("Snapshots off for this run (--no-snapshots): disk checkpoints only")
    startup.skip_unused_imports(cfg)
    try:
        if args.standby:
            from worker.standby import serve

            return serve(cfg, stop)
        with startup.imports_without_gc():  # heavy imports only after the config is known to be good
            from worker.train import run

        return run(
            cfg, resume=args.resume, checkpoint=args.checkpoint.resolve() if args.checkpoint else None, stop=stop
        )
    except Exception as exc:  # anything run() did not classify is a crash, with its traceback
        logging.getLogger("vit_train").exception("Crashed")
        return write_exit_report(
            cfg.output_dir,
            protocol.REASON_CRASH,
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            exc=exc,
        )


def entry(argv: list[str] | None = None) -> None:
    """Console entry point: exit without the interpreter's teardown.

    Everything that matters (checkpoint, exit report, tracker) is on disk when
    main() returns; tearing down torch's thread pools and modules then takes
    another 1-2 s, which would delay every stop and every restart.
    """
    code = main(argv)
    import gc

    gc.collect()  # closes DataLoader iterators, which shut their worker processes down
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
