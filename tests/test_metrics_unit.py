"""Prometheus metrics without a worker: settings, the numbers a run record gives, the exposition
(checked by Debian's promtool), the HTTP endpoint, the textfile, and the shipped alert rules
(``promtool check rules``, and ``promtool test rules``: each alert fires on its case and stays quiet
on a healthy run)."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from supervisor import metrics, protocol, shm
from supervisor.goodput import BUCKETS
from supervisor.metrics import Exporter, facts_of
from supervisor.record import AttemptRecord, RunRecord, StandbyRecord
from supervisor.schema import ConfigError, check_metrics_textfile, from_dict, load_config, parse_listen
from supervisor.states import State
from tests import debtools
from tests.conftest import REPO, TINY, deep_update

RULES = REPO / "systemd" / "vit-supervisor.rules.yml"


@pytest.fixture(scope="session")
def promtool() -> str:
    return debtools.require("promtool")


@pytest.fixture(autouse=True)
def every_observe_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests hand over facts back to back; the loop's throttle has its own test."""
    monkeypatch.setattr(metrics, "OBSERVE_INTERVAL_S", 0.0)


class Log:
    """Records what the exporter logs (structlog's call shape)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def info(self, event: str, **kw: Any) -> None:
        self.lines.append(("info", event, kw))

    def warning(self, event: str, **kw: Any) -> None:
        self.lines.append(("warning", event, kw))


def config(tmp_path: Path, **metrics_cfg: Any) -> Any:
    return from_dict(
        deep_update(
            TINY,
            {
                "training": {"output_dir": str(tmp_path / "out")},
                "snapshot": {"root": str(tmp_path / "shm")},
                "supervisor": {"metrics": metrics_cfg},
            },
        )
    )


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by (name, sorted labels without run)."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "run"))
            out[(s.name, labels)] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("9400", "127.0.0.1", 9400),
        (":9400", "127.0.0.1", 9400),
        ("0.0.0.0:9400", "0.0.0.0", 9400),
        ("localhost:0", "localhost", 0),
        ("[::1]:9400", "::1", 9400),
    ],
)
def test_listen_takes_host_port_and_a_port_alone_means_loopback(listen: str, host: str, port: int) -> None:
    assert parse_listen(listen) == (host, port)


def test_listen_as_a_yaml_number_is_a_port_on_loopback(tmp_path: Path) -> None:
    assert config(tmp_path, listen=9400).supervisor.metrics.address == ("127.0.0.1", 9400)


@pytest.mark.parametrize(
    ("listen", "says"),
    [
        ("host", "is not host:port or a port"),
        ("::1:9400", "is not host:port or a port"),
        ("[::1]", "is not [IPv6]:port"),
        ("127.0.0.1:70000", "from 0 to 65535"),
        ("127.0.0.1:http", "from 0 to 65535"),
        ("my host:9400", "no usable host"),
    ],
)
def test_bad_listen_is_one_line_naming_the_setting(tmp_path: Path, listen: str, says: str) -> None:
    with pytest.raises(ConfigError) as e:
        config(tmp_path, listen=listen)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("supervisor.metrics.listen") and says in msg and "e.g. 9400" in msg


def test_metrics_are_off_by_default(tmp_path: Path) -> None:
    m = config(tmp_path).supervisor.metrics
    assert not m.enabled and m.address is None and m.textfile is None


def test_textfile_must_end_in_prom(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"must be a file name ending in \.prom"):
        config(tmp_path, textfile=str(tmp_path / "vit.txt"))


def test_textfile_is_relative_to_the_config_and_its_folder_must_exist(tmp_path: Path) -> None:
    (tmp_path / "tf").mkdir()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(deep_update(TINY, {"supervisor": {"metrics": {"textfile": "tf/vit.prom"}}})))
    assert load_config(path).supervisor.metrics.textfile == str(tmp_path / "tf" / "vit.prom")
    path.write_text(yaml.safe_dump(deep_update(TINY, {"supervisor": {"metrics": {"textfile": "nope/vit.prom"}}})))
    cfg = load_config(path)  # the worker loads it: the supervisor's metrics are none of its business
    with pytest.raises(ConfigError) as e:
        check_metrics_textfile(cfg)
    assert "\n" not in str(e.value) and f"the folder {tmp_path / 'nope'} does not exist" in str(e.value)


def test_start_refuses_a_textfile_folder_that_does_not_exist_before_writing_anything(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(deep_update(TINY, {"supervisor": {"metrics": {"textfile": "nope/vit.prom"}}})))
    r = subprocess.run(
        [sys.executable, "-m", "supervisor.cli", "start", str(path), "--detach"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"vit-supervisor: error: supervisor.metrics.textfile {tmp_path / 'nope' / 'vit.prom'}")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- numbers from the run record


def _attempt(n: int, **kw: Any) -> AttemptRecord:
    return AttemptRecord(attempt=n, start=1000.0 + n, **kw)


def test_restarts_are_counted_by_how_the_attempt_ended() -> None:
    rec = RunRecord(
        attempt=4,
        attempts=[
            _attempt(1, end=1010.0, reason="crash", step_reached=12),
            _attempt(2, end=1020.0, reason="oom", step_reached=14, step_start=10, first_step_at=1015.0),
            _attempt(3, end=1030.0, reason="stopped", step_reached=20, step_start=10, first_step_at=1025.0),
            _attempt(4, step_start=20),
        ],
    )
    f = facts_of(rec, "running", None, 8, 2)
    restarts = dict(f.restarts)
    assert restarts["crash"] == 1 and restarts["oom"] == 1 and "stopped" not in restarts
    assert set(metrics.RESTART_REASONS) <= set(restarts)  # the others at 0, so increase() sees the first one
    assert f.steps_redone == (12 - 10) + (14 - 10)  # a stop, then a start by hand, redoes nothing
    assert f.last_recovery_s == pytest.approx(1025.0 - 1020.0)


def test_a_restart_under_way_counts_and_a_run_that_gave_up_does_not() -> None:
    rec = RunRecord(attempt=1, attempts=[_attempt(1, end=1010.0, reason="hang", step_reached=3)])
    assert dict(facts_of(rec, State.BACKOFF.value, None, 8, 1).restarts)["hang"] == 1
    assert dict(facts_of(rec, State.FAILED.value, None, 8, 1).restarts)["hang"] == 0
    stale = RunRecord(attempts=[_attempt(1, end=1.0, reason="standby_stale"), _attempt(2)])
    assert sum(n for _, n in facts_of(stale, "running", None, 8, 1).restarts) == 0


def test_goodput_has_every_bucket_and_no_ratio_before_any_time_is_accounted(tmp_path: Path) -> None:
    x = Exporter(config(tmp_path, listen="0"), Log())
    x.observe(RunRecord(), State.STARTING, None, 16, 1)
    text = generate_latest(x.registry).decode()
    for b in BUCKETS:
        assert value(text, "vit_supervisor_goodput_seconds_total", bucket=b) == 0.0
    assert "vit_supervisor_goodput_ratio" not in text and "NaN" not in text
    x.observe(RunRecord(goodput={"training": 90.0, "startup": 8.0, "redo": 2.0}), State.RUNNING, None, 16, 1)
    text = generate_latest(x.registry).decode()
    assert value(text, "vit_supervisor_goodput_ratio") == pytest.approx(0.9)
    assert value(text, "vit_supervisor_goodput_seconds_total", bucket="startup") == 8.0


# ----------------------------------------------------------------------------- the exposition


def full_exporter(tmp_path: Path, **metrics_cfg: Any) -> Exporter:
    """An exporter with every metric present: a heartbeat, a checkpoint, a snapshot store, a standby."""
    cfg = config(tmp_path, **metrics_cfg)
    out = Path(cfg.training.output_dir)
    (out / "checkpoint-10").mkdir(parents=True)
    store = shm.default_root(out, 0, cfg.snapshot.root)
    store.mkdir(parents=True)
    (store / shm.HEADER).write_text(json.dumps({"step": 12, "time": time.time() - 3, "size": 1000}))
    x = Exporter(cfg, Log())
    rec = RunRecord(
        attempt=2,
        attempts=[
            _attempt(1, end=time.time() - 5, reason="crash", step_reached=12),
            _attempt(2, step_start=10, first_step_at=time.time() - 2),
        ],
        standby=StandbyRecord(pid=1, ready=True),
        goodput={"training": 30.0, "startup": 5.0},
    )
    hb = protocol.Heartbeat(
        pid=2, state="training", time=time.time() - 1, global_step=13, max_steps=38, samples_per_s=50.0
    )
    x.observe(rec, State.RUNNING, hb, 8, 2)
    return x


def test_exposition_has_every_metric_with_the_run_label(tmp_path: Path) -> None:
    x = full_exporter(tmp_path)
    text = generate_latest(x.registry).decode()
    names = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    expected = {f"{metrics.PREFIX}_{n}" for n in metrics.HELP}
    assert names == expected
    for fam in text_string_to_metric_families(text):
        assert all(s.labels["run"] == "out" for s in fam.samples), fam.name
    assert value(text, "vit_supervisor_state", state="running") == 1.0
    assert value(text, "vit_supervisor_state", state="backoff") == 0.0
    assert value(text, "vit_supervisor_worker_state", state="training") == 1.0
    assert value(text, "vit_supervisor_training_step") == 13
    assert value(text, "vit_supervisor_checkpoint_step") == 10 and value(text, "vit_supervisor_snapshot_step") == 12
    assert value(text, "vit_supervisor_restarts_total", reason="crash") == 1
    assert value(text, "vit_supervisor_steps_redone_total") == 2
    assert value(text, "vit_supervisor_effective_batch") == 16 and value(text, "vit_supervisor_standby_ready") == 1
    assert 0 < (value(text, "vit_supervisor_heartbeat_age_seconds") or 0) < 60


def test_exposition_passes_promtool_check_metrics(tmp_path: Path, promtool: str) -> None:
    text = generate_latest(full_exporter(tmp_path).registry).decode()
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_worker_state_is_absent_while_no_worker_runs(tmp_path: Path) -> None:
    x = Exporter(config(tmp_path), Log())
    x.observe(RunRecord(), State.BACKOFF, protocol.Heartbeat(pid=1, state="training", time=time.time()), 8, 1)
    assert "vit_supervisor_worker_state" not in generate_latest(x.registry).decode()


def test_last_step_time_moves_only_when_the_step_changes(tmp_path: Path) -> None:
    x = Exporter(config(tmp_path), Log())
    start = x.facts().last_step_time
    assert start == x.started
    hb = protocol.Heartbeat(pid=1, state="training", time=5000.0, global_step=3)
    x.observe(RunRecord(), State.RUNNING, hb, 8, 1)
    x.observe(
        RunRecord(), State.RUNNING, protocol.Heartbeat(pid=1, state="evaluating", time=6000.0, global_step=3), 8, 1
    )
    assert x.facts().last_step_time == 5000.0
    x.observe(RunRecord(), State.RUNNING, protocol.Heartbeat(pid=1, state="training", time=7000.0, global_step=4), 8, 1)
    assert x.facts().last_step_time == 7000.0


def test_facts_are_copied_at_most_every_interval_but_always_on_a_state_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "OBSERVE_INTERVAL_S", 3600.0)
    x = Exporter(config(tmp_path), Log())
    x.observe(RunRecord(), State.STARTING, None, 8, 1)
    x.observe(RunRecord(), State.RUNNING, None, 8, 1)  # within the interval: skipped
    assert x.facts().state == "starting"
    x.observe(RunRecord(), State.RUNNING, None, 8, 1, force=True)
    assert x.facts().state == "running"


# ----------------------------------------------------------------------------- the endpoint and the textfile


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as r:
        return r.read().decode()


def test_endpoint_serves_the_newest_facts_and_closes(tmp_path: Path) -> None:
    log = Log()
    x = Exporter(config(tmp_path, listen="127.0.0.1:0"), log)
    x.listen()
    try:
        assert x.address is not None and x.address.startswith("127.0.0.1:")
        assert ("info", "metrics", {"listen": x.address, "path": "/metrics", "run": "out"}) in log.lines
        x.observe(RunRecord(), State.STARTING, None, 8, 1)
        assert value(scrape(x.address), "vit_supervisor_state", state="starting") == 1.0
        x.observe(RunRecord(), State.RUNNING, protocol.Heartbeat(pid=1, time=time.time(), global_step=7), 8, 1)
        assert value(scrape(x.address), "vit_supervisor_training_step") == 7
    finally:
        x.close()
    with pytest.raises(urllib.error.URLError):
        scrape(x.address)


def test_a_port_in_use_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        x = Exporter(config(tmp_path, listen=f"127.0.0.1:{port}"), Log())
        with pytest.raises(metrics.MetricsError) as e:
            x.listen()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"supervisor.metrics.listen 127.0.0.1:{port}: cannot listen")
    assert "in use" in msg and "choose a free port" in msg


def test_textfile_is_rewritten_when_due_or_forced_and_a_failure_is_logged_once(tmp_path: Path) -> None:
    folder = tmp_path / "tf"
    folder.mkdir()
    path = folder / "vit.prom"
    log = Log()
    x = Exporter(config(tmp_path, textfile=str(path), textfile_interval_s=300), log)
    x.observe(RunRecord(), State.STARTING, None, 8, 1)
    x.refresh()
    assert value(path.read_text(), "vit_supervisor_state", state="starting") == 1.0
    x.observe(RunRecord(), State.RUNNING, None, 8, 1)
    x.refresh()  # not due for 300 s
    assert value(path.read_text(), "vit_supervisor_state", state="starting") == 1.0
    x.refresh(force=True)  # a state change
    assert value(path.read_text(), "vit_supervisor_state", state="running") == 1.0
    assert [p.name for p in folder.iterdir()] == ["vit.prom"]  # no temporary file left behind
    path.unlink()
    folder.rmdir()
    x.refresh(force=True)
    x.refresh(force=True)
    warnings = [kw for level, _, kw in log.lines if level == "warning"]
    assert len(warnings) == 1 and warnings[0]["textfile"] == str(path) and "No such file" in warnings[0]["error"]
    folder.mkdir()
    x.refresh(force=True)
    assert path.is_file() and log.lines[-1] == ("info", "metrics", {"textfile": str(path), "action": "written again"})


def test_textfile_is_readable_by_node_exporters_user_under_a_strict_umask(tmp_path: Path) -> None:
    path = tmp_path / "vit.prom"
    x = Exporter(config(tmp_path, textfile=str(path)), Log())
    old = os.umask(0o077)
    try:
        x.write_textfile()
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.umask(old) == old  # the process's umask is back


def test_the_loop_rewrites_the_textfile_at_every_state_change_and_keeps_the_final_one(tmp_path: Path) -> None:
    """The daemon's hooks, driven through the fake OS seam of test_state_machine.py (no process)."""
    from supervisor.daemon import Supervisor
    from tests.test_state_machine import FakeOS, RecordingLog, completes, crashes_after, make_cfg, script_of

    folder = tmp_path / "tf"
    folder.mkdir()
    cfg = make_cfg(tmp_path, metrics={"textfile": str(folder / "vit.prom"), "textfile_interval_s": 300})
    fake = FakeOS(Path(cfg.training.output_dir), script_of(crashes_after(10), completes))
    log = RecordingLog()
    exporter = Exporter(cfg, log)
    written: list[str | None] = []
    real_write = exporter.write_textfile

    def write() -> None:
        real_write()
        written.append(exporter.facts().state)

    exporter.write_textfile = write  # type: ignore[method-assign]
    sup = Supervisor(cfg, fake, log=log, exporter=exporter)
    assert sup.run() == 0
    states = [s for i, s in enumerate(written) if i == 0 or s != written[i - 1]]
    assert states == ["starting", "running", "starting", "running", "completed"]
    final = (folder / "vit.prom").read_text()
    assert value(final, "vit_supervisor_state", state="completed") == 1.0
    assert value(final, "vit_supervisor_restarts_total", reason="crash") == 1
    assert value(final, "vit_supervisor_training_step") == 50


