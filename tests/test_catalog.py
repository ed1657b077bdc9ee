"""at_gateway/store/catalog.py and ``db rotate-key``: stored credentials encrypted in real sqlite files, checked at
start, rotated in one transaction, followed by the other workers; then the same as a gateway process."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from at_gateway.config import Overlay, build_config
from at_gateway.errors import ConfigError
from at_gateway.store.catalog import (
    Catalog,
    KeyChangedError,
    RowError,
    StoredEntry,
    open_catalog,
    prepare,
    public_change,
    rotate_database,
    secret_fields,
    usable_overlay,
)
from at_gateway.store.crypto import Cipher, CryptoError, Keyring, parse_kdf, token_kid
from at_gateway.store.db import StoreError
from tests.conftest import GATEWAY_KEY
from tests.mock_upstream import MockUpstream, wait_until

PASS_A = "first passphrase, sixteen+"
PASS_B = "second passphrase, sixteen+"
PASS_C = "third passphrase, sixteen+!"

API_KEY = "sk-db-apikey-0001"
POOL_1, POOL_2 = "sk-db-pool-key-0002", "sk-db-pool-key-0003"
HEADER = "hdr-secret-value-0004"
PROXY_PASS = "proxy-pass/0005"  # a '/' in the password: still the proxy's user info
SECRETS = (API_KEY, POOL_1, POOL_2, HEADER, PROXY_PASS)


def provider(name: str, **over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name, "type": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": f"{API_KEY}-{name}",
        "api_keys": [f"{POOL_1}-{name}", {"key": f"{POOL_2}-{name}", "weight": 2}],
        "headers": {"X-Org-Secret": f"{HEADER}-{name}"},
        "proxy": f"http://proxyuser:{PROXY_PASS}-{name}@127.0.0.1:3128",
    }
    spec.update(over)
    return spec


def secrets_of(*names: str) -> list[str]:
    return [f"{s}-{n}" for n in names for s in SECRETS]


def file_bytes(db: Path) -> bytes:
    """The database as it is on disk: the file, its WAL and shared memory."""
    out = b""
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(f"{db}{suffix}"):
            out += Path(f"{db}{suffix}").read_bytes()
    return out


def raw_specs(db: Path) -> dict[str, dict[str, Any]]:
    with sqlite3.connect(db) as conn:
        return {name: json.loads(spec) for name, spec in conn.execute("SELECT name, spec FROM providers")}


def setting(db: Path, name: str) -> str | None:
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
    return row[0] if row else None


def sql(db: Path, statement: str, *args: Any) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute(statement, args)
    finally:
        conn.close()


def snapshot(db: Path) -> tuple[Any, ...]:
    """Everything a rotation could change: the rows, the settings, the audit log and the versions."""
    with sqlite3.connect(db) as conn:
        return tuple(conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()  # noqa: S608
                     for table in ("providers", "settings", "audit_log", "meta"))


@contextmanager
def started(db: Path, passphrase: str | None) -> Iterator[Catalog]:
    """A catalog as a gateway's worker has it: prepare() at start, then the catalog on the keyring."""
    catalog = open_catalog(str(db), prepare(str(db), passphrase, "test"))
    try:
        yield catalog
    finally:
        catalog.close()


@contextmanager
def worker_of(db: Path, parent: Keyring) -> Iterator[Catalog]:
    """Another worker of the same run: a copy of the keyring as fork gives it (same boot secret, own memory)."""
    catalog = open_catalog(str(db), Keyring(parent.cipher, boot_secret=parent.boot_secret))
    try:
        yield catalog
    finally:
        catalog.close()


