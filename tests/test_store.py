"""The database itself (real sqlite files): a private WAL file, migrations, newer schemas refused,
prices and costs, and the `db` commands (info, an online backup while the gateway writes)."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from at_gateway.config import Price, build_config
from at_gateway.context import RequestContext
from at_gateway.store import db
from at_gateway.store.db_cli import main as db_main
from at_gateway.store.prices import BUILTIN, Pricing, lookup, nanousd, rates_of
from tests.conftest import base_config

# Test-only migrations: v1 makes a table, v2 adds a column and fills it.
V1 = ("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL)",)
V2 = ("ALTER TABLE notes ADD COLUMN length INTEGER", "UPDATE notes SET length = length(text)")
BROKEN = ("ALTER TABLE notes ADD COLUMN extra INTEGER", "INSERT INTO no_such_table VALUES (1)")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_database_is_private_wal_with_its_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "at-gateway.db"
    conn = db.connect(str(path))
    try:
        conn.execute("INSERT INTO meta (name, value) VALUES ('probe', 1)")
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == db.BUSY_TIMEOUT_MS
        assert db.schema_version(conn) == db.SCHEMA_VERSION
        for name in ("at-gateway.db", "at-gateway.db-wal", "at-gateway.db-shm"):
            assert mode(tmp_path / name) == 0o600, name  # sqlite gives -wal/-shm the database's mode
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"schema_version", "meta", "keys", "request_log", "usage_daily"} <= tables
    finally:
        conn.close()


def test_an_older_schema_is_migrated_in_one_transaction_after_a_backup_copy(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = db.connect(str(path), migrations=[V1])
    conn.executemany("INSERT INTO notes (text) VALUES (?)", [("one",), ("three",)])
    conn.close()

    conn = db.connect(str(path), migrations=[V1, V2])
    try:
        assert db.schema_version(conn) == 2
        assert conn.execute("SELECT text, length FROM notes ORDER BY id").fetchall() == [("one", 3), ("three", 5)]
    finally:
        conn.close()
    copies = list(tmp_path.glob("old.db.v1-*.bak"))
    assert len(copies) == 1 and mode(copies[0]) == 0o600
    old = sqlite3.connect(copies[0])
    assert old.execute("SELECT version FROM schema_version").fetchone() == (1,)
    assert old.execute("SELECT count(*) FROM notes").fetchone() == (2,)
    old.close()


def test_the_backup_is_of_the_old_schema_when_another_process_migrated_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two starts upgrading one file at once: the one that finds it already migrated once it holds the
    write lock makes no copy, so the copy of version 1 is never replaced by one of version 2."""
    path = str(tmp_path / "old.db")
    db.connect(path, migrations=[V1]).close()
    real = db.schema_version
    looks = 0

    def first_look_then_another_process_migrates(conn: sqlite3.Connection) -> int:
        nonlocal looks
        version = real(conn)
        looks += 1
        if looks == 1:  # this start has seen version 1; another one migrates before it goes on
            monkeypatch.setattr(db, "schema_version", real)
            db.connect(path, migrations=[V1, V2]).close()
            monkeypatch.setattr(db, "schema_version", first_look_then_another_process_migrates)
        return version

    monkeypatch.setattr(db, "schema_version", first_look_then_another_process_migrates)
    conn = db.connect(path, migrations=[V1, V2])
    assert real(conn) == 2
    conn.close()
    copies = sorted(tmp_path.glob("old.db.v1-*.bak"))
    assert len(copies) == 1, copies
    old = sqlite3.connect(copies[0])
    assert old.execute("SELECT version FROM schema_version").fetchone() == (1,)
    assert [r[1] for r in old.execute("PRAGMA table_info(notes)")] == ["id", "text"]
    old.close()


