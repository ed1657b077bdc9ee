"""Client keys in the store: the key format and what is kept of it, the ``keys`` CLI as a subprocess on a
real sqlite file, a running gateway (in-process, and two workers as a subprocess) seeing CLI changes
within a second, 401 reasons, routes, system prompt and max_tokens as the mock upstream receives them."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from at_gateway.config import Limits
from at_gateway.errors import Unauthorized
from at_gateway.services import Services
from at_gateway.store import db
from at_gateway.store.keys import KeyCache, KeyStore, open_key_cache, split_key
from tests.conftest import GATEWAY_KEY, RunningGateway, base_config, run_gateway
from tests.mock_upstream import MockUpstream, Received, Reply, chat_completion, stream_of, wait_until
from tests.test_service import gateway_process

KEY_RE = re.compile(r"^atg_[a-z0-9]{12}_[A-Za-z0-9_-]{43}$")
ROUTES = [
    {"name": "demo", "steps": [{"provider": "echo", "model": "echo-1"}]},
    {"name": "gpt-mini", "steps": [{"provider": "up1", "model": "gpt-4o-mini"}]},
    {"name": "gpt-big", "steps": [{"provider": "up1", "model": "gpt-4o"}]},
    {"name": "reasoner", "steps": [{"provider": "up1", "model": "o3-mini"}]},
    {"name": "team/claude", "steps": [{"provider": "up2", "model": "claude-x"}]},
]
CHAT = "/v1/chat/completions"
SEEN_WITHIN = 1.0  # the issue: every worker sees a CLI change within 1 s


def body(model: str = "demo", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


# -- helpers: a config with a store file, the CLI, a gateway with the key cache --------------------------

def store_config(upstream_url: str, tmp_path: Path, **top: Any) -> dict[str, Any]:
    return base_config(upstream_url, copy.deepcopy(ROUTES), store={"path": str(tmp_path / "gw.db")}, **top)


def write_config(cfg: dict[str, Any], tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "at_gateway", "keys", *args, "--config", str(config_path)],
                          capture_output=True, text=True, timeout=30)


def cli_json(config_path: Path, *args: str) -> Any:
    out = cli(config_path, *args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


async def _keys_only(config: Any) -> Services:
    return Services(keys=await open_key_cache(config))


def keyed_gateway(raw: dict[str, Any]) -> Any:
    """conftest's run_gateway with this process's key cache opened on the config's store (as serve() does)."""
    return run_gateway(raw, services=_keys_only)


def cache_of(gw: RunningGateway) -> KeyCache:
    keys = gw.gateway.services.keys
    assert isinstance(keys, KeyCache)
    return keys


def store_at(path: Path) -> tuple[sqlite3.Connection, KeyStore]:
    conn = db.connect(str(path))
    return conn, KeyStore(conn)


def status_within(url: str, key: str, want: int, seconds: float = SEEN_WITHIN, model: str = "demo") -> float:
    """Seconds until a chat with ``key`` is answered ``want`` (a fresh connection each time); fails after
    ``seconds``."""
    start = time.monotonic()
    last = None

    def ok() -> bool:
        nonlocal last
        last = httpx.post(url + CHAT, headers=auth(key), json=body(model), timeout=5)
        return last.status_code == want

    assert wait_until(ok, seconds), (last.status_code, last.text) if last is not None else None
    return time.monotonic() - start


# -- the key and what is kept of it -----------------------------------------------------------------------

