"""What the mailer reads of ``workspaces.yaml``: per workspace, the default sender and whether
marketing consent needs a confirmed double opt-in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from leadwerk_platform.settings import config_entries


@dataclass(frozen=True)
class WorkspaceMail:
    double_opt_in: bool = True
    #: "Name <address>" for mail without an owner or fixed sender; None: LEADWERK_MAILER_FROM.
    sender: str | None = None


def workspace_mail(config_dir: Path) -> dict[str, WorkspaceMail]:
    return {str(w["id"]): WorkspaceMail(bool(w.get("double_opt_in", True)), w.get("sender"))
            for w in config_entries(config_dir, "workspaces.yaml", "workspaces")}
