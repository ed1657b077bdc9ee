"""Admin API ``providers`` and ``routes`` on a gateway running as ``serve`` runs it (``run_live``: a real sqlite
file, the Live watch polling it, real sockets; mock upstreams speaking real HTTP), and one ``workers: 2``
subprocess gateway.

What is asserted: every endpoint's status and body; every bad field refused with its path (as ``check-config``
words it) and nothing written; a database entry overriding the file's of the same name and its delete bringing
the file's back, proven by which upstream a chat request reaches and with which key; 409 for deleting a used
provider, a file-only entry, or creating one that exists; a write served by the running gateway at once (this
worker) and within a second (every worker); secrets masked in every read and kept when sent back as read;
each write one audit row; and no secret value in any answer, log line, audit row or the database file.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager as contextmanager_
from pathlib import Path
from typing import Any

import httpx
import pytest

from at_gateway.admin.api import mask
from tests.conftest import GATEWAY_KEY, RunningGateway, base_config, run_gateway, run_live
from tests.mock_upstream import MockUpstream, Reply, chat_completion, wait_until
from tests.test_admin_clients import ADMIN, CHAT, SEEN_WITHIN, V1, Admin

# Secrets without a shape the redactor knows (no sk-, no Bearer): only redaction by value can hide them.
DB_KEY = "plain-database-key-0123456789abcdef"
HEADER_SECRET = "org-header-secret-zyxwvutsrq9876"
PROXY_PASSWORD = "proxy-pass-word-55554444"
ENCRYPTION_KEY = "catalog test passphrase 0123456789"
YAML_KEY = "sk-upstream-secret-1"  # base_config's up1
ROUTES = [
    {"name": "demo", "steps": [{"provider": "echo", "model": "echo-1"}]},
    {"name": "r1", "steps": [{"provider": "up1", "model": "m1"}]},
]


# -- harness ---------------------------------------------------------------------------------------------

def catalog_config(upstream: MockUpstream, tmp_path: Path, **top: Any) -> dict[str, Any]:
    store = {"path": str(tmp_path / "gw.db"), "encryption_key": ENCRYPTION_KEY}
    return base_config(upstream.url, [dict(r) for r in ROUTES], store=store, admin_token=ADMIN, **top)


@pytest.fixture
def admin(upstream: MockUpstream, tmp_path: Path) -> Iterator[Admin]:
    with run_live(catalog_config(upstream, tmp_path)) as gw:
        api = Admin(gw, tmp_path / "gw.db")
        try:
            yield api
        finally:
            api.http.close()


def chat(gw: RunningGateway, model: str, content: str = "hi") -> httpx.Response:
    return httpx.post(gw.url + CHAT, headers={"authorization": f"Bearer {GATEWAY_KEY}"}, timeout=10,
                      json={"model": model, "messages": [{"role": "user", "content": content}]})


def reached(gw: RunningGateway, mock: MockUpstream, model: str) -> dict[str, str]:
    """Chat once on route ``model``; the headers ``mock`` received for it (and it received exactly that one)."""
    before = len(mock.received)
    r = chat(gw, model)
    assert r.status_code == 200, r.text
    assert len(mock.received) == before + 1, "the request went to another upstream"
    return mock.received[-1].headers


def db_provider(url: str, name: str = "db1", **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "openai", "base_url": url, "api_key": DB_KEY, **extra}


def problems_match(got: list[str], want: list[str]) -> None:
    """Each wanted problem (a prefix: path and reason) is exactly one of the problems given, and nothing else."""
    assert len(got) == len(want), got
    for w in want:
        assert sum(1 for g in got if g.startswith(w)) == 1, (w, got)


def audit_actions(api: Admin, name: str) -> list[str]:
    return [r["action"] for r in api.ok("GET", "audit", object=name)["data"]]


# -- providers: create, read, replace, change, delete ------------------------------------------------------

def test_provider_crud_with_masked_secrets_and_an_audit_row_per_write(admin: Admin, other: MockUpstream) -> None:
    made = admin.ok("POST", "providers", db_provider(other.url, headers={"X-Org": HEADER_SECRET}), want=201)
    assert made.pop("created_at") and made.pop("updated_at")
    assert made == {"object": "provider", "name": "db1", "type": "openai", "base_url": other.url,
                    "api_key": mask(DB_KEY), "headers": {"X-Org": mask(HEADER_SECRET)}, "source": "database",
                    "overrides_config": False, "credentials_encrypted": True}
    assert made["api_key"] == "…cdef" and made["headers"]["X-Org"] == "…9876"  # no custom prefix shown
    one = admin.ok("GET", "providers/db1")
    assert {k: v for k, v in one.items() if k not in ("created_at", "updated_at")} == \
        {k: v for k, v in made.items() if k != "credentials_encrypted"}  # said by writes only
    names = {p["name"]: p["source"] for p in admin.ok("GET", "providers")["data"]}
    assert names == {"db1": "database", "echo": "config", "up1": "config", "up2": "config"}

    admin.ok("POST", "routes", {"name": "via-db1", "steps": [{"provider": "db1", "model": "m-db"}]}, want=201)
    seen = reached(admin.gw, other, "via-db1")
    assert seen["authorization"] == f"Bearer {DB_KEY}" and seen["x-org"] == HEADER_SECRET

    # A new destination needs the secret again: the mask of the stored key does not carry it elsewhere.
    err = admin.error("PUT", "providers/db1", {"type": "openai", "base_url": other.url + "/v2",
                                               "api_key": made["api_key"]}, want=400, code="invalid_fields")
    problems_match(err["problems"], ["provider.api_key: the destination changed (base_url): send the secret again"])
    replaced = admin.ok("PUT", "providers/db1", {"type": "openai", "base_url": other.url + "/v2",
                                                 "api_key": DB_KEY})
    assert replaced["base_url"] == other.url + "/v2" and "headers" not in replaced, "PUT replaces the whole"
    assert admin.ok("PUT", "providers/db1", {"type": "openai", "base_url": other.url + "/v2",
                                             "api_key": made["api_key"]})["api_key"] == mask(DB_KEY)  # kept
    assert replaced["api_key"] == mask(DB_KEY)
    seen = reached(admin.gw, other, "via-db1")
    assert other.received[-1].path == "/v2/chat/completions" and "x-org" not in seen
    assert seen["authorization"] == f"Bearer {DB_KEY}"

    patched = admin.ok("PATCH", "providers/db1", {"headers": {"X-Team": "search"}})
    assert patched["headers"] == {"X-Team": mask("search")} and patched["api_key"] == mask(DB_KEY)
    assert reached(admin.gw, other, "via-db1")["x-team"] == "search"

    admin.ok("DELETE", "routes/via-db1")
    gone = admin.ok("DELETE", "providers/db1")
    assert gone == {"object": "provider", "name": "db1", "deleted": True, "restored": None}
    admin.error("GET", "providers/db1", want=404, code="provider_not_found")
    admin.error("DELETE", "providers/db1", want=404, code="provider_not_found")
    assert audit_actions(admin, "db1") == ["provider.delete", *["provider.update"] * 3, "provider.create"]
    create = admin.ok("GET", "audit", object="db1", action="provider.create")["data"][0]
    assert create["actor"] == "token0" and create["change"]["api_key"] == "(set)"
    assert create["change"]["headers"] == {"X-Org": "(set)"} and create["change"]["base_url"] == other.url
    assert admin.sql("SELECT count(*) FROM providers") == [(0,)]


def test_put_creates_201_then_replaces_200(admin: Admin, other: MockUpstream) -> None:
    spec = {"type": "openai", "base_url": other.url, "api_key": DB_KEY}
    assert admin.ok("PUT", "providers/db2", spec, want=201)["source"] == "database"
    assert admin.ok("PUT", "providers/db2", {**spec, "name": "db2"}, want=200)["name"] == "db2"
    err = admin.error("PUT", "providers/db2", {**spec, "name": "other"}, want=400, code="invalid_fields")
    problems_match(err["problems"], ["provider.name: must be the name in the URL"])
    assert audit_actions(admin, "db2") == ["provider.update", "provider.create"]


def test_creating_a_provider_the_database_has_is_409_and_a_file_name_is_allowed(admin: Admin,
                                                                                 other: MockUpstream) -> None:
    admin.ok("POST", "providers", db_provider(other.url), want=201)
    admin.error("POST", "providers", db_provider(other.url), want=409, code="provider_exists")
    over = admin.ok("POST", "providers", db_provider(other.url, name="up1"), want=201)
    assert over["source"] == "database" and over["overrides_config"] is True
    admin.error("POST", "providers", db_provider(other.url, name="up1"), want=409, code="provider_exists")


# -- the database's entry replaces the file's; deleting it brings the file's back --------------------------

def test_a_database_provider_overrides_the_files_and_deleting_it_restores_the_files(
        admin: Admin, upstream: MockUpstream, other: MockUpstream) -> None:
    assert reached(admin.gw, upstream, "r1")["authorization"] == f"Bearer {YAML_KEY}"
    admin.ok("POST", "providers", db_provider(other.url, name="up1"), want=201)
    # At once on this worker: the write rebuilt it before answering.
    assert reached(admin.gw, other, "r1")["authorization"] == f"Bearer {DB_KEY}"
    listed = admin.ok("GET", "providers", source="database")["data"]
    assert [(p["name"], p["overrides_config"]) for p in listed] == [("up1", True)]
    assert admin.ok("GET", "providers/up1")["base_url"] == other.url

    gone = admin.ok("DELETE", "providers/up1")
    restored = gone["restored"]
    assert restored["source"] == "config" and restored["overrides_config"] is False
    assert restored["base_url"] == upstream.url and restored["api_key"] == mask(YAML_KEY)
    assert reached(admin.gw, upstream, "r1")["authorization"] == f"Bearer {YAML_KEY}"
    assert admin.ok("GET", "providers/up1")["source"] == "config"
    admin.error("DELETE", "providers/up1", want=409, code="defined_in_config")


def test_patch_of_a_file_provider_makes_a_database_copy_that_keeps_the_files_secret(
        admin: Admin, upstream: MockUpstream) -> None:
    d = admin.ok("PATCH", "providers/up1", {"headers": {"X-Team": "search"}})
    assert d["source"] == "database" and d["overrides_config"] and d["api_key"] == mask(YAML_KEY)
    seen = reached(admin.gw, upstream, "r1")
    assert seen["authorization"] == f"Bearer {YAML_KEY}" and seen["x-team"] == "search"
    assert audit_actions(admin, "up1") == ["provider.create"]
    admin.ok("DELETE", "providers/up1")
    assert "x-team" not in reached(admin.gw, upstream, "r1")


@pytest.mark.parametrize("change", [
    {"base_url": "OTHER"}, {"base_url": "OTHER", "api_key": mask(YAML_KEY)}, {"type": "azure"},
    {"proxy": "http://127.0.0.1:9"}, {"preset": "groq"},
])
def test_a_new_destination_with_a_kept_secret_is_refused(admin: Admin, upstream: MockUpstream, other: MockUpstream,
                                                          change: dict[str, Any]) -> None:
    """The reviewer's probe: an admin who cannot read the file's key (reads mask it) PATCHes base_url to a host of
    theirs, and the key would follow. A destination change keeps no secret it does not hold in clear."""
    body = {k: other.url if v == "OTHER" else v for k, v in change.items()}
    err = admin.error("PATCH", "providers/up1", body, want=400, code="invalid_fields")
    assert any(p.startswith("provider.api_key: the destination changed (") and "send the secret again" in p
               for p in err["problems"]), err
    assert admin.sql("SELECT name FROM providers") == [] and audit_actions(admin, "up1") == []
    assert reached(admin.gw, upstream, "r1")["authorization"] == f"Bearer {YAML_KEY}"
    assert other.received == [], "nothing went to the new destination"
    if "base_url" in body:  # with the secret given again, the same change is an ordinary write
        admin.ok("PATCH", "providers/up1", {**body, "api_key": "sk-the-admins-own-key-000"})
        assert reached(admin.gw, other, "r1")["authorization"] == "Bearer sk-the-admins-own-key-000"


def test_put_of_a_file_provider_sent_back_as_read_keeps_its_secret(admin: Admin, upstream: MockUpstream,
                                                                   other: MockUpstream) -> None:
    read = admin.ok("GET", "providers/up1")
    assert read["api_key"] == mask(YAML_KEY) and YAML_KEY not in json.dumps(read)
    admin.error("PUT", "providers/up1", {**read, "base_url": other.url}, want=400, code="invalid_fields")
    d = admin.ok("PUT", "providers/up1", {**read, "retries": 1}, want=201)  # read-only fields ignored
    assert d["source"] == "database" and d["api_key"] == mask(YAML_KEY)
    assert reached(admin.gw, upstream, "r1")["authorization"] == f"Bearer {YAML_KEY}"


def test_route_database_entry_overrides_the_files_and_deleting_it_restores_it(
        admin: Admin, upstream: MockUpstream) -> None:
    assert chat(admin.gw, "demo", "echoed").json()["choices"][0]["message"]["content"] == "echoed"
    over = admin.ok("POST", "routes", {"name": "demo", "steps": [{"provider": "up1", "model": "m-over"}]},
                    want=201)
    assert over["source"] == "database" and over["overrides_config"] is True
    reached(admin.gw, upstream, "demo")
    assert upstream.received[-1].json["model"] == "m-over"
    gone = admin.ok("DELETE", "routes/demo")
    assert gone["restored"]["steps"] == [{"provider": "echo", "model": "echo-1"}]
    assert gone["restored"]["source"] == "config"
    assert chat(admin.gw, "demo", "back").json()["choices"][0]["message"]["content"] == "back"
    admin.error("DELETE", "routes/demo", want=409, code="defined_in_config")


# -- secrets: masked in reads, kept when sent back as read ---------------------------------------------------

def test_secrets_given_as_read_are_kept_and_a_mask_of_nothing_is_refused(admin: Admin, other: MockUpstream) -> None:
    admin.ok("POST", "providers", db_provider(other.url, headers={"X-Org": HEADER_SECRET}), want=201)
    admin.ok("POST", "routes", {"name": "via", "steps": [{"provider": "db1", "model": "m"}]}, want=201)
    read = admin.ok("GET", "providers/db1")
    assert admin.ok("PUT", "providers/db1", read)["api_key"] == mask(DB_KEY)  # a read sent back: a valid write
    admin.ok("PATCH", "providers/db1", {"api_key": read["api_key"], "headers": {"X-Org": read["headers"]["X-Org"],
                                                                                "X-Extra": "plain"}})
    seen = reached(admin.gw, other, "via")
    assert seen["authorization"] == f"Bearer {DB_KEY}" and seen["x-org"] == HEADER_SECRET
    assert seen["x-extra"] == "plain"
    # header names are matched in any case, as HTTP does
    admin.ok("PATCH", "providers/db1", {"headers": {"x-org": read["headers"]["X-Org"]}})
    assert reached(admin.gw, other, "via")["x-org"] == HEADER_SECRET
    err = admin.error("PATCH", "providers/db1", {"api_key": "…zzzz", "headers": {"X-Org": "org-…0000"}},
                      want=400, code="invalid_fields")
    problems_match(err["problems"], ["provider.api_key: holds '…'", "provider.headers.X-Org: holds '…'"])
    admin.ok("PATCH", "providers/db1", {"headers": {"X-Org": None, "x-org": None}})  # null removes (RFC 7396)
    assert "x-org" not in reached(admin.gw, other, "via")
    admin.ok("PATCH", "providers/db1", {"api_key": "new-plain-key-value-11112222"})
    assert reached(admin.gw, other, "via")["authorization"] == "Bearer new-plain-key-value-11112222"


def test_every_key_of_api_keys_is_masked_and_kept_when_sent_back_in_any_order(admin: Admin) -> None:
    k1, k2 = "first-pool-key-aaaa-11111111", "second-pool-key-bbbb-22222222"
    d = admin.ok("POST", "providers", {"name": "pool", "type": "openai", "base_url": U,
                                       "api_keys": [k1, {"key": k2, "weight": 3}]}, want=201)
    assert d["api_keys"] == [mask(k1), {"key": mask(k2), "weight": 3}]
    built = admin.gw.live.gateway.config.providers  # type: ignore[attr-defined]
    admin.ok("PUT", "providers/pool", d)
    assert [(k.key, k.weight) for k in built["pool"].api_keys] == [(k1, 1), (k2, 3)]
    admin.ok("PATCH", "providers/pool", {"api_keys": [{"key": mask(k2), "weight": 1}, mask(k1)]})
    built = admin.gw.live.gateway.config.providers  # type: ignore[attr-defined]
    assert [(k.key, k.weight) for k in built["pool"].api_keys] == [(k2, 1), (k1, 1)]
    err = admin.error("PATCH", "providers/pool", {"api_keys": ["…zzzz"]}, want=400, code="invalid_fields")
    problems_match(err["problems"], ["provider.api_keys[0]: holds '…'"])
    [(spec,)] = admin.sql("SELECT spec FROM providers WHERE name = 'pool'")
    assert k1 not in spec and k2 not in spec
    assert k1 not in admin.everything_shown() and k2 not in admin.everything_shown()


def test_a_proxy_password_is_masked(admin: Admin) -> None:
    proxy = f"http://alice:{PROXY_PASSWORD}@127.0.0.1:3128"
    d = admin.ok("POST", "providers", {"name": "behind", "type": "openai", "base_url": "http://127.0.0.1:9",
                                       "proxy": proxy}, want=201)
    assert d["proxy"] == f"http://alice:{mask(PROXY_PASSWORD)}@127.0.0.1:3128" and PROXY_PASSWORD not in d["proxy"]
    # the password goes to the proxy only (its host is in the mask): a new base_url keeps it
    again = admin.ok("PATCH", "providers/behind", {"proxy": d["proxy"], "base_url": "http://127.0.0.1:10"})
    assert again["proxy"] == d["proxy"]
    err = admin.error("PATCH", "providers/behind", {"proxy": d["proxy"].replace("127.0.0.1:3128", "127.0.0.2:3128")},
                      want=400, code="invalid_fields")  # the mask of the stored proxy names its host
    problems_match(err["problems"], ["provider.proxy: holds '…' as a masked value does, but is not the mask"])
    [(spec,)] = admin.sql("SELECT spec FROM providers WHERE name = 'behind'")
    assert json.loads(spec)["proxy"].startswith("enc:v1:"), "stored encrypted, not the mask"
    assert admin.gw.live.gateway.config.providers["behind"].proxy == proxy  # type: ignore[attr-defined]


URL_PASSWORD = "url-user-pass-44443333"
QUERY_SECRET = "query-api-key-99998888"
MASK_BASE_URL_CASES = [  # (base_url, as admin reads show it)
    ("https://h.example/v1", "https://h.example/v1"),
    (f"http://bob:{URL_PASSWORD}@h:8080/v1", f"http://bob:{mask(URL_PASSWORD)}@h:8080/v1"),
    (f"http://{URL_PASSWORD}@h/v1", f"http://{mask(URL_PASSWORD)}@h/v1"),  # a token as the user name
    (f"https://h/v1?api-version=2024-06-01&api-key={QUERY_SECRET}",
     f"https://h/v1?api-version=2024-06-01&api-key={mask(QUERY_SECRET)}"),
    ("https://h/x?sv=2022-11-02&sig=c2lnbmF0dXJl&se=2030", "https://h/x?sv=2022-11-02&sig=…&se=2030"),
    (f"https://h/x?key={QUERY_SECRET}#frag", f"https://h/x?key={mask(QUERY_SECRET)}#frag"),
    (f"https://h/x?access_token={QUERY_SECRET}&X-Amz-Signature=abc&subscription-key=def&Token=ghi",
     f"https://h/x?access_token={mask(QUERY_SECRET)}&X-Amz-Signature=…&subscription-key=…&Token=…"),
    ("https://h/x?key=&model=gpt&keys_in_name=no", "https://h/x?key=&model=gpt&keys_in_name=no"),
]


@pytest.mark.parametrize(("url", "shown"), MASK_BASE_URL_CASES, ids=[str(i) for i in range(len(MASK_BASE_URL_CASES))])
def test_mask_base_url_masks_the_user_info_and_credential_like_query_values(url: str, shown: str) -> None:
    from at_gateway.admin.catalog import mask_base_url

    assert mask_base_url(url) == shown


def test_credentials_in_a_base_url_are_masked_in_reads_and_kept_when_sent_back(admin: Admin,
                                                                               other: MockUpstream) -> None:
    url = other.url.replace("http://", f"http://bob:{URL_PASSWORD}@") + f"/v1?api-version=1&api-key={QUERY_SECRET}"
    shown = (other.url.replace("http://", f"http://bob:{mask(URL_PASSWORD)}@")
             + f"/v1?api-version=1&api-key={mask(QUERY_SECRET)}")
    assert admin.ok("POST", "providers", db_provider(url), want=201)["base_url"] == shown
    for path in ("providers", "providers/db1", "config", "audit"):
        text = admin.call("GET", path).text
        assert URL_PASSWORD not in text and QUERY_SECRET not in text, path
    assert admin.ok("GET", "providers/db1")["base_url"] == shown

    def built() -> Any:
        return admin.gw.live.gateway.config.providers["db1"]  # type: ignore[attr-defined]

    # A read sent back as it came keeps the stored URL, and the api_key with it: the destination did not change.
    read = admin.ok("GET", "providers/db1")
    assert admin.ok("PUT", "providers/db1", read)["base_url"] == shown
    admin.ok("PATCH", "providers/db1", {"base_url": shown, "retries": 1})
    assert built().base_url == url and built().api_key == DB_KEY
    # A mask that is not the stored URL's is refused (it would be sent as the URL); nothing changes.
    err = admin.error("PATCH", "providers/db1", {"base_url": shown.replace("api-version=1", "api-version=2")},
                      want=400, code="invalid_fields")
    problems_match(err["problems"], ["provider.base_url: holds '…' as a masked value does, but is not the mask"])
    # A new URL in clear is a new destination: the kept api_key must come with it.
    err = admin.error("PATCH", "providers/db1", {"base_url": other.url}, want=400, code="invalid_fields")
    problems_match(err["problems"], ["provider.api_key: the destination changed ("])
    assert built().base_url == url
    answers = "\n".join(admin.seen)  # every answer (the log and the audit table: see Config.secrets, public_change)
    assert URL_PASSWORD not in answers and QUERY_SECRET not in answers


# -- validation: as the YAML is checked, every problem with its path --------------------------------------

U = "http://127.0.0.1:9"
PROVIDER_INVALID = [
    pytest.param({"name": "p", "type": "openai"}, ["provider.base_url: required for type openai"], id="no-base-url"),
    pytest.param({"name": "p", "base_url": "ftp://x"}, ["provider.base_url: must start with http://"],
                 id="base-url-scheme"),
    pytest.param({"name": "p", "type": "opneai", "base_url": U}, ["provider.type: unknown provider type 'opneai'"],
                 id="type-typo"),
    pytest.param({"name": "p", "base_url": U, "colour": "red"}, ["provider.colour: unknown key"], id="unknown-key"),
    pytest.param({"name": "p", "base_url": U, "api_key": 123}, ["provider.api_key: must be a string"],
                 id="api-key-number"),
    pytest.param({"name": "p", "base_url": U, "headers": {"X-A": ["a"]}}, ["provider.headers.X-A: must be a string"],
                 id="header-list"),
    pytest.param({"name": "p", "base_url": U, "headers": {"X-A": "a\r\nb"}},
                 ["provider.headers.X-A: must not contain line breaks"], id="header-crlf"),
    pytest.param({"name": "p", "base_url": U, "headers": "x"}, ["provider.headers: must be a mapping"],
                 id="headers-string"),
    pytest.param({"name": "p", "base_url": U, "proxy": "ftp://p:1"}, ["provider.proxy: must be http://"],
                 id="proxy-scheme"),
    pytest.param({"name": "p", "type": "anthropic", "max_tokens": 0},
                 ["provider.max_tokens: must be a positive whole number"], id="anthropic-option"),
    pytest.param({"name": "p", "type": "openai", "preset": "nope"}, ["provider.preset: unknown preset 'nope'"],
                 id="preset"),
    pytest.param({"name": "p", "base_url": U, "api_key": "sk-…abcd"}, ["provider.api_key: holds '…'"],
                 id="a-mask-of-nothing"),
    pytest.param({"name": " p", "base_url": U}, ["provider.name: ' p' has spaces"], id="name-spaces"),
    pytest.param({"name": ""}, ["provider.name: required"], id="name-empty"),
    pytest.param({"base_url": U}, ["provider.name: required"], id="name-missing"),
    pytest.param({"name": 5, "base_url": U}, ["provider.name: required"], id="name-number"),
    pytest.param({"name": "p", "base_url": "nope", "api_key": 5, "headers": {"X": [1]}, "extra": True},
                 ["provider.base_url: must start", "provider.api_key: must be a string",
                  "provider.headers.X: must be a string", "provider.extra: unknown key"], id="every-problem-listed"),
]


@pytest.mark.parametrize(("spec", "problems"), PROVIDER_INVALID)
def test_an_invalid_provider_is_400_listing_each_problem_and_nothing_is_written(
        admin: Admin, spec: dict[str, Any], problems: list[str]) -> None:
    err = admin.error("POST", "providers", spec, want=400, code="invalid_fields")
    problems_match(err["problems"], problems)
    for p in problems:
        assert p.split(":")[0] in err["message"]
    if not any(p.startswith("provider.name") for p in problems):  # PUT takes the name from the URL
        err = admin.error("PUT", "providers/p", {k: v for k, v in spec.items() if k != "name"}, want=400,
                          code="invalid_fields")
        problems_match(err["problems"], problems)
    assert admin.sql("SELECT count(*) FROM providers") == [(0,)]
    assert admin.sql("SELECT count(*) FROM audit_log") == [(0,)]


def test_patch_is_checked_as_the_merged_provider_and_changes_nothing_when_invalid(admin: Admin,
                                                                                 other: MockUpstream) -> None:
    admin.ok("POST", "providers", db_provider(other.url), want=201)
    before = admin.sql("SELECT spec, updated_at FROM providers")
    kept = "provider.api_key: the destination changed"  # the stored key is kept: the new destination needs it
    for change, problems in (({"base_url": None}, ["provider.base_url: required for type openai", kept]),
                             ({"type": "azure", "api_version": "soon"}, ["provider.api_version: must be an Azure",
                                                                         kept]),
                             ({}, ["body: nothing to change"]),
                             ({"name": "renamed"}, ["provider.name: must be the name in the URL"])):
        err = admin.error("PATCH", "providers/db1", change, want=400, code="invalid_fields")
        problems_match(err["problems"], problems)
    assert admin.sql("SELECT spec, updated_at FROM providers") == before
    admin.error("PATCH", "providers/nope", {"base_url": U}, want=404, code="provider_not_found")


ROUTE_INVALID = [
    pytest.param({"steps": [{"provider": "nope", "model": "m"}]}, ["route.steps[0].provider: unknown provider 'nope'"],
                 id="unknown-provider"),
    pytest.param({"steps": [{"provider": "up", "model": "m"}]},
                 ["route.steps[0].provider: unknown provider 'up' (did you mean"], id="provider-typo"),
    pytest.param({"steps": []}, ["route.steps: a route needs at least one step"], id="no-steps"),
    pytest.param({}, ["route.steps: a route needs at least one step"], id="steps-missing"),
    pytest.param({"steps": "echo"}, ["route.steps: must be a list", "route.steps: a route needs"], id="steps-string"),
    pytest.param({"steps": [{"provider": "echo"}]}, ["route.steps[0].model: required"], id="model-missing"),
    pytest.param({"steps": [{"provider": "echo", "model": "m", "timeout": "soon"}]},
                 ["route.steps[0].timeout: 'soon' is not a duration"], id="timeout-text"),
    pytest.param({"steps": [{"provider": "echo", "model": "m", "colour": 1}]}, ["route.steps[0].colour: unknown key"],
                 id="step-unknown-key"),
    pytest.param({"steps": [{"provider": "echo", "model": "m"}, 5]}, ["route.steps[1]: must be a mapping"],
                 id="step-not-a-mapping"),
    pytest.param({"steps": [{"provider": "echo", "model": "m", "conflict_resolution": "x"}]},
                 ["route.steps[0].conflict_resolution: must be one of tools, format"], id="conflict-mode"),
    pytest.param({"steps": [{"provider": "echo", "model": "m", "price": {"input": "x"}}]},
                 ["route.steps[0].price.input: 'x' is not a price", "route.steps[0].price.output: required"],
                 id="price"),
    pytest.param({"steps": [{"provider": "echo", "model": "m"}], "limits": {"rpm": 0}},
                 ["route.limits.rpm: 0 is out of range"], id="limit-zero"),
    pytest.param({"steps": [{"provider": "echo", "model": "m"}], "limits": {"rpx": 1}},
                 ["route.limits.rpx: unknown key"], id="limit-unknown"),
    pytest.param({"stepz": []}, ["route.stepz: unknown key", "route.steps: a route needs"], id="unknown-key"),
    pytest.param({"steps": [{"provider": "nope", "model": ""}, {"provider": "echo", "model": "m", "timeout": 0}],
                  "limits": [1]},
                 ["route.steps[0].provider: unknown provider", "route.steps[0].model: required",
                  "route.steps[1].timeout: must be greater than zero", "route.limits: must be a mapping"],
                 id="every-problem-listed"),
]


@pytest.mark.parametrize(("spec", "problems"), ROUTE_INVALID)
def test_an_invalid_route_is_400_listing_each_problem_and_nothing_is_written(
        admin: Admin, spec: dict[str, Any], problems: list[str]) -> None:
    err = admin.error("POST", "routes", {"name": "r", **spec}, want=400, code="invalid_fields")
    problems_match(err["problems"], problems)
    err = admin.error("PUT", "routes/r", spec, want=400, code="invalid_fields")
    problems_match(err["problems"], problems)
    assert admin.sql("SELECT count(*) FROM routes") == [(0,)]
    assert admin.sql("SELECT count(*) FROM audit_log") == [(0,)]


def test_a_route_may_use_a_database_provider_and_the_name_must_match_the_url(admin: Admin, other: MockUpstream) -> None:
    admin.error("POST", "routes", {"name": "r", "steps": [{"provider": "db1", "model": "m"}]}, want=400,
                code="invalid_fields")
    admin.ok("POST", "providers", db_provider(other.url), want=201)
    admin.ok("POST", "routes", {"name": "r", "steps": [{"provider": "db1", "model": "m"}]}, want=201)
    err = admin.error("PATCH", "routes/r", {"name": "s"}, want=400, code="invalid_fields")
    problems_match(err["problems"], ["route.name: must be the name in the URL"])
    admin.error("PATCH", "routes/none", {"steps": []}, want=404, code="route_not_found")
    admin.error("POST", "routes", {"name": "r", "steps": [{"provider": "echo", "model": "m"}]}, want=409,
                code="route_exists")


@pytest.mark.parametrize("raw", [b"{not json", b"[1]", b'{"name": "x", "timeout": NaN}'], ids=["bad", "list", "nan"])
def test_a_body_that_is_not_a_json_object_is_400(admin: Admin, raw: bytes) -> None:
    for path in ("providers", "routes"):
        admin.error("POST", path, raw=raw, want=400, code="invalid_json")


# -- deleting: what still uses it, what the file defines -------------------------------------------------

def test_deleting_a_provider_a_route_uses_is_409_naming_the_routes(admin: Admin, other: MockUpstream) -> None:
    admin.ok("POST", "providers", db_provider(other.url), want=201)
    for name in ("zeta", "alpha"):
        admin.ok("POST", "routes", {"name": name, "steps": [{"provider": "echo", "model": "e"},
                                                            {"provider": "db1", "model": "m"}]}, want=201)
    err = admin.error("DELETE", "providers/db1", want=409, code="provider_in_use")
    assert err["routes"] == ["alpha", "zeta"] and "alpha, zeta" in err["message"]
    assert admin.ok("GET", "providers/db1")["source"] == "database"
    admin.ok("PATCH", "routes/alpha", {"steps": [{"provider": "echo", "model": "e"}]})
    admin.ok("DELETE", "routes/zeta")
    admin.ok("DELETE", "providers/db1")
    assert chat(admin.gw, "alpha").status_code == 200


def test_deleting_a_database_provider_that_overrides_a_used_file_provider_is_allowed(
        admin: Admin, upstream: MockUpstream, other: MockUpstream) -> None:
    admin.ok("POST", "providers", db_provider(other.url, name="up1"), want=201)
    assert admin.ok("DELETE", "providers/up1")["restored"]["source"] == "config"  # r1 uses up1: the file's serves it
    reached(admin.gw, upstream, "r1")


DELETE_REFUSED = [("providers/up2", "defined_in_config"), ("routes/demo", "defined_in_config"),
                  ("providers/nope", "provider_not_found"), ("routes/nope", "route_not_found")]


@pytest.mark.parametrize(("path", "code"), DELETE_REFUSED)
def test_deleting_a_file_entry_is_409_and_an_unknown_one_404(admin: Admin, path: str, code: str) -> None:
    in_file = code == "defined_in_config"
    err = admin.error("DELETE", path, want=409 if in_file else 404, code=code)
    if in_file:
        assert "config file" in err["message"]
        assert admin.ok("GET", path)["source"] == "config", "still there"
    assert admin.sql("SELECT count(*) FROM audit_log") == [(0,)]


# -- routes: served at once ------------------------------------------------------------------------------

def test_a_new_route_is_served_at_once_then_changed_then_gone(admin: Admin, upstream: MockUpstream) -> None:
    made = admin.ok("POST", "routes", {"name": "fresh", "steps": [{"provider": "echo", "model": "e", "timeout": "20s"}],
                                       "limits": {"rpm": 1000}}, want=201)
    assert made.pop("created_at") and made.pop("updated_at")
    assert made == {"object": "route", "name": "fresh", "steps": [{"provider": "echo", "model": "e", "timeout": "20s"}],
                    "limits": {"rpm": 1000}, "source": "database", "overrides_config": False}
    r = chat(admin.gw, "fresh", "first")  # no waiting: the write rebuilt this worker before answering
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "first"
    assert r.headers["x-gateway-route"] == "fresh"
    models = httpx.get(admin.gw.url + "/v1/models", headers={"authorization": f"Bearer {GATEWAY_KEY}"}).json()
    assert "fresh" in {m["id"] for m in models["data"]}
    admin.ok("PATCH", "routes/fresh", {"steps": [{"provider": "up1", "model": "m-fresh"}], "limits": {"rpm": None}})
    reached(admin.gw, upstream, "fresh")
    assert upstream.received[-1].json["model"] == "m-fresh"
    assert admin.ok("GET", "routes/fresh")["limits"] == {}, "RFC 7396: the one limit removed"
    assert admin.gw.live.gateway.config.routes["fresh"].limits is None  # type: ignore[attr-defined]
    admin.ok("DELETE", "routes/fresh")
    r = chat(admin.gw, "fresh")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert audit_actions(admin, "fresh") == ["route.delete", "route.update", "route.create"]
    row = admin.ok("GET", "audit", object="fresh", action="route.create")["data"][0]
    assert row["change"]["steps"] == [{"provider": "echo", "model": "e", "timeout": "20s"}]


def test_put_route_creates_then_replaces(admin: Admin) -> None:
    admin.ok("PUT", "routes/x", {"steps": [{"provider": "echo", "model": "a"}]}, want=201)
    d = admin.ok("PUT", "routes/x", {"name": "x", "steps": [{"provider": "echo", "model": "b"}]}, want=200)
    assert d["steps"] == [{"provider": "echo", "model": "b"}]
    assert chat(admin.gw, "x").json()["model"] == "b"


# -- listing ---------------------------------------------------------------------------------------------------

def test_listings_page_by_name_and_filter(admin: Admin) -> None:
    for i in (3, 0, 4, 1, 2):
        admin.ok("POST", "providers", {"name": f"p{i}", "type": "echo"}, want=201)
        admin.ok("POST", "routes", {"name": f"q{i}", "steps": [{"provider": f"p{i}", "model": "m"}]}, want=201)
    every = ["echo", "p0", "p1", "p2", "p3", "p4", "up1", "up2"]
    for limit in (1, 2, 3, 8, 100):
        assert [p["name"] for p in admin.walk("providers", limit)] == every
        assert [p["name"] for p in admin.walk("providers", limit, source="database")] == every[1:6]
        assert [p["name"] for p in admin.walk("providers", limit, type="echo")] == every[:6]
        assert [p["name"] for p in admin.walk("routes", limit)] == ["demo", "q0", "q1", "q2", "q3", "q4", "r1"]
    assert [p["name"] for p in admin.walk("providers", 2, source="config", type="openai")] == ["up1", "up2"]
    assert [r["name"] for r in admin.walk("routes", 2, source="config")] == ["demo", "r1"]
    assert [r["name"] for r in admin.walk("routes", 2, provider="p3")] == ["q3"]
    assert admin.ok("GET", "providers", limit=8)["next_cursor"] is None


BAD_QUERIES = [
    pytest.param("providers", {"source": "yaml"}, id="source"),
    pytest.param("providers", {"type": "nope"}, id="type"),
    pytest.param("providers", {"limit": "0"}, id="limit"),
    pytest.param("providers", {"cursor": "WzFd"}, id="cursor-shape"),  # [1]
    pytest.param("providers", {"cursor": "!!"}, id="cursor-garbage"),
    pytest.param("providers", {"colour": "x"}, id="unknown-parameter"),
    pytest.param("routes", {"source": "file"}, id="route-source"),
    pytest.param("routes", {"type": "echo"}, id="route-unknown-parameter"),
    pytest.param("providers/echo", {"x": "1"}, id="one-with-a-parameter"),
]


@pytest.mark.parametrize(("path", "params"), BAD_QUERIES)
def test_bad_query_values_are_400_invalid_query(admin: Admin, path: str, params: dict[str, str]) -> None:
    admin.error("GET", path, want=400, code="invalid_query", **params)


def test_other_methods_are_405(admin: Admin) -> None:
    r = admin.call("DELETE", "providers")
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "POST"}
    r = admin.call("GET", "providers/echo/test")
    assert r.status_code == 405 and r.headers["allow"] == "POST"


# -- POST providers/{name}/test ----------------------------------------------------------------------------------

def test_provider_test_sends_one_token_to_the_first_model_a_route_uses(admin: Admin, upstream: MockUpstream) -> None:
    d = admin.ok("POST", "providers/up1/test")
    assert d["ok"] is True and d["status"] == 200 and d["model"] == "m1" and d["error"] is None
    assert isinstance(d["latency_ms"], float) and d["latency_ms"] >= 0
    sent = upstream.received[-1]
    assert sent.json == {"model": "m1", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
    assert sent.headers["authorization"] == f"Bearer {YAML_KEY}"
    assert admin.ok("POST", "providers/echo/test", {"model": "e"})["ok"] is True
    err = admin.error("POST", "providers/up2/test", want=400, code="invalid_fields")
    assert err["problems"][0].startswith("body.model: required: no route uses provider 'up2'")
    assert admin.ok("POST", "providers/up2/test", {"model": "m2"})["model"] == "m2"
    admin.error("POST", "providers/nope/test", want=404, code="provider_not_found")
    admin.error("POST", "providers/up1/test", {"model": 5}, want=400, code="invalid_fields")
    admin.error("POST", "providers/up1/test", {"max_tokens": 5}, want=400, code="invalid_fields")
    assert admin.sql("SELECT count(*) FROM audit_log") == [(0,)], "a test changes nothing"


def test_provider_test_reports_a_failure_redacted(admin: Admin, upstream: MockUpstream) -> None:
    upstream.replies["refused"] = Reply(status=401, body={"error": {"message": f"bad key {YAML_KEY} given"}})
    d = admin.ok("POST", "providers/up1/test", {"model": "refused"})
    assert d["ok"] is False and d["status"] == 401 and d["model"] == "refused"
    assert "bad key" in d["error"] and "[REDACTED]" in d["error"] and YAML_KEY not in json.dumps(d)
    upstream.replies["slow"] = Reply(body=chat_completion(), delay=2)
    admin.ok("POST", "routes", {"name": "slow", "steps": [{"provider": "up2", "model": "slow", "timeout": 0.2}]},
             want=201)
    d = admin.ok("POST", "providers/up2/test")  # the route step's timeout
    assert d["ok"] is False and d["status"] is None and "timed out" in d["error"] and d["latency_ms"] < 1500


# -- in memory, and no secret anywhere ---------------------------------------------------------------------

def test_a_store_in_memory_reads_the_files_entries_and_refuses_writes(upstream: MockUpstream) -> None:
    with run_gateway(base_config(upstream.url, [dict(r) for r in ROUTES], admin_token=ADMIN)) as gw:
        h = {"authorization": f"Bearer {ADMIN}"}
        r = httpx.get(gw.url + V1 + "providers", headers=h)
        assert r.status_code == 200 and {p["source"] for p in r.json()["data"]} == {"config"}
        assert YAML_KEY not in r.text
        assert httpx.get(gw.url + V1 + "routes/r1", headers=h).json()["steps"] == ROUTES[1]["steps"]
        for method, path in (("POST", "providers"), ("PATCH", "providers/up1"), ("DELETE", "routes/demo"),
                             ("POST", "routes")):
            r = httpx.request(method, gw.url + V1 + path, headers=h, json={"name": "x"})
            assert r.status_code == 409 and r.json()["error"]["code"] == "store_in_memory", r.text


def test_no_secret_in_any_answer_log_line_audit_row_or_the_database_file(admin: Admin, other: MockUpstream) -> None:
    proxy = f"http://bob:{PROXY_PASSWORD}@127.0.0.1:3128"
    admin.ok("POST", "providers", db_provider(other.url, headers={"X-Org": HEADER_SECRET}), want=201)
    admin.ok("POST", "providers", {"name": "prox", "type": "openai", "base_url": U, "proxy": proxy}, want=201)
    admin.ok("POST", "routes", {"name": "via", "steps": [{"provider": "db1", "model": "ok"}]}, want=201)
    reached(admin.gw, other, "via")
    # An upstream that quotes the key back: the chat's error, the log line and health all redact it.
    other.replies["echo-key"] = Reply(status=500, body={"error": {"message": f"key {DB_KEY} given"}})
    admin.ok("PATCH", "routes/via", {"steps": [{"provider": "db1", "model": "echo-key"}]})
    r = chat(admin.gw, "via")
    assert r.status_code == 502 and DB_KEY not in r.text and "key [REDACTED] given" in r.text
    admin.ok("POST", "providers/db1/test", {"model": "echo-key"})
    for path in ("providers", "providers/db1", "providers/prox", "routes", "routes/via", "audit", "config",
                 "health"):
        admin.ok("GET", path)
    admin.ok("PATCH", "providers/db1", {"api_key": mask(DB_KEY), "headers": {"X-Org": mask(HEADER_SECRET)}})
    admin.error("PATCH", "providers/db1", {"api_key": "…nope", "base_url": "bad"}, want=400, code="invalid_fields")
    admin.ok("PATCH", "routes/via", {"steps": [{"provider": "echo", "model": "e"}]})
    admin.ok("DELETE", "providers/db1")
    admin.ok("DELETE", "providers/prox")
    assert admin.gw.logs.getvalue().count('"msg":"request"') >= 2, "the log was written (and is grepped)"
    shown = admin.everything_shown()
    for secret in (DB_KEY, HEADER_SECRET, PROXY_PASSWORD, YAML_KEY, "sk-upstream-secret-2", ENCRYPTION_KEY,
                   ADMIN, GATEWAY_KEY):
        assert secret not in shown, secret


def test_log_bodies_does_not_log_the_secrets_an_admin_body_brings(upstream: MockUpstream, other: MockUpstream,
                                                                 tmp_path: Path) -> None:
    with run_live(catalog_config(upstream, tmp_path, log_bodies=True)) as gw:
        api = Admin(gw, tmp_path / "gw.db")
        api.ok("POST", "providers", db_provider(other.url, headers={"X-Org": HEADER_SECRET},
                                                proxy=f"http://bob:{PROXY_PASSWORD}@127.0.0.1:3128"), want=201)
        api.http.close()
        logs = gw.logs.getvalue()
        assert HEADER_SECRET not in logs and PROXY_PASSWORD not in logs


# -- every worker ------------------------------------------------------------------------------------------------

def test_two_workers_serve_a_provider_and_route_made_changed_and_deleted_here_within_a_second(
        upstream: MockUpstream, other: MockUpstream, tmp_path: Path) -> None:
    """``serve`` with ``workers: 2`` as a subprocess: the writes land on one worker (one connection), new connections
    are spread over both by the kernel (told apart by the pid GET health answers), and all of them serve each
    change within a second."""
    from tests.test_service import gateway_process

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    other.replies["m-patched"] = Reply(body=chat_completion(content="patched"))
    with gateway_process(catalog_config(upstream, tmp_path, workers=2), run_dir) as (_, url, _, logfile):
        assert wait_until(lambda: logfile.read_text().count("listening on") == 2, 15), logfile.read_text()
        h = {"authorization": f"Bearer {ADMIN}"}

        def pids(n: int = 40) -> set[int]:
            return {httpx.get(url + V1 + "health", headers=h, timeout=5).json()["pid"] for _ in range(n)}

        assert wait_until(lambda: len(pids()) == 2, 10), "new connections reach both workers"

        def all_answer(check: Any, n: int = 24) -> bool:
            for _ in range(n):  # a new connection each: the kernel spreads them over both workers
                r = httpx.post(url + CHAT, headers={"authorization": f"Bearer {GATEWAY_KEY}"}, timeout=5,
                               json={"model": "shared", "messages": [{"role": "user", "content": "hi"}]})
                if not check(r):
                    return False
            return True

        with httpx.Client(base_url=url + V1, headers=h, timeout=10) as api:  # one connection: one worker
            assert api.post("providers", json=db_provider(other.url, name="dbp")).status_code == 201
            r = api.post("routes", json={"name": "shared", "steps": [{"provider": "dbp", "model": "m-new"}]})
            assert r.status_code == 201, r.text
            before = len(other.received)
            assert wait_until(lambda: all_answer(lambda r: r.status_code == 200), SEEN_WITHIN)
            assert len(other.received) > before and other.received[-1].json["model"] == "m-new"
            assert api.patch("routes/shared", json={"steps": [{"provider": "dbp", "model": "m-patched"}]}
                             ).status_code == 200
            assert wait_until(lambda: all_answer(
                lambda r: r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "patched"),
                SEEN_WITHIN)
            assert api.patch("providers/dbp", json={"api_key": "rotated-plain-key-99998888"}).status_code == 200

            def new_key_everywhere(r: httpx.Response) -> bool:
                return r.status_code == 200 and other.received[-1].headers["authorization"] == \
                    "Bearer rotated-plain-key-99998888"

            assert wait_until(lambda: all_answer(new_key_everywhere), SEEN_WITHIN)
            assert api.delete("routes/shared").status_code == 200
            assert wait_until(lambda: all_answer(lambda r: r.status_code == 404), SEEN_WITHIN)
            assert api.delete("providers/dbp").status_code == 200
            assert len(pids()) == 2, "both workers still serve"
        text = logfile.read_text()
        assert "Traceback" not in text and DB_KEY not in text and "rotated-plain-key-99998888" not in text
    conn = sqlite3.connect(tmp_path / "gw.db")
    try:
        assert conn.execute("SELECT action FROM audit_log ORDER BY id").fetchall() == [
            ("provider.create",), ("route.create",), ("route.update",), ("provider.update",), ("route.delete",),
            ("provider.delete",)]
    finally:
        conn.close()


# -- the security review's findings --------------------------------------------------------------------------

@pytest.mark.parametrize("secret, shown", [
    ("sk-proj-" + "a" * 40 + "wxyz", "sk-proj-…wxyz"), ("sk-ant-api03-" + "b" * 30 + "wxyz", "sk-ant-…wxyz"),
    ("sk-" + "c" * 30 + "wxyz", "sk-…wxyz"), ("AIza" + "d" * 31 + "wxyz", "AIza…wxyz"),
    ("atg_abcdefghijkl_" + "e" * 39 + "wxyz", "atg_…wxyz"), ("gsk_" + "f" * 48 + "wxyz", "gsk_…wxyz"),
    ("org-header-secret-zyxwvutsrq9876", "…9876"),  # a custom head is part of the secret: not shown
    ("plain-database-key-0123456789abcdef", "…cdef"), ("abcd_" + "g" * 30 + "wxyz", "…wxyz"),
    ("sk-short-key-1234", "…"), ("sk-proj-1234567890a", "…"), ("a" * 19, "…"), ("a" * 20, "…aaaa"),
    ("", ""), (None, None),
])
def test_mask_shows_at_most_a_public_vendor_prefix_and_the_last_4(secret: str | None, shown: str | None) -> None:
    assert mask(secret) == shown
    if secret and len(secret) >= 20:
        head = shown.split("…")[0] if shown else ""
        assert len(head) <= 8 and shown is not None and len(shown) - len(head) - 1 <= 4


def test_a_database_provider_cannot_use_the_hosts_google_credentials(
        tmp_path: Path, upstream: MockUpstream, other: MockUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reviewer's probe: the host has ADC (GOOGLE_APPLICATION_CREDENTIALS). A vertex provider written through
    the admin API without a key, or naming a token_url or a credentials_file, would send the host's refresh
    token (or any file the gateway can read) where the admin says: 400 with the field path, nothing written,
    nothing sent."""
    adc = tmp_path / "adc.json"
    adc.write_text(json.dumps({"type": "authorized_user", "client_id": "cid", "client_secret": "host-secret-XQ",
                               "refresh_token": "1//host-refresh-token-XQ"}))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(adc))
    with run_live(catalog_config(upstream, tmp_path)) as gw:
        api = Admin(gw, tmp_path / "gw.db")
        vx = {"name": "vx", "type": "vertex", "project": "p", "base_url": other.url}
        for extra, problem in (({"token_url": other.url + "/token"}, "provider.token_url: not allowed"),
                               ({"credentials_file": "/etc/passwd", "api_key": "k"},
                                "provider.credentials_file: not allowed"),
                               ({}, "provider.api_key: required for a vertex provider")):
            err = api.error("POST", "providers", {**vx, **extra}, want=400, code="invalid_fields")
            assert any(p.startswith(problem) for p in err["problems"]), err
        assert api.sql("SELECT count(*) FROM providers") == [(0,)]
        api.error("POST", "providers/vx/test", {"model": "gemini-2.0-flash"}, want=404, code="provider_not_found")
        assert other.received == []
        made = api.ok("POST", "providers", {**vx, "api_key": "AIza-express-key-0123456789"}, want=201)  # express
        assert made["api_key"] == "AIza…6789"
        assert "host-refresh-token-XQ" not in api.everything_shown()


