"""Providers and routes kept in the database (the admin API's), their credentials encrypted, and the audit log.

Tables (schema v2, :mod:`.db`): ``providers`` and ``routes`` (``name`` primary key, ``spec`` the JSON object
as the admin API accepted it, with every secret field an ``enc:v1:<kid>:...`` token when an encryption key
is set), ``audit_log``, ``settings`` (the KDF salt, the current key id, a key hand-off after a rotation).
Every change to providers or routes bumps ``meta.config_version`` (triggers), which every worker polls;
``meta.file_version`` is bumped by an admin reload so every worker re-reads the YAML file.

Secret fields of a provider spec: ``api_key``, every value of ``headers``, ``proxy`` when it carries
user info. Each is encrypted on its own, bound to its row and field (``providers/<name>/api_key``,
``providers/<name>/headers/<Header-Name>``, ``providers/<name>/proxy``) as associated data, so a value
moved to another provider or field does not decrypt.
"""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..config import Overlay
from .crypto import Cipher, CryptoError, Keyring, is_encrypted, new_salt, token_kid
from .db import StoreError, connect

log = logging.getLogger("at_gateway.store")

# settings rows
_SALT, _KID, _HANDOFF = "kdf_salt", "key_id", "key_handoff"


def _has_userinfo(url: str) -> bool:
    return "@" in url.split("://", 1)[-1].split("/", 1)[0]


def secret_fields(spec: Mapping[str, Any]) -> Iterator[tuple[tuple[str, ...], str]]:
    """``(path, value)`` of every secret in a provider spec: ``("api_key",)``, ``("headers", name)``, ``("proxy",)``."""
    if isinstance(spec.get("api_key"), str) and spec["api_key"]:
        yield ("api_key",), spec["api_key"]
    headers = spec.get("headers")
    if isinstance(headers, Mapping):
        for name, value in headers.items():
            if isinstance(value, str) and value:
                yield ("headers", str(name)), value
    proxy = spec.get("proxy")
    if isinstance(proxy, str) and (_has_userinfo(proxy) or is_encrypted(proxy)):
        yield ("proxy",), proxy


def _aad(name: str, path: tuple[str, ...]) -> str:
    return "/".join(("providers", name, *path))


def _set(spec: dict[str, Any], path: tuple[str, ...], value: str) -> None:
    if len(path) == 1:
        spec[path[0]] = value
    else:
        spec[path[0]] = {**spec[path[0]], path[1]: value}