@pytest.fixture
def store_log() -> Iterator[list[logging.LogRecord]]:
    """The store's log records (the gateway's logger does not propagate to pytest's)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("at_gateway.store")
    handler, level = Keep(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def messages(records: list[logging.LogRecord], level: int | None = None) -> list[str]:
    return [r.getMessage() for r in records if level is None or r.levelno == level]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "gw.db"


# -- which fields are secrets --------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, fields", [
    ({"name": "p", "api_key": "k"}, [("api_key",)]),
    ({"name": "p", "api_key": ""}, []),
    ({"name": "p", "api_keys": ["a", {"key": "b", "weight": 3}, {"weight": 1}]},
     [("api_keys", 0), ("api_keys", 1, "key")]),
    ({"name": "p", "headers": {"X-A": "1", "X-B": "2"}}, [("headers", "X-A"), ("headers", "X-B")]),
    ({"name": "p", "proxy": "http://127.0.0.1:3128"}, []),  # no user info: nothing secret
    ({"name": "p", "proxy": "http://u:p@127.0.0.1:3128"}, [("proxy",)]),
    ({"name": "p", "proxy": "http://u:pa/ss@127.0.0.1:3128"}, [("proxy",)]),  # '/' in the password
    ({"name": "p", "base_url": "http://x", "type": "openai"}, []),
    # a numeric header value is a secret too (a PIN, an account number); true/false are not header values
    ({"name": "p", "headers": {"X-N": 98765432109876543210, "X-F": 1.5, "X-B": True}},
     [("headers", "X-N"), ("headers", "X-F")]),
])
def test_secret_fields(spec: dict[str, Any], fields: list[tuple[Any, ...]]) -> None:
    given = json.dumps(spec)
    assert [path for path, _ in secret_fields(spec)] == fields
    public = public_change(spec)
    assert [path for path, v in secret_fields(public) if v == "(set)"] == [p for p in fields if p != ("proxy",)]
    assert (public.get("proxy") == "(set)") == (("proxy",) in fields)
    assert json.dumps(spec) == given  # public_change copies: the spec given is untouched


# -- what is on disk ------------------------------------------------------------------------------------------
def test_stored_credentials_are_encrypted_in_the_file_and_the_wal(db: Path) -> None:
    with started(db, PASS_A) as catalog:
        kid = catalog.keyring.cipher.kid if catalog.keyring.cipher else None
        assert catalog.put_provider(provider("alpha"), "token0") is True
        assert catalog.put_provider(provider("beta"), "token0") is True
        assert os.path.exists(f"{db}-wal")  # still open: the rows are (also) in the WAL
        on_disk = file_bytes(db)
        for secret in secrets_of("alpha", "beta") + [PASS_A]:
            assert secret.encode() not in on_disk, secret
        assert b"http://127.0.0.1:9/v1" in on_disk  # what is not secret stays readable
        stored = raw_specs(db)["alpha"]
        tokens = [value for _, value in secret_fields(stored)]
        assert len(tokens) == 5 and all(token_kid(t) == kid for t in tokens)
        assert stored["api_keys"][1]["weight"] == 2 and stored["proxy"].startswith("enc:v1:")
        # read back exactly as given
        assert catalog.overlay().providers == (provider("alpha"), provider("beta"))
        assert catalog.provider("beta") is not None and catalog.provider("beta").spec == provider("beta")
        # the audit rows say a secret was set, never which
        rows = catalog.audit_rows(10)
        assert [r["action"] for r in rows] == ["provider.create", "provider.create"]
        assert rows[0]["change"]["api_key"] == "(set)" and rows[0]["change"]["headers"] == {"X-Org-Secret": "(set)"}
        assert all(s not in json.dumps(rows) for s in secrets_of("alpha", "beta"))
    on_disk = file_bytes(db)  # closed: checkpointed into the file
    assert all(s.encode() not in on_disk for s in secrets_of("alpha", "beta"))


def test_every_value_has_its_own_nonce(db: Path) -> None:
    same = provider("alpha", api_key="the same key", api_keys=["the same key"], headers={"X": "the same key"})
    with started(db, PASS_A) as catalog:
        catalog.put_provider(same, "t")
        catalog.put_provider({**same, "name": "beta"}, "t")
        first = raw_specs(db)
        catalog.put_provider(same, "t")  # the same value written again
        again = raw_specs(db)
    tokens = [v for spec in first.values() for _, v in secret_fields(spec)] + [again["alpha"]["api_key"]]
    assert len(tokens) == len(set(tokens)) == 9


@pytest.mark.parametrize("source, target", [
    (("alpha", "api_key"), ("beta", "api_key")),  # another row, same field
    (("alpha", "headers", "X-Org-Secret"), ("alpha", "api_key")),  # same row, another field
    (("alpha", "api_key"), ("alpha", "api_keys", 0)),
    (("alpha", "proxy"), ("beta", "proxy")),
])
def test_a_token_moved_to_another_row_or_field_does_not_decrypt(db: Path, source: tuple[Any, ...],
                                                                target: tuple[Any, ...]) -> None:
    with started(db, PASS_A) as catalog:
        catalog.put_provider(provider("alpha"), "t")
        catalog.put_provider(provider("beta"), "t")
        specs = raw_specs(db)

        def at(spec: Any, path: tuple[Any, ...]) -> Any:
            for part in path:
                spec = spec[part]
            return spec

        token = at(specs[source[0]], source[1:])
        spec = specs[target[0]]
        parent = at(spec, target[1:-1])
        parent[target[-1]] = token
        sql(db, "UPDATE providers SET spec = ? WHERE name = ?", json.dumps(spec), target[0])
        with pytest.raises(RowError) as err:
            catalog.overlay()
    field = ".".join(str(p) for p in target[1:]).replace(".0", "[0]")
    text = str(err.value)
    assert str(db) in text and f"providers row {target[0]!r}, field {field}" in text, text
    assert "moved from another row or field" in text
    assert all(s not in text for s in secrets_of("alpha", "beta") + [PASS_A])


def test_the_associated_data_is_unambiguous_whatever_the_names_hold(db: Path) -> None:
    # joined with '/', "a" + headers "x/api_key" and "a/headers/x" + api_key would be the same associated data
    with started(db, PASS_A) as catalog:
        catalog.put_provider({"name": "a", "type": "openai", "headers": {"x/api_key": "hdr-value-0000001"}}, "t")
        catalog.put_provider({"name": "a/headers/x", "type": "openai", "api_key": "sk-other-0000002"}, "t")
        specs = raw_specs(db)
        moved = {**specs["a/headers/x"], "api_key": specs["a"]["headers"]["x/api_key"]}
        sql(db, "UPDATE providers SET spec = ? WHERE name = 'a/headers/x'", json.dumps(moved))
        with pytest.raises(RowError, match="providers row 'a/headers/x', field api_key"):
            catalog.overlay()


def test_polls_that_find_nothing_changed_decrypt_nothing(db: Path) -> None:
    with started(db, PASS_A) as catalog:
        catalog.put_provider(provider("alpha"), "t")
        first = catalog.overlay()
        assert catalog.overlay() is first  # the same config_version and key: the overlay read before
        catalog.put_route({"name": "r", "steps": [{"provider": "alpha", "model": "m"}]}, "t")
        second = catalog.overlay()
        assert second is not first and [r["name"] for r in second.routes] == ["r"]


def test_a_damaged_token_is_named_with_its_database_row_and_field(db: Path) -> None:
    with started(db, PASS_A) as catalog:
        catalog.put_provider(provider("alpha"), "t")
        spec = raw_specs(db)["alpha"]
        token = spec["headers"]["X-Org-Secret"]
        spec["headers"]["X-Org-Secret"] = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")  # bytes flipped
        sql(db, "UPDATE providers SET spec = ? WHERE name = 'alpha'", json.dumps(spec))
        with pytest.raises(RowError, match=r"providers row 'alpha', field headers\.X-Org-Secret: does not decrypt"):
            catalog.overlay()
        with pytest.raises(StoreError):  # a RowError is a StoreError too: "the database cannot be used"
            catalog.providers()
    with pytest.raises(StoreError) as err:  # and at the next start
        prepare(str(db), PASS_A, "test")
    assert str(db) in str(err.value) and "providers row 'alpha', field headers.X-Org-Secret" in str(err.value)


def test_a_value_that_looks_like_a_token_is_stored_as_given(db: Path, tmp_path: Path) -> None:
    odd = provider("alpha", api_key="enc:v1:0123456789abcdef:not-really")
    with started(db, PASS_A) as catalog:
        catalog.put_provider(odd, "t")
        assert raw_specs(db)["alpha"]["api_key"] != odd["api_key"]  # encrypted like any other value
        assert catalog.overlay().providers == (odd,)
    plain_db = tmp_path / "plain.db"
    with started(plain_db, None) as catalog:  # without a key it would read back as an undecryptable token
        with pytest.raises(StoreError, match="providers row 'alpha', field api_key: a value starting with"):
            catalog.put_provider(odd, "t")
        assert catalog.overlay().providers == ()


# -- prepare(): at start ----------------------------------------------------------------------------------------
def test_prepare_makes_the_salt_once(db: Path) -> None:
    first = prepare(str(db), PASS_A, "test")
    salt = setting(db, "kdf_salt")
    assert salt is not None and salt.startswith("scrypt$n=")
    assert first.cipher is not None and setting(db, "key_id") == first.cipher.kid
    second = prepare(str(db), PASS_A, "test")
    assert setting(db, "kdf_salt") == salt and second.cipher is not None and second.cipher.kid == first.cipher.kid
    assert second.boot_secret != first.boot_secret  # a new run, a new boot secret
    # the salt is random per database: the same passphrase elsewhere is another key
    other = prepare(str(db.with_name("other.db")), PASS_A, "test")
    assert other.cipher is not None and other.cipher.kid != first.cipher.kid
    assert parse_kdf(salt).salt != parse_kdf(setting(db.with_name("other.db"), "kdf_salt") or "").salt


def test_without_a_key_credentials_are_plaintext_and_the_start_says_so(db: Path,
                                                                    store_log: list[logging.LogRecord]) -> None:
    with started(db, None) as catalog:
        assert catalog.keyring.cipher is None and setting(db, "kdf_salt") is None
        catalog.put_provider(provider("alpha"), "t")
        assert raw_specs(db)["alpha"]["api_key"] == f"{API_KEY}-alpha"  # as AT does: plaintext without a key
    store_log.clear()
    prepare(str(db), None, "test")
    warnings = messages(store_log, logging.WARNING)
    assert len(warnings) == 1 and "5 provider credential(s) are stored in plaintext" in warnings[0]
    assert str(db) in warnings[0] and "store.encryption_key" in warnings[0]


def test_plaintext_credentials_are_encrypted_at_start_once_a_key_is_set(db: Path,
                                                                       store_log: list[logging.LogRecord]) -> None:
    with started(db, None) as catalog:
        catalog.put_provider(provider("alpha"), "t")
        catalog.put_provider(provider("beta"), "t")
    assert f"{API_KEY}-alpha".encode() in file_bytes(db)
    reader = sqlite3.connect(db)  # another process with the file open: the WAL is not deleted at close
    try:
        reader.execute("SELECT count(*) FROM providers").fetchone()
        store_log.clear()
        keyring = prepare(str(db), PASS_A, "test")
        assert any("encrypted 10 stored credential(s) that were plaintext" in m for m in messages(store_log))
        assert messages(store_log, logging.WARNING) == []
        on_disk = file_bytes(db)
        assert all(s.encode() not in on_disk for s in secrets_of("alpha", "beta")), "plaintext left on disk"
    finally:
        reader.close()
    assert all(token_kid(v) == keyring.cipher.kid for spec in raw_specs(db).values()  # type: ignore[union-attr]
               for _, v in secret_fields(spec))
    with started(db, PASS_A) as catalog:
        assert catalog.overlay().providers == (provider("alpha"), provider("beta"))


def test_a_wrong_key_at_start_names_the_database_and_the_first_failing_row(db: Path) -> None:
    with started(db, PASS_A) as catalog:
        catalog.put_provider(provider("zulu"), "t")
        catalog.put_provider(provider("beta", headers={}), "t")
        catalog.put_provider(provider("alpha", api_key=None), "t")  # alpha's first secret: api_keys[0]
    before = snapshot(db)
    with pytest.raises(StoreError) as err:
        prepare(str(db), PASS_B, "test")
    text = str(err.value)
    assert text.startswith(f"{db}: store.encryption_key does not open the stored credentials")
    assert "the first that fails: providers row 'alpha', field api_keys[0]" in text, text
    assert "encrypted with another key" in text
    assert PASS_A not in text and PASS_B not in text and all(s not in text for s in secrets_of("alpha"))
    assert snapshot(db) == before  # nothing changed: no new salt, no key id, no half-encrypted rows


def test_encrypted_credentials_and_no_key_configured_is_an_error(db: Path) -> None:
    with started(db, PASS_A) as catalog:
        catalog.put_provider(provider("alpha"), "t")
    with pytest.raises(StoreError) as err:
        prepare(str(db), None, "test")
    text = str(err.value)
    assert str(db) in text and "store.encryption_key is" in text and "not set" in text
    assert "providers row 'alpha', field api_key" in text and PASS_A not in text


@pytest.mark.parametrize("damage", ["UPDATE settings SET value = 'scrypt$n=3,r=8,p=1$AAAA' WHERE name = 'kdf_salt'",
                                    "UPDATE providers SET spec = '{not json' WHERE name = 'alpha'"])
def test_a_damaged_database_is_a_store_error_naming_it(db: Path, damage: str) -> None:
    with started(db, PASS_A) as catalog:
        catalog.put_provider(provider("alpha"), "t")
    sql(db, damage)
    with pytest.raises(StoreError) as err:
        prepare(str(db), PASS_A, "test")
    assert str(db) in str(err.value) and PASS_A not in str(err.value)


# -- rotation -----------------------------------------------------------------------------------------------------
def test_rotation_re_encrypts_every_secret_under_the_new_key(db: Path) -> None:
    with started(db, PASS_A) as catalog:
        for name in ("alpha", "beta"):
            catalog.put_provider(provider(name), "t")
        catalog.put_route({"name": "r", "steps": [{"provider": "alpha", "model": "m"}]}, "t")
        old = catalog.keyring.cipher
        assert old is not None
        old_salt, version = setting(db, "kdf_salt"), catalog.versions()[0]
        old_tokens = [v for spec in raw_specs(db).values() for _, v in secret_fields(spec)]
        done = catalog.rotate_key(PASS_B, "token0")
        new = catalog.keyring.cipher
        assert new is not None and new.kid != old.kid
        assert done["rotated"] == 10 and done["key_id"] == new.kid and done["previous_key_id"] == old.kid
        steps = done["next_steps"]
        assert len(steps) == 4 and "store.encryption_key" in steps[1] and "restart" in steps[2].lower()
        assert "not the provider API keys themselves" in steps[3]  # the provider's own keys are not changed
        assert PASS_B not in json.dumps(done) and PASS_A not in json.dumps(done)
        # every token under the new key id, none the old key opens
        for name, spec in raw_specs(db).items():
            for path, token in secret_fields(spec):
                assert token_kid(token) == new.kid and token not in old_tokens
                with pytest.raises(CryptoError):
                    old.decrypt(token, json.dumps(["providers", name, *path], separators=(",", ":")))
        assert setting(db, "key_id") == new.kid and setting(db, "kdf_salt") != old_salt
        assert (setting(db, "key_handoff") or "").startswith("handoff:v1:")
        assert catalog.versions()[0] > version  # the workers look again
        assert catalog.overlay().providers == (provider("alpha"), provider("beta"))
        assert catalog.route("r") is not None
        audit = catalog.audit_rows(1)[0]
        assert audit["action"] == "encryption_key.rotate" and audit["actor"] == "token0"
        assert audit["object"] == new.kid and audit["change"] == {"secrets": 10, "from_key_id": old.kid}
        catalog.put_provider(provider("gamma"), "t")  # written under the new key from now on
        assert token_kid(raw_specs(db)["gamma"]["api_key"]) == new.kid
        on_disk = file_bytes(db)
        assert all(t.encode() not in on_disk for t in old_tokens), "the old key's tokens left on disk"
        assert all(s.encode() not in on_disk for s in secrets_of("alpha", "beta", "gamma"))


@pytest.mark.parametrize("passphrase", ["too short", "", " " * 20, "sixteen chars \x00 nul"])
def test_rotation_to_an_unusable_passphrase_changes_nothing(db: Path, passphrase: str) -> None:
    with started(db, PASS_A) as catalog:
        catalog.put_provider(provider("alpha"), "t")
        before = snapshot(db)
        with pytest.raises(ValueError, match="encryption_key: ") as err:
            catalog.rotate_key(passphrase, "t")
        assert passphrase.strip() == "" or passphrase not in str(err.value)
        assert snapshot(db) == before


INJECT = """CREATE TRIGGER fail_second AFTER UPDATE ON providers WHEN NEW.name = 'beta'
            BEGIN SELECT RAISE(ABORT, 'injected failure on the second row'); END"""


def test_a_failure_mid_rotation_rolls_everything_back(db: Path) -> None:
    with started(db, PASS_A) as catalog:
        for name in ("alpha", "beta", "gamma"):
            catalog.put_provider(provider(name), "t")
        sql(db, INJECT)  # a real failure inside sqlite, on the UPDATE of the second provider row (name order)
        before = snapshot(db)
        old = catalog.keyring.cipher
        with pytest.raises(sqlite3.IntegrityError, match="injected failure"):
            catalog.rotate_key(PASS_B, "t")
        assert not catalog.conn.in_transaction
        assert snapshot(db) == before  # alpha's new token rolled back with the rest, no new salt, no audit row
        assert catalog.keyring.cipher is old  # this process keeps the old key
        assert catalog.overlay().providers == (provider("alpha"), provider("beta"), provider("gamma"))
        catalog.put_provider(provider("delta"), "t")  # and keeps working
        # the CLI's rotation rolls back the same way
        with pytest.raises(StoreError, match="rolled back"):
            rotate_database(str(db), PASS_A, PASS_B)
        assert catalog.overlay().providers[-1] == provider("delta")
    sql(db, "DROP TRIGGER fail_second")
    with started(db, PASS_A) as catalog:  # a restart with the old key works: it is still the key
        assert len(catalog.overlay().providers) == 4
    with pytest.raises(StoreError, match="does not open"):
        prepare(str(db), PASS_B, "test")


def test_another_worker_follows_the_rotation(db: Path, store_log: list[logging.LogRecord]) -> None:
    keyring = prepare(str(db), PASS_A, "test")
    with closing(open_catalog(str(db), keyring)) as first, worker_of(db, keyring) as second:
        first.put_provider(provider("alpha"), "t")
        assert second.overlay().providers == (provider("alpha"),)
        first.rotate_key(PASS_B, "t")
        new_kid = first.keyring.cipher.kid if first.keyring.cipher else None
        assert second.keyring.cipher is not None and second.keyring.cipher.kid != new_kid  # not yet
        # the next look follows, in the same snapshot as the rows it reads: never an error in between
        assert second.overlay().providers == (provider("alpha"),)
        assert second.keyring.cipher.kid == new_kid
        assert second.follow_key() is False  # once is enough
        assert sum("following the rotated encryption key" in m for m in messages(store_log)) == 1
        second.put_provider(provider("beta"), "t")  # sealed under the new key
        assert token_kid(raw_specs(db)["beta"]["api_key"]) == new_kid
        assert first.overlay().providers == (provider("alpha"), provider("beta"))


def test_a_write_right_after_another_workers_rotation_follows_first(db: Path) -> None:
    keyring = prepare(str(db), PASS_A, "test")
    with closing(open_catalog(str(db), keyring)) as first, worker_of(db, keyring) as second:
        first.put_provider(provider("alpha"), "t")
        first.rotate_key(PASS_B, "t")
        second.put_provider(provider("beta"), "t")  # before any poll: follows inside the write's transaction
        kid = first.keyring.cipher.kid if first.keyring.cipher else None
        assert {token_kid(s["api_key"]) for s in raw_specs(db).values()} == {kid}
        second.rotate_key(PASS_C, "t")  # and a rotation from there too
        assert first.overlay().providers == (provider("alpha"), provider("beta"))


def test_a_first_key_set_by_rotation_reaches_a_keyless_worker(db: Path) -> None:
    keyring = prepare(str(db), None, "test")
    with closing(open_catalog(str(db), keyring)) as first, worker_of(db, keyring) as second:
        first.put_provider(provider("alpha"), "t")
        done = first.rotate_key(PASS_A, "t")
        assert done["previous_key_id"] is None and done["rotated"] == 5
        assert second.keyring.cipher is None
        assert second.overlay().providers == (provider("alpha"),) and second.keyring.cipher is not None
    assert all(s.encode() not in file_bytes(db) for s in secrets_of("alpha"))
    with started(db, PASS_A) as catalog:
        assert catalog.overlay().providers == (provider("alpha"),)


@pytest.mark.parametrize("outside", ["another run", "the CLI"])
def test_a_rotation_outside_this_run_is_logged_once_and_memory_keeps_serving(
        db: Path, store_log: list[logging.LogRecord], outside: str) -> None:
    keyring = prepare(str(db), PASS_A, "test")
    with closing(open_catalog(str(db), keyring)) as ours:
        ours.put_provider(provider("alpha"), "t")
        served = ours.overlay()
        if outside == "the CLI":
            rotate_database(str(db), PASS_A, PASS_B)
            assert setting(db, "key_handoff") is None  # nobody could open one
        else:
            with closing(open_catalog(str(db), Keyring(keyring.cipher))) as other:  # same key, another boot secret
                other.rotate_key(PASS_B, "t")
        store_log.clear()
        for _ in range(5):  # every poll of the watch
            assert ours.follow_key() is False
            assert ours.overlay() == served  # what it has in memory, not an error every 250 ms
        errors = messages(store_log, logging.ERROR)
        assert len(errors) == 1 and "rotated outside this run of the gateway" in errors[0], errors
        assert str(db) in errors[0] and "restart" in errors[0] and PASS_B not in errors[0]
        with pytest.raises(KeyChangedError, match="restart the gateway with the new store.encryption_key"):
            ours.put_provider(provider("beta"), "t")  # never written under a key the database no longer uses
        with pytest.raises(KeyChangedError):
            ours.rotate_key(PASS_C, "t")
    # a worker of that run started afresh (the supervisor replaced one): nothing in memory to serve
    with closing(open_catalog(str(db), Keyring(keyring.cipher, boot_secret=keyring.boot_secret))) as fresh:
        with pytest.raises(KeyChangedError, match="restart it with the new store.encryption_key"):
            fresh.overlay()


def test_a_restart_with_the_new_passphrase_works_and_drops_the_stale_handoff(db: Path) -> None:
    with started(db, PASS_A) as catalog:
        catalog.put_provider(provider("alpha"), "t")
        catalog.rotate_key(PASS_B, "t")
    assert setting(db, "key_handoff") is not None
    with pytest.raises(StoreError, match="after a rotation: the new one"):
        prepare(str(db), PASS_A, "test")  # the old passphrase is refused, and changes nothing
    assert setting(db, "key_handoff") is not None
    with started(db, PASS_B) as catalog:
        assert setting(db, "key_handoff") is None  # a past run's hand-off: nobody can open it
        assert catalog.overlay().providers == (provider("alpha"),)


def test_rotate_database_is_the_clis_rotation(db: Path) -> None:
    with started(db, PASS_A) as catalog:
        catalog.put_provider(provider("alpha"), "t")
    with pytest.raises(StoreError) as err:  # decrypts with the config's key: a wrong one changes nothing
        rotate_database(str(db), PASS_C, PASS_B)
    assert "the config's store.encryption_key does not open" in str(err.value)
    assert "providers row 'alpha', field api_key" in str(err.value) and PASS_C not in str(err.value)
    with pytest.raises(ValueError, match="the new passphrase shorter than 16"):
        rotate_database(str(db), PASS_A, "short")
    done = rotate_database(str(db), PASS_A, PASS_B, actor="cli")
    assert done["rotated"] == 5 and set(done) == {"rotated", "key_id", "previous_key_id"}
    with started(db, PASS_B) as catalog:
        assert catalog.overlay().providers == (provider("alpha"),)
        assert catalog.audit_rows(1)[0]["actor"] == "cli"


# -- `at-gateway db rotate-key` -------------------------------------------------------------------------------
def write_config(tmp_path: Path, db: Path, **top: Any) -> Path:
    cfg: dict[str, Any] = {"api_key": GATEWAY_KEY, "port": 0,
                           "store": {"path": str(db), "encryption_key": "${AT_GATEWAY_ENCRYPTION_KEY:-}"},
                           "providers": [{"name": "echo", "type": "echo"}],
                           "routes": [{"name": "demo", "steps": [{"provider": "echo", "model": "e"}]}]}
    cfg.update(top)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "at_gateway", "db", "rotate-key", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={**os.environ, **(env or {})})


def test_db_rotate_key_reads_the_new_passphrase_from_the_environment(db: Path, tmp_path: Path) -> None:
    with started(db, PASS_A) as catalog:
        catalog.put_provider(provider("alpha"), "t")
    config = write_config(tmp_path, db)
    out = cli(config, "--new-key-env", "NEW_GW_KEY", env={"AT_GATEWAY_ENCRYPTION_KEY": PASS_A, "NEW_GW_KEY": PASS_B})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    order = [i for i, ln in enumerate(lines) if ln.lstrip().startswith(("1. Done", "2. Next", "3. Then"))]
    assert len(order) == 3 and order == sorted(order), out.stdout
    assert "AT_GATEWAY_ENCRYPTION_KEY" in lines[order[1]]  # where the operator changes it
    assert "restart" in lines[order[2]] and "keeps serving" in lines[order[2]] and "in memory" in lines[order[2]]
    assert PASS_A not in out.stdout + out.stderr and PASS_B not in out.stdout + out.stderr
    with started(db, PASS_B) as catalog:
        assert catalog.overlay().providers == (provider("alpha"),)
    # --json: the same, as one object
    out = cli(config, "--new-key-env", "NEW_GW_KEY", "--json",
              env={"AT_GATEWAY_ENCRYPTION_KEY": PASS_B, "NEW_GW_KEY": PASS_C})
    assert out.returncode == 0, out.stderr
    done = json.loads(out.stdout)
    assert done["rotated"] == 5 and done["path"] == str(db) and len(done["next_steps"]) == 3
    assert PASS_C not in out.stdout


@pytest.mark.parametrize("args, env, code, said", [
    # the passphrase is never taken from the command line, nor echoed when someone tries
    (["--new-key", PASS_B], {}, 2, "never from the command line"),
    ([PASS_B], {}, 2, "never from the command line"),
    (["--new-key-env", PASS_B], {}, 1, "never the passphrase itself"),
    (["--new-key-env", "UNSET_VARIABLE_X"], {}, 1, "UNSET_VARIABLE_X is not set"),
    ([], {}, 1, "no terminal"),  # stdin is not a tty: nothing to prompt on
    (["--new-key-env", "NEW_GW_KEY"], {"NEW_GW_KEY": "tiny-pass-Q7"}, 1, "shorter than 16"),
    (["--new-key-env", "NEW_GW_KEY"], {"NEW_GW_KEY": PASS_A}, 1, "is the current store.encryption_key"),
    (["--new-key-env", "NEW_GW_KEY"], {"NEW_GW_KEY": PASS_B, "AT_GATEWAY_ENCRYPTION_KEY": PASS_C}, 1,
     "providers row 'alpha', field api_key"),
])
def test_db_rotate_key_errors(db: Path, tmp_path: Path, args: list[str], env: dict[str, str], code: int,
                              said: str) -> None:
    with started(db, PASS_A) as catalog:
        catalog.put_provider(provider("alpha"), "t")
    before = snapshot(db)
    out = cli(write_config(tmp_path, db), *args, env={"AT_GATEWAY_ENCRYPTION_KEY": PASS_A, **env})
    assert out.returncode == code and said in out.stderr, out.stderr
    for secret in (PASS_A, PASS_B, PASS_C, "tiny-pass-Q7"):
        assert secret not in out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert snapshot(db) == before


def test_db_rotate_key_without_a_database(tmp_path: Path) -> None:
    config = write_config(tmp_path, tmp_path / "missing.db")
    out = cli(config, "--new-key-env", "NEW_GW_KEY", env={"AT_GATEWAY_ENCRYPTION_KEY": PASS_A, "NEW_GW_KEY": PASS_B})
    assert out.returncode == 1 and "no database at" in out.stderr and not (tmp_path / "missing.db").exists()
    memory = tmp_path / "mem.yaml"
    memory.write_text(yaml.safe_dump({"api_key": GATEWAY_KEY, "store": {"path": ":memory:"},
                                      "providers": [{"name": "echo", "type": "echo"}],
                                      "routes": [{"name": "demo", "steps": [{"provider": "echo", "model": "e"}]}]}))
    out = cli(memory, "--new-key-env", "NEW_GW_KEY", env={"NEW_GW_KEY": PASS_B})
    assert out.returncode == 1 and "in memory" in out.stderr


def test_db_rotate_key_of_plaintext_credentials_encrypts_them(db: Path, tmp_path: Path) -> None:
    with started(db, None) as catalog:
        catalog.put_provider(provider("alpha"), "t")
    config = tmp_path / "plain.yaml"
    config.write_text(yaml.safe_dump({"api_key": GATEWAY_KEY, "store": {"path": str(db)},
                                      "providers": [{"name": "echo", "type": "echo"}],
                                      "routes": [{"name": "demo", "steps": [{"provider": "echo", "model": "e"}]}]}))
    out = cli(config, "--new-key-env", "NEW_GW_KEY", env={"NEW_GW_KEY": PASS_B})
    assert out.returncode == 0, out.stderr
    assert "the credentials were plaintext" in out.stdout and f"store.encryption_key in {config}" in out.stdout
    assert all(s.encode() not in file_bytes(db) for s in secrets_of("alpha"))
    with started(db, PASS_B) as catalog:
        assert catalog.overlay().providers == (provider("alpha"),)


# -- the gateway as a process ---------------------------------------------------------------------------------
ADMIN_TOKEN = "adm-" + "k" * 32
DB_KEY = "sk-db-provider-key-0042"


def serve_once(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A start that is expected to fail at once."""
    return subprocess.run([sys.executable, "-m", "at_gateway", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=30, env={**os.environ, **env})


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_with_a_wrong_key_exits_1_naming_the_database_and_the_row(db: Path, tmp_path: Path,
                                                                        workers: int) -> None:
    with started(db, PASS_A) as catalog:
        catalog.put_provider(provider("alpha"), "t")
    config = write_config(tmp_path, db, workers=workers)
    for key in (PASS_B, None):
        out = serve_once(config, {"AT_GATEWAY_ENCRYPTION_KEY": key} if key else {})
        assert out.returncode == 1, out.stderr
        assert str(db) in out.stderr and "providers row 'alpha', field api_key" in out.stderr, out.stderr
        assert str(config) in out.stderr and "Traceback" not in out.stderr
        assert out.stderr.count("providers row 'alpha'") == 1  # once, before any worker forks
        assert PASS_A not in out.stderr and (key is None or key not in out.stderr)
        assert all(s not in out.stderr for s in secrets_of("alpha"))


def key_of(db: Path, passphrase: str) -> Keyring:
    """The key a gateway derives from ``passphrase`` for this database, without starting one (no prepare: that
    would drop the running gateway's hand-off)."""
    record = setting(db, "kdf_salt")
    assert record is not None
    return Keyring(Cipher.derive(passphrase, parse_kdf(record)))


@contextmanager
def gateway(config: Path, tmp_path: Path, env: dict[str, str], name: str) -> Iterator[tuple[Any, str, Path]]:
    from tests.test_service import gateway_process

    run = tmp_path / name
    run.mkdir()
    with gateway_process(yaml.safe_load(config.read_text()), run, env) as (proc, url, _, logfile):
        yield proc, url, logfile


def chat(url: str, model: str = "viadb") -> httpx.Response:
    # a new connection each time: the kernel hands it to either worker
    return httpx.post(url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY}, timeout=10,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}]})