def test_a_patch_of_a_file_vertex_provider_cannot_copy_its_credentials_file_into_the_database(
        tmp_path: Path, upstream: MockUpstream) -> None:
    raw = catalog_config(upstream, tmp_path)
    raw["providers"].append({"name": "fvx", "type": "vertex", "project": "p", "credentials_file": "/etc/sa.json"})
    with run_live(raw) as gw:
        api = Admin(gw, tmp_path / "gw.db")
        err = api.error("PATCH", "providers/fvx", {"token_url": "http://127.0.0.1:9/t"}, want=400,
                        code="invalid_fields")
        assert any(p.startswith("provider.credentials_file: not allowed") for p in err["problems"]), err
        assert api.sql("SELECT count(*) FROM providers") == [(0,)]


def _send_in_threads(*calls: Any) -> list[httpx.Response]:
    import threading

    out: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        out[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


@contextmanager_
def two_workers(upstream: MockUpstream, tmp_path: Path) -> Iterator[tuple[RunningGateway, RunningGateway]]:
    """Two gateways on one database file, as two forked workers are (each its own catalog, lock and Live)."""
    raw = catalog_config(upstream, tmp_path)
    with run_live(raw) as one, run_live(raw) as two:
        yield one, two


def _held_by_both(one: RunningGateway, two: RunningGateway, db: Path) -> Any:
    """An outside writer holds the database's write lock until both workers' catalogs are busy (each waits on
    its BEGIN IMMEDIATE under its catalog lock), then lets go: both requests reach the write together."""
    locker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)  # let go from another thread
    locker.execute("BEGIN IMMEDIATE")

    def release() -> None:
        busy = [g.live.services.catalog.lock for g in (one, two)]  # type: ignore[attr-defined]
        assert wait_until(lambda: all(lock.locked() for lock in busy), 4)
        locker.execute("COMMIT")
        locker.close()

    return release