def test_a_key_is_atg_id_secret_and_only_the_secrets_hash_is_kept(tmp_path: Path) -> None:
    conn, store = store_at(tmp_path / "k.db")
    try:
        stored, key = store.create("app", routes=["gpt-*"], limits=Limits(rpm=60, tpm=1000),
                                   budget_nanousd=5 * 10**9, max_tokens=100, system_prompt="be brief",
                                   metadata={"team": "search"})
        other, key2 = store.create("other")
        assert KEY_RE.match(key) and KEY_RE.match(key2) and key != key2
        key_id, secret = split_key(key.encode())  # type: ignore[misc]
        assert key_id == stored.key.id and len(secret) >= 43  # 32 random bytes, URL-safe base64
        assert stored.key.prefix == key[:len("atg_") + 12 + 1 + 4] and stored.key.prefix in key
        row = conn.execute("SELECT secret_hash, prefix FROM keys WHERE id = ?", (key_id,)).fetchone()
        assert bytes(row[0]) == hashlib.sha256(secret).digest()
        assert stored.key.budget_period == "month"  # a budget without a period is per calendar month
        assert stored.key.limits == Limits(rpm=60, tpm=1000) and stored.key.metadata == {"team": "search"}
    finally:
        conn.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert secret not in raw and key.encode() not in raw  # the database (and its WAL) never holds a secret

    # rotate: same id, settings; new secret; the old one's hash is gone
    conn, store = store_at(tmp_path / "k.db")
    try:
        rotated, new_key = store.rotate(key_id)
        assert rotated.key.id == key_id and new_key != key and KEY_RE.match(new_key)
        assert rotated.key.limits == stored.key.limits and rotated.key.prefix != stored.key.prefix
        with pytest.raises(LookupError, match="revoking is final"):
            store.revoke(key_id)
            store.enable(key_id)
        with pytest.raises(LookupError, match="cannot be rotated"):
            store.rotate(key_id)
        with pytest.raises(LookupError, match="no key with id"):
            store.get("nosuchkey000")
        with pytest.raises(ValueError, match="max_tokens"):
            store.update(other.key.id, max_tokens=0)
    finally:
        conn.close()


@pytest.mark.parametrize("presented", [
    b"", b"atg_", b"atg_short_x", b"sk-something", b"atg_ABCDEFGHIJKL_secret", b"atg_abcdefghijkl-secret",
])
def test_what_is_not_shaped_like_atg_id_secret_does_not_parse(presented: bytes) -> None:
    assert split_key(presented) is None  # the cache answers "no such key" for atg_..., None for the rest


# -- the CLI -------------------------------------------------------------------------------------------------

