"""store/responses.py: the Responses door's kept responses, on real sqlite files (schema v3)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

from at_gateway.config import build_config
from at_gateway.errors import ConfigError
from at_gateway.store import db
from at_gateway.store.keys import KeyStore
from at_gateway.store.responses import ResponseStore, open_response_store, open_store

DAY = 86400.0


class Clock:
    """Wall-clock seconds a test moves by hand."""

    def __init__(self, now: float = 1_750_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Any:
    s = open_store(str(tmp_path / "gw.db"), clock=clock)
    try:
        yield s
    finally:
        s.close()


def put(store: ResponseStore, rid: str, key: str = "key0", retention: float = DAY, text: str = "hi") -> None:
    with store.lock:
        store.put_sync(rid, key, [{"type": "message", "role": "user", "content": text, "id": "msg_in"}],
                       [{"type": "message", "id": "msg_out", "content": [{"type": "output_text", "text": "yo"}]}],
                       {"id": rid, "object": "response", "status": "completed"}, retention)


def rows(path: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT id, key_id FROM responses ORDER BY id").fetchall()
    finally:
        conn.close()


def test_a_new_database_has_the_responses_table_and_its_expiry_index(tmp_path: Path) -> None:
    conn = db.connect(str(tmp_path / "gw.db"))
    try:
        assert db.schema_version(conn) == db.SCHEMA_VERSION >= 3
        assert any("CREATE TABLE responses" in sql for sql in db.MIGRATIONS[2])  # v3, the Responses door's
        columns = [r[1] for r in conn.execute("PRAGMA table_info(responses)")]
        assert columns == ["id", "key_id", "created_at", "expires_at", "input", "output", "response"]
        indexes = {r[1] for r in conn.execute("PRAGMA index_list(responses)")}
        assert "responses_expires_at" in indexes
        plan = " ".join(str(r) for r in conn.execute("EXPLAIN QUERY PLAN DELETE FROM responses WHERE expires_at <= 1"))
        assert "responses_expires_at" in plan  # the purge is an index range, not a table scan
    finally:
        conn.close()


def test_a_version_2_database_is_migrated_keeping_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    old = db.connect(str(path), migrations=db.MIGRATIONS[:2])
    KeyStore(old).create("kept-key")
    old.close()
    s = open_store(str(path))
    try:
        with s.lock:
            s.put_sync("resp_1", "key0", [], [], {"id": "resp_1"}, DAY)
        assert db.schema_version(s.conn) == db.SCHEMA_VERSION
        assert s.conn.execute("SELECT name FROM keys").fetchall() == [("kept-key",)]
    finally:
        s.close()
    assert len(list(tmp_path.glob("gw.db.v2-*.bak"))) == 1  # the usual copy before a migration


def test_a_kept_response_reads_back_decoded(store: ResponseStore) -> None:
    put(store, "resp_1", text="héllo ✓")
    with store.lock:
        got = store.get_sync("resp_1", "key0")
    assert got is not None
    assert got.input == [{"type": "message", "role": "user", "content": "héllo ✓", "id": "msg_in"}]
    assert got.output[0]["content"][0]["text"] == "yo"
    assert got.response == {"id": "resp_1", "object": "response", "status": "completed"}
    assert got.expires_at - got.created_at == DAY


def test_only_the_key_that_made_a_response_reads_or_deletes_it(store: ResponseStore) -> None:
    put(store, "resp_1", key="key0")
    with store.lock:
        assert store.get_sync("resp_1", "key1") is None
        assert store.delete_sync("resp_1", "key1") is False
        assert store.get_sync("resp_1", "key0") is not None
        assert store.delete_sync("resp_1", "key0") is True
        assert store.delete_sync("resp_1", "key0") is False
        assert store.get_sync("resp_1", "key0") is None


def test_an_expired_response_is_gone_for_reads_before_any_purge(store: ResponseStore, clock: Clock) -> None:
    put(store, "resp_1", retention=60)
    clock.now += 59
    with store.lock:
        assert store.get_sync("resp_1", "key0") is not None
    clock.now += 1
    with store.lock:
        assert store.get_sync("resp_1", "key0") is None
        assert store.delete_sync("resp_1", "key0") is False


def test_the_purge_runs_once_per_interval_and_deletes_only_expired_rows(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "gw.db"
    s = open_store(str(path), clock=clock, purge_interval=600)
    try:
        put(s, "resp_short", retention=60)
        assert s.purges == 1  # the first write purges what expired while the gateway was down
        for i in range(20):
            put(s, f"resp_{i:02d}")
        assert s.purges == 1  # not once per request
        clock.now += 300
        put(s, "resp_later")
        assert s.purges == 1 and ("resp_short", "key0") in rows(path)  # expired, not yet purged
        clock.now += 300
        put(s, "resp_last")
        assert s.purges == 2 and s.purged == 1
        assert ("resp_short", "key0") not in rows(path) and len(rows(path)) == 22
    finally:
        s.close()


def test_a_write_is_committed_when_put_returns_for_another_process(tmp_path: Path, clock: Clock) -> None:
    """With workers: 2 each process has its own connection: one's write is at once in the other's read."""
    path = str(tmp_path / "gw.db")
    one, two = open_store(path, clock=clock), open_store(path, clock=clock)
    try:
        async def main() -> None:
            await one.put("resp_1", "key0", [{"type": "message"}], [], {"id": "resp_1"}, DAY)
            got = await two.get("resp_1", "key0")
            assert got is not None and got.response == {"id": "resp_1"}
            assert await two.delete("resp_1", "key0") is True
            assert await one.get("resp_1", "key0") is None

        anyio.run(main)
    finally:
        one.close()
        two.close()


def test_every_statement_runs_off_the_event_loops_thread(store: ResponseStore) -> None:
    threads: list[int] = []
    store.conn.set_trace_callback(lambda sql: threads.append(threading.get_ident()))

    async def main() -> int:
        await store.put("resp_1", "key0", [], [], {"id": "resp_1"}, DAY)
        assert (await store.get("resp_1", "key0")) is not None
        assert await store.delete("resp_1", "key0")
        return threading.get_ident()

    loop_thread = anyio.run(main)
    assert threads and loop_thread not in threads


def test_a_store_file_opens_a_store_and_memory_opens_none(tmp_path: Path) -> None:
    async def main() -> None:
        memory = build_config({"api_key": "k", "store": {"path": ":memory:"}}, "t")
        assert await open_response_store(memory) is None
        cfg = build_config({"api_key": "k", "store": {"path": str(tmp_path / "gw.db")}}, "t")
        s = await open_response_store(cfg)
        assert isinstance(s, ResponseStore)
        await s.aclose()
        bad = build_config({"api_key": "k", "store": {"path": str(tmp_path / "missing" / "gw.db")}}, "t")
        with pytest.raises(ConfigError) as err:
            await open_response_store(bad)
        assert "store.path:" in str(err.value) and "does not exist" in str(err.value)

    anyio.run(main)


@pytest.mark.parametrize("raw, seconds", [(None, DAY), ("2h", 7200.0), ("7d", 7 * DAY), (90, 90.0)])
def test_response_retention_is_a_duration_defaulting_to_a_day(raw: Any, seconds: float) -> None:
    top = {} if raw is None else {"response": {"retention": raw}}
    assert build_config({"api_key": "k", **top}, "t").response_retention == seconds


@pytest.mark.parametrize("response, problem", [
    ({"retention": "soon"}, "response.retention: 'soon' is not a duration (use e.g. 300s, 5m, 1.5s"),
    ({"retention": 0}, "response.retention: must be greater than zero"),
    ({"retnetion": "1d"}, "response.retnetion: unknown key (did you mean 'retention'?)"),
    ("1d", "response: must be a mapping"),
])
def test_a_bad_response_retention_names_the_path_and_the_fix(response: Any, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config({"api_key": "k", "response": response}, "t")
    assert problem in str(err.value)
