"""Admin API ``clients``: the store's client keys managed over HTTP on a gateway running as ``serve`` runs it
(``run_live``: a real sqlite file, the key cache polling it, real sockets).

What is asserted: every endpoint's status and body; fields taken as ``keys create`` takes them and every bad
one refused with its path; the secret in the create and rotate answers only (never in a read, an audit row,
the log or the database file); one audit row per write, holding what changed; pages walking every key once
in (created_at, id) order, ties included; and a key made or changed here served (or refused) by the running
gateway within a second.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import GATEWAY_KEY, RunningGateway, base_config, run_gateway, run_live
from tests.mock_upstream import MockUpstream, wait_until

ADMIN = "adm-" + "c3" * 16
V1 = "/admin/api/v1/"
CHAT = "/v1/chat/completions"
KEY_RE = re.compile(r"^atg_([a-z0-9]{12})_([A-Za-z0-9_-]{43})$")
SEEN_WITHIN = 1.0  # the issue: a change applies to the running gateway within 1 s
ROUTES = [
    {"name": "demo", "steps": [{"provider": "echo", "model": "echo-1"}]},
    {"name": "other", "steps": [{"provider": "echo", "model": "echo-2"}]},
]


# -- harness ---------------------------------------------------------------------------------------------

class Admin:
    """The admin API of one running gateway, with the admin token; remembers every answer's text, so a test
    can grep everything it was shown."""

    def __init__(self, gw: RunningGateway, db_path: Path) -> None:
        self.gw = gw
        self.db_path = db_path
        self.http = httpx.Client(base_url=gw.url + V1, headers={"authorization": f"Bearer {ADMIN}"}, timeout=10)
        self.seen: list[str] = []  # every answer but the two kinds that hold a secret
        self.secret_answers: list[str] = []  # POST clients, POST clients/{id}/rotate (2xx)

    def call(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
             **params: Any) -> httpx.Response:
        """``raw``: these bytes as the body, sent as JSON is (``Content-Type: application/json``)."""
        r = self.http.request(method, path, params=params or None, content=raw,
                              json=body if raw is None else None,
                              headers={"content-type": "application/json"} if raw is not None else None)
        holds_secret = method == "POST" and (path == "clients" or path.endswith("/rotate")) and r.status_code < 300
        (self.secret_answers if holds_secret else self.seen).append(r.text)
        return r

    def ok(self, method: str, path: str, body: Any = None, want: int = 200, **params: Any) -> Any:
        r = self.call(method, path, body, **params)
        assert r.status_code == want, (r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json")
        assert r.headers["cache-control"] == "no-store"
        return r.json()

    def error(self, method: str, path: str, body: Any = None, *, want: int, code: str, raw: bytes | None = None,
              **params: Any) -> dict[str, Any]:
        r = self.call(method, path, body, raw=raw, **params)
        assert r.status_code == want, (r.status_code, r.text)
        err = r.json()["error"]
        assert err["code"] == code and isinstance(err["message"], str) and err["message"] and "type" in err, err
        assert "Traceback" not in r.text
        return dict(err)

    def create(self, **fields: Any) -> tuple[dict[str, Any], str]:
        d = self.ok("POST", "clients", {"name": "app", **fields}, want=201)
        return d, d["key"]

    def walk(self, path: str, limit: int, **params: Any) -> list[dict[str, Any]]:
        """Every row of a paginated listing, following next_cursor."""
        out: list[dict[str, Any]] = []
        cursor = None
        for _ in range(10_000):
            page = self.ok("GET", path, limit=limit, **({"cursor": cursor} if cursor else {}), **params)
            assert page["object"] == "list" and len(page["data"]) <= limit
            out += page["data"]
            cursor = page["next_cursor"]
            if cursor is None:
                return out
            assert page["data"], "a page with a next cursor has rows"
        raise AssertionError("pagination did not end")

    def flush(self) -> None:
        """The request log and usage written now (the recorder writes in batches)."""
        store = self.gw.gateway.services.store
        assert store is not None
        self.gw.portal.call(store.flush)

    def sql(self, query: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """A query on the database file through a connection of the test's own."""
        conn = sqlite3.connect(self.db_path, timeout=5)
        try:
            with conn:
                return conn.execute(query, args).fetchall()
        finally:
            conn.close()

    def everything_shown(self) -> str:
        """Every admin answer but those that hold a secret, the audit table, the log and the database file's
        bytes, as one text."""
        audit = json.dumps(self.sql("SELECT * FROM audit_log"))
        files = b"".join(p.read_bytes() for p in self.db_path.parent.glob(self.db_path.name + "*"))
        return "\n".join([*self.seen, audit, self.gw.logs.getvalue(), files.decode("latin-1")])