def test_keys_cli_create_list_show_update_and_states(tmp_path: Path) -> None:
    cfg = write_config(base_config("http://127.0.0.1:9", copy.deepcopy(ROUTES),
                                   store={"path": str(tmp_path / "gw.db")}, limits={"tpd": 50000}), tmp_path)
    assert "no client keys yet" in cli(cfg, "list").stdout  # no database yet: none made either
    assert not (tmp_path / "gw.db").exists()

    made = cli(cfg, "create", "--name", "search app", "--routes", "gpt-*", "demo", "--rpm", "60", "--rph", "600",
               "--tpm", "10000", "--budget", "12.5", "--budget-period", "week", "--max-tokens", "256",
               "--system-prompt", "Be brief.", "--expires", "30d", "--metadata", '{"team": "search"}')
    assert made.returncode == 0, made.stderr
    key = re.search(r"key: (\S+)", made.stdout).group(1)  # type: ignore[union-attr]
    assert KEY_RE.match(key) and "shown once" in made.stdout
    assert (tmp_path / "gw.db").stat().st_mode & 0o777 == 0o600
    key_id = key[4:16]

    listing = cli(cfg, "list")
    assert listing.returncode == 0 and key_id in listing.stdout and "search app" in listing.stdout
    assert key not in listing.stdout and key[17:] not in listing.stdout  # never the key, never its secret
    assert "rpm=60" in listing.stdout and "tpd=50000*" in listing.stdout  # * = from the config's limits:
    assert "$12.50/week" in listing.stdout and "0 req" in listing.stdout and '{"team":"search"}' in listing.stdout

    shown = cli_json(cfg, "show", key_id)
    assert "key" not in shown and "secret_hash" not in shown and key[17:] not in json.dumps(shown)
    assert shown["routes"] == ["gpt-*", "demo"] and shown["limits"] == {"rpm": 60, "rph": 600, "tpm": 10000}
    assert shown["effective_limits"] == {"rpm": 60, "rph": 600, "tpm": 10000, "tpd": 50000}
    assert shown["budget_nanousd"] == 12_500_000_000 and shown["budget_period"] == "week"
    assert shown["max_tokens"] == 256 and shown["system_prompt"] == "Be brief."
    assert shown["metadata"] == {"team": "search"} and shown["state"] == "active" and shown["expires_at"]
    assert shown["usage_today"] == {"requests": 0, "tokens": 0, "cost_nanousd": 0, "unpriced": 0}

    # update: only what is given changes; 'none' clears
    updated = cli_json(cfg, "update", key_id, "--rpm", "none", "--tpd", "900", "--routes", "*",
                       "--system-prompt", "none", "--expires", "never", "--name", "renamed")
    assert updated["limits"] == {"rph": 600, "tpm": 10000, "tpd": 900} and updated["routes"] == ["*"]
    assert updated["system_prompt"] is None and updated["expires_at"] is None and updated["name"] == "renamed"
    assert updated["max_tokens"] == 256 and updated["budget_nanousd"] == 12_500_000_000  # untouched

    assert cli_json(cfg, "disable", key_id)["state"] == "disabled"
    assert cli_json(cfg, "enable", key_id)["state"] == "active"
    rotated = cli_json(cfg, "rotate", key_id)
    assert KEY_RE.match(rotated["key"]) and rotated["key"] != key and rotated["id"] == key_id
    assert rotated["max_tokens"] == 256  # same settings
    assert cli_json(cfg, "revoke", key_id)["state"] == "revoked"
    again = cli(cfg, "enable", key_id)
    assert again.returncode == 1 and "revoked" in again.stderr and "Traceback" not in again.stderr

    bad = [
        (("show", "nosuchkey000"), 1, "no key with id"),
        (("create", "--rpm", "5"), 2, "--name"),
        (("create", "--name", "x", "--rpm", "0"), 2, "--rpm: must be 1 or more"),
        (("create", "--name", "x", "--budget", "ten"), 2, "not an amount in USD"),
        (("create", "--name", "x", "--expires", "yesterday"), 2, "is not a time"),
        (("create", "--name", "x", "--expires", "2001-01-01"), 2, "in the past"),
        (("create", "--name", "x", "--metadata", "[1]"), 2, "JSON object"),
        (("create", "--name", "x", "--budget-period", "day"), 1, "--budget-period needs --budget"),
        (("update", "nosuchkey000", "--rpm", "3"), 1, "no key with id"),
        (("update", key_id), 1, "nothing to update"),
        (("frobnicate",), 2, "invalid choice"),
    ]
    for args, code, text in bad:
        out = cli(cfg, *args)
        assert (out.returncode, text in out.stderr, "Traceback" in out.stderr) == (code, True, False), (args, out)

    (tmp_path / "m").mkdir()
    memory = write_config(base_config("http://127.0.0.1:9", store={"path": ":memory:"}), tmp_path / "m")
    out = cli(memory, "create", "--name", "x")
    assert out.returncode == 1 and ":memory:" in out.stderr


def test_keys_list_and_show_count_usage_today_and_in_the_budget_period(tmp_path: Path) -> None:
    cfg = write_config(base_config("http://127.0.0.1:9", store={"path": str(tmp_path / "gw.db")}), tmp_path)
    conn, store = store_at(tmp_path / "gw.db")
    try:
        key_id = store.create("spender", budget_nanousd=10**9, budget_period="month")[0].key.id
        today = time.strftime("%Y-%m-%d", time.gmtime())
        earlier = time.strftime("%Y-%m-01", time.gmtime())
        rows = [(today, key_id, "demo", 3, 100, 20, 1_500_000, 0), (today, key_id, "other", 1, 5, 5, 0, 1),
                (today, "someone-else", "demo", 7, 1, 1, 99, 0)]
        if earlier != today:
            rows.append((earlier, key_id, "demo", 2, 10, 10, 500_000, 0))
        conn.executemany("INSERT INTO usage_daily (day, key_id, route, provider, model, requests, prompt_tokens, "
                         "completion_tokens, cost_nanousd, unpriced) VALUES (?, ?, ?, 'p', 'm', ?, ?, ?, ?, ?)", rows)
    finally:
        conn.close()
    listing = cli(cfg, "list")
    assert "4 req, 130 tok, $0.0015" in listing.stdout, listing.stdout
    shown = cli_json(cfg, "show", key_id)
    assert shown["usage_today"] == {"requests": 4, "tokens": 130, "cost_nanousd": 1_500_000, "unpriced": 1}
    month = 2_000_000 if earlier != today else 1_500_000
    assert shown["usage_budget_period"]["cost_nanousd"] == month
    assert f"({'$0.002' if earlier != today else '$0.0015'} spent this month)" in cli(cfg, "show", key_id).stdout


