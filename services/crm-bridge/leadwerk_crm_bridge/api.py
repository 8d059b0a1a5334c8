"""The crm-bridge service (port 8084): the inbound CRM webhook, the delivery log with dead
letters and replay, with the crm-commands consumer and the delivery worker in the process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Literal

import asyncpg
import httpx
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from leadwerk_crm_bridge import sync
from leadwerk_crm_bridge.channels import (
    Channel,
    Http,
    HubSpotChannel,
    SalesforceChannel,
    WebhookChannel,
)
from leadwerk_crm_bridge.config import Config
from leadwerk_crm_bridge.deliveries import (
    TOPICS,
    CommandHandler,
    DeliveryWorker,
    Deps,
    replay_dead,
)
from leadwerk_crm_bridge.inbound import (
    OUTBOX_STREAM,
    InboundError,
    hubspot_connector,
    receive,
    receive_hubspot,
)
from leadwerk_crm_bridge.metrics import BridgeMetrics
from leadwerk_crm_bridge.projection import forget_old_activities
from leadwerk_crm_bridge.settings import BridgeSettings
from leadwerk_platform.admin import AdminGuard, Workspace
from leadwerk_platform.database import create_pool, reachable
from leadwerk_platform.health import health_router
from leadwerk_platform.kafka.consumer import ConsumerRuntime
from leadwerk_platform.kafka.producer import Publisher
from leadwerk_platform.metrics import HttpMetricsMiddleware, metrics_router, new_registry
from leadwerk_platform.outbox import OutboxRelay

SCHEMA = "crm_bridge"
MAX_INBOUND_BYTES = 256 * 1024
PRUNE_SECONDS = 3600.0
logger = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Bridge:
    def __init__(self, settings: BridgeSettings, clock: Callable[[], datetime]) -> None:
        self.settings = settings
        self.clock = clock
        self.registry = new_registry()
        self.metrics = BridgeMetrics(self.registry)
        self.publisher = Publisher(settings, "crm-bridge")
        self.deps: Deps | None = None
        self.worker: DeliveryWorker | None = None
        self.relay: OutboxRelay | None = None
        self.consumers: list[ConsumerRuntime] = []
        self._client: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        settings = self.settings
        pool = await create_pool(settings, SCHEMA, settings.database_pool_size)
        await self.publisher.start(wait=5.0)
        config = await asyncio.to_thread(Config.load, settings.config_dir)
        environ = {name: os.environ[name] for c in config.connectors
                   for name in c.secrets.values() if name in os.environ}
        self.deps = deps = Deps(settings, pool, config, self.metrics, self.clock, environ)
        # No redirects: a 3xx to a private address would get around the SSRF check.
        self._client = httpx.AsyncClient(timeout=settings.request_timeout,
                                         follow_redirects=False, trust_env=False,
                                         limits=httpx.Limits(max_connections=100))
        private = config.private_webhooks(settings.environment)
        if private != config.allow_private:
            logger.warning("allow_private_webhooks ignored in production",
                           extra={"workspaces": sorted(config.allow_private)})
        http = Http(self._client, private)
        channels: dict[str, Channel] = {
            "webhook": WebhookChannel(http, lambda: deps.secrets("outbound"), self.clock),
            "hubspot": HubSpotChannel(http, lambda c: deps.secret(c, "token")),
            "salesforce": SalesforceChannel(http, deps.secret)}
        self.worker = DeliveryWorker(deps, channels)
        self.relay = OutboxRelay(pool, self.publisher, schema=SCHEMA, stream=OUTBOX_STREAM)
        commands = CommandHandler(deps, self.worker)
        changes = sync.SyncHandler(deps, self.worker)
        prefix = settings.kafka_topic_prefix
        self.consumers = [
            ConsumerRuntime(settings, group_id=f"{prefix}crm-bridge.deliveries", topics=TOPICS,
                            handler=commands, batch_handler=commands.batch,
                            dead_letter_publisher=self.publisher,
                            metrics=self.metrics.consumers),
            ConsumerRuntime(settings, group_id=f"{prefix}crm-bridge.sync", topics=sync.TOPICS,
                            handler=changes, batch_handler=changes.batch,
                            dead_letter_publisher=self.publisher,
                            metrics=self.metrics.consumers)]
        self._tasks = [*(asyncio.create_task(c.run()) for c in self.consumers),
                       asyncio.create_task(self.worker.run()),
                       asyncio.create_task(self.relay.sweep()),
                       asyncio.create_task(self._prune())]

    async def _prune(self) -> None:
        """Activities older than 90 days leave the projection, hourly."""
        while True:
            if self.deps is not None:
                try:
                    async with self.deps.pool.acquire() as connection:
                        await forget_old_activities(connection, self.clock())
                except (OSError, asyncpg.PostgresError):
                    logger.exception("pruning old activities failed; trying again later")
            await asyncio.sleep(PRUNE_SECONDS)

    async def stop(self) -> None:
        for consumer in self.consumers:
            consumer.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*self._tasks[:len(self.consumers)]), 10)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._client is not None:
            await self._client.aclose()
        await self.publisher.stop()
        if self.deps is not None:
            await self.deps.pool.close()

    async def database_ready(self) -> bool:
        return await reachable(self.deps.pool if self.deps is not None else None)

    async def workers_ready(self) -> bool:
        return bool(self._tasks) and all(not t.done() for t in self._tasks)


def create_app(settings: BridgeSettings, *,
               clock: Callable[[], datetime] = utcnow) -> FastAPI:
    bridge = Bridge(settings, clock)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await bridge.start()
        try:
            yield
        finally:
            await bridge.stop()

    app = FastAPI(title="Leadwerk crm-bridge", version="1", lifespan=lifespan,
                  description="Inbound CRM webhooks (signed) and the outbound delivery log. "
                              "Every /api route needs the admin token as a Bearer token.")
    app.state.bridge = bridge
    app.add_middleware(HttpMetricsMiddleware, metrics=bridge.metrics.http)
    app.include_router(health_router({"kafka": bridge.publisher.check,
                                      "database": bridge.database_ready,
                                      "workers": bridge.workers_ready}))
    app.include_router(metrics_router(bridge.registry))

    def deps() -> Deps:
        if bridge.deps is None:
            raise HTTPException(503, "starting")
        return bridge.deps

    @app.post("/webhooks/{workspace}/generic", tags=["inbound"],
              summary="CRM events (Standard Webhooks, signed with our inbound secret)")
    async def inbound(workspace: str, request: Request) -> JSONResponse:
        body = await request.body()
        if len(body) > MAX_INBOUND_BYTES:
            return JSONResponse({"detail": "body too large"}, status_code=413)
        try:
            result = await receive(deps(), workspace, body, dict(request.headers))
        except InboundError as error:
            deps().metrics.inbound.labels("webhook", "refused").inc()
            return JSONResponse({"detail": str(error)}, status_code=error.status)
        assert bridge.relay is not None  # noqa: S101 - set in start
        bridge.relay.request()
        return JSONResponse(result)

    @app.post("/webhooks/{workspace}/hubspot", tags=["inbound"],
              summary="HubSpot webhooks (X-HubSpot-Signature-v3, the app's client secret)")
    async def inbound_hubspot(workspace: str, request: Request,
                              connector: str | None = None) -> JSONResponse:
        body = await request.body()
        if len(body) > MAX_INBOUND_BYTES:
            return JSONResponse({"detail": "body too large"}, status_code=413)
        uri = str(request.url)
        if settings.public_url:
            uri = settings.public_url.rstrip("/") + request.url.path + (
                f"?{request.url.query}" if request.url.query else "")
        try:
            target = hubspot_connector(deps(), workspace, connector)
            result = await receive_hubspot(deps(), target, uri=uri, body=body,
                                           headers=request.headers)
        except InboundError as error:
            deps().metrics.inbound.labels("hubspot", "refused").inc()
            return JSONResponse({"detail": str(error)}, status_code=error.status)
        assert bridge.relay is not None  # noqa: S101 - set in start
        bridge.relay.request()
        return JSONResponse(result)

    app.include_router(_router(bridge, settings, deps))
    return app


def _router(bridge: Bridge, settings: BridgeSettings,
            deps: Callable[[], Deps]) -> APIRouter:
    router = APIRouter(prefix="/api", tags=["deliveries"],
                       dependencies=[Depends(AdminGuard(settings.admin_token.get_secret_value()))])
    default = settings.default_workspace
    columns = ("delivery_id::text AS delivery_id, contact_id::text AS contact_id, "
               "command_id::text AS command_id, batch_id::text AS batch_id, connector, url, "
               "kind, event, state, attempts, "
               "next_attempt_at, last_status, last_error, created_at, delivered_at")

    def shown(row: Any) -> dict[str, Any]:
        return {k: (v.isoformat() if isinstance(v, datetime) else v)
                for k, v in dict(row).items()}

    @router.get("/contacts/{contact_id}/deliveries", summary="The contact's delivery log")
    async def contact_log(contact_id: str, workspace: Workspace = default) -> dict[str, Any]:
        async with deps().pool.acquire() as connection:
            try:
                rows = await connection.fetch(
                    f"SELECT {columns} FROM deliveries WHERE workspace = $1 "  # noqa: S608
                    "AND contact_id = $2 ORDER BY seq", workspace, contact_id)
            except asyncpg.DataError as error:
                raise HTTPException(404, "no such contact") from error
        return {"contact_id": contact_id, "items": [shown(r) for r in rows]}

    @router.get("/deliveries", summary="Deliveries by state (dead: the dead letters)")
    async def listing(state: Literal["pending", "delivered", "dead", "cancelled"] = "dead",
                      workspace: Workspace = default) -> dict[str, Any]:
        async with deps().pool.acquire() as connection:
            rows = await connection.fetch(
                f"SELECT {columns} FROM deliveries WHERE workspace = $1 "  # noqa: S608
                "AND state = $2 ORDER BY updated_at DESC LIMIT 500", workspace, state)
        return {"items": [shown(r) for r in rows]}

    @router.post("/deliveries/replay",
                 summary="Send every dead-lettered delivery again (of one connector, if named)")
    async def replay_all(connector: str | None = None,
                         workspace: Workspace = default) -> dict[str, Any]:
        async with deps().pool.acquire() as connection:
            replayed = await replay_dead(connection, workspace, bridge.clock(),
                                         connector=connector)
        if bridge.worker is not None:
            bridge.worker.wake()
        return {"replayed": len(replayed)}

    @router.post("/deliveries/{delivery_id}/replay",
                 summary="Send a dead-lettered delivery again (same webhook-id)")
    async def replay(delivery_id: str, workspace: Workspace = default) -> dict[str, Any]:
        async with deps().pool.acquire() as connection:
            try:
                replayed = await replay_dead(connection, workspace, bridge.clock(),
                                             delivery_id=delivery_id)
            except asyncpg.DataError as error:
                raise HTTPException(404, "no such delivery") from error
        if not replayed:
            raise HTTPException(409, "only a dead-lettered delivery can be replayed")
        if bridge.worker is not None:
            bridge.worker.wake()
        return {"delivery_id": delivery_id, "state": "pending"}

    return router
