"""DKIM private keys at rest: Fernet-encrypted in the database, decrypted only to sign."""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken


class KeyBox:
    def __init__(self, key: bytes):
        try:
            self._fernet = Fernet(key)
        except (ValueError, TypeError) as exc:
            raise ValueError(
                "AXIOM_SECRET_KEY: not a valid Fernet key (32 url-safe base64 bytes)"
            ) from exc

    @staticmethod
    def generate() -> bytes:
        return Fernet.generate_key()

    def seal(self, material: bytes) -> bytes:
        return self._fernet.encrypt(material)

    def open(self, token: bytes) -> bytes:
        try:
            return self._fernet.decrypt(token)
        except InvalidToken as exc:
            raise ValueError("a DKIM key cannot be decrypted with AXIOM_SECRET_KEY") from exc