# -- a running gateway ---------------------------------------------------------------------------------------

def test_running_gateway_sees_cli_create_disable_enable_rotate_revoke_within_a_second(
        upstream: MockUpstream, tmp_path: Path) -> None:
    raw = store_config(upstream.url, tmp_path)
    cfg = write_config(raw, tmp_path)
    with keyed_gateway(raw) as gw:
        key = cli_json(cfg, "create", "--name", "live")["key"]
        key_id = key[4:16]
        status_within(gw.url, key, 200)
        r = httpx.post(gw.url + CHAT, headers={"x-api-key": key}, json=body(), timeout=5)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]

        cli_json(cfg, "disable", key_id)
        status_within(gw.url, key, 401)
        cli_json(cfg, "enable", key_id)
        status_within(gw.url, key, 200)

        new_key = cli_json(cfg, "rotate", key_id)["key"]
        status_within(gw.url, key, 401)  # the old secret stops working
        assert httpx.post(gw.url + CHAT, headers=auth(new_key), json=body(), timeout=5).status_code == 200

        cli_json(cfg, "revoke", key_id)
        status_within(gw.url, new_key, 401)
        # no reload: the same gateway object served it all; and its log names the key by id, never the key
        lines = gw.request_logs(6)
        assert any(line.get("client") == key_id for line in lines)
        assert key[17:] not in gw.logs.getvalue() and new_key[17:] not in gw.logs.getvalue()


def test_keys_and_their_state_survive_a_restart(upstream: MockUpstream, tmp_path: Path) -> None:
    raw = store_config(upstream.url, tmp_path)
    conn, store = store_at(tmp_path / "gw.db")
    try:
        key = store.create("durable", routes=["demo"])[1]
        disabled_id = store.create("off")[0].key.id
        off_key = store.rotate(disabled_id)[1]
        store.disable(disabled_id)
    finally:
        conn.close()
    for _ in range(2):
        with keyed_gateway(raw) as gw:
            assert httpx.post(gw.url + CHAT, headers=auth(key), json=body(), timeout=5).status_code == 200
            r = httpx.post(gw.url + CHAT, headers=auth(off_key), json=body(), timeout=5)
            assert r.status_code == 401 and "disabled" in r.json()["error"]["message"]


def test_401_says_why_for_a_store_key_and_nothing_about_other_keys(upstream: MockUpstream, tmp_path: Path) -> None:
    conn, store = store_at(tmp_path / "gw.db")
    try:
        good = store.create("good")[1]
        disabled = store.create("disabled")
        disabled_key = disabled[1]
        store.disable(disabled[0].key.id)
        revoked = store.create("revoked")
        revoked_key = revoked[1]
        store.revoke(revoked[0].key.id)
        expired_key = store.create("expired", expires_at=time.time() - 1)[1]
        later_key = store.create("later", expires_at=time.time() + 3600)[1]
    finally:
        conn.close()
    good_id = good[4:16]
    cases = [
        # (presented, status, words in the message)
        (good, 200, None),
        (later_key, 200, None),
        (disabled_key, 401, "is disabled"),
        (revoked_key, 401, "was revoked"),
        (expired_key, 401, "expired on"),
        (good[:-1] + ("A" if good[-1] != "A" else "B"), 401, "no such key"),  # wrong secret
        (disabled_key[:17] + good[17:], 401, "no such key"),  # another key's secret: not "disabled"
        ("atg_zzzzzzzzzzzz_" + good[17:], 401, "no such key"),  # unknown id
        ("atg_" + good_id, 401, "no such key"),  # cut short: still judged as a client key
        ("atg_" + good_id.upper() + good[16:], 401, "no such key"),  # ids are lower case
        ("ATG_" + good[4:], 401, "configured with"),  # not a client key: the gateway's own 401
        ("sk-not-ours", 401, "configured with"),
    ]
    with keyed_gateway(store_config(upstream.url, tmp_path)) as gw:
        unknown_bodies = set()
        for presented, status, words in cases:
            r = httpx.post(gw.url + CHAT, headers={"x-api-key": presented}, json=body(), timeout=5)
            assert r.status_code == status, (presented, r.text)
            if status == 401:
                err = r.json()["error"]
                assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
                assert err["message"].startswith("Incorrect API key provided") and words in err["message"]
                assert presented not in r.text and r.headers["www-authenticate"].startswith("Bearer")
                if words == "no such key":
                    unknown_bodies.add(r.text)
        assert len(unknown_bodies) == 1  # wrong secret, another key's secret, unknown id: indistinguishable
        assert good[17:] not in gw.logs.getvalue() and disabled_key[17:] not in gw.logs.getvalue()


