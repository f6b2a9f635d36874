"""Tombstones of erased identities: what keeps an erased person from coming back through a replay.

An erasure (engine/erasure.py) deletes every row about the person but keeps, per identity scope, a keyed hash
of each identity it erased: HMAC-SHA256 over scope, IDSync type and normalized value, keyed by a secret
derived from the deployment's master key (engine/secrets.py), so the database alone does not reveal which
values were erased (an unkeyed hash of an email is a dictionary lookup away from the email).

A tombstoned identity is treated like a blocked value wherever identities arrive (engine/idsync.py
`parse_identities`, modify's `new_value`): ignored, while the rest of the request proceeds. The check is a set
lookup and costs nothing while a scope has no tombstones.
"""

from __future__ import annotations

import hashlib
import hmac

import duckdb


class TombstoneIndex:
    def __init__(self, key: bytes) -> None:
        self._key = key
        self._by_scope: dict[str, set[str]] = {}

    def digest(self, scope: str, identity_type: str, value: str) -> str:
        message = f"{scope}\x00{identity_type}\x00{value}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def holds(self, scope: str, identity_type: str, value: str) -> bool:
        digests = self._by_scope.get(scope)
        return bool(digests) and self.digest(scope, identity_type, value) in digests

    def add(self, scope: str, digest: str) -> None:
        self._by_scope.setdefault(scope, set()).add(digest)

    def load(self, connection: duckdb.DuckDBPyConnection) -> None:
        """Read every tombstone (start-up, and after a failed commit)."""
        cursor = connection.cursor()
        try:
            rows = cursor.execute("SELECT scope, identity_hash FROM erased_identities").fetchall()
        finally:
            cursor.close()
        self._by_scope = {}
        for scope, digest in rows:
            self.add(scope, digest)
