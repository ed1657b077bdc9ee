"""Opening a database: pragmas, a private file, and the schema's ordered migrations.

The schema version lives in ``schema_version`` (one row). :data:`MIGRATIONS` is an ordered list:
entry ``i`` takes a database from version ``i`` to ``i + 1``, so the current version is its length.
A database from a newer at-gateway is refused (its tables may mean something this one does not
know); an older one is copied aside with sqlite's backup API and then migrated in one transaction,
so a failed migration leaves it as it was.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("at_gateway.store")

MEMORY = ":memory:"
BUSY_TIMEOUT_MS = 5000


class StoreError(Exception):
    """The database cannot be used; the message names the file and what to do."""


# Money is integer nano-dollars (1e-9 USD) everywhere: exact sums, and cheap models' tiny requests
# (10 tokens at $0.075 per million is 750 nano-dollars) do not round to zero.
_V1 = (
    """CREATE TABLE meta (
        name TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    )""",
    "INSERT INTO meta (name, value) VALUES ('keys_version', 0)",
    # Client keys: atg_<id>_<secret>; only the id and the SHA-256 of the secret are kept.
    """CREATE TABLE keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        secret_hash BLOB NOT NULL,
        prefix TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'disabled', 'revoked')),
        routes TEXT NOT NULL DEFAULT '[]',
        rpm INTEGER, rph INTEGER, rpd INTEGER, tpm INTEGER, tpd INTEGER,
        budget_nanousd INTEGER,
        budget_period TEXT CHECK (budget_period IN ('day', 'week', 'month')),
        max_tokens INTEGER,
        system_prompt TEXT,
        metadata TEXT NOT NULL DEFAULT '{}',
        expires_at REAL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    )""",
    # Every change to keys bumps keys_version: each worker polls that one value to know when to reload.
    """CREATE TRIGGER keys_inserted AFTER INSERT ON keys BEGIN
        UPDATE meta SET value = value + 1 WHERE name = 'keys_version'; END""",
    """CREATE TRIGGER keys_updated AFTER UPDATE ON keys BEGIN
        UPDATE meta SET value = value + 1 WHERE name = 'keys_version'; END""",
    """CREATE TRIGGER keys_deleted AFTER DELETE ON keys BEGIN
        UPDATE meta SET value = value + 1 WHERE name = 'keys_version'; END""",
    """CREATE TABLE request_log (
        id INTEGER PRIMARY KEY,
        time REAL NOT NULL,
        request_id TEXT NOT NULL,
        key_id TEXT,
        method TEXT,
        path TEXT,
        route TEXT,
        provider TEXT,
        model TEXT,
        status INTEGER NOT NULL,
        outcome INTEGER,
        attempts INTEGER NOT NULL DEFAULT 0,
        failed_attempts TEXT,
        latency_ms REAL,
        ttfb_ms REAL,
        stream INTEGER NOT NULL DEFAULT 0,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        cached_tokens INTEGER,
        reasoning_tokens INTEGER,
        cost_nanousd INTEGER,
        error TEXT,
        metadata TEXT
    )""",
    "CREATE INDEX request_log_time ON request_log (time)",
    "CREATE INDEX request_log_key_time ON request_log (key_id, time)",
    # Daily aggregates (the day in budget_timezone) for quotas, budgets, `usage` and the dashboard.
    """CREATE TABLE usage_daily (
        day TEXT NOT NULL,
        key_id TEXT NOT NULL,
        route TEXT NOT NULL,
        provider TEXT NOT NULL,
        model TEXT NOT NULL,
        requests INTEGER NOT NULL DEFAULT 0,
        errors INTEGER NOT NULL DEFAULT 0,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        cached_tokens INTEGER NOT NULL DEFAULT 0,
        reasoning_tokens INTEGER NOT NULL DEFAULT 0,
        cost_nanousd INTEGER NOT NULL DEFAULT 0,
        unpriced INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (day, key_id, route, provider, model)
    )""",
    "CREATE INDEX usage_daily_key_day ON usage_daily (key_id, day)",
)

# The admin API's catalog: providers and routes added at run time (each spec a JSON object, its secrets
# encrypted: see catalog.py), the audit log of admin writes, and settings (the key's salt and id).
_V2 = (
    "INSERT INTO meta (name, value) VALUES ('config_version', 0)",  # providers/routes changed (triggers)
    "INSERT INTO meta (name, value) VALUES ('file_version', 0)",  # an admin reload: every worker re-reads the file
    """CREATE TABLE settings (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
    """CREATE TABLE providers (
        name TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    )""",
    """CREATE TABLE routes (
        name TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    )""",
    *(f"""CREATE TRIGGER {table}_{done} AFTER {event} ON {table} BEGIN
        UPDATE meta SET value = value + 1 WHERE name = 'config_version'; END"""
      for table in ("providers", "routes")
      for event, done in (("INSERT", "inserted"), ("UPDATE", "updated"), ("DELETE", "deleted"))),
    """CREATE TABLE audit_log (
        id INTEGER PRIMARY KEY,
        time REAL NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        object TEXT,
        change TEXT NOT NULL DEFAULT '{}'
    )""",
    "CREATE INDEX audit_log_time ON audit_log (time)",
    # No index on request_log.request_id: every request would pay its B-tree update for an admin lookup that
    # the time index serves newest first (GET admin/api/v1/requests/{id}, see admin/reports.py).
)

