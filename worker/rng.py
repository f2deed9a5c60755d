"""The random-number states at the last step boundary, kept cheaply for the emergency checkpoint.

After an out-of-memory error in forward/backward the worker commits the last completed
step, and for that checkpoint to resume exactly it needs every RNG as it was at that
step's boundary, not as the failed forward left it. Reading all of them at every step
costs about 50-100 µs (NumPy's legacy ``get_state`` alone copies its 2.5 KB key into a
new array, Python's ``getstate`` builds 625 ints): over 1 % of a short GPU step.

torch's generators are read at every boundary (about 1 µs: a 5 KB tensor copy): the
forward draws from them (dropout, samplers). Python's and NumPy's global generators are
usually untouched while training, so they are read in full only every ``recheck_steps``
boundaries. Their states only ever move forward, so when the state at the OOM still
equals the last full read, nothing drew from them since, and that read *is* the boundary
state. When a re-read finds that they moved, they are read at every boundary from then
on. The one case left without an exact answer (they moved since the last full read,
before a re-read noticed) is reported as unknown: the caller then makes no emergency
checkpoint rather than an inexact one.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def host_states() -> tuple[Any, Any]:
    """(Python's, NumPy's) global generator states."""
    return random.getstate(), np.random.get_state()


def _same_numpy(a: Any, b: Any) -> bool:
    # ('MT19937', key array, pos, has_gauss, cached_gaussian)
    return bool(
        a[0] == b[0] and a[2:] == b[2:] and np.array_equal(a[1], b[1])  # the key array, element by element
    )


class BoundaryRng:
    """Call :meth:`capture` at every step boundary; :meth:`at_boundary` after an OOM."""

    def __init__(self, recheck_steps: int = 50, cuda: bool | None = None) -> None:
        self.recheck_steps = max(1, recheck_steps)
        self.cuda = torch.cuda.is_available() if cuda is None else cuda
        self.volatile = False
        """Python's or NumPy's generator moved between two boundaries: read them at every one."""
        self._torch: dict[str, Any] = {}
        self._host: tuple[Any, Any] | None = None
        self._boundaries = 0
        self._host_at = -1  # the boundary count of the last full read

    def capture(self) -> None:
        self._boundaries += 1
        self._torch = {"cpu": torch.random.get_rng_state()}
        if self.cuda:
            self._torch["cuda"] = torch.cuda.random.get_rng_state()
        due = self._host is None or self.volatile or self._boundaries - self._host_at >= self.recheck_steps
        if not due:
            return
        host = host_states()
        if self._host is not None and not self.volatile and not self._same(host):
            self.volatile = True
        self._host, self._host_at = host, self._boundaries

    def reset(self) -> None:
        """Forget every state: the next :meth:`capture` reads all of them afresh and judges nothing
        (at the start of training, before the Trainer restores a checkpoint's states)."""
        self._torch, self._host, self._host_at = {}, None, -1

    def at_boundary(self) -> dict[str, Any] | None:
        """The states at the last :meth:`capture`, in ``rng_state.pth``'s layout; None when unknown."""
        if self._host is None or not self._torch:
            return None
        if self._host_at != self._boundaries and not self._same(host_states()):
            return None
        py, np_state = self._host
        return {"python": py, "numpy": np_state, **self._torch}

    def _same(self, host: tuple[Any, Any]) -> bool:
        assert self._host is not None
        return bool(host[0] == self._host[0] and _same_numpy(host[1], self._host[1]))