def spread(url: str, upstream: MockUpstream, key: str, n: int = 24) -> bool:
    """``n`` requests in a row on new connections all reach the upstream with ``key``."""
    for _ in range(n):
        seen = len(upstream.received)
        r = chat(url)
        if r.status_code != 200 or len(upstream.received) <= seen:
            return False
        if upstream.received[-1].headers.get("authorization") != f"Bearer {key}":
            return False
    return True


def admin(url: str, method: str, path: str, body: Any = None) -> httpx.Response:
    return httpx.request(method, f"{url}/admin/api/v1/{path}", json=body, timeout=30,
                         headers={"authorization": f"Bearer {ADMIN_TOKEN}"})


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc to count the workers")
def test_rotation_with_two_workers_then_restarts(db: Path, tmp_path: Path, upstream: MockUpstream) -> None:
    config = write_config(tmp_path, db, workers=2, admin_token=ADMIN_TOKEN)
    env_a = {"AT_GATEWAY_ENCRYPTION_KEY": PASS_A}
    dbp = {"name": "dbp", "type": "openai", "base_url": upstream.url, "api_key": DB_KEY}
    route = {"name": "viadb", "steps": [{"provider": "dbp", "model": "m"}]}
    with gateway(config, tmp_path, env_a, "first") as (proc, url, logfile):
        assert wait_until(lambda: logfile.read_text().count("listening on") == 2, 15)
        made = admin(url, "POST", "providers", dbp)
        if made.status_code in (404, 405):  # the admin providers endpoints are not there yet: the database directly
            with closing(open_catalog(str(db), key_of(db, PASS_A))) as catalog:
                catalog.put_provider(dbp, "test")
                catalog.put_route(route, "test")
        else:
            assert made.status_code in (200, 201), made.text
            assert admin(url, "POST", "routes", route).status_code in (200, 201)
        assert DB_KEY.encode() not in file_bytes(db)
        assert wait_until(lambda: spread(url, upstream, DB_KEY, 8), 10), logfile.read_text()
        rotated = admin(url, "POST", "rotate-key", {"encryption_key": PASS_B})
        if rotated.status_code == 404:
            pytest.skip("POST /admin/api/v1/rotate-key is not there yet (at_gateway/admin/system.py)")
        assert rotated.status_code == 200, rotated.text
        assert rotated.json()["rotated"] == 1 and PASS_B not in rotated.text
        assert "store.encryption_key" in " ".join(rotated.json()["next_steps"])
        assert spread(url, upstream, DB_KEY)  # both workers go on serving
        # Both workers hold the new key: a credential changed under it now reaches every one of them.
        with closing(open_catalog(str(db), key_of(db, PASS_B))) as catalog:
            catalog.put_provider({**dbp, "api_key": DB_KEY + "-after"}, "test")
        assert wait_until(lambda: spread(url, upstream, DB_KEY + "-after"), 10), logfile.read_text()
        health = admin(url, "GET", "health")
        if health.status_code == 200 and "pid" in health.json():
            pids = set()
            assert wait_until(lambda: pids.add(admin(url, "GET", "health").json()["pid"]) or len(pids) == 2, 10)
        log = logfile.read_text()
        assert log.count("following the rotated encryption key") == 1, log  # the worker that did not rotate
        assert "cannot read the database" not in log and "Traceback" not in log
        assert PASS_A not in log and PASS_B not in log and DB_KEY not in log
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    assert DB_KEY.encode() not in file_bytes(db)
    # a restart with the new passphrase serves; with the old one it is refused
    with gateway(config, tmp_path, {"AT_GATEWAY_ENCRYPTION_KEY": PASS_B}, "second") as (proc, url, logfile):
        assert wait_until(lambda: logfile.read_text().count("listening on") == 2, 15)
        assert spread(url, upstream, DB_KEY + "-after", 8)
        assert setting(db, "key_handoff") is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    out = serve_once(config, env_a)
    assert out.returncode == 1 and str(db) in out.stderr and "providers row 'dbp', field api_key" in out.stderr
    assert PASS_A not in out.stderr and PASS_B not in out.stderr