def admin_config(upstream: MockUpstream, tmp_path: Path, **top: Any) -> dict[str, Any]:
    return base_config(upstream.url, [dict(r) for r in ROUTES], store={"path": str(tmp_path / "gw.db")},
                       admin_token=ADMIN, **top)


@pytest.fixture
def admin(upstream: MockUpstream, tmp_path: Path) -> Iterator[Admin]:
    with run_live(admin_config(upstream, tmp_path)) as gw:
        api = Admin(gw, tmp_path / "gw.db")
        try:
            yield api
        finally:
            api.http.close()


def chat(gw: RunningGateway, key: str, model: str = "demo") -> httpx.Response:
    return httpx.post(gw.url + CHAT, headers={"authorization": f"Bearer {key}"},
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}]}, timeout=10)


def status_within(gw: RunningGateway, key: str, want: int, model: str = "demo") -> None:
    """A chat with ``key`` is answered ``want`` within SEEN_WITHIN seconds of now."""
    last: list[httpx.Response] = []

    def answered() -> bool:
        last[:] = [chat(gw, key, model)]
        return last[0].status_code == want

    assert wait_until(answered, SEEN_WITHIN), (last[0].status_code, last[0].text) if last else None


def secret_of(key: str) -> str:
    m = KEY_RE.match(key)
    assert m, key
    return m.group(2)


def hash_forms(key: str) -> list[str]:
    """The stored hash of the key's secret as a read could spell it: hex, base64."""
    digest = hashlib.sha256(secret_of(key).encode()).digest()
    return [digest.hex(), digest.hex().upper(), base64.b64encode(digest).decode().rstrip("="),
            base64.urlsafe_b64encode(digest).decode().rstrip("=")]


# -- create, read --------------------------------------------------------------------------------------------

READ_FIELDS = {"object", "id", "name", "prefix", "state", "routes", "limits", "effective_limits", "budget_usd",
               "budget_nanousd", "budget_period", "max_tokens", "system_prompt", "metadata", "expires_at",
               "created_at", "updated_at", "usage_today"}

CREATE_CASES = [
    pytest.param({}, {"routes": ["*"], "limits": {}, "budget_usd": None, "budget_period": None, "max_tokens": None,
                      "system_prompt": None, "metadata": {}, "expires_at": None}, id="defaults"),
    pytest.param({"routes": ["demo", "gpt-*"], "limits": {"rpm": 60, "tpd": 10000}},
                 {"routes": ["demo", "gpt-*"], "limits": {"rpm": 60, "tpd": 10000}}, id="routes-limits"),
    pytest.param({"routes": ["*"]}, {"routes": ["*"]}, id="star-is-every-route"),
    pytest.param({"budget": "2.50"}, {"budget_usd": "2.50", "budget_nanousd": 2_500_000_000,
                                      "budget_period": "month"}, id="budget-string-default-month"),
    pytest.param({"budget": 0.1, "budget_period": "day"}, {"budget_usd": "0.10", "budget_nanousd": 100_000_000,
                                                           "budget_period": "day"}, id="budget-float-exact"),
    pytest.param({"budget": "$5", "budget_period": "week"}, {"budget_nanousd": 5 * 10**9, "budget_period": "week"},
                 id="budget-dollar-sign"),
    pytest.param({"budget": 0}, {"budget_usd": "0.00", "budget_nanousd": 0}, id="budget-zero"),
    pytest.param({"max_tokens": 256, "system_prompt": "be brief", "metadata": {"team": "search", "n": [1]}},
                 {"max_tokens": 256, "system_prompt": "be brief", "metadata": {"team": "search", "n": [1]}},
                 id="prompt-metadata"),
    pytest.param({"expires_at": "2099-01-31T12:00:00Z"}, {"expires_at": "2099-01-31T12:00:00Z"}, id="expires-iso"),
    pytest.param({"expires_at": 4102444800}, {"expires_at": "2100-01-01T00:00:00Z"}, id="expires-unix"),
    pytest.param({"expires_at": None, "budget": None, "limits": None}, {"expires_at": None, "budget_usd": None,
                                                                        "limits": {}}, id="nulls"),
]


@pytest.mark.parametrize(("fields", "want"), CREATE_CASES)
def test_create_answers_201_with_the_key_and_the_settings_as_keys_create_takes_them(
        admin: Admin, fields: dict[str, Any], want: dict[str, Any]) -> None:
    d, key = admin.create(**fields)
    m = KEY_RE.match(key)
    assert m and m.group(1) == d["id"]
    assert set(d) - {"usage_budget_period"} == READ_FIELDS | {"key"}
    assert ("usage_budget_period" in d) == (d["budget_nanousd"] is not None)
    assert d["object"] == "client" and d["name"] == "app" and d["state"] == "active"
    assert d["prefix"] == f"atg_{d['id']}_{secret_of(key)[:4]}"
    for k, v in want.items():
        assert d[k] == v, (k, d[k])
    assert d["usage_today"] == {"requests": 0, "tokens": 0, "cost_nanousd": 0, "cost_usd": "0.000000000",
                                "unpriced": 0}
    one = admin.ok("GET", f"clients/{d['id']}")
    assert "key" not in one and set(one) - {"usage_budget_period"} == READ_FIELDS
    assert {k: v for k, v in one.items() if k != "usage_budget_period"} == \
        {k: v for k, v in d.items() if k not in ("key", "usage_budget_period")}


