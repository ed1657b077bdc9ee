"""``at-gateway db info`` and ``at-gateway db backup FILE``: safe while the gateway serves.

Both read through their own connection: WAL lets them read a consistent snapshot while the
gateway's writer threads keep writing. ``backup`` uses sqlite's online backup API, so the copy is
one consistent state of the database (never a half-written file copy), made private (mode 600).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys

from ..config import Config
from . import db


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="at-gateway db", description="the store's database (store.path)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="path, schema version, row counts, size")
    info.add_argument("--json", action="store_true", help="one JSON object")
    backup = sub.add_parser("backup", help="a consistent copy with sqlite's online backup API (safe while serving)")
    backup.add_argument("file", help="where to write the copy (must not exist)")
    return p


def open_existing(config: Config, what: str) -> sqlite3.Connection | None:
    """A read-only connection to the config's existing database; None (said on stderr) when there is none."""
    path = config.store.path
    if path == db.MEMORY:
        print(f"at-gateway {what}: the store is in memory (store.path: \":memory:\" in {config.source}); "
              "there is no database file to read", file=sys.stderr)
        return None
    if not os.path.isfile(path):
        print(f"at-gateway {what}: no database at {path} (it is created when the gateway first starts, or by "
              "`at-gateway keys create`)", file=sys.stderr)
        return None
    try:
        conn = sqlite3.connect(f"file:{os.path.abspath(path)}?mode=ro", uri=True, isolation_level=None,
                               timeout=db.BUSY_TIMEOUT_MS / 1000)
        conn.execute(f"PRAGMA busy_timeout = {db.BUSY_TIMEOUT_MS}")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        print(f"at-gateway {what}: {path}: cannot read the database: {exc}", file=sys.stderr)
        return None
    return conn


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def main(argv: list[str], config: Config) -> int:
    """``db info`` / ``db backup FILE``; the exit status."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    conn = open_existing(config, f"db {args.command}")
    if conn is None:
        return 1
    try:
        if args.command == "info":
            return _info(conn, config, args.json)
        return _backup(conn, config, args.file)
    finally:
        conn.close()


def _info(conn: sqlite3.Connection, config: Config, as_json: bool) -> int:
    try:
        facts = db.info(conn, config.store.path)
    except (sqlite3.Error, db.StoreError) as exc:
        print(f"at-gateway db info: {config.store.path}: {exc}", file=sys.stderr)
        return 1
    version, size = facts["schema_version"], facts["size_bytes"]
    assert isinstance(version, int) and isinstance(size, int)
    facts["schema_current"] = db.SCHEMA_VERSION
    if as_json:
        print(json.dumps(facts, sort_keys=True))
        return 0
    state = ("current" if version == db.SCHEMA_VERSION else
             f"older than this at-gateway's {db.SCHEMA_VERSION}: migrated on the gateway's next start"
             if version < db.SCHEMA_VERSION else f"NEWER than this at-gateway's {db.SCHEMA_VERSION}")
    rows = facts["rows"]
    assert isinstance(rows, dict)
    print(f"path            {facts['path']}")
    print(f"schema version  {version} ({state})")
    print(f"size            {_human(size)} (database, WAL and shared memory)")
    print("rows")
    width = max((len(t) for t in rows), default=0)
    for table, count in rows.items():
        print(f"  {table:<{width}}  {count:>10,}")
    return 0


def _backup(conn: sqlite3.Connection, config: Config, dest: str) -> int:
    if os.path.lexists(dest):
        print(f"at-gateway db backup: {dest} exists; name a new file (a backup never overwrites)", file=sys.stderr)
        return 1
    src = os.path.realpath(config.store.path)
    if os.path.realpath(dest) in (src, src + "-wal", src + "-shm"):
        print(f"at-gateway db backup: {dest} is the database itself", file=sys.stderr)
        return 1
    try:
        db.backup(conn, dest)
    except (sqlite3.Error, db.StoreError, OSError) as exc:
        try:
            os.unlink(dest)
        except OSError:
            pass
        print(f"at-gateway db backup: cannot write {dest}: {exc}", file=sys.stderr)
        return 1
    print(f"backed up {config.store.path} to {dest} ({_human(os.path.getsize(dest))})")
    return 0