def test_yaml_keys_stay_unlimited_operator_keys_beside_store_keys(upstream: MockUpstream, tmp_path: Path) -> None:
    conn, store = store_at(tmp_path / "gw.db")
    try:
        store.create("narrow", routes=["gpt-mini"], max_tokens=5, system_prompt="x")
    finally:
        conn.close()
    with keyed_gateway(store_config(upstream.url, tmp_path)) as gw:
        models = httpx.get(gw.url + "/v1/models", headers={"x-api-key": GATEWAY_KEY}, timeout=5).json()
        assert [m["id"] for m in models["data"]] == [r["name"] for r in ROUTES]
        r = httpx.post(gw.url + CHAT, headers={"x-api-key": GATEWAY_KEY}, json=body("gpt-big", max_tokens=999),
                       timeout=5)
        assert r.status_code == 200
        sent = upstream.received[-1].json
        assert sent["max_tokens"] == 999 and sent["messages"] == [{"role": "user", "content": "hi"}]
        assert gw.request_logs(2)[-1]["client"] == "key0"

    # and a config without api_key, the store a file: client keys only
    raw = store_config(upstream.url, tmp_path)
    del raw["api_key"]
    conn, store = store_at(tmp_path / "gw.db")
    try:
        only = store.create("only")[1]
    finally:
        conn.close()
    with keyed_gateway(raw) as gw:
        assert httpx.post(gw.url + CHAT, headers=auth(only), json=body(), timeout=5).status_code == 200
        r = httpx.post(gw.url + CHAT, headers=auth(GATEWAY_KEY), json=body(), timeout=5)
        assert r.status_code == 401


def test_routes_outside_a_keys_patterns_are_403_and_not_listed(upstream: MockUpstream, tmp_path: Path) -> None:
    conn, store = store_at(tmp_path / "gw.db")
    try:
        narrow = store.create("narrow", routes=["gpt-*", "team/*"])[1]
        narrow_id = narrow[4:16]
        everything = store.create("all")[1]
    finally:
        conn.close()
    with keyed_gateway(store_config(upstream.url, tmp_path)) as gw:
        table = [  # (key, model, status)
            (narrow, "gpt-mini", 200), (narrow, "gpt-big", 200), (narrow, "team/claude", 200),
            (narrow, "demo", 403), (narrow, "reasoner", 403), (narrow, "nosuch", 404),
            (everything, "demo", 200), (everything, "reasoner", 200),
        ]
        for key, model, status in table:
            r = httpx.post(gw.url + CHAT, headers=auth(key), json=body(model), timeout=5)
            assert r.status_code == status, (model, r.text)
            if status == 403:
                err = r.json()["error"]
                assert err["code"] == "model_not_allowed" and err["type"] == "permission_error"
                assert model in err["message"] and "gpt-*" in err["message"]

        def listed(key: str) -> list[str]:
            r = httpx.get(gw.url + "/v1/models", headers=auth(key), timeout=5)
            assert r.status_code == 200
            return [m["id"] for m in r.json()["data"]]

        assert listed(narrow) == ["gpt-mini", "gpt-big", "team/claude"]
        assert listed(everything) == [r["name"] for r in ROUTES]
        head = httpx.head(gw.url + "/v1/models", headers=auth(narrow), timeout=5)
        assert head.status_code == 200 and int(head.headers["content-length"]) == len(
            httpx.get(gw.url + "/v1/models", headers=auth(narrow), timeout=5).content)
        for model, status in (("gpt-mini", 200), ("team%2Fclaude", 200), ("team/claude", 200), ("demo", 404)):
            r = httpx.get(gw.url + f"/v1/models/{model}", headers=auth(narrow), timeout=5)
            assert r.status_code == status, model
        assert httpx.get(gw.url + "/v1/models/demo", headers=auth(everything), timeout=5).status_code == 200

        # a change of the key's routes by the CLI is seen (the per-key model list is rebuilt)
        cfg = write_config(store_config(upstream.url, tmp_path), tmp_path)
        cli_json(cfg, "update", narrow_id, "--routes", "demo")
        status_within(gw.url, narrow, 200, model="demo")
        assert listed(narrow) == ["demo"]
        assert httpx.post(gw.url + CHAT, headers=auth(narrow), json=body("gpt-mini"), timeout=5).status_code == 403


