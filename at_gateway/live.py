"""The gateway serving now, rebuilt when its configuration changes while it runs.

A configuration is the YAML file merged with the database's providers and routes (the admin API's,
:class:`~at_gateway.config.Overlay`). Three things change it: SIGHUP (this process re-reads the file),
``POST /admin/api/v1/reload`` (re-read here, and ``meta.file_version`` bumped so every worker re-reads
it) and an admin write in any worker (``meta.config_version``, bumped by the database's triggers). Each
worker polls the two versions every :data:`POLL_INTERVAL` off the event loop, so a change reaches all
of them within a second.

A rebuild makes a new :class:`~at_gateway.app.Gateway` over the same upstream client (pools are keyed by
origin and proxy, so providers whose connection settings did not change keep their connections), usage
meter and services; requests in flight finish on the gateway they started with. A config file that does
not validate is logged with every problem and the running configuration kept; database entries that do not
fit the file are left out one by one (logged, and in the admin health), never all of them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio

from .app import Gateway
from .config import Config, Overlay, build_config, load_config
from .errors import ConfigError
from .services import Services
from .store.catalog import usable_overlay
from .store.db import StoreError

if TYPE_CHECKING:
    from .store.catalog import Catalog

log = logging.getLogger("at_gateway.service")

POLL_INTERVAL = 0.25  # seconds between two looks at the versions: a change is applied well within 1 s
FILE_POLLS = 4  # the files are looked at every 4th poll: a changed config file is reloaded within about 1 s


def _names(dropped: tuple[tuple[str, str], ...]) -> str:
    return ", ".join(f"{kind} {name!r}" for kind, name in dropped)


def watched_files(config: Config) -> list[str]:
    """The config file and the files it names, whose change reloads it: TLS certificate and key, the
    upstream CA bundle, providers' credentials files."""
    out = [config.source]
    if config.tls is not None:
        out += [config.tls.cert_file, config.tls.key_file]
    if config.upstream.ca_file:
        out.append(config.upstream.ca_file)
    for p in config.providers.values():
        path = p.options.get("credentials_file")
        if isinstance(path, str) and path:
            out.append(path)
    return list(dict.fromkeys(out))

# What a reload changes (a new Gateway, and the log set-up); every other setting belongs to the listening
# server, the upstream pools or the store, which keep running as they started.
RELOADED = frozenset({"source", "api_keys", "providers", "routes", "default_timeout", "stream_idle_timeout",
                      "stream_keepalive_interval", "log_level", "log_bodies", "prices", "admin", "base_path",
                      "cors"})

SwapHook = Callable[[Gateway, Gateway], None]  # (old, new): the server's handler, the log redactor


