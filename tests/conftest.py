"""Shared fixtures: a mock upstream and an in-process gateway on real sockets."""

from __future__ import annotations

import copy
import io
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.from_thread
import pytest
from hypothesis import settings as hypothesis_settings

from at_gateway.app import Gateway
from at_gateway.config import build_config
from at_gateway.http.server import Server
from at_gateway.logs import Redactor, setup_logging
from at_gateway.service import server_settings
from tests.mock_upstream import MockUpstream

# The suite is deterministic: property tests draw the same examples on every run (derandomize), and keep no
# example database in the checkout. HYPOTHESIS_PROFILE=explore draws new ones, for hunting by hand.
hypothesis_settings.register_profile("deterministic", derandomize=True, database=None)
hypothesis_settings.register_profile("explore", derandomize=False, database=None)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

GATEWAY_KEY = "test-gateway-key-123"


class RunningGateway:
    def __init__(self, portal: Any, gateway: Gateway, server: Server, port: int, logs: io.StringIO) -> None:
        self.portal = portal
        self.gateway = gateway
        self.server = server
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.logs = logs

    def log_lines(self) -> list[str]:
        return [line for line in self.logs.getvalue().splitlines() if line]

    def request_logs(self, count: int = 1) -> list[dict[str, Any]]:
        """The access-log lines, once ``count`` of them are written (they follow the response)."""
        import json

        from tests.mock_upstream import wait_until

        def lines() -> list[str]:
            return [ln for ln in self.log_lines() if '"msg":"request"' in ln]

        assert wait_until(lambda: len(lines()) >= count), self.log_lines()
        return [json.loads(ln) for ln in lines()]


def base_config(upstream_url: str, routes: list[dict[str, Any]] | None = None, **top: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "api_key": GATEWAY_KEY,
        "port": 0,
        "store": {"path": ":memory:"},  # tests that need a database file set their own
        "providers": [
            {"name": "up1", "type": "openai", "base_url": upstream_url, "api_key": "sk-upstream-secret-1"},
            {"name": "up2", "type": "openai", "base_url": upstream_url, "api_key": "sk-upstream-secret-2"},
            {"name": "echo", "type": "echo"},
        ],
        "routes": routes or [
            {"name": "demo", "steps": [{"provider": "echo", "model": "echo-1"}]},
        ],
    }
    cfg.update(top)
    return cfg


@contextmanager
def run_gateway(raw_config: dict[str, Any],
                services: Callable[[Any], Awaitable[Any]] | None = None) -> Iterator[RunningGateway]:
    """An in-process gateway on a real socket. ``services``: an async factory of its Services from the
    config (``service.open_services`` opens the store, keys and limiter as ``serve`` does); closed after
    the drain, as ``serve`` closes them."""
    config = build_config(copy.deepcopy(raw_config), "test-config")
    logs = io.StringIO()
    setup_logging(config.log_level, Redactor(config.secrets()), logs)
    with anyio.from_thread.start_blocking_portal() as portal:
        gateway = portal.call(_make, config, services)
        server = Server(gateway.handle, server_settings(config))
        future, port = portal.start_task(server.serve)
        try:
            yield RunningGateway(portal, gateway, server, port, logs)
        finally:
            portal.call(server.shutdown)
            future.result(timeout=10)
            portal.call(gateway.aclose)
            if services is not None:
                portal.call(gateway.services.aclose)
    logging.getLogger("at_gateway").handlers.clear()


@contextmanager
def run_live(raw_config: dict[str, Any], source: str = "test-config") -> Iterator[RunningGateway]:
    """An in-process gateway as ``serve`` runs it: services opened (store, keys, limiter, catalog), the
    configuration merged with the database's providers and routes and rebuilt when they change (the
    :class:`~at_gateway.live.Live` watch runs). ``raw_config`` should name a store file (``store.path``).
    ``gateway.gateway`` is the gateway at start; ``gateway.live.gateway`` the current one."""
    from at_gateway.live import Live
    from at_gateway.service import open_services

    config = build_config(copy.deepcopy(raw_config), source)
    logs = io.StringIO()
    setup_logging(config.log_level, Redactor(config.secrets()), logs)
    with anyio.from_thread.start_blocking_portal() as portal:
        services = portal.call(open_services, config)
        holder: dict[str, Any] = {}

        def swapped(old: Any, fresh: Any) -> None:
            if "server" in holder:
                holder["server"].handler = fresh.handle
            setup_logging(fresh.config.log_level, Redactor([*old.config.secrets(), *fresh.config.secrets()]), logs)

        live = Live(config, services, on_swap=swapped)
        gateway = portal.call(live.start)
        setup_logging(config.log_level, Redactor(gateway.config.secrets()), logs)
        server = holder["server"] = Server(gateway.handle, server_settings(config))
        future, port = portal.start_task(server.serve)
        watch = portal.start_task_soon(live.watch)
        running = RunningGateway(portal, gateway, server, port, logs)
        running.live = live  # type: ignore[attr-defined]
        try:
            yield running
        finally:
            watch.cancel()
            portal.call(server.shutdown)
            future.result(timeout=10)
            portal.call(live.gateway.aclose)
            portal.call(services.aclose)
    logging.getLogger("at_gateway").handlers.clear()


async def _make(config: Any, services: Callable[[Any], Awaitable[Any]] | None) -> Gateway:
    return Gateway(config, services=await services(config) if services is not None else None)


@pytest.fixture
def upstream() -> Iterator[MockUpstream]:
    mock = MockUpstream().start()
    try:
        yield mock
    finally:
        mock.stop()


@pytest.fixture
def other() -> Iterator[MockUpstream]:
    """A second upstream, for tests where which upstream served a request is the point."""
    mock = MockUpstream().start()
    try:
        yield mock
    finally:
        mock.stop()
