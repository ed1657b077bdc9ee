"""``at-gateway db info``, ``db backup FILE`` and ``db rotate-key``.

``info`` and ``backup`` read through their own connection: WAL lets them read a consistent snapshot
while the gateway's writer threads keep writing. ``backup`` uses sqlite's online backup API, so the
copy is one consistent state of the database (never a half-written file copy), made private (mode 600).

``rotate-key`` re-encrypts the stored provider credentials under a new passphrase in one transaction
(:func:`.catalog.rotate_database`). The new passphrase comes from an environment variable or a prompt,
never from the command line (argv is visible to every user of the machine, and kept in shell history).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import sys
from typing import Any

from ..config import Config
from . import db


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="at-gateway db", description="the store's database (store.path)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="path, schema version, row counts, size")
    info.add_argument("--json", action="store_true", help="one JSON object")
    backup = sub.add_parser("backup", help="a consistent copy with sqlite's online backup API (safe while serving)")
    backup.add_argument("file", help="where to write the copy (must not exist)")
    # allow_abbrev off: "--new-key SECRET" must be refused, not read as "--new-key-env SECRET"
    rotate = sub.add_parser(
        "rotate-key", allow_abbrev=False,
        help="re-encrypt the stored provider credentials under a new passphrase (one transaction)",
        description="Re-encrypt every provider credential stored in the database under a key stretched from a "
                    "new passphrase, in one transaction, decrypting with the config's store.encryption_key. "
                    "Then change the config to the new passphrase, then restart the gateway.")
    rotate.add_argument("--new-key-env", metavar="NAME",
                        help="the environment variable that holds the new passphrase (default: ask on the "
                             "terminal); the passphrase itself is never given on the command line")
    rotate.add_argument("--json", action="store_true", help="one JSON object")
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
    """``db info`` / ``db backup FILE`` / ``db rotate-key``; the exit status (0, 1; 2 for bad usage)."""
    try:
        args, extra = _parser().parse_known_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if extra:
        # Not echoed for rotate-key: an unknown argument there may well be a passphrase typed on the command line.
        shown = ("(not repeated here: the new passphrase is read from --new-key-env NAME or the terminal, never "
                 "from the command line)" if args.command == "rotate-key" else " ".join(extra))
        print(f"at-gateway db {args.command}: unrecognized arguments {shown}", file=sys.stderr)
        return 2
    if args.command == "rotate-key":
        return _rotate_key(config, args.new_key_env, args.json)
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


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")


def _new_passphrase(env_name: str | None) -> str | None:
    """The new passphrase from ``$env_name`` or the terminal (asked twice); None when there is none (said)."""
    what = "at-gateway db rotate-key"
    if env_name is not None:
        if not _ENV_NAME.fullmatch(env_name):
            # never echoed: what was typed there may be the passphrase itself
            print(f"{what}: --new-key-env takes the NAME of an environment variable that holds the new passphrase "
                  "(letters, digits, '_'), never the passphrase itself", file=sys.stderr)
            return None
        value = os.environ.get(env_name)
        if not value:
            print(f"{what}: the environment variable {env_name} is not set or empty (export it with the new "
                  "passphrase first)", file=sys.stderr)
            return None
        return value
    if not sys.stdin.isatty():
        print(f"{what}: no terminal to ask for the new passphrase on: give --new-key-env NAME (an environment "
              "variable that holds it; never the passphrase on the command line)", file=sys.stderr)
        return None
    import getpass

    try:
        first = getpass.getpass("New passphrase (16+ characters): ")
        second = getpass.getpass("The same again: ")
    except (EOFError, KeyboardInterrupt):
        print(f"\n{what}: cancelled; nothing changed", file=sys.stderr)
        return None
    if first != second:
        print(f"{what}: the two passphrases differ; nothing changed", file=sys.stderr)
        return None
    return first


def _config_key_name(config: Config) -> str:
    """Where the operator changes the key: the environment variable the config reads it from, else the file."""
    raw: Any = config.document.get("store") if isinstance(config.document, dict) else None
    value = raw.get("encryption_key") if isinstance(raw, dict) else None
    m = _ENV_REF.fullmatch(value) if isinstance(value, str) else None
    if m is not None:
        return f"the environment variable {m[1]} (store.encryption_key in {config.source} reads it)"
    return f"store.encryption_key in {config.source}"


def _rotate_key(config: Config, env_name: str | None, as_json: bool) -> int:
    """Rotate the database's key; prints the order of what is left (change the config, then restart)."""
    what = "at-gateway db rotate-key"
    path = config.store.path
    if path == db.MEMORY:
        print(f"{what}: the store is in memory (store.path: \":memory:\" in {config.source}); there is no "
              "database file whose credentials could be rotated", file=sys.stderr)
        return 1
    if not os.path.isfile(path):
        print(f"{what}: no database at {path} (nothing is stored yet: set store.encryption_key and start the "
              "gateway instead)", file=sys.stderr)
        return 1
    new = _new_passphrase(env_name)
    if new is None:
        return 1
    current = config.store.encryption_key
    if current is not None and new == current:
        print(f"{what}: the new passphrase is the current store.encryption_key; nothing changed", file=sys.stderr)
        return 1
    from .catalog import rotate_database

    try:
        done = rotate_database(path, current, new, actor="cli")
    except (ValueError, db.StoreError) as exc:
        print(f"{what}: {exc}", file=sys.stderr)
        print(f"{what}: nothing changed; the stored credentials are as they were", file=sys.stderr)
        return 1
    previous = done["previous_key_id"]
    steps = [
        f"Done: {done['rotated']} stored credential(s) in {path} are encrypted with the new key (key id "
        f"{done['key_id']}), in one transaction; the old passphrase opens nothing any more.",
        f"Next: change the config: set {_config_key_name(config)} to the new passphrase.",
        "Then restart the gateway. A gateway running now was started with the old key: it keeps serving the "
        "providers it has in memory, but cannot read or store credentials changed from now on, until it is "
        "restarted with the new passphrase. A restart with the old passphrase is refused (exit 1).",
    ]
    if as_json:
        print(json.dumps({"path": path, **done, "next_steps": steps}, sort_keys=True))
        return 0
    print(f"rotated the encryption key of {path}: key id {previous or '(none: the credentials were plaintext)'} "
          f"-> {done['key_id']}")
    print("What to do now, in this order:")
    for i, step in enumerate(steps, 1):
        print(f"  {i}. {step}")
    return 0