class Live:
    """Holds :attr:`gateway` (the current one) and rebuilds it; also what the admin API asks to reload."""

    def __init__(self, file_config: Config, services: Services, on_swap: SwapHook | None = None) -> None:
        self.file_config = file_config  # the YAML file alone, as last read successfully
        self.services = services
        self.on_swap = on_swap
        self.started = time.time()
        self.catalog: Catalog | None = services.catalog
        self.versions = (-1, -1)
        self.overlay = Overlay()
        self.last_error: str | None = None  # the last rebuild that failed, for health details
        services.control = self
        self.gateway: Gateway

    @property
    def config(self) -> Config:
        return self.gateway.config

    async def start(self) -> Gateway:
        """The first gateway: the file merged with what the database holds now."""
        config = self.file_config
        if self.catalog is not None:
            try:
                self.versions, self.overlay = await self.catalog.call(self._read)
            except StoreError as exc:
                # Stored credentials this process cannot open (a worker restarted after a rotation by another
                # process): a start-up error naming the database and the row, never a traceback.
                raise ConfigError(self.file_config.source, [f"store: {exc}"]) from None
            try:
                fitted = usable_overlay(self.overlay, self.merge)
            except ConfigError as exc:  # the file alone does not build with nothing of the database's
                self.last_error = exc.render()
                log.error("the providers and routes in the database do not fit the config file; serving the file "
                          "alone until they are fixed: %s", exc.render())
            else:
                config = fitted.config
                if fitted.error is not None:
                    # Only the entries that do not fit are left out (a stale route must not take the others down),
                    # with the admin API up to fix them.
                    self.last_error = fitted.error.render()
                    log.error("database entries left out (%s): %s", _names(fitted.dropped), fitted.error.render())
        self.gateway = Gateway(config, services=self.services)
        return self.gateway

    def _read(self) -> tuple[tuple[int, int], Overlay]:
        catalog = self.catalog
        assert catalog is not None
        return catalog.versions(), catalog.overlay()  # overlay() follows a rotated key in its own snapshot

    def merge(self, overlay: Overlay | None = None, file_config: Config | None = None) -> Config:
        """The file (as last read) with ``overlay`` (default: the database's, as last read) merged in;
        raises :class:`ConfigError`. The admin API checks a change with this before it writes it."""
        base = file_config or self.file_config
        return build_config(base.document, base.source, overlay=self.overlay if overlay is None else overlay)

    # -- changes --------------------------------------------------------------
    async def watch(self, interval: float = POLL_INTERVAL, files_every: int = FILE_POLLS) -> None:
        """Poll the database's versions (every ``interval``) and the config file and the files it names (every
        ``files_every`` polls), and rebuild when they move (runs until cancelled)."""
        seen = self._files_state()
        polls = 0
        failing: str | None = None
        while True:
            await anyio.sleep(interval)
            polls += 1
            if self.catalog is not None:
                try:
                    await self.refresh()
                    failing = None
                except Exception as exc:  # noqa: BLE001 (a database hiccup must not end the watch)
                    if str(exc) != failing:  # said once, not every 250 ms while it lasts
                        log.error("config: cannot read the database's providers and routes: %s", exc)
                    failing = str(exc)
            if polls % files_every == 0:
                now = self._files_state()
                if now != seen:
                    changed = [path for path, state in now.items() if seen.get(path) != state]
                    log.info("config: %s changed; reloading", ", ".join(changed))
                    seen = now
                    await self.reload_file()
                    seen = self._files_state()  # what the reload read (a file named by the new config too)

    def _files_state(self) -> dict[str, tuple[int, int, int] | None]:
        """(mtime, size, inode) of the config file and every file it names (TLS, CA, credentials): a few
        stat calls a second, cheap enough for the loop."""
        out: dict[str, tuple[int, int, int] | None] = {}
        for path in watched_files(self.file_config):
            try:
                st = os.stat(path)
            except OSError:
                out[path] = None
                continue
            out[path] = (st.st_mtime_ns, st.st_size, st.st_ino)
        return out

    async def refresh(self, *, force: bool = False) -> bool:
        """Rebuild if the database changed since the last look (``force``: rebuild anyway); True if rebuilt."""
        catalog = self.catalog
        if catalog is None:
            return False
        if not force and await catalog.call(catalog.versions) == self.versions:
            return False  # the common poll: one small query, nothing decoded or decrypted
        versions, overlay = await catalog.call(self._read)
        if versions == self.versions and not force:
            return False
        file_config = self.file_config
        if versions[1] != self.versions[1] and self.versions[1] >= 0:
            try:  # another worker's admin reload: re-read the file here too
                file_config = await anyio.to_thread.run_sync(load_config, self.file_config.source)
            except ConfigError as exc:
                log.error("reload failed, keeping the running config file: %s", exc.render())
        self.versions = versions
        return self._apply(file_config, overlay)

    async def reload_file(self) -> ConfigError | None:
        """Re-read the YAML file here (SIGHUP, an admin reload); the error when the file, or the database's
        entries merged over it, do not validate (the running config is then kept)."""
        try:
            new = await anyio.to_thread.run_sync(load_config, self.file_config.source)
            config = self.merge(self.overlay, new)
        except ConfigError as exc:
            self.last_error = exc.render()
            log.error("reload failed, keeping the running config: %s", exc.render())
            return exc
        kept = [f.name for f in dataclasses.fields(Config)
                if f.compare and f.name not in RELOADED and getattr(config, f.name) != getattr(self.config, f.name)]
        if kept:
            log.warning("reload: changes to %s need a restart; the others are applied", ", ".join(kept))
        self.file_config, self.last_error = new, None
        self._swap(config)
        log.info("config reloaded from %s (%d routes)", new.source, len(config.routes))
        return None

    def _apply(self, file_config: Config, overlay: Overlay) -> bool:
        try:
            fitted = usable_overlay(overlay, lambda o: self.merge(o, file_config))
        except ConfigError as exc:
            self.last_error = exc.render()
            log.error("config change not applied, keeping the running config: %s", exc.render())
            return False
        # The whole overlay is kept (a later change may make a left-out entry fit again); what is served leaves
        # out the entries that do not fit, so a worker started later serves the same as the running ones.
        self.file_config, self.overlay = file_config, overlay
        self.last_error = fitted.error.render() if fitted.error is not None else None
        if fitted.error is not None:
            log.error("database entries left out (%s): %s", _names(fitted.dropped), fitted.error.render())
        self._swap(fitted.config)
        return True

    def _swap(self, config: Config) -> None:
        old = self.gateway
        fresh = Gateway(config, client=old.client, usage=old.usage, services=self.services)
        self.gateway = fresh
        if self.on_swap is not None:
            self.on_swap(old, fresh)
        log.info("config applied: %d providers, %d routes (%d from the database)", len(config.providers),
                 len(config.routes), sum(1 for s in config.route_sources.values() if s == "database"))

    def describe(self) -> dict[str, Any]:
        return {"started_at": self.started, "uptime_s": round(time.time() - self.started, 3),
                "config_source": self.file_config.source, "last_config_error": self.last_error,
                "config_version": self.versions[0]}