# The Responses door's kept responses (store/responses.py): each row is one answer with the whole context it
# was made from, so a follow-up's ``previous_response_id`` is one primary-key read. ``key_id`` is the caller
# (only it may read the row); ``expires_at`` (its creation plus ``response.retention``) is what reads filter
# on and the periodic purge deletes by, through its index.
_V3 = (
    """CREATE TABLE responses (
        id TEXT PRIMARY KEY,
        key_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        input TEXT NOT NULL,
        output TEXT NOT NULL,
        response TEXT NOT NULL
    )""",
    "CREATE INDEX responses_expires_at ON responses (expires_at)",
)

# The dashboard's per-minute rollups (store/usage.py writes them with the request-log rows, in the same
# transaction; admin/stats.py reads them): one row per minute (Unix seconds, the minute a request started, as
# request_log.time), route, provider, model, key id ('' for none) and status class (2 for 2xx...). Latency and
# time to first token as counts per fixed bucket (27 each: usage.ROLLUP_BOUNDS_MS and an overflow bucket; a new
# bucket layout needs a new migration). WITHOUT ROWID: the primary key is the table's order, so a time range is
# one contiguous read. Logged-out dashboard sessions (admin/auth.py): their ids until they would have expired,
# so that every worker refuses them.
_V4 = (
    """CREATE TABLE usage_minute (
        minute INTEGER NOT NULL,
        route TEXT NOT NULL,
        provider TEXT NOT NULL,
        model TEXT NOT NULL,
        key_id TEXT NOT NULL,
        status_class INTEGER NOT NULL,
        requests INTEGER NOT NULL DEFAULT 0,
        errors INTEGER NOT NULL DEFAULT 0,
        fallbacks INTEGER NOT NULL DEFAULT 0,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        cached_tokens INTEGER NOT NULL DEFAULT 0,
        reasoning_tokens INTEGER NOT NULL DEFAULT 0,
        cost_nanousd INTEGER NOT NULL DEFAULT 0,
        unpriced INTEGER NOT NULL DEFAULT 0,
        """ + "".join(f"lat_{i} INTEGER NOT NULL DEFAULT 0, " for i in range(27))
    + "".join(f"ttft_{i} INTEGER NOT NULL DEFAULT 0, " for i in range(27)) + """
        PRIMARY KEY (minute, route, provider, model, key_id, status_class)
    ) WITHOUT ROWID""",
    """CREATE TABLE admin_sessions_revoked (
        id TEXT PRIMARY KEY,
        expires_at REAL NOT NULL
    )""",
)

#: Ordered migrations: MIGRATIONS[i] takes version i to i + 1 (statements run in one transaction).
MIGRATIONS: Sequence[Sequence[str]] = (_V1, _V2, _V3, _V4)
SCHEMA_VERSION = len(MIGRATIONS)