def test_a_cli_rotation_while_serving_keeps_memory_until_the_restart(db: Path, tmp_path: Path,
                                                                    upstream: MockUpstream) -> None:
    with started(db, PASS_A) as catalog:
        catalog.put_provider({"name": "dbp", "type": "openai", "base_url": upstream.url, "api_key": DB_KEY}, "t")
        catalog.put_route({"name": "viadb", "steps": [{"provider": "dbp", "model": "m"}]}, "t")
    config = write_config(tmp_path, db, workers=2)
    with gateway(config, tmp_path, {"AT_GATEWAY_ENCRYPTION_KEY": PASS_A}, "first") as (proc, url, logfile):
        assert wait_until(lambda: logfile.read_text().count("listening on") == 2, 15)
        assert spread(url, upstream, DB_KEY, 8)
        out = cli(config, "--new-key-env", "NEW_GW_KEY", env={"AT_GATEWAY_ENCRYPTION_KEY": PASS_A,
                                                               "NEW_GW_KEY": PASS_B})
        assert out.returncode == 0, out.stderr
        outside = "rotated outside this run of the gateway"
        assert wait_until(lambda: logfile.read_text().count(outside) == 2, 10), logfile.read_text()  # each worker
        assert spread(url, upstream, DB_KEY)  # serving what they have in memory
        log = logfile.read_text()
        assert log.count(outside) == 2 and "cannot read the database" not in log and "Traceback" not in log
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    with gateway(config, tmp_path, {"AT_GATEWAY_ENCRYPTION_KEY": PASS_B}, "second") as (proc, url, logfile):
        assert spread(url, upstream, DB_KEY, 8)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


