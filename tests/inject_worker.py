"""Run the real worker with a fault injected from a hook (used by tests and benches as a child process).

python tests/inject_worker.py FAULT:K CONFIG [worker args]

  oom-forward:K       torch.OutOfMemoryError in the K-th training forward pass
  oom-optimizer:K     ... inside the K-th optimizer step, after the weights changed
  crash:K             ValueError in the K-th forward
  device-error:K      RuntimeError with CUDA's illegal-memory-access message in the K-th forward
                      (what a lost CUDA context raises; the worker must save nothing from the device)
  segv:K              a real SIGSEGV of the worker (default action, no core file) in the K-th forward
  kill-in-save:K      SIGKILL of the worker in the middle of the K-th disk checkpoint commit, after
                      the model is in the staging folder and before the optimizer state is
  kill-in-snapshot:K  SIGKILL in the middle of the K-th shared-memory snapshot: half of the slot's
                      first file written, the header not yet flipped
  hog:K               in the K-th forward (once the file VIT_INJECT_HOG_GO exists, if set), allocate
                      and touch VIT_INJECT_HOG_MB MiB (default 2048) in 16 MiB pieces, printing
                      "hog: holding N MiB" every 64 MiB, then hold it: in a memory cgroup the
                      kernel's OOM killer ends the worker (a real host OOM)

Under a real supervisor, which starts ``python -m worker`` itself, the same faults come from the
environment: ``VIT_INJECT=FAULT:K`` (and ``VIT_INJECT_ATTEMPT``, default 1: only that attempt is
hit, so the restart runs clean), with :func:`site_dir` on ``PYTHONPATH`` so that every Python
started with it runs :func:`install_from_env` first.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FORWARD_FAULTS = ("oom-forward", "crash", "device-error", "segv", "hog")
FAULTS = (*FORWARD_FAULTS, "oom-optimizer", "kill-in-save", "kill-in-snapshot")

# The message CUDA gives for cudaErrorIllegalAddress, as torch raises it.
ILLEGAL_ADDRESS = (
    "CUDA error: an illegal memory access was encountered\n"
    "CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below "
    "might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1\n"
    "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n"
)


def _die(sig: int) -> None:
    """Die by ``sig`` with its default action, as a real fault does (no handler, no core file)."""
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sig != signal.SIGKILL:
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    raise SystemExit(f"inject: still alive after signal {sig}")


def _hog() -> None:
    import time

    go = os.environ.get("VIT_INJECT_HOG_GO")
    if go:  # let the test put this process into a memory cgroup first
        print("hog: waiting for the go file", file=sys.stderr, flush=True)
        deadline = time.monotonic() + 300
        while not os.path.exists(go):
            if time.monotonic() > deadline:
                raise SystemExit(f"inject: no go file {go} within 300 s")
            time.sleep(0.01)
    mib = int(os.environ.get("VIT_INJECT_HOG_MB", "2048"))
    held = []
    for n in range(1, mib // 16 + 1):
        held.append(b"\x01" * (16 << 20))  # written byte by byte: every page is really used
        if n % 4 == 0:
            print(f"hog: holding {n * 16} MiB", file=sys.stderr, flush=True)
    print(f"hog: holding {mib} MiB, all of it", file=sys.stderr, flush=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # hold it until the kernel (or the test) kills us
        time.sleep(0.1)
    raise SystemExit("inject: hog was never killed")


def install(fault: str, at: int) -> None:
    """Patch the worker in this process so that ``fault`` happens at its ``at``-th occasion."""
    if fault not in FAULTS:
        raise SystemExit(f"inject: unknown fault {fault!r}; one of {', '.join(FAULTS)}")
    import torch

    from worker import model as model_mod

    calls = {"n": 0}

    def hit() -> bool:
        calls["n"] += 1
        return calls["n"] == at

    def forward_fault() -> None:
        if not hit():
            return
        if fault == "crash":
            raise ValueError("injected crash")
        if fault == "device-error":
            raise RuntimeError(ILLEGAL_ADDRESS)
        if fault == "segv":
            _die(signal.SIGSEGV)
        if fault == "hog":
            _hog()
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    if fault in FORWARD_FAULTS:
        real_build = model_mod.build

        def build(cfg: Any, names: Any) -> Any:
            m = real_build(cfg, names)
            m.register_forward_pre_hook(lambda mod, args: forward_fault() if mod.training else None)
            return m

        model_mod.build = build
    elif fault == "oom-optimizer":
        real_step = torch.optim.AdamW.step

        def step(self: Any, *a: Any, **k: Any) -> Any:
            out = real_step(self, *a, **k)  # parameters already changed when it fails
            if hit():
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
            return out

        torch.optim.AdamW.step = step  # type: ignore[method-assign]
    elif fault == "kill-in-save":
        from worker.trainer import SupervisedTrainer

        real_save = SupervisedTrainer._save_optimizer_and_scheduler

        def save(self: Any, output_dir: str) -> None:
            if hit():  # config.json and model.safetensors are in the staging folder by now
                _die(signal.SIGKILL)
            real_save(self, output_dir)

        SupervisedTrainer._save_optimizer_and_scheduler = save  # type: ignore[method-assign]
    elif fault == "kill-in-snapshot":
        from worker import snapshot

        real_write = snapshot.SnapshotStore.write

        def write(self: Any, step: int, files: Any, *rest: Any, **kw: Any) -> Any:
            if not hit():
                return real_write(self, step, files, *rest, **kw)
            real_put = snapshot._put

            def torn_put(view: Any, at: int, piece: Any) -> int:
                # The index and the tensors are in the slot: half of the next piece, then die.
                data = memoryview(piece).cast("B")
                real_put(view, at, data[: max(1, data.nbytes // 2)])
                _die(signal.SIGKILL)
                return at

            snapshot._put = torn_put
            real_write(self, step, files, *rest, **kw)
            raise SystemExit("inject: the snapshot write finished without being killed")

        snapshot.SnapshotStore.write = write  # type: ignore[method-assign]


def install_from_env() -> None:
    """``VIT_INJECT=FAULT:K`` for the worker process of attempt ``VIT_INJECT_ATTEMPT`` (default 1).

    Run from ``sitecustomize`` (see :func:`site_dir`) by every Python that has it on its path: the
    supervisor, a standby and other attempts' workers are left alone.
    """
    spec = os.environ.get("VIT_INJECT")
    argv = getattr(sys, "orig_argv", [])
    if not spec or argv[1:3] != ["-m", "worker"] or "--standby" in argv:
        return
    if os.environ.get("VIT_ATTEMPT") != os.environ.get("VIT_INJECT_ATTEMPT", "1"):
        return
    fault, _, count = spec.partition(":")
    install(fault, int(count))


def site_dir(path: Path) -> Path:
    """Write a ``sitecustomize.py`` into ``path`` that runs :func:`install_from_env`; return ``path``.
    Put it first on ``PYTHONPATH`` (the repository after it)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "sitecustomize.py").write_text(
        "from tests.inject_worker import install_from_env\n\ninstall_from_env()\n", encoding="utf-8"
    )
    return path


def main() -> int:
    fault, _, count = sys.argv[1].partition(":")
    install(fault, int(count))
    from worker.cli import entry as worker_main

    worker_main(sys.argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
