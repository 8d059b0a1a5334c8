"""What every admin API shares: the bearer-token guard, the workspace query parameter and
document bodies in JSON or YAML."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

import yaml
from fastapi import Depends, HTTPException, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

_bearer = HTTPBearer(auto_error=False)
Workspace = Annotated[str, Query(description="Workspace id")]


class AdminGuard:
    """Every /api route: ``Authorization: Bearer <LEADWERK_ADMIN_TOKEN>``."""

    def __init__(self, token: str) -> None:
        self._expected = token.encode()

    async def __call__(self, credentials: Annotated[HTTPAuthorizationCredentials | None,
                                                    Depends(_bearer)]) -> None:
        if credentials is None or not secrets.compare_digest(
                credentials.credentials.encode(), self._expected):
            raise HTTPException(401, "admin token required (Authorization: Bearer …)",
                                headers={"WWW-Authenticate": "Bearer"})


async def document_body(request: Request, what: str) -> dict[str, Any]:
    """A request body holding one object as JSON or YAML (journeys, templates); 422 when it
    is neither or not an object (``what`` names it in the answer)."""
    try:
        document = yaml.safe_load(await request.body())
    except yaml.YAMLError as error:
        raise HTTPException(422, f"not JSON or YAML: {error}") from error
    if not isinstance(document, dict):
        raise HTTPException(422, f"{what} is an object")
    return document