def test_two_workers_creating_one_name_at_once_answer_201_and_409(upstream: MockUpstream, tmp_path: Path) -> None:
    """Check-then-write across processes: each worker checked "no such name" and both wrote, the second write
    replacing the first one's provider with a 201. The check and the write are now one transaction."""
    db = tmp_path / "gw.db"
    with two_workers(upstream, tmp_path) as (one, two):
        h = {"authorization": f"Bearer {ADMIN}"}
        release = _held_by_both(one, two, db)

        def create(g: RunningGateway, host: str) -> Any:
            return lambda: httpx.post(g.url + V1 + "providers", headers=h, timeout=30, json={
                "name": "same", "type": "openai", "base_url": f"http://{host}.example", "api_key": "sk-" + host * 9})

        got = _send_in_threads(create(one, "a"), create(two, "b"), release)
        assert sorted(r.status_code for r in got[:2]) == [201, 409], [r.text for r in got[:2]]
        loser = next(r for r in got[:2] if r.status_code == 409)
        assert loser.json()["error"]["code"] == "provider_exists"
        conn = sqlite3.connect(db)
        try:
            assert conn.execute("SELECT action FROM audit_log").fetchall() == [("provider.create",)]
        finally:
            conn.close()


def test_a_delete_and_a_route_on_the_provider_in_two_workers_leave_a_database_that_builds(
        upstream: MockUpstream, tmp_path: Path) -> None:
    """One worker deletes a provider while another adds a route on it: whichever is first, the other is refused
    (409 provider_in_use, or 400 unknown provider), and the database never holds a route on a missing provider
    (which, at the next start, dropped every stored entry)."""
    db = tmp_path / "gw.db"
    with two_workers(upstream, tmp_path) as (one, two):
        h = {"authorization": f"Bearer {ADMIN}"}
        assert httpx.post(one.url + V1 + "providers", headers=h, json=db_provider(upstream.url, "dbp")
                          ).status_code == 201
        assert wait_until(lambda: "dbp" in two.live.config.providers)  # type: ignore[attr-defined]
        release = _held_by_both(one, two, db)
        deleted, routed, _ = _send_in_threads(
            lambda: httpx.delete(one.url + V1 + "providers/dbp", headers=h, timeout=30),
            lambda: httpx.post(two.url + V1 + "routes", headers=h, timeout=30,
                               json={"name": "r2", "steps": [{"provider": "dbp", "model": "m"}]}),
            release)
        assert (deleted.status_code, routed.status_code) in ((200, 400), (409, 201)), (deleted.text, routed.text)
        conn = sqlite3.connect(db)
        try:
            providers = {n for (n,) in conn.execute("SELECT name FROM providers")}
            for (spec,) in conn.execute("SELECT spec FROM routes"):
                assert all(s["provider"] in providers | {"up1", "up2", "echo"} for s in json.loads(spec)["steps"])
        finally:
            conn.close()