# -- numeric header values, route writes after an outside rotation, transactions, what a start can serve --------
@pytest.mark.parametrize("passphrase", [PASS_A, None], ids=["encrypted", "plaintext"])
def test_a_numeric_header_value_is_stored_as_its_text_and_encrypted(db: Path, passphrase: str | None) -> None:
    number = 98765432109876543210
    with started(db, passphrase) as catalog:
        catalog.put_provider({"name": "num", "type": "openai", "base_url": "http://h", "headers": {"X-N": number,
                                                                                                "X-F": 2.5}}, "t")
        stored = raw_specs(db)["num"]["headers"]
        if passphrase:
            assert all(token_kid(v) == catalog.keyring.cipher.kid for v in stored.values())  # type: ignore[union-attr]
            assert str(number).encode() not in file_bytes(db)
        else:
            assert stored == {"X-N": str(number), "X-F": "2.5"}  # strings, as they are sent
        found = catalog.provider("num")
        assert found is not None and found.spec["headers"] == {"X-N": str(number), "X-F": "2.5"}
        [change] = [json.loads(c) for (c,) in sqlite3.connect(db).execute("SELECT change FROM audit_log")]
        assert change["headers"] == {"X-N": "(set)", "X-F": "(set)"}


def test_route_writes_after_an_outside_rotation_are_refused(db: Path) -> None:
    """After `db rotate-key` outside this run, overlay() answers what it last read: a route written now would be
    acknowledged and never served. Refused like a provider write, nothing written."""
    with started(db, PASS_A) as catalog:
        catalog.put_provider(provider("alpha"), "t")
        catalog.put_route({"name": "r", "steps": [{"provider": "alpha", "model": "m"}]}, "t")
        catalog.overlay()
        rotate_database(str(db), PASS_A, PASS_B)
        before = snapshot(db)
        for write in (lambda: catalog.put_route({"name": "late", "steps": [{"provider": "alpha", "model": "m"}]}, "t"),
                      lambda: catalog.delete_route("r", "t"), lambda: catalog.delete_provider("alpha", "t")):
            with pytest.raises(KeyChangedError, match="restart the gateway with the new store.encryption_key"):
                write()
            assert not catalog.conn.in_transaction
        assert snapshot(db) == before


