"""Admin API: ``clients``, the client keys of the store (``atg_<id>_<secret>``), managed while the gateway runs.

The same keys, fields and rules as ``at-gateway keys``: :class:`~at_gateway.store.keys.KeyStore` does the
writing, on the catalog's connection, so every change bumps ``keys_version`` and every worker's key cache
serves it within a second. The secret is in exactly two answers (``POST clients`` and ``POST
clients/{id}/rotate``); every read is :func:`~at_gateway.store.keys_cli.as_dict`'s shape (no secret, no
hash) with today's usage. Each write and its audit row are one transaction: a key nobody could see the
secret of (the audit failed, the answer was never sent) is never left behind.
"""

from __future__ import annotations

import argparse
import sqlite3
import time
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

from ..config import LIMIT_KEYS, Config, Limits
from ..errors import BadRequest, Conflict, NotFound
from ..store.catalog import transaction
from ..store.keys import (
    BUDGET_PERIODS,
    ID_LENGTH,
    MAX_COUNT,
    MAX_EXPIRES_AT,
    KeyStore,
    KeyStoreError,
    StoredKey,
)
from ..store.keys_cli import _budget, _expiry, _period_start, as_dict
from ..store.usage import today as today_in
from .api import AdminRequest, Answer, Route, invalid, listing

#: What ``POST clients`` takes: the settings of ``at-gateway keys create``.
CREATE_FIELDS = ("name", "routes", "limits", "budget", "budget_period", "max_tokens", "system_prompt", "metadata",
                 "expires_at")
#: What ``PATCH clients/{id}`` takes: the same, and the state (revoking is ``DELETE``, and final).
UPDATE_FIELDS = (*CREATE_FIELDS, "state")
#: ``state`` filter values: the stored states and ``expired`` (an active key past its expiry).
STATES = ("active", "disabled", "revoked", "expired")
#: The settings an audit row of an update compares (as the reads render them).
_AUDITED = ("name", "state", "routes", "limits", "budget_usd", "budget_period", "max_tokens", "system_prompt",
            "metadata", "expires_at")
_MAX_ROUTES = 1000
_MAX_PATTERN = 256
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")


# -- the body --------------------------------------------------------------------------------------------

def _count(value: Any, path: str, problems: list[str]) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_COUNT:
        problems.append(f"{path}: must be a whole number from 1 to {MAX_COUNT} (or null)")
        return None
    return value


def _settings(body: Mapping[str, Any], *, update: bool) -> tuple[dict[str, Any], list[str]]:
    """The body as :class:`KeyStore` arguments, and every problem with its path (``body.limits.rpm: ...``).

    On an update only the fields given are changed, and ``null`` clears one (routes: every route again,
    limits: the config's defaults, budget: none, expires_at: never)."""
    out: dict[str, Any] = {}
    problems: list[str] = []
    for name, value in body.items():
        path = f"body.{name}"
        if name == "name":
            if not isinstance(value, str) or not value.strip():
                problems.append(f"{path}: must be a non-empty string" + (" (a key always has a name)"
                                                                         if update and value is None else ""))
            else:
                out["name"] = value.strip()
        elif name == "routes":
            if value is None:
                out["routes"] = []
            elif not isinstance(value, list):
                problems.append(f"{path}: must be a list of route names or glob patterns (such as \"gpt-*\")")
            elif len(value) > _MAX_ROUTES:
                problems.append(f"{path}: at most {_MAX_ROUTES} patterns")
            else:
                bad = [i for i, p in enumerate(value) if not isinstance(p, str) or not p or len(p) > _MAX_PATTERN]
                problems += [f"{path}[{i}]: must be a non-empty string of at most {_MAX_PATTERN} characters"
                             for i in bad]
                if not bad:
                    out["routes"] = list(value)
        elif name == "limits":
            if value is None:
                limits: dict[str, Any] = dict.fromkeys(LIMIT_KEYS)
            elif not isinstance(value, dict):
                problems.append(f"{path}: must be an object with any of {', '.join(LIMIT_KEYS)}")
                continue
            else:
                limits = {}
                for k, v in value.items():
                    if k not in LIMIT_KEYS:
                        problems.append(f"{path}.{k}: unknown field (allowed: {', '.join(LIMIT_KEYS)})")
                    else:
                        limits[k] = _count(v, f"{path}.{k}", problems)
            out["limits"] = limits if update else Limits(**{k: v for k, v in limits.items() if v is not None})
        elif name == "budget":
            if value is None:
                out["budget_nanousd"] = None
            elif isinstance(value, bool) or not isinstance(value, (int, float, str)):
                problems.append(f"{path}: must be an amount in USD (a number, or a string such as \"2.50\")")
            else:
                try:  # str() of a JSON number is its shortest exact decimal: 0.1 is 100000000 nano-USD, not more
                    out["budget_nanousd"] = _budget(str(value))
                except argparse.ArgumentTypeError as exc:
                    problems.append(f"{path}: {exc}")
        elif name == "budget_period":
            if value is not None and value not in BUDGET_PERIODS:
                problems.append(f"{path}: must be one of {', '.join(BUDGET_PERIODS)} (or null)")
            else:
                out["budget_period"] = value
        elif name == "max_tokens":
            out["max_tokens"] = _count(value, path, problems)
        elif name == "system_prompt":
            if value is not None and not isinstance(value, str):
                problems.append(f"{path}: must be a string (or null)")
            else:
                out["system_prompt"] = value or None
        elif name == "metadata":
            if value is not None and not isinstance(value, dict):
                problems.append(f'{path}: must be a JSON object, such as {{"team": "search"}} (or null)')
            else:
                out["metadata"] = value or {}
        elif name == "expires_at":
            out["expires_at"] = _expires(value, path, problems)
        elif name == "state":
            if value not in ("active", "disabled"):
                problems.append(f"{path}: must be active or disabled (revoking is DELETE clients/{{id}}, and final)")
            else:
                out["state"] = value
    if not update and "budget_period" in out and out.get("budget_nanousd") is None and out["budget_period"]:
        problems.append("body.budget_period: needs a budget")
    return out, problems