def test_a_route_write_after_an_outside_key_rotation_is_409_not_a_201_never_served(
        upstream: MockUpstream, tmp_path: Path) -> None:
    from at_gateway.store.catalog import rotate_database

    with run_live(catalog_config(upstream, tmp_path)) as gw:
        api = Admin(gw, tmp_path / "gw.db")
        api.ok("POST", "routes", {"name": "early", "steps": [{"provider": "up1", "model": "m"}]}, want=201)
        rotate_database(str(tmp_path / "gw.db"), ENCRYPTION_KEY, "the new passphrase 0123456789")
        for method, path, body in (("POST", "routes", {"name": "late", "steps": [{"provider": "up1", "model": "m"}]}),
                                   ("PATCH", "routes/early", {"steps": [{"provider": "up2", "model": "m"}]}),
                                   ("DELETE", "routes/early", None)):
            err = api.error(method, path, body, want=409, code="store_conflict")
            assert "restart the gateway with the new store.encryption_key" in err["message"]
        assert [n for (n,) in api.sql("SELECT name FROM routes")] == ["early"]
        assert reached(gw, upstream, "early")  # what it serves: unchanged


def test_a_numeric_header_value_is_encrypted_masked_and_sent_as_its_text(admin: Admin, other: MockUpstream) -> None:
    number = 98765432109876543210
    made = admin.ok("POST", "providers", db_provider(other.url, headers={"X-Secret": number}), want=201)
    assert made["headers"] == {"X-Secret": "…3210"}
    admin.ok("POST", "routes", {"name": "num", "steps": [{"provider": "db1", "model": "m"}]}, want=201)
    assert reached(admin.gw, other, "num")["x-secret"] == str(number)
    admin.ok("GET", "providers/db1")
    admin.ok("GET", "config")
    admin.ok("GET", "audit")
    assert str(number) not in admin.everything_shown()
    [(spec,)] = admin.sql("SELECT spec FROM providers")
    assert json.loads(spec)["headers"]["X-Secret"].startswith("enc:v1:")
    # sent back as read: the mask keeps it
    admin.ok("PATCH", "providers/db1", {"headers": {"X-Secret": made["headers"]["X-Secret"]}})
    assert reached(admin.gw, other, "num")["x-secret"] == str(number)