def test_a_transaction_holds_the_checks_and_the_writes_and_the_writes_join_it(db: Path) -> None:
    with started(db, PASS_A) as catalog:
        with catalog.transaction():
            assert catalog.conn.in_transaction and catalog.provider("alpha") is None  # a read in it: no BEGIN
            catalog.put_provider(provider("alpha"), "t")  # joins: no BEGIN of its own, no COMMIT
            catalog.put_route({"name": "r", "steps": [{"provider": "alpha", "model": "m"}]}, "t")
            assert catalog.conn.in_transaction
            assert [e["name"] for e in catalog.overlay().routes] == ["r"]  # the overlay reads inside it too
        assert not catalog.conn.in_transaction and set(raw_specs(db)) == {"alpha"}
        before = snapshot(db)
        with pytest.raises(RuntimeError), catalog.transaction():
            catalog.put_provider(provider("beta"), "t")
            catalog.delete_route("r", "t")
            raise RuntimeError("a check that failed after the writes")
        assert not catalog.conn.in_transaction and snapshot(db) == before  # all of it rolled back


def test_a_second_writer_waits_for_the_first_transaction_and_sees_its_write(db: Path) -> None:
    """Two workers (two catalogs, one file): the second's check runs after the first's commit, never on the
    state before it."""
    keyring = prepare(str(db), PASS_A, "test")
    with closing(open_catalog(str(db), keyring)) as one, \
            closing(open_catalog(str(db), Keyring(keyring.cipher, boot_secret=keyring.boot_secret))) as two:
        with one.transaction():
            assert one.provider("same") is None
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                two.conn.execute("PRAGMA busy_timeout = 50")
                with two.transaction():
                    pass  # BEGIN IMMEDIATE waits for the first writer (here: gives up after 50 ms)
            one.put_provider(provider("same"), "t")
        assert not two.conn.in_transaction
        with two.transaction():
            assert two.provider("same") is not None  # the check a create makes: now a 409


