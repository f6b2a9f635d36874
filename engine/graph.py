"""The in-memory identity graph of one identity scope: profiles and a compact value index.

Kept small on purpose (DESIGN: <= 1 KB per profile with three identities): a profile is a slotted record
whose identities are one flat tuple (type, value, type, value, ...), and the index maps type -> value ->
MPID, or a list of MPIDs only for the rare value that several profiles share. Type strings are interned and
value strings are shared between the index and the records.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from strategies.model import IdentityKey, ProfileView


class ProfileRecord:
    __slots__ = ("mpid", "created_ms", "last_seen_ms", "identities", "orphaned")

    def __init__(self, mpid: int, created_ms: int, last_seen_ms: int, identities: tuple[str, ...] = (),
                 orphaned: bool = False) -> None:
        self.mpid = mpid
        self.created_ms = created_ms
        self.last_seen_ms = last_seen_ms
        self.identities = identities
        self.orphaned = orphaned

    def identity_keys(self) -> Iterator[IdentityKey]:
        flat = self.identities
        for i in range(0, len(flat), 2):
            yield flat[i], flat[i + 1]

    def view(self) -> ProfileView:
        return ProfileView(self.mpid, self.created_ms, self.last_seen_ms, frozenset(self.identity_keys()))


class IdentityGraph:
    def __init__(self, scope: str) -> None:
        self.scope = scope
        self.profiles: dict[int, ProfileRecord] = {}
        self._index: dict[str, dict[str, int | list[int]]] = {}
        self.quarantined: set[IdentityKey] = set()

    # --- reads -------------------------------------------------------------------------------------------
    def holders(self, identity_type: str, value: str) -> tuple[int, ...]:
        entry = self._index.get(identity_type, {}).get(value)
        if entry is None:
            return ()
        return (entry,) if isinstance(entry, int) else tuple(entry)

    def holder_count(self, identity_type: str, value: str) -> int:
        entry = self._index.get(identity_type, {}).get(value)
        return 0 if entry is None else 1 if isinstance(entry, int) else len(entry)

    def get(self, mpid: int) -> ProfileRecord | None:
        return self.profiles.get(mpid)

    def __len__(self) -> int:
        return len(self.profiles)

    def shared_values(self) -> Iterator[tuple[str, str, list[int]]]:
        """Every identity value held by more than one profile."""
        for identity_type, values in self._index.items():
            for value, entry in values.items():
                if isinstance(entry, list):
                    yield identity_type, value, entry

    # --- writes ------------------------------------------------------------------------------------------
    def add_profile(self, record: ProfileRecord) -> None:
        self.profiles[record.mpid] = record
        for identity_type, value in record.identity_keys():
            self.index_add(identity_type, value, record.mpid)

    def remove_profile(self, mpid: int) -> ProfileRecord | None:
        """Forget a profile and its index entries (erasure); returns the record it held, if any."""
        record = self.profiles.pop(mpid, None)
        if record is not None:
            for identity_type, value in record.identity_keys():
                self._index_remove(identity_type, value, mpid)
        return record

    def add_identity(self, mpid: int, identity_type: str, value: str) -> None:
        record = self.profiles[mpid]
        identity_type = sys.intern(identity_type)
        record.identities = record.identities + (identity_type, value)
        self.index_add(identity_type, value, mpid)

    def remove_identity(self, mpid: int, identity_type: str, value: str) -> None:
        record = self.profiles[mpid]
        flat = record.identities
        kept: list[str] = []
        for i in range(0, len(flat), 2):
            if not (flat[i] == identity_type and flat[i + 1] == value):
                kept += (flat[i], flat[i + 1])
        record.identities = tuple(kept)
        self._index_remove(identity_type, value, mpid)

    def index_add(self, identity_type: str, value: str, mpid: int) -> None:
        values = self._index.setdefault(identity_type, {})
        entry = values.get(value)
        if entry is None:
            values[value] = mpid
        elif isinstance(entry, int):
            if entry != mpid:
                values[value] = [entry, mpid]
        elif mpid not in entry:
            entry.append(mpid)

    def _index_remove(self, identity_type: str, value: str, mpid: int) -> None:
        values = self._index.get(identity_type, {})
        entry = values.get(value)
        if entry == mpid:
            del values[value]
        elif isinstance(entry, list) and mpid in entry:
            entry.remove(mpid)
            if len(entry) == 1:
                values[value] = entry[0]