def connect(path: str, *, migrate: bool = True, migrations: Sequence[Sequence[str]] = MIGRATIONS,
            check_same_thread: bool = False, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> sqlite3.Connection:
    """A connection with the store's pragmas, the file created private (mode 600) if missing, the schema
    migrated to the current version (``migrate=False``: only checked, for read-only tools).

    ``busy_timeout_ms``: how long a statement waits for another connection's lock before failing
    with "database is locked" (the writer thread waits; nothing on the event loop ever does)."""
    if path != MEMORY:
        _create_private(path)
    try:
        conn = sqlite3.connect(path, timeout=busy_timeout_ms / 1000, isolation_level=None,
                               check_same_thread=check_same_thread)
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot open the database: {exc}") from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        if path != MEMORY:
            mode = _set_wal(conn, busy_timeout_ms)
            if str(mode).lower() != "wal":
                log.warning("store %s: journal mode is %s, not WAL (readers may wait for writers)", path, mode)
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        _migrate(conn, path, migrations, apply=migrate)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StoreError(f"{path}: not a usable at-gateway database: {exc}") from None
    except BaseException:
        conn.close()
        raise
    return conn


def _set_wal(conn: sqlite3.Connection, busy_timeout_ms: int) -> str:
    """``PRAGMA journal_mode = WAL``, retried while another connection holds the lock: switching the mode of a
    new file needs it exclusively and does not wait in sqlite's busy handler (workers starting together)."""
    deadline = time.monotonic() + busy_timeout_ms / 1000
    delay = 0.005
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(delay)  # a retry of the product's, not a test's wait
            delay = min(delay * 2, 0.1)


def _create_private(path: str) -> None:
    """Create the file with mode 600 before sqlite does (sqlite would use 644 and the umask)."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise StoreError(f"{path}: the directory {directory} does not exist (create it, or set store.path "
                         "or state_dir)")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise StoreError(f"{path}: cannot create the database: {exc.strerror or exc}") from None
    os.close(fd)


def schema_version(conn: sqlite3.Connection) -> int:
    """The database's schema version; 0 for a new (empty) database.

    Read in one snapshot: between two autocommit reads another process could migrate the file, and a
    file with tables but (a moment before) no schema_version would look like another program's."""
    if conn.in_transaction:
        return _schema_version(conn)
    conn.execute("BEGIN")
    try:
        return _schema_version(conn)
    finally:
        conn.execute("COMMIT")


def _schema_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone()
    if row is None:
        tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
        if tables:
            raise StoreError("the database has tables but no schema_version: not an at-gateway database "
                             "(point store.path at another file)")
        return 0
    version = conn.execute("SELECT version FROM schema_version").fetchone()
    return int(version[0]) if version else 0


def _migrate(conn: sqlite3.Connection, path: str, migrations: Sequence[Sequence[str]], apply: bool) -> None:
    current = len(migrations)
    version = schema_version(conn)
    _refuse_newer(path, version, current)
    if version == current:
        return
    if not apply:
        raise StoreError(f"{path}: schema version {version}, this at-gateway needs {current}: start the "
                         "gateway once (it migrates, after a backup copy)")
    copy = None
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Read again under the write lock: another process (a worker starting at the same time) may
        # have migrated between the first look and this lock; then there is nothing to copy or do.
        version = schema_version(conn)
        if version < current:
            if version > 0 and path != MEMORY:
                # Copied while this connection holds the write lock: nobody can change the file in
                # between, so the copy is the version it names.
                copy = _backup_copy(path, version)
                log.info("store %s: schema version %d -> %d; backup copy in %s", path, version, current, copy)
            if version == 0:
                conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            for statements in migrations[version:]:
                for sql in statements:
                    conn.execute(sql)
            conn.execute("UPDATE schema_version SET version = ?", (current,))
        conn.execute("COMMIT")
    except BaseException as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            kept = f"; a copy from before is {copy}" if copy else ""
            raise StoreError(f"{path}: migrating schema version {version} to {current} failed ({exc}); the "
                             f"database is left as it was{kept}") from None
        raise
    _refuse_newer(path, version, current)


def _refuse_newer(path: str, version: int, current: int) -> None:
    if version > current:
        raise StoreError(f"{path}: the database has schema version {version}, newer than this at-gateway "
                         f"knows ({current}); run the at-gateway that wrote it, or restore a backup")


def _backup_copy(path: str, version: int) -> str:
    """A copy of the database beside it, named for its version and the time, under a name of its own:
    created exclusively (two copies in one second, or a file already there, are never overwritten).

    Read through a connection of its own: sqlite's backup cannot read through the connection that
    holds the write lock, and another reader sees the last committed state, which that lock keeps
    as it is (WAL readers, and rollback-journal readers before the commit, do not wait for it)."""
    stem = f"{path}.v{version}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    for n in range(1, 1000):
        name = f"{stem}.bak" if n == 1 else f"{stem}-{n}.bak"
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        except OSError as exc:
            raise StoreError(f"{path}: cannot create the backup copy {name} before migrating: "
                             f"{exc.strerror or exc}") from None
        os.close(fd)
        try:
            reader = sqlite3.connect(f"file:{os.path.abspath(path)}?mode=ro", uri=True, isolation_level=None)
            try:
                backup(reader, name)
            finally:
                reader.close()
        except BaseException:
            try:
                os.unlink(name)
            except OSError:
                pass
            raise
        return name
    raise StoreError(f"{path}: no free name for a backup copy beside it ({stem}.bak and 998 more exist)")


def backup(conn: sqlite3.Connection, dest: str) -> None:
    """A consistent copy with sqlite's online backup API (safe while others write); the copy is private."""
    _create_private(dest)
    target = sqlite3.connect(dest)
    try:
        conn.backup(target)
    finally:
        target.close()
    try:
        os.chmod(dest, 0o600)
    except OSError:
        pass


def info(conn: sqlite3.Connection, path: str) -> dict[str, object]:
    """Path, schema version, row counts and size: `at-gateway db info`."""
    tables = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    counts = {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}  # noqa: S608
    size = 0
    if path != MEMORY:
        for suffix in ("", "-wal", "-shm"):
            try:
                size += os.path.getsize(path + suffix)
            except OSError:
                pass
    return {"path": str(Path(path).resolve()) if path != MEMORY else MEMORY,
            "schema_version": schema_version(conn), "rows": counts, "size_bytes": size}
