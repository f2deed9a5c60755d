"""Goodput accounting (supervisor/goodput.py): the ledger with a fake clock and scripted
observations, then the whole supervisor loop through the fake OS seam of test_state_machine."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from supervisor import goodput, protocol, record
from supervisor.goodput import BUCKETS, WORKER, Ledger
from supervisor.states import State
from tests.test_state_machine import FakeChild, FakeOS, completes, crashes_after, run, script_of, state_file


def _sum(b: dict[str, float]) -> float:
    return sum(b.values())


def _attempt(led: Ledger, t0: float, first_step: int, steps: int, hw_note: str = "") -> float:
    """A worker launched at t0: 2 s start-up, then one step a second from ``first_step``; returns the end."""
    led.phase(t0, WORKER)
    led.observe(t0 + 0.5, "starting", None)
    led.observe(t0 + 2.0, "training", first_step)
    t = t0 + 2.0
    for s in range(first_step + 1, first_step + steps + 1):
        t += 1.0
        led.observe(t, "training", s)
    return t


# ----------------------------------------------------------------------------- the ledger alone


def test_buckets_add_up_to_the_wall_time_of_an_attempt_with_save_and_eval() -> None:
    led = Ledger()
    led.phase(0.0, "startup")  # STARTING
    t = _attempt(led, 0.25, 0, 10)  # steps 1..10, one a second
    led.observe(t + 0.1, "saving", 10)  # the step end's heartbeat came 0.1 s late
    led.observe(t + 3.1, "training", 10)
    led.observe(t + 3.2, "evaluating", 10)
    led.observe(t + 5.2, "training", 10)
    led.observe(t + 6.2, "training", 11)
    led.observe(t + 6.3, "exited", 11, reason="completed")
    led.exited(t + 6.5, 11)
    led.end(t + 6.5)
    b = led.totals
    assert _sum(b) == pytest.approx(t + 6.5)
    assert b["startup"] == pytest.approx(2.25)
    # The late heartbeats before the save and the evaluation, and the last one before the exit, are steps.
    assert b["training"] == pytest.approx(10 + 0.1 + 0.1 + 1.0 + 0.1)
    assert b["checkpoint"] == pytest.approx(3.0) and b["evaluation"] == pytest.approx(2.0)
    assert b["stopping"] == pytest.approx(0.2)  # after the worker's last word
    assert b["redo"] == 0 and b["detection"] == 0 and b["backoff"] == 0
    assert goodput.ratio(b) == pytest.approx(b["training"] / (t + 6.5))


def test_steps_between_two_observations_are_split_into_new_and_redone() -> None:
    led = Ledger(high_water=10)
    led.phase(0.0, WORKER)
    led.observe(0.0, "training", 5)
    led.observe(10.0, "training", 15)  # steps 6..10 redone, 11..15 new: half and half
    assert led.totals["redo"] == pytest.approx(5.0) and led.totals["training"] == pytest.approx(5.0)
    assert led.high_water == 15
    led.observe(12.0, "training", 15)  # nothing observed changed (same key): nothing booked yet
    led.observe(14.0, "training", 16)
    assert led.totals["training"] == pytest.approx(9.0)


def test_a_step_in_flight_belongs_to_redo_until_the_high_water_mark_is_passed() -> None:
    led = Ledger(high_water=3)
    led.phase(0.0, WORKER)
    led.observe(1.0, "training", 2)
    led.observe(2.0, "saving", 2)  # no step completed: step 3 was in flight, at the mark: redo
    assert led.totals["redo"] == pytest.approx(1.0)
    led.observe(3.0, "training", 3)
    led.observe(4.0, "stopping", 3)  # step 4 in flight, past the mark: new
    assert led.totals["checkpoint"] == pytest.approx(1.0) and led.totals["training"] == pytest.approx(1.0)


def test_a_crash_books_its_last_steps_from_the_exit_report_and_its_silence_as_detection() -> None:
    led = Ledger()
    led.phase(0.0, WORKER)
    led.observe(1.0, "training", 0)
    led.observe(2.0, "training", 1)
    # The report says step 3 at t=3.5; the exit was noticed at 4.0 (0.5 s after its report).
    led.exited(4.0, 3, dead_for=0.5)
    assert led.totals["training"] == pytest.approx(2.5) and led.totals["detection"] == pytest.approx(0.5)
    assert led.high_water == 3
    led.phase(4.0, "startup")
    led.phase(4.5, WORKER)
    led.observe(5.0, "training", 1)  # resumed from step 1: 2 and 3 are redone
    led.observe(7.0, "training", 3)
    led.observe(8.0, "training", 4)
    led.end(8.0)
    assert led.totals["redo"] == pytest.approx(2.0) and led.totals["training"] == pytest.approx(3.5)
    assert _sum(led.totals) == pytest.approx(8.0)


def test_a_hang_verdict_turns_the_silent_time_and_the_kill_into_detection() -> None:
    led = Ledger()
    led.phase(0.0, WORKER)
    led.observe(1.0, "training", 0)
    led.observe(2.0, "training", 1)
    assert led.unbooked(30.0) == pytest.approx(28.0)
    before = led.booked(30.0)
    led.hang(32.0)  # the verdict: 30 s without a change
    led.exited(42.0, 1)  # SIGTERM ignored, SIGKILL after the grace period
    led.end(42.0)
    assert led.totals["detection"] == pytest.approx(40.0)
    assert led.totals["training"] == pytest.approx(1.0) and led.totals["startup"] == pytest.approx(1.0)
    assert all(led.totals[k] >= before[k] for k in BUCKETS)


def test_a_requested_stop_books_the_rest_of_the_worker_as_stopping() -> None:
    led = Ledger()
    led.phase(0.0, WORKER)
    led.observe(1.0, "training", 0)
    led.observe(2.0, "training", 1)
    led.stop_requested(2.5)  # the step in flight until here is training
    led.observe(3.0, "training", 2)
    led.observe(3.0, "saving", 2)
    led.exited(6.0, 2)
    led.end(6.0)
    assert led.totals["training"] == pytest.approx(1.5) and led.totals["stopping"] == pytest.approx(3.5)
    assert led.high_water == 2


def test_supervisor_only_phases_are_booked_as_they_pass_and_totals_never_shrink() -> None:
    led = Ledger()
    led.phase(0.0, "backoff")
    seen = [led.booked(t) for t in (0.5, 1.0, 1.5)]
    assert [s["backoff"] for s in seen] == pytest.approx([0.5, 1.0, 1.5])
    led.phase(2.0, "disk_wait")
    led.phase(7.0, WORKER)
    assert led.booked(9.0)["disk_wait"] == pytest.approx(5.0)  # the worker's own time waits for a heartbeat
    assert led.booked(9.0)["startup"] == 0 and led.unbooked(9.0) == pytest.approx(2.0)
    previous = led.booked(9.0)
    led.observe(9.5, "training", 0)
    assert all(led.booked(9.5)[k] >= previous[k] for k in BUCKETS)


def test_a_second_supervisor_continues_the_totals_from_the_state_file() -> None:
    first = Ledger()
    first.phase(0.0, "startup")
    _attempt(first, 1.0, 0, 5)
    first.exited(9.0, 5)
    first.end(9.0)
    raw = json.loads(json.dumps(record.RunRecord(goodput=first.booked(9.0), step_high_water=5).to_dict()))
    prev = record.from_dict(raw)
    assert prev is not None
    # The next `start`, at any later time: its own clock, the previous totals.
    second = Ledger(totals=prev.goodput, high_water=prev.step_high_water)
    second.phase(1000.0, "startup")
    _attempt(second, 1000.0, 3, 4)  # resumed from checkpoint-3: steps 4, 5 redone, 6, 7 new
    second.end(1006.0)
    assert _sum(second.totals) == pytest.approx(9.0 + 6.0)
    assert second.totals["redo"] == pytest.approx(2.0)
    assert second.totals["training"] == pytest.approx(first.totals["training"] + 2.0)


def test_wrong_typed_persisted_values_are_dropped_not_trusted() -> None:
    # A value that is not a number drops the whole field (record.from_dict): no half-trusted totals.
    for bad in ({"training": 12.5, "redo": "3"}, {"training": True}, [1, 2], "lots", None, 3.0):
        rec = record.from_dict(json.loads(json.dumps({"state": "running", "goodput": bad})))
        assert rec is not None and rec.goodput == {}
        assert Ledger(totals=rec.goodput).totals == dict.fromkeys(BUCKETS, 0.0)
    # Numbers that cannot be seconds of a bucket are dropped one by one; the rest is kept.
    raw = {"goodput": {"training": 12.5, "checkpoint": -4.0, "bogus": 7.0, "backoff": 2}}
    rec = record.from_dict(json.loads(json.dumps(raw)))
    assert rec is not None
    led = Ledger(totals=rec.goodput)
    assert led.totals == {**dict.fromkeys(BUCKETS, 0.0), "training": 12.5, "backoff": 2.0}
    assert goodput.clean({"evaluation": float("inf"), "redo": float("nan")}) == dict.fromkeys(BUCKETS, 0.0)


def test_an_unknown_phase_is_a_bug_said_plainly() -> None:
    with pytest.raises(ValueError, match="unknown goodput phase 'lunch'"):
        Ledger().phase(0.0, "lunch")


def test_largest_and_ratio_of_empty_and_full_totals() -> None:
    assert goodput.ratio({}) is None and goodput.largest({}) == []
    b = {**dict.fromkeys(BUCKETS, 0.0), "training": 90.0, "redo": 4.0, "startup": 6.0}
    assert goodput.ratio(b) == pytest.approx(0.9)
    assert goodput.largest(b, 2) == [("training", 90.0), ("startup", 6.0)]


# ----------------------------------------------------------------------------- the supervisor loop feeding it


def _goodput(sup: object) -> dict[str, float]:
    st = state_file(sup)  # type: ignore[arg-type]
    assert set(st["goodput"]) == set(BUCKETS)
    return {k: float(v) for k, v in st["goodput"].items()}


def test_the_supervisor_splits_a_crashed_and_restarted_run_to_its_wall_time(tmp_path: Path) -> None:
    def trains_then_crashes(fake: FakeOS, child: FakeChild) -> None:
        fake.at(2, lambda: fake.heartbeat(child, 0, start_step=0))
        fake.at(4, lambda: fake.heartbeat(child, 10))
        fake.at(6, lambda: fake.heartbeat(child, 20))
        fake.at(6.5, lambda: fake.exit(child, 1, "crash", step=22, message="ValueError: boom"))

    def resumes_and_completes(fake: FakeOS, child: FakeChild) -> None:
        fake.at(1, lambda: fake.heartbeat(child, 10, start_step=10))  # resumed from checkpoint-10
        fake.at(3.4, lambda: fake.heartbeat(child, 22))
        fake.at(5, lambda: fake.heartbeat(child, 100))
        fake.at(6, lambda: fake.exit(child, 0, "completed", step=100, message="completed"))

    sup, fake, _log, _code = run(tmp_path, script_of(trains_then_crashes, resumes_and_completes))
    assert sup.state == State.COMPLETED
    b = _goodput(sup)
    assert _sum(b) == pytest.approx(fake.now, rel=1e-9)
    assert b["startup"] == pytest.approx(2) and b["restart"] == pytest.approx(1)
    assert b["redo"] == pytest.approx(2.4)  # steps 11..22 again
    assert b["training"] == pytest.approx(4.5 + 1.6 + 1.0)
    assert b["detection"] == 0 and b["backoff"] == 0  # progress: restarted at once; the crash noticed at once
    assert state_file(sup)["step_high_water"] == 100


def test_the_supervisor_books_backoff_and_a_hang_as_detection(tmp_path: Path) -> None:
    def hangs(fake: FakeOS, child: FakeChild) -> None:
        fake.at(1, lambda: fake.heartbeat(child, 0, start_step=0))
        fake.at(2, lambda: fake.heartbeat(child, 0))

    def frozen(child: FakeChild, sig: int) -> None:
        if sig == signal.SIGKILL:
            child.code = -9

    sup, fake, _log, _code = run(tmp_path, script_of(hangs, completes), setup=lambda f: setattr(f, "kill_hook", frozen))
    assert sup.state == State.COMPLETED and len(fake.children) == 2
    b = _goodput(sup)
    assert _sum(b) == pytest.approx(fake.now, rel=1e-9)
    # 30 s silent (hang_timeout_s) + 10 s of SIGTERM grace before the SIGKILL; loop turns add < 1 s.
    assert b["detection"] == pytest.approx(40, abs=1.0)
    assert b["backoff"] == pytest.approx(1.0)  # no progress: backoff_initial_s


def test_a_second_start_of_the_same_run_continues_its_totals(tmp_path: Path) -> None:
    sup, fake, _, _ = run(tmp_path, script_of(crashes_after(10), completes))
    first = _goodput(sup)
    st = state_file(sup)
    st["state"] = "stopped"  # a deliberate end: the time until the next start is not the run's
    protocol.atomic_write_json(protocol.state_path(sup.out), st)
    sup2, fake2, _, _ = run(tmp_path, script_of(completes))
    second = _goodput(sup2)
    assert _sum(second) == pytest.approx(fake.now + fake2.now, rel=1e-9)
    assert all(second[k] >= first[k] for k in BUCKETS)
    assert second["startup"] - first["startup"] == pytest.approx(5.0)  # a new start, not a restart
    assert second["unsupervised"] == 0
    # The first run reached step 100: the second worker's steps 50..100 (5 s) are redone, not new.
    assert second["redo"] - first["redo"] == pytest.approx(5.0)
    assert second["training"] == pytest.approx(first["training"])


def test_after_a_supervisor_that_died_the_gap_is_unsupervised_and_the_start_a_restart(tmp_path: Path) -> None:
    out = tmp_path / "out"
    dead = record.RunRecord(
        state="running",
        updated=FakeOS(out, completes).time() - 50.0,  # its last write, 50 s before the new start
        goodput={"training": 100.0, "startup": 10.0},
        step_high_water=40,
    )
    record.save(out, 0, dead)
    sup, fake, _, _ = run(tmp_path, script_of(completes))
    b = _goodput(sup)
    assert b["unsupervised"] == pytest.approx(50.0)
    assert b["restart"] == pytest.approx(5.0) and b["startup"] == pytest.approx(10.0)
    assert _sum(b) == pytest.approx(110.0 + 50.0 + fake.now)
    assert goodput.fault_free_share(b) == pytest.approx(1 - (55.0 + b["redo"]) / _sum(b))


def test_status_shows_the_ratio_and_largest_buckets_and_json_carries_them_all(tmp_path: Path) -> None:
    from supervisor import status

    out = tmp_path / "out"
    booked = {"training": 700.0, "startup": 45.0, "checkpoint": 30.0, "redo": 12.3, "restart": 3.0}
    record.save(out, 0, record.RunRecord(state="completed", goodput=booked))
    v = status.view(out)
    gp = json.loads(json.dumps(v))["goodput"]
    assert set(gp["buckets"]) == set(BUCKETS) and gp["buckets"]["training"] == 700.0
    assert gp["ratio"] == pytest.approx(700 / 790.3) and gp["total_s"] == pytest.approx(790.3)
    assert gp["fault_free_share"] == pytest.approx(1 - 15.3 / 790.3)
    line = next(ln for ln in status.render(v).splitlines() if "goodput:" in ln)
    assert line == "  goodput:     88.6% training of 13m10s supervised; startup 45s, checkpoint 30s, redo 12s"
    record.save(out, 0, record.RunRecord(state="completed"))
    assert status.view(out)["goodput"] is None and "goodput:" not in status.render(status.view(out))


def test_the_report_draws_every_bucket(tmp_path: Path) -> None:
    from supervisor import report

    out = tmp_path / "out"
    attempts = [record.AttemptRecord(1, start=0.0, end=10.0, step_reached=5, reason="completed")]
    record.save(out, 0, record.RunRecord(state="completed", attempts=attempts, goodput=dict.fromkeys(BUCKETS, 1.0)))
    protocol.metrics_path(out).write_text('{"step": 1, "loss": 2.3, "attempt": 1}\n')
    _png, page = report.render(out)
    text = page.read_text()
    assert "Where the time went" in text and all(f"<td>{b}</td>" in text for b in BUCKETS)
    assert f"goodput {1 / len(BUCKETS):.3f}" in text
