"""Workspace and form configuration from ``$LEADWERK_CONFIG_DIR`` (YAML files).

``workspaces.yaml``::

    workspaces:
      - id: dev
        write_keys: [dev-write-key]
        allowed_origins: ["*"]
        rate_limit: {events_per_second: 500, burst: 5000}
        anonymize_ip: true
        bots: flag          # flag | drop

``forms.yaml``::

    forms:
      - id: ebook
        workspace: dev
        fields: {email: email, first_name: first_name, company: company}
        required: [email]
        consents:
          - {field: consent_marketing, purpose: marketing, text_version: "2026-01",
             double_opt_in: true}
        honeypot: website
        thank_you_url: https://example.com/thanks
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from leadwerk_ingest.settings import IngestSettings


class BotPolicy(StrEnum):
    FLAG = "flag"
    DROP = "drop"


class RateLimit(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    events_per_second: Annotated[float, Field(gt=0)] = 500.0
    burst: Annotated[float, Field(gt=0)] = 5000.0


class Workspace(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
    write_keys: list[str] = Field(default_factory=list)
    allowed_origins: list[str] = Field(default_factory=list)
    rate_limit: RateLimit = Field(default_factory=RateLimit)
    anonymize_ip: bool = True
    bots: BotPolicy = BotPolicy.FLAG
    #: Where the opt-in confirmation and unsubscribe pages link back to.
    website_url: str | None = None
    #: Read by scoring (traits that identify a person) and the mailer (marketing consent
    #: needs a confirmed double opt-in; the default sender); listed so ingest accepts them.
    identifiers: list[str] = Field(default_factory=list)
    double_opt_in: bool = True
    sender: str | None = None
    allow_private_webhooks: bool = False  # read by the crm-bridge (SSRF protection)

    def allows_origin(self, origin: str) -> bool:
        return "*" in self.allowed_origins or origin in self.allowed_origins


class Consent(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    field: str
    purpose: str
    text_version: str
    double_opt_in: bool = True


class Form(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    workspace: str
    #: form field name → trait name; fields not listed are not stored (data minimisation).
    fields: dict[str, str]
    required: list[str] = Field(default_factory=list)
    consents: list[Consent] = Field(default_factory=list)
    honeypot: str | None = None
    thank_you_url: str | None = None
    #: The form field carrying the email address (default: the field mapped to "email").
    email_field: str | None = None

    @field_validator("required")
    @classmethod
    def _required_known(cls, value: list[str], info: Any) -> list[str]:
        unknown = [f for f in value if f not in info.data.get("fields", {})]
        if unknown:
            raise ValueError(f"required fields not in fields: {unknown}")
        return value

    @property
    def email_source(self) -> str | None:
        if self.email_field:
            return self.email_field
        return next((f for f, trait in self.fields.items() if trait == "email"), None)


class IngestConfig(BaseModel):
    workspaces: dict[str, Workspace]
    forms: dict[str, Form]
    keys: dict[str, Workspace]

    def workspace_for_key(self, key: str) -> Workspace | None:
        return self.keys.get(key)

    def any_allows_origin(self, origin: str) -> bool:
        return any(ws.allows_origin(origin) for ws in self.workspaces.values())


def _read(path: Path, section: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    raw = yaml.safe_load(path.read_text()) or {}
    items = raw.get(section, [])
    if not isinstance(items, list):
        raise ValueError(f"{path}: '{section}' must be a list")
    return items


def load_config(settings: IngestSettings) -> IngestConfig:
    """Read and check the configuration; the default workspace always exists."""
    workspaces = {ws.id: ws for ws in
                  (Workspace(**item) for item in _read(settings.config_dir / "workspaces.yaml",
                                                       "workspaces"))}
    default = workspaces.get(settings.default_workspace) or Workspace(
        id=settings.default_workspace)
    extra = settings.extra_write_keys()
    if extra:
        default = default.model_copy(update={"write_keys": [*default.write_keys, *extra]})
    workspaces[default.id] = default
    keys: dict[str, Workspace] = {}
    for ws in workspaces.values():
        for key in ws.write_keys:
            if key in keys:
                raise ValueError(f"write key configured for two workspaces: {ws.id}")
            keys[key] = ws
    forms = {f.id: f for f in (Form(**item) for item in _read(settings.config_dir / "forms.yaml",
                                                               "forms"))}
    for form in forms.values():
        if form.workspace not in workspaces:
            raise ValueError(f"form {form.id}: unknown workspace {form.workspace}")
    return IngestConfig(workspaces=workspaces, forms=forms, keys=keys)
