"""The Segment-spec tracking routes, served as raw ASGI in front of the FastAPI app.

These routes carry nearly all traffic, so they skip routing, middleware and Request/Response
objects (see docs/decisions/0005-ingest-hot-path.md); everything else goes to FastAPI.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from leadwerk_ingest.adapters.config import Workspace
from leadwerk_ingest.domain.enrich import BadTimestampError
from leadwerk_ingest.domain.messages import CALL_TYPES, SHORT_PATHS, adapter
from leadwerk_ingest.handlers import Outgoing, RequestFacts, segment_event
from leadwerk_ingest.service import (
    ApiError,
    Ingest,
    RequestHead,
    parse_json,
    read_body,
    send_json,
)
from leadwerk_platform.caching import short_key_cache

_OK = orjson.dumps({"success": True})
_BATCH = "batch"


def tracking_routes() -> dict[str, str]:
    """Path → call type (``batch`` for the batch endpoints)."""
    routes = {f"/v1/{name}": name for name in CALL_TYPES}
    routes.update({f"/v1/{short}": name for short, name in SHORT_PATHS.items()})
    routes.update(dict.fromkeys(("/v1/batch", "/v1/b", "/v1/import"), _BATCH))
    return routes


@short_key_cache(maxsize=1024, max_key_length=512)
def basic_auth_key(header: str) -> str | None:
    """The write key of a Basic ``Authorization`` header (cached: a site sends the same one)."""
    if header[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):  # binascii.Error is a ValueError; so is non-ASCII
        raise ApiError(401, "invalid_write_key", "malformed Basic authorization") from None
    return decoded.split(":", 1)[0]


def authenticate(ingest: Ingest, head: RequestHead,
                 payload: dict[str, Any]) -> tuple[str, Workspace]:
    key = basic_auth_key(head.authorization) if head.authorization else None
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
    """Problems as field paths; in a batch, pydantic's first location is the call type tag."""
    details = []
    for problem in error.errors(include_url=False, include_input=False):
        loc = problem["loc"][1:] if index is not None and problem["type"] != "union_tag_invalid" \
            else problem["loc"]
        location = [str(p) for p in loc]
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
    bots: dict[str | None, bool] = {}
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
        agent = call.context.get("userAgent")
        user_agent = agent if isinstance(agent, str) else facts.user_agent
        bot = bots.get(user_agent)
        if bot is None:  # the events of a batch nearly always share one user agent
            bot = bots[user_agent] = ingest.bots.is_bot(user_agent)
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
        except orjson.JSONEncodeError:  # orjson writes 254 levels of nesting, reads 1024
            details.append({**({"index": index} if position is not None else {}),
                            "field": "(event)", "message": "nested too deeply"})
            continue
        # A single call's body was bounded by read_body. In a batch, only an event whose
        # envelope came out large can be too large itself; the client's bytes decide.
        if position is not None and len(event.value) > limit and len(orjson.dumps(raw)) > limit:
            ingest.metrics.rejected.labels("too_large").inc(len(raw_events))
            raise ApiError(413, "event_too_large",
                           f"batch[{index}] exceeds {limit} bytes; no event was accepted")
        events.append(event)
    if details:
        ingest.metrics.rejected.labels("invalid").inc(len(raw_events))
        raise ApiError(400, "invalid_event" if call_type else "invalid_batch",
                       "event rejected" if call_type else "batch rejected: no event was "
                       "accepted; fix the listed events and resend", details)
    return events


class TrackingRoutes:
    """ASGI middleware: POSTs to a tracking path are answered here, the rest passes on."""

    def __init__(self, app: ASGIApp, ingest: Ingest) -> None:
        self.app = app
        self.ingest = ingest
        self.routes = tracking_routes()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            call_type = self.routes.get(scope["path"])
            if call_type is not None:
                start = time.perf_counter()
                status = 500  # counted as such if a bug escapes; uvicorn answers the 500
                try:
                    status = await self.track(scope, receive, send, call_type)
                finally:
                    self.ingest.metrics.observe_request(scope["path"], "POST", status,
                                                        time.perf_counter() - start)
                return
        await self.app(scope, receive, send)

    async def track(self, scope: Scope, receive: Receive, send: Send, call_type: str) -> int:
        ingest = self.ingest
        head = RequestHead.from_scope(scope)
        workspace: Workspace | None = None
        single = call_type != _BATCH
        try:
            limit = ingest.settings.max_event_bytes if single else ingest.settings.max_batch_bytes
            payload = parse_json(await read_body(receive, head, limit))
            key, workspace = authenticate(ingest, head, payload)
            if single:
                payload["type"] = call_type
                raw_events, batch_sent_at = [payload], None
            else:
                batch = payload.get("batch")
                if not isinstance(batch, list) or not batch:
                    raise ApiError(400, "invalid_batch", "batch must be a non-empty array")
                raw_events = batch
                sent_at = payload.get("sentAt")
                batch_sent_at = sent_at if isinstance(sent_at, str) else None
            ingest.rate_limit(key, workspace, len(raw_events))
            events = build_events(ingest, workspace, ingest.facts(head), raw_events,
                                  batch_sent_at=batch_sent_at,
                                  call_type=call_type if single else None)
            await ingest.produce(events)
        except ApiError as error:
            await send_json(send, error.status, error.body(),
                            {**error.headers, **ingest.cors(head, workspace)})
            return error.status
        await send_json(send, 200, _OK, ingest.cors(head, workspace) if head.origin else {})
        return 200
