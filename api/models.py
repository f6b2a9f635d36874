"""Request shapes of the IDSync API (spec B§3, B§5, B§10). Loose on purpose where SDKs differ: unknown keys
are ignored, missing keys mean null, MPIDs may be strings or numbers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.ca_definitions import CALCULATION_TYPES, EVENT_TYPES_FOR_CA, OPERATORS
from engine.event_batches import EVENT_TYPES, USER_IDENTITY_KEYS
from engine.identity_types import ALL_IDENTITY_TYPES

IdentityValue = str | int | None

# Documentation only (json_schema_extra): the engine checks these names and answers 400 naming the field, so the
# OpenAPI document states them and fuzzers generate requests that get past the first check.
_IDENTITY_TYPE = {"enum": sorted(ALL_IDENTITY_TYPES)}


class IdentityRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    client_sdk: dict | None = None
    context: str | None = None
    environment: Literal["production", "development"]
    request_id: str | None = None
    requestId: str | None = None  # Roku's spelling
    request_timestamp_ms: int | None = None
    previous_mpid: str | int | None = None
    known_identities: dict[str, IdentityValue] = Field(json_schema_extra={"propertyNames": _IDENTITY_TYPE})

    def effective_request_id(self) -> str | None:
        return self.request_id or self.requestId


class SearchRequest(IdentityRequest):
    environment: Literal["production", "development"] = "production"


class IdentityChangeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    identity_type: str = Field(json_schema_extra=_IDENTITY_TYPE)
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

    event_type: str = Field(json_schema_extra={"enum": sorted(EVENT_TYPES)})
    data: dict | None = None


class EventBatch(BaseModel):
    """An Events API batch (reference §2); documentation only: engine/event_batches.py validates it."""

    model_config = ConfigDict(extra="allow")

    events: list[EventModel] | None = None
    mpid: str | int | None = None
    user_identities: dict[str, str | None] | None = Field(
        None, json_schema_extra={"propertyNames": {"enum": sorted(USER_IDENTITY_KEYS)}})
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


# --- calculated attributes: documentation only, engine/ca_registry.py, ca_definitions.py and ca_seeds.py validate --

class CaDataPoint(BaseModel):
    model_config = ConfigDict(extra="allow")

    event_type: Literal[tuple(sorted(EVENT_TYPES_FOR_CA))] | None = None  # type: ignore[valid-type]
    event_name: str | None = None
    attribute_name: str | None = Field(None, description="a custom attribute, or data.<path> into the event's data")


class CaCondition(BaseModel):
    model_config = ConfigDict(extra="allow")

    attribute_name: str
    operator: Literal[tuple(OPERATORS)]  # type: ignore[valid-type]
    value_type: Literal["string", "number", "boolean"] | None = None
    values: list[str | float | bool] = []


class CaTimePeriod(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["all_time", "within_last", "since"] = "all_time"
    value: int | None = Field(None, description="within_last: how many units, 1 to 10000")
    unit: Literal["hours", "days"] | None = None
    date: str | int | None = Field(None, description="since: an ISO 8601 date or a unix time in milliseconds")


class CaDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")

    calculation_type: Literal[tuple(sorted(CALCULATION_TYPES))]  # type: ignore[valid-type]
    data_point: CaDataPoint
    conditions: list[CaCondition] | None = None
    time_period: CaTimePeriod | None = None


class CalculatedAttributeBody(BaseModel):
    """POST creates with `name` and `draft_definition`; PUT changes any of the three."""

    model_config = ConfigDict(extra="allow")

    name: str | None = None
    description: str | None = None
    draft_definition: CaDefinition | None = None


class CaSeed(BaseModel):
    model_config = ConfigDict(extra="allow")

    mpid: str | int
    value: Any = None
    as_of: str | int
    count: int | None = None
    values: list[str] | None = None


class CaSeedsBody(BaseModel):
    seeds: list[CaSeed]


# --- audiences: documentation only, audiences/definitions.py validates (docs/audiences.md) ----------------------

class AudienceCount(BaseModel):
    model_config = ConfigDict(extra="allow")

    operator: Literal["at_least", "at_most", "exactly", "more_than", "fewer_than", "between"]
    value: int | None = Field(None, description="every operator but between")
    values: list[int] | None = Field(None, description="between: [low, high], inclusive")


class AudienceEvent(BaseModel):
    model_config = ConfigDict(extra="allow")

    event_type: Literal[tuple(sorted(EVENT_TYPES_FOR_CA))] | None = None  # type: ignore[valid-type]
    event_name: str | None = None
    conditions: list[CaCondition] | None = None
    time_period: CaTimePeriod | None = None
    count: AudienceCount | None = None


class AudienceComparison(BaseModel):
    """A user attribute (`name`) or a calculated attribute (`id`) compared with `values`."""

    model_config = ConfigDict(extra="allow")

    name: str | None = None
    id: int | None = None
    operator: Literal[(*OPERATORS, "not_exists")]  # type: ignore[valid-type]
    value_type: Literal["string", "number", "boolean"] | None = None
    values: list[str | float | bool] = []


class AudienceIdentity(BaseModel):
    type: str = Field(json_schema_extra=_IDENTITY_TYPE)
    present: bool = True


class AudienceWithin(BaseModel):
    value: int
    unit: Literal["hours", "days"]


class AudienceProfileTime(BaseModel):
    field: Literal["first_seen", "last_seen"]
    within_last: AudienceWithin | None = None
    before: str | int | None = Field(None, description="an ISO 8601 date or a unix time in milliseconds")
    after: str | int | None = Field(None, description="an ISO 8601 date or a unix time in milliseconds")


class AudienceConsent(BaseModel):
    gdpr_purpose: str | None = None
    consented: bool | None = None
    ccpa_data_sale_opt_out: bool | None = None


class AudienceMembership(BaseModel):
    id: int
    member: bool = True


class AudienceCriteria(BaseModel):
    """Exactly one key: a branch (all, any, not) or a leaf."""

    model_config = ConfigDict(populate_by_name=True)

    all: list[AudienceCriteria] | None = None
    any: list[AudienceCriteria] | None = None
    not_: AudienceCriteria | None = Field(None, alias="not")
    event: AudienceEvent | None = None
    user_attribute: AudienceComparison | None = None
    calculated_attribute: AudienceComparison | None = None
    identity: AudienceIdentity | None = None
    profile: AudienceProfileTime | None = None
    consent: AudienceConsent | None = None
    audience: AudienceMembership | None = None


class AudienceBody(BaseModel):
    """POST creates (name and criteria required); PUT takes the same keys, and those it leaves out keep their
    values."""

    model_config = ConfigDict(extra="allow")

    name: str | None = None
    external_name: str | None = Field(None, description="what partners see; defaults to name")
    description: str | None = None
    type: Literal["real_time", "standard"] | None = None
    refresh_minutes: int | None = Field(None, description="standard audiences: 5 to 10080, default 60")
    criteria: AudienceCriteria | None = None


class AudiencePreviewBody(BaseModel):
    """A definition to try; only `criteria` is read."""

    model_config = ConfigDict(extra="allow")

    criteria: AudienceCriteria


class ConnectionSettings(BaseModel):
    """Plain JSON with every default filled in on the way in; the output's own block sits under its name
    (docs/delivery.md lists every key)."""

    model_config = ConfigDict(extra="allow")

    base_url: str | None = Field(None, description="braze: required; facebook: defaults to https://graph.facebook.com")
    identity_types: list[str] | None = Field(None, description="identity types to send, e.g. customer_id, email")
    forward_attributes: dict[str, list[Any]] | None = Field(
        None, description='{"user": [names], "calculated": [calculated attribute ids]}')
    consent: dict[str, Any] | None = Field(
        None, description='{"exclude_ccpa_data_sale_opt_out": true, "require_gdpr_purpose": "advertising"}')
    sampling_percent: int | None = Field(None, ge=1, le=100)
    upload: dict[str, float] | None = Field(None, description='{"max_age_seconds": 60, "max_queued": 75}')


class ConnectionBody(BaseModel):
    """POST creates (output and its required settings and credentials); PUT takes the same keys, and those it
    leaves out keep their values. Credentials are never answered: answers say "set"."""

    model_config = ConfigDict(extra="allow")

    output: Literal["braze", "facebook", "webhook", "kafka"] | None = None
    name: str | None = None
    status: Literal["active", "inactive"] | None = None
    settings: ConnectionSettings | None = None
    credentials: dict[str, str | None] | None = Field(
        None, description="braze: api_key; facebook: access_token (+ app_secret); webhook: secret; "
                          "kafka: username + password")