@pytest.mark.parametrize(("route", "sent", "expected"), [
    ("gpt-mini", {}, {"max_tokens": 100}),  # filled when absent
    ("gpt-mini", {"max_tokens": 10}, {"max_tokens": 10}),  # below the cap: kept
    ("gpt-mini", {"max_tokens": 500}, {"max_tokens": 100}),  # above: capped
    ("gpt-mini", {"max_tokens": None}, {"max_tokens": 100}),  # null counts as absent
    ("gpt-mini", {"max_completion_tokens": 500}, {"max_completion_tokens": 100}),  # the field the client used
    ("gpt-mini", {"max_completion_tokens": 50, "max_tokens": 900}, {"max_completion_tokens": 50, "max_tokens": 100}),
    ("reasoner", {}, {"max_completion_tokens": 100}),  # OpenAI reasoning models refuse max_tokens
    ("reasoner", {"max_tokens": 500}, {"max_tokens": 100}),
])
def test_max_tokens_cap_as_the_upstream_receives_it(upstream: MockUpstream, tmp_path: Path, route: str,
                                                    sent: dict[str, Any], expected: dict[str, Any]) -> None:
    conn, store = store_at(tmp_path / "gw.db")
    try:
        key = store.create("capped", max_tokens=100)[1]
    finally:
        conn.close()
    with keyed_gateway(store_config(upstream.url, tmp_path)) as gw:
        r = httpx.post(gw.url + CHAT, headers=auth(key), json=body(route, **sent), timeout=5)
        assert r.status_code == 200, r.text
        got = upstream.received[-1].json
        assert {k: got[k] for k in ("max_tokens", "max_completion_tokens") if k in got} == expected


def test_a_non_integer_max_tokens_is_400_for_a_capped_key(upstream: MockUpstream, tmp_path: Path) -> None:
    conn, store = store_at(tmp_path / "gw.db")
    try:
        key = store.create("capped", max_tokens=100)[1]
    finally:
        conn.close()
    with keyed_gateway(store_config(upstream.url, tmp_path)) as gw:
        for value in ("lots", 1.5, True, [1]):
            r = httpx.post(gw.url + CHAT, headers=auth(key), json=body("gpt-mini", max_tokens=value), timeout=5)
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_type", value
        assert upstream.received == []


def test_system_prompt_goes_first_streams_included(upstream: MockUpstream, tmp_path: Path) -> None:
    def reply(rec: Received) -> Reply:
        return Reply(sse=stream_of("a", "b")) if rec.json.get("stream") else Reply(body=chat_completion("plain"))

    upstream.replies["gpt-4o-mini"] = reply
    conn, store = store_at(tmp_path / "gw.db")
    try:
        key = store.create("prompted", system_prompt="You are terse.", max_tokens=64)[1]
    finally:
        conn.close()
    with keyed_gateway(store_config(upstream.url, tmp_path)) as gw:
        client = openai.OpenAI(api_key=key, base_url=gw.url + "/v1", max_retries=0)
        done = client.chat.completions.create(model="gpt-mini", messages=[
            {"role": "system", "content": "client system"}, {"role": "user", "content": "hi"}])
        assert done.choices[0].message.content == "plain"
        sent = upstream.received[-1].json
        assert sent["messages"] == [{"role": "system", "content": "You are terse."},
                                    {"role": "system", "content": "client system"},
                                    {"role": "user", "content": "hi"}]
        assert sent["max_tokens"] == 64
        words = [c.choices[0].delta.content for c in client.chat.completions.create(
            model="gpt-mini", messages=[{"role": "user", "content": "hi"}], stream=True) if c.choices]
        assert "".join(w or "" for w in words) == "ab"
        sent = upstream.received[-1].json
        assert sent["stream"] is True and sent["messages"][0] == {"role": "system", "content": "You are terse."}


