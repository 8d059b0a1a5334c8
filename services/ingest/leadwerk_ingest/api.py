"""The ingest HTTP API: app factory, lifespan and routes.

Hot tracking routes are plain Starlette endpoints on the FastAPI app (no dependency injection on
the request path); see docs/decisions/0005-ingest-hot-path.md.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

import orjson
from fastapi import FastAPI
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from leadwerk_ingest import email_routes, form_routes
from leadwerk_ingest.adapters.config import IngestConfig, Workspace, load_config
from leadwerk_ingest.domain.enrich import BadTimestampError
from leadwerk_ingest.domain.messages import CALL_TYPES, SHORT_PATHS, adapter
from leadwerk_ingest.handlers import Outgoing, RequestFacts, segment_event
from leadwerk_ingest.metrics import MetricsMiddleware
from leadwerk_ingest.service import JSON_TYPE, ApiError, Ingest, read_body
from leadwerk_ingest.settings import IngestSettings
from leadwerk_platform.health import health_router
from leadwerk_platform.metrics import metrics_router

_OK = orjson.dumps({"success": True})
_CORS_HEADERS = "Content-Type, Authorization, Content-Encoding, X-Request-ID"


def basic_auth_key(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header or header[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise ApiError(401, "invalid_write_key", "malformed Basic authorization") from None
    return decoded.split(":", 1)[0]


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise ApiError(400, "invalid_json", f"body is not valid JSON: {error}") from error
    if not isinstance(parsed, dict):
        raise ApiError(400, "invalid_json", "body must be a JSON object")
    return parsed


def authenticate(ingest: Ingest, request: Request, payload: dict[str, Any]) -> tuple[str,
                                                                                      Workspace]:
    key = basic_auth_key(request)
    if not key:
        body_key = payload.get("writeKey")
        key = body_key if isinstance(body_key, str) else None
    if not key:
        raise ApiError(401, "missing_write_key",
                       "send the write key as Basic auth user name or as writeKey")
    workspace = ingest.config.workspace_for_key(key)
    if workspace is None:
        raise ApiError(401, "invalid_write_key", "unknown write key")
    return key, workspace


def _validation_details(error: ValidationError, index: int | None = None) -> list[dict[str, Any]]:
    details = []
    for problem in error.errors(include_url=False, include_input=False):
        location = [str(p) for p in problem["loc"] if not str(p).endswith("Call")]
        detail: dict[str, Any] = {"field": ".".join(location) or "(event)",
                                  "message": problem["msg"]}
        if index is not None:
            detail["index"] = index
        details.append(detail)
    return details


def build_events(ingest: Ingest, workspace: Workspace, facts: RequestFacts,
                 raw_events: list[Any], *, batch_sent_at: str | None,
                 call_type: str | None) -> list[Outgoing]:
    """Validate and enrich; any bad event fails the whole request with every problem listed."""
    validator = adapter(call_type or "batch")
    events: list[Outgoing] = []
    details: list[dict[str, Any]] = []
    limit = ingest.settings.max_event_bytes
    received_at = facts.received_at_text
    for index, raw in enumerate(raw_events):
        position = index if call_type is None else None
        if not isinstance(raw, dict):
            details.append({"index": index, "field": "(event)", "message": "not an object"})
            continue
        try:
            call = validator.validate_python(raw)
        except ValidationError as error:
            details.extend(_validation_details(error, position))
            continue
        user_agent = call.context.get("userAgent")
        bot = ingest.bots.is_bot(user_agent if isinstance(user_agent, str)
                                 else facts.user_agent)
        if bot and workspace.bots == "drop":
            ingest.metrics.rejected.labels("bot").inc()
            continue
        try:
            event = segment_event(call, workspace.id, facts, batch_sent_at=batch_sent_at,
                                  anonymize=workspace.anonymize_ip, bot=bot,
                                  received_at_text=received_at)
        except BadTimestampError as error:
            details.append({**({"index": index} if position is not None else {}),
                            "field": "timestamp", "message": str(error)})
            continue
        # The size limit applies to the event as it goes on the wire (a single call's body
        # was already bounded by read_body; enrichment adds a few hundred bytes at most).
        if position is not None and len(event.value) > limit:
            details.append({"index": index, "field": "(event)",
                            "message": f"event exceeds {limit} bytes"})
            continue
        events.append(event)
    if details:
        ingest.metrics.rejected.labels("invalid").inc(len(raw_events))
        raise ApiError(400, "invalid_event" if call_type else "invalid_batch",
                       "event rejected" if call_type else "batch rejected: no event was "
                       "accepted; fix the listed events and resend", details)
    return events


def create_app(settings: IngestSettings, config: IngestConfig | None = None) -> FastAPI:
    """Build the ingest app; the lifespan connects the producer and disconnects it."""
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
    app.add_middleware(MetricsMiddleware, metrics=ingest.metrics, templates=templates)
    app.include_router(health_router({"kafka": ingest.publisher.check}))
    app.include_router(metrics_router(ingest.registry))

    def tracking_endpoint(call_type: str | None) -> Any:
        async def endpoint(request: Request) -> Response:
            workspace: Workspace | None = None
            try:
                limit = (ingest.settings.max_batch_bytes if call_type is None
                         else ingest.settings.max_event_bytes)
                payload = parse_json(await read_body(request, limit))
                key, workspace = authenticate(ingest, request, payload)
                if call_type is None:
                    raw_events = payload.get("batch")
                    if not isinstance(raw_events, list) or not raw_events:
                        raise ApiError(400, "invalid_batch", "batch must be a non-empty array")
                    sent_at = payload.get("sentAt")
                    batch_sent_at = sent_at if isinstance(sent_at, str) else None
                else:
                    payload["type"] = call_type
                    raw_events, batch_sent_at = [payload], None
                ingest.rate_limit(key, workspace, len(raw_events))
                events = build_events(ingest, workspace, ingest.facts(request), raw_events,
                                      batch_sent_at=batch_sent_at, call_type=call_type)
                await ingest.produce(events)
            except ApiError as error:
                return error.response(ingest.cors(request, workspace))
            return Response(_OK, 200, ingest.cors(request, workspace), JSON_TYPE)

        return endpoint

    async def preflight(request: Request) -> Response:
        headers = ingest.cors(request, None)
        if not headers:
            return Response(status_code=403)
        return Response(status_code=204, headers={
            **headers, "Access-Control-Allow-Methods": "POST, OPTIONS",
            "Access-Control-Allow-Headers": _CORS_HEADERS, "Access-Control-Max-Age": "600"})

    for name in CALL_TYPES:
        app.router.add_route(f"/v1/{name}", tracking_endpoint(name), methods=["POST"])
    for short, name in SHORT_PATHS.items():
        app.router.add_route(f"/v1/{short}", tracking_endpoint(name), methods=["POST"])
    for batch_path in ("/v1/batch", "/v1/b", "/v1/import"):
        app.router.add_route(batch_path, tracking_endpoint(None), methods=["POST"])
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
    return app