def test_a_backup_copy_never_replaces_a_file(tmp_path: Path) -> None:
    """Copies made in the same second get their own names (created exclusively), whatever is there."""
    import time

    path = tmp_path / "old.db"
    db.connect(str(path), migrations=[V1]).close()
    now = time.time()
    taken = {tmp_path / f"old.db.v1-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(t))}.bak" for t in (now, now + 1)}
    for f in taken:
        f.write_bytes(b"someone else's file")
    db.connect(str(path), migrations=[V1, V2]).close()
    assert all(f.read_bytes() == b"someone else's file" for f in taken)
    [copy] = set(tmp_path.glob("old.db.v1-*.bak")) - taken
    old = sqlite3.connect(copy)
    assert old.execute("SELECT version FROM schema_version").fetchone() == (1,)
    old.close()
    assert mode(copy) == 0o600


def test_a_failed_migration_leaves_the_database_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db.connect(str(path), migrations=[V1]).close()
    with pytest.raises(db.StoreError) as err:
        db.connect(str(path), migrations=[V1, BROKEN])
    assert "migrating schema version 1 to 2 failed" in str(err.value)
    assert "left as it was" in str(err.value)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM schema_version").fetchone() == (1,)
    columns = [r[1] for r in conn.execute("PRAGMA table_info(notes)")]
    assert columns == ["id", "text"]  # the first statement of the broken step was rolled back too
    conn.close()


def test_a_newer_schema_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    db.connect(str(path), migrations=[V1, V2]).close()
    with pytest.raises(db.StoreError) as err:
        db.connect(str(path), migrations=[V1])
    msg = str(err.value)
    assert str(path) in msg and "schema version 2, newer than this at-gateway knows (1)" in msg
    assert "restore a backup" in msg


def test_a_file_of_another_program_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    other = sqlite3.connect(path)
    other.execute("CREATE TABLE accounts (id INTEGER)")
    other.commit()
    other.close()
    with pytest.raises(db.StoreError, match="not an at-gateway database"):
        db.connect(str(path))


def test_workers_starting_together_migrate_once(tmp_path: Path) -> None:
    """Several processes open a new file at once (workers: N): one migrates, the others see it done."""
    path = str(tmp_path / "fresh.db")
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def start() -> None:
        barrier.wait()
        try:
            db.connect(path).close()
        except BaseException as exc:  # noqa: BLE001 (collected for the assert)
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    conn = db.connect(path)
    assert db.schema_version(conn) == db.SCHEMA_VERSION
    assert conn.execute("SELECT count(*) FROM schema_version").fetchone() == (1,)
    conn.close()


# -- prices --------------------------------------------------------------------

def _ctx(model: str, usage: dict[str, Any] | None, route: str = "r", provider: str = "up1") -> RequestContext:
    ctx = RequestContext("rid", route=route, provider=provider, model=model)
    ctx.usage = usage
    return ctx


