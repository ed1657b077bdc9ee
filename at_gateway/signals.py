"""Counting stop signals (SIGTERM, SIGINT) the way an operator means them.

The first stop drains, the second cuts the drain short, a third gives up on the last writes. But one stop
often arrives twice: ``make run`` passes a SIGTERM on to its child, and a process-group kill
(``kill -TERM -- -PGID``, systemd's ``KillMode=control-group``) reaches both, so the gateway would see a
second signal a moment after the first and cut off requests it was meant to drain. The same signal again
within :data:`ECHO_WINDOW` is taken as that echo, not as a second stop.
"""

from __future__ import annotations

import time
from collections.abc import Callable

ECHO_WINDOW = 0.5  # seconds: a person's second Ctrl-C comes later than make's relay of the first


class StopSignals:
    """How many stops the signals so far stand for."""

    __slots__ = ("count", "_last", "_clock")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.count = 0
        self._last: tuple[int, float] | None = None
        self._clock = clock

    def add(self, signum: int) -> bool:
        """Count ``signum``; False when it is the echo of the one before (nothing more to do)."""
        now = self._clock()
        last = self._last
        self._last = (signum, now)
        if last is not None and last[0] == signum and now - last[1] < ECHO_WINDOW:
            return False
        self.count += 1
        return True
