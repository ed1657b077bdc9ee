"""Client keys: ``atg_<id>_<secret>``, stored as the id and the SHA-256 of the secret.

The id (12 characters, ``[a-z0-9]``) is public: it names the key in logs, metrics and the request
log. The secret (32 random bytes, URL-safe base64 without padding) is shown once, when the key is
made or rotated, and only its hash is kept, so a copy of the database lets nobody call.

:class:`KeyStore` changes keys on a sqlite connection (the CLI, later the admin API). Each change
bumps ``meta.keys_version`` (a trigger in the schema). :class:`KeyCache` is what a running gateway
asks: every key in memory, reloaded by a background thread when that version moves, so every worker
sees a change made by the CLI within a poll interval, and a request costs one dict lookup, one
SHA-256 and one constant-time compare, never a query.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import LIMIT_KEYS, Limits
from ..errors import Unauthorized

log = logging.getLogger("at_gateway.store")

KEY_PREFIX = "atg_"
ID_LENGTH = 12
SECRET_BYTES = 32
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
_SHOWN_SECRET = 4  # characters of the secret in the display prefix: tells a rotated key from the old one
_ID_START = len(KEY_PREFIX)
_ID_END = _ID_START + ID_LENGTH
_MIN_LENGTH = _ID_END + 2  # atg_ + id + _ + at least one character of secret
BUDGET_PERIODS = ("day", "week", "month")
STATES = ("active", "disabled", "revoked")
POLL_INTERVAL = 0.25  # seconds between two looks at keys_version: a change is seen well within 1 s
_ERROR_LOG_INTERVAL = 60.0

#: The largest limit, token cap and count a key may have (2^53: exact as a JSON number everywhere).
MAX_COUNT = 2**53
#: The largest budget, in nano-dollars ($1e9): far below what sqlite's 64-bit integers hold.
MAX_BUDGET_NANOUSD = 10**18
#: The last expiry a key may have: 9999-12-31T23:59:59Z (the calendar's end for dates and time stamps).
MAX_EXPIRES_AT = 253402300799.0
#: What an unknown id's secret is compared with: the same work as for a known id (see KeyCache.verify).
_NO_DIGEST = hashlib.sha256(b"no such key").digest()

_WWW_AUTH = (b"www-authenticate", b'Bearer realm="at-gateway"')
_BAD = "Incorrect API key provided"


@dataclass(frozen=True)
class ClientKey:
    """One client key as the running gateway sees it (never the secret, never its hash)."""

    id: str
    name: str
    prefix: str  # for display: atg_<id>_<first characters of the secret>
    state: str = "active"  # active | disabled | revoked
    routes: tuple[str, ...] = ()  # glob patterns over route names; () = every route
    limits: Limits = field(default_factory=Limits)  # None fields: the config's limits: defaults apply
    budget_nanousd: int | None = None
    budget_period: str | None = None  # day | week | month
    max_tokens: int | None = None
    system_prompt: str | None = None
    metadata: Any = None  # free JSON (dict), shown in lists and passed to the request log
    expires_at: float | None = None  # unix time


@dataclass(frozen=True)
class StoredKey:
    """A key with its bookkeeping, for listings (the CLI, the admin API)."""

    key: ClientKey
    created_at: float
    updated_at: float

    def state(self, now: float | None = None) -> str:
        """``active``, ``disabled``, ``revoked`` or ``expired`` (an active key past its expiry)."""
        k = self.key
        if k.state == "active" and k.expires_at is not None and k.expires_at <= (time.time() if now is None else now):
            return "expired"
        return k.state


class KeyStoreError(LookupError):
    """No such key, or a change it cannot take (enabling a revoked key); the message says which."""


# -- the key itself ------------------------------------------------------------

def new_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(ID_LENGTH))


def new_secret() -> str:
    return base64.urlsafe_b64encode(os.urandom(SECRET_BYTES)).rstrip(b"=").decode("ascii")


def hash_secret(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


def format_key(key_id: str, secret: str) -> str:
    return f"{KEY_PREFIX}{key_id}_{secret}"


def display_prefix(key_id: str, secret: str) -> str:
    return f"{KEY_PREFIX}{key_id}_{secret[:_SHOWN_SECRET]}"


def split_key(presented: bytes) -> tuple[str, bytes] | None:
    """``(id, secret)`` of ``atg_<id>_<secret>``; None for anything else."""
    if len(presented) < _MIN_LENGTH or presented[:_ID_START] != b"atg_" or presented[_ID_END:_ID_END + 1] != b"_":
        return None
    raw_id = presented[_ID_START:_ID_END]
    if not raw_id.isascii() or not raw_id.isalnum() or raw_id != raw_id.lower():
        return None
    return raw_id.decode("ascii"), presented[_ID_END + 1:]


# -- rows ----------------------------------------------------------------------

_COLUMNS = ("id, name, secret_hash, prefix, state, routes, rpm, rph, rpd, tpm, tpd, budget_nanousd, budget_period, "
            "max_tokens, system_prompt, metadata, expires_at, created_at, updated_at")


def _stamp(value: Any, unreadable: float | None) -> float | None:
    """A stored time as a float; ``unreadable`` for what is not a number (a row written by hand)."""
    if value is None:
        return None
    try:
        stamp = float(value)
    except (TypeError, ValueError):
        return unreadable
    return stamp if stamp == stamp else unreadable  # NaN


def _from_row(row: tuple[Any, ...]) -> tuple[bytes, StoredKey]:
    (key_id, name, secret_hash, prefix, state, routes, rpm, rph, rpd, tpm, tpd, budget, period, max_tokens,
     system_prompt, metadata, raw_expires, created_at, updated_at) = row
    expires_at = _stamp(raw_expires, 0.0)  # an unreadable expiry: expired, allowing nothing rather than everything
    try:
        patterns = tuple(str(p) for p in json.loads(routes or "[]"))
    except (ValueError, TypeError):
        patterns = ("\x00unreadable",)  # a damaged row allows nothing rather than everything
    try:
        meta = json.loads(metadata or "{}")
    except ValueError:
        meta = {}
    key = ClientKey(id=key_id, name=name, prefix=prefix, state=state, routes=patterns,
                    limits=Limits(rpm=rpm, rph=rph, rpd=rpd, tpm=tpm, tpd=tpd), budget_nanousd=budget,
                    budget_period=period, max_tokens=max_tokens, system_prompt=system_prompt, metadata=meta,
                    expires_at=expires_at)
    return bytes(secret_hash), StoredKey(key, _stamp(created_at, 0.0) or 0.0, _stamp(updated_at, 0.0) or 0.0)


def _normalise_routes(routes: Iterable[str]) -> list[str]:
    out = [str(r) for r in routes if str(r)]
    return [] if not out or "*" in out else out  # "*" (or nothing) = every route


#: Fields :meth:`KeyStore.update` takes (``limits`` as a :class:`Limits` whose None fields are kept, or a
#: mapping of limit name to value where None clears it).
UPDATABLE = frozenset({"name", "routes", "limits", "budget_nanousd", "budget_period", "max_tokens", "system_prompt",
                       "metadata", "expires_at"})


class KeyStore:
    """Creating and changing client keys on a connection from :func:`at_gateway.store.db.connect`.

    Every method is one short transaction; the schema's triggers bump ``keys_version`` so running
    gateways reload. Secrets are returned once (:meth:`create`, :meth:`rotate`) and never stored.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def create(self, name: str, *, routes: Iterable[str] = (), limits: Limits | None = None,
               budget_nanousd: int | None = None, budget_period: str | None = None, max_tokens: int | None = None,
               system_prompt: str | None = None, metadata: Mapping[str, Any] | None = None,
               expires_at: float | None = None) -> tuple[StoredKey, str]:
        """A new key and the key itself (``atg_<id>_<secret>``), the only time it can be seen."""
        _check(name=name, budget_nanousd=budget_nanousd, budget_period=budget_period, max_tokens=max_tokens,
               expires_at=expires_at)
        lim = limits or Limits()
        _check_limits((k, getattr(lim, k)) for k in LIMIT_KEYS)
        if budget_nanousd is not None and budget_period is None:
            budget_period = "month"
        now = time.time()
        secret = new_secret()
        for _ in range(5):  # 36^12 ids: a collision is all but impossible, but never fatal
            key_id = new_id()
            try:
                self.conn.execute(
                    f"INSERT INTO keys ({_COLUMNS}) VALUES (?,?,?,?,'active',?,?,?,?,?,?,?,?,?,?,?,?,?,?)",  # noqa: S608
                    (key_id, name, hash_secret(secret.encode()), display_prefix(key_id, secret),
                     json.dumps(_normalise_routes(routes)), lim.rpm, lim.rph, lim.rpd, lim.tpm, lim.tpd,
                     budget_nanousd, budget_period, max_tokens, system_prompt,
                     json.dumps(dict(metadata or {}), separators=(",", ":")), expires_at, now, now))
            except sqlite3.IntegrityError:
                continue
            return self.get(key_id), format_key(key_id, secret)
        raise KeyStoreError("could not find a free key id")  # pragma: no cover

    def list(self) -> list[StoredKey]:
        rows = self.conn.execute(f"SELECT {_COLUMNS} FROM keys ORDER BY created_at, id").fetchall()  # noqa: S608
        return [_from_row(r)[1] for r in rows]

    def get(self, key_id: str) -> StoredKey:
        row = self.conn.execute(f"SELECT {_COLUMNS} FROM keys WHERE id = ?", (key_id,)).fetchone()  # noqa: S608
        if row is None:
            raise KeyStoreError(f"no key with id {key_id[:40]!r} (at-gateway keys list shows them)")
        return _from_row(row)[1]

    def update(self, key_id: str, **changes: Any) -> StoredKey:
        """Change the given settings (see :data:`UPDATABLE`); the others, the secret and the usage stay."""
        unknown = set(changes) - UPDATABLE
        if unknown:
            raise TypeError(f"cannot update {', '.join(sorted(unknown))}")
        current = self.get(key_id).key
        if current.state == "revoked":
            raise KeyStoreError(f"key {key_id} is revoked: it cannot be changed (create a new one)")
        _check(**{k: v for k, v in changes.items()
                  if k in ("name", "budget_nanousd", "budget_period", "max_tokens", "expires_at")})
        sets: dict[str, Any] = {}
        for name, value in changes.items():
            if name == "routes":
                sets["routes"] = json.dumps(_normalise_routes(value))
            elif name == "limits":
                items: list[tuple[str, Any]] = list(value.items()) if isinstance(value, Mapping) else [
                    (k, getattr(value, k)) for k in LIMIT_KEYS if getattr(value, k) is not None]
                for k, _v in items:
                    if k not in LIMIT_KEYS:
                        raise TypeError(f"unknown limit {k!r}")
                _check_limits(items)
                sets.update(items)
            elif name == "metadata":
                sets["metadata"] = json.dumps(dict(value or {}), separators=(",", ":"))
            else:
                sets[name] = value
        if "budget_nanousd" in sets and sets["budget_nanousd"] is not None and current.budget_period is None \
                and sets.get("budget_period") is None:
            sets["budget_period"] = "month"
        if not sets:
            return self.get(key_id)
        sets["updated_at"] = time.time()
        assignments = ", ".join(f"{k} = ?" for k in sets)
        self.conn.execute(f"UPDATE keys SET {assignments} WHERE id = ?", (*sets.values(), key_id))  # noqa: S608
        return self.get(key_id)

    def _set_state(self, key_id: str, state: str) -> StoredKey:
        current = self.get(key_id).key
        if current.state == "revoked" and state != "revoked":
            raise KeyStoreError(f"key {key_id} is revoked: revoking is final (create a new key)")
        if current.state != state:
            self.conn.execute("UPDATE keys SET state = ?, updated_at = ? WHERE id = ?", (state, time.time(), key_id))
        return self.get(key_id)

    def disable(self, key_id: str) -> StoredKey:
        """Refused (401 saying so) until :meth:`enable`; settings and usage kept."""
        return self._set_state(key_id, "disabled")

    def enable(self, key_id: str) -> StoredKey:
        return self._set_state(key_id, "active")

    def revoke(self, key_id: str) -> StoredKey:
        """Refused for good (the row stays, so its usage and request log keep their key)."""
        return self._set_state(key_id, "revoked")

    def rotate(self, key_id: str) -> tuple[StoredKey, str]:
        """A new secret for the same id, settings and usage; the old secret stops working at once."""
        current = self.get(key_id).key
        if current.state == "revoked":
            raise KeyStoreError(f"key {key_id} is revoked: it cannot be rotated (create a new one)")
        secret = new_secret()
        self.conn.execute("UPDATE keys SET secret_hash = ?, prefix = ?, updated_at = ? WHERE id = ?",
                          (hash_secret(secret.encode()), display_prefix(key_id, secret), time.time(), key_id))
        return self.get(key_id), format_key(key_id, secret)