def _expires(value: Any, path: str, problems: list[str]) -> float | None:
    """Unix seconds, an ISO date or time (UTC unless it says), or ``30d``/``12h``/``2w`` from now; in the future."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        problems.append(f"{path}: must be a time: unix seconds, an ISO date/time or 30d (or null: never)")
        return None
    if isinstance(value, str):
        if value.strip().lower() in ("none", "null", "-", "never"):
            problems.append(f"{path}: use null for a key that never expires")
            return None
        try:
            return _expiry(value)
        except argparse.ArgumentTypeError as exc:
            problems.append(f"{path}: {exc}")
            return None
    if not 0 <= value <= MAX_EXPIRES_AT:  # NaN fails too (the JSON decoder refuses it anyway)
        problems.append(f"{path}: must be a unix time before 9999-12-31T23:59:59Z")
    elif value <= time.time():
        problems.append(f"{path}: is in the past")
    else:
        return float(value)
    return None


# -- reads -----------------------------------------------------------------------------------------------

def _usd(nanousd: int) -> str:
    """Nano-dollars as an exact decimal string (``0.000000750``): never through a float."""
    return f"{Decimal(nanousd).scaleb(-9):f}"


def _usage(conn: sqlite3.Connection, ids: list[str], first_day: str) -> dict[str, dict[str, Any]]:
    """Requests, tokens and cost per key since ``first_day`` (inclusive), for the keys of one page."""
    out: dict[str, dict[str, Any]] = {}
    for start in range(0, len(ids), 500):  # sqlite's bound-parameter limit is 999 on old builds
        part = ids[start:start + 500]
        # Index usage_daily_key_day (key_id, day): one range per key.
        sql = ("SELECT key_id, sum(requests), sum(prompt_tokens) + sum(completion_tokens), sum(cost_nanousd), "
               f"sum(unpriced) FROM usage_daily WHERE key_id IN ({','.join('?' * len(part))}) AND day >= ? "  # noqa: S608
               "GROUP BY key_id")
        for kid, requests, tokens, cost, unpriced in conn.execute(sql, (*part, first_day)):
            out[kid] = _usage_item(requests, tokens, cost, unpriced)
    return out


def _usage_item(requests: Any = 0, tokens: Any = 0, cost: Any = 0, unpriced: Any = 0) -> dict[str, Any]:
    cost = int(cost or 0)
    return {"requests": int(requests or 0), "tokens": int(tokens or 0), "cost_nanousd": cost, "cost_usd": _usd(cost),
            "unpriced": int(unpriced or 0)}


def _render(conn: sqlite3.Connection, config: Config, keys: list[StoredKey], *, period: bool = False
            ) -> list[dict[str, Any]]:
    """Keys as admin reads show them: ``as_dict`` (no secret, no hash) with today's usage (days in
    ``budget_timezone``, as quotas count them) and, for one key with a budget, the budget period's."""
    day = today_in(config.budget_timezone)
    usage = _usage(conn, [s.key.id for s in keys], day.isoformat())
    out = []
    for s in keys:
        spent = None
        if period and s.key.budget_nanousd is not None:
            first = _period_start(day, s.key.budget_period or "month").isoformat()
            spent = _usage(conn, [s.key.id], first).get(s.key.id) or _usage_item()
        out.append({"object": "client", **as_dict(s, config, usage.get(s.key.id) or _usage_item(), spent)})
    return out


def _audited(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: d[k] for k in _AUDITED if k in d}


