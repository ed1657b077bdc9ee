"""Admin API: ``config`` (the effective configuration, secrets masked), ``reload`` (the YAML file read again, as
SIGHUP does, in every worker), ``health`` (this worker's details) and ``rotate-key`` (the stored credentials
re-encrypted under a new passphrase, every worker switched to it).

Nothing here shows a secret: gateway keys, admin tokens and the encryption key appear as ``"(set)"``, provider
secrets masked as the ``providers`` reads mask them, and errors name what failed, never a value.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import sqlite3
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from .. import __version__
from ..config import Config, Overlay
from ..errors import Conflict, GatewayError
from ..logs import quote
from ..store.crypto import CryptoError, passphrase_problem
from ..store.db import StoreError, schema_version
from .api import AdminRequest, Answer, Route, invalid, is_busy, store_busy
from .catalog import control, current, mask_base_url, only, render_provider, render_route

log = logging.getLogger("at_gateway.admin")

SET = "(set)"
MIN_PASSPHRASE = 16  # characters: a new encryption key shorter than this is refused
MAX_PASSPHRASE = 4096
# Fields of Config rendered on their own below (secrets, the merged entries) or not at all (the raw document).
_OWN = frozenset({"api_keys", "admin", "store", "providers", "routes", "provider_sources", "route_sources",
                  "document"})


def _plain(value: Any) -> Any:
    """A config value as JSON: dataclasses as objects, tuples as lists, money as exact decimal strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, frozenset, set)):
        return [_plain(v) for v in value]
    if isinstance(value, Decimal):
        return str(value)
    return value


def render_config(config: Config, file_config: Config, overlay: Overlay | None) -> dict[str, Any]:
    """The effective configuration as ``GET config`` shows it: every secret masked or ``"(set)"``, each provider
    and route with its source."""
    out: dict[str, Any] = {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)
                           if f.name not in _OWN}
    out["api_keys"] = [SET] * len(config.api_keys)
    forward = config.admin.forward_auth
    out["admin"] = {
        "tokens": [SET] * len(config.admin.tokens),
        "forward_auth": None if forward is None else {**_plain(forward), "address": mask_base_url(forward.address)},
        "max_body_size": config.admin.max_body_size,
    }
    out["store"] = {"path": config.store.path, "encryption_key": SET if config.store.encryption_key else None}
    out["providers"] = [render_provider(config, name, file_config, overlay) for name in config.providers]
    out["routes"] = [render_route(config, name, file_config, overlay) for name in config.routes]
    return out


async def get_config(req: AdminRequest) -> Answer:
    """``GET config``: the YAML file merged with the database, as this worker serves it now."""
    only(req, ())
    gateway, file_config, overlay = current(req)
    return Answer({"object": "config", **render_config(gateway.config, file_config, overlay)})


async def reload(req: AdminRequest) -> Answer:
    """``POST reload``: re-read the YAML file here, then have every worker re-read it; an invalid file is a 400
    listing every problem, and every worker keeps its running configuration."""
    only(req, ())
    req.json(allowed=())
    live = control(req)
    if live is None:
        raise Conflict("this gateway cannot reload its file (it was not started by `serve`)", code="not_live")
    error = await live.reload_file()
    if error is not None:
        problems = list(error.problems)
        raise invalid(problems, f"{error.source}: the config file is not valid, the running configuration is kept: "
                                f"{len(problems)} problem(s): " + "; ".join(problems))
    catalog = getattr(req.gateway.services, "catalog", None)
    if catalog is not None:
        try:
            await catalog.call(catalog.bump_file_version, req.actor)  # the other workers re-read it (audited)
        except (StoreError, sqlite3.Error) as exc:
            if is_busy(exc):  # a retry tells them
                raise store_busy("this worker reloaded its file, the other workers were not told yet") from None
            raise GatewayError(f"reloaded here, but the other workers could not be told (the database): {exc}; "
                               "send SIGHUP to the gateway", status=500, code="reload_incomplete") from None
    config = live.config
    return Answer({"object": "config.reload", "reloaded": True, "source": live.file_config.source,
                   "providers": len(config.providers), "routes": len(config.routes),
                   "database_providers": sum(1 for s in config.provider_sources.values() if s == "database"),
                   "database_routes": sum(1 for s in config.route_sources.values() if s == "database")})


def build_commit() -> str | None:
    """The commit a .pyz was built from (at_gateway/_build.py, written by the build); None in a checkout."""
    try:
        module = importlib.import_module("at_gateway._build")
    except ImportError:
        return None
    commit = getattr(module, "COMMIT", None)
    return commit if isinstance(commit, str) else None