def _check(**fields: Any) -> None:
    """Refuse values the gateway could not use, with a message naming the field."""
    if "name" in fields and (not isinstance(fields["name"], str) or not fields["name"].strip()):
        raise ValueError("name: must be a non-empty string")
    budget = fields.get("budget_nanousd")
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 0):
        raise ValueError("budget: must be an amount in USD, 0 or more")
    if budget is not None and budget > MAX_BUDGET_NANOUSD:
        raise ValueError(f"budget: must be at most {MAX_BUDGET_NANOUSD // 10**9} USD")
    period = fields.get("budget_period")
    if period is not None and period not in BUDGET_PERIODS:
        raise ValueError(f"budget_period: must be one of {', '.join(BUDGET_PERIODS)}")
    mt = fields.get("max_tokens")
    if mt is not None and (not isinstance(mt, int) or isinstance(mt, bool) or not 1 <= mt <= MAX_COUNT):
        raise ValueError(f"max_tokens: must be a whole number from 1 to {MAX_COUNT}")
    expires = fields.get("expires_at")
    if expires is not None and (not isinstance(expires, (int, float)) or isinstance(expires, bool)
                                or not 0 <= expires <= MAX_EXPIRES_AT):  # NaN fails the comparison too
        raise ValueError("expires_at: must be a unix time before 9999-12-31T23:59:59Z")


