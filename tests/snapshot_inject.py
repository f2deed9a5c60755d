"""Run the real worker with the snapshot copy of one step held halfway (used by tests as a child process).

python tests/snapshot_inject.py hold-copy:K MARKER CONFIG [worker args]

The copy thread of step K's snapshot writes half of the slot, then writes MARKER
(a JSON line: the step, the bytes written and the snapshot's size) and waits forever. Training
then waits too, at the next optimizer step (which must not change the weights while they
are copied), so a test can SIGKILL the worker at a known instant inside the copy. Nothing
here touches the product's code: the hook wraps SnapshotStore.write and the function it writes with.
"""

from __future__ import annotations

import json
import sys
import threading
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

    held = threading.local()
    real_write = snapshot.SnapshotStore.write
    real_write_all = snapshot._write_all

    def write(store: Any, step: int, files: Any, tensors: Any = None) -> None:
        if step == at:
            held.total = sum(len(b) for b in files.values()) + (tensors.nbytes if tensors else 0)
            held.written = 0
        try:
            real_write(store, step, files, tensors)
        finally:
            held.total = None

    def write_all(fd: int, chunk: Any, crc: int) -> int:
        total = getattr(held, "total", None)
        if total:
            view = memoryview(chunk).cast("B")
            if held.written + view.nbytes >= total // 2:  # this piece crosses the middle: half of it, then hold
                real_write_all(fd, view[: max(1, total // 2 - held.written)], 0)
                held.written = total // 2
                marker.write_text(json.dumps({"step": at, "written": held.written, "size": total}) + "\n")
                while True:  # until the test's SIGKILL
                    time.sleep(3600)
            held.written += view.nbytes
        return real_write_all(fd, chunk, crc)

    snapshot.SYNC_BELOW = 0  # the tiny model's state is copied in the thread too, as a big one's is
    snapshot.SnapshotStore.write = write  # type: ignore[method-assign]
    snapshot._write_all = write_all
    return int(worker_main(sys.argv[3:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