def _diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """What an update changed, setting by setting, as ``{"from": old, "to": new}`` (never the secret:
    the rendered key holds none)."""
    return {k: {"from": before.get(k), "to": after.get(k)} for k in _AUDITED if before.get(k) != after.get(k)}


def _not_found(key_id: str) -> NotFound:
    # Echo the id only when it is shaped like one: a whole key pasted into the URL must not come back.
    if len(key_id) == ID_LENGTH and set(key_id) <= _ID_CHARS:
        return NotFound(f"no client with id {key_id!r} (GET clients lists them)", code="client_not_found")
    return NotFound(f"no client with that id: ids are {ID_LENGTH} characters a-z0-9, as GET clients shows them "
                    "(the id, not the key itself)", code="client_not_found")


def _get(store: KeyStore, key_id: str) -> StoredKey:
    try:
        return store.get(key_id)
    except KeyStoreError:
        raise _not_found(key_id) from None


class _Unchanged(Exception):
    """An update that changes nothing: rolled back, answered with the key as it is."""

    def __init__(self, answer: dict[str, Any]) -> None:
        super().__init__("unchanged")
        self.answer = answer


def _atomic(conn: sqlite3.Connection, fn: Callable[[], Any]) -> Any:
    """``fn()`` and the audit row it writes in one transaction (the connection is in autocommit mode). Any
    failure, a failed COMMIT too (the disk full, the database busy), rolls back: the catalog's connection,
    which every admin call shares, is never left inside a transaction."""
    with transaction(conn):
        return fn()


def _page_sql(state: str | None, name: str | None, after: list[Any] | None, limit: int, now: float
              ) -> tuple[str, list[Any]]:
    where: list[str] = []
    args: list[Any] = []
    if state == "expired":
        where.append("state = 'active' AND expires_at IS NOT NULL AND expires_at <= ?")
        args.append(now)
    elif state == "active":
        where.append("state = 'active' AND (expires_at IS NULL OR expires_at > ?)")
        args.append(now)
    elif state is not None:
        where.append("state = ?")
        args.append(state)
    if name:
        where.append("instr(lower(name), lower(?)) > 0")  # a substring, without LIKE's wildcards
        args.append(name)
    if after is not None:
        where.append("(created_at > ? OR (created_at = ? AND id > ?))")
        args += [after[0], after[0], after[1]]
    # No index: keys is a small table (one row per client), scanned and sorted (created_at, id).
    sql = "SELECT id FROM keys" + (" WHERE " + " AND ".join(where) if where else "") + \
        " ORDER BY created_at, id LIMIT ?"
    return sql, [*args, limit + 1]


# -- handlers --------------------------------------------------------------------------------------------

async def list_clients(req: AdminRequest) -> Answer:
    """``GET clients?state=&name=&limit=&cursor=``: oldest first (created_at, then id)."""
    limit, after = req.page()
    state = req.q_str("state", choices=STATES)
    name = req.q_str("name")
    if after is not None and not (len(after) == 2 and isinstance(after[0], (int, float))
                                  and not isinstance(after[0], bool) and isinstance(after[1], str)):
        raise BadRequest("query parameter cursor: not a cursor of GET clients (use next_cursor as it came)",
                         code="invalid_query")
    catalog = req.catalog
    config = req.gateway.config

    def read() -> tuple[list[dict[str, Any]], list[Any] | None]:
        conn = catalog.conn
        store = KeyStore(conn)
        sql, args = _page_sql(state, name, after, limit, time.time())
        with transaction(conn, "BEGIN"):  # one snapshot: the page and its usage agree
            ids = [r[0] for r in conn.execute(sql, args)]
            keys = [store.get(i) for i in ids[:limit]]
            data = _render(conn, config, keys)
        more = len(ids) > limit
        return data, [keys[-1].created_at, keys[-1].key.id] if more else None

    data, next_values = await req.db(read)
    return Answer(listing(data, next_values))


async def create_client(req: AdminRequest) -> Answer:
    """``POST clients``: 201 with the key object and ``"key"``, the only answer that ever holds it."""
    body = req.json(allowed=CREATE_FIELDS, required=("name",))
    changes, problems = _settings(body, update=False)
    if problems:
        raise invalid(problems)
    catalog, actor, config = req.catalog, req.actor, req.gateway.config

    def write() -> tuple[dict[str, Any], str]:
        conn = catalog.conn

        def run() -> tuple[dict[str, Any], str]:
            stored, secret = KeyStore(conn).create(**changes)
            d = _render(conn, config, [stored], period=True)[0]
            catalog.audit(actor, "client.create", stored.key.id, _audited(d))
            return d, secret

        return _atomic(conn, run)  # type: ignore[no-any-return]

    d, secret = await _write(req, write)
    return Answer({"key": secret, **d}, status=201)


