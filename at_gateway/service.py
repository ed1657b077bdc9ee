"""Running the gateway as a service: event loop, signals, reload, drain.

SIGTERM/SIGINT start a graceful drain (exit 0 when done); SIGHUP reloads the
config file in place (routes, providers, keys, timeouts of steps and streams,
logging), keeping the old one when the new one is invalid. Settings of the
listening server and the upstream pools need a restart (a reload says which).
"""

from __future__ import annotations

import functools
import gc
import logging
import signal
import socket
import ssl
from typing import TYPE_CHECKING, Any, NamedTuple

import anyio

from .app import Gateway
from .config import Config
from .errors import ConfigError
from .http.server import Server, ServerSettings
from .live import Live
from .logs import Redactor, setup_logging
from .services import Services
from .signals import StopSignals

if TYPE_CHECKING:
    from .store.crypto import Keyring

log = logging.getLogger("at_gateway.service")

async def open_services(config: Config, limiter_channel: socket.socket | None = None,
                        keyring: Keyring | None = None, shared: Any = None) -> Services:
    """This process's store, client-key cache, limiter and catalog (each None when not in use);
    ``limiter_channel``: a worker's socket to the limiter state its supervisor holds for all workers;
    ``keyring``: the stored credentials' key, from :func:`.store.catalog.prepare` (once, before any fork)."""
    from .limits import open_limiter
    from .store.catalog import open_catalog
    from .store.db import MEMORY, StoreError
    from .store.keys import open_key_cache
    from .store.responses import open_response_store
    from .store.usage import open_recorder

    services = Services(shared=shared)
    try:
        if config.metrics.enabled:  # counted per process, summed over the workers at each scrape (metrics/share.py)
            from .metrics import Metrics

            services.metrics = Metrics(config, services)
        services.store = await open_recorder(config)
        services.keys = await open_key_cache(config)
        services.limiter = await open_limiter(config, limiter_channel)
        if config.store.path != MEMORY:
            if keyring is None:
                keyring = await anyio.to_thread.run_sync(prepare_keyring, config)
            try:
                services.catalog = await anyio.to_thread.run_sync(open_catalog, config.store.path, keyring)
            except StoreError as exc:
                raise ConfigError(config.source, [f"store.path: {exc}"]) from None
            services.responses = await open_response_store(config)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await services.aclose()
        raise
    return services


def prepare_keyring(config: Config) -> Keyring:
    """The stored credentials' key for ``config`` (see :func:`.store.catalog.prepare`); a wrong key, or a
    database that cannot be read, is a :class:`ConfigError` (exit 1) naming the database and the row."""
    from .store.catalog import prepare
    from .store.crypto import Keyring
    from .store.db import MEMORY, StoreError

    if config.store.path == MEMORY:
        return Keyring(None)
    try:
        return prepare(config.store.path, config.store.encryption_key, config.source)
    except StoreError as exc:
        raise ConfigError(config.source, [f"store: {exc}"]) from None


def server_settings(config: Config) -> ServerSettings:
    ctx = None
    if config.tls is not None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(config.tls.cert_file, config.tls.key_file)
    return ServerSettings(
        host=config.host, port=config.port, max_body_size=config.max_body_size,
        max_header_size=config.max_header_size, header_timeout=config.header_timeout,
        body_timeout=config.body_timeout,
        keepalive_timeout=config.keepalive_timeout, max_connections=config.max_connections,
        shutdown_timeout=config.shutdown_timeout, ssl_context=ctx, reuse_port=config.workers > 1,
    )


class EventLoop(NamedTuple):
    """The event loop chosen at start from ``loop:``, with the start-up line that names it."""

    name: str  # "uvloop" or "asyncio"
    options: dict[str, Any]  # anyio's backend_options
    note: str  # the start-up log line
    level: int = logging.INFO  # WARNING when the .pyz's own uvloop could not be used


