"""API credentials: generated, hashed for Basic auth, sealed (encrypted) for HMAC signature checks.

An HMAC signature can only be checked with the secret itself, so a hash alone is not enough; the secret is
sealed with a master key that lives outside the database (env IDMESH_MASTER_KEY, else a 0600 key file next to
the database). Basic auth compares against the SHA-256 hash: the secrets are 256-bit random, so a fast hash
is not brute-forceable.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def new_api_key() -> str:
    return "idm_" + secrets.token_hex(12)


def new_api_secret() -> str:
    return secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, secret_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), secret_hash)


class MasterKey:
    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._key = key

    def derive(self, purpose: str) -> bytes:
        """A 256-bit key for one purpose (e.g. the erasure tombstones' salt), tied to this deployment's key and
        kept out of the database like it; different purposes never share a key."""
        return hmac.new(self._key, b"idmesh key for " + purpose.encode(), hashlib.sha256).digest()

    @classmethod
    def for_database(cls, db_path: str) -> MasterKey:
        from_env = os.environ.get("IDMESH_MASTER_KEY")
        if from_env:
            return cls(base64.urlsafe_b64decode(from_env))
        key_file = Path(db_path + ".master-key")
        if not key_file.exists():
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(base64.urlsafe_b64encode(AESGCM.generate_key(bit_length=256)))
        return cls(base64.urlsafe_b64decode(key_file.read_bytes()))

    def seal(self, plaintext: str) -> str:
        nonce = os.urandom(12)
        return base64.urlsafe_b64encode(nonce + self._aead.encrypt(nonce, plaintext.encode(), None)).decode()

    def unseal(self, sealed: str) -> str:
        raw = base64.urlsafe_b64decode(sealed)
        return self._aead.decrypt(raw[:12], raw[12:], None).decode()
