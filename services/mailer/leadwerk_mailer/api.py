"""The mailer service: template, message-log, consent and suppression API (port 8083) with the
command and consent consumers and the retry worker in the same process."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from email.utils import parseaddr
from typing import Any, Literal

import asyncpg
import orjson
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from leadwerk_mailer.config import workspace_mail
from leadwerk_mailer.consumers import (
    COMMAND_TOPICS,
    CONTACT_TOPICS,
    CommandHandler,
    ConsentHandler,
)
from leadwerk_mailer.delivery import (
    OUTBOX_STREAM,
    Delivery,
    Deps,
    RetryWorker,
    release_held,
    suppress,
)
from leadwerk_mailer.domain.bounces import BounceFormatError, parse_dsn, parse_webhook
from leadwerk_mailer.domain.message import Envelope, build
from leadwerk_mailer.domain.policy import valid_address
from leadwerk_mailer.domain.templates import Renderer, RenderError
from leadwerk_mailer.metrics import MailerMetrics
from leadwerk_mailer.settings import MailerSettings
from leadwerk_mailer.templates import TemplateStore, shipped_templates
from leadwerk_mailer.transport import Relay, RelayConfig
from leadwerk_platform.admin import AdminGuard, Workspace, document_body
from leadwerk_platform.database import create_pool, reachable
from leadwerk_platform.health import health_router
from leadwerk_platform.kafka.consumer import ConsumerRuntime
from leadwerk_platform.kafka.producer import Publisher
from leadwerk_platform.metrics import HttpMetricsMiddleware, metrics_router, new_registry
from leadwerk_platform.outbox import OutboxRelay
from leadwerk_platform.ratelimit import RateLimit
from leadwerk_platform.tokens import TokenSigner

SCHEMA = "mailer"


def utcnow() -> datetime:
    return datetime.now(UTC)


class Mailer:
    """The process: pool, publisher, relays, consumers, retry worker."""

    def __init__(self, settings: MailerSettings, clock: Callable[[], datetime]) -> None:
        self.settings = settings
        self.clock = clock
        self.registry = new_registry()
        self.metrics = MailerMetrics(self.registry)
        self.publisher = Publisher(settings, "mailer")
        self.renderer = Renderer()
        self.templates = TemplateStore(self.renderer)
        self.deps: Deps | None = None
        self.delivery: Delivery | None = None
        self.retries: RetryWorker | None = None
        self._consumers: list[ConsumerRuntime] = []
        self._tasks: list[asyncio.Task[None]] = []

    def _relays(self) -> dict[str, Relay]:
        s = self.settings
        marketing = s.smtp_url.get_secret_value()
        transactional = s.smtp_transactional_url.get_secret_value() or marketing

        def relay(url: str) -> Relay:
            return Relay(RelayConfig.from_url(url), size=s.smtp_pool_size,
                         timeout=s.smtp_timeout,
                         limit=RateLimit(s.smtp_rate_per_second, s.smtp_rate_per_hour, 3600))

        first = relay(marketing)
        return {"marketing": first,
                "transactional": first if transactional == marketing else relay(transactional)}

    async def start(self) -> None:
        settings = self.settings
        pool = await create_pool(settings, SCHEMA, settings.database_pool_size)
        await self.publisher.start(wait=5.0)
        outbox = OutboxRelay(pool, self.publisher, schema=SCHEMA, stream=OUTBOX_STREAM)
        workspaces = await asyncio.to_thread(workspace_mail, settings.config_dir)
        self.deps = deps = Deps(settings, pool, self.templates, self.renderer, self._relays(),
                                TokenSigner(settings.secret_key.get_secret_value()), outbox,
                                self.metrics, self.clock, workspaces)
        shipped = await asyncio.to_thread(shipped_templates, settings.config_dir / "templates")
        async with pool.acquire() as connection:
            await self.templates.seed(connection, settings.default_workspace, shipped)
        self.delivery = Delivery(deps)
        self.retries = RetryWorker(deps, self.delivery)
        self.delivery.retries = self.retries
        prefix = settings.kafka_topic_prefix
        commands = CommandHandler(deps, self.delivery)
        self._consumers = [
            ConsumerRuntime(settings, group_id=f"{prefix}mailer.sender", topics=COMMAND_TOPICS,
                            handler=commands, batch_handler=commands.batch,
                            dead_letter_publisher=self.publisher,
                            metrics=self.metrics.consumers),
            ConsumerRuntime(settings, group_id=f"{prefix}mailer.consent",
                            topics=CONTACT_TOPICS,
                            handler=ConsentHandler(deps, self.delivery),
                            dead_letter_publisher=self.publisher,
                            metrics=self.metrics.consumers)]
        self._tasks = [asyncio.create_task(c.run()) for c in self._consumers]
        self._tasks += [asyncio.create_task(outbox.sweep()),
                        asyncio.create_task(self.retries.run())]

    async def stop(self) -> None:
        for consumer in self._consumers:
            consumer.stop()  # finishes the message in hand, commits, leaves the group
        for task in self._tasks[:len(self._consumers)]:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 10)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.publisher.stop()
        if self.deps is not None:
            for relay in set(self.deps.relays.values()):
                await relay.close()
            await self.deps.pool.close()

    async def database_ready(self) -> bool:
        return await reachable(self.deps.pool if self.deps is not None else None)

    async def consumers_ready(self) -> bool:
        return bool(self._tasks) and all(not t.done() for t in self._tasks)


class Preview(BaseModel):
    #: Traits and values to render with; without them the template's sample values.
    personalization: dict[str, Any] | None = None


class TestSend(BaseModel):
    to: str
    personalization: dict[str, Any] | None = None


class ConsentChange(BaseModel):
    purpose: str = "marketing"
    action: Literal["granted", "withdrawn"]
    source: str = Field("api", max_length=200)
    text_version: str | None = None


class Suppression(BaseModel):
    address: str
    reason: Literal["unsubscribed", "hard_bounce", "complaint", "manual"] = "manual"
    detail: str | None = None


def create_app(settings: MailerSettings, *,
               clock: Callable[[], datetime] = utcnow) -> FastAPI:
    mailer = Mailer(settings, clock)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await mailer.start()
        try:
            yield
        finally:
            await mailer.stop()

    app = FastAPI(title="Leadwerk mailer", version="1", lifespan=lifespan,
                  description="Templates, message log, consent and suppression. Every /api "
                              "route needs the admin token as a Bearer token.")
    app.state.mailer = mailer
    app.add_middleware(HttpMetricsMiddleware, metrics=mailer.metrics.http)
    app.include_router(health_router({"kafka": mailer.publisher.check,
                                      "database": mailer.database_ready,
                                      "consumers": mailer.consumers_ready}))
    app.include_router(metrics_router(mailer.registry))
    app.include_router(_router(mailer, settings))
    return app


def _router(mailer: Mailer, settings: MailerSettings) -> APIRouter:  # noqa: PLR0915
    router = APIRouter(prefix="/api", tags=["mailer"],
                       dependencies=[Depends(AdminGuard(settings.admin_token.get_secret_value()))])
    default = settings.default_workspace

    def deps() -> Deps:
        if mailer.deps is None:
            raise HTTPException(503, "starting")
        return mailer.deps

    @router.get("/templates", summary="Templates with their latest version")
    async def list_templates(workspace: Workspace = default) -> dict[str, Any]:
        async with deps().pool.acquire() as connection:
            rows = await connection.fetch(
                "SELECT template_id, max(version) AS latest, "
                "(array_agg(document->>'kind' ORDER BY version DESC))[1] AS kind "
                "FROM templates WHERE workspace = $1 GROUP BY template_id ORDER BY template_id",
                workspace)
        return {"items": [dict(r) for r in rows]}

    @router.get("/templates/{template_id}", summary="The latest version and the history")
    async def get_template(template_id: str, workspace: Workspace = default) -> dict[str, Any]:
        async with deps().pool.acquire() as connection:
            rows = await connection.fetch(
                "SELECT version, document, actor, created_at FROM templates WHERE workspace = $1 "
                "AND template_id = $2 ORDER BY version DESC", workspace, template_id)
        if not rows:
            raise HTTPException(404, "no such template")
        return {"template": orjson.loads(rows[0]["document"]),
                "versions": [{"version": r["version"], "actor": r["actor"],
                              "created_at": r["created_at"].isoformat()} for r in rows]}

    @router.post("/templates/validate", summary="Check a template without storing it")
    async def validate(request: Request, workspace: Workspace = default) -> dict[str, Any]:
        document = await document_body(request, "a template")
        async with deps().pool.acquire() as connection:
            _, problems = await mailer.templates.validate(connection, workspace, document)
        return {"valid": not problems, "problems": [p.to_dict() for p in problems]}

    @router.put("/templates/{template_id}", summary="Create or edit (a new version)")
    async def put_template(template_id: str, request: Request,
                           workspace: Workspace = default) -> JSONResponse:
        document = {**await document_body(request, "a template"), "id": template_id}
        async with deps().pool.acquire() as connection:
            template, problems = await mailer.templates.validate(connection, workspace,
                                                                 document)
            if template is None:
                return JSONResponse({"detail": "invalid template",
                                     "problems": [p.to_dict() for p in problems]},
                                    status_code=422)
            stored = await mailer.templates.save(connection, workspace, template, actor="api")
        return JSONResponse({"template_id": stored.id, "version": stored.version},
                            status_code=201)

    async def rendered(template_id: str, workspace: str,
                       personalization: dict[str, Any] | None) -> Any:
        async with deps().pool.acquire() as connection:
            template = await mailer.templates.latest(connection, workspace, template_id)
            if template is None:
                raise HTTPException(404, "no such template")
            layout = await mailer.templates.latest(connection, workspace, template.layout) \
                if template.layout else None
        values = personalization if personalization is not None else template.sample
        try:
            return mailer.renderer.render(template, layout, {
                "unsubscribe_url": f"{settings.ingest_public_url}/t/u/preview", **values})
        except RenderError as error:
            raise HTTPException(422, str(error)) from error

    @router.post("/templates/{template_id}/preview",
                 summary="Render for given values (or the template's sample values)")
    async def preview(template_id: str, body: Preview,
                      workspace: Workspace = default) -> dict[str, Any]:
        result = await rendered(template_id, workspace, body.personalization)
        return {"subject": result.subject, "html": result.html, "text": result.text,
                "locale": result.locale}

    @router.post("/templates/{template_id}/test", summary="Send a test to an address")
    async def send_test(template_id: str, body: TestSend,
                        workspace: Workspace = default) -> dict[str, Any]:
        if not valid_address(body.to):
            raise HTTPException(422, "not an email address")
        result = await rendered(template_id, workspace, body.personalization)
        raw = build(Envelope(message_id=f"test-{uuid.uuid4()}@leadwerk.localhost",
                             sender=settings.default_sender, to=body.to,
                             subject=f"[Test] {result.subject}", date=mailer.clock()),
                    result.html, result.text)
        outcome = await deps().relays["transactional"].send(
            parseaddr(settings.default_sender)[1], parseaddr(body.to)[1], raw)
        return {"outcome": outcome.kind, "smtp_code": outcome.code,
                "response": outcome.response}

    @router.get("/contacts/{contact_id}/messages", summary="The contact's message log")
    async def messages(contact_id: str, workspace: Workspace = default) -> dict[str, Any]:
        async with deps().pool.acquire() as connection:
            try:
                rows = await connection.fetch(
                    "SELECT command_id::text AS command_id, template_id, template_version, "
                    "class, to_address, state, reason, smtp_code, status, attempts, "
                    "message_id, created_at, sent_at, command->'origin' AS origin "
                    "FROM messages WHERE workspace = $1 AND contact_id = $2 "
                    "ORDER BY created_at", workspace, contact_id)
            except asyncpg.DataError as error:
                raise HTTPException(404, "no such contact") from error
        return {"contact_id": contact_id, "items": [
            {**{k: v for k, v in dict(r).items() if k not in {"created_at", "sent_at",
                                                               "origin"}},
             "origin": orjson.loads(r["origin"]) if r["origin"] else None,
             "created_at": r["created_at"].isoformat(),
             "sent_at": r["sent_at"].isoformat() if r["sent_at"] else None} for r in rows]}

    @router.get("/contacts/{contact_id}/consents", summary="The consent log and the state")
    async def consents(contact_id: str, workspace: Workspace = default) -> dict[str, Any]:
        async with deps().pool.acquire() as connection:
            try:
                rows = await connection.fetch(
                    "SELECT purpose, action, source, text_version, ip, at FROM consent_log "
                    "WHERE workspace = $1 AND contact_id = $2 ORDER BY id", workspace,
                    contact_id)
            except asyncpg.DataError as error:
                raise HTTPException(404, "no such contact") from error
        state: dict[str, str] = {}
        for r in rows:
            state[r["purpose"]] = r["action"]
        return {"contact_id": contact_id, "state": state, "log": [
            {**dict(r), "at": r["at"].isoformat()} for r in rows]}

    @router.post("/contacts/{contact_id}/consents", status_code=201,
                 summary="Record consent given or withdrawn elsewhere (CRM, phone, import)")
    async def record_consent(contact_id: str, change: ConsentChange,
                             workspace: Workspace = default) -> dict[str, Any]:
        async with deps().pool.acquire() as connection:
            try:
                await connection.execute(
                    "INSERT INTO consent_log (workspace, contact_id, purpose, action, source, "
                    "text_version, at) VALUES ($1, $2, $3, $4, $5, $6, $7)", workspace,
                    contact_id, change.purpose, change.action, f"api:{change.source}",
                    change.text_version, mailer.clock())
            except asyncpg.DataError as error:
                raise HTTPException(422, "contact_id is not a contact id") from error
            released = await release_held(connection, workspace, contact_id)
        if released:  # mail held for a consent is checked again
            assert mailer.delivery is not None  # noqa: S101 - set in start
            await mailer.delivery.deliver_many(released)
        return await consents(contact_id, workspace)

    @router.post("/bounces", summary="Asynchronous bounces and complaints: an RFC 3464 DSN "
                 "(multipart/report) or a JSON webhook {\"events\": [...]}")
    async def bounces(request: Request, workspace: Workspace = default) -> dict[str, Any]:
        body = await request.body()
        if len(body) > 1_000_000:
            raise HTTPException(413, "a bounce report is at most 1 MB")
        try:
            if request.headers.get("content-type", "").startswith("application/json"):
                reported = parse_webhook(orjson.loads(body))
            else:
                reported = parse_dsn(body)
        except (BounceFormatError, orjson.JSONDecodeError) as error:
            raise HTTPException(422, str(error)) from error
        assert mailer.delivery is not None  # noqa: S101 - set in start
        return {"items": await mailer.delivery.report(workspace, reported)}

    @router.get("/suppressions", summary="Addresses that get no (marketing) email")
    async def suppressions(workspace: Workspace = default) -> dict[str, Any]:
        async with deps().pool.acquire() as connection:
            rows = await connection.fetch(
                "SELECT address, reason, detail, created_at FROM suppressions "
                "WHERE workspace = $1 ORDER BY created_at DESC LIMIT 1000", workspace)
        return {"items": [{**dict(r), "created_at": r["created_at"].isoformat()}
                          for r in rows]}

    @router.post("/suppressions", status_code=201, summary="Suppress an address")
    async def add_suppression(body: Suppression,
                              workspace: Workspace = default) -> dict[str, Any]:
        if not valid_address(body.address):
            raise HTTPException(422, "not an email address")
        async with deps().pool.acquire() as connection:
            await suppress(connection, workspace, body.address, body.reason, body.detail)
        return {"address": parseaddr(body.address)[1].lower(), "reason": body.reason}

    @router.delete("/suppressions/{address}", status_code=204,
                   summary="Lift a manual or unsubscribe suppression")
    async def lift(address: str, workspace: Workspace = default) -> None:
        async with deps().pool.acquire() as connection:
            await connection.execute(
                "DELETE FROM suppressions WHERE workspace = $1 AND address = $2 "
                "AND reason IN ('manual', 'unsubscribed')", workspace, address.lower())

    return router
