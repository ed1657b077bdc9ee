"""The keys of one provider: which to use next, which rest.

What rests is shared by the workers (:mod:`.state`, one slot per key, found by
``sha256(provider + "\\0" + key)[:8]``: the key itself never reaches shared memory, and a reload that keeps
a key finds its slot and its cooldown again). How the next key is chosen is each worker's own: the smooth
weighted round-robin's counters, fill-first's order and least-busy's in-flight counts are per process, as
nginx keeps its upstream counters per worker.

The hot path (a healthy key) takes no lock and reads no record: each key remembers what it last read of its
slot and the slot's write counter, and re-reads only when the counter moved (something was written: a
failure somewhere, which is rare). With one healthy key :meth:`KeyPool.pick` is one counter read and two
comparisons: 0.15 µs (timeit, Python 3.11; figures in tests/test_resilience_keys.py).
"""

from __future__ import annotations

import hashlib
import logging

from ..config import CooldownConfig, WeightedKey
from .backoff import cooldown as backoff_cooldown
from .state import DISABLED, SharedState

log = logging.getLogger("at_gateway.resilience")

ROUND_ROBIN, FILL_FIRST, LEAST_BUSY = "round-robin", "fill-first", "least-busy"
_COUNT_CAP = 1_000_000  # consecutive counters stop growing here (the cooldown reached its cap long before)


def key_fingerprint(provider: str, key: str) -> bytes:
    """The slot fingerprint of ``key`` of ``provider``: 8 bytes of a hash, never the key."""
    return hashlib.sha256(provider.encode() + b"\0" + key.encode()).digest()[:8]


