"""Sales teams (``config/teams.yaml``): who a fair or round-robin assignment can choose from,
and whose manager an escalation goes to. A team can be sales reps or partners (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Team(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    manager: str | None = None
    members: list[str] = Field(min_length=1)


class Teams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    teams: dict[str, Team] = Field(default_factory=dict)
    #: Escalations for an owner in no team (or a team without a manager) go here.
    default_manager: str | None = None

    @classmethod
    def from_document(cls, document: Mapping[str, Any] | None) -> Teams:
        return cls.model_validate(document or {})

    def members(self, team: str) -> list[str]:
        return list(self.teams[team].members) if team in self.teams else []

    def manager_of(self, owner: object) -> str | None:
        """The manager of the first team ``owner`` belongs to, else the default manager."""
        for team in self.teams.values():
            if owner in team.members and team.manager:
                return team.manager
        return self.default_manager
