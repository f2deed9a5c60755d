"""The supervisor's decisions as pure functions: no processes, no clock."""

from __future__ import annotations

import pytest

from supervisor import policy, protocol
from supervisor.policy import BatchChoice, ExitInfo
from supervisor.schema import SupervisorConfig


def cfg(**kw: object) -> SupervisorConfig:
    return SupervisorConfig(**kw)  # type: ignore[arg-type]


def _chain(batch: int, effective: int, **kw: object) -> list[tuple[int, int] | str]:
    out: list[tuple[int, int] | str] = []
    while True:
        choice = policy.lower_batch(
            batch,
            effective,
            factor=kw.get("factor", 0.5),
            minimum=kw.get("minimum", 1),
            allow_effective_batch_change=kw.get("allow", False),
        )
        if isinstance(choice, str):
            out.append(choice)
            return out
        out.append((choice.per_device_train_batch_size, choice.gradient_accumulation_steps))
        batch = choice.per_device_train_batch_size


def test_oom_halves_batch_and_doubles_accumulation_keeping_effective_batch() -> None:
    chain = _chain(48, 48)
    assert chain[:-1] == [(24, 2), (12, 4), (6, 8), (3, 16), (1, 48)]
    assert all(b * a == 48 for b, a in chain[:-1])
    assert "cannot lower it further" in chain[-1]


def test_oom_picks_largest_divisor_not_above_the_lowered_batch() -> None:
    # 40 * 0.5 = 20 divides 40; 20 -> 10; 10 -> 5; 5 -> floor(2.5)=2 divides 40.
    assert _chain(40, 40)[:4] == [(20, 2), (10, 4), (5, 8), (2, 20)]
    # effective 36, batch 36, factor 0.3: floor(10.8)=10 does not divide 36, 9 does.
    assert policy.lower_batch(36, 36, factor=0.3, minimum=1) == BatchChoice(9, 4)


def test_oom_at_minimum_fails_with_clear_message() -> None:
    msg = policy.lower_batch(8, 32, factor=0.5, minimum=8)
    assert isinstance(msg, str)
    assert "min_per_device_batch" in msg and "8" in msg


def test_oom_with_no_fitting_divisor_refuses_unless_effective_change_allowed() -> None:
    msg = policy.lower_batch(7, 7, factor=0.5, minimum=2)  # 3 and 2 do not divide 7
    assert isinstance(msg, str) and "allow_effective_batch_change" in msg
    choice = policy.lower_batch(7, 7, factor=0.5, minimum=2, allow_effective_batch_change=True)
    assert isinstance(choice, BatchChoice)
    assert choice.per_device_train_batch_size == 3 and choice.gradient_accumulation_steps == 2
    assert "effective batch changed from 7 to 6" in choice.note