def test_two_workers_both_see_a_cli_change_within_a_second(upstream: MockUpstream, tmp_path: Path) -> None:
    raw = store_config(upstream.url, tmp_path, workers=2)
    cfg = write_config(raw, tmp_path)
    key = cli_json(cfg, "create", "--name", "shared")["key"]  # the database exists before the workers start
    key_id = key[4:16]

    def all_answer(url: str, status: int, n: int = 16) -> bool:
        # a new connection each time, so the kernel spreads them over both workers
        return all(httpx.post(url + CHAT, headers=auth(key), json=body("gpt-mini"), timeout=5).status_code == status
                   for _ in range(n))

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with gateway_process(raw, run_dir) as (_, url, _, logfile):
        assert wait_until(lambda: logfile.read_text().count("listening on") == 2, 15), logfile.read_text()
        assert all_answer(url, 200)
        # Both workers answered: each has its own upstream pool, and one worker answering these one at a
        # time would have kept one keep-alive connection to the upstream.
        assert upstream.connections >= 2, upstream.connections
        for action, status in (("disable", 401), ("enable", 200)):
            cli_json(cfg, action, key_id)
            assert wait_until(lambda status=status: all_answer(url, status), SEEN_WITHIN), action  # type: ignore[misc]
        assert "Traceback" not in logfile.read_text()


@pytest.mark.parametrize(("args", "text"), [
    (("--expires", "99999999d"), "--expires: must be before 9999-12-31"),
    (("--expires", "9" * 40 + "w"), "--expires: must be before 9999-12-31"),
    (("--rpm", "9" * 20), "--rpm: must be at most"),
    (("--tpd", "9" * 400), "--tpd: must be at most"),
    (("--max-tokens", str(2**63)), "--max-tokens: must be at most"),
    (("--budget", "1e10"), "--budget: must be at most"),
    (("--budget", "9" * 30), "--budget: must be at most"),
])
def test_values_past_what_the_store_holds_are_refused_before_anything_is_saved(
        tmp_path: Path, args: tuple[str, ...], text: str) -> None:
    cfg = write_config(store_config("http://127.0.0.1:9", tmp_path), tmp_path)
    out = cli(cfg, "create", "--name", "big", *args)
    assert (out.returncode, "Traceback" in out.stderr) == (2, False), out
    assert text in out.stderr, out.stderr
    assert cli_json(cfg, "list") == []  # nothing saved, no key made that nobody was shown


def test_the_store_refuses_out_of_range_values_from_any_caller(tmp_path: Path) -> None:
    conn, store = store_at(tmp_path / "gw.db")
    try:
        for kwargs in ({"expires_at": 1e300}, {"expires_at": float("nan")}, {"limits": Limits(rpm=2**63)},
                       {"max_tokens": 2**63}, {"budget_nanousd": 2**63}):
            with pytest.raises(ValueError):
                store.create("x", **kwargs)  # type: ignore[arg-type]
        key_id = store.create("ok")[0].key.id
        with pytest.raises(ValueError):
            store.update(key_id, limits={"tpm": 2**63})
        assert [s.key.name for s in store.list()] == ["ok"]
    finally:
        conn.close()


