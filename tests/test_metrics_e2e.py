"""Prometheus metrics of a real supervised run: the HTTP endpoint scraped over HTTP before and after a
real SIGKILL of the worker, the exposition checked by Debian's promtool, and the textfile read through
a real prometheus-node-exporter. One run (module-scoped) serves every check."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from filelock import FileLock
from prometheus_client.parser import text_string_to_metric_families

from tests import debtools
from tests.conftest import TINY, Run, deep_update, finish, wait_for, worker_env

pytestmark = pytest.mark.e2e


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


def scrape_if(url: str, ok: Callable[[str], bool]) -> str | None:
    text = scrape(url)
    return text if ok(text) else None


def value(text: str, name: str, **labels: str) -> float | None:
    """The sample ``name`` with exactly ``labels`` (besides run, job and instance)."""
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            rest = {k: v for k, v in s.labels.items() if k not in ("run", "job", "instance")}
            if s.name == name and rest == labels:
                return s.value
    return None


def samples(text: str, name: str) -> list[Any]:
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name]


def listen_address(run: Run) -> str | None:
    """``host:port`` from the supervisor's "metrics" log line (the config asks for port 0)."""
    for line in run.log().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "metrics" and event.get("listen"):
            return str(event["listen"])
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> dict[str, Any]:
    """What :func:`observe` saw, once per test session: under xdist the first process to get here
    runs it and the other reads its record (the module's tests may be spread over both)."""
    if worker_id == "master":
        return observe(tmp_path_factory.mktemp("metrics_run"))
    shared = tmp_path_factory.getbasetemp().parent / "metrics-run"
    with FileLock(str(shared) + ".lock"):
        done = shared / "observed.json"
        if not done.is_file():
            shutil.rmtree(shared, ignore_errors=True)  # a half-done one from a process that failed
            shared.mkdir()
            done.write_text(json.dumps(observe(shared)))
        seen: dict[str, Any] = json.loads(done.read_text())
        return seen


def observe(tmp: Path) -> dict[str, Any]:
    """One supervised run with metrics on: scraped while attempt 1 trains, SIGKILLed, scraped while
    attempt 2 trains past attempt 1's last step, then stopped. Returns what each stage saw."""
    textfiles = tmp / "textfile"
    textfiles.mkdir()
    prom = textfiles / "vit.prom"
    cfg = tmp / "config.yaml"
    overrides = {
        # Never completes while the test looks: it is stopped at the end.
        "training": {"max_steps": 2000},
        "snapshot": {"root": str(tmp / "shm")},
        "supervisor": {
            "standby": False,
            "metrics": {"listen": "127.0.0.1:0", "textfile": str(prom), "textfile_interval_s": 0.5},
        },
    }
    cfg.write_text(yaml.safe_dump(deep_update(TINY, overrides)))
    run = Run(tmp, cfg)
    seen: dict[str, Any] = {"prom": str(prom)}
    try:
        proc = run.start()
        address = run.wait_for(lambda: listen_address(run), 60, "the supervisor's metrics line")
        url = f"http://{address}/metrics"
        seen["url"] = url
        run.worker_at_step(3)
        # The supervisor publishes what its loop has observed: wait for it to have seen the step too.
        seen["before"] = run.wait_for(
            lambda: scrape_if(url, lambda t: (value(t, "vit_supervisor_training_step") or 0) > 3),
            30,
            "a scrape at step 4 or later",
        )
        old = run.state()["worker_pid"]
        os.kill(old, signal.SIGKILL)
        # Past the killed attempt's last step: the restart's first new step (its recovery) is recorded.
        reached = run.wait_for(
            lambda: (run.state().get("attempts") or [{}])[0].get("step_reached"), 45, "attempt 1's end"
        )
        run.worker_at_step(reached, attempt=2)
        seen["after"] = run.wait_for(
            lambda: scrape_if(url, lambda t: value(t, "vit_supervisor_last_recovery_seconds") is not None),
            30,
            "a scrape with the restart's recovery time",
        )
        seen["state_after"] = run.state()
        seen["textfile_running"] = run.wait_for(
            lambda: (t := prom.read_text()) and value(t, "vit_supervisor_attempt") == 2 and t, 30, "textfile update"
        )
        proc.send_signal(signal.SIGTERM)
        seen["exit"] = finish(proc, run)
        seen["textfile_final"] = prom.read_text()
        return seen
    finally:
        run.cleanup()


def test_step_grows_across_a_sigkilled_worker(observed: Any) -> None:
    before = value(observed["before"], "vit_supervisor_training_step")
    after = value(observed["after"], "vit_supervisor_training_step")
    a1 = observed["state_after"]["attempts"][0]
    assert before is not None and after is not None and before <= a1["step_reached"] < after
    assert value(observed["before"], "vit_supervisor_attempt") == 1
    assert value(observed["after"], "vit_supervisor_attempt") == 2
    for text in (observed["before"], observed["after"]):
        assert value(text, "vit_supervisor_state", state="running") == 1.0
        # A scrape can land in a checkpoint save (every 5 steps here) or an evaluation.
        marked = [s.labels["state"] for s in samples(text, "vit_supervisor_worker_state") if s.value == 1]
        assert marked in (["training"], ["saving"], ["evaluating"]), marked


