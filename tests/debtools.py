"""Debian tools the metrics tests run: Prometheus' ``promtool`` and ``prometheus-node-exporter``.

:func:`require` finds a tool on PATH or installs its Debian package once with ``apt-get``
(``apt-get update`` first; CI runs as root on a fresh Debian machine), and skips the calling
test with the reason only where it cannot be installed (not root, no apt-get, no package).
One file lock in the system's temporary folder serialises the installs of every test process
(xdist workers, other checkouts testing at the same time); apt's own lock is waited for too.

The packages' maintainer scripts would start the Prometheus server and node_exporter as
services where an init system runs. A test must not leave daemons listening on ports 9090 and
9100, so while it installs, and only when the machine has none of its own, a ``policy-rc.d``
that denies every service start is put in place (the usual practice for containers) and
removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from filelock import FileLock

PACKAGES = {"promtool": "prometheus", "prometheus-node-exporter": "prometheus-node-exporter"}
"""Tool -> the Debian package that ships it."""

POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
_LOCK = Path(tempfile.gettempdir()) / "vit-supervisor-debtools.lock"
_APT_TIMEOUT_S = 900  # a cold apt-get update plus a ~25 MB download on a slow mirror
_failed: dict[str, str] = {}  # tool -> why it could not be installed (asked once per test process)


def require(tool: str) -> str:
    """The path of ``tool``, installed from its Debian package when missing; ``pytest.skip`` with
    the reason where it cannot be installed."""
    found = shutil.which(tool)
    if found:
        return found
    if tool in _failed:
        pytest.skip(_failed[tool])
    with FileLock(str(_LOCK), timeout=_APT_TIMEOUT_S):
        found = shutil.which(tool)  # another process may have installed it meanwhile
        if found:
            return found
        # Every missing one at once: one apt-get update, one install.
        why = _install(sorted({p for t, p in PACKAGES.items() if shutil.which(t) is None}))
        found = shutil.which(tool)
    if found:
        return found
    _failed[tool] = f"{tool} is missing and could not be installed: {why or 'the package did not provide it'}"
    pytest.skip(_failed[tool])


def _install(packages: list[str]) -> str | None:
    """Install ``packages`` with apt-get; None on success, else why not (one line)."""
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine (install the Debian package by hand)"
    if os.geteuid() != 0:
        return f"not root; run `sudo apt-get install {' '.join(packages)}`"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    wait_lock = ["-o", f"DPkg::Lock::Timeout={_APT_TIMEOUT_S}"]
    guard = not POLICY_RC_D.exists()
    try:
        if guard:
            POLICY_RC_D.write_text(
                "#!/bin/sh\n# vit-supervisor tests: no service starts while they install\nexit 101\n"
            )
            POLICY_RC_D.chmod(0o755)
        for cmd in (
            ["apt-get", *wait_lock, "update", "-q"],
            ["apt-get", *wait_lock, "install", "-y", "-q", "--no-install-recommends", *packages],
        ):
            try:
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=_APT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                return f"`{' '.join(cmd)}` did not finish in {_APT_TIMEOUT_S} s"
            if done.returncode != 0:
                last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
                return f"`{' '.join(cmd)}` exited {done.returncode}: {last}"
    except OSError as exc:
        return f"cannot run apt-get: {exc}"
    finally:
        if guard:
            POLICY_RC_D.unlink(missing_ok=True)
    return None