async def get_client(req: AdminRequest) -> Answer:
    """``GET clients/{id}``: one key, with today's usage and (with a budget) the budget period's."""
    key_id = req.params["id"]
    catalog, config = req.catalog, req.gateway.config

    def read() -> dict[str, Any]:
        return _render(catalog.conn, config, [_get(KeyStore(catalog.conn), key_id)], period=True)[0]

    return Answer(await req.db(read))


async def update_client(req: AdminRequest) -> Answer:
    """``PATCH clients/{id}``: the settings given (null clears one) and the state (active | disabled)."""
    key_id = req.params["id"]
    body = req.json(allowed=UPDATE_FIELDS)
    if not body:
        raise invalid([f"body: nothing to change (give any of {', '.join(UPDATE_FIELDS)})"])
    changes, problems = _settings(body, update=True)
    if problems:
        raise invalid(problems)
    state = changes.pop("state", None)
    catalog, actor, config = req.catalog, req.actor, req.gateway.config

    def write() -> dict[str, Any]:
        conn = catalog.conn

        def run() -> dict[str, Any]:
            store = KeyStore(conn)
            current = _get(store, key_id)
            before = _render(conn, config, [current])[0]
            if current.key.state == "revoked":
                raise Conflict(f"client {key_id} is revoked: it cannot be changed (create a new one)",
                               code="client_revoked")
            if changes.get("budget_period", "") is None and \
                    changes.get("budget_nanousd", current.key.budget_nanousd) is not None:
                changes["budget_period"] = "month"  # null clears to the default period while a budget stays
            stored = store.update(key_id, **changes) if changes else current
            if state is not None:
                stored = store.enable(key_id) if state == "active" else store.disable(key_id)
            after = _render(conn, config, [stored], period=True)[0]
            change = _diff(before, after)
            if not change:  # the same values again: the row is left as it was (updated_at too), no audit row
                raise _Unchanged(after)
            catalog.audit(actor, "client.update", key_id, change)
            return after

        try:
            return _atomic(conn, run)  # type: ignore[no-any-return]
        except _Unchanged as same:
            return same.answer

    return Answer(await _write(req, write))


async def revoke_client(req: AdminRequest) -> Answer:
    """``DELETE clients/{id}``: revoked for good (the row stays, so its usage and request log keep their key)."""
    key_id = req.params["id"]
    catalog, actor, config = req.catalog, req.actor, req.gateway.config

    def write() -> dict[str, Any]:
        conn = catalog.conn

        def run() -> dict[str, Any]:
            store = KeyStore(conn)
            before = _get(store, key_id).state()
            after = _render(conn, config, [store.revoke(key_id)], period=True)[0]
            if before != "revoked":
                catalog.audit(actor, "client.revoke", key_id, {"state": {"from": before, "to": "revoked"}})
            return after

        return _atomic(conn, run)  # type: ignore[no-any-return]

    return Answer(await _write(req, write))


async def rotate_client(req: AdminRequest) -> Answer:
    """``POST clients/{id}/rotate``: a new secret for the same id and settings, shown in this answer only;
    the old one stops working as soon as the key caches reload (within a second)."""
    key_id = req.params["id"]
    req.json(allowed=())  # no body, or an empty object
    catalog, actor, config = req.catalog, req.actor, req.gateway.config

    def write() -> tuple[dict[str, Any], str]:
        conn = catalog.conn

        def run() -> tuple[dict[str, Any], str]:
            store = KeyStore(conn)
            if _get(store, key_id).key.state == "revoked":
                raise Conflict(f"client {key_id} is revoked: it cannot be rotated (create a new one)",
                               code="client_revoked")
            stored, secret = store.rotate(key_id)
            catalog.audit(actor, "client.rotate", key_id, {"secret": "(changed)"})
            return _render(conn, config, [stored], period=True)[0], secret

        return _atomic(conn, run)  # type: ignore[no-any-return]

    d, secret = await _write(req, write)
    return Answer({"key": secret, **d})


async def _write(req: AdminRequest, fn: Callable[[], Any]) -> Any:
    """Run a write; the store's own refusals (a value it checks, a revoked key) as 400 / 409."""
    try:
        return await req.db(fn)
    except ValueError as exc:  # KeyStore's checks name the field first ("budget: must be ...")
        raise invalid([f"body.{exc}"]) from None
    except KeyStoreError as exc:
        raise Conflict(str(exc), code="client_revoked") from None


ROUTES: list[Route] = [
    ("GET", ("clients",), list_clients),
    ("POST", ("clients",), create_client),
    ("GET", ("clients", "{id}"), get_client),
    ("PATCH", ("clients", "{id}"), update_client),
    ("DELETE", ("clients", "{id}"), revoke_client),
    ("POST", ("clients", "{id}", "rotate"), rotate_client),
]

__all__ = ["CREATE_FIELDS", "ROUTES", "STATES", "UPDATE_FIELDS"]
