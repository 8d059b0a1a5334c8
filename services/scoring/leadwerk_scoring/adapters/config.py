"""What scoring reads from the configuration folder: declared identifiers per workspace and
the default scoring model."""

from __future__ import annotations

from pathlib import Path

import yaml

from leadwerk_platform.settings import config_entries
from leadwerk_scoring.domain.model import ScoringModel


def declared_identifiers(config_dir: Path) -> dict[str, tuple[str, ...]]:
    """``workspaces[].identifiers`` of ``workspaces.yaml``: traits that identify a person
    (e.g. a customer number) besides user id and email."""
    return {str(w["id"]): tuple(str(i) for i in w.get("identifiers") or ())
            for w in config_entries(config_dir, "workspaces.yaml", "workspaces")}


def default_model(config_dir: Path) -> ScoringModel:
    """``scoring-model.yaml``: the model a workspace starts with (version 1)."""
    document = yaml.safe_load((config_dir / "scoring-model.yaml").read_text())
    return ScoringModel.model_validate(document)