def _merge_with(file_doc: dict[str, Any]) -> Any:
    return lambda overlay: build_config(file_doc, "c.yaml", {}, overlay=overlay)


FILE_DOC = {"api_key": "k", "providers": [{"name": "echo", "type": "echo"}],
            "routes": [{"name": "demo", "steps": [{"provider": "echo", "model": "e"}]}]}


def test_usable_overlay_leaves_out_only_the_entries_that_do_not_fit() -> None:
    """A stored route on a provider the YAML no longer has must not take the other stored entries down with it
    (at a start, Live served the file alone). Dropped: the stale route, a provider that does not validate and
    the route that needed it; kept: the rest."""
    overlay = Overlay(
        providers=({"name": "dbp", "type": "openai", "base_url": "http://h", "api_key": "sk-x"},
                   {"name": "broken", "type": "openai"}),
        routes=({"name": "prod", "steps": [{"provider": "dbp", "model": "m"}]},
                {"name": "uses-up2", "steps": [{"provider": "up2", "model": "m"}]},
                {"name": "on-broken", "steps": [{"provider": "broken", "model": "m"}]}))
    fitted = usable_overlay(overlay, _merge_with(FILE_DOC))
    assert sorted(fitted.config.routes) == ["demo", "prod"] and sorted(fitted.config.providers) == ["dbp", "echo"]
    assert sorted(fitted.dropped) == [("providers", "broken"), ("routes", "on-broken"), ("routes", "uses-up2")]
    assert [e["name"] for e in fitted.overlay.routes] == ["prod"]
    assert fitted.error is not None and fitted.error.source == "c.yaml"
    assert any(p.startswith("routes['uses-up2'] (database).steps[0].provider: unknown provider") for p in
               fitted.error.problems)
    assert any(p.startswith("providers['broken'] (database).base_url") for p in fitted.error.problems)
    assert "sk-x" not in repr(fitted)