async def _database(req: AdminRequest) -> dict[str, Any]:
    catalog = getattr(req.gateway.services, "catalog", None)
    if catalog is None:
        return {"path": req.gateway.config.store.path, "persistent": False, "reachable": None,
                "schema_version": None}

    def look() -> dict[str, Any]:
        config_version, file_version = catalog.versions()
        return {"schema_version": schema_version(catalog.conn), "config_version": config_version,
                "file_version": file_version}

    out: dict[str, Any] = {"path": os.path.abspath(catalog.path), "persistent": True}
    cipher = catalog.keyring.cipher
    out["encryption"] = {"enabled": cipher is not None, "key_id": cipher.kid if cipher is not None else None}
    try:
        out.update(await catalog.call(look), reachable=True, error=None)
    except (StoreError, sqlite3.Error) as exc:
        out.update(reachable=False, schema_version=None, error=quote(req.gateway.redact, str(exc), 300))
    return out


async def health(req: AdminRequest) -> Answer:
    """``GET health``: this worker's version, uptime, pid, the database's state and each provider's last error
    (requests answered by this worker; each worker has its own)."""
    only(req, ())
    gateway, _, _ = current(req)
    live = control(req)
    described = live.describe() if live is not None else {}
    last_errors = gateway.usage.last_errors
    providers = {name: {"type": pc.type, "source": gateway.config.provider_sources.get(name, "config"),
                        "last_error": _last_error(last_errors.get(name))}
                 for name, pc in gateway.config.providers.items()}
    return Answer({
        "object": "health", "status": "ok",
        "version": __version__, "commit": build_commit(),
        "pid": os.getpid(), "workers": gateway.config.workers,
        "started_at": _iso(described["started_at"]) if "started_at" in described else None,
        "uptime_s": described.get("uptime_s"),
        "config": {"source": described.get("config_source", gateway.config.source),
                   "version": described.get("config_version"),
                   "last_error": live.last_error if live is not None else None,
                   "providers": len(gateway.config.providers), "routes": len(gateway.config.routes)},
        "database": await _database(req),
        "providers": providers,
    })


def _iso(stamp: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(stamp, dt.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _last_error(entry: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if entry is None:
        return None
    return {**entry, "time": _iso(entry["time"])}


async def rotate_key(req: AdminRequest) -> Answer:
    """``POST rotate-key {"encryption_key": "new passphrase"}``: every stored secret re-encrypted in one
    transaction (each checked before the commit), every worker switched; the answer says what to do next
    (change store.encryption_key before the next restart). Any failure changes nothing."""
    only(req, ())
    body = req.json(allowed=("encryption_key",), required=("encryption_key",))
    new = body["encryption_key"]
    if not isinstance(new, str) or not MIN_PASSPHRASE <= len(new) <= MAX_PASSPHRASE or not new.strip():
        raise invalid([f"body.encryption_key: must be a passphrase of {MIN_PASSPHRASE} to {MAX_PASSPHRASE} "
                       "characters (e.g. openssl rand -base64 32)"])
    problem = passphrase_problem(new)  # the store's own rule (no NUL, ...): a 400, not a failed rotation
    if problem is not None:
        raise invalid([f"body.encryption_key: {problem}"])
    catalog = req.catalog
    live = control(req)

    def safe(exc: Exception) -> str:
        return str(exc).replace(new, "(the new key)")  # never the passphrase, even if a message held it

    try:
        result: dict[str, Any] = await req.db(catalog.rotate_key, new, req.actor)
    except (CryptoError, sqlite3.Error, ValueError) as exc:  # a row that does not decrypt (RowError) too
        raise GatewayError(f"the encryption key was not rotated (rolled back, the current key stays in use): "
                           f"{safe(exc)}", status=500, code="rotate_key_failed") from None
    except StoreError as exc:  # the database's key changed under this process (another one rotated it)
        raise Conflict(f"the encryption key was not rotated (nothing changed, the current key stays in use): "
                       f"{safe(exc)}", code="rotate_key_conflict") from None
    if live is not None:
        try:
            await live.refresh(force=True)  # this worker's providers rebuilt under the new key now
        except Exception as exc:  # noqa: BLE001 (the rotation is committed: the answer must say it happened)
            log.error("rotate-key: the key was rotated, but this worker could not rebuild from the database now "
                      "(its watch retries): %s", safe(exc))
    return Answer({"object": "encryption_key.rotate", **result})


ROUTES: list[Route] = [
    ("GET", ("config",), get_config),
    ("POST", ("reload",), reload),
    ("GET", ("health",), health),
    ("POST", ("rotate-key",), rotate_key),
]

__all__ = ["ROUTES", "build_commit", "render_config"]
