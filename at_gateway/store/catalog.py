"""Providers and routes kept in the database (the admin API's), their credentials encrypted, and the audit log.

Tables (schema v2, :mod:`.db`): ``providers`` and ``routes`` (``name`` primary key, ``spec`` the JSON object
as the admin API accepted it, with every secret field an ``enc:v1:<kid>:...`` token when an encryption key
is set), ``audit_log``, ``settings`` (the KDF salt and cost, the current key id, a key hand-off after a
rotation). Every change to providers or routes bumps ``meta.config_version`` (triggers), which every worker
polls; ``meta.file_version`` is bumped by an admin reload so every worker re-reads the YAML file.

Secret fields of a provider spec (what ``Config.secrets()`` redacts): ``api_key``, each key of ``api_keys``
(a string, or the ``key`` of a ``{key, weight}``), every value of ``headers`` (a number too: it is stored
as its text), ``proxy`` when it carries user info. Each is encrypted on its own, bound to its row and field
as associated data (the JSON array ``["providers", <row name>, <field>, ...]``: unambiguous whatever the
names hold), so a value moved to another provider or field does not decrypt.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..config import Config, Overlay, url_without_credentials
from ..errors import ConfigError
from .crypto import (
    Cipher,
    CryptoError,
    KdfParams,
    Keyring,
    is_encrypted,
    kdf_record,
    parse_kdf,
    passphrase_problem,
    token_kid,
)
from .db import StoreError, connect

log = logging.getLogger("at_gateway.store")

# settings rows
_SALT, _KID, _HANDOFF = "kdf_salt", "key_id", "key_handoff"

FieldPath = tuple[Any, ...]  # a secret's place in a spec: ("api_key",), ("headers", name), ("api_keys", 0, "key")


def secret_fields(spec: Mapping[str, Any]) -> Iterator[tuple[FieldPath, str]]:
    """``(path, value)`` of every secret in a provider spec: ``("api_key",)``, ``("api_keys", i)`` or
    ``("api_keys", i, "key")``, ``("headers", name)``, ``("proxy",)`` (when it has user info, or is a token)."""
    if isinstance(spec.get("api_key"), str) and spec["api_key"]:
        yield ("api_key",), spec["api_key"]
    keys = spec.get("api_keys")
    if isinstance(keys, list):
        for i, item in enumerate(keys):
            if isinstance(item, str) and item:
                yield ("api_keys", i), item
            elif isinstance(item, Mapping) and isinstance(item.get("key"), str) and item["key"]:
                yield ("api_keys", i, "key"), item["key"]
    headers = spec.get("headers")
    if isinstance(headers, Mapping):
        for name, value in headers.items():
            if isinstance(value, str) and value:
                yield ("headers", name), value
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                yield ("headers", name), str(value)  # a numeric secret (a PIN, an account number) is one too
    proxy = spec.get("proxy")
    # "@" anywhere, as Config.secrets() reads it: a password holding "/" or "?" still counts
    if isinstance(proxy, str) and ("@" in proxy or is_encrypted(proxy)):
        yield ("proxy",), proxy


def _aad(name: str, path: FieldPath) -> str:
    return json.dumps(["providers", name, *(p if isinstance(p, int) else str(p) for p in path)],
                      separators=(",", ":"), ensure_ascii=False)


def _field(path: FieldPath) -> str:
    """``api_key``, ``headers.X-Org``, ``api_keys[1].key``: the field as a person reads it."""
    out = str(path[0])
    for part in path[1:]:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _where(name: str, path: FieldPath) -> str:
    return f"providers row {name!r}, field {_field(path)}"


def _set(spec: dict[str, Any], path: FieldPath, value: str) -> None:
    """``spec`` with the value at ``path`` replaced, every container on the way copied (never shared with
    the caller's spec)."""
    head = path[0]
    if len(path) == 1:
        spec[head] = value
        return
    inner = spec[head]
    copy: Any = list(inner) if isinstance(inner, list) else dict(inner)
    if len(path) == 2:
        copy[path[1]] = value
    else:
        item = dict(copy[path[1]])
        _set(item, path[2:], value)
        copy[path[1]] = item
    spec[head] = copy


def public_change(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A provider spec fit for the audit log and admin reads' neighbours: secrets replaced by ``"(set)"``."""
    out = dict(spec)
    for path, _ in secret_fields(spec):
        _set(out, path, "(set)")
    if isinstance(out.get("base_url"), str):  # a password or a key in the URL itself
        out["base_url"] = url_without_credentials(out["base_url"])
    return out


@dataclass(frozen=True)
class Fitted:
    """What :func:`usable_overlay` found: the configuration to serve, the database entries in it, the ones
    left out (``("routes", "name")``...) and every problem that left them out (None: everything fits)."""

    config: Config
    overlay: Overlay = field(repr=False)
    dropped: tuple[tuple[str, str], ...] = ()
    error: ConfigError | None = None


def _entry_key(kind: str, entry: Mapping[str, Any]) -> tuple[str, str]:
    name = entry.get("name")
    return kind, name if isinstance(name, str) else ""


def _named(overlay: Overlay, problems: list[str]) -> set[tuple[str, str]]:
    """The database entries the problems are about: a problem's path starts with the entry's, as
    ``config._merge`` names it (``routes['prod'] (database).steps[0]...``)."""
    out: set[tuple[str, str]] = set()
    for kind, entries in (("providers", overlay.providers), ("routes", overlay.routes)):
        for entry in entries:
            name = entry.get("name")
            prefix = f"{kind}[{name!r}] (database)" if isinstance(name, str) else f"{kind} (database): "
            if any(p.startswith(prefix) for p in problems):
                out.add(_entry_key(kind, entry))
    return out


def usable_overlay(overlay: Overlay, merge: Callable[[Overlay], Config]) -> Fitted:
    """The configuration ``merge(overlay)`` makes, leaving out only the database entries that do not fit
    (and then those that needed them: a route on a provider left out), never every one of them: a stale
    route in the database (its provider gone from the YAML) must not take the other stored providers and
    routes down with it at a start or a rebuild.

    Each round drops the entries the problems name and tries again; problems that name no database entry
    end it with the file alone (``Overlay()``, which the caller has checked builds). ``merge`` raises
    :class:`ConfigError` (``Live.merge`` bound to the file config); so may this, when the file alone does not
    build."""
    problems: list[str] = []
    dropped: list[tuple[str, str]] = []
    current = overlay
    source = ""
    for _ in range(len(overlay.providers) + len(overlay.routes) + 1):
        try:
            config = merge(current)
        except ConfigError as exc:
            source = exc.source
            problems += [p for p in exc.problems if p not in problems]
            named = _named(current, list(exc.problems))
            if not named:
                break
            dropped += sorted(named)
            current = Overlay(tuple(e for e in current.providers if _entry_key("providers", e) not in named),
                              tuple(e for e in current.routes if _entry_key("routes", e) not in named))
            continue
        error = ConfigError(source, problems) if problems else None
        return Fitted(config, current, tuple(dropped), error)
    every = [*(_entry_key("providers", e) for e in current.providers),
             *(_entry_key("routes", e) for e in current.routes)]
    return Fitted(merge(Overlay()), Overlay(), (*dropped, *every), ConfigError(source, problems))


class RowError(CryptoError, StoreError):
    """A stored secret that does not decrypt, with where it is (the database, the row and the field). A
    :class:`~.db.StoreError` too: whoever handles "the database cannot be used" handles this."""

    def __init__(self, where: str, reason: str, path: str | None = None) -> None:
        super().__init__(f"{path + ': ' if path else ''}{where}: {reason}")
        self.where = where
        self.reason = reason


class KeyChangedError(StoreError):
    """The database's secrets are under a key this process does not hold (rotated outside this run): a write
    of credentials, or a rotation, is refused until a restart with the new key."""


@dataclass(frozen=True)
class StoredEntry:
    """A provider or route as stored: its spec (secrets decrypted), when it was made and last changed."""

    name: str
    spec: Mapping[str, Any] = field(repr=False)  # decrypted secrets: never in a repr, a log line, a traceback
    created_at: float
    updated_at: float


class Catalog:
    """The database's providers, routes and audit log, for one process.

    One connection (``check_same_thread=False``), used by one thread at a time: every caller goes
    through :meth:`call` (a lock, then a worker thread), so the event loop never waits on sqlite.
    The sync methods below assume the caller holds that lock (they are called inside :meth:`call`).
    """

    def __init__(self, conn: sqlite3.Connection, path: str, keyring: Keyring) -> None:
        self.conn = conn
        self.path = path
        self.keyring = keyring
        self.lock = threading.Lock()
        self._unfollowable: str | None = None  # a key id whose hand-off this process cannot open (logged once)
        # The last overlay read, and the (config_version, key id) it was read at: polls that find nothing
        # changed decrypt nothing, and a key rotated outside this run leaves the gateway serving this one.
        self._overlay: tuple[tuple[int, str | None], Overlay] | None = None
        self._warned_plaintext = False  # "credentials stored in plaintext": said once per process

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a worker thread under :attr:`lock`."""
        import anyio.to_thread

        def run() -> Any:
            with self.lock:
                return fn(*args)

        return await anyio.to_thread.run_sync(run)

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    async def aclose(self) -> None:
        import anyio.to_thread

        await anyio.to_thread.run_sync(self.close)

    # -- secrets --------------------------------------------------------------
    def seal(self, spec: Mapping[str, Any], cipher: Cipher | None = None) -> dict[str, Any]:
        """``spec`` (plaintext, as the admin API accepted it) as stored: each secret encrypted, even one that
        happens to look like a token (it must come back as it was given). Without a key the secrets stay
        plaintext, and a value that looks like a token is refused: it would read back as an undecryptable one."""
        cipher = cipher or self.keyring.cipher
        out = dict(spec)
        name = str(spec["name"])
        for path, value in secret_fields(spec):
            if cipher is not None:
                _set(out, path, cipher.encrypt(value, _aad(name, path)))
            elif is_encrypted(value):
                raise StoreError(f"{self.path}: {_where(name, path)}: a value starting with 'enc:v1:' cannot be "
                                 "stored without store.encryption_key (it would read back as an encrypted one)")
            else:
                _set(out, path, value)  # as text: a numeric header value is stored as the string it is sent as
        return out

    def open(self, spec: Mapping[str, Any], cipher: Cipher | None = None, name: str | None = None) -> dict[str, Any]:
        """A stored spec with its secrets decrypted; :class:`RowError` naming the first that fails. ``name``:
        the row's name (the associated data is bound to the row; default the spec's own name)."""
        cipher = cipher or self.keyring.cipher
        out = dict(spec)
        row = str(spec.get("name")) if name is None else name
        for path, value in secret_fields(spec):
            if not is_encrypted(value):
                continue
            where = _where(row, path)
            if cipher is None:
                raise RowError(where, f"encrypted (key id {token_kid(value)}), and store.encryption_key is not set",
                               self.path)
            try:
                _set(out, path, cipher.decrypt(value, _aad(row, path)))
            except CryptoError as exc:
                raise RowError(where, str(exc), self.path) from None
        return out

    # -- reading ------------------------------------------------------------
    def versions(self) -> tuple[int, int]:
        """``(config_version, file_version)`` from ``meta``: what workers poll to know when to rebuild."""
        rows = dict(self.conn.execute(
            "SELECT name, value FROM meta WHERE name IN ('config_version', 'file_version')").fetchall())
        return int(rows.get("config_version", 0)), int(rows.get("file_version", 0))

    def _entries(self, table: str, name: str | None = None) -> list[StoredEntry]:
        sql = f"SELECT name, spec, created_at, updated_at FROM {table}"  # noqa: S608 (table: a constant)
        rows = (self.conn.execute(sql + " WHERE name = ?", (name,)) if name is not None
                else self.conn.execute(sql + " ORDER BY created_at, name")).fetchall()
        out = []
        for row_name, spec, created, updated in rows:
            try:
                data = json.loads(spec)
            except ValueError:
                raise StoreError(f"{self.path}: {table} row {row_name!r}: the stored spec is not JSON "
                                 "(damaged)") from None
            if table == "providers":
                data = self.open(data, name=row_name)
            out.append(StoredEntry(row_name, data, created, updated))
        return out

    def overlay(self) -> Overlay:
        """Every stored provider and route, secrets decrypted, from one snapshot (raises :class:`RowError`
        naming the first row that cannot be decrypted: never a part of the providers).

        The key is checked in the same snapshot: a rotation by another worker is followed before its rows are
        read. After a rotation this run cannot follow (the CLI, another gateway on the file), the last
        overlay read is answered: the gateway keeps serving what it has in memory (:meth:`follow_key`
        logged it once) until it is restarted with the new key."""
        with self._snapshot():  # one snapshot: the key id, the version and both tables
            current = self._key_is_current()
            cipher = self.keyring.cipher
            stamp = (self.versions()[0], cipher.kid if cipher is not None else None)
            if self._overlay is not None and (self._overlay[0] == stamp or not current):
                return self._overlay[1]
            if not current:
                raise KeyChangedError(f"{self.path}: the stored credentials are now encrypted with key id "
                                      f"{self._db_kid()}, which this gateway does not hold (the key was rotated "
                                      "outside this run): restart it with the new store.encryption_key")
            providers = self._entries("providers")
            routes = self._entries("routes")
        overlay = Overlay(tuple(e.spec for e in providers), tuple(e.spec for e in routes))
        self._overlay = (stamp, overlay)
        return overlay

    def providers(self) -> list[StoredEntry]:
        with self._snapshot():  # the key followed and the rows read at one state of the database
            self.follow_key()
            return self._entries("providers")

    def routes(self) -> list[StoredEntry]:
        return self._entries("routes")

    def provider(self, name: str) -> StoredEntry | None:
        with self._snapshot():
            self.follow_key()
            found = self._entries("providers", name)
        return found[0] if found else None

    def route(self, name: str) -> StoredEntry | None:
        found = self._entries("routes", name)
        return found[0] if found else None

    # -- transactions -------------------------------------------------------
    def _snapshot(self) -> AbstractContextManager[sqlite3.Connection]:
        """A read transaction (BEGIN ... COMMIT) for several statements that must see one state of the
        database; inside a transaction already open, that one (nothing begun, nothing ended)."""
        return self._joined("BEGIN")

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        """``with catalog.transaction() as conn:`` BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any error, a failed
        COMMIT too): one writer at a time across every process, and never a connection left inside a
        transaction. The admin API runs a write's checks and the write in one of these, so what it checked is
        what it writes over (two workers cannot both check one state and then both write). Inside a
        transaction already open, that one: the writes below (:meth:`put_provider`, ...) join the caller's."""
        return self._joined("BEGIN IMMEDIATE")

    def _joined(self, begin: str) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self.conn, begin)

    # -- writing (each one transaction, with its audit row) --------------------
    def _db_kid(self) -> str | None:
        row = self.conn.execute("SELECT value FROM settings WHERE name = ?", (_KID,)).fetchone()
        return str(row[0]) if row is not None else None

    def _key_is_current(self) -> bool:
        """Follow another worker's rotation if there is one; True when this process holds the key the
        database's secrets are under (or the database names none)."""
        self.follow_key()
        kid = self._db_kid()
        cipher = self.keyring.cipher
        return kid is None or (cipher is not None and cipher.kid == kid)

    def _require_current_key(self) -> None:
        """Refuse a write under a key the database no longer uses (a rotation outside this run): credentials
        would be sealed under a dead key, and after such a rotation :meth:`overlay` answers what it last read,
        so a route written now would be answered as written yet never served by any worker of this run."""
        if not self._key_is_current():
            raise KeyChangedError(f"{self.path}: the encryption key was changed outside this gateway (key id "
                                  f"{self._db_kid()}); restart the gateway with the new store.encryption_key "
                                  "before changing providers or routes")

    def _put(self, table: str, spec: Mapping[str, Any], actor: str, action: str) -> bool:
        name = str(spec["name"])
        now = time.time()
        with self.transaction() as conn:
            self._require_current_key()  # routes too: after an outside rotation nothing written here is served
            if table == "providers":
                stored = self.seal(spec)  # under the key checked just now, in this transaction
                self._warn_plaintext(spec)
            else:
                stored = dict(spec)
            old = conn.execute(f"SELECT 1 FROM {table} WHERE name = ?", (name,)).fetchone()  # noqa: S608
            conn.execute(f"INSERT INTO {table} (name, spec, created_at, updated_at) VALUES (?, ?, ?, ?) "  # noqa: S608
                         "ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at",
                         (name, json.dumps(stored, separators=(",", ":")), now, now))
            change = public_change(spec) if table == "providers" else dict(spec)
            self._audit_row(actor, f"{action}.{'create' if old is None else 'update'}", name, change)
        return old is None

    def _delete(self, table: str, name: str, actor: str, action: str) -> bool:
        with self.transaction() as conn:
            self._require_current_key()
            gone = conn.execute(f"DELETE FROM {table} WHERE name = ?", (name,)).rowcount  # noqa: S608
            if gone:
                self._audit_row(actor, f"{action}.delete", name, {})
        return bool(gone)

    @property
    def encrypts(self) -> bool:
        """Whether credentials written now are encrypted (``store.encryption_key`` is set)."""
        return self.keyring.cipher is not None

    def _warn_plaintext(self, spec: Mapping[str, Any]) -> None:
        """Once per process: a credential was just stored in plaintext (no encryption key). The start says so
        too, but a write months later deserves its own line."""
        if self._warned_plaintext or self.keyring.cipher is not None or next(secret_fields(spec), None) is None:
            return
        self._warned_plaintext = True
        log.warning("store %s: provider credentials written through the admin API are stored in plaintext "
                    "(store.encryption_key is not set): set it (e.g. ${AT_GATEWAY_ENCRYPTION_KEY}) and restart to "
                    "encrypt them", self.path)

    def put_provider(self, spec: Mapping[str, Any], actor: str) -> bool:
        """Insert or replace ``spec`` (already validated; ``spec["name"]`` is its name), secrets encrypted;
        True when it was new. The audit row holds the change with secret values left out."""
        return self._put("providers", spec, actor, "provider")

    def delete_provider(self, name: str, actor: str) -> bool:
        """False when no such stored provider."""
        return self._delete("providers", name, actor, "provider")

    def put_route(self, spec: Mapping[str, Any], actor: str) -> bool:
        return self._put("routes", spec, actor, "route")

    def delete_route(self, name: str, actor: str) -> bool:
        return self._delete("routes", name, actor, "route")

    def bump_file_version(self, actor: str) -> None:
        """An admin reload: every worker re-reads the YAML file (audited as ``config.reload``)."""
        with self.transaction() as conn:
            conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'file_version'")
            self._audit_row(actor, "config.reload", None, {})

    def _audit_row(self, actor: str, action: str, object_id: str | None, change: Mapping[str, Any]) -> None:
        self.conn.execute("INSERT INTO audit_log (time, actor, action, object, change) VALUES (?, ?, ?, ?, ?)",
                          (time.time(), actor, action, object_id,
                           json.dumps(change, separators=(",", ":"), ensure_ascii=False, default=str)))

    def audit(self, actor: str, action: str, object_id: str | None, change: Mapping[str, Any]) -> None:
        """One audit row (its own transaction unless the caller has one open). ``change`` must hold no
        secret value: callers pass what changed with secrets replaced by ``"(set)"``/``"(changed)"``."""
        if self.conn.in_transaction:
            self._audit_row(actor, action, object_id, change)
            return
        with self.transaction():
            self._audit_row(actor, action, object_id, change)

    def audit_rows(self, limit: int, before_id: int | None = None, *, actor: str | None = None,
                   action: str | None = None, object_id: str | None = None, since: float | None = None,
                   until: float | None = None) -> list[dict[str, Any]]:
        """Newest first: ``{"id", "time", "actor", "action", "object", "change"}``; ``before_id``: the page after.
        ``action`` matches a whole action or its family (``provider`` matches ``provider.create``)."""
        where, args = [], []
        for clause, value in (("id < ?", before_id), ("actor = ?", actor), ("object = ?", object_id),
                              ("time >= ?", since), ("time < ?", until)):
            if value is not None:
                where.append(clause)
                args.append(value)
        if action is not None:
            where.append("(action = ? OR action LIKE ? ESCAPE '\\')")
            args += [action, action.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + ".%"]
        sql = "SELECT id, time, actor, action, object, change FROM audit_log"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self.conn.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [{"id": r[0], "time": r[1], "actor": r[2], "action": r[3], "object": r[4],
                 "change": json.loads(r[5])} for r in rows]

    # -- the encryption key -------------------------------------------------
    def rotate_key(self, new_passphrase: str, actor: str) -> dict[str, Any]:
        """Re-encrypt every stored secret under a key stretched from ``new_passphrase`` (new salt), in one
        transaction, each new value decrypted again before the commit; hand the new key to the other
        workers (:meth:`.crypto.Keyring.wrap`, in the same transaction) and switch this process to it after
        the commit. Any failure rolls back and the old key stays in use, here and in the database.

        Raises (nothing changed then; no message holds a secret): ``ValueError`` for a passphrase the config
        would refuse; :class:`RowError` (a :class:`CryptoError`) naming the row that does not decrypt;
        ``sqlite3.Error`` when the database fails the transaction; :class:`KeyChangedError` when the key was
        rotated outside this run (a restart with the new key is the way out).
        Answers ``{"rotated": n, "key_id": ..., "previous_key_id": ..., "next_steps": [...]}``."""
        problem = passphrase_problem(new_passphrase)
        if problem is not None:
            raise ValueError(f"encryption_key: {problem}")
        params = KdfParams.fresh()
        fresh = Cipher.derive(new_passphrase, params)  # before the write lock: scrypt takes its time and memory
        with self.transaction() as conn:
            self._require_current_key()  # follows another worker's rotation first
            old = self.keyring.cipher
            rotated = _rotate_rows(conn, self.path, old, params, fresh, actor, self.keyring.wrap(fresh))
        self.keyring.cipher = fresh  # only after the commit: a failure above keeps the old key in use
        self._unfollowable = None
        _checkpoint(self.conn, self.path)
        log.info("store %s: encryption key rotated (%d secrets; key id %s)", self.path, rotated, fresh.kid)
        return {"rotated": rotated, "key_id": fresh.kid, "previous_key_id": old.kid if old else None,
                "next_steps": [
                    f"Done: every stored credential is encrypted with the new key (key id {fresh.kid}); every "
                    "worker of this gateway switches to it within a second, without a restart.",
                    "Next: set store.encryption_key (usually the AT_GATEWAY_ENCRYPTION_KEY environment "
                    "variable) to the new passphrase, before the next restart: a restart with the old "
                    "passphrase is refused (exit 1, the key does not open the stored credentials).",
                    "Then restart whenever you like; the old passphrase opens nothing any more.",
                    "This changes the key the database encrypts with, not the provider API keys themselves: to "
                    "replace a provider's key, create a new one at the provider and PATCH providers/{name}."]}

    def follow_key(self) -> bool:
        """Another worker rotated the key (``settings`` names a key id this keyring does not hold): take the
        new key from the hand-off; True when the key changed. Never raises for a hand-off it cannot open
        (a rotation by the CLI or another run of the gateway): logs once and keeps the current key, and
        :meth:`overlay` keeps answering what it last read."""
        rows = dict(self.conn.execute("SELECT name, value FROM settings WHERE name IN (?, ?)",
                                      (_KID, _HANDOFF)).fetchall())
        kid = rows.get(_KID)
        current = self.keyring.cipher
        if kid is None or (current is not None and current.kid == kid) or kid == self._unfollowable:
            return False
        try:
            self.keyring.cipher = self.keyring.unwrap(rows.get(_HANDOFF) or "", kid)
        except CryptoError:
            self._unfollowable = kid
            log.error("store %s: the encryption key was rotated outside this run of the gateway (key id %s: "
                      "`at-gateway db rotate-key`, or another gateway on this database); this gateway keeps "
                      "serving the providers it has in memory, and cannot read or store credentials changed "
                      "from now on: restart it with the new store.encryption_key", self.path, kid)
            return False
        self._unfollowable = None
        log.info("store %s: following the rotated encryption key (key id %s)", self.path, kid)
        return True


