"""What every ingest route shares: the :class:`Ingest` state, client errors, body reading."""

from __future__ import annotations

import logging
import time
import uuid
import zlib
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

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

    def response(self, extra_headers: dict[str, str] | None = None) -> Response:
        body: dict[str, Any] = {"success": False, "error": {"code": self.code,
                                                             "message": self.message}}
        if self.details:
            body["error"]["details"] = self.details
        return Response(orjson.dumps(body), self.status, {**self.headers,
                                                          **(extra_headers or {})}, JSON_TYPE)


class Ingest:
    """Everything the routes share, built by :func:`create_app` (nothing global)."""

    def __init__(self, settings: IngestSettings, config: IngestConfig) -> None:
        self.settings = settings
        self.config = config
        self.topic = settings.topic(TRACKING_TOPIC)
        self.publisher = Publisher(settings, client_id="leadwerk-ingest")
        self.signer = TokenSigner(settings.secret_key.get_secret_value())
        self.bots = BotDetector()
        self.registry = new_registry()
        self.metrics = IngestMetrics(self.registry)
        self.buckets: dict[str, TokenBucket] = {}

    # -- request helpers -----------------------------------------------------------------

    def facts(self, request: Request) -> RequestFacts:
        return RequestFacts(
            received_at=datetime.now(UTC),
            ip=request.client.host if request.client else None,
            user_agent=request.headers.get("user-agent"),
            correlation_id=request.headers.get("x-request-id") or str(uuid.uuid4()),
        )

    def rate_limit(self, key: str, workspace: Workspace, events: int) -> None:
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = TokenBucket(workspace.rate_limit.events_per_second,
                                                     workspace.rate_limit.burst)
        wait = bucket.take(events, time.monotonic())
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
                (OutgoingMessage(self.topic, e.key, e.value) for e in events),
                timeout=self.settings.produce_timeout)
        except PublishError as error:
            self.metrics.rejected.labels("broker_unavailable").inc(len(events))
            logger.warning("events not acknowledged by the broker",
                           extra={"events": len(events), "error": str(error)})
            raise ApiError(503, "broker_unavailable",
                           f"events not accepted, try again later ({error})",
                           headers={"Retry-After": str(self.settings.retry_after_seconds)}
                           ) from error
        self.metrics.produce_latency.observe(time.perf_counter() - start)
        for event_type, count in Counter(e.type for e in events).items():
            self.metrics.accepted.labels(event_type).inc(count)

    def cors(self, request: Request, workspace: Workspace | None) -> dict[str, str]:
        origin = request.headers.get("origin")
        if not origin:
            return {}
        allowed = (workspace.allows_origin(origin) if workspace is not None
                   else self.config.any_allows_origin(origin))
        if not allowed:
            return {}
        return {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Credentials": "true",
                "Vary": "Origin"}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, decompressed when gzip/deflate, refusing anything over ``limit``."""
    declared = request.headers.get("content-length")
    encoding = request.headers.get("content-encoding", "identity").lower()
    too_large = ApiError(413, "payload_too_large", f"request body exceeds {limit} bytes")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    body = b"".join(chunks)
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
        raise too_large
    return inflated