def _check_limits(items: Iterable[tuple[str, Any]]) -> None:
    for name, value in items:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or not 1 <= value <= MAX_COUNT):
            raise ValueError(f"{name}: must be a whole number from 1 to {MAX_COUNT} (or none)")


# -- what a running gateway asks -----------------------------------------------

def _refused(reason: str) -> Unauthorized:
    return Unauthorized(f"{_BAD}: {reason}", headers=[_WWW_AUTH])


class KeyCache:
    """Every client key in memory, kept current by a thread polling ``keys_version``.

    :meth:`verify` runs on the event loop and touches no database: it reads one dict that the thread
    replaces whole (an atomic assignment) after each reload.
    """

    def __init__(self, conn: sqlite3.Connection, path: str, poll_interval: float = POLL_INTERVAL) -> None:
        self._conn = conn  # owned by the poller thread after the first load
        self.path = path
        self.poll_interval = poll_interval
        self.version = -1
        self.keys: dict[str, tuple[bytes, ClientKey]] = {}
        self.reloads = 0
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._last_error_log = 0.0
        self._errors = 0
        self._load()
        self._thread = threading.Thread(target=self._poll, name="at-gateway-keys", daemon=True)
        self._thread.start()

    # the request path
    def verify(self, presented: bytes) -> ClientKey | None:
        if presented[:_ID_START] != b"atg_":
            return None  # not a client key: the gateway's own 401 (as for a wrong YAML key)
        parts = split_key(presented)
        entry = self.keys.get(parts[0]) if parts is not None else None
        # The secret is hashed and compared for an unknown id too (with a digest no secret has), so
        # neither the answer nor the time it takes says which ids exist.
        secret = parts[1] if parts is not None else presented
        matched = hmac.compare_digest(hashlib.sha256(secret).digest(), entry[0] if entry is not None else _NO_DIGEST)
        if entry is None or not matched:
            # Unknown id and wrong secret read the same: nothing is learnt about which ids exist.
            raise _refused("no such key (check it was copied whole; a rotated key's old secret no longer works)")
        key = entry[1]
        if key.state != "active":
            if key.state == "disabled":
                raise _refused(f"the key {key.id} is disabled (at-gateway keys enable {key.id} turns it back on)")
            raise _refused(f"the key {key.id} was revoked")
        if key.expires_at is not None and key.expires_at <= time.time():
            try:
                when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(key.expires_at))
            except (OverflowError, OSError, ValueError):  # a stored time no calendar has
                when = "an unreadable date"
            raise _refused(f"the key {key.id} expired on {when}")
        return key

    # the poller
    def _load(self) -> None:
        conn = self._conn
        conn.execute("BEGIN")  # one read snapshot: the version and the rows it stands for
        try:
            version = conn.execute("SELECT value FROM meta WHERE name = 'keys_version'").fetchone()
            rows = conn.execute(f"SELECT {_COLUMNS} FROM keys").fetchall()  # noqa: S608
        finally:
            conn.execute("COMMIT")
        fresh: dict[str, tuple[bytes, ClientKey]] = {}
        for row in rows:
            digest, stored = _from_row(row)
            fresh[stored.key.id] = (digest, stored.key)
        with self._changed:
            self.keys = fresh
            self.version = int(version[0]) if version else 0
            self.reloads += 1
            self._changed.notify_all()

    def _current_version(self) -> int:
        row = self._conn.execute("SELECT value FROM meta WHERE name = 'keys_version'").fetchone()
        return int(row[0]) if row else 0

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                if self._current_version() != self.version:
                    self._load()
                if self._errors:
                    log.info("store %s: client keys readable again", self.path)
                    self._errors = 0
            except sqlite3.Error as exc:
                self._errors += 1
                now = time.monotonic()
                if now - self._last_error_log >= _ERROR_LOG_INTERVAL:
                    self._last_error_log = now
                    log.warning("store %s: cannot reload client keys (%s); serving the last %d loaded "
                                "(%d failed attempt(s))", self.path, exc, len(self.keys), self._errors)

    def wait_for_version(self, version: int, timeout: float) -> bool:
        """Block until keys of at least ``version`` are loaded (tools and tests; never the request path)."""
        with self._changed:
            return self._changed.wait_for(lambda: self.version >= version, timeout)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        try:
            self._conn.close()
        except sqlite3.Error:
            pass

    async def aclose(self) -> None:
        import anyio.to_thread

        await anyio.to_thread.run_sync(self.close)


def open_cache(path: str, poll_interval: float = POLL_INTERVAL) -> KeyCache:
    """A :class:`KeyCache` on the database at ``path`` (migrated if needed), its poller started."""
    from . import db

    conn = db.connect(path, check_same_thread=False)
    try:
        return KeyCache(conn, path, poll_interval)
    except BaseException:
        conn.close()
        raise


async def open_key_cache(config: Any) -> KeyCache | None:
    """The client keys of ``config.store``, served from memory; None for an in-memory store (no tool
    could have made keys in it, so only the config's keys can call)."""
    from . import db

    path = config.store.path
    if path == db.MEMORY:
        return None
    import anyio.to_thread

    return await anyio.to_thread.run_sync(open_cache, path)