@pytest.mark.parametrize("headers, problem", [
    ({"X-A\r\nX-Injected": "v"}, "provider.headers.'X-A\\r\\nX-Injected': is not a valid header name"),
    ({"Bad Name": "v"}, "provider.headers.'Bad Name': is not a valid header name"),
    ({"": "v"}, "provider.headers.'': is not a valid header name"),
    ({"Host": "evil.example"}, "provider.headers.Host: is set by the gateway"),
    ({"Content-Length": "0"}, "provider.headers.Content-Length: is set by the gateway"),
    ({"Transfer-Encoding": "chunked"}, "provider.headers.Transfer-Encoding: is set by the gateway"),
    ({"X-A": "enc:v1:abc:def"}, "provider.headers.X-A: starts with enc:v1:"),
])
def test_bad_header_names_and_token_like_values_are_400_with_their_path(admin: Admin, other: MockUpstream,
                                                                         headers: dict[str, str],
                                                                         problem: str) -> None:
    err = admin.error("POST", "providers", db_provider(other.url, headers=headers), want=400, code="invalid_fields")
    problems_match(err["problems"], [problem])
    assert admin.sql("SELECT count(*) FROM providers") == [(0,)]


def test_token_like_values_without_an_encryption_key_are_400_with_their_path(upstream: MockUpstream,
                                                                              tmp_path: Path) -> None:
    """Without a key the store refused them with a 409 naming the row; now the request is refused (400) with
    the field, as for api_key."""
    with run_live(base_config(upstream.url, store={"path": str(tmp_path / "gw.db")}, admin_token=ADMIN)) as gw:
        api = Admin(gw, tmp_path / "gw.db")
        for extra, path in (({"headers": {"X-A": "enc:v1:abc:def"}}, "provider.headers.X-A"),
                            ({"api_keys": ["enc:v1:abc:def"]}, "provider.api_keys[0]"),
                            ({"api_key": "enc:v1:abc:def"}, "provider.api_key")):
            err = api.error("POST", "providers", {"name": "h", "type": "openai", "base_url": upstream.url, **extra},
                            want=400, code="invalid_fields")
            problems_match(err["problems"], [f"{path}: starts with enc:v1:"])


