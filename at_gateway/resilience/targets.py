"""A provider as routing uses it: one adapter per key, the key pool, the circuits, the concurrency slots.

Built once per :class:`~at_gateway.app.Gateway` (again on each reload); the state that must outlive a
reload and agree between workers (cooldowns, disabled keys, circuits) is in the :class:`.state.SharedState`
the targets are built over, keyed by fingerprints, so an unchanged key or model keeps it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio

from ..config import ProviderConfig
from ..errors import StepFailed
from .breaker import Breaker, Breakers
from .keys import KeyPool
from .state import SharedState

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ..http.pool import UpstreamClient
    from ..providers.base import Provider


MAX_CIRCUITS = 256  # circuits per provider; more models share the one named OTHER_MODELS
OTHER_MODELS = "(other models)"


class NoBreaker:
    """``breaker: off``: a circuit that is always closed and remembers nothing."""

    def allow(self, now: float) -> bool:
        return True

    def succeeded(self, now: float) -> None:
        pass

    def failed(self, now: float) -> None:
        pass

    def released(self, now: float) -> None:
        pass

    def open_for(self, now: float) -> float:
        return 0.0


NO_BREAKER = NoBreaker()


class Busy(StepFailed):
    """No concurrency slot freed within ``queue_timeout``: the step fails (the route falls through), with
    nothing held against the provider's keys or circuit."""


class Target:
    """One provider: ``adapters[i]`` sends with key ``i`` (one adapter when it has no key or one)."""

    def __init__(self, cfg: ProviderConfig, adapters: list[Provider], pool: KeyPool | None, breakers: Breakers) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.adapters = adapters
        self.pool = pool  # None: no keys (echo, a credentials file): nothing to pick or cool
        self.multi = pool is not None and len(pool) > 1  # attempts name their key only when there is a choice
        # least-busy counts requests in flight per key; the other strategies never read the count
        self.counting = pool is not None and cfg.key_strategy == "least-busy"
        self.breakers = breakers
        self._circuits: dict[str, Breaker] = {}
        limit = cfg.max_concurrency
        # None without max_concurrency: routing then skips the slot entirely (nothing to do per request)
        self.slots = anyio.Semaphore(limit) if limit else None

    def breaker(self, model: str) -> Breaker | NoBreaker:
        found = self._circuits.get(model)
        if found is None:
            if not self.cfg.breaker.enabled:
                return NO_BREAKER
            if len(self._circuits) >= MAX_CIRCUITS:
                # allow_direct lets clients name any model: past this many, the others share one circuit
                # instead of growing memory (and the shared table) without bound.
                model = OTHER_MODELS
                found = self._circuits.get(model)
            if found is None:
                found = self._circuits[model] = self.breakers.get(self.name, model, self.cfg.breaker)
        return found

    async def acquire(self) -> None:
        """Take a concurrency slot (``max_concurrency``), waiting up to ``queue_timeout``; raises :class:`Busy`.

        Separate from :meth:`release` because a stream holds its slot until its last chunk, long after the
        attempt that opened it returned (routing gives it back when the stream ends)."""
        slots = self.slots
        if slots is None:
            return
        try:
            with anyio.fail_after(self.cfg.queue_timeout):
                await slots.acquire()
        except TimeoutError:
            raise Busy(f"provider {self.name} is at max_concurrency ({self.cfg.max_concurrency} requests in "
                       f"flight) and none finished within queue_timeout ({self.cfg.queue_timeout:g}s)") from None

    def release(self) -> None:
        if self.slots is not None:
            self.slots.release()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """A concurrency slot for the block (:meth:`acquire`, then :meth:`release`); free without a limit."""
        await self.acquire()
        try:
            yield
        finally:
            self.release()


def primary(cfg: ProviderConfig) -> ProviderConfig:
    """``cfg`` as its first key's adapter sees it (``api_key`` is that key; the gateway's ``providers`` map)."""
    keys = cfg.keys()
    if keys and cfg.api_key != keys[0].key:
        return dataclasses.replace(cfg, api_key=keys[0].key)
    return cfg


def build_targets(providers: Mapping[str, ProviderConfig], client: UpstreamClient, state: SharedState,
                  adapters: Mapping[str, Provider] | None = None, *, reloaded: bool = False) -> dict[str, Target]:
    """Every provider's target; ``adapters``: the first adapter of each, already built (the gateway's own)."""
    from ..providers import build_provider

    breakers = Breakers(state)
    out: dict[str, Target] = {}
    for name, cfg in providers.items():
        keys = cfg.keys()
        first = adapters[name] if adapters is not None and name in adapters else build_provider(primary(cfg), client)
        built: list[Any] = [first]
        for k in keys[1:]:
            built.append(build_provider(dataclasses.replace(cfg, api_key=k.key, api_keys=()), client))
        pool = KeyPool(name, keys, cfg.key_strategy, cfg.cooldown, state) if keys else None
        if pool is not None and reloaded:
            pool.enable_all()  # a key refused with 401/403 rests until the next reload: this one
        out[name] = Target(cfg, built, pool, breakers)
    return out
