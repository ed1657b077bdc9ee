"""at_gateway/store/crypto.py: AES-256-GCM tokens, the scrypt key, the key hand-off between workers."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from at_gateway.store import crypto
from at_gateway.store.crypto import (
    PREFIX,
    Cipher,
    CryptoError,
    KdfParams,
    Keyring,
    is_encrypted,
    kdf_record,
    parse_kdf,
    passphrase_problem,
    token_kid,
)

AAD = '["providers","up1","api_key"]'
KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))


@pytest.fixture(scope="module")
def cipher() -> Cipher:
    return Cipher(KEY_A)


def raw_of(token: str) -> bytes:
    body = token.rsplit(":", 1)[1]
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


def with_raw(token: str, raw: bytes) -> str:
    head = token.rsplit(":", 1)[0]
    return f"{head}:{base64.urlsafe_b64encode(raw).decode().rstrip('=')}"


@pytest.mark.parametrize("plain", ["sk-upstream-secret-1", "", "ünïcødé ключ 鍵 🔑", "x" * 10_000,
                                   "http://user:p%40ss@proxy.local:3128"])
def test_round_trip(cipher: Cipher, plain: str) -> None:
    token = cipher.encrypt(plain, AAD)
    assert is_encrypted(token) and token.startswith(f"{PREFIX}{cipher.kid}:")
    assert plain == "" or plain not in token
    assert cipher.decrypt(token, AAD) == plain
    assert Cipher(KEY_A).decrypt(token, AAD) == plain  # the same key in another object (another worker)


def test_a_fresh_nonce_for_every_value(cipher: Cipher) -> None:
    tokens = {cipher.encrypt("same plaintext", AAD) for _ in range(50)}
    assert len(tokens) == 50
    nonces = {raw_of(t)[:crypto.NONCE_BYTES] for t in tokens}
    assert len(nonces) == 50
    assert all(cipher.decrypt(t, AAD) == "same plaintext" for t in tokens)


@pytest.mark.parametrize("where", ["nonce", "ciphertext", "tag"])
def test_a_flipped_byte_does_not_decrypt(cipher: Cipher, where: str) -> None:
    token = cipher.encrypt("sk-upstream-secret-1", AAD)
    raw = bytearray(raw_of(token))
    index = {"nonce": 0, "ciphertext": crypto.NONCE_BYTES + 3, "tag": len(raw) - 1}[where]
    raw[index] ^= 0x01
    with pytest.raises(CryptoError, match="does not decrypt"):
        cipher.decrypt(with_raw(token, bytes(raw)), AAD)


@pytest.mark.parametrize("damage, reason", [
    (lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"), "does not decrypt|damaged"),  # a character changed
    (lambda t: t + "!", "not base64"),  # a character outside the alphabet is damage, not skipped
    (lambda t: t[:len(t) - 4] + "+/" + t[len(t) - 2:], "not base64"),  # the standard alphabet's, not url-safe
    (lambda t: t.rsplit(":", 1)[0] + ":AAAA", "too short"),
    (lambda t: t.replace(PREFIX, "enc:v2:"), "not an encrypted value"),
    (lambda t: t.rsplit(":", 1)[0], "not an encrypted value"),  # no body
])
def test_damaged_tokens_are_refused(cipher: Cipher, damage: object, reason: str) -> None:
    token = cipher.encrypt("sk-upstream-secret-1", AAD)
    assert callable(damage)
    with pytest.raises(CryptoError, match=reason):
        cipher.decrypt(damage(token), AAD)


@pytest.mark.parametrize("other", ['["providers","up2","api_key"]', '["providers","up1","headers","X-Key"]',
                                   '["providers","up1"]', ""])
def test_a_token_moved_to_another_row_or_field_does_not_decrypt(cipher: Cipher, other: str) -> None:
    token = cipher.encrypt("sk-upstream-secret-1", AAD)
    with pytest.raises(CryptoError, match="moved from another row or field"):
        cipher.decrypt(token, other)


def test_another_keys_token_names_key_ids_and_nothing_secret(cipher: Cipher) -> None:
    other = Cipher(KEY_B)
    assert other.kid != cipher.kid and len(other.kid) == 16 and int(other.kid, 16) >= 0
    token = other.encrypt("sk-upstream-secret-1", AAD)
    assert token_kid(token) == other.kid
    with pytest.raises(CryptoError) as err:
        cipher.decrypt(token, AAD)
    text = str(err.value)
    assert other.kid in text and cipher.kid in text
    assert "sk-upstream-secret-1" not in text and KEY_A.hex() not in text and KEY_B.hex() not in text


def test_the_key_id_reveals_nothing_of_the_key(cipher: Cipher) -> None:
    # an HMAC under the key of a fixed label: not a prefix of the key, of its hash, or of its hex
    assert cipher.kid not in KEY_A.hex() and cipher.kid not in hashlib.sha256(KEY_A).hexdigest()
    assert KEY_A.hex() not in repr(cipher) and repr(cipher) == f"Cipher(kid={cipher.kid})"
    ring = Keyring(cipher)
    assert ring.boot_secret.hex() not in repr(ring) and KEY_A.hex() not in repr(ring)


def test_token_kid_and_is_encrypted() -> None:
    assert token_kid("sk-plain") is None and not is_encrypted("sk-plain") and not is_encrypted(None)
    assert token_kid("enc:v1:abcd:xyz") == "abcd"
    assert token_kid("enc:v1:nocolon") is None


def test_derive_is_scrypt_over_passphrase_and_salt() -> None:
    salt = b"s" * 16
    a = Cipher.derive("a passphrase of 16+", salt)
    expected = hashlib.scrypt(b"a passphrase of 16+", salt=salt, n=crypto.SCRYPT_N, r=crypto.SCRYPT_R,
                              p=crypto.SCRYPT_P, maxmem=2**26, dklen=32)
    assert a.key == expected and a.key != hashlib.sha256(b"a passphrase of 16+").digest()
    assert Cipher.derive("a passphrase of 16+", KdfParams(salt)).kid == a.kid  # deterministic
    assert Cipher.derive("a passphrase of 16+", b"t" * 16).kid != a.kid  # the salt matters
    assert Cipher.derive("another passphrase!", salt).kid != a.kid
    # the cost read from the database is the cost used
    cheap = Cipher.derive("a passphrase of 16+", KdfParams(salt, n=2**10, r=8, p=1))
    assert cheap.key == hashlib.scrypt(b"a passphrase of 16+", salt=salt, n=2**10, r=8, p=1, dklen=32)


def test_scrypt_cost_is_real() -> None:
    # 2^15 x r 8 x 128 B = 32 MiB per derivation: not a bare hash, not a toy cost
    assert crypto.SCRYPT_N >= 2**15 and crypto.SCRYPT_R >= 8 and crypto.SCRYPT_P >= 1
    assert 128 * crypto.SCRYPT_N * crypto.SCRYPT_R >= 32 * 2**20
    assert crypto.SALT_BYTES >= 16


def test_kdf_record_round_trips_and_keeps_the_cost() -> None:
    params = KdfParams.fresh()
    assert len(params.salt) == crypto.SALT_BYTES and KdfParams.fresh().salt != params.salt
    record = kdf_record(params)
    assert record.startswith(f"scrypt$n={crypto.SCRYPT_N},r={crypto.SCRYPT_R},p={crypto.SCRYPT_P}$")
    assert parse_kdf(record) == params
    assert params.salt.hex() not in repr(params)
    raised = KdfParams(params.salt, n=2**16)
    assert parse_kdf(kdf_record(raised)) == raised
    floor = KdfParams(params.salt, n=crypto.MIN_SCRYPT_N)  # the least cost a database may name
    assert crypto.MIN_SCRYPT_N == 2**14 and parse_kdf(kdf_record(floor)) == floor
    # the first v2 databases kept a bare base64 salt: the default cost
    assert parse_kdf(base64.b64encode(b"x" * 16).decode()) == KdfParams(b"x" * 16)


@pytest.mark.parametrize("record", [
    "not base64!", "", "scrypt$n=32768,r=8,p=1$", base64.b64encode(b"short").decode(),
    "scrypt$n=1000,r=8,p=1$" + base64.b64encode(b"x" * 16).decode(),  # not a power of two
    "scrypt$n=8192,r=8,p=1$" + base64.b64encode(b"x" * 16).decode(),  # below the floor of 2^14: a toy cost
    "scrypt$n=2,r=8,p=1$" + base64.b64encode(b"x" * 16).decode(),
    "scrypt$n=1073741824,r=8,p=1$" + base64.b64encode(b"x" * 16).decode(),  # 1 TiB: refused, not obeyed
    "bcrypt$n=32768,r=8,p=1$" + base64.b64encode(b"x" * 16).decode(),
])
def test_damaged_kdf_records_are_refused(record: str) -> None:
    with pytest.raises(CryptoError, match="salt"):
        parse_kdf(record)


@pytest.mark.parametrize("value, ok", [
    ("sixteen chars!!!", True), ("x" * 64, True), ("pässphrase ünïcode", True),
    ("fifteen chars!!", False), ("", False), (None, False), (" " * 20, False), ("a NUL \x00 in it 1234", False),
])
def test_passphrase_rules(value: object, ok: bool) -> None:
    problem = passphrase_problem(value)
    assert (problem is None) == ok
    if problem is not None and isinstance(value, str) and value:
        assert value not in problem


def test_handoff_opens_only_with_the_same_boot_secret(cipher: Cipher) -> None:
    fresh = Cipher(KEY_B)
    parent = Keyring(cipher)
    handoff = parent.wrap(fresh)
    assert handoff.startswith("handoff:v1:") and KEY_B.hex() not in handoff
    assert base64.urlsafe_b64encode(KEY_B).decode().rstrip("=") not in handoff
    worker = Keyring(cipher, boot_secret=parent.boot_secret)  # what a fork inherits
    assert worker.unwrap(handoff, fresh.kid).key == KEY_B
    for other in (Keyring(cipher), Keyring(None)):  # another run, the CLI: a boot secret of their own
        with pytest.raises(CryptoError):
            other.unwrap(handoff, fresh.kid)
    with pytest.raises(CryptoError):  # bound to the key id it carries
        worker.unwrap(handoff, cipher.kid)
    with pytest.raises(CryptoError, match="not a key hand-off"):
        worker.unwrap("", fresh.kid)
    assert parent.wrap(fresh) != handoff  # a fresh nonce there too


def test_cryptography_is_imported_only_for_a_key() -> None:
    import subprocess
    import sys

    code = ("import sys; import at_gateway.store.crypto as c, at_gateway.store.catalog; "
            "c.Keyring(None); c.passphrase_problem('x'); print('cryptography' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


@given(plain=st.text(max_size=200), aad=st.text(max_size=60), other=st.text(max_size=60))
def test_any_text_round_trips_and_only_under_its_aad(plain: str, aad: str, other: str) -> None:
    c = Cipher(KEY_A)
    token = c.encrypt(plain, aad)
    assert c.decrypt(token, aad) == plain
    if other != aad:
        with pytest.raises(CryptoError):
            c.decrypt(token, other)
