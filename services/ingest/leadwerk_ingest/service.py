"""What every ingest route shares: the :class:`Ingest` state, client errors, request reading.

Routes work on the raw ASGI scope and ``receive`` (via :class:`RequestHead` and
:func:`read_body`), so the hot tracking path and the Starlette routes share one implementation.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
import uuid
import zlib
from collections import Counter
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from leadwerk_ingest.adapters.bots import BotDetector
from leadwerk_ingest.adapters.config import IngestConfig, Workspace
from leadwerk_ingest.domain.ratelimit import TokenBucket, retry_after_seconds
from leadwerk_ingest.handlers import Outgoing, RequestFacts
from leadwerk_ingest.metrics import IngestMetrics
from leadwerk_ingest.settings import IngestSettings
from leadwerk_platform.kafka.producer import OutgoingMessage, Publisher, PublishError
from leadwerk_platform.metrics import new_registry
from leadwerk_platform.tokens import TokenSigner

logger = logging.getLogger(__name__)
TRACKING_TOPIC = "tracking-events"
JSON_TYPE = "application/json"


class ApiError(Exception):
    """A client mistake, answered with a 4xx and a JSON body naming the problem."""

    def __init__(self, status: int, code: str, message: str,
                 details: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details, self.headers = details, headers or {}

    def body(self) -> bytes:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            error["details"] = self.details
        return orjson.dumps({"success": False, "error": error})

    def response(self, extra_headers: dict[str, str] | None = None) -> Response:
        return Response(self.body(), self.status, {**self.headers, **(extra_headers or {})},
                        JSON_TYPE)


class RequestHead(NamedTuple):
    """The request headers ingest looks at, read in one pass over the ASGI scope (a tuple:
    built for every request, cheaper than a frozen dataclass)."""

    authorization: str | None = None
    content_encoding: str = "identity"
    content_length: int | None = None
    content_type: str = ""
    origin: str | None = None
    user_agent: str | None = None
    request_id: str | None = None
    client_ip: str | None = None

    @classmethod
    def from_scope(cls, scope: Scope) -> RequestHead:
        found: dict[str, str] = {}
        for name, value in scope["headers"]:
            key = _WANTED.get(name)
            if key is not None:
                found[key] = value.decode("latin-1")
        length = found.pop("content_length", None)
        client = scope.get("client")
        return cls(content_length=int(length) if length and length.isdigit() else None,
                   client_ip=client[0] if client else None, **found)


_WANTED = {b"authorization": "authorization", b"content-encoding": "content_encoding",
           b"content-length": "content_length", b"content-type": "content_type",
           b"origin": "origin", b"user-agent": "user_agent", b"x-request-id": "request_id"}


class Ingest:
    """Everything the routes share, built by :func:`create_app` (nothing global)."""

    def __init__(self, settings: IngestSettings, config: IngestConfig) -> None:
        self.settings = settings
        self.config = config
        self.topic = settings.topic(TRACKING_TOPIC)
        self.publisher = Publisher(settings, client_id="leadwerk-ingest",
                                   delivery_timeout=settings.produce_timeout)
        self.signer = TokenSigner(settings.secret_key.get_secret_value())
        self.bots = BotDetector()
        self.registry = new_registry()
        self.metrics = IngestMetrics(self.registry)
        self.buckets: dict[str, TokenBucket] = {}
        # Correlation ids for requests that bring none: unique per process, cheap per request.
        self._correlation_prefix = uuid.uuid4().hex[:12]
        self._correlation_counter = itertools.count()

    def facts(self, head: RequestHead) -> RequestFacts:
        return RequestFacts(
            received_at=datetime.now(UTC),
            ip=head.client_ip,
            user_agent=head.user_agent,
            correlation_id=head.request_id
            or f"{self._correlation_prefix}-{next(self._correlation_counter)}",
        )

    def rate_limit(self, key: str, workspace: Workspace, events: int) -> None:
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = TokenBucket(workspace.rate_limit.events_per_second,
                                                     workspace.rate_limit.burst)
        wait = bucket.take(events, time.monotonic())
        if wait == math.inf:  # more events than the burst: retrying cannot help
            raise ApiError(413, "batch_too_large", f"{events} events exceed the write key's "
                           f"burst of {bucket.burst:g}; send smaller batches")
        if wait:
            self.metrics.rejected.labels("rate_limited").inc(events)
            raise ApiError(429, "rate_limited", "too many events for this write key",
                           headers={"Retry-After": str(retry_after_seconds(wait))})

    async def produce(self, events: list[Outgoing]) -> None:
        """Publish and await every ack; a broker problem becomes a 503 with Retry-After."""
        if not events:
            return
        start = time.perf_counter()
        try:
            await self.publisher.publish(
                [OutgoingMessage(self.topic, e.key, e.value) for e in events])
        except PublishError as error:
            self.metrics.rejected.labels("broker_unavailable").inc(len(events))
            logger.warning("events not acknowledged by the broker",
                           extra={"events": len(events), "error": str(error)})
            raise ApiError(503, "broker_unavailable",
                           f"events not accepted, try again later ({error})",
                           headers={"Retry-After": str(self.settings.retry_after_seconds)}
                           ) from error
        self.metrics.produce_latency.observe(time.perf_counter() - start)
        if len(events) == 1:
            self.metrics.accepted_of(events[0].type).inc()
            return
        for event_type, count in Counter(e.type for e in events).items():
            self.metrics.accepted_of(event_type).inc(count)

    def cors(self, head: RequestHead, workspace: Workspace | None) -> dict[str, str]:
        origin = head.origin
        if not origin:
            return {}
        allowed = (workspace.allows_origin(origin) if workspace is not None
                   else self.config.any_allows_origin(origin))
        if not allowed:
            return {}
        headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        named = ([workspace] if workspace is not None else self.config.workspaces.values())
        if any(origin in ws.allowed_origins for ws in named):
            # Credentials only for origins named explicitly, never for a "*" workspace.
            headers["Access-Control-Allow-Credentials"] = "true"
        return headers


async def read_body(receive: Receive, head: RequestHead, limit: int) -> bytes:
    """The request body, decompressed when gzip/deflate, refusing anything over ``limit``."""
    if head.content_length is not None and head.content_length > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ApiError(400, "incomplete_body", "the client went away mid-request")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    encoding = head.content_encoding.lower()
    if encoding in ("identity", ""):
        return body
    if encoding not in ("gzip", "deflate"):
        raise ApiError(415, "unsupported_encoding", f"Content-Encoding {encoding} not supported")
    decompressor = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        inflated = decompressor.decompress(body, limit + 1)
    except zlib.error as error:
        raise ApiError(400, "invalid_encoding", f"body is not valid {encoding}") from error
    if len(inflated) > limit or decompressor.unconsumed_tail:
        raise _too_large(limit)
    return inflated


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"request body exceeds {limit} bytes")


def preflight_response(cors: dict[str, str], allow_headers: str) -> Response:
    """A CORS preflight answer: 204 with the allowed methods and headers, 403 for an origin no
    workspace allows."""
    if not cors:
        return Response(status_code=403)
    return Response(status_code=204, headers={
        **cors, "Access-Control-Allow-Methods": "POST, OPTIONS",
        "Access-Control-Allow-Headers": allow_headers, "Access-Control-Max-Age": "600"})


def parse_json(body: bytes) -> dict[str, Any]:
    """A JSON object, or a 400 naming what is wrong with the body."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise ApiError(400, "invalid_json", f"body is not valid JSON: {error}") from error
    if not isinstance(parsed, dict):
        raise ApiError(400, "invalid_json", "body must be a JSON object")
    return parsed


async def send_json(send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
    """Answer directly on the ASGI channel (the hot path has no Response object)."""
    raw = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    raw.extend((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items())
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