def test_keys_list_and_show_survive_odd_values_in_the_database(tmp_path: Path) -> None:
    """A row written by an older build or by hand (an expiry past year 9999, text where a time belongs)
    is shown as it is; it never breaks the listing of every other key."""
    cfg = write_config(store_config("http://127.0.0.1:9", tmp_path), tmp_path)
    conn, store = store_at(tmp_path / "gw.db")
    try:
        far = store.create("far")[0].key.id
        odd = store.create("odd")[0].key.id
        fine = store.create("fine")[0].key.id
        conn.execute("UPDATE keys SET expires_at = 1e300 WHERE id = ?", (far,))
        conn.execute("UPDATE keys SET expires_at = 'soon', created_at = 'then' WHERE id = ?", (odd,))
    finally:
        conn.close()
    listing = cli(cfg, "list")
    assert listing.returncode == 0 and "Traceback" not in listing.stderr, listing
    assert all(k in listing.stdout for k in (far, odd, fine))
    by_id = {d["id"]: d for d in cli_json(cfg, "list")}
    assert by_id[far]["state"] == "active" and by_id[fine]["state"] == "active"
    assert by_id[odd]["state"] == "expired"  # an unreadable expiry allows nothing rather than everything
    shown = cli(cfg, "show", far)
    assert shown.returncode == 0 and "expires" in shown.stdout, shown


def test_the_key_is_printed_first_and_the_database_named(tmp_path: Path) -> None:
    """The key is printed before anything that could fail, and every command says which database
    file it used (a relative store.path from another directory makes another database)."""
    cfg = write_config(store_config("http://127.0.0.1:9", tmp_path), tmp_path)
    dbfile = str((tmp_path / "gw.db").resolve())
    made = cli(cfg, "create", "--name", "first")
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith("key: atg_") and f"database: {dbfile}" in made.stdout
    made_json = cli(cfg, "create", "--name", "second", "--json")
    assert json.loads(made_json.stdout)["key"].startswith("atg_")  # stdout stays JSON
    assert dbfile in made_json.stderr
    listing = cli(cfg, "list")
    assert listing.stdout.splitlines()[0] == f"keys in {dbfile}"
    usage = subprocess.run([sys.executable, "-m", "at_gateway", "usage", "--config", str(cfg)],
                           capture_output=True, text=True, timeout=30)
    assert usage.returncode == 0 and dbfile in usage.stdout.splitlines()[0], usage


def test_an_unknown_id_costs_the_same_hash_as_a_known_one(tmp_path: Path) -> None:
    """verify() hashes the presented secret whether or not the id exists: how long it takes says
    nothing about which ids exist. A long secret makes the hash the bulk of the time."""
    conn, store = store_at(tmp_path / "gw.db")
    try:
        key = store.create("k")[1]
    finally:
        conn.close()
    cache = KeyCache(db.connect(str(tmp_path / "gw.db")), str(tmp_path / "gw.db"))
    try:
        secret = b"x" * 4_000_000
        known = b"atg_" + key[4:16].encode() + b"_" + secret
        unknown = b"atg_zzzzzzzzzzzz_" + secret

        def took(presented: bytes) -> float:
            start = time.perf_counter()
            with pytest.raises(Unauthorized):
                cache.verify(presented)
            return time.perf_counter() - start

        pairs = [(took(known), took(unknown)) for _ in range(7)]
        known_t = sorted(p[0] for p in pairs)[3]
        unknown_t = sorted(p[1] for p in pairs)[3]
        assert unknown_t > known_t * 0.3, (known_t, unknown_t)  # before: microseconds against milliseconds
    finally:
        cache.close()


def test_a_keys_metadata_goes_to_the_request_log(upstream: MockUpstream, tmp_path: Path) -> None:
    from tests.test_usage import store_gateway

    conn, store = store_at(tmp_path / "gw.db")
    try:
        key = store.create("tagged", metadata={"team": "search", "cost_center": 42})[1]
        plain = store.create("plain")[1]
    finally:
        conn.close()
    with store_gateway(store_config(upstream.url, tmp_path)) as gw:
        for k in (key, plain):
            assert httpx.post(gw.url + CHAT, headers=auth(k), json=body(), timeout=5).status_code == 200
    logged = sqlite3.connect(tmp_path / "gw.db")
    try:
        got = dict(logged.execute("SELECT key_id, metadata FROM request_log").fetchall())
    finally:
        logged.close()
    assert json.loads(got[key[4:16]]) == {"team": "search", "cost_center": 42}
    assert got[plain[4:16]] is None