def choose_loop(loop: str, source: str = "config") -> EventLoop:
    """uvloop for ``auto`` when it can be imported (the .pyz carries it), else asyncio, saying why.

    uvloop carries about 16 % more requests/s (bench/README.md), but a missing speed-up never
    stops a gateway: with ``auto`` every reason it cannot be used (no fitting wheel, no writable
    cache, not installed) falls back to asyncio. ``loop: uvloop`` asks for it explicitly, so there
    the same reason is a start-up error (:class:`ConfigError`, exit 1), not a silent slow-down.
    """
    if loop == "asyncio":
        return EventLoop("asyncio", {}, "event loop: asyncio (loop: asyncio)")
    try:
        import uvloop
    except ImportError as exc:  # not installed, no embedded wheel fits, or it could not be extracted
        reason = str(exc) or "uvloop cannot be imported"
        if loop == "uvloop":
            raise ConfigError(source, [f"loop: uvloop cannot be used here: {reason} "
                                       "(use loop: auto or asyncio to run without it)"]) from None
        from .wheels import archive_path

        if archive_path() is not None:  # the .pyz carries uvloop: something here kept it out
            return EventLoop("asyncio", {}, f"event loop: asyncio; uvloop unavailable: {reason}", logging.WARNING)
        # a pip install without the optional extra: the operator's choice, no warning
        return EventLoop("asyncio", {}, f"event loop: asyncio; uvloop unavailable: {reason} "
                                        "(pip install 'at-gateway[uvloop]' for about 16 % more requests/s)")
    return EventLoop("uvloop", {"use_uvloop": True}, f"event loop: uvloop {uvloop.__version__} (loop: {loop})")


def backend_options(loop: str) -> dict[str, Any]:
    """anyio's backend options for ``loop:`` (see :func:`choose_loop`)."""
    return choose_loop(loop).options