def test_expires_at_takes_a_duration_from_now(admin: Admin) -> None:
    before = time.time()
    d, _ = admin.create(expires_at="30d")
    import datetime as dt

    stamp = dt.datetime.fromisoformat(d["expires_at"].replace("Z", "+00:00")).timestamp()
    assert before + 30 * 86400 - 2 <= stamp <= time.time() + 30 * 86400 + 1


def test_effective_limits_show_the_configs_defaults_under_the_keys_own(upstream: MockUpstream, tmp_path: Path) -> None:
    with run_live(admin_config(upstream, tmp_path, limits={"rpm": 100, "tpm": 5000})) as gw:
        api = Admin(gw, tmp_path / "gw.db")
        d, _ = api.create(limits={"rpm": 10})
        assert d["limits"] == {"rpm": 10} and d["effective_limits"] == {"rpm": 10, "tpm": 5000}
        api.http.close()


INVALID_CASES = [
    pytest.param({"secret": "x"}, ["body.secret: unknown field"], id="unknown-field"),
    pytest.param({"limits": {"rpx": 1}}, ["body.limits.rpx: unknown field"], id="unknown-limit"),
    pytest.param({"limits": {"rpm": 0}}, ["body.limits.rpm: must be a whole number"], id="limit-zero"),
    pytest.param({"limits": {"tpm": 1.5}}, ["body.limits.tpm: must be a whole number"], id="limit-float"),
    pytest.param({"limits": {"rpd": True}}, ["body.limits.rpd: must be a whole number"], id="limit-bool"),
    pytest.param({"limits": {"rph": 2**53 + 1}}, ["body.limits.rph: must be a whole number"], id="limit-huge"),
    pytest.param({"limits": [1]}, ["body.limits: must be an object"], id="limits-list"),
    pytest.param({"routes": "demo"}, ["body.routes: must be a list"], id="routes-string"),
    pytest.param({"routes": ["demo", "", 3]}, ["body.routes[1]: must be a non-empty string",
                                               "body.routes[2]: must be a non-empty string"], id="routes-items"),
    pytest.param({"budget": "abc"}, ["body.budget: 'abc' is not an amount"], id="budget-text"),
    pytest.param({"budget": -1}, ["body.budget: must be an amount in USD, 0 or more"], id="budget-negative"),
    pytest.param({"budget": 10**10}, ["body.budget: must be at most 1000000000 USD"], id="budget-huge"),
    pytest.param({"budget": True}, ["body.budget: must be an amount in USD"], id="budget-bool"),
    pytest.param({"budget_period": "day"}, ["body.budget_period: needs a budget"], id="period-without-budget"),
    pytest.param({"budget": 1, "budget_period": "year"}, ["body.budget_period: must be one of day, week, month"],
                 id="period-unknown"),
    pytest.param({"max_tokens": 0}, ["body.max_tokens: must be a whole number"], id="max-tokens-zero"),
    pytest.param({"max_tokens": "100"}, ["body.max_tokens: must be a whole number"], id="max-tokens-string"),
    pytest.param({"system_prompt": 5}, ["body.system_prompt: must be a string"], id="prompt-number"),
    pytest.param({"metadata": ["a"]}, ["body.metadata: must be a JSON object"], id="metadata-list"),
    pytest.param({"expires_at": "2001-01-01"}, ["body.expires_at: '2001-01-01' is in the past"], id="expires-past"),
    pytest.param({"expires_at": 1}, ["body.expires_at: is in the past"], id="expires-past-unix"),
    pytest.param({"expires_at": "soon"}, ["body.expires_at: 'soon' is not a time"], id="expires-text"),
    pytest.param({"expires_at": 10**12}, ["body.expires_at: must be a unix time before"], id="expires-far"),
    pytest.param({"expires_at": "never"}, ["body.expires_at: use null"], id="expires-never-word"),
    pytest.param({"name": ""}, ["body.name: must be a non-empty string"], id="name-empty"),
    pytest.param({"name": 7}, ["body.name: must be a non-empty string"], id="name-number"),
    pytest.param({"name": None}, ["body.name: required"], id="name-null"),
    pytest.param({"state": "disabled"}, ["body.state: unknown field"], id="no-state-on-create"),
    pytest.param({"limits": {"rpm": 0, "zz": 1}, "budget": "x", "extra": 1},
                 ["body.extra: unknown field"], id="unknown-fields-first"),
    pytest.param({"limits": {"rpm": 0, "zz": 1}, "budget": "x"},
                 ["body.limits.rpm: must be", "body.limits.zz: unknown field", "body.budget: 'x' is not"],
                 id="every-problem-listed"),
]