class KeyPool:
    """``round-robin`` (smooth weighted, as nginx: deterministic, weights hold over a few picks), ``fill-first``
    (the first usable key until it rests), ``least-busy`` (fewest requests in flight in this worker, ties in
    order). Cooling and disabled keys are skipped; state is in :class:`SharedState` (all workers).

    A provider with no key (``keys`` empty: its credentials come from elsewhere, or it needs none) still gets
    one pool entry, index 0, standing for the provider's own credentials, so a 429 still cools the provider.

    A refused key (401/403) stays disabled, in every worker, until :meth:`enable_all` (the reload's pool
    calls it); building a pool alone does not enable it, so a worker that starts later (a respawn after a
    crash) does not try the refused key again.
    """

    def __init__(self, provider: str, keys: tuple[WeightedKey, ...], strategy: str, cooldown: CooldownConfig,
                 state: SharedState) -> None:
        if strategy not in (ROUND_ROBIN, FILL_FIRST, LEAST_BUSY):
            raise ValueError(f"unknown key strategy {strategy!r}")
        self.provider = provider
        self.strategy = strategy
        self.cooldown = cooldown
        self.state = state
        prints = [key_fingerprint(provider, k.key) for k in keys] or [key_fingerprint(provider, "")]
        self.weights = [max(1, k.weight) for k in keys] or [1]
        self.slots = [state.slot(fp) for fp in prints]
        n = len(self.slots)
        self._n = n
        self._current = [0] * n  # smooth WRR's current weights (this worker's)
        self._in_flight = [0] * n  # least-busy (this worker's)
        # What each key last read of its slot, valid while the slot's write counter stays at _seen.
        self._seen = [-1] * n
        self._until = [0.0] * n
        self._off = [False] * n  # disabled
        self._clean = [True] * n  # no consecutive failures or 429s to reset
        self._limited = [False] * n  # its rest (if any) comes from 429s, not from failures
        self._logged: set[int] = set()  # refusals this worker logged (the shared flag makes it once in all)

    def enable_all(self) -> int:
        """A reload: the keys refused (401/403) before it are tried again; cooldowns stay (they end by
        themselves). Returns how many were enabled. Added for :func:`.targets.build_targets`.

        Each worker reloads on its own, within a poll interval of the others: a worker that reloads after
        another already had the key refused again under the new config enables it once more, which costs
        one more refused request and one more log line per such worker, per reload."""
        enabled = 0
        for i, slot in enumerate(self.slots):
            if not self.state.read(slot).flags & DISABLED:
                continue
            with self.state.lock():
                s = self.state.read(slot)
                if s.flags & DISABLED:
                    s.flags &= ~DISABLED
                    s.generation += 1
                    self.state.write(slot, s)
                    enabled += 1
            self._logged.discard(i)
        return enabled

    def __len__(self) -> int:
        return self._n

    # -- reading the shared state (the hot path) --------------------------------------------------------------
    def _refresh(self, i: int) -> None:
        """Re-read key ``i``'s slot (its write counter moved since the last read)."""
        slot = self.slots[i]
        seen = self.state.version(slot)
        s = self.state.read(slot)
        self._until[i] = s.until
        self._off[i] = bool(s.flags & DISABLED)
        self._clean[i] = not s.failures and not s.limited
        self._limited[i] = bool(s.limited)
        self._seen[i] = -1 if seen & 1 else seen  # read during a write: read again next time

    def _usable(self, i: int, now: float) -> bool:
        if self.state.version(self.slots[i]) != self._seen[i]:
            self._refresh(i)
        return not self._off[i] and self._until[i] <= now

    # -- choosing ---------------------------------------------------------------------------------------------
    def pick(self, now: float, exclude: frozenset[int] = frozenset()) -> int | None:
        """The index of the key to use now, or None when every key (not in ``exclude``) is cooling or disabled."""
        n = self._n
        if n == 1:  # the common case: no counters to keep
            if exclude and 0 in exclude:
                return None
            if self.state.version(self.slots[0]) != self._seen[0]:
                self._refresh(0)
            return 0 if not self._off[0] and self._until[0] <= now else None
        if self.strategy == ROUND_ROBIN:
            return self._smooth_wrr(now, exclude)
        if self.strategy == FILL_FIRST:
            for i in range(n):
                if i not in exclude and self._usable(i, now):
                    return i
            return None
        best: int | None = None  # least-busy: fewest in flight here, the first on a tie
        for i in range(n):
            if i not in exclude and self._usable(i, now) and (best is None or
                                                              self._in_flight[i] < self._in_flight[best]):
                best = i
        return best

    def _smooth_wrr(self, now: float, exclude: frozenset[int]) -> int | None:
        """nginx's smooth weighted round-robin (ngx_http_upstream_get_peer): every usable key gains its weight,
        the key with the most current weight wins (the first on a tie) and pays back the total. Keys that
        rest (or are excluded) neither gain nor pay, so the others keep their proportions among themselves."""
        current, weights, seen, slots, off, until = (self._current, self.weights, self._seen, self.slots, self._off,
                                                     self._until)
        version = self.state.version
        total = 0
        best = -1
        for i in range(self._n):
            if exclude and i in exclude:
                continue
            if version(slots[i]) != seen[i]:
                self._refresh(i)
            if off[i] or until[i] > now:
                continue
            current[i] += weights[i]
            total += weights[i]
            if best < 0 or current[i] > current[best]:
                best = i
        if best < 0:
            return None
        current[best] -= total
        return best

    def available(self, now: float, exclude: frozenset[int] = frozenset()) -> bool:
        """Would :meth:`pick` find a key now? Without picking (added): ``pick`` moves the round-robin on, so
        asking it only to know (before a retry: "is there another key?") would skew the weights."""
        return any(i not in exclude and self._usable(i, now) for i in range(self._n))

    def next_free(self, now: float) -> float | None:
        """Seconds until the first cooling key is usable again; None when no key can become usable (all disabled).
        0.0 when a key is usable now."""
        best: float | None = None
        for i in range(self._n):
            if self.state.version(self.slots[i]) != self._seen[i]:
                self._refresh(i)
            if self._off[i]:
                continue
            wait = max(0.0, self._until[i] - now)
            if best is None or wait < best:
                best = wait
        return best

    def resting_for_rate_limits(self, now: float) -> bool:
        """Whether every key that rests now rests for 429s (not for failures in a row): then a request finding
        them all resting was rate limited, and may be told when to come back (added for routing's
        ``all_failed``)."""
        resting = False
        for i in range(self._n):
            if self.state.version(self.slots[i]) != self._seen[i]:
                self._refresh(i)
            if self._off[i] or self._until[i] <= now:
                continue
            if not self._limited[i]:
                return False
            resting = True
        return resting

    # -- in flight (least-busy) -------------------------------------------------------------------------------
    def started(self, index: int) -> None:
        """A request went out on key ``index`` (least-busy counts in-flight requests)."""
        self._in_flight[index] += 1

    def finished(self, index: int) -> None:
        if self._in_flight[index] > 0:
            self._in_flight[index] -= 1

    # -- outcomes ---------------------------------------------------------------------------------------------
    def succeeded(self, index: int, now: float) -> None:
        """Resets the key's consecutive failures (a write only when there were some)."""
        slot = self.slots[index]
        if self.state.version(slot) != self._seen[index]:
            self._refresh(index)
        if self._clean[index]:
            return
        with self.state.lock():
            s = self.state.read(slot)
            if s.failures or s.limited:
                s.failures = s.limited = 0
                s.stamp = now
                self.state.write(slot, s)

    def rate_limited(self, index: int, now: float, retry_after: float | None) -> float:
        """A 429: cool the key for what the upstream asked (``retry_after``: the longest of its Retry-After and
        kin, where sent), else for the backoff; returns the cooldown.

        The backoff grows with the consecutive 429s (``cooldown.initial`` doubling to ``cooldown.max``), counted
        once per cooling: a 429 for a request sent before the key started cooling (several workers, or
        concurrent requests, hitting the same limit) neither doubles the rest nor restarts it; only a longer
        ``retry_after`` lengthens it. The
        returned value is what is left of the key's rest (another worker may have set a longer one)."""
        slot = self.slots[index]
        asked = retry_after or 0.0
        with self.state.lock():
            s = self.state.read(slot)
            if s.until > now:  # resting already: only a longer wait asked by the upstream lengthens it
                s.until = max(s.until, now + asked)
            else:
                s.limited = min(s.limited + 1, _COUNT_CAP)
                s.until = now + (asked if retry_after is not None else backoff_cooldown(s.limited, self.cooldown))
            s.stamp = now
            self.state.write(slot, s)
            return s.until - now

    def failed(self, index: int, now: float) -> float | None:
        """A 5xx / network error / timeout: after ``cooldown.failures`` in a row the key cools (returns how long).

        Each further failure in a row, once the key is back, cools it twice as long (``cooldown.initial`` up to
        ``cooldown.max``); failures of requests sent before it started cooling are not counted again."""
        slot = self.slots[index]
        with self.state.lock():
            s = self.state.read(slot)
            if s.until > now:
                return None  # already resting: this request went out before the rest began
            s.failures = min(s.failures + 1, _COUNT_CAP)
            s.stamp = now
            over = s.failures - self.cooldown.failures
            wait: float | None = None
            if over >= 0:
                wait = backoff_cooldown(over + 1, self.cooldown)
                s.until = now + wait
            self.state.write(slot, s)
            return wait

    def refused(self, index: int, status: int | None = None) -> None:
        """A 401/403: the key is disabled until the next reload; logged once, with its index, never its value.

        Once across the workers: only the one that sets the shared flag logs. ``status`` (added) goes in the log."""
        slot = self.slots[index]
        with self.state.lock():
            s = self.state.read(slot)
            if s.flags & DISABLED:
                return
            s.flags |= DISABLED
            self.state.write(slot, s)
        if index not in self._logged:
            self._logged.add(index)
            log.warning("provider %s: key %d of %d refused by the upstream%s; disabled until the next reload",
                        self.provider, index, self._n, f" ({status})" if status else "")

    def describe(self, now: float) -> list[dict[str, object]]:
        """Each key's state for health/admin: index, weight, state (ok|cooling|disabled), cooling_for, failures.

        Also (added): ``rate_limited`` (consecutive 429s) and ``in_flight`` (this worker's)."""
        out: list[dict[str, object]] = []
        for i in range(self._n):
            s = self.state.read(self.slots[i])
            left = max(0.0, s.until - now)
            state = "disabled" if s.flags & DISABLED else "cooling" if left > 0 else "ok"
            out.append({"index": i, "weight": self.weights[i], "state": state, "cooling_for": round(left, 3),
                        "failures": s.failures, "rate_limited": s.limited, "in_flight": self._in_flight[i]})
        return out
