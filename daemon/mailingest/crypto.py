"""Passwords kept in the database are sealed with the operator's ``[storage] secret_key``.

Fernet (AES-128-CBC with HMAC-SHA256, from the cryptography package): authenticated, so a
wrong key is detected rather than read as garbage. The Fernet key is derived from the
operator's key with scrypt, so any long random string (``openssl rand -base64 32``) serves;
the salt is fixed because the key, not a password database, is what it protects. A dump of
the database then holds no usable password without the key.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from mailingest.errors import ConfigError

_SALT = b"mailingest storage.secret_key v1"


class SecretBox:
    """Seals and opens short secrets with one key."""

    def __init__(self, key: str) -> None:
        from cryptography.fernet import Fernet  # only where accounts live in the database

        derived = hashlib.scrypt(key.encode("utf-8"), salt=_SALT, n=2**14, r=8, p=1, dklen=32)
        self._fernet: Any = Fernet(base64.urlsafe_b64encode(derived))

    def __repr__(self) -> str:
        return "<SecretBox ***>"

    def seal(self, text: str) -> str:
        token: bytes = self._fernet.encrypt(text.encode("utf-8"))
        return token.decode("ascii")

    def open(self, token: str, what: str) -> str:
        """The secret; a ConfigError naming storage.secret_key if this key did not seal it."""
        from cryptography.fernet import InvalidToken

        try:
            data: bytes = self._fernet.decrypt(token.encode("ascii"))
        except (InvalidToken, ValueError):
            raise ConfigError(
                f"cannot decrypt the password of {what}: the key is not the one it was "
                "stored with; restore that key",
                key_path="storage.secret_key",
            ) from None
        return data.decode("utf-8")
