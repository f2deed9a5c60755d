"""``vit-supervisor``: keep a training run alive until it is done.

    vit-supervisor start CONFIG [--detach]     # foreground (what systemd runs), or back to the prompt
    vit-supervisor status [CONFIG | --run-dir DIR] [--json]
    vit-supervisor stop [CONFIG | --run-dir DIR] [--force]
    vit-supervisor report [CONFIG | --run-dir DIR]   # run/report.png and run/report.html

Exit codes. start: 0 completed or stopped, 2 bad config, 3 failed (gave up or
non-retryable worker error), 4 another supervisor runs this directory.
status: 0 running, 3 not running (stopped, completed, failed, supervisor dead),
4 unknown. stop: 0 stopped (or was not running), 1 did not stop in time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from supervisor import protocol
from supervisor.schema import Config, ConfigError, load_config

ENV_LOG_FILE = "VIT_SUPERVISOR_LOG_FILE"  # set by --detach for its child: where its own log goes


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"vit-supervisor: error: {exc}", file=sys.stderr)
        return args.config_error_code


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


def _node_rank(args: argparse.Namespace) -> int:
    """The node whose supervisor CONFIG names (multi-node torchrun); --run-dir means node 0."""
    if args.run_dir is None and args.config:
        return load_config(args.config, check_paths=False).node_rank
    return 0


def _output_dir(args: argparse.Namespace) -> Path | None:
    if args.run_dir is not None:
        return args.run_dir.resolve()
    if args.config:
        return Path(load_config(args.config, check_paths=False).training.output_dir)
    return None


# ----------------------------------------------------------------------------- start


def cmd_start(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)  # ConfigError -> exit 2 before anything is written
    if args.detach:
        return _start_detached(cfg, args.detach_timeout)
    from supervisor import daemon, logs

    logs.setup(sys.stderr)
    return daemon.serve(cfg, log_path=os.environ.get(ENV_LOG_FILE))


def _start_detached(cfg: Config, timeout: float) -> int:
    from supervisor import daemon

    run_dir = protocol.supervisor_dir(cfg.training.output_dir, cfg.node_rank)
    try:
        os.close(daemon.acquire_lock(run_dir))  # refuse here, with the pid, rather than in a log file
    except daemon.LockHeld as exc:
        print(f"vit-supervisor: {exc}", file=sys.stderr)
        return daemon.SUPERVISOR_LOCKED
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
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = child.poll()
        state = protocol.read_json(protocol.state_path(cfg.training.output_dir, cfg.node_rank)) or {}
        mine = state.get("supervisor_pid") == child.pid
        if mine and state.get("state") in ("running", "waiting", "completed", "stopped", "failed"):
            worker = f", worker pid {state['worker_pid']}" if state.get("worker_pid") else ""
            print(
                f"vit-supervisor: {state['state']} (supervisor pid {child.pid}{worker})\n"
                f"  logs:   {log_path} and {run_dir / protocol.LOGS_SUBDIR}/attempt-N.log\n"
                f"  status: vit-supervisor status {cfg.source_path}"
            )
            return 3 if state["state"] == "failed" else 0
        if code is not None:
            print(f"vit-supervisor: the detached supervisor exited with code {code}; see {log_path}", file=sys.stderr)
            return code or 1
        time.sleep(0.1)
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
        return v["status_code"]
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

    from supervisor import status

    out = _output_dir(args)
    if out is None:
        print("vit-supervisor: error: stop needs CONFIG or --run-dir DIR", file=sys.stderr)
        return 2
    node = _node_rank(args)
    state = protocol.read_json(protocol.state_path(out, node))
    if state is None:
        print(f"vit-supervisor: no run in {out}")
        return 0
    pid = state.get("supervisor_pid")
    if not status.supervisor_alive(pid, state.get("supervisor_create_time")):
        print(f"vit-supervisor: not running (state {state.get('state')})")
        return 0
    grace = _grace(state)
    timeout = args.timeout if args.timeout is not None else grace + 30
    os.kill(pid, signal.SIGTERM)
    if args.force:
        # The second signal is what forces; wait until the first was taken, or the two would merge.
        _wait(lambda: (protocol.read_json(protocol.state_path(out, node)) or {}).get("state") != "running", 5.0)
        try:
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
    final: dict[str, Any] = protocol.read_json(protocol.state_path(out, node)) or {}
    step = (protocol.read_json(protocol.heartbeat_path(out)) or {}).get("global_step")
    ckpt = protocol.newest_checkpoint_step(out)
    print(
        f"vit-supervisor: {final.get('state')} at step {step}"
        + (f"; newest checkpoint {out / f'checkpoint-{ckpt}'}" if ckpt >= 0 else "")
    )
    return 0 if final.get("state") in ("stopped", "completed") else 1


def _grace(state: dict[str, Any]) -> float:
    try:
        return load_config(state["config"], check_paths=False).supervisor.term_grace_s
    except (ConfigError, KeyError, TypeError):
        return 60.0


def _wait(pred: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


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