def test_restarts_counter_counts_the_kill_once_as_a_crash(observed: Any) -> None:
    assert observed["state_after"]["attempts"][0]["reason"] == "crash"
    assert value(observed["before"], "vit_supervisor_restarts_total", reason="crash") == 0
    assert value(observed["after"], "vit_supervisor_restarts_total", reason="crash") == 1
    others = [
        s.value for s in samples(observed["after"], "vit_supervisor_restarts_total") if s.labels["reason"] != "crash"
    ]
    assert others and not any(others)


def test_steps_redone_and_recovery_follow_the_run_record(observed: Any) -> None:
    a1, a2 = observed["state_after"]["attempts"][:2]
    assert value(observed["after"], "vit_supervisor_steps_redone_total") == max(
        0, a1["step_reached"] - a2["step_start"]
    )
    recovery = value(observed["after"], "vit_supervisor_last_recovery_seconds")
    assert recovery is not None and recovery == pytest.approx(a2["first_step_at"] - a1["end"], abs=0.01)
    assert value(observed["before"], "vit_supervisor_last_recovery_seconds") is None


def test_heartbeat_age_is_small_while_training(observed: Any) -> None:
    # Scraped right after the test saw a fresh heartbeat; generous for a loaded 2-core machine.
    for text in (observed["before"], observed["after"]):
        age = value(text, "vit_supervisor_heartbeat_age_seconds")
        assert age is not None and 0 <= age < 20


def test_batch_checkpoint_and_disk_are_exported(observed: Any) -> None:
    text = observed["after"]
    assert value(text, "vit_supervisor_per_device_train_batch_size") == TINY["training"]["per_device_train_batch_size"]
    assert value(text, "vit_supervisor_gradient_accumulation_steps") == 1
    assert value(text, "vit_supervisor_max_steps") == 2000
    assert (value(text, "vit_supervisor_checkpoint_step") or 0) >= 5
    assert (value(text, "vit_supervisor_disk_free_bytes") or 0) > 0
    assert value(text, "vit_supervisor_standby_ready") == 0


def test_endpoint_output_passes_promtool_check_metrics(observed: Any) -> None:
    promtool = debtools.require("promtool")
    for text in (observed["before"], observed["after"]):
        r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr


def test_textfile_follows_the_run_and_keeps_the_final_state(observed: Any) -> None:
    assert observed["exit"] == 0
    running, final = observed["textfile_running"], observed["textfile_final"]
    assert value(running, "vit_supervisor_state", state="running") == 1.0
    assert value(final, "vit_supervisor_state", state="stopped") == 1.0
    assert value(final, "vit_supervisor_restarts_total", reason="crash") == 1
    assert [p.name for p in Path(observed["prom"]).parent.iterdir()] == ["vit.prom"]  # no temporary file left


def test_endpoint_closes_when_the_supervisor_exits(observed: Any) -> None:
    with pytest.raises(OSError):
        scrape(observed["url"])


def test_node_exporter_serves_the_textfile(observed: Any, tmp_path: Path) -> None:
    exporter = debtools.require("prometheus-node-exporter")
    port = free_port()
    log = tmp_path / "node_exporter.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [
                exporter,
                f"--web.listen-address=127.0.0.1:{port}",
                "--collector.disable-defaults",
                "--collector.textfile",
                f"--collector.textfile.directory={Path(observed['prom']).parent}",
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=worker_env(),
        )
    try:

        def served() -> str | None:
            try:
                return scrape(f"http://127.0.0.1:{port}/metrics")
            except OSError:
                assert proc.poll() is None, log.read_text()
                return None

        text = wait_for(served, 30, "node_exporter's /metrics", interval=0.1, context=log.read_text)
    finally:
        proc.terminate()
        proc.wait(10)
    assert value(text, "node_textfile_scrape_error") == 0, log.read_text()
    assert value(text, "vit_supervisor_state", state="stopped") == 1.0
    assert value(text, "vit_supervisor_restarts_total", reason="crash") == 1
    assert value(text, "vit_supervisor_attempt") == 2


def test_a_port_in_use_stops_start_with_one_line_before_anything_runs(new_run: Any, make_config: Any) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run: Run = new_run(make_config({"supervisor": {"metrics": {"listen": f"127.0.0.1:{port}"}}}))
        r = run.cli("start", str(run.config))
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"vit-supervisor: error: supervisor.metrics.listen 127.0.0.1:{port}: cannot listen"
    ), r.stderr
    assert not (run.out / "run" / "state.json").exists() and not (run.out / "run" / "logs").exists()
