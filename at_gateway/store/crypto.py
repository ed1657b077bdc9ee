"""Credentials at rest: AES-256-GCM with a key stretched from a passphrase.

A stored secret is ``enc:v1:<kid>:<base64url(nonce | ciphertext+tag)>``: a random 96-bit nonce per value
(never reused: random nonces are safe far beyond the number of secrets a gateway stores), the row and
field as associated data (a value copied to another row or field does not decrypt), ``kid`` the key's
id (8 bytes, hex, of an HMAC of a fixed label under the key: it names the key without revealing it).

The key is scrypt(passphrase, salt): a passphrase is not a key, and a bare hash of one is cheap to guess.
The salt and scrypt's cost parameters are kept in the database's ``settings`` (:func:`kdf_record`), so
the cost can be raised for new databases without locking out the ones written before.

``cryptography`` is imported only when a key is set (start-up cost, and the .pyz's wheel extraction).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from dataclasses import dataclass, field
from typing import Any

PREFIX = "enc:v1:"
_HANDOFF_PREFIX = "handoff:v1:"
_KID_LABEL = b"at-gateway key id v1"
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32
SALT_BYTES = 16
# scrypt's cost: 2^15 x 8 x 128 bytes = 32 MiB and about 0.07 s, once per start and per rotation (never per
# request). Higher costs add their time to every start ("ready 0.12 s after start") and their memory to
# small servers; the passphrase is 16+ characters, usually random. Kept per database (kdf_record), so a
# later release can raise it for new salts without breaking existing databases.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
_MAX_SCRYPT_MEMORY = 1 << 30  # a database asking for more than 1 GiB per derivation is refused, not obeyed
# The least cost a database may name: a settings row written (or damaged) to ask for a toy cost must not make
# the key of the next rotation cheap to guess. scrypt's own interactive-login floor (2^14, r=8).
MIN_SCRYPT_N = 2**14
MIN_PASSPHRASE = 16  # as config.py's store.encryption_key check: a key the config would refuse is no key


class CryptoError(Exception):
    """A value cannot be decrypted (another key, another row or field, or damaged)."""


def passphrase_problem(passphrase: object) -> str | None:
    """Why ``passphrase`` cannot be an encryption key (None: it can). The config's ``store.encryption_key``
    rule (16 characters or more), and no NUL (no environment variable can hold one): a rotation to a
    passphrase the config then refuses would lock the operator out. The message never holds the passphrase."""
    if not isinstance(passphrase, str) or not passphrase.strip():
        return "must be a non-empty string"
    if len(passphrase) < MIN_PASSPHRASE:
        return f"shorter than {MIN_PASSPHRASE} characters (use a long random passphrase: openssl rand -base64 32)"
    if "\x00" in passphrase:
        return "holds a NUL character (no environment variable or config file can carry it)"
    return None


def is_encrypted(value: object) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def token_kid(value: str) -> str | None:
    """The key id a stored token names; None for a plaintext value."""
    if not is_encrypted(value):
        return None
    kid, sep, _ = value[len(PREFIX):].partition(":")
    return kid if sep else None


def new_salt() -> bytes:
    return os.urandom(SALT_BYTES)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def _unb64(text: str) -> bytes:
    """Strict: a character outside the url-safe alphabet is damage, not something to skip."""
    if not _B64URL.fullmatch(text):
        raise ValueError("not url-safe base64")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class KdfParams:
    """scrypt's salt and cost, as kept in the database (:func:`kdf_record` / :func:`parse_kdf`)."""

    salt: bytes = field(repr=False)
    n: int = SCRYPT_N
    r: int = SCRYPT_R
    p: int = SCRYPT_P

    @classmethod
    def fresh(cls) -> KdfParams:
        return cls(new_salt())


def kdf_record(params: KdfParams) -> str:
    """``scrypt$n=32768,r=8,p=1$<base64 salt>``: one settings value, so salt and cost never part."""
    return f"scrypt$n={params.n},r={params.r},p={params.p}${base64.b64encode(params.salt).decode()}"


_KDF_RE = re.compile(r"scrypt\$n=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/=]+)")


def parse_kdf(text: str) -> KdfParams:
    """The parameters a settings value names; a bare base64 salt (the first schema v2 databases) means the
    default cost. Raises :class:`CryptoError` for anything else (a damaged or foreign settings row)."""
    m = _KDF_RE.fullmatch(text)
    try:
        if m is None:
            salt = base64.b64decode(text, validate=True)
            n, r, p = SCRYPT_N, SCRYPT_R, SCRYPT_P
        else:
            n, r, p = int(m[1]), int(m[2]), int(m[3])
            salt = base64.b64decode(m[4], validate=True)
    except (ValueError, binascii.Error):
        raise CryptoError("the key's salt in the database is damaged") from None
    if len(salt) < SALT_BYTES or n < MIN_SCRYPT_N or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16 \
            or _scrypt_memory(n, r, p) > _MAX_SCRYPT_MEMORY:
        raise CryptoError("the key's salt or cost parameters in the database are out of range (damaged?)")
    return KdfParams(salt, n, r, p)