def test_plaintext_storage_is_said_in_the_answer_and_once_in_the_log(upstream: MockUpstream, tmp_path: Path) -> None:
    with run_live(base_config(upstream.url, store={"path": str(tmp_path / "gw.db")}, admin_token=ADMIN)) as gw:
        api = Admin(gw, tmp_path / "gw.db")
        for name in ("p1", "p2"):
            made = api.ok("POST", "providers", db_provider(upstream.url, name), want=201)
            assert made["credentials_encrypted"] is False
        patched = api.ok("PATCH", "providers/p1", {"retries": 1})
        assert patched["credentials_encrypted"] is False
        api.ok("PUT", "providers/p1", patched)  # a write answer sent back: credentials_encrypted is read-only
        assert "credentials_encrypted" not in api.ok("GET", "providers/p1")
        warned = [ln for ln in gw.log_lines() if '"level":"warning"' in ln and "stored in plaintext" in ln]
        assert len(warned) == 1 and "store.encryption_key" in warned[0] and DB_KEY not in warned[0]


def test_a_write_is_not_blocked_by_a_stale_entry_it_does_not_touch(upstream: MockUpstream, tmp_path: Path) -> None:
    """A stored route whose provider the YAML no longer has (left out of what is served): an unrelated write goes
    through; one that touches the stale route, or adds a new problem, is still a 400."""
    raw = catalog_config(upstream, tmp_path)
    with run_live(raw) as gw:
        Admin(gw, tmp_path / "gw.db").ok("POST", "routes", {"name": "stale", "steps": [{"provider": "up2",
                                                                                         "model": "m"}]}, want=201)
    raw["providers"] = [p for p in raw["providers"] if p["name"] != "up2"]
    with run_live(raw) as gw:
        api = Admin(gw, tmp_path / "gw.db")
        api.ok("POST", "routes", {"name": "fine", "steps": [{"provider": "up1", "model": "m"}]}, want=201)
        err = api.error("POST", "routes", {"name": "new-bad", "steps": [{"provider": "up2", "model": "m"}]},
                        want=400, code="invalid_fields")
        assert any("unknown provider 'up2'" in p for p in err["problems"])
        api.ok("DELETE", "routes/stale")  # the way out
