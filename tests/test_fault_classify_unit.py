"""worker.fault's out-of-memory classifier for oneDNN's "could not create a primitive": an OOM only
where a host allocation can fail at all (an address-space limit, strict overcommit)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

ONEDNN = "could not create a primitive"

PROBE = """
import resource, sys
from worker.fault import allocations_can_fail, is_oom
if sys.argv[1] == "limited":
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (64 << 30, hard))
msg = sys.argv[2]
print(allocations_can_fail(), is_oom(RuntimeError(msg)), is_oom(ValueError(msg)))
"""


def probe(mode: str) -> str:
    r = subprocess.run(
        [sys.executable, "-c", PROBE, mode, ONEDNN], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.split("\n")[0]


def overcommit_strict() -> bool:
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            return f.read().strip() == "2"
    except OSError:
        return False


def test_onednn_primitive_failure_is_an_oom_under_an_address_space_limit() -> None:
    assert probe("limited") == "True True False"


def test_onednn_primitive_failure_without_a_limit_is_not_an_oom() -> None:
    expect = "True True False" if overcommit_strict() else "False False False"
    assert probe("free") == expect


def test_the_allocators_own_messages_stay_ooms_everywhere() -> None:
    from worker.fault import is_oom

    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory"))
    assert is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(MemoryError())
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
