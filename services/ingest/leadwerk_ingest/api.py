"""The ingest HTTP API: app factory, lifespan and the non-tracking routes.

The Segment-spec tracking routes are served by :class:`TrackingRoutes` (raw ASGI) in front of
this app; see docs/decisions/0005-ingest-hot-path.md.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from leadwerk_ingest import email_routes, form_routes
from leadwerk_ingest.adapters.config import IngestConfig, load_config
from leadwerk_ingest.service import Ingest, RequestHead, preflight_response
from leadwerk_ingest.settings import IngestSettings
from leadwerk_ingest.tracking import TrackingRoutes
from leadwerk_platform.health import health_router
from leadwerk_platform.metrics import HttpMetricsMiddleware, metrics_router

_CORS_HEADERS = "Content-Type, Authorization, Content-Encoding, X-Request-ID"


def create_app(settings: IngestSettings, config: IngestConfig | None = None) -> ASGIApp:
    """Build the ingest app; the lifespan connects the producer and disconnects it.

    The result is :class:`TrackingRoutes` wrapping the FastAPI app: tracking POSTs are answered
    before FastAPI sees them, everything else (and the lifespan) passes through.
    """
    ingest = Ingest(settings, config or load_config(settings))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await ingest.publisher.start(wait=5.0)
        try:
            yield
        finally:
            await ingest.publisher.stop()

    app = FastAPI(title="Leadwerk ingest", version="1", lifespan=lifespan,
                  docs_url="/docs", redoc_url=None)
    app.state.ingest = ingest
    templates: dict[Any, str] = {}
    app.add_middleware(HttpMetricsMiddleware, metrics=ingest.metrics, templates=templates)
    app.include_router(health_router({"kafka": ingest.publisher.check}))
    app.include_router(metrics_router(ingest.registry))

    async def preflight(request: Request) -> Response:
        return preflight_response(ingest.cors(RequestHead.from_scope(request.scope), None),
                                  _CORS_HEADERS)

    app.router.add_route("/v1/{path:path}", preflight, methods=["OPTIONS"])

    sdk_source = files("leadwerk_ingest").joinpath("static/sdk.js").read_bytes()

    async def sdk(_: Request) -> Response:
        return Response(sdk_source, 200, {"Cache-Control": "public, max-age=300"},
                        "application/javascript; charset=utf-8")

    app.router.add_route("/sdk.js", sdk, methods=["GET"])
    email_routes.register(app, ingest)
    form_routes.register(app, ingest)
    templates.update({route.endpoint: route.path for route in app.router.routes
                      if isinstance(route, Route)})
    return TrackingRoutes(app, ingest)