@pytest.mark.parametrize(("fields", "problems"), INVALID_CASES)
def test_create_refuses_bad_fields_with_400_listing_each_path(admin: Admin, fields: dict[str, Any],
                                                              problems: list[str]) -> None:
    body = {"name": "app", **fields}
    err = admin.error("POST", "clients", body, want=400, code="invalid_fields")
    assert len(err["problems"]) == len(problems), err["problems"]
    for got, want in zip(sorted(err["problems"]), sorted(problems), strict=True):
        assert got.startswith(want), (got, want)
    for p in problems:
        assert p.split(":")[0] in err["message"]
    assert admin.sql("SELECT count(*) FROM keys") == [(0,)]
    assert admin.sql("SELECT count(*) FROM audit_log") == [(0,)]


BAD_BODIES = [
    pytest.param(b"", "invalid_json", id="empty"),
    pytest.param(b"{not json", "invalid_json", id="not-json"),
    pytest.param(b"[1, 2]", "invalid_json", id="not-an-object"),
    pytest.param(b'{"name": "a", "budget": NaN}', "invalid_json", id="nan"),
]


@pytest.mark.parametrize(("raw", "code"), BAD_BODIES)
def test_create_with_a_body_that_is_not_a_json_object_is_400(admin: Admin, raw: bytes, code: str) -> None:
    admin.error("POST", "clients", raw=raw, want=400, code=code)


