"""Request shapes of the IDSync API (spec B§3, B§5, B§10). Loose on purpose where SDKs differ: unknown keys
are ignored, missing keys mean null, MPIDs may be strings or numbers."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

IdentityValue = str | int | None


class IdentityRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    client_sdk: dict | None = None
    context: str | None = None
    environment: Literal["production", "development"]
    request_id: str | None = None
    requestId: str | None = None  # Roku's spelling
    request_timestamp_ms: int | None = None
    previous_mpid: str | int | None = None
    known_identities: dict[str, IdentityValue]

    def effective_request_id(self) -> str | None:
        return self.request_id or self.requestId


class SearchRequest(IdentityRequest):
    environment: Literal["production", "development"] = "production"


class IdentityChangeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    identity_type: str
    old_value: IdentityValue = None
    new_value: IdentityValue = None


class ModifyRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    client_sdk: dict | None = None
    environment: Literal["production", "development"] | None = None
    request_id: str | None = None
    requestId: str | None = None
    request_timestamp_ms: int | None = None
    identity_changes: list[IdentityChangeBody]


class AliasData(BaseModel):
    model_config = ConfigDict(extra="ignore")

    source_mpid: str | int
    destination_mpid: str | int
    start_unixtime_ms: int | None = None
    end_unixtime_ms: int | None = None
    device_application_stamp: str | None = None
    scope: str | None = None


class AliasRequestBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    request_id: str | None = None
    request_type: str | None = None
    environment: Literal["production", "development"] | None = None
    api_key: str | None = None
    data: AliasData


class AliasPair(BaseModel):
    source_mpid: str | int
    destination_mpid: str | int


class UnaliasRequestBody(BaseModel):
    """idmesh extension: name the alias by `alias_id` (from POST /v1/alias) or by its two profiles."""

    model_config = ConfigDict(extra="ignore")

    alias_id: str | None = None
    data: AliasPair | None = None


class WorkspaceCreate(BaseModel):
    name: str
    settings: dict | None = None


class WorkspaceUpdate(BaseModel):
    name: str | None = None
    settings: dict | None = None


class EventModel(BaseModel):
    """One event of a batch: `data` holds the type's fields (reference §2)."""

    model_config = ConfigDict(extra="allow")

    event_type: str
    data: dict | None = None


class EventBatch(BaseModel):
    """An Events API batch (reference §2); documentation only: engine/event_batches.py validates it."""

    model_config = ConfigDict(extra="allow")

    events: list[EventModel] | None = None
    mpid: str | int | None = None
    user_identities: dict[str, str | None] | None = None
    device_info: dict | None = None
    application_info: dict | None = None
    user_attributes: dict | None = None
    deleted_user_attributes: list[str] | None = None
    consent_state: dict | None = None
    environment: Literal["production", "development"] | None = None
    batch_id: int | str | None = None
    source_request_id: str | None = None
    timestamp_unixtime_ms: int | None = None
    mp_deviceid: str | None = None