def test_usable_overlay_of_entries_that_fit_is_all_of_them() -> None:
    overlay = Overlay(routes=({"name": "r", "steps": [{"provider": "echo", "model": "m"}]},))
    fitted = usable_overlay(overlay, _merge_with(FILE_DOC))
    assert fitted.error is None and fitted.dropped == () and fitted.overlay == overlay and "r" in fitted.config.routes


def test_usable_overlay_serves_the_file_alone_when_the_problems_name_no_stored_entry() -> None:
    # a stored provider replacing the file's echo with one a file route cannot use: the problem is the file route's
    overlay = Overlay(providers=({"name": "echo", "type": "openai"},))
    doc = {**FILE_DOC, "routes": [{"name": "demo", "steps": [{"provider": "echo", "model": "e"}]}]}
    fitted = usable_overlay(overlay, _merge_with(doc))
    assert fitted.overlay == Overlay() and fitted.config.providers["echo"].type == "echo"
    assert fitted.error is not None
    with pytest.raises(ConfigError):  # a file that does not build alone: the caller's error
        usable_overlay(Overlay(), _merge_with({"api_key": "k", "routes": [{"name": "x"}]}))


def test_plaintext_credentials_written_are_said_once_per_process(db: Path, store_log: list[logging.LogRecord]) -> None:
    with started(db, None) as catalog:
        assert catalog.encrypts is False
        store_log.clear()
        catalog.put_provider({"name": "nokey", "type": "openai", "base_url": "http://h"}, "t")  # no credential
        assert not messages(store_log, logging.WARNING)
        for name in ("a", "b"):
            catalog.put_provider(provider(name), "t")
        warned = messages(store_log, logging.WARNING)
        assert len(warned) == 1 and "stored in plaintext" in warned[0] and "store.encryption_key" in warned[0]
        assert not any(secret in warned[0] for secret in secrets_of("a", "b"))
    with started(db.with_name("enc.db"), PASS_A) as catalog:
        store_log.clear()
        catalog.put_provider(provider("c"), "t")
        assert catalog.encrypts is True and not messages(store_log, logging.WARNING)


def test_a_stored_entry_repr_holds_no_secret(db: Path) -> None:
    with started(db, PASS_A) as catalog:
        catalog.put_provider(provider("alpha"), "t")
        entry = catalog.provider("alpha")
        assert isinstance(entry, StoredEntry) and "alpha" in repr(entry)
        assert not any(secret in repr(entry) for secret in secrets_of("alpha"))