def test_a_store_in_memory_answers_409_store_in_memory(upstream: MockUpstream) -> None:
    with run_gateway(base_config(upstream.url, admin_token=ADMIN)) as gw:
        r = httpx.get(gw.url + V1 + "clients", headers={"authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "store_in_memory", r.text


def test_clients_need_the_admin_token(admin: Admin) -> None:
    for headers in ({}, {"authorization": f"Bearer {GATEWAY_KEY}"}):
        r = httpx.post(admin.gw.url + V1 + "clients", headers=headers, json={"name": "x"})
        assert r.status_code == 401, r.text
    _, key = admin.create()
    r = httpx.get(admin.gw.url + V1 + "clients", headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 401, "a client key never opens the admin API"
    assert admin.sql("SELECT count(*) FROM keys") == [(1,)]


# -- unknown ids, methods --------------------------------------------------------------------------------

UNKNOWN_ID_CALLS = [("GET", ""), ("PATCH", ""), ("DELETE", ""), ("POST", "/rotate")]


@pytest.mark.parametrize(("method", "tail"), UNKNOWN_ID_CALLS, ids=[m + t for m, t in UNKNOWN_ID_CALLS])
def test_an_unknown_id_is_404_client_not_found(admin: Admin, method: str, tail: str) -> None:
    body = {"name": "x"} if method == "PATCH" else None
    err = admin.error(method, f"clients/abcdefghijkl{tail}", body, want=404, code="client_not_found")
    assert "abcdefghijkl" in err["message"]
    _, key = admin.create()
    # A whole key pasted where the id goes: 404, and the answer does not repeat it.
    err = admin.error(method, f"clients/{key}{tail}", body, want=404, code="client_not_found")
    assert secret_of(key) not in json.dumps(err)
    assert admin.sql("SELECT count(*) FROM audit_log") == [(1,)]  # the create only


def test_other_methods_are_405_with_allow(admin: Admin) -> None:
    d, _ = admin.create()
    r = admin.call("PUT", f"clients/{d['id']}", {"name": "x"})
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"DELETE", "GET", "PATCH"}
    r = admin.call("GET", f"clients/{d['id']}/rotate")
    assert r.status_code == 405 and r.headers["allow"] == "POST"


# -- update, revoke, rotate ---------------------------------------------------------------------------------

UPDATE_CASES = [
    pytest.param({"limits": {"rpm": 60}}, {}, {"rpm": 5, "tpm": 100},
                 {"limits": {"rpm": 60, "tpm": 100}}, id="limit-changed-others-kept"),
    pytest.param({"limits": {"tpm": None}}, {}, {"rpm": 5, "tpm": 100}, {"limits": {"rpm": 5}},
                 id="limit-null-clears-one"),
    pytest.param({"limits": None}, {}, {"rpm": 5, "tpm": 100}, {"limits": {}}, id="limits-null-clears-all"),
    pytest.param({"routes": ["other"]}, {}, None, {"routes": ["other"]}, id="routes"),
    pytest.param({"routes": None}, {"routes": ["demo"]}, None, {"routes": ["*"]}, id="routes-null-every-route"),
    pytest.param({"name": "renamed"}, {}, None, {"name": "renamed"}, id="name"),
    pytest.param({"budget": "7"}, {}, None, {"budget_usd": "7.00", "budget_period": "month"},
                 id="budget-set-default-month"),
    pytest.param({"budget": None}, {"budget": 3}, None, {"budget_usd": None, "budget_period": None},
                 id="budget-null-clears"),
    pytest.param({"budget_period": None}, {"budget": 3, "budget_period": "day"}, None,
                 {"budget_usd": "3.00", "budget_period": "month"}, id="period-null-back-to-month"),
    pytest.param({"budget_period": "week"}, {"budget": 3}, None, {"budget_period": "week"}, id="period"),
    pytest.param({"max_tokens": None, "system_prompt": None}, {"max_tokens": 9, "system_prompt": "p"}, None,
                 {"max_tokens": None, "system_prompt": None}, id="clear-prompt-and-cap"),
    pytest.param({"metadata": {"a": 1}}, {"metadata": {"b": 2}}, None, {"metadata": {"a": 1}}, id="metadata"),
    pytest.param({"metadata": None}, {"metadata": {"b": 2}}, None, {"metadata": {}}, id="metadata-null"),
    pytest.param({"expires_at": None}, {"expires_at": "2099-01-01"}, None, {"expires_at": None}, id="never-expires"),
    pytest.param({"state": "disabled"}, {}, None, {"state": "disabled"}, id="disable"),
    pytest.param({"state": "active", "name": "back"}, {}, None, {"state": "active", "name": "back"},
                 id="enable-and-rename"),
]


@pytest.mark.parametrize(("change", "initial", "limits", "want"), UPDATE_CASES)
def test_patch_changes_what_it_names_and_audits_from_and_to(admin: Admin, change: dict[str, Any],
                                                            initial: dict[str, Any], limits: dict[str, int] | None,
                                                            want: dict[str, Any]) -> None:
    d, key = admin.create(**initial, **({"limits": limits} if limits else {}))
    if change.get("state") == "active":
        admin.ok("PATCH", f"clients/{d['id']}", {"state": "disabled"})
    before = admin.ok("GET", f"clients/{d['id']}")
    after = admin.ok("PATCH", f"clients/{d['id']}", change)
    for k, v in want.items():
        assert after[k] == v, (k, after[k])
    assert admin.ok("GET", f"clients/{d['id']}") | {"usage_budget_period": None} == \
        after | {"usage_budget_period": None}
    untouched = {"name", "routes", "limits", "budget_usd", "budget_period", "max_tokens", "system_prompt",
                 "metadata", "expires_at", "state"} - set(want)
    assert {k: after[k] for k in untouched} == {k: before[k] for k in untouched}
    assert after["prefix"] == before["prefix"], "the secret stays"
    rows = admin.ok("GET", "audit", object=d["id"], action="client.update", limit=1)["data"]
    assert rows[0]["actor"] == "token0"
    audited = rows[0]["change"]
    assert audited == {k: {"from": before[k], "to": after[k]} for k in audited}
    assert set(audited) == {k for k in want if before[k] != after[k]}
    assert secret_of(key) not in admin.everything_shown()


def test_patch_that_changes_nothing_writes_no_audit_row(admin: Admin) -> None:
    d, _ = admin.create(limits={"rpm": 5})
    stamp = admin.sql("SELECT updated_at FROM keys")
    version = admin.sql("SELECT value FROM meta WHERE name = 'keys_version'")
    same = admin.ok("PATCH", f"clients/{d['id']}", {"limits": {"rpm": 5}, "name": "app", "state": "active"})
    assert same == admin.ok("GET", f"clients/{d['id']}") and same["limits"] == {"rpm": 5}
    assert [r[0] for r in admin.sql("SELECT action FROM audit_log")] == ["client.create"]
    assert admin.sql("SELECT updated_at FROM keys") == stamp, "the row is left as it was"
    assert admin.sql("SELECT value FROM meta WHERE name = 'keys_version'") == version


PATCH_INVALID = [
    pytest.param({}, "invalid_fields", ["body: nothing to change"], id="empty"),
    pytest.param({"state": "revoked"}, "invalid_fields", ["body.state: must be active or disabled"], id="revoke"),
    pytest.param({"state": "expired"}, "invalid_fields", ["body.state: must be active or disabled"], id="expired"),
    pytest.param({"name": None}, "invalid_fields", ["body.name: must be a non-empty string"], id="name-null"),
    pytest.param({"key": "atg_x"}, "invalid_fields", ["body.key: unknown field"], id="the-key"),
    pytest.param({"limits": {"rpm": -1}, "routes": [1]}, "invalid_fields",
                 ["body.limits.rpm: must be", "body.routes[0]: must be"], id="two-problems"),
]


@pytest.mark.parametrize(("change", "code", "problems"), PATCH_INVALID)
def test_patch_refuses_bad_fields_and_changes_nothing(admin: Admin, change: dict[str, Any], code: str,
                                                      problems: list[str]) -> None:
    d, _ = admin.create(limits={"rpm": 5})
    err = admin.error("PATCH", f"clients/{d['id']}", change, want=400, code=code)
    assert len(err["problems"]) == len(problems)
    for got, want in zip(sorted(err["problems"]), sorted(problems), strict=True):
        assert got.startswith(want), (got, want)
    assert admin.ok("GET", f"clients/{d['id']}")["updated_at"] == d["updated_at"]
    assert admin.sql("SELECT count(*) FROM audit_log") == [(1,)]


def test_delete_revokes_for_good_and_answers_the_key_object(admin: Admin) -> None:
    d, key = admin.create()
    gone = admin.ok("DELETE", f"clients/{d['id']}")
    assert gone["state"] == "revoked" and gone["id"] == d["id"] and "key" not in gone
    again = admin.ok("DELETE", f"clients/{d['id']}")  # revoking a revoked key: the same answer, no second row
    assert again["state"] == "revoked"
    assert admin.ok("GET", f"clients/{d['id']}")["state"] == "revoked"
    for method, tail, body in (("PATCH", "", {"name": "x"}), ("PATCH", "", {"state": "active"}),
                               ("POST", "/rotate", None)):
        admin.error(method, f"clients/{d['id']}{tail}", body, want=409, code="client_revoked")
    assert [r[0] for r in admin.sql("SELECT action FROM audit_log ORDER BY id")] == ["client.create",
                                                                                     "client.revoke"]
    change = json.loads(admin.sql("SELECT change FROM audit_log WHERE action = 'client.revoke'")[0][0])
    assert change == {"state": {"from": "active", "to": "revoked"}}
    status_within(admin.gw, key, 401)


def test_rotate_answers_a_new_secret_once_and_the_old_one_stops(admin: Admin) -> None:
    d, old = admin.create(limits={"rpm": 1000})
    status_within(admin.gw, old, 200)
    r = admin.ok("POST", f"clients/{d['id']}/rotate")
    new = r["key"]
    m = KEY_RE.match(new)
    assert m and m.group(1) == d["id"] and new != old
    assert r["prefix"] == f"atg_{d['id']}_{secret_of(new)[:4]}" and r["limits"] == {"rpm": 1000}
    status_within(admin.gw, new, 200)
    status_within(admin.gw, old, 401)
    assert "key" not in admin.ok("GET", f"clients/{d['id']}")
    [row] = admin.sql("SELECT actor, action, object, change FROM audit_log WHERE action = 'client.rotate'")
    assert row[:3] == ("token0", "client.rotate", d["id"]) and json.loads(row[3]) == {"secret": "(changed)"}
    admin.error("POST", f"clients/{d['id']}/rotate", {"x": 1}, want=400, code="invalid_fields")
    shown = admin.everything_shown()
    for key in (old, new):
        assert secret_of(key) not in shown
        assert all(h not in shown for h in hash_forms(key))


# -- the running gateway serves what is written here ------------------------------------------------------

def test_a_key_made_here_is_served_within_a_second_and_disabling_it_refuses_it(admin: Admin) -> None:
    d, key = admin.create(routes=["demo"])
    status_within(admin.gw, key, 200)
    assert chat(admin.gw, key, "other").status_code == 403  # its routes
    admin.ok("PATCH", f"clients/{d['id']}", {"state": "disabled"})
    status_within(admin.gw, key, 401)
    r = chat(admin.gw, key)
    assert "disabled" in r.json()["error"]["message"]
    admin.ok("PATCH", f"clients/{d['id']}", {"state": "active", "routes": ["other"]})
    status_within(admin.gw, key, 200, model="other")
    assert chat(admin.gw, key, "demo").status_code == 403


def test_usage_today_counts_the_keys_requests(admin: Admin) -> None:
    d, key = admin.create()
    other, key2 = admin.create(name="other")
    status_within(admin.gw, key, 200)
    for _ in range(2):
        assert chat(admin.gw, key).status_code == 200
    assert chat(admin.gw, key2).status_code == 200
    admin.flush()
    one = admin.ok("GET", f"clients/{d['id']}")["usage_today"]
    assert one["requests"] == 3 and one["tokens"] > 0 and one["cost_usd"] == "0.000000000"
    listed = {c["id"]: c["usage_today"]["requests"] for c in admin.ok("GET", "clients")["data"]}
    assert listed == {d["id"]: 3, other["id"]: 1}


def test_a_budget_key_shows_its_budget_periods_usage(admin: Admin) -> None:
    d, _ = admin.create(budget="1", budget_period="week")
    one = admin.ok("GET", f"clients/{d['id']}")
    assert one["usage_budget_period"]["requests"] == 0 and one["usage_budget_period"]["cost_usd"] == "0.000000000"


# -- listing -------------------------------------------------------------------------------------------------

def test_pages_walk_every_key_once_in_created_at_then_id_order_ties_included(admin: Admin) -> None:
    made = [admin.create(name=f"k{i}")[0]["id"] for i in range(9)]
    # Ties on created_at: the id decides (written by hand, as a fast burst of creates could make them).
    admin.sql("UPDATE keys SET created_at = 1000.5 WHERE id IN (?, ?, ?, ?)", tuple(made[2:6]))
    admin.sql("UPDATE keys SET created_at = 999 WHERE id = ?", (made[8],))
    want = [made[8], *sorted(made[2:6]), made[0], made[1], made[6], made[7]]
    for limit in (1, 2, 3, 4, 8, 9, 10, 1000):
        got = [c["id"] for c in admin.walk("clients", limit)]
        assert got == want, limit
    first = admin.ok("GET", "clients", limit=3)
    assert len(first["data"]) == 3 and first["next_cursor"]
    # A key made while a client walks the pages (the newest: at the end) is found on a later page.
    late = admin.create(name="late")[0]["id"]
    rest = []
    cursor = first["next_cursor"]
    while cursor:
        page = admin.ok("GET", "clients", limit=3, cursor=cursor)
        rest += [c["id"] for c in page["data"]]
        cursor = page["next_cursor"]
    assert [c["id"] for c in first["data"]] + rest == [*want, late]
    assert admin.ok("GET", "clients")["next_cursor"] is None


def test_filters_state_and_name_with_pages(admin: Admin) -> None:
    ids = {name: admin.create(name=name)[0]["id"] for name in ("Search-A", "search-b", "billing", "research",
                                                               "old", "gone")}
    admin.ok("PATCH", f"clients/{ids['billing']}", {"state": "disabled"})
    admin.ok("DELETE", f"clients/{ids['gone']}")
    admin.sql("UPDATE keys SET expires_at = 1 WHERE id = ?", (ids["old"],))  # expired (set by hand: the API refuses)
    cases = [
        ({}, ["Search-A", "search-b", "billing", "research", "old", "gone"]),
        ({"state": "active"}, ["Search-A", "search-b", "research"]),
        ({"state": "disabled"}, ["billing"]),
        ({"state": "revoked"}, ["gone"]),
        ({"state": "expired"}, ["old"]),
        ({"name": "search"}, ["Search-A", "search-b", "research"]),
        ({"name": "SEARCH-"}, ["Search-A", "search-b"]),
        ({"name": "%"}, []),
        ({"name": "_"}, []),
        ({"name": "search", "state": "active"}, ["Search-A", "search-b", "research"]),
        ({"name": "o", "state": "expired"}, ["old"]),
        ({"name": "zzz"}, []),
    ]
    for params, names in cases:
        for limit in (1, 2, 50):
            got = [c["id"] for c in admin.walk("clients", limit, **params)]
            assert got == [ids[n] for n in names], (params, limit)
    assert {c["state"] for c in admin.walk("clients", 50)} == {"active", "disabled", "revoked", "expired"}


BAD_QUERIES = [
    pytest.param({"limit": "0"}, id="limit-0"),
    pytest.param({"limit": "1001"}, id="limit-too-big"),
    pytest.param({"limit": "ten"}, id="limit-text"),
    pytest.param({"cursor": "not-a-cursor!"}, id="cursor-garbage"),
    pytest.param({"cursor": "WzFd"}, id="cursor-wrong-shape"),  # [1]
    pytest.param({"cursor": "WyJhIiwiYiJd"}, id="cursor-wrong-types"),  # ["a","b"]
    pytest.param({"state": "gone"}, id="state-unknown"),
]


@pytest.mark.parametrize("params", BAD_QUERIES)
def test_bad_query_values_are_400_invalid_query(admin: Admin, params: dict[str, str]) -> None:
    admin.create()
    admin.error("GET", "clients", want=400, code="invalid_query", **params)


def test_a_query_parameter_given_twice_is_400(admin: Admin) -> None:
    r = admin.http.get("clients?state=active&state=disabled")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_query"


# -- the secret never shows -----------------------------------------------------------------------------------

def test_the_secret_is_in_the_create_and_rotate_answers_only(admin: Admin) -> None:
    """Every read, the audit rows, the log and the database file, grepped for each secret and its hash."""
    keys = []
    d, key = admin.create(name="grep", limits={"rpm": 100}, budget="1", metadata={"team": "t"})
    keys.append(key)
    status_within(admin.gw, key, 200)
    admin.ok("PATCH", f"clients/{d['id']}", {"limits": {"rpm": 50}, "routes": ["demo"], "state": "disabled"})
    admin.ok("PATCH", f"clients/{d['id']}", {"state": "active"})
    rotated = admin.ok("POST", f"clients/{d['id']}/rotate")["key"]
    keys.append(rotated)
    status_within(admin.gw, rotated, 200)
    assert chat(admin.gw, key).status_code == 401
    admin.error("PATCH", f"clients/{d['id']}", {"name": None}, want=400, code="invalid_fields")
    admin.flush()
    admin.ok("GET", "clients")
    admin.ok("GET", f"clients/{d['id']}")
    admin.ok("GET", "audit")
    admin.ok("GET", "requests")
    admin.ok("GET", "usage", group_by="key")
    admin.ok("DELETE", f"clients/{d['id']}")
    assert len(admin.secret_answers) == 2 and all(k in t for k, t in zip(keys, admin.secret_answers, strict=True))
    shown = admin.everything_shown()
    for k in keys:
        assert k not in shown and secret_of(k) not in shown
        assert all(h not in shown for h in hash_forms(k))
    assert admin.gw.logs.getvalue(), "the log was written (and grepped)"


def test_a_whole_key_pasted_into_an_admin_url_is_not_logged(admin: Admin) -> None:
    _, key = admin.create()
    admin.error("GET", f"clients/{key}", want=404, code="client_not_found")
    assert secret_of(key) not in admin.gw.logs.getvalue()


def test_two_workers_serve_a_key_made_and_changed_here_within_a_second(upstream: MockUpstream,
                                                                        tmp_path: Path) -> None:
    """``serve`` with ``workers: 2`` as a subprocess: the admin call lands on one worker, every worker's key
    cache follows within a second (new connections are spread over both by the kernel)."""
    from tests.test_service import gateway_process

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with gateway_process(admin_config(upstream, tmp_path, workers=2), run_dir) as (_, url, _, logfile):
        assert wait_until(lambda: logfile.read_text().count("listening on") == 2, 15), logfile.read_text()
        api = httpx.Client(base_url=url + V1, headers={"authorization": f"Bearer {ADMIN}"}, timeout=10)

        def all_answer(key: str, status: int, n: int = 16) -> bool:
            return all(httpx.post(url + CHAT, headers={"authorization": f"Bearer {key}"}, timeout=5,
                                  json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
                                  ).status_code == status for _ in range(n))

        try:
            made = api.post("clients", json={"name": "shared"})
            assert made.status_code == 201, made.text
            key, key_id = made.json()["key"], made.json()["id"]
            assert wait_until(lambda: all_answer(key, 200), SEEN_WITHIN)
            assert api.patch(f"clients/{key_id}", json={"state": "disabled"}).status_code == 200
            assert wait_until(lambda: all_answer(key, 401), SEEN_WITHIN)
            assert api.patch(f"clients/{key_id}", json={"state": "active"}).status_code == 200
            assert wait_until(lambda: all_answer(key, 200), SEEN_WITHIN)
            new = api.post(f"clients/{key_id}/rotate").json()["key"]
            assert wait_until(lambda: all_answer(new, 200) and all_answer(key, 401), SEEN_WITHIN)
            assert api.delete(f"clients/{key_id}").json()["state"] == "revoked"
            assert wait_until(lambda: all_answer(new, 401), SEEN_WITHIN)
        finally:
            api.close()
        text = logfile.read_text()
        assert "Traceback" not in text and secret_of(key) not in text and secret_of(new) not in text


def test_a_failed_commit_does_not_leave_the_connection_in_a_transaction(tmp_path: Path) -> None:
    """A COMMIT can fail and leave sqlite inside the transaction (a deferred constraint, the disk full): the shared
    catalog connection must then be rolled back, or every later admin write would join a dead transaction."""
    from at_gateway.admin.clients import _atomic

    conn = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
        conn.execute("CREATE TABLE child (p INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)")
        with pytest.raises(sqlite3.IntegrityError):
            _atomic(conn, lambda: conn.execute("INSERT INTO child VALUES (7)"))  # fails at COMMIT only
        assert not conn.in_transaction
        assert conn.execute("SELECT count(*) FROM child").fetchone() == (0,)
        assert _atomic(conn, lambda: conn.execute("INSERT INTO parent VALUES (7)").rowcount) == 1  # usable
    finally:
        conn.close()