def test_backoff_grows_exponentially_up_to_the_cap() -> None:
    c = cfg(backoff_initial_s=1.0, backoff_factor=2.0, backoff_max_s=5.0)
    assert [policy.backoff_delay(n, c) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert policy.backoff_delay(10_000, c) == 5.0  # no overflow


@pytest.mark.parametrize(
    "rc, report, kw, kind",
    [
        # Complete only when the step count says so (bug 4): a bare exit 0 is not completion.
        (0, protocol.ExitReport("completed", message="done", step=10, max_steps=10), {}, "completed"),
        (0, protocol.ExitReport("completed", step=10), {"max_steps": 10}, "completed"),
        (0, None, {}, "crash"),
        (0, None, {"stop_sent": True}, "stopped"),
        (0, protocol.ExitReport("completed", message="done"), {}, "crash"),
        (0, protocol.ExitReport("completed", step=5, max_steps=380), {}, "crash"),
        (6, protocol.ExitReport("standby_stale", message="data changed"), {}, "standby_stale"),
        (6, None, {}, "standby_stale"),
        (1, protocol.ExitReport("crash", message="ValueError: x"), {}, "crash"),
        (1, None, {}, "crash"),
        (2, protocol.ExitReport("incompatible_checkpoint", message="model_name changed"), {}, "user_error"),
        (2, None, {}, "user_error"),
        (4, protocol.ExitReport("oom", message="CUDA out of memory"), {}, "oom"),
        (5, protocol.ExitReport("disk_low", message="no space"), {}, "disk_low"),
        (
            7,
            protocol.ExitReport("device_error", message="RuntimeError: CUDA error: an illegal memory access"),
            {},
            "device_error",
        ),
        (7, None, {}, "device_error"),
        (3, protocol.ExitReport("interrupted", message="stop"), {"stop_sent": True}, "stopped"),
        (3, protocol.ExitReport("interrupted", message="stop"), {}, "external_signal"),
        (3, protocol.ExitReport("interrupted", message="stop"), {"hang_killed": True}, "hang"),
        (-15, None, {}, "external_signal"),
        (-2, None, {}, "external_signal"),
        (-9, None, {"hang_killed": True}, "hang"),
        (-9, None, {}, "crash"),
        (-9, None, {"host_oom": True}, "host_oom"),
        (-11, None, {}, "crash"),
    ],
)
def test_exit_is_classified_from_report_then_code_then_signal(
    rc: int, report: protocol.ExitReport | None, kw: dict, kind: str
) -> None:
    assert policy.classify(ExitInfo(rc, report, **kw)).kind == kind


@pytest.mark.parametrize(
    "rc, raw, kind, message",
    [
        # A bool or a string is not a step: the field drops to None, so this is no completion.
        (0, {"reason": "completed", "step": True, "max_steps": 1}, "crash", "without a completed report"),
        (0, {"reason": "completed", "step": "10", "max_steps": 10}, "crash", "without a completed report"),
        (0, {"reason": "completed", "step": 10, "max_steps": float("nan")}, "crash", "without a completed report"),
        # A non-string message drops to "", and the kind's own words take its place.
        (4, {"reason": "oom", "message": 5}, "oom", "out of memory"),
        (5, {"reason": "disk_low", "message": ["no", "space"]}, "disk_low", "too little free disk"),
        # No usable reason: no report at all, and the exit code explains.
        (2, {"reason": 7, "message": "ignored"}, "user_error", "user error"),
        (4, ["oom"], "oom", "out of memory"),
    ],
)
def test_hostile_exit_report_content_is_parsed_not_trusted(rc: int, raw: object, kind: str, message: str) -> None:
    report = protocol.parse_record(protocol.ExitReport, raw)
    out = policy.classify(ExitInfo(rc, report))
    assert out.kind == kind and message in out.message


def test_root_cause_of_hostile_rank_reports() -> None:
    reports = {
        0: protocol.parse_record(protocol.ExitReport, {"reason": "crash", "time": "soon", "step": "x", "message": 3}),
        1: protocol.parse_record(protocol.ExitReport, {"reason": "crash", "time": 2.0, "step": 9}),
        2: protocol.parse_record(protocol.ExitReport, {"reason": None}),
    }
    r = policy.root_cause(reports)
    assert r is not None and r.reason == "crash" and r.rank == 2 and r.step == 9
    assert r.exit_code == protocol.EXIT_CRASH and "rank 2 died without an exit report" in r.message


def test_signal_deaths_are_named_never_negative_numbers() -> None:
    out = policy.classify(ExitInfo(-9, None))
    assert out.exit == "killed by SIGKILL" and "SIGKILL" in out.message and "-9" not in out.message
    assert policy.classify(ExitInfo(-11, None)).exit == "killed by SIGSEGV"


def _decide(
    kind: str,
    *,
    progressed: bool = False,
    failures: int = 0,
    batch: int = 16,
    accum: int = 1,
    stop: bool = False,
    **kw: object,
) -> policy.Decision:
    return policy.decide(
        policy.Outcome(kind, f"{kind} happened", "exit ?"),
        progressed=progressed,  # type: ignore[arg-type]
        failures_without_progress=failures,
        batch=batch,
        accum=accum,
        cfg=cfg(**kw),
        stop_requested=stop,
    )


def test_crash_restarts_with_backoff_and_counts_failures_without_progress() -> None:
    d = _decide("crash", failures=1, backoff_initial_s=1.0, backoff_factor=3.0)
    assert d.action == "restart" and d.failures_without_progress == 2 and d.delay_s == 3.0


def test_progress_resets_the_failure_count_and_restarts_at_once() -> None:
    d = _decide("crash", progressed=True, failures=4, max_failures_without_progress=5, backoff_initial_s=1.0)
    assert d.action == "restart" and d.failures_without_progress == 0 and d.delay_s == 0.0


def test_backoff_to_failed_after_retries_without_progress() -> None:
    d = _decide("crash", failures=2, max_failures_without_progress=3)
    assert d.action == "fail" and "gave up after 3 consecutive attempts" in d.message
    assert "crash happened" in d.message  # the last error is in the message


def test_non_retryable_fails_at_once_with_the_workers_message() -> None:
    d = _decide("user_error")
    assert d.action == "fail" and "user_error happened" in d.message


def test_oom_restarts_at_once_with_lower_batch_and_does_not_count_as_failure() -> None:
    d = _decide("oom", batch=16, accum=2, failures=1)
    assert (d.action, d.delay_s, d.per_device_train_batch_size, d.gradient_accumulation_steps) == ("restart", 0.0, 8, 4)
    assert d.failures_without_progress == 1


def test_oom_at_minimum_fails() -> None:
    d = _decide("oom", batch=4, accum=1, min_per_device_batch=4)
    assert d.action == "fail" and "min_per_device_batch" in d.message


def test_external_signal_restarts_unless_configured_off() -> None:
    assert _decide("external_signal").action == "restart"
    d = _decide("external_signal", restart_on_external_signal=False)
    assert d.action == "stop" and "restart_on_external_signal" in d.message


def test_stop_requested_wins_over_restart_but_completion_still_counts() -> None:
    assert _decide("crash", stop=True).action == "stop"
    assert _decide("completed", stop=True).action == "complete"


def test_disk_low_exit_waits_for_space() -> None:
    assert _decide("disk_low").action == "wait_disk"


def test_hang_allowances_differ_for_startup_training_and_evaluation() -> None:
    c = cfg(hang_timeout_s=10, startup_timeout_s=100, eval_timeout_s=50)
    check = lambda **kw: policy.hang_check(cfg=c, **kw)  # noqa: E731
    # start-up: only startup_timeout_s counts
    assert check(hb_state=None, seen_step=False, since_change_s=99, since_launch_s=99) is None
    assert "startup_timeout_s" in check(hb_state="starting", seen_step=False, since_change_s=101, since_launch_s=101)
    # training
    assert check(hb_state="training", seen_step=True, since_change_s=9, since_launch_s=500) is None
    assert "hang_timeout_s" in check(hb_state="training", seen_step=True, since_change_s=11, since_launch_s=500)
    # evaluating/saving
    assert check(hb_state="evaluating", seen_step=True, since_change_s=49, since_launch_s=500) is None
    assert "eval_timeout_s" in check(hb_state="saving", seen_step=True, since_change_s=51, since_launch_s=500)
    # waiting for disk is never a hang
    assert check(hb_state=protocol.HB_WAITING_FOR_DISK, seen_step=True, since_change_s=1e6, since_launch_s=1e6) is None


def test_disk_shortfall_compares_free_space_with_reserve() -> None:
    assert policy.disk_shortfall(600 * 2**20, 512) is None
    assert "disk.reserve_mb is 512" in policy.disk_shortfall(100 * 2**20, 512)


# ----------------------------------------------------------------------------- torchrun: root cause among ranks


def _rank_report(reason: str, t: float, message: str = "", step: int = 7) -> protocol.ExitReport:
    return protocol.ExitReport(reason, time=t, message=message or reason, step=step, exit_code=0)


def test_oom_on_any_rank_is_the_root_cause() -> None:
    r = policy.root_cause(
        {
            0: _rank_report("crash", 1.0, "RuntimeError: Connection reset by peer"),
            1: _rank_report("oom", 2.0, "DefaultCPUAllocator: can't allocate memory"),
        }
    )
    assert r is not None and r.reason == "oom" and r.rank == 1 and r.message.startswith("rank 1:")


def test_a_rank_without_a_report_was_killed_and_is_the_cause() -> None:
    r = policy.root_cause({0: _rank_report("crash", 1.0, "RuntimeError: Connection reset by peer"), 1: None})
    assert r is not None and r.reason == "crash" and "rank 1 died without an exit report" in r.message


def test_all_ranks_interrupted_is_an_interruption() -> None:
    r = policy.root_cause({0: _rank_report("interrupted", 1.0), 1: _rank_report("interrupted", 1.1)})
    assert r is not None and r.reason == "interrupted"


def test_lost_peer_errors_are_consequences_not_causes() -> None:
    r = policy.root_cause(
        {
            0: _rank_report("crash", 1.0, "Connection closed by peer"),
            1: _rank_report("crash", 2.0, "ValueError: bad label"),
        }
    )
    assert r is not None and r.rank == 1 and "bad label" in r.message


def test_no_rank_reports_leaves_the_launchers_exit_code_to_explain() -> None:
    assert policy.root_cause({0: None, 1: None}) is None


def test_standby_stale_is_replaced_cold_but_a_stop_wins() -> None:
    stale = policy.Outcome("standby_stale", "data changed", "exit 6 (standby_stale)")
    assert policy.decide(stale, **_common()).action == "replace_standby"
    assert policy.decide(stale, **_common(), stop_requested=True).action == "stop"


def test_disk_low_waits_for_one_checkpoint_not_only_the_reserve() -> None:
    low = policy.Outcome("disk_low", "no space", "exit 5 (disk_low)")
    assert policy.decide(low, **_common(), disk_needed_bytes=500 * 2**20).disk_needed_bytes == 500 * 2**20
    assert policy.disk_shortfall(200 * 2**20, 100, needed_bytes=500 * 2**20) is not None
    assert "one checkpoint needs 500 MiB" in (policy.disk_shortfall(200 * 2**20, 100, needed_bytes=500 * 2**20) or "")
    assert policy.disk_shortfall(600 * 2**20, 100, needed_bytes=500 * 2**20) is None


def _common() -> dict:
    return dict(progressed=False, failures_without_progress=0, batch=8, accum=2, cfg=cfg())


# ----------------------------------------------------------------------------- device errors


def test_device_error_is_named_with_the_workers_message_and_its_exit_code() -> None:
    msg = "AcceleratorError: CUDA error: an illegal memory access was encountered"
    out = policy.classify(ExitInfo(protocol.EXIT_DEVICE_ERROR, protocol.ExitReport("device_error", message=msg)))
    assert out.kind == "device_error" and out.message == msg and out.exit == "exit 7 (device_error)"
    assert protocol.EXIT_CODES[protocol.REASON_DEVICE_ERROR] == protocol.EXIT_DEVICE_ERROR == 7
    assert len(set(protocol.EXIT_CODES.values())) == len(set(protocol.REASON_BY_CODE))  # every code named once


def test_device_error_restarts_like_a_crash_and_counts_toward_the_crash_loop_limit() -> None:
    d = _decide("device_error", failures=1, backoff_initial_s=1.0, backoff_factor=3.0)
    assert d.action == "restart" and d.failures_without_progress == 2 and d.delay_s == 3.0
    d = _decide("device_error", progressed=True, failures=4, max_failures_without_progress=5)
    assert d.action == "restart" and d.delay_s == 0.0 and d.failures_without_progress == 0
    assert d.per_device_train_batch_size == 16  # the batch is not what failed: it stays
    d = _decide("device_error", failures=2, max_failures_without_progress=3)
    assert d.action == "fail" and "gave up after 3 consecutive attempts" in d.message


def test_the_rank_whose_device_failed_is_the_cause_not_its_peers_nccl_errors() -> None:
    r = policy.root_cause(
        {
            0: _rank_report("device_error", 1.0, "DistBackendError: NCCL error: remote process exited"),
            1: _rank_report("device_error", 2.0, "AcceleratorError: CUDA error: an illegal memory access"),
            2: _rank_report("device_error", 1.5, "RuntimeError: Watchdog caught collective operation timeout"),
        }
    )
    assert r is not None and r.rank == 1 and "illegal memory access" in r.message
    # Only collective failures: the earliest still explains the attempt (and restarts it).
    r = policy.root_cause(
        {
            0: _rank_report("device_error", 2.0, "DistBackendError: NCCL error: unhandled cuda error"),
            1: _rank_report("interrupted", 1.0),
        }
    )
    assert r is not None and r.reason == "device_error" and r.rank == 0


class AcceleratorError(RuntimeError):
    """Stands in for torch.AcceleratorError here (matched by name; the e2e file uses torch's own)."""


@pytest.mark.parametrize(
    "exc, fatal",
    [
        (RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be ..."), True),
        (RuntimeError("CUDA error: device-side assert triggered"), True),
        (RuntimeError("CUDA error: unspecified launch failure"), True),
        (RuntimeError("CUDA error: uncorrectable ECC error encountered"), True),
        (RuntimeError("Unable to determine the device handle for GPU0000:3B:00.0: GPU is lost"), True),
        (RuntimeError("NVRM: Xid 79: GPU has fallen off the bus."), True),
        (RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, ...)`"), True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"), True),
        (RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error, NCCL version 2.21.5"), True),
        (
            RuntimeError("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, OpType=ALLREDUCE)"),
            True,
        ),
        (AcceleratorError("CUDA error: invalid argument"), True),  # any failed runtime call: the type decides
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
        (AcceleratorError("CUDA error: out of memory"), False),  # an OOM keeps its own path (it can save)
        (MemoryError(), False),
        (ValueError("illegal label 12"), False),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x3)"), False),
        (KeyboardInterrupt(), False),
    ],
)
def test_device_fatal_errors_are_told_apart_from_ooms_and_crashes(exc: BaseException, fatal: bool) -> None:
    from worker.fault import is_device_fatal

    assert is_device_fatal(exc) is fatal


def test_a_device_error_behind_another_exception_is_still_device_fatal() -> None:
    from worker.fault import is_device_fatal

    try:
        try:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        except RuntimeError as inner:
            raise ValueError("while moving the batch") from inner
    except ValueError as outer:
        assert is_device_fatal(outer)
