"""``vit-supervisor``: keep a training run alive until it is done.

    vit-supervisor start CONFIG [--detach]     # foreground (what systemd runs), or back to the prompt
    vit-supervisor status [CONFIG | --run-dir DIR] [--json]
    vit-supervisor stop [CONFIG | --run-dir DIR] [--force]
    vit-supervisor report [CONFIG | --run-dir DIR]   # run/report.png and run/report.html

Exit codes. start: 0 completed or stopped, 1 could not begin (e.g. no disk
space for the lock file), 2 bad config, 3 failed (gave up, non-retryable
worker error, output directory deleted under the run), 4 another supervisor
or vit-train runs this directory (also after it was deleted and recreated),
75 stopped by SLURM's time-limit signal but the job could not requeue itself.
status: 0 running, 3 not running (stopped, completed, failed, supervisor dead),
4 unknown. stop: 0 stopped (or was not running), 1 did not stop in time.

Signals to a running supervisor: SIGTERM, SIGINT and SIGQUIT ask for a graceful
stop (the worker checkpoints; the same signal again kills it); SIGUSR1 and
SIGUSR2 log one status line (inside a SLURM job SIGUSR1 is the time-limit
signal: checkpoint, requeue the job, exit); SIGHUP is logged and ignored.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from supervisor import protocol, record, runlock
from supervisor.host import is_supervisor_process, poll_until
from supervisor.record import RunRecord
from supervisor.schema import Config, ConfigError, check_metrics_textfile, load_config
from supervisor.states import FINAL_STATES, State

ENV_LOG_FILE = "VIT_SUPERVISOR_LOG_FILE"  # set by --detach for its child: where its own log goes


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"vit-supervisor: error: {exc}", file=sys.stderr)
        return int(args.config_error_code)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vit-supervisor",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="supervise a run until it completes")
    s.add_argument("config", help="the run's YAML config")
    s.add_argument(
        "--detach",
        action="store_true",
        help="run in the background; return once the worker runs (logs go to OUTPUT_DIR/run/logs/)",
    )
    s.add_argument(
        "--detach-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="with --detach, give up waiting for the worker after S seconds (default 120)",
    )
    s.set_defaults(func=cmd_start, config_error_code=2)
    st = sub.add_parser("status", help="where a run is (no argument: every run on this machine)")
    _target(st)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=cmd_status, config_error_code=4)
    sp = sub.add_parser("stop", help="graceful stop: the worker checkpoints, nothing restarts")
    _target(sp)
    sp.add_argument("--force", action="store_true", help="do not wait for the checkpoint: kill the worker")
    sp.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="wait at most S seconds for the supervisor to exit (default: term_grace_s + 30)",
    )
    sp.set_defaults(func=cmd_stop, config_error_code=2)
    rp = sub.add_parser("report", help="draw the whole run (loss, eval metric, restarts) to a PNG and an HTML page")
    _target(rp)
    rp.set_defaults(func=cmd_report, config_error_code=2)
    return p


def _target(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="the run's YAML config")
    p.add_argument("--run-dir", type=Path, help="the run's output directory (instead of CONFIG)")
    p.add_argument(
        "--node",
        type=int,
        metavar="K",
        help="node K of a multi-node run (default: CONFIG's distributed.node_rank, else 0; "
        "with distributed.from_slurm the node is known only inside the job, so name it here)",
    )


def _node_rank(args: argparse.Namespace) -> int:
    """``--node``, else the node whose supervisor CONFIG names (multi-node torchrun); --run-dir means node 0."""
    node = getattr(args, "node", None)
    if node is not None:
        if node < 0:
            raise SystemExit(f"vit-supervisor: error: --node is {node}; it must be 0 or more")
        return int(node)
    if args.run_dir is None and args.config:
        return load_config(args.config, check_paths=False).node_rank
    return 0


def _output_dir(args: argparse.Namespace) -> Path | None:
    if args.run_dir is not None:
        return Path(args.run_dir).resolve()
    if args.config:
        return Path(load_config(args.config, check_paths=False).training.output_dir)
    return None


# ----------------------------------------------------------------------------- start


def cmd_start(args: argparse.Namespace) -> int:
    from supervisor import launch

    cfg = load_config(args.config)  # ConfigError -> exit 2 before anything is written
    cfg, placed = launch.resolve(cfg, os.environ)  # distributed.from_slurm: this node's place in the SLURM job
    from supervisor import journal

    journal.setting(os.environ)  # a bad VIT_SUPERVISOR_JOURNAL too (before --detach's log file)
    check_metrics_textfile(cfg)  # the supervisor's own concern (the worker does not check it)
    if placed is not None:
        print(f"vit-supervisor: {placed.describe()}", file=sys.stderr, flush=True)
    if args.detach:
        return _start_detached(cfg, args.detach_timeout)
    from supervisor import daemon, logs

    logs.setup(sys.stderr, fields={"run": cfg.training.output_dir, "config": cfg.source_path})
    return daemon.serve(cfg, log_path=os.environ.get(ENV_LOG_FILE))


_DETACH_DONE = frozenset({State.RUNNING, State.WAITING} | FINAL_STATES)
"""--detach returns once the detached supervisor reaches one of these."""


def _start_detached(cfg: Config, timeout: float) -> int:
    from supervisor import daemon

    run_dir = protocol.supervisor_dir(cfg.training.output_dir, cfg.node_rank)
    try:
        # Refuse here, with the pid, rather than in a log file; the child takes it for good.
        runlock.acquire(cfg.training.output_dir, "run", cfg.node_rank).release()
    except runlock.LockHeld as exc:
        print(f"vit-supervisor: {exc}", file=sys.stderr)
        return daemon.SUPERVISOR_LOCKED
    except OSError as exc:
        print(f"vit-supervisor: error: cannot take the run lock in {cfg.training.output_dir}: {exc}", file=sys.stderr)
        return daemon.SUPERVISOR_ERROR
    log_path = run_dir / protocol.LOGS_SUBDIR / "supervisor.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **{ENV_LOG_FILE: str(log_path)})
    with open(log_path, "ab") as log:
        # Own session, no terminal: the shell's hang-up and Ctrl+C no longer reach it.
        child = subprocess.Popen(
            [sys.executable, "-m", "supervisor.cli", "start", cfg.source_path],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            cwd="/",
        )

    def settled() -> RunRecord | tuple[int] | None:
        rec = record.load(cfg.training.output_dir, cfg.node_rank)
        if rec is not None and rec.supervisor_pid == child.pid and _state(rec) in _DETACH_DONE:
            return rec
        code = child.poll()
        return None if code is None else (code,)  # a tuple: exit code 0 must count as an answer

    got = poll_until(settled, timeout, interval=0.1)
    if isinstance(got, RunRecord):
        worker = f", worker pid {got.worker_pid}" if got.worker_pid else ""
        print(
            f"vit-supervisor: {got.state} (supervisor pid {child.pid}{worker})\n"
            f"  logs:   {log_path} and {run_dir / protocol.LOGS_SUBDIR}/attempt-N.log\n"
            f"  status: vit-supervisor status {cfg.source_path}"
        )
        return daemon.SUPERVISOR_FAILED if _state(got) == State.FAILED else 0
    if isinstance(got, tuple):
        print(f"vit-supervisor: the detached supervisor exited with code {got[0]}; see {log_path}", file=sys.stderr)
        return got[0] or 1
    print(
        f"vit-supervisor: no worker running after {timeout:.0f}s; the supervisor (pid {child.pid}) carries on, "
        f"see {log_path}",
        file=sys.stderr,
    )
    return 1


# ----------------------------------------------------------------------------- status


def cmd_status(args: argparse.Namespace) -> int:
    from supervisor import status

    out = _output_dir(args)
    if out is not None:
        v = status.view(out, _node_rank(args))
        print(json.dumps(v, indent=2, default=str) if args.json else status.render(v))
        return int(v["status_code"])
    runs = status.registered_runs()
    views = [status.view(Path(r["output_dir"])) for r in runs]
    if args.json:
        print(json.dumps(views, indent=2, default=str))
    elif not views:
        print(f"no runs registered in {status.registry_dir()}")
    else:
        print("\n\n".join(status.render(v) for v in views))
    if not views:
        return status.STATUS_UNKNOWN
    return status.STATUS_RUNNING if any(v["running"] for v in views) else status.STATUS_NOT_RUNNING


# ----------------------------------------------------------------------------- stop


def cmd_stop(args: argparse.Namespace) -> int:
    import psutil

    out = _output_dir(args)
    if out is None:
        print("vit-supervisor: error: stop needs CONFIG or --run-dir DIR", file=sys.stderr)
        return 2
    node = _node_rank(args)
    rec = record.load(out, node)
    if rec is None:
        print(f"vit-supervisor: no run in {out}")
        return 0
    pid = rec.supervisor_pid
    if rec.host and rec.host != socket.gethostname() and _state(rec) not in FINAL_STATES:
        # A run on shared storage, supervised elsewhere: its pid means nothing on this machine.
        how = f", or `scancel {rec.slurm.requeue_id}`" if rec.slurm is not None else ""
        print(f"vit-supervisor: the supervisor runs on {rec.host}: stop it there{how}", file=sys.stderr)
        return 1
    # Never signal a pid the state file names unless it is provably that supervisor (pid reuse).
    if pid is None or not is_supervisor_process(pid, rec.supervisor_create_time):
        print(f"vit-supervisor: not running (state {rec.state})")
        return 0
    timeout = args.timeout if args.timeout is not None else _grace(rec) + 30
    try:
        os.kill(pid, signal.SIGTERM)
        if args.force:
            # The second signal is what forces; wait until the first was taken, or the two would merge.
            poll_until(lambda: _state(record.load(out, node)) not in (State.RUNNING, None), 5.0)
            os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    print(f"vit-supervisor: stop sent to supervisor pid {pid}; waiting for the worker's checkpoint", flush=True)
    try:
        psutil.Process(pid).wait(timeout)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        print(f"vit-supervisor: still stopping after {timeout:.0f}s (use --force to kill the worker)", file=sys.stderr)
        return 1
    final = record.load(out, node)
    hb = protocol.read_record(protocol.Heartbeat, protocol.heartbeat_path(out))
    ckpt = protocol.newest_checkpoint_step(out)
    print(
        f"vit-supervisor: {final.state if final else None} at step {hb.global_step if hb else None}"
        + (f"; newest checkpoint {out / f'checkpoint-{ckpt}'}" if ckpt >= 0 else "")
    )
    return 0 if _state(final) in (State.STOPPED, State.COMPLETED) else 1


def _state(rec: RunRecord | None) -> State | None:
    """The record's state as a :class:`State`; None for no record or a name no supervisor writes."""
    try:
        return State(rec.state) if rec is not None and rec.state is not None else None
    except ValueError:
        return None


def _grace(rec: RunRecord) -> float:
    try:
        return load_config(rec.config, check_paths=False).supervisor.term_grace_s if rec.config else 60.0
    except (ConfigError, OSError, ValueError, TypeError):
        return 60.0


# ----------------------------------------------------------------------------- report


def cmd_report(args: argparse.Namespace) -> int:
    out = _output_dir(args)
    if out is None:
        print("vit-supervisor: error: report needs CONFIG or --run-dir DIR", file=sys.stderr)
        return 2
    from supervisor.report import render  # matplotlib only here: status and start stay light

    try:
        png, page = render(out)
    except FileNotFoundError as exc:
        print(f"vit-supervisor: error: {exc}", file=sys.stderr)
        return 3
    print(f"wrote {png}\nwrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
