"""Credentials at rest: AES-256-GCM with a key stretched from a passphrase.

A stored secret is ``enc:v1:<kid>:<base64url(nonce | ciphertext+tag)>``: a random 96-bit nonce per value,
the row and field as associated data (a value copied to another row or field does not decrypt), ``kid``
the key's id (8 bytes, hex, of an HMAC of a fixed label under the key: it names the key without
revealing it). The key is scrypt(passphrase, salt), the salt kept in the database's ``settings``: a
passphrase is not a key, and a bare hash of one is cheap to guess.

``cryptography`` is imported only when a key is set (start-up cost, and the .pyz's wheel extraction).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass, field
from typing import Any

PREFIX = "enc:v1:"
_HANDOFF_PREFIX = "handoff:v1:"
_KID_LABEL = b"at-gateway key id v1"
NONCE_BYTES = 12
KEY_BYTES = 32
SALT_BYTES = 16
# scrypt's cost: 2^15 x 8 x 128 bytes = 32 MiB and about 0.1 s, once per start (never per request).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1


class CryptoError(Exception):
    """A value cannot be decrypted (another key, another row or field, or damaged)."""


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


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


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
    def derive(cls, passphrase: str, salt: bytes) -> Cipher:
        key = hashlib.scrypt(passphrase.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                             maxmem=128 * SCRYPT_N * SCRYPT_R * 2, dklen=KEY_BYTES)
        return cls(key)

    def encrypt(self, plaintext: str, aad: str) -> str:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext.encode("utf-8"), aad.encode("utf-8"))
        return f"{PREFIX}{self.kid}:{_b64(nonce + sealed)}"

    def decrypt(self, token: str, aad: str) -> str:
        """Raises :class:`CryptoError` for another key's token, another aad, or a damaged one."""
        from cryptography.exceptions import InvalidTag

        kid = token_kid(token)
        if kid is None:
            raise CryptoError("not an encrypted value")
        if kid != self.kid:
            raise CryptoError(f"encrypted with another key (key id {kid}, this key's id is {self.kid})")
        try:
            raw = _unb64(token[len(PREFIX) + len(kid) + 1:])
        except (ValueError, binascii.Error):
            raise CryptoError("damaged (not base64)") from None
        if len(raw) < NONCE_BYTES + 16:
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
    random key made once per start in the parent and inherited by every worker: a rotation wraps the new key
    with it in the database (the hand-off) so the other workers switch too, and nobody outside this run of
    the gateway (a copy of the database with the old passphrase, a restart) can open that hand-off."""

    cipher: Cipher | None
    boot_secret: bytes = field(repr=False, default_factory=lambda: os.urandom(KEY_BYTES))

    def wrap(self, cipher: Cipher) -> str:
        """The hand-off of ``cipher`` under the boot secret."""
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
        if cipher.kid != kid:
            raise CryptoError("the key hand-off names another key")
        return cipher
