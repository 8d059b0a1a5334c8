"""The deployable services: how each starts, where it listens, where its migrations live.

One table, read by the local stack (``make run``), the set-up command and the deploy checks.
A service is listed once its package exists in the workspace.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    module: str  # ``python -m <module>`` starts it
    port_variable: str
    default_port: int

    @property
    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    @property
    def migrations(self) -> Path | None:
        """``<package>/migrations`` when the service owns a database schema."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or spec.origin is None:
            return None
        folder = Path(spec.origin).parent / "migrations"
        return folder if (folder / "env.py").exists() else None

    @property
    def schema(self) -> str:
        return self.name.replace("-", "_")


SERVICES = (
    ServiceSpec("ingest", "leadwerk_ingest", "LEADWERK_INGEST_PORT", 8080),
    ServiceSpec("scoring", "leadwerk_scoring", "LEADWERK_SCORING_PORT", 8081),
    ServiceSpec("workflow", "leadwerk_workflow", "LEADWERK_WORKFLOW_PORT", 8082),
    ServiceSpec("mailer", "leadwerk_mailer", "LEADWERK_MAILER_PORT", 8083),
    ServiceSpec("crm-bridge", "leadwerk_crm_bridge", "LEADWERK_CRM_BRIDGE_PORT", 8084),
)


def installed_services() -> list[ServiceSpec]:
    return [service for service in SERVICES if service.installed]
