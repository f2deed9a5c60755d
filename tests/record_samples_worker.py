"""Run the real worker and record every training sample it consumes, in order (a test's child process).

    python tests/record_samples_worker.py RECORD CONFIG [worker args]

Each training forward pass appends one line per sample to RECORD: a hash of the sample's
pixels and label exactly as the model receives them. Samples that the DataLoader fetched
ahead but training never used are not recorded; evaluation passes are not recorded. The
file is flushed after every batch, so a SIGKILL loses at most the batch being written.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sample_hashes(pixel_values: Any, labels: Any) -> list[str]:
    """One hex digest per sample of a batch (pixels as float32 bytes, then the label)."""
    px = pixel_values.detach().cpu().contiguous()
    out = []
    for i in range(px.shape[0]):
        h = hashlib.sha256(px[i].numpy().tobytes())
        h.update(str(int(labels[i])).encode())
        out.append(h.hexdigest()[:20])
    return out


def main() -> int:
    record = open(sys.argv[1], "a")  # noqa: SIM115 - open for the life of the process
    from worker import model as model_mod
    from worker.cli import entry as worker_main

    real_build = model_mod.build

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if module.training:
            record.write("".join(h + "\n" for h in sample_hashes(kwargs["pixel_values"], kwargs["labels"])))
            record.flush()

    def build(cfg, names):  # type: ignore[no-untyped-def]
        m = real_build(cfg, names)
        m.register_forward_pre_hook(hook, with_kwargs=True)
        return m

    model_mod.build = build
    worker_main(sys.argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
