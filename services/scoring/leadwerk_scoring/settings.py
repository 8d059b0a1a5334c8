"""Scoring settings (environment variables; see README "Configuration")."""

from __future__ import annotations

from pydantic import Field

from leadwerk_platform.settings import PlatformSettings

PROCESSORS = ("stitcher", "scorer")


class ScoringSettings(PlatformSettings):
    port: int = Field(8081, alias="LEADWERK_SCORING_PORT")
    #: Which stream processors this process runs besides the API: "stitcher,scorer" (the
    #: default, one process does everything), one of them, or "" (API only).
    processors: str = Field("stitcher,scorer", alias="LEADWERK_SCORING_PROCESSORS")
    default_workspace: str = Field("dev", alias="LEADWERK_DEFAULT_WORKSPACE")
    batch_size: int = Field(1000, alias="LEADWERK_SCORING_BATCH_SIZE", gt=0)
    batch_within: float = Field(0.05, alias="LEADWERK_SCORING_BATCH_WITHIN", gt=0)
    #: A visit ends after this long without activity.
    session_timeout_minutes: float = Field(30, alias="LEADWERK_SCORING_SESSION_TIMEOUT_MINUTES")
    #: Activity of never-identified visitors older than this is purged (days; 0 keeps it).
    anonymous_retention_days: float = Field(90, alias="LEADWERK_SCORING_ANONYMOUS_RETENTION_DAYS")
    database_pool_size: int = Field(10, alias="LEADWERK_SCORING_DB_POOL_SIZE")

    def enabled_processors(self) -> list[str]:
        names = [n.strip() for n in self.processors.split(",") if n.strip()]
        unknown = sorted(set(names) - set(PROCESSORS))
        if unknown:
            raise ValueError(f"LEADWERK_SCORING_PROCESSORS: unknown {', '.join(unknown)}; "
                             f"choose from {', '.join(PROCESSORS)}")
        return names