def _private(conn: sqlite3.Connection) -> sqlite3.Connection:
    """A connection that writes secrets: what it deletes or overwrites is zeroed in the file, not left in
    free space (a plaintext credential encrypted at start, the old key's tokens after a rotation)."""
    conn.execute("PRAGMA secure_delete = ON")
    return conn


def _checkpoint(conn: sqlite3.Connection, path: str) -> None:
    """Old versions of the pages just rewritten live on in the WAL until a checkpoint: copy it into the
    database and truncate it now. Best effort: a reader in the middle of a snapshot keeps the WAL (then
    the next checkpoint, at the latest when the last connection closes, does it)."""
    try:
        row = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.Error:
        row = None
    if row is None or row[0]:
        log.info("store %s: the WAL could not be checkpointed now (a reader is busy); the previous versions of "
                 "the rewritten rows leave it at the next checkpoint", path)


def _put_setting(conn: sqlite3.Connection, name: str, value: str) -> None:
    conn.execute("INSERT INTO settings (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = "
                 "excluded.value", (name, value))


def _settings(conn: sqlite3.Connection) -> dict[str, str]:
    return {str(k): str(v) for k, v in conn.execute("SELECT name, value FROM settings").fetchall()}


def _provider_rows(conn: sqlite3.Connection, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(name, spec)`` of every stored provider in name order (the order errors name "the first" in)."""
    for name, text in conn.execute("SELECT name, spec FROM providers ORDER BY name").fetchall():
        try:
            spec = json.loads(text)
        except ValueError:
            raise StoreError(f"{path}: providers row {name!r}: the stored spec is not JSON (damaged)") from None
        if not isinstance(spec, dict):
            raise StoreError(f"{path}: providers row {name!r}: the stored spec is not an object (damaged)")
        yield str(name), spec


def _rotate_rows(conn: sqlite3.Connection, path: str, old: Cipher | None, params: KdfParams, fresh: Cipher,
                 actor: str, handoff: str | None) -> int:
    """The rotation's writes, in the caller's transaction: every secret re-encrypted, the new salt, key id
    and hand-off (None: none, and a past one deleted), ``config_version`` bumped (the workers look), the
    audit row. The count of secrets."""
    rotated = reencrypt(conn, old, fresh, path)
    _put_setting(conn, _SALT, kdf_record(params))
    _put_setting(conn, _KID, fresh.kid)
    if handoff is not None:
        _put_setting(conn, _HANDOFF, handoff)
    else:
        conn.execute("DELETE FROM settings WHERE name = ?", (_HANDOFF,))
    conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'config_version'")
    conn.execute("INSERT INTO audit_log (time, actor, action, object, change) VALUES (?, ?, ?, ?, ?)",
                 (time.time(), actor, "encryption_key.rotate", fresh.kid,
                  json.dumps({"secrets": rotated, "from_key_id": old.kid if old else None}, separators=(",", ":"))))
    return rotated


def reencrypt(conn: sqlite3.Connection, old: Cipher | None, fresh: Cipher, path: str | None = None) -> int:
    """Every stored secret under ``fresh`` (decrypted with ``old``; plaintext ones encrypted), each new value
    decrypted again and compared before it is written; the count. Runs in the caller's transaction: a
    :class:`RowError` (naming ``path``, the row and the field) leaves the rollback to it."""
    count = 0
    for name, spec in _provider_rows(conn, path or "the database"):
        changed = dict(spec)
        for field_path, value in secret_fields(spec):
            where = _where(name, field_path)
            aad = _aad(name, field_path)
            if is_encrypted(value):
                if old is None:
                    raise RowError(where, f"encrypted (key id {token_kid(value)}), and there is no current key "
                                          "to decrypt it", path)
                try:
                    value = old.decrypt(value, aad)
                except CryptoError as exc:
                    raise RowError(where, str(exc), path) from None
            sealed = fresh.encrypt(value, aad)
            if fresh.decrypt(sealed, aad) != value:  # never commit a value that does not come back
                raise RowError(where, "the re-encrypted value does not decrypt to the same text", path)
            _set(changed, field_path, sealed)
            count += 1
        if changed != spec:
            conn.execute("UPDATE providers SET spec = ? WHERE name = ?",
                         (json.dumps(changed, separators=(",", ":")), name))
    return count


def _encrypt_plaintext(conn: sqlite3.Connection, cipher: Cipher, path: str) -> int:
    """Encrypt the stored secrets that are plaintext (written while no key was set); the count."""
    count = 0
    for name, spec in _provider_rows(conn, path):
        changed = dict(spec)
        for field_path, value in secret_fields(spec):
            if not is_encrypted(value):
                _set(changed, field_path, cipher.encrypt(value, _aad(name, field_path)))
                count += 1
        if changed != spec:
            conn.execute("UPDATE providers SET spec = ? WHERE name = ?",
                         (json.dumps(changed, separators=(",", ":")), name))
    return count


def _first_bad_row(conn: sqlite3.Connection, cipher: Cipher | None, path: str) -> RowError | None:
    """The first stored secret (in name order) that ``cipher`` cannot decrypt (None: all decrypt)."""
    for name, spec in _provider_rows(conn, path):
        for field_path, value in secret_fields(spec):
            if not is_encrypted(value):
                continue
            where = _where(name, field_path)
            if cipher is None:
                return RowError(where, f"encrypted (key id {token_kid(value)})")
            try:
                cipher.decrypt(value, _aad(name, field_path))
            except CryptoError as exc:
                return RowError(where, str(exc))
    return None


def _plaintext_count(conn: sqlite3.Connection, path: str) -> int:
    return sum(1 for _, spec in _provider_rows(conn, path)
               for _, value in secret_fields(spec) if not is_encrypted(value))


def _cipher_for(conn: sqlite3.Connection, passphrase: str | None, settings: Mapping[str, str],
                create_salt: bool) -> Cipher | None:
    """The key ``passphrase`` gives with the database's salt (made now when missing and ``create_salt``;
    without a salt and without ``create_salt``: None, nothing can be encrypted under it)."""
    if not passphrase:
        return None
    record = settings.get(_SALT)
    if record is None:
        if not create_salt:
            return None
        params = KdfParams.fresh()
        _put_setting(conn, _SALT, kdf_record(params))
    else:
        params = parse_kdf(record)
    return Cipher.derive(passphrase, params)


def _wrong_key(path: str, bad: RowError, cipher: Cipher | None, stored_kid: str | None, what: str) -> StoreError:
    if cipher is None:
        return StoreError(f"{path}: the stored provider credentials are encrypted, and store.encryption_key is "
                          f"not set; the first: {bad.where} ({bad.reason}). Set store.encryption_key to the "
                          "passphrase they were encrypted with")
    ids = f" (the database's key id is {stored_kid}, {what} gives {cipher.kid})" if stored_kid else ""
    return StoreError(f"{path}: {what} does not open the stored credentials{ids}; the first that fails: "
                      f"{bad.where}: {bad.reason}. Use the passphrase they were encrypted with (after a "
                      "rotation: the new one)")


@contextmanager
def transaction(conn: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> Iterator[sqlite3.Connection]:
    """``begin`` ... COMMIT on a connection in autocommit mode, or the caller's transaction when one is open
    (its commit or rollback). Any error, a failed COMMIT too, rolls back: a connection is never left inside a
    transaction (the catalog's is shared by every admin call of the process)."""
    if conn.in_transaction:
        yield conn
        return
    conn.execute(begin)
    try:
        yield conn
        conn.execute("COMMIT")
    finally:
        if conn.in_transaction:  # an error, or a COMMIT that failed
            conn.execute("ROLLBACK")


def prepare(path: str, passphrase: str | None, source: str) -> Keyring:
    """At start, once (before any worker forks): open the database, create the salt if missing, stretch the key,
    check that every stored secret decrypts (else :class:`~.db.StoreError` naming the database and the first
    row that fails, for an exit 1), encrypt plaintext secrets found when a key is set, warn when stored
    credentials are plaintext, and delete a past run's key hand-off (its boot secret died with that run).
    One transaction: two starts at once do not both make a salt. The keyring it returns goes to every worker."""
    conn = _private(connect(path))
    try:
        with transaction(conn):
            settings = _settings(conn)
            cipher = _cipher_for(conn, passphrase, settings, create_salt=True)
            bad = _first_bad_row(conn, cipher, path)
            if bad is not None:
                raise _wrong_key(path, bad, cipher, settings.get(_KID), "store.encryption_key")
            plaintext = _plaintext_count(conn, path)
            if cipher is not None:
                if settings.get(_KID) != cipher.kid:
                    _put_setting(conn, _KID, cipher.kid)
                if plaintext:
                    _encrypt_plaintext(conn, cipher, path)
            else:
                # Nothing is encrypted (checked above): no key id to name, and none for the workers to follow.
                conn.execute("DELETE FROM settings WHERE name = ?", (_KID,))
                if plaintext:
                    log.warning("store %s: %d provider credential(s) are stored in plaintext: set "
                                "store.encryption_key (e.g. ${AT_GATEWAY_ENCRYPTION_KEY}) to encrypt them", path,
                                plaintext)
                else:
                    log.info("store %s: store.encryption_key is not set: provider credentials written through "
                             "the admin API would be stored in plaintext", path)
            conn.execute("DELETE FROM settings WHERE name = ?", (_HANDOFF,))
        if cipher is not None and plaintext:
            _checkpoint(conn, path)  # the plaintext's old pages out of the WAL too
            log.info("store %s: encrypted %d stored credential(s) that were plaintext", path, plaintext)
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot check the stored credentials: {exc}") from None
    except StoreError:
        raise
    except CryptoError as exc:  # a damaged salt row
        raise StoreError(f"{path}: {exc}") from None
    finally:
        conn.close()
    return Keyring(cipher)


def rotate_database(path: str, passphrase: str | None, new_passphrase: str, actor: str = "cli") -> dict[str, Any]:
    """``at-gateway db rotate-key``: the rotation of :meth:`Catalog.rotate_key` from outside the gateway, in
    one transaction, decrypting with ``passphrase`` (the config's current key; None: the stored credentials
    are plaintext). No hand-off (no running gateway could open one: their boot secret is theirs), and a past
    one is deleted. Raises ``ValueError`` for an unusable new passphrase, :class:`~.db.StoreError` (naming
    the database and the first row that fails) for anything else; nothing is changed then."""
    problem = passphrase_problem(new_passphrase)
    if problem is not None:
        raise ValueError(f"the new passphrase {problem}")
    params = KdfParams.fresh()
    fresh = Cipher.derive(new_passphrase, params)
    conn = _private(connect(path))
    try:
        with transaction(conn):
            settings = _settings(conn)
            old = _cipher_for(conn, passphrase, settings, create_salt=False)
            bad = _first_bad_row(conn, old, path)
            if bad is not None:
                raise _wrong_key(path, bad, old, settings.get(_KID), "the config's store.encryption_key")
            rotated = _rotate_rows(conn, path, old, params, fresh, actor, None)
        _checkpoint(conn, path)
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: the rotation failed and was rolled back (the old key still opens "
                         f"everything): {exc}") from None
    except StoreError:
        raise
    except CryptoError as exc:  # a damaged salt row
        raise StoreError(f"{path}: {exc}") from None
    finally:
        conn.close()
    log.info("store %s: encryption key rotated (%d secrets; key id %s)", path, rotated, fresh.kid)
    return {"rotated": rotated, "key_id": fresh.kid, "previous_key_id": old.kid if old else None}


def open_catalog(path: str, keyring: Keyring) -> Catalog:
    """This process's catalog on the database at ``path`` (migrated)."""
    conn = _private(connect(path, check_same_thread=False))
    return Catalog(conn, path, keyring)
