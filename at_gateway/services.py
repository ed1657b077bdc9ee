"""The long-lived state a :class:`~at_gateway.app.Gateway` uses beside its config: built once per
process by :mod:`.service`, kept across config reloads, closed at the end of the drain.

Each part is optional (None: the feature is off, and the request path pays nothing for it) and
known to the gateway only by the small interface below, so the database, the key cache and the
limiter (in-process today; shared between workers, or Redis, behind the same interface) can change
without the request path knowing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .config import Route
    from .context import RequestContext
    from .store.catalog import Catalog
    from .store.keys import ClientKey
    from .store.responses import ResponseStore


class Recorder(Protocol):
    """Where finished requests go (the request log, daily usage): never blocks, never raises."""

    def record(self, ctx: RequestContext) -> None: ...

    async def flush(self) -> None: ...

    async def aclose(self) -> None: ...


class KeyVerifier(Protocol):
    """Client keys from the store, served from memory."""

    def verify(self, presented: bytes) -> ClientKey | None:
        """The key for ``presented``; None when it is not a store key at all (not ``atg_...``); raises
        :class:`~at_gateway.errors.Unauthorized` for a store key that is unknown, revoked, disabled
        or expired, saying which."""
        ...

    async def aclose(self) -> None: ...


class Limiter(Protocol):
    """Rate limits, quotas and budgets."""

    async def admit(self, ctx: RequestContext, route: Route, body: dict[str, Any]) -> None:
        """Admit the request or raise a 429 (:class:`~at_gateway.errors.RateLimited`, or the quota one);
        sets ``ctx.admission`` (its reservation) and ``ctx.extra_headers`` (x-ratelimit-*)."""
        ...

    def settle(self, ctx: RequestContext) -> None:
        """The request finished (``ctx.usage``, ``ctx.cost_nanousd`` known, or it failed): replace its
        reservation by what it used. Never blocks."""
        ...

    async def describe(self, ctx: RequestContext) -> dict[str, Any]:
        """``GET /v1/key``: the caller's limits, usage and what is left."""
        ...

    async def peek(self, ctx: RequestContext) -> None:
        """Set ``ctx.extra_headers`` (x-ratelimit-*) for an answer given before admission; takes nothing."""
        ...

    async def aclose(self) -> None: ...


@dataclass
class Services:
    store: Recorder | None = None
    keys: KeyVerifier | None = None
    limiter: Limiter | None = None
    catalog: Catalog | None = None  # providers, routes and audit in the database (the admin API's); None in memory
    # The Responses door's kept responses (previous_response_id, GET /v1/responses/{id}); None in memory.
    responses: ResponseStore | None = None
    control: Any = None  # the :class:`~at_gateway.live.Live` holding the current gateway (reloads, health)
    # Cooldowns, disabled keys and circuits (:class:`~at_gateway.resilience.state.SharedState`): made before the
    # workers fork (shared by them), or by the first Gateway of a process (private).
    shared: Any = None
    # The clock keys and circuits measure rests with (time.monotonic: one clock for every process of the
    # machine); a test passes its own to move time without sleeping.
    clock: Callable[[], float] = time.monotonic
    # Prometheus metrics (:class:`~at_gateway.metrics.Metrics`) when ``metrics.enabled``: counted per process,
    # summed over the workers at scrape time; None: off, and the request path pays nothing.
    metrics: Any = None
    # The requests this process is answering now (id(ctx) -> RequestContext): the dashboard's "in flight".
    in_flight: dict[int, Any] = field(default_factory=dict)
    # The admin door's per-process state (admin/auth.py AdminState: failed logins per address, revocations
    # while the store is in memory); kept across reloads.
    admin_state: Any = None

    async def aclose(self) -> None:
        """Close every part, the store last (what the limiter and the drained requests left gets written)
        and always: a part that fails to close does not keep the others open; its error is raised after."""
        try:
            if self.limiter is not None:
                await self.limiter.aclose()
        finally:
            try:
                if self.keys is not None:
                    await self.keys.aclose()
            finally:
                try:
                    try:
                        if self.catalog is not None:
                            await self.catalog.aclose()
                    finally:
                        if self.responses is not None:
                            await self.responses.aclose()
                finally:
                    if self.store is not None:
                        await self.store.aclose()