def tune_gc() -> None:
    """Keep the cyclic collector off the request path.

    Everything built before serving (config, providers, pools, modules) lives as long as the process,
    so it is frozen out of the collector's sight, and the young generation is collected less often:
    requests allocate and free many small objects, and each default gen-0 pass over the whole heap
    showed up as the c32 p99 (12 ms with the defaults, 6 ms tuned; bench/README.md).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20000, 50, 100)


#: After a second stop signal: how long what was recorded may take to reach the store before the exit.
HURRY_SECONDS = 3.0


async def serve(config: Config, *, ready: Any = None, sock: socket.socket | None = None,
                limiter: socket.socket | None = None, keyring: Keyring | None = None, shared: Any = None) -> None:
    """Serve until stopped: a first SIGTERM/SIGINT drains (up to ``shutdown_timeout``), a second one
    (the supervisor passes one on as SIGINT) stops the requests still running, a third stops waiting
    for the store. Whatever way serving ends, the store is flushed last: a second signal bounds
    that to :data:`HURRY_SECONDS`, and rows that could not be written are logged with their count.
    """
    try:
        settings = server_settings(config)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(config.source, [f"tls: cannot load certificate or key: {exc}"]) from None
    settings.sock = sock
    # The stop signals are handled from before anything opens to after the last write: outside that,
    # a second signal would be a KeyboardInterrupt (or SIGTERM's default action) that skips the flush.
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as receiver:
        services = await open_services(config, limiter, keyring, shared)
        server: Server | None = None

        def swapped(old: Gateway, fresh: Gateway) -> None:
            if server is not None:
                server.handler = fresh.handle
            tls = fresh.config.tls
            if tls is not None and settings.ssl_context is not None:
                try:  # a renewed certificate: new handshakes use it, connections already open keep theirs
                    settings.ssl_context.load_cert_chain(tls.cert_file, tls.key_file)
                except (OSError, ssl.SSLError) as exc:
                    log.error("reload: cannot load the TLS certificate or key, serving the old one: %s", exc)
            # Log lines are redacted by value: the new secrets from now on (and the old ones, for requests still
            # running on the old config). The log level follows the file too.
            setup_logging(fresh.config.log_level, Redactor([*old.config.secrets(), *fresh.config.secrets()]))

        live = Live(config, services, on_swap=swapped)
        try:
            gateway = await live.start()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await services.aclose()
            raise
        if gateway.config is not config:  # the database added secrets the log must not show
            setup_logging(config.log_level, Redactor(gateway.config.secrets()))
        server = Server(gateway.handle, settings)
        serving = anyio.CancelScope()  # the server: a second stop signal cancels it (the drain cut short)
        final = anyio.CancelScope(shield=True)  # the last writes: a second signal bounds them, a third ends them

        async def signals() -> None:
            assert server is not None
            stops = StopSignals()
            async for signum in receiver:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    if stops.count:
                        log.info("signal SIGHUP: stopping, the config is not reloaded")
                    else:
                        await live.reload_file()
                    continue
                if not stops.add(signum):
                    log.info("signal %s again at once: taken as the same stop (make and a process-group kill "
                             "both send it)", name)
                    continue
                if stops.count == 1:
                    log.info("signal %s: draining (up to %gs)", name, config.shutdown_timeout)
                    server.shutdown()
                elif stops.count == 2:
                    log.warning("signal %s again: stopping the requests still running; writing what was "
                                "recorded (up to %gs)", name, HURRY_SECONDS)
                    serving.cancel()
                    final.deadline = min(final.deadline, anyio.current_time() + HURRY_SECONDS)
                else:
                    log.warning("signal %s: not waiting for the store any longer", name)
                    final.cancel()

        failure: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(signals)
            try:
                with serving:
                    await server.bind()
                    tune_gc()
                    async with anyio.create_task_group() as serving_tg:
                        port = await serving_tg.start(server.serve)
                        tg.start_soon(live.watch)  # in the outer group: cancelled with it, once served
                        log.info("listening on %s:%s", config.host, port)
                        if ready is not None:
                            ready(port)
            except Exception as exc:  # noqa: BLE001 (raised below, as it was, after the last writes)
                failure = exc
            finally:
                with final:
                    await _close(live.gateway, services)
                tg.cancel_scope.cancel()
        if failure is not None:
            raise failure


async def _close(gateway: Gateway, services: Services) -> None:
    """The upstream pools, then the services (the store flushes what the drained requests left)."""
    try:
        await gateway.aclose()
    finally:
        await services.aclose()


def run(config: Config) -> int:
    setup_logging(config.log_level, Redactor(config.secrets()))
    try:
        server_settings(config)  # TLS files load here: fail once, now, not in every worker
    except (OSError, ssl.SSLError) as exc:
        import sys

        print(f"{config.source}: tls: cannot load certificate or key: {exc}", file=sys.stderr)
        return 1
    try:
        loop = choose_loop(config.loop, config.source)  # once, before any fork: one line however many workers
    except ConfigError as exc:
        import sys

        print(exc.render(), file=sys.stderr)
        return 1
    log.log(loop.level, "%s", loop.note)
    from .store.usage import describe_memory

    memory_note = describe_memory(config.store.path, config.workers)
    if memory_note is not None:  # once, before any fork: nothing of it survives a restart
        log.warning("%s", memory_note)
    try:
        # Once, before any fork: a wrong encryption key is one clear error and exit 1, and the stretched key
        # (and the boot secret a rotation hands the new key over with) is inherited by every worker.
        keyring = prepare_keyring(config)
    except ConfigError as exc:
        import sys

        print(exc.render(), file=sys.stderr)
        return 1
    from .resilience.state import SharedState

    # Before any fork: every worker maps the same memory, so a key cooled (or a circuit opened) in one is in all.
    shared = SharedState(shared=config.workers > 1)
    if config.metrics.enabled and config.workers > 1:
        from .metrics.share import prepare

        prepare(config)  # before any fork too: the workers publish their counts there, a scrape sums them all
    if config.workers > 1:
        from .limits import limits_possible, new_state
        from .limits.shared import Hub
        from .store.db import StoreError
        from .workers import supervise

        # One limiter state for all workers, held here: limits are per machine, not per process.
        try:
            hub = Hub(new_state(config)) if limits_possible(config) else None
        except StoreError as exc:
            import sys

            print(f"at-gateway: {exc}", file=sys.stderr)
            return 1
        return supervise(config, functools.partial(run_worker, loop=loop, keyring=keyring, shared=shared), hub=hub)
    return run_worker(config, loop=loop, keyring=keyring, shared=shared)


def run_worker(config: Config, sock: socket.socket | None = None, *, loop: EventLoop | None = None,
               limiter: socket.socket | None = None, keyring: Keyring | None = None, shared: Any = None) -> int:
    """Serve in this process until drained: the whole gateway, or one of ``workers`` (``sock``: a shared listener)."""
    try:
        options = (loop or choose_loop(config.loop, config.source)).options
        anyio.run(_main, config, sock, limiter, keyring, shared, backend="asyncio", backend_options=options)
    except ConfigError as exc:
        import sys

        print(exc.render(), file=sys.stderr)
        return 1
    except OSError as exc:
        import sys

        print(f"at-gateway: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a stop before serve() took the signals (nothing opened yet) or after it ended
        return 0
    return 0


async def _main(config: Config, sock: socket.socket | None = None, limiter: socket.socket | None = None,
                keyring: Keyring | None = None, shared: Any = None) -> None:
    await serve(config, sock=sock, limiter=limiter, keyring=keyring, shared=shared)
