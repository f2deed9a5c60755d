"""Run the real worker with the snapshot copy of one step held halfway (used by tests as a child process).

python tests/snapshot_inject.py hold-copy:K MARKER CONFIG [worker args]

The copy thread of step K's snapshot copies half of the tensors into the slot, then writes MARKER
(a JSON line: the step, the bytes written and the snapshot's size) and waits forever. Training
then waits too, at the next optimizer step (which must not change the weights while they
are copied), so a test can SIGKILL the worker at a known instant inside the copy. Nothing
here touches the product's code: the hook wraps SnapshotStore.write and the tensors' fill it is given.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    fault, count = sys.argv[1].split(":")
    if fault != "hold-copy":
        raise SystemExit(f"unknown fault {fault!r}")
    at = int(count)
    marker = Path(sys.argv[2])
    from worker import snapshot
    from worker.cli import entry as worker_main

    real_write = snapshot.SnapshotStore.write

    def write(store: Any, step: int, files: Any, tensors: Any = None, **kw: Any) -> None:
        if step == at and tensors is not None and tensors.fill is not None:
            real_fill = tensors.fill

            def held_fill(dst: memoryview) -> None:
                # The tensors' bytes as the real copy makes them; half of them reach the slot, then hold.
                scratch = bytearray(dst.nbytes)
                real_fill(memoryview(scratch))
                half = max(1, dst.nbytes // 2)
                dst[:half] = scratch[:half]
                total = sum(len(b) for b in files.values()) + tensors.nbytes
                marker.write_text(json.dumps({"step": at, "written": half, "size": total}) + "\n")
                while True:  # until the test's SIGKILL
                    time.sleep(3600)

            tensors = dataclasses.replace(tensors, fill=held_fill)
        real_write(store, step, files, tensors, **kw)

    snapshot.SYNC_BELOW = 0  # the tiny model's state is copied in the thread too, as a big one's is
    snapshot.SnapshotStore.write = write  # type: ignore[method-assign]
    return int(worker_main(sys.argv[3:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