@pytest.mark.parametrize(("model", "usage", "nano"), [
    # gpt-4o-mini: $0.15 in, $0.60 out, $0.075 cached per million
    ("gpt-4o-mini", {"prompt_tokens": 1000, "completion_tokens": 500}, 150_000 + 300_000),
    ("gpt-4o-mini", {"prompt_tokens": 10, "completion_tokens": 0}, 1_500),  # tiny requests do not round to 0
    ("gpt-4o-mini", {"prompt_tokens": 1000, "completion_tokens": 0, "prompt_tokens_details": {"cached_tokens": 400}},
     600 * 150 + 400 * 75),
    # a dated snapshot costs its family's price; so does a provider-prefixed name
    ("gpt-4o-2024-08-06", {"prompt_tokens": 1_000_000, "completion_tokens": 0}, 2_500_000_000),
    ("openai/gpt-4o", {"prompt_tokens": 0, "completion_tokens": 1_000_000}, 10_000_000_000),
    ("claude-3-5-sonnet-20241022", {"prompt_tokens": 100, "completion_tokens": 100}, 100 * 3000 + 100 * 15000),
    ("claude-sonnet-4-5-20250929", {"prompt_tokens": 1, "completion_tokens": 1}, 18_000),
    ("claude-3-5-sonnet-v2@20241022", {"prompt_tokens": 1, "completion_tokens": 0}, 3000),
    ("models/gemini-2.5-flash", {"prompt_tokens": 1000, "completion_tokens": 100,
                                 "completion_tokens_details": {"reasoning_tokens": 60}}, 300_000 + 250_000),
    ("gemini-2.5-flash-lite-preview-06-17", {"prompt_tokens": 1000, "completion_tokens": 0}, 100_000),
    ("gpt-5-nano", {"prompt_tokens": 10, "completion_tokens": 0}, 500),  # $0.05 per million: 50 nano a token
    # the presets' providers: USD per million (input + output) for a million tokens of each
    *[(model, {"prompt_tokens": 1_000_000, "completion_tokens": 1_000_000}, nano) for model, nano in [
        ("deepseek-chat", 700_000_000), ("deepseek-reasoner", 700_000_000),
        ("grok-4", 18_000_000_000), ("grok-4-0709", 18_000_000_000), ("grok-3-mini", 800_000_000),
        ("grok-code-fast-1", 1_700_000_000), ("grok-4-fast-reasoning", 700_000_000),
        ("llama-3.3-70b-versatile", 1_380_000_000), ("llama-3.1-8b-instant", 130_000_000),
        ("mistral-large-2411", 8_000_000_000), ("mistral-medium-2505", 2_400_000_000),
        ("mistral-small-2503", 400_000_000), ("codestral-2501", 1_200_000_000), ("open-mistral-nemo", 300_000_000),
        ("ministral-8b-2410", 200_000_000), ("ministral-3b-2410", 80_000_000)]],
    ("deepseek-chat", {"prompt_tokens": 1_000_000, "completion_tokens": 0,
                       "prompt_tokens_details": {"cached_tokens": 1_000_000}}, 28_000_000),  # a cache hit
    # not priced: unknown models, and look-alikes that cost something else
    ("mistral-large-latest", {"prompt_tokens": 10, "completion_tokens": 10}, None),  # an alias that moves
    ("my-finetune", {"prompt_tokens": 10, "completion_tokens": 10}, None),
    ("gpt-4-1106-preview", {"prompt_tokens": 10, "completion_tokens": 10}, None),
    ("gpt-4o", None, None),
    ("gpt-4o", {"total_tokens": 3}, None),
])
def test_cost_from_the_builtin_table(model: str, usage: dict[str, Any] | None, nano: int | None) -> None:
    """USD per million tokens is 1000 nano-dollars a token per dollar: $0.15 -> 150 nano a token."""
    pricing = Pricing(build_config(base_config("http://127.0.0.1:9"), "t"))
    assert pricing.cost(_ctx(model, usage)) == nano


def test_o3_pro_is_not_priced_as_o3() -> None:
    assert lookup("o3-pro", BUILTIN) == BUILTIN["o3-pro"] != BUILTIN["o3"]
    assert lookup("o3-pro-2025-06-10", BUILTIN) == BUILTIN["o3-pro"]


def test_config_prices_and_step_prices_override_the_table() -> None:
    raw = base_config("http://127.0.0.1:9", [
        {"name": "cheap", "steps": [{"provider": "up1", "model": "gpt-4o", "price": {"input": 1, "output": 2}},
                                    {"provider": "up2", "model": "gpt-4o"}]},
        {"name": "other", "steps": [{"provider": "up1", "model": "gpt-4o"}]},
    ], prices={"gpt-4o": {"input": "0.5", "output": "1", "cached_input": "0.1"},
               "house-model": {"input": 7, "output": 7}})
    pricing = Pricing(build_config(raw, "t"))
    usage = {"prompt_tokens": 1_000_000, "completion_tokens": 1_000_000,
             "prompt_tokens_details": {"cached_tokens": 500_000}}
    # the step's own price (no cached price: cached tokens cost the input price)
    assert pricing.cost(_ctx("gpt-4o", usage, "cheap", "up1")) == 3 * 10**9
    # the second step of the same route has no price of its own: the config's prices
    assert pricing.cost(_ctx("gpt-4o", usage, "cheap", "up2")) == (250_000_000 + 50_000_000 + 1_000_000_000)
    assert pricing.cost(_ctx("gpt-4o", usage, "other", "up1")) == 1_300_000_000
    assert pricing.cost(_ctx("house-model", {"prompt_tokens": 1, "completion_tokens": 1})) == 14_000


