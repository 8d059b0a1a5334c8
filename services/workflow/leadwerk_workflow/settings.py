"""Workflow settings (environment variables; see README "Configuration")."""

from __future__ import annotations

from pydantic import Field

from leadwerk_platform.settings import PlatformSettings


class WorkflowSettings(PlatformSettings):
    port: int = Field(8082, alias="LEADWERK_WORKFLOW_PORT")
    default_workspace: str = Field("dev", alias="LEADWERK_DEFAULT_WORKSPACE")
    #: Enrollments a timer worker takes per transaction when many fall due together.
    timer_batch: int = Field(500, alias="LEADWERK_WORKFLOW_TIMER_BATCH", gt=0)
    database_pool_size: int = Field(10, alias="LEADWERK_WORKFLOW_DB_POOL_SIZE")
