"""What every admin API shares: the bearer-token guard and the workspace query parameter."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Query
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
