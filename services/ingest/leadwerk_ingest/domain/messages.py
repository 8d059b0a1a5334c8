"""The Segment-spec request payloads ingest accepts, as pydantic models (the validation edge)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

_Id = Annotated[str, Field(min_length=1, max_length=256)]
_Object = dict[str, Any]


class _Call(BaseModel):
    model_config = ConfigDict(extra="allow", coerce_numbers_to_str=True, frozen=True)

    messageId: _Id | None = None  # noqa: N815 - Segment's wire names
    userId: _Id | None = None  # noqa: N815
    anonymousId: _Id | None = None  # noqa: N815
    timestamp: str | None = None
    originalTimestamp: str | None = None  # noqa: N815
    sentAt: str | None = None  # noqa: N815
    context: _Object = Field(default_factory=dict)
    integrations: _Object | None = None
    writeKey: str | None = None  # noqa: N815

    @model_validator(mode="after")
    def _needs_identity(self) -> _Call:
        if self.userId is None and self.anonymousId is None:
            raise ValueError("userId or anonymousId is required")
        return self


class TrackCall(_Call):
    type: Literal["track"] = "track"
    event: Annotated[str, Field(min_length=1, max_length=200)]
    properties: _Object = Field(default_factory=dict)


class PageCall(_Call):
    type: Literal["page"] = "page"
    name: str | None = None
    category: str | None = None
    properties: _Object = Field(default_factory=dict)


class ScreenCall(_Call):
    type: Literal["screen"] = "screen"
    name: str | None = None
    category: str | None = None
    properties: _Object = Field(default_factory=dict)


class IdentifyCall(_Call):
    type: Literal["identify"] = "identify"
    traits: _Object = Field(default_factory=dict)


class GroupCall(_Call):
    type: Literal["group"] = "group"
    groupId: _Id  # noqa: N815
    traits: _Object = Field(default_factory=dict)


class AliasCall(_Call):
    type: Literal["alias"] = "alias"
    previousId: _Id  # noqa: N815


Call = TrackCall | PageCall | ScreenCall | IdentifyCall | GroupCall | AliasCall
CALL_TYPES: dict[str, type[Call]] = {
    "track": TrackCall, "page": PageCall, "screen": ScreenCall,
    "identify": IdentifyCall, "group": GroupCall, "alias": AliasCall,
}
#: Segment's analytics.js (v2 / analytics-next) uses one-letter paths.
SHORT_PATHS = {"t": "track", "p": "page", "s": "screen", "i": "identify", "g": "group",
               "a": "alias"}

TaggedCall = Annotated[Call, Field(discriminator="type")]
CALL_ADAPTERS: dict[str, TypeAdapter[Any]] = {}


def adapter(call_type: str) -> TypeAdapter[Any]:
    """A cached validator for one call type (built lazily, never at import)."""
    found = CALL_ADAPTERS.get(call_type)
    if found is None:
        found = TypeAdapter(TaggedCall if call_type == "batch" else CALL_TYPES[call_type])
        CALL_ADAPTERS[call_type] = found
    return found
