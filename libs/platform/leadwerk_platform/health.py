"""``/healthz`` (the process is alive) and ``/readyz`` (its dependencies are reachable)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from fastapi import APIRouter
from fastapi.responses import JSONResponse

Check = Callable[[], Awaitable[bool]]


def health_router(checks: Mapping[str, Check], timeout: float = 2.0) -> APIRouter:
    """Liveness answers without touching dependencies; readiness runs every check concurrently."""
    router = APIRouter(tags=["operations"])

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz")
    async def readyz() -> JSONResponse:
        async def run(check: Check) -> bool:
            try:
                async with asyncio.timeout(timeout):
                    return await check()
            except Exception:  # noqa: BLE001 - any failure means "not ready"
                return False

        names = list(checks)
        results = await asyncio.gather(*(run(checks[n]) for n in names))
        status = {n: ("ok" if ok else "unavailable") for n, ok in zip(names, results, strict=True)}
        ready = all(results)
        return JSONResponse({"status": "ready" if ready else "not ready", "checks": status},
                            status_code=200 if ready else 503)

    return router
