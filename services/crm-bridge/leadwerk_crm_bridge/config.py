"""What the bridge syncs where (``config/connectors.yaml``): connectors with their field
mapping, and the activity rules that decide which activities the CRM sees and how they read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from leadwerk_platform.conditions import Condition
from leadwerk_platform.settings import Environment, config_entries

#: What a connector can be told to sync (its ``events``).
Kind = Literal["handoff", "lifecycle", "score", "activity", "profile", "erasure"]
KINDS: tuple[Kind, ...] = ("handoff", "lifecycle", "score", "activity", "profile", "erasure")


class Rate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    requests: int = Field(gt=0)
    per_seconds: float = Field(gt=0)


class Connector(BaseModel):
    """One CRM destination of one workspace."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    workspace: str
    kind: Literal["webhook", "hubspot", "salesforce"] = "webhook"
    #: webhook: the receiver; hubspot: the API base (https://api.hubapi.com); salesforce: the
    #: login host the OAuth token comes from (https://login.salesforce.com or My Domain).
    url: str = Field(pattern=r"^https?://")
    events: list[Kind] = Field(default_factory=lambda: list[Kind](["handoff"]))
    #: Leadwerk field (a trait, or score, grade, rating, stage, owner, summary) → CRM field;
    #: merged over the connector kind's defaults, ``null`` drops a default.
    fields: dict[str, str | None] = Field(default_factory=dict)
    #: Leadwerk stage → the CRM's lifecycle value (merged over the kind's defaults).
    stages: dict[str, str | None] = Field(default_factory=dict)
    #: Leadwerk stage → HubSpot ``hs_lead_status`` / Salesforce ``Status`` (merged likewise).
    lead_status: dict[str, str | None] = Field(default_factory=dict)
    #: Owner (as Leadwerk knows it, an email) → the CRM's owner id.
    owners: dict[str, str] = Field(default_factory=dict)
    #: Environment variables holding this connector's secrets (never the secrets themselves):
    #: hubspot: token (private-app token), client_secret (verifies HubSpot's webhooks);
    #: salesforce: client_id and client_secret (OAuth client credentials).
    secrets: dict[Literal["token", "client_id", "client_secret"], str] = Field(
        default_factory=dict)
    #: Records per request (HubSpot batches take 100, Salesforce collections 200; the webhook
    #: batches activities only).
    batch_size: int | None = Field(None, gt=0, le=200)
    #: Requests to this connector per process; default: HubSpot's published limit for private
    #: apps (100 per 10 seconds), Salesforce 25 per second, webhooks unlimited.
    rate: Rate | None = None
    #: Salesforce: the object leads are upserted as, its external id field, the API version.
    sobject: str = "Lead"
    external_id_field: str = "Leadwerk_Id__c"
    api_version: str = "v61.0"

    @model_validator(mode="after")
    def _batch_limit(self) -> Connector:
        if self.kind == "hubspot" and self.batch_size is not None and self.batch_size > 100:
            raise ValueError("HubSpot batches take at most 100 records")
        return self

    @property
    def size(self) -> int:
        return self.batch_size or {"hubspot": 100, "salesforce": 200}.get(self.kind, 100)

    @property
    def limit(self) -> Rate | None:
        if self.rate is not None:
            return self.rate
        return {"hubspot": Rate(requests=100, per_seconds=10),
                "salesforce": Rate(requests=25, per_seconds=1)}.get(self.kind)


class ActivityRule(BaseModel):
    """An activity the CRM sees (timeline entry, hand-off summary) and how it reads: the
    ``label`` may name the activity's fields in braces, e.g. ``downloaded {properties.document}``.
    The same matching as the scoring rules: ``type``, ``event``, ``where``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    event: Condition | None = None
    where: dict[str, Condition] = Field(default_factory=dict)
    label: str


@dataclass(frozen=True)
class Config:
    connectors: list[Connector] = field(default_factory=list)
    activities: list[ActivityRule] = field(default_factory=list)
    allow_private: frozenset[str] = frozenset()  # workspaces that may call private addresses

    @classmethod
    def load(cls, config_dir: Path) -> Config:
        connectors = [Connector.model_validate(c)
                      for c in config_entries(config_dir, "connectors.yaml", "connectors")]
        activities = [ActivityRule.model_validate(a)
                      for a in config_entries(config_dir, "connectors.yaml", "activities")]
        private = frozenset(str(w["id"]) for w in config_entries(
            config_dir, "workspaces.yaml", "workspaces") if w.get("allow_private_webhooks"))
        return cls(connectors, activities, private)

    def private_webhooks(self, environment: Environment) -> frozenset[str]:
        """The workspaces whose webhooks may call private and loopback addresses: none in
        production, whatever workspaces.yaml says (the shipped development workspace allows
        them for the local demo, and the image carries that file)."""
        return frozenset() if environment is Environment.PRODUCTION else self.allow_private

    def targets(self, workspace: str, kind: Kind) -> list[Connector]:
        return [c for c in self.connectors if c.workspace == workspace and kind in c.events]

    def connector(self, workspace: str, connector_id: str) -> Connector | None:
        return next((c for c in self.connectors
                     if c.workspace == workspace and c.id == connector_id), None)
