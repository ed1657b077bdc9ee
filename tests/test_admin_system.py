"""Admin API ``config``, ``reload``, ``health`` and ``rotate-key`` on a gateway running as ``serve`` runs it
(``run_live``: a real sqlite file, a real YAML file for reloads, real sockets, mock upstreams), and the usage
meter's per-provider last error that health shows.

What is asserted: the effective configuration with every secret masked or "(set)" and each entry's source;
a reload of an invalid file refused with every problem while the running configuration keeps serving, and a
valid one served at once and audited; health's fields (version, pid, workers, uptime, database, each
provider's last failed attempt, redacted); a key rotation through the API after which chat still works, the
raw sqlite file holds no plaintext credential, a restart needs the new passphrase, and refusals (a bad body,
another process's key, a row that does not decrypt) change nothing; no secret in any answer or log line.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

import at_gateway
from at_gateway.admin.api import mask
from at_gateway.admin.system import build_commit
from at_gateway.context import Attempt, RequestContext
from at_gateway.errors import ConfigError
from at_gateway.store import db
from at_gateway.usage import UsageMeter
from tests.conftest import GATEWAY_KEY, RunningGateway, base_config, run_gateway, run_live
from tests.mock_upstream import MockUpstream, Reply
from tests.test_admin_catalog import DB_KEY, ENCRYPTION_KEY, HEADER_SECRET, PROXY_PASSWORD, YAML_KEY, chat, db_provider
from tests.test_admin_clients import ADMIN, V1, Admin

ADMIN2 = "adm-" + "e5" * 16
EXTRA_GATEWAY_KEY = "second-gateway-key-4567"
NEW_PASSPHRASE = "the rotated passphrase 9876543210"
ROUTES = [
    {"name": "demo", "steps": [{"provider": "echo", "model": "echo-1"}]},
    {"name": "r1", "steps": [{"provider": "up1", "model": "m1"}]},
    {"name": "flaky", "steps": [{"provider": "up1", "model": "broken"}, {"provider": "echo", "model": "e"}]},
]


def system_config(upstream: MockUpstream, tmp_path: Path, *, encryption_key: str | None = ENCRYPTION_KEY,
                  routes: list[dict[str, Any]] | None = None, **top: Any) -> dict[str, Any]:
    store: dict[str, Any] = {"path": str(tmp_path / "gw.db")}
    if encryption_key is not None:
        store["encryption_key"] = encryption_key
    return base_config(upstream.url, [dict(r) for r in (routes or ROUTES)], store=store, admin_tokens=[ADMIN, ADMIN2],
                       **top)


@pytest.fixture
def admin(upstream: MockUpstream, tmp_path: Path) -> Iterator[Admin]:
    with run_live(system_config(upstream, tmp_path)) as gw:
        api = Admin(gw, tmp_path / "gw.db")
        try:
            yield api
        finally:
            api.http.close()


def db_bytes(path: Path) -> bytes:
    """The database file and its WAL, as a copy of the disk would have them."""
    return b"".join(p.read_bytes() for p in sorted(path.parent.glob(path.name + "*")))


# -- config ----------------------------------------------------------------------------------------------

def test_config_is_the_effective_configuration_with_every_secret_masked(upstream: MockUpstream, other: MockUpstream,
                                                                        tmp_path: Path) -> None:
    raw = system_config(upstream, tmp_path, api_keys=[EXTRA_GATEWAY_KEY], default_timeout="45s",
                        prices={"m1": {"input": "0.10", "output": 2}})
    raw["providers"].append({"name": "hdr", "type": "openai", "base_url": upstream.url,
                             "headers": {"Authorization": f"Bearer {HEADER_SECRET}"},
                             "proxy": f"http://carol:{PROXY_PASSWORD}@127.0.0.1:3128"})
    with run_live(raw) as gw:
        api = Admin(gw, tmp_path / "gw.db")
        api.ok("POST", "providers", db_provider(other.url, name="up2"), want=201)
        api.ok("POST", "routes", {"name": "db-route", "steps": [{"provider": "up2", "model": "x"}]}, want=201)
        d = api.ok("GET", "config")
        assert d["object"] == "config" and "document" not in d
        assert d["api_keys"] == ["(set)", "(set)"]
        assert d["admin"]["tokens"] == ["(set)", "(set)"] and d["admin"]["forward_auth"] is None
        assert d["store"] == {"path": str(tmp_path / "gw.db"), "encryption_key": "(set)"}
        assert d["default_timeout"] == 45.0 and d["workers"] == 1 and d["base_path"] == ""
        assert d["prices"]["m1"] == {"input": "0.10", "output": "2", "cached_input": None}
        providers = {p["name"]: p for p in d["providers"]}
        assert [p["name"] for p in d["providers"]] == ["up1", "up2", "echo", "hdr"], "the file's order"
        assert providers["up1"]["api_key"] == mask(YAML_KEY) and providers["up1"]["source"] == "config"
        assert providers["up2"]["source"] == "database" and providers["up2"]["overrides_config"] is True
        assert providers["up2"]["api_key"] == mask(DB_KEY) and providers["up2"]["base_url"] == other.url
        assert providers["hdr"]["headers"] == {"Authorization": mask(f"Bearer {HEADER_SECRET}")}
        assert providers["hdr"]["proxy"] == f"http://carol:{mask(PROXY_PASSWORD)}@127.0.0.1:3128"
        assert {r["name"]: r["source"] for r in d["routes"]} == {"demo": "config", "r1": "config",
                                                                 "flaky": "config", "db-route": "database"}
        api.ok("GET", "config")  # twice: the answer is stable
        assert api.seen[-1] == api.seen[-2]
        shown = "\n".join([*api.seen, gw.logs.getvalue()])
        for secret in (YAML_KEY, "sk-upstream-secret-2", DB_KEY, HEADER_SECRET, PROXY_PASSWORD, ENCRYPTION_KEY, ADMIN,
                       ADMIN2, GATEWAY_KEY, EXTRA_GATEWAY_KEY):
            assert secret not in shown, secret
        api.error("GET", "config", want=400, code="invalid_query", verbose="1")
        api.http.close()


def test_credentials_in_a_yaml_base_url_and_the_forward_auth_address_are_masked_in_config(
        upstream: MockUpstream, tmp_path: Path) -> None:
    from tests.test_admin_catalog import QUERY_SECRET, URL_PASSWORD

    raw = system_config(upstream, tmp_path,
                        admin={"forward_auth": {"address": f"http://sso:{URL_PASSWORD}@127.0.0.1:9/verify"}})
    url = upstream.url.replace("http://", f"http://bob:{URL_PASSWORD}@") + f"/v1?api-version=1&api-key={QUERY_SECRET}"
    raw["providers"].append({"name": "azureish", "type": "openai", "base_url": url})
    shown = (upstream.url.replace("http://", f"http://bob:{mask(URL_PASSWORD)}@")
             + f"/v1?api-version=1&api-key={mask(QUERY_SECRET)}")
    with run_live(raw) as gw:
        api = Admin(gw, tmp_path / "gw.db")
        d = api.ok("GET", "config")
        assert {p["name"]: p for p in d["providers"]}["azureish"]["base_url"] == shown
        assert d["admin"]["forward_auth"]["address"] == f"http://sso:{mask(URL_PASSWORD)}@127.0.0.1:9/verify"
        assert api.ok("GET", "providers/azureish")["base_url"] == shown
        answers = "\n".join(api.seen)
        assert URL_PASSWORD not in answers and QUERY_SECRET not in answers
        api.http.close()


# -- reload ------------------------------------------------------------------------------------------------

def write_config(path: Path, raw: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(raw))


def test_reload_of_an_invalid_file_is_400_and_the_running_config_keeps_serving(upstream: MockUpstream,
                                                                               tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    raw = system_config(upstream, tmp_path)
    write_config(path, raw)
    with run_live(raw, source=str(path)) as gw:
        api = Admin(gw, tmp_path / "gw.db")
        api.ok("POST", "routes", {"name": "kept", "steps": [{"provider": "up2", "model": "k"}]}, want=201)
        bad = dict(raw, port="eighty", routes=[*ROUTES, {"name": "x", "steps": [{"provider": "nope", "model": "m"}]}])
        write_config(path, bad)
        err = api.error("POST", "reload", want=400, code="invalid_fields")
        assert str(path) in err["message"] and "running configuration is kept" in err["message"]
        assert any(p.startswith("port: 'eighty' is not a whole number") for p in err["problems"]), err["problems"]
        assert any(p.startswith("routes[3].steps[0].provider: unknown provider 'nope'") for p in err["problems"])
        assert chat(gw, "demo").status_code == 200 and chat(gw, "kept").status_code == 200
        assert {r["name"] for r in api.ok("GET", "routes")["data"]} == {"demo", "r1", "flaky", "kept"}
        assert "eighty" in api.ok("GET", "health")["config"]["last_error"]
        # The file is fine alone but a database route uses a provider it no longer has: refused too.
        write_config(path, dict(raw, providers=[p for p in raw["providers"] if p["name"] != "up2"]))
        err = api.error("POST", "reload", want=400, code="invalid_fields")
        assert any("(database)" in p and "unknown provider 'up2'" in p for p in err["problems"]), err["problems"]
        assert api.sql("SELECT count(*) FROM audit_log WHERE action = 'config.reload'") == [(0,)]

        added = {"name": "added", "steps": [{"provider": "echo", "model": "a"}]}
        write_config(path, dict(raw, routes=[*ROUTES, added]))
        d = api.ok("POST", "reload")
        assert d == {"object": "config.reload", "reloaded": True, "source": str(path), "providers": 3, "routes": 5,
                     "database_providers": 0, "database_routes": 1}
        r = chat(gw, "added")  # at once on this worker
        assert r.status_code == 200 and r.json()["model"] == "a"
        assert chat(gw, "kept").status_code == 200, "the database's entries stay merged over the new file"
        assert api.ok("GET", "health")["config"]["last_error"] is None
        rows = api.ok("GET", "audit", action="config.reload")["data"]
        assert [(r["actor"], r["object"]) for r in rows] == [("token0", None)]
        api.error("POST", "reload", {"force": True}, want=400, code="invalid_fields")
        api.http.close()


def test_reload_with_the_second_admin_token_is_audited_as_token1(upstream: MockUpstream, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    raw = system_config(upstream, tmp_path)
    write_config(path, raw)
    with run_live(raw, source=str(path)) as gw:
        r = httpx.post(gw.url + V1 + "reload", headers={"authorization": f"Bearer {ADMIN2}"})
        assert r.status_code == 200, r.text
        api = Admin(gw, tmp_path / "gw.db")
        assert api.ok("GET", "audit", action="config.reload")["data"][0]["actor"] == "token1"
        api.http.close()


# -- health ------------------------------------------------------------------------------------------------

def test_health_reports_version_pid_uptime_database_and_each_providers_last_error(admin: Admin,
                                                                                upstream: MockUpstream) -> None:
    d = admin.ok("GET", "health")
    assert d["object"] == "health" and d["status"] == "ok"
    assert d["version"] == at_gateway.__version__ and d["commit"] == build_commit()
    assert d["pid"] == os.getpid() and d["workers"] == 1  # in-process: this test's pid
    assert isinstance(d["uptime_s"], float) and d["uptime_s"] >= 0 and d["started_at"].endswith("Z")
    assert d["config"] == {"source": "test-config", "version": d["config"]["version"], "last_error": None,
                           "providers": 3, "routes": 3}
    database = d["database"]
    assert database["path"] == str(admin.db_path) and database["persistent"] is True
    assert database["reachable"] is True and database["error"] is None
    assert database["schema_version"] == db.SCHEMA_VERSION
    assert database["encryption"]["enabled"] is True and database["encryption"]["key_id"]
    assert set(d["providers"]) == {"up1", "up2", "echo"}
    assert all(p["last_error"] is None for p in d["providers"].values())

    upstream.replies["broken"] = Reply(status=500, body={"error": {"message": f"upstream says: {YAML_KEY} is bad"}})
    r = chat(admin.gw, "flaky")  # step 0 fails on up1, step 1 (echo) answers
    assert r.status_code == 200 and r.headers["x-gateway-attempts"] == "2"
    up1 = admin.ok("GET", "health")["providers"]["up1"]
    err = up1["last_error"]
    assert up1["type"] == "openai" and up1["source"] == "config"
    assert err["status"] == 500 and err["model"] == "broken" and err["route"] == "flaky" and err["timeout"] is False
    assert "upstream says: [REDACTED] is bad" in err["error"] and YAML_KEY not in str(err)
    assert err["time"].endswith("Z")
    assert admin.ok("GET", "health")["providers"]["echo"]["last_error"] is None
    assert chat(admin.gw, "r1").status_code == 200  # a later success does not clear what health reports
    assert admin.ok("GET", "health")["providers"]["up1"]["last_error"]["status"] == 500


def test_health_without_a_database_file(upstream: MockUpstream) -> None:
    with run_gateway(base_config(upstream.url, admin_token=ADMIN)) as gw:
        r = httpx.get(gw.url + V1 + "health", headers={"authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 200, r.text
        d = r.json()
        assert d["database"] == {"path": ":memory:", "persistent": False, "reachable": None, "schema_version": None}
        assert d["pid"] == os.getpid() and d["uptime_s"] is None


def _ctx(*attempts: Attempt, route: str | None = "r") -> RequestContext:
    ctx = RequestContext("id", route=route)
    ctx.attempts.extend(attempts)
    return ctx


METER_CASES = [
    pytest.param(_ctx(Attempt(0, "a", "m", status=200, ok=True)), {}, id="served-first-time"),
    pytest.param(_ctx(), {}, id="no-attempt"),
    pytest.param(_ctx(Attempt(0, "a", "m", status=500, error="HTTP 500"), route=None), {}, id="no-route"),
    pytest.param(_ctx(Attempt(0, "a", "m", status=500, error="HTTP 500")), {"a": (500, "HTTP 500")}, id="failed"),
    pytest.param(_ctx(Attempt(0, "a", "m", status=429, error="slow down"), Attempt(1, "b", "n", status=200, ok=True)),
                 {"a": (429, "slow down")}, id="fell-through"),
    pytest.param(_ctx(Attempt(0, "a", "m", status=500, error="first"), Attempt(1, "a", "m", status=502,
                                                                             error="second")),
                 {"a": (502, "second")}, id="the-last-one-per-provider"),
    pytest.param(_ctx(Attempt(0, "a", "m", status=200, ok=True, error="stream interrupted")),
                 {"a": (200, "stream interrupted")}, id="stream-broken-after-its-first-chunk"),
    pytest.param(_ctx(Attempt(0, "a", "m", error="circuit open (for 3.0s more)", skipped=True),
                      Attempt(1, "b", "n", status=200, ok=True)), {}, id="skipped-sent-nothing"),
]


@pytest.mark.parametrize(("ctx", "want"), METER_CASES)
def test_the_usage_meter_keeps_each_providers_last_failed_attempt(ctx: RequestContext,
                                                                 want: dict[str, tuple[int, str]]) -> None:
    meter = UsageMeter()
    meter.record(ctx)
    assert {p: (e["status"], e["error"]) for p, e in meter.last_errors.items()} == want


# -- rotate-key --------------------------------------------------------------------------------------------

def _serve_with_db_provider(api: Admin, other: MockUpstream) -> None:
    api.ok("POST", "providers", db_provider(other.url, headers={"X-Org": HEADER_SECRET}), want=201)
    api.ok("POST", "routes", {"name": "via", "steps": [{"provider": "db1", "model": "m"}]}, want=201)
    reached(api.gw, other)


def reached(gw: RunningGateway, other: MockUpstream) -> None:
    before = len(other.received)
    r = chat(gw, "via")
    assert r.status_code == 200, r.text
    assert len(other.received) == before + 1
    assert other.received[-1].headers["authorization"] == f"Bearer {DB_KEY}"
    assert other.received[-1].headers["x-org"] == HEADER_SECRET


@pytest.mark.parametrize("initial", [ENCRYPTION_KEY, None], ids=["from-a-key", "from-plaintext"])
def test_rotate_key_through_the_api_then_chat_works_and_a_restart_needs_the_new_passphrase(
        upstream: MockUpstream, other: MockUpstream, tmp_path: Path, initial: str | None) -> None:
    path = tmp_path / "gw.db"
    with run_live(system_config(upstream, tmp_path, encryption_key=initial)) as gw:
        api = Admin(gw, path)
        _serve_with_db_provider(api, other)
        assert (DB_KEY.encode() in db_bytes(path)) == (initial is None), "plaintext only without a key"
        d = api.ok("POST", "rotate-key", {"encryption_key": NEW_PASSPHRASE})
        assert d["object"] == "encryption_key.rotate" and d["rotated"] == 2  # the api_key and the header
        assert d["key_id"] and d["key_id"] != d["previous_key_id"]
        assert (d["previous_key_id"] is None) == (initial is None)
        assert any("store.encryption_key" in step for step in d["next_steps"])
        reached(gw, other)  # the running gateway still sends the same credentials
        api.ok("PATCH", "providers/db1", {"base_url": other.url})  # written under the new key
        reached(gw, other)
        row = api.ok("GET", "audit", action="encryption_key.rotate")["data"][0]
        assert row["actor"] == "token0" and row["change"]["secrets"] == 2
        raw = db_bytes(path)
        assert DB_KEY.encode() not in raw and HEADER_SECRET.encode() not in raw
        assert b"enc:v1:" + d["key_id"].encode() in raw
        shown = "\n".join([*api.seen, gw.logs.getvalue()]) + raw.decode("latin-1")
        assert NEW_PASSPHRASE not in shown and ENCRYPTION_KEY not in shown and DB_KEY not in shown
        api.http.close()
    with pytest.raises(ConfigError) as refused:  # the old passphrase (or none) no longer opens the database
        with run_live(system_config(upstream, tmp_path, encryption_key=initial)):
            pass
    assert "db1" in refused.value.render() and NEW_PASSPHRASE not in refused.value.render()
    with run_live(system_config(upstream, tmp_path, encryption_key=NEW_PASSPHRASE)) as gw:
        reached(gw, other)


ROTATE_INVALID = [
    pytest.param({}, "body.encryption_key: required", id="missing"),
    pytest.param({"encryption_key": "short-15-chars!"}, "body.encryption_key: must be a passphrase of 16", id="short"),
    pytest.param({"encryption_key": " " * 20}, "body.encryption_key: must be a passphrase", id="blank"),
    pytest.param({"encryption_key": 1234567890123456789}, "body.encryption_key: must be a passphrase", id="number"),
    pytest.param({"encryption_key": NEW_PASSPHRASE, "key_id": "x"}, "body.key_id: unknown field", id="unknown-field"),
]


@pytest.mark.parametrize(("body", "problem"), ROTATE_INVALID)
def test_rotate_key_refuses_a_bad_body_and_changes_nothing(admin: Admin, other: MockUpstream, body: dict[str, Any],
                                                           problem: str) -> None:
    _serve_with_db_provider(admin, other)
    before = admin.sql("SELECT spec FROM providers")
    err = admin.error("POST", "rotate-key", body, want=400, code="invalid_fields")
    assert any(p.startswith(problem) for p in err["problems"]), err["problems"]
    assert "short-15-chars!" not in err["message"] and NEW_PASSPHRASE not in err["message"]
    assert admin.sql("SELECT spec FROM providers") == before
    assert admin.sql("SELECT count(*) FROM audit_log WHERE action = 'encryption_key.rotate'") == [(0,)]


def test_rotate_key_refused_when_another_process_changed_the_key_and_when_a_row_does_not_decrypt(
        admin: Admin, other: MockUpstream) -> None:
    _serve_with_db_provider(admin, other)
    [(kid,)] = admin.sql("SELECT value FROM settings WHERE name = 'key_id'")
    admin.sql("UPDATE settings SET value = 'ffffffffffffffff' WHERE name = 'key_id'")  # as another process's rotation
    err = admin.error("POST", "rotate-key", {"encryption_key": NEW_PASSPHRASE}, want=409, code="rotate_key_conflict")
    assert "not rotated" in err["message"] and NEW_PASSPHRASE not in err["message"]
    admin.sql("UPDATE settings SET value = ? WHERE name = 'key_id'", (kid,))
    reached(admin.gw, other)

    [(spec,)] = admin.sql("SELECT spec FROM providers WHERE name = 'db1'")
    damaged = spec.replace('"enc:v1:', '"enc:v1:x', 1)  # the api_key no longer decrypts
    admin.sql("UPDATE providers SET spec = ? WHERE name = 'db1'", (damaged,))
    err = admin.error("POST", "rotate-key", {"encryption_key": NEW_PASSPHRASE}, want=500, code="rotate_key_failed")
    assert "rolled back" in err["message"] and "db1" in err["message"] and NEW_PASSPHRASE not in err["message"]
    assert DB_KEY not in err["message"]
    assert admin.sql("SELECT spec FROM providers WHERE name = 'db1'") == [(damaged,)]
    assert admin.sql("SELECT value FROM settings WHERE name = 'key_id'") == [(kid,)], "the old key stays"
    admin.sql("UPDATE providers SET spec = ? WHERE name = 'db1'", (spec,))
    assert admin.ok("POST", "rotate-key", {"encryption_key": NEW_PASSPHRASE})["rotated"] == 2
    reached(admin.gw, other)


def test_rotate_key_needs_a_database_file(upstream: MockUpstream) -> None:
    with run_gateway(base_config(upstream.url, admin_token=ADMIN)) as gw:
        r = httpx.post(gw.url + V1 + "rotate-key", headers={"authorization": f"Bearer {ADMIN}"},
                       json={"encryption_key": NEW_PASSPHRASE})
        assert r.status_code == 409 and r.json()["error"]["code"] == "store_in_memory", r.text


def test_the_sqlite_file_holds_no_plaintext_credential_with_an_encryption_key(admin: Admin,
                                                                             other: MockUpstream) -> None:
    _serve_with_db_provider(admin, other)
    admin.ok("PATCH", "providers/db1", {"api_key": DB_KEY + "-v2"})
    conn = sqlite3.connect(admin.db_path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the rows in the main file too, not only the WAL
    finally:
        conn.close()
    raw = db_bytes(admin.db_path)
    assert DB_KEY.encode() not in raw and HEADER_SECRET.encode() not in raw and b"enc:v1:" in raw


# -- the database busy, a rotation whose rebuild fails ----------------------------------------------------------

def test_a_database_locked_by_another_writer_is_503_store_busy_and_a_retry_succeeds(admin: Admin,
                                                                                   other: MockUpstream) -> None:
    """Another process (a long CLI command, another worker's rotation) holds the write lock longer than the busy
    timeout: 503 store_busy with Retry-After: 1, nothing changed, the catalog's connection not left inside a
    transaction; the same requests succeed once it is done."""
    _serve_with_db_provider(admin, other)
    catalog = admin.gw.gateway.services.catalog
    assert catalog is not None
    admin.gw.portal.call(catalog.call, lambda: catalog.conn.execute("PRAGMA busy_timeout = 100"))  # not 5 s
    before = admin.sql("SELECT * FROM audit_log")
    locker = sqlite3.connect(admin.db_path, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    calls = [("POST", "routes", {"name": "r", "steps": [{"provider": "echo", "model": "m"}]}, 201),
             ("DELETE", "routes/via", None, 200), ("POST", "clients", {"name": "app"}, 201),
             ("POST", "rotate-key", {"encryption_key": NEW_PASSPHRASE}, 200)]
    try:
        for method, path, body, _ in calls:
            r = admin.call(method, path, body)
            assert r.status_code == 503 and r.headers["retry-after"] == "1", (path, r.status_code, r.text)
            err = r.json()["error"]
            assert err["code"] == "store_busy" and "retry" in err["message"] and NEW_PASSPHRASE not in r.text
            assert not admin.gw.portal.call(catalog.call, lambda: catalog.conn.in_transaction)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert admin.sql("SELECT * FROM audit_log") == before
    reached(admin.gw, other)  # the old key still serves
    for method, path, body, status in calls:
        admin.ok(method, path, body, want=status)
    assert not [ln for ln in admin.gw.log_lines() if "Traceback" in ln]


def test_rotate_key_answers_200_when_the_rotation_committed_and_the_rebuild_failed(admin: Admin,
                                                                                  other: MockUpstream) -> None:
    """The rotation is in the database: a failing rebuild here must not answer 500 (an operator would retry, or
    not change store.encryption_key). Logged, and the watch rebuilds."""
    _serve_with_db_provider(admin, other)
    live = admin.gw.live  # type: ignore[attr-defined]

    async def failing(*, force: bool = False) -> bool:
        raise RuntimeError("the rebuild failed")

    live.refresh = failing  # this worker's rebuild, not the store or the network
    try:
        d = admin.ok("POST", "rotate-key", {"encryption_key": NEW_PASSPHRASE})
    finally:
        del live.refresh
    assert d["rotated"] == 2 and d["key_id"]
    assert admin.sql("SELECT count(*) FROM audit_log WHERE action = 'encryption_key.rotate'") == [(1,)]
    logged = [ln for ln in admin.gw.log_lines() if "rotate-key: the key was rotated" in ln]
    assert len(logged) == 1 and NEW_PASSPHRASE not in logged[0]
    reached(admin.gw, other)
