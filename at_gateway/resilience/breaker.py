"""Circuit breakers per (provider, upstream model).

The state that decides whether a request may go (open until when, a probe in flight since when, the
consecutive failures) is one slot of :class:`~.state.SharedState`, so the workers agree: a circuit one
worker opens is open in all, and the half-open probe is claimed under the shared lock, so one request
probes for the whole machine. The ratio mode's window (requests and failures over the last ``window``
seconds) is counted per worker, in buckets, with no lock and no write on success; the worker whose window
crosses the ratio opens the shared circuit.

A probe that never reports (its worker crashed, or the caller forgot) holds the half-open state for at most
``open_for``: after that the next caller becomes the probe. Each change of state is logged once, by the
worker that made it: WARNING when the circuit opens, INFO when it half-opens and closes.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator

from ..config import BreakerConfig
from . import state as st
from .state import SharedState, Slot

log = logging.getLogger("at_gateway.resilience")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"
# The slot's flag bits (see .state)
_OPEN, _PROBE, _HALF = st.OPEN, st.HALF_OPEN_PROBE, st.HALF_OPEN
_BUCKETS = 10  # the ratio window in ten buckets: it slides by a tenth of its length
_COUNT_CAP = 1_000_000


def circuit_fingerprint(provider: str, model: str) -> bytes:
    """The slot fingerprint of a circuit (a key's is 8 bytes of a hash, so the two never meet)."""
    return hashlib.sha256(b"circuit\0" + provider.encode() + b"\0" + model.encode()).digest()[:16]


class _Window:
    """Requests and failures over the last ``window`` seconds, in this worker, in :data:`_BUCKETS` buckets."""

    def __init__(self, window: float) -> None:
        self.width = window / _BUCKETS
        self.epochs = [-1] * _BUCKETS  # which bucket-long period each bucket holds
        self.total = [0] * _BUCKETS
        self.failed = [0] * _BUCKETS

    def add(self, now: float, failed: bool) -> None:
        epoch = int(now // self.width)
        b = epoch % _BUCKETS
        if self.epochs[b] != epoch:
            self.epochs[b], self.total[b], self.failed[b] = epoch, 0, 0
        self.total[b] += 1
        if failed:
            self.failed[b] += 1

    def counts(self, now: float) -> tuple[int, int]:
        """(requests, failures) in the buckets of the last window."""
        oldest = int(now // self.width) - _BUCKETS + 1
        total = failed = 0
        for b in range(_BUCKETS):
            if self.epochs[b] >= oldest:
                total += self.total[b]
                failed += self.failed[b]
        return total, failed

    def clear(self) -> None:
        self.epochs = [-1] * _BUCKETS
        self.total = [0] * _BUCKETS
        self.failed = [0] * _BUCKETS


class Breaker:
    """closed -> open after ``failures`` consecutive failures (or the ratio over the window) -> after ``open_for``
    half-open: one probe at a time across all workers; its success closes, its failure opens again. State
    changes are logged (``circuit provider/model: closed -> open after 5 failures``).

    ``cfg`` may be replaced by a reload (:meth:`Breakers.get` does it); the shared state stays."""

    def __init__(self, provider: str, model: str, cfg: BreakerConfig, state: SharedState) -> None:
        self.provider = provider
        self.model = model
        self.cfg = cfg
        self.shared = state
        self.name = f"{provider}/{model}"
        self.slot = state.slot(circuit_fingerprint(provider, model))
        self._window = _Window(cfg.window) if cfg.failure_ratio is not None else None
        self._seen = -1  # the slot's write counter when _closed/_failures were read
        self._closed = True
        self._failures = 0
        self._probe: float | None = None  # when this worker claimed the half-open probe it holds
        self._opened = -1  # the slot's count of openings this worker's window was counted for

    def configure(self, cfg: BreakerConfig) -> None:
        """New settings from a reload (added): the shared state stays; the ratio window restarts if it changed."""
        if cfg == self.cfg:
            return
        if cfg.failure_ratio is None:
            self._window = None
        elif self._window is None or cfg.window != self.cfg.window:
            self._window = _Window(cfg.window)
        self.cfg = cfg

    # -- the hot path -------------------------------------------------------------------------------------------
    def _fresh(self) -> None:
        """Re-read the slot when its write counter moved (else what was read last still holds)."""
        seen = self.shared.version(self.slot)
        if seen != self._seen:
            s = self.shared.read(self.slot)
            self._closed = not s.flags & _OPEN
            self._failures = s.failures
            self._seen = -1 if seen & 1 else seen
            self._sync_window(s)

    def _sync_window(self, s: Slot) -> None:
        """The circuit opened since this worker last looked (maybe in another worker): what its window
        counted belongs to before, and must not reopen the circuit once it closes."""
        if s.generation != self._opened:
            self._opened = s.generation
            if self._window is not None:
                self._window.clear()

    def allow(self, now: float) -> bool:
        """May a request go now? Closed: yes. Open: no until open_for has passed; then the first caller
        becomes the probe (True) and others get False until it reports."""
        if self.shared.version(self.slot) == self._seen and self._closed:
            return True
        self._fresh()
        if self._closed:
            return True
        s = self.shared.read(self.slot)
        if now < s.until:
            return False  # open
        if s.flags & _PROBE and now - s.stamp < self.cfg.open_for:
            return False  # half-open, and another request is the probe
        with self.shared.lock():
            s = self.shared.read(self.slot)
            if not s.flags & _OPEN:
                return True  # closed meanwhile
            if now < s.until or (s.flags & _PROBE and now - s.stamp < self.cfg.open_for):
                return False
            stale = bool(s.flags & _PROBE)
            first = not s.flags & _HALF
            s.flags |= _PROBE | _HALF
            s.stamp = now
            self.shared.write(self.slot, s)
        self._probe = now
        if first:
            log.info("circuit %s: open -> half-open, one probe request", self.name)
        elif stale:
            log.info("circuit %s: the half-open probe did not report within %gs; a new probe", self.name,
                     self.cfg.open_for)
        return True

    def succeeded(self, now: float) -> None:
        if self.shared.version(self.slot) != self._seen:
            self._fresh()
        if self._window is not None:
            self._window.add(now, False)
        if self._closed and not self._failures:
            return
        with self.shared.lock():
            s = self.shared.read(self.slot)
            if s.flags & _OPEN:
                if now < s.until:
                    return  # a request that went out before the circuit opened: it stays open its time
                self._close(s, now)
            elif s.failures:
                s.failures = 0
                self.shared.write(self.slot, s)
                return
            else:
                return
        self._probe = None
        log.info("circuit %s: half-open -> closed (the probe succeeded)", self.name)

    def _close(self, s: Slot, now: float) -> None:
        s.flags &= ~(_OPEN | _PROBE | _HALF)
        s.failures = 0
        s.until = 0.0
        s.stamp = now
        self.shared.write(self.slot, s)
        if self._window is not None:
            self._window.clear()

    def failed(self, now: float) -> None:
        why: str | None = None
        with self.shared.lock():
            s = self.shared.read(self.slot)
            self._sync_window(s)
            counts: tuple[int, int] | None = None
            if self._window is not None:
                self._window.add(now, True)
                counts = self._window.counts(now)
            if s.flags & _OPEN:
                if now < s.until:
                    return  # already open: a request that went out before
                self._open(s, now)  # half-open: the probe (or a late request) failed
                why = "half-open -> open (the probe failed)"
            else:
                s.failures = min(s.failures + 1, _COUNT_CAP)
                if s.failures >= self.cfg.failures:
                    why = f"closed -> open after {s.failures} failures in a row"
                    self._open(s, now)
                elif counts is not None and self._ratio_trips(*counts):
                    why = (f"closed -> open after {counts[1]} of {counts[0]} requests failed in the last "
                           f"{self.cfg.window:g}s")
                    self._open(s, now)
                else:
                    self.shared.write(self.slot, s)
        self._probe = None
        if why:
            log.warning("circuit %s: %s; open for %gs", self.name, why, self.cfg.open_for)

    def _ratio_trips(self, total: int, failed: int) -> bool:
        ratio = self.cfg.failure_ratio
        return ratio is not None and total >= self.cfg.min_requests and failed >= ratio * total

    def _open(self, s: Slot, now: float) -> None:
        s.flags = (s.flags | _OPEN) & ~(_PROBE | _HALF)
        s.until = now + self.cfg.open_for
        s.failures = 0
        s.stamp = now
        s.generation += 1  # how many times it opened
        self.shared.write(self.slot, s)
        self._sync_window(s)

    def released(self, now: float) -> None:
        """A probe that ended without a verdict (cancelled, request-scoped failure): free the probe slot.

        Only the worker that holds the probe frees it, and only that probe (the one claimed at the time this
        worker remembers: a probe it held so long that another replaced it is not its to free); any other
        call is a no-op (a request that went out before the circuit opened has no probe to give back)."""
        claimed, self._probe = self._probe, None
        if claimed is None:
            return
        with self.shared.lock():
            s = self.shared.read(self.slot)
            if s.flags & _PROBE and s.stamp == claimed:
                s.flags &= ~_PROBE
                self.shared.write(self.slot, s)

    def state(self, now: float) -> str:
        s = self.shared.read(self.slot)
        if not s.flags & _OPEN:
            return CLOSED
        return OPEN if now < s.until else HALF_OPEN

    def open_for(self, now: float) -> float:
        """Seconds left open (0 when closed or half-open)."""
        s = self.shared.read(self.slot)
        return max(0.0, s.until - now) if s.flags & _OPEN else 0.0

    def describe(self, now: float) -> dict[str, object]:
        """The circuit for health/admin (added): state, open_for, consecutive failures, times opened."""
        s = self.shared.read(self.slot)
        return {"provider": self.provider, "model": self.model, "state": self.state(now),
                "open_for": round(self.open_for(now), 3), "failures": s.failures, "opened": s.generation}


class Breakers:
    """The breakers of one gateway's providers, made on first use per (provider, model)."""

    def __init__(self, state: SharedState) -> None:
        self.shared = state
        self._all: dict[tuple[str, str], Breaker] = {}

    def get(self, provider: str, model: str, cfg: BreakerConfig) -> Breaker:
        b = self._all.get((provider, model))
        if b is None:
            b = self._all[(provider, model)] = Breaker(provider, model, cfg, self.shared)
        elif b.cfg is not cfg:
            b.configure(cfg)
        return b

    def __iter__(self) -> Iterator[Breaker]:
        """Every breaker made so far (added: for health/admin)."""
        return iter(list(self._all.values()))
