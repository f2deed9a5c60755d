"""Run the real worker with a fault injected from a hook (used by tests as a child process).

python tests/inject_worker.py oom-forward:K  CONFIG [worker args]   # torch.OutOfMemoryError in the
                                                                   # K-th training forward pass
python tests/inject_worker.py oom-optimizer:K CONFIG [...]          # ... inside the K-th optimizer step
python tests/inject_worker.py crash:K CONFIG [...]                  # ValueError in the K-th forward
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    fault, count = sys.argv[1].split(":")
    at = int(count)
    import torch

    from worker import model as model_mod
    from worker.cli import entry as worker_main

    real_build = model_mod.build
    calls = {"n": 0}

    def raise_fault() -> None:
        calls["n"] += 1
        if calls["n"] == at:
            if fault == "crash":
                raise ValueError("injected crash")
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    def build(cfg, names):  # type: ignore[no-untyped-def]
        m = real_build(cfg, names)
        if fault in ("oom-forward", "crash"):
            m.register_forward_pre_hook(lambda mod, args: raise_fault() if mod.training else None)
        return m

    model_mod.build = build
    if fault == "oom-optimizer":
        real_step = torch.optim.AdamW.step

        def step(self, *a, **k):  # type: ignore[no-untyped-def]
            out = real_step(self, *a, **k)  # parameters already changed when it fails
            raise_fault()
            return out

        torch.optim.AdamW.step = step
    worker_main(sys.argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