def public_change(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A provider spec fit for the audit log and admin reads' neighbours: secrets replaced by ``"(set)"``."""
    out = dict(spec)
    for path, _ in secret_fields(spec):
        _set(out, path, "(set)")
    return out


class RowError(CryptoError):
    """A stored secret that does not decrypt, with where it is."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where


@dataclass(frozen=True)
class StoredEntry:
    """A provider or route as stored: its spec (secrets decrypted), when it was made and last changed."""

    name: str
    spec: Mapping[str, Any]
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
        """``spec`` as stored: each secret encrypted (plaintext without a key)."""
        cipher = cipher or self.keyring.cipher
        out = dict(spec)
        if cipher is None:
            return out
        name = str(spec["name"])
        for path, value in secret_fields(spec):
            if not is_encrypted(value):
                _set(out, path, cipher.encrypt(value, _aad(name, path)))
        return out

    def open(self, spec: Mapping[str, Any], cipher: Cipher | None = None) -> dict[str, Any]:
        """A stored spec with its secrets decrypted; :class:`RowError` naming the first that fails."""
        cipher = cipher or self.keyring.cipher
        out = dict(spec)
        name = str(spec.get("name"))
        for path, value in secret_fields(spec):
            if not is_encrypted(value):
                continue
            where = f"providers row {name!r}, field {'.'.join(path)}"
            if cipher is None:
                raise RowError(where, "encrypted, and store.encryption_key is not set")
            try:
                _set(out, path, cipher.decrypt(value, _aad(name, path)))
            except CryptoError as exc:
                raise RowError(where, str(exc)) from None
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
            data = json.loads(spec)
            if table == "providers":
                data = self.open(data)
            out.append(StoredEntry(row_name, data, created, updated))
        return out

    def overlay(self) -> Overlay:
        """Every stored provider and route, secrets decrypted (raises :class:`RowError` naming the first row
        that cannot be decrypted)."""
        self.conn.execute("BEGIN")  # one snapshot of both tables
        try:
            providers = self._entries("providers")
            routes = self._entries("routes")
        finally:
            self.conn.execute("COMMIT")
        return Overlay(tuple(e.spec for e in providers), tuple(e.spec for e in routes))

    def providers(self) -> list[StoredEntry]:
        return self._entries("providers")

    def routes(self) -> list[StoredEntry]:
        return self._entries("routes")

    def provider(self, name: str) -> StoredEntry | None:
        found = self._entries("providers", name)
        return found[0] if found else None

    def route(self, name: str) -> StoredEntry | None:
        found = self._entries("routes", name)
        return found[0] if found else None

    # -- writing (each one transaction, with its audit row) --------------------
    def _transaction(self) -> Any:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any error): one writer, a short transaction."""
        catalog = self

        class _Tx:
            def __enter__(self) -> sqlite3.Connection:
                catalog.conn.execute("BEGIN IMMEDIATE")
                return catalog.conn

            def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
                if kind is None:
                    catalog.conn.execute("COMMIT")
                elif catalog.conn.in_transaction:
                    catalog.conn.execute("ROLLBACK")

        return _Tx()

    def _check_key_current(self) -> None:
        """Refuse to write secrets under a key the database no longer uses (a rotation by another process)."""
        cipher = self.keyring.cipher
        row = self.conn.execute("SELECT value FROM settings WHERE name = ?", (_KID,)).fetchone()
        if cipher is not None and row is not None and row[0] != cipher.kid:
            raise StoreError(f"{self.path}: the encryption key was changed by another process (key id {row[0]}); "
                             "restart the gateway with the new store.encryption_key before writing credentials")

    def _put(self, table: str, spec: Mapping[str, Any], actor: str, action: str) -> bool:
        name = str(spec["name"])
        stored = self.seal(spec) if table == "providers" else dict(spec)
        now = time.time()
        with self._transaction() as conn:
            if table == "providers":
                self._check_key_current()
            old = conn.execute(f"SELECT 1 FROM {table} WHERE name = ?", (name,)).fetchone()  # noqa: S608
            conn.execute(f"INSERT INTO {table} (name, spec, created_at, updated_at) VALUES (?, ?, ?, ?) "  # noqa: S608
                         "ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at",
                         (name, json.dumps(stored, separators=(",", ":")), now, now))
            change = public_change(spec) if table == "providers" else dict(spec)
            self._audit_row(actor, f"{action}.{'create' if old is None else 'update'}", name, change)
        return old is None

    def _delete(self, table: str, name: str, actor: str, action: str) -> bool:
        with self._transaction() as conn:
            gone = conn.execute(f"DELETE FROM {table} WHERE name = ?", (name,)).rowcount  # noqa: S608
            if gone:
                self._audit_row(actor, f"{action}.delete", name, {})
        return bool(gone)

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
        with self._transaction() as conn:
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
        with self._transaction():
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
        workers (:meth:`.crypto.Keyring.wrap`) and switch this process to it. Any failure rolls back and
        the old key stays in use. Answers ``{"rotated": n, "key_id": ..., "next_steps": [...]}``."""
        salt = new_salt()
        fresh = Cipher.derive(new_passphrase, salt)
        old = self.keyring.cipher
        with self._transaction() as conn:
            self._check_key_current()
            rotated = reencrypt(conn, old, fresh)
            _put_setting(conn, _SALT, base64.b64encode(salt).decode())
            _put_setting(conn, _KID, fresh.kid)
            _put_setting(conn, _HANDOFF, self.keyring.wrap(fresh))
            conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'config_version'")  # workers: follow_key
            self._audit_row(actor, "encryption_key.rotate", fresh.kid,
                            {"secrets": rotated, "from_key_id": old.kid if old else None})
        self.keyring.cipher = fresh  # only after the commit: a failure above keeps the old key in use
        log.info("store %s: encryption key rotated (%d secrets; key id %s)", self.path, rotated, fresh.kid)
        return {"rotated": rotated, "key_id": fresh.kid, "previous_key_id": old.kid if old else None,
                "next_steps": [
                    "Every worker of this gateway now uses the new key; nothing needs a restart now.",
                    "Now change store.encryption_key in the config (or AT_GATEWAY_ENCRYPTION_KEY) to the new "
                    "passphrase, before the next restart: a restart with the old one is refused (wrong key).",
                    "Keep the old passphrase until that is done; it opens nothing after this rotation."]}

    def follow_key(self) -> bool:
        """Another worker rotated the key (``settings`` names a key id this keyring does not hold): take the
        new key from the hand-off; True when the key changed. Never raises for a hand-off it cannot open
        (a rotation by another process, the CLI): logs once and keeps the current key."""
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
            log.error("store %s: the encryption key was rotated outside this gateway (key id %s); stored "
                      "credentials changed from now on cannot be read here: restart with the new "
                      "store.encryption_key", self.path, kid)
            return False
        log.info("store %s: following the rotated encryption key (key id %s)", self.path, kid)
        return True


def _put_setting(conn: sqlite3.Connection, name: str, value: str) -> None:
    conn.execute("INSERT INTO settings (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = "
                 "excluded.value", (name, value))


def reencrypt(conn: sqlite3.Connection, old: Cipher | None, fresh: Cipher) -> int:
    """Every stored secret under ``fresh`` (decrypted with ``old``; plaintext ones encrypted), each new value
    decrypted again and compared before it is written; the count. Runs in the caller's transaction."""
    count = 0
    for name, text in conn.execute("SELECT name, spec FROM providers ORDER BY name").fetchall():
        spec = json.loads(text)
        changed = dict(spec)
        for path, value in secret_fields(spec):
            where = f"providers row {name!r}, field {'.'.join(path)}"
            aad = _aad(name, path)
            if is_encrypted(value):
                if old is None:
                    raise RowError(where, "encrypted, and no current key to decrypt it")
                try:
                    value = old.decrypt(value, aad)
                except CryptoError as exc:
                    raise RowError(where, str(exc)) from None
            sealed = fresh.encrypt(value, aad)
            if fresh.decrypt(sealed, aad) != value:  # never commit a value that does not come back
                raise RowError(where, "the re-encrypted value does not decrypt to the same text")
            _set(changed, path, sealed)
            count += 1
        if changed != spec:
            conn.execute("UPDATE providers SET spec = ? WHERE name = ?", (json.dumps(changed, separators=(",", ":")),
                                                                         name))
    return count


def _first_bad_row(conn: sqlite3.Connection, cipher: Cipher | None) -> str | None:
    """Where the first stored secret that ``cipher`` cannot decrypt is (None: all decrypt)."""
    for name, text in conn.execute("SELECT name, spec FROM providers ORDER BY name").fetchall():
        spec = json.loads(text)
        for path, value in secret_fields(spec):
            if not is_encrypted(value):
                continue
            where = f"providers row {name!r}, field {'.'.join(path)}"
            if cipher is None:
                return f"{where} is encrypted (key id {token_kid(value)}), and store.encryption_key is not set"
            try:
                cipher.decrypt(value, _aad(name, path))
            except CryptoError as exc:
                return f"{where}: {exc}"
    return None


def prepare(path: str, passphrase: str | None, source: str) -> Keyring:
    """At start, once (before any worker forks): open the database, create the salt if missing, stretch the key,
    check that every stored secret decrypts (else :class:`~.db.StoreError` naming the database and the first
    row that fails, for an exit 1), encrypt plaintext secrets found when a key is set, and warn when stored
    credentials are (or would be) plaintext. The keyring it returns goes to every worker."""
    conn = connect(path)
    try:
        conn.execute("BEGIN IMMEDIATE")  # one look and one change: two starts at once do not both salt
        try:
            settings = dict(conn.execute("SELECT name, value FROM settings").fetchall())
            cipher = None
            if passphrase:
                salt_text = settings.get(_SALT)
                if salt_text is None:
                    salt_text = base64.b64encode(new_salt()).decode()
                    _put_setting(conn, _SALT, salt_text)
                cipher = Cipher.derive(passphrase, base64.b64decode(salt_text))
            bad = _first_bad_row(conn, cipher)
            if bad is not None:
                stored_kid = settings.get(_KID)
                which = (f"the database's key id is {stored_kid}, store.encryption_key gives {cipher.kid}"
                         if cipher is not None and stored_kid else "")
                raise StoreError(f"{path}: store.encryption_key does not open the stored credentials"
                                 f"{' (' + which + ')' if which else ''}; the first that fails: {bad}. Start with "
                                 "the key they were encrypted with (after a rotation: the new one)")
            plaintext = sum(1 for _, text in conn.execute("SELECT name, spec FROM providers").fetchall()
                            for _, value in secret_fields(json.loads(text)) if not is_encrypted(value))
            if cipher is not None:
                if settings.get(_KID) != cipher.kid:
                    _put_setting(conn, _KID, cipher.kid)
                if plaintext:
                    reencrypt(conn, cipher, cipher)
                    log.info("store %s: encrypted %d stored credential(s) that were plaintext", path, plaintext)
                conn.execute("DELETE FROM settings WHERE name = ?", (_HANDOFF,))  # a past run's: nobody can open it
            elif plaintext:
                log.warning("store %s: %d provider credential(s) are stored in plaintext: set store.encryption_key "
                            "(e.g. ${AT_GATEWAY_ENCRYPTION_KEY}) to encrypt them", path, plaintext)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()
    return Keyring(cipher)


def open_catalog(path: str, keyring: Keyring) -> Catalog:
    """This process's catalog on the database at ``path`` (migrated)."""
    conn = connect(path, check_same_thread=False)
    return Catalog(conn, path, keyring)