def _scrypt_memory(n: int, r: int, p: int) -> int:
    return 128 * r * (n + p + 2)


class Cipher:
    """One AES-256-GCM key and its id."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError("an AES-256 key is 32 bytes")
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.key = key
        self.kid = hmac.new(key, _KID_LABEL, hashlib.sha256).hexdigest()[:16]
        self._aead: Any = AESGCM(key)

    def __repr__(self) -> str:
        return f"Cipher(kid={self.kid})"  # never the key

    @classmethod
    def derive(cls, passphrase: str, params: KdfParams | bytes) -> Cipher:
        """The key scrypt stretches from ``passphrase`` with ``params`` (bare bytes: a salt, default cost)."""
        if isinstance(params, bytes):
            params = KdfParams(params)
        key = hashlib.scrypt(passphrase.encode("utf-8"), salt=params.salt, n=params.n, r=params.r, p=params.p,
                             maxmem=2 * _scrypt_memory(params.n, params.r, params.p), dklen=KEY_BYTES)
        return cls(key)

    def encrypt(self, plaintext: str, aad: str) -> str:
        nonce = os.urandom(NONCE_BYTES)  # a fresh one per value: GCM with a repeated nonce leaks the key stream
        sealed = self._aead.encrypt(nonce, plaintext.encode("utf-8"), aad.encode("utf-8"))
        return f"{PREFIX}{self.kid}:{_b64(nonce + sealed)}"

    def decrypt(self, token: str, aad: str) -> str:
        """Raises :class:`CryptoError` for another key's token, another aad, or a damaged one. The message
        names key ids at most: never the key, never the value."""
        from cryptography.exceptions import InvalidTag

        kid = token_kid(token)
        if kid is None:
            raise CryptoError("not an encrypted value")
        if kid != self.kid:
            raise CryptoError(f"encrypted with another key (key id {kid}; this key's id is {self.kid})")
        try:
            raw = _unb64(token[len(PREFIX) + len(kid) + 1:])
        except (ValueError, binascii.Error):
            raise CryptoError("damaged (not base64)") from None
        if len(raw) < NONCE_BYTES + TAG_BYTES:
            raise CryptoError("damaged (too short)")
        try:
            plain = self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], aad.encode("utf-8"))
        except InvalidTag:
            raise CryptoError("does not decrypt (damaged, or moved from another row or field)") from None
        try:
            return plain.decode("utf-8")
        except UnicodeDecodeError:
            raise CryptoError("damaged (not text)") from None


@dataclass
class Keyring:
    """What a process holds: the current cipher (None: no encryption key configured) and the boot secret, a
    random key made once per start in the parent and inherited by every worker (fork): a rotation wraps the
    new key with it in the database (the hand-off) so the other workers switch too, and nobody outside this
    run of the gateway (a copy of the database with the old passphrase, a restart, the CLI) can open that
    hand-off. A restart makes a new boot secret, so a past run's hand-off is dead weight (``prepare``
    deletes it)."""

    cipher: Cipher | None
    boot_secret: bytes = field(repr=False, default_factory=lambda: os.urandom(KEY_BYTES))

    def wrap(self, cipher: Cipher) -> str:
        """The hand-off of ``cipher`` under the boot secret, bound to the key id it carries."""
        box = Cipher(self.boot_secret)
        return _HANDOFF_PREFIX + box.encrypt(_b64(cipher.key), f"handoff/{cipher.kid}")

    def unwrap(self, handoff: str, kid: str) -> Cipher:
        """The cipher a hand-off carries (raises :class:`CryptoError`: another run's, or damaged)."""
        if not handoff.startswith(_HANDOFF_PREFIX):
            raise CryptoError("not a key hand-off")
        box = Cipher(self.boot_secret)
        try:
            key = _unb64(box.decrypt(handoff[len(_HANDOFF_PREFIX):], f"handoff/{kid}"))
            cipher = Cipher(key)
        except (ValueError, binascii.Error):
            raise CryptoError("damaged key hand-off") from None
        if not hmac.compare_digest(cipher.kid, kid):
            raise CryptoError("the key hand-off names another key")
        return cipher