def test_daemon_without_metrics_does_not_import_prometheus_client() -> None:
    code = "import supervisor.cli, supervisor.daemon, sys; assert 'prometheus_client' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


# ----------------------------------------------------------------------------- alert rules


def test_alert_rules_pass_promtool_check_rules(promtool: str) -> None:
    r = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 7 rules found" in r.stdout


def _rules() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"]}


def _expected(alert: str, labels: dict[str, str]) -> dict[str, Any]:
    """The alert as promtool reports it: its labels, and its annotations with ``{{ $labels.X }}`` filled in."""
    rule = _rules()[alert]

    def fill(text: str) -> str:
        return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), text)

    return {
        "exp_labels": {**labels, **rule.get("labels", {})},
        "exp_annotations": {k: fill(v) for k, v in rule["annotations"].items()},
    }


def test_every_alert_fires_on_its_case_and_a_healthy_run_raises_none(tmp_path: Path, promtool: str) -> None:
    job = {"job": "vit-supervisor", "instance": "gpu1:9400", "run": "r"}
    sel = ",".join(f'{k}="{v}"' for k, v in job.items())

    def series(name: str, values: str, **labels: str) -> dict[str, str]:
        extra = "".join(f',{k}="{v}"' for k, v in labels.items())
        return {"series": f"{name}{{{sel}{extra}}}", "values": values}

    def state(current: str) -> list[dict[str, str]]:
        return [
            series("vit_supervisor_state", "1x150" if s.value == current else "0x150", state=s.value) for s in State
        ]

    def worker(current: str) -> list[dict[str, str]]:
        return [
            series("vit_supervisor_worker_state", "1x150" if s == current else "0x150", state=s)
            for s in ("training", "evaluating", "waiting_for_disk")
        ]

    def case(inputs: list[dict[str, str]], fires: dict[str, dict[str, str]], at: str = "140m") -> dict[str, Any]:
        return {
            "interval": "1m",
            "input_series": inputs,
            "alert_rule_test": [
                {
                    "eval_time": at,
                    "alertname": name,
                    "exp_alerts": [_expected(name, fires[name])] if name in fires else [],
                }
                for name in _rules()
            ],
        }

    moving = series("vit_supervisor_last_step_timestamp_seconds", "0+60x150")  # a new step every minute
    healthy = [
        *state("running"),
        *worker("training"),
        moving,
        series("vit_supervisor_heartbeat_age_seconds", "1x150"),
        series("vit_supervisor_failures_without_progress", "0x150"),
        series("vit_supervisor_restarts_total", "0+0x150", reason="crash"),
        series("vit_supervisor_goodput_ratio", "0.97x150"),
        series("vit_supervisor_goodput_seconds_total", "0+60x150", bucket="training"),
        series("up", "1x150"),
    ]
    tests = [
        case(healthy, {}),
        case(
            [*state("running"), *worker("training"), series("vit_supervisor_last_step_timestamp_seconds", "0x150")],
            {"VitSupervisorNoProgress": job},
        ),
        case(
            [*state("backoff"), moving, series("vit_supervisor_failures_without_progress", "0x100 3x50")],
            {"VitSupervisorCrashLoop": job},
        ),
        case(
            [*state("running"), moving, series("vit_supervisor_restarts_total", "0+1x150", reason="crash")],
            {"VitSupervisorCrashLoop": job},
        ),
        case([*state("failed"), moving], {"VitSupervisorGaveUp": {**job, "state": "failed"}}),
        case([series("up", "1x100 0x50")], {"VitSupervisorEndpointDown": job}),
        case([*state("waiting"), moving], {"VitSupervisorWaitingForDisk": {**job, "state": "waiting"}}),
        case(
            [*state("running"), *worker("waiting_for_disk"), moving],
            {"VitSupervisorWaitingForDisk": {**job, "state": "waiting_for_disk"}},
        ),
        case(
            [
                *state("running"),
                moving,
                series("vit_supervisor_goodput_ratio", "0.6x150"),
                series("vit_supervisor_goodput_seconds_total", "0+60x150", bucket="training"),
            ],
            {"VitSupervisorLowGoodput": job},
        ),
        case(  # a finished run's textfile stays behind: its low goodput is no alert
            [
                *state("completed"),
                series("vit_supervisor_goodput_ratio", "0.6x150"),
                series("vit_supervisor_goodput_seconds_total", "0+60x150", bucket="training"),
            ],
            {},
        ),
        case(
            [
                *state("running"),
                *worker("training"),
                moving,
                series("vit_supervisor_heartbeat_age_seconds", "0+60x150"),
            ],
            {"VitSupervisorHeartbeatStale": job},
        ),
        case(  # a long evaluation writes no heartbeat: not stale
            [
                *state("running"),
                *worker("evaluating"),
                moving,
                series("vit_supervisor_heartbeat_age_seconds", "0+60x150"),
            ],
            {},
        ),
    ]
    spec = tmp_path / "rules_test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": tests}))
    r = subprocess.run([promtool, "test", "rules", str(spec)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_readme_lists_every_metric_and_every_alert() -> None:
    readme = (REPO / "README.md").read_text()
    for name, (kind, _) in metrics.HELP.items():
        assert f"| `{metrics.PREFIX}_{name}` | {kind} |" in readme, name
    for alert in _rules():
        assert f"| `{alert}` |" in readme, alert