def test_money_is_exact_integers() -> None:
    # $0.0375 per million is 37.5 nano-dollars a token: an exact integer rate of 37,500,000 femto-dollars.
    rates = rates_of(Price(Decimal("0.0375"), Decimal("0.15")))
    assert rates == (37_500_000, 150_000_000, 37_500_000)
    assert nanousd(rates, 3, 0) == 113  # 112.5 rounds half up, once per request
    assert nanousd(rates, 2, 0) == 75
    assert nanousd(rates, 3_000_000, 0) == 112_500_000  # many tokens in one request: exact
    assert sum(nanousd(rates, 3, 0) for _ in range(100_000)) == 11_300_000  # integer sums never drift


# -- db info / db backup -----------------------------------------------------

def _config_file(tmp_path: Path, db_path: Path) -> tuple[Path, Any]:
    raw = base_config("http://127.0.0.1:9", store={"path": str(db_path)})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, build_config(raw, str(path))


def test_db_info_prints_path_version_rows_and_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dbp = tmp_path / "state.db"
    conn = db.connect(str(dbp))
    conn.executemany("INSERT INTO request_log (time, request_id, status) VALUES (?, ?, ?)",
                     [(1.0, f"r{i}", 200) for i in range(3)])
    conn.close()
    cfg_path, _ = _config_file(tmp_path, dbp)
    r = subprocess.run([sys.executable, "-m", "at_gateway", "db", "info", "--config", str(cfg_path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert f"path            {dbp.resolve()}" in r.stdout
    assert f"schema version  {db.SCHEMA_VERSION} (current)" in r.stdout
    assert "request_log" in r.stdout and "         3" in r.stdout
    r = subprocess.run([sys.executable, "-m", "at_gateway", "db", "info", "--json", "--config", str(cfg_path)],
                       capture_output=True, text=True, timeout=30)
    facts = json.loads(r.stdout)
    assert facts["rows"]["request_log"] == 3 and facts["schema_version"] == db.SCHEMA_VERSION
    assert facts["size_bytes"] > 0


def test_db_commands_say_when_there_is_no_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = build_config(base_config("http://127.0.0.1:9"), "t")  # :memory:
    assert db_main(["info"], config) == 1
    assert "the store is in memory" in capsys.readouterr().err
    _, config = _config_file(tmp_path, tmp_path / "missing.db")
    assert db_main(["backup", str(tmp_path / "b.db")], config) == 1
    assert "no database at" in capsys.readouterr().err
    assert not (tmp_path / "missing.db").exists()  # reading never creates the file


def test_db_backup_while_writing_is_consistent_and_private(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    dbp = tmp_path / "live.db"
    _, config = _config_file(tmp_path, dbp)
    writer = db.connect(str(dbp))
    stop = threading.Event()
    written = [0]

    def write() -> None:  # a busy writer, like a serving gateway, during the whole backup
        while not stop.is_set():
            writer.execute("BEGIN IMMEDIATE")
            writer.executemany("INSERT INTO request_log (time, request_id, status) VALUES (?, ?, 200)",
                               [(1.0, "x") for _ in range(50)])
            writer.execute("COMMIT")
            written[0] += 50

    t = threading.Thread(target=write)
    t.start()
    try:
        from tests.mock_upstream import wait_until

        assert wait_until(lambda: written[0] >= 500)
        dest = tmp_path / "copy.db"
        assert db_main(["backup", str(dest)], config) == 0
        assert f"backed up {dbp} to {dest}" in capsys.readouterr().out
        assert db_main(["backup", str(dest)], config) == 1  # never overwrites
        assert "exists" in capsys.readouterr().err
    finally:
        stop.set()
        t.join()
        writer.close()
    assert mode(dest) == 0o600
    copy = sqlite3.connect(dest)
    assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert copy.execute("SELECT count(*) FROM request_log").fetchone()[0] % 50 == 0  # whole transactions only
    assert copy.execute("SELECT version FROM schema_version").fetchone() == (db.SCHEMA_VERSION,)
    copy.close()
