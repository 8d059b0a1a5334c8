"""Workflow settings (environment variables; see README "Configuration")."""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from pydantic import Field, field_validator

from leadwerk_platform.conditions import parse_period
from leadwerk_platform.settings import PlatformSettings


class WorkflowSettings(PlatformSettings):
    port: int = Field(8082, alias="LEADWERK_WORKFLOW_PORT")
    default_workspace: str = Field("dev", alias="LEADWERK_DEFAULT_WORKSPACE")
    #: Enrollments a timer worker takes per transaction when many fall due together.
    timer_batch: int = Field(500, alias="LEADWERK_WORKFLOW_TIMER_BATCH", gt=0)
    database_pool_size: int = Field(10, alias="LEADWERK_WORKFLOW_DB_POOL_SIZE")
    #: Global frequency cap on marketing email per contact across journeys, as
    #: "<count>/<window>" (e.g. "3/7d"); empty: no cap.
    email_cap: str = Field("", alias="LEADWERK_WORKFLOW_EMAIL_CAP")
    #: What a capped send does: wait until the window frees a slot, or drop.
    email_cap_policy: Literal["delay", "drop"] = Field(
        "delay", alias="LEADWERK_WORKFLOW_EMAIL_CAP_POLICY")
    #: The mailer's API, asked which templates exist when a journey is validated (the admin
    #: path only; unreachable: the templates are not checked and the answer says so).
    mailer_url: str = Field("http://127.0.0.1:8083", alias="LEADWERK_MAILER_URL")

    @field_validator("email_cap")
    @classmethod
    def _valid_cap(cls, value: str) -> str:
        if value:
            count, _, window = value.partition("/")
            if not count.isdigit() or int(count) < 1:
                raise ValueError("LEADWERK_WORKFLOW_EMAIL_CAP: use <count>/<window>, e.g. 3/7d")
            parse_period(window)
        return value

    def email_cap_rule(self) -> tuple[int, timedelta]:
        count, _, window = self.email_cap.partition("/")
        return int(count), parse_period(window)
