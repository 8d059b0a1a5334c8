"""The scoring service: contacts API (port 8081) and, in the same process, the stream
processors this process is configured to run (``LEADWERK_SCORING_PROCESSORS``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

import yaml
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from leadwerk_platform.admin import AdminGuard, Workspace
from leadwerk_platform.database import create_pool, reachable
from leadwerk_platform.health import health_router
from leadwerk_platform.kafka.producer import Publisher
from leadwerk_platform.kafka.streams import StreamPolicy, StreamProcessor
from leadwerk_platform.metrics import HttpMetricsMiddleware, metrics_router, new_registry
from leadwerk_platform.outbox import OutboxRelay
from leadwerk_scoring import contacts
from leadwerk_scoring.adapters.config import declared_identifiers, default_model
from leadwerk_scoring.adapters.models import ModelStore
from leadwerk_scoring.domain.identity import EMAIL, USER, Identifier, clean_id, normalise_email
from leadwerk_scoring.domain.lifecycle import TransitionError
from leadwerk_scoring.domain.model import ScoringModel
from leadwerk_scoring.maintenance import RescoreProgress, Rescorer, Retention
from leadwerk_scoring.metrics import ScoringMetrics
from leadwerk_scoring.runtime import Deps
from leadwerk_scoring.scorer import DowngradeTimer, Scorer
from leadwerk_scoring.settings import ScoringSettings
from leadwerk_scoring.stitcher import Stitcher

logger = logging.getLogger(__name__)
SCHEMA = "scoring"


def utcnow() -> datetime:
    return datetime.now(UTC)


def _terminate(error: BaseException) -> None:
    """A processor gave up: stop the process (its orchestrator restarts it)."""
    logger.critical("stream processor failed; stopping the process", exc_info=error)
    os.kill(os.getpid(), signal.SIGTERM)


class Scoring:
    """The process: pool, publisher, relays, processors; built in the lifespan."""

    def __init__(self, settings: ScoringSettings, clock: Callable[[], datetime],
                 on_fatal: Callable[[BaseException], None]) -> None:
        self.settings = settings
        self.clock = clock
        self.on_fatal = on_fatal
        self.registry = new_registry()
        self.metrics = ScoringMetrics(self.registry)
        self.publisher = Publisher(settings, "scoring")
        self.models = ModelStore(default_model(settings.config_dir))
        self.deps: Deps | None = None
        self.processors: dict[str, StreamProcessor] = {}
        self.timer: DowngradeTimer | None = None
        self.rescorer: Rescorer | None = None
        self.retention: Retention | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.relays: dict[str, OutboxRelay] = {}

    async def start(self) -> None:
        pool = await create_pool(self.settings, SCHEMA, self.settings.database_pool_size)
        await self.publisher.start(wait=5.0)
        self.deps = deps = Deps(self.settings, pool, self.publisher, self.metrics, self.models,
                                declared_identifiers(self.settings.config_dir), self.clock)
        enabled = self.settings.enabled_processors()
        for stream in ("api", *enabled):
            self.relays[stream] = OutboxRelay(pool, self.publisher, schema=SCHEMA, stream=stream)
            self._tasks.append(asyncio.create_task(self.relays[stream].sweep()))
        self.rescorer = Rescorer(deps, self.relays["api"])
        if "stitcher" in enabled:
            self.retention = Retention(deps)
            self._tasks.append(asyncio.create_task(self.retention.run()))
        policy = StreamPolicy(batch_size=self.settings.batch_size,
                              batch_within=self.settings.batch_within)
        if "stitcher" in enabled:
            self.processors["stitcher"] = StreamProcessor(
                self.settings, group_id="scoring.stitcher",
                topics={"tracking-events": "tracking-events-dlq"},
                handler=Stitcher(deps, self.relays["stitcher"]), publisher=self.publisher,
                on_fatal=self.on_fatal, policy=policy, metrics=self.metrics.consumers)
        if "scorer" in enabled:
            self.timer = DowngradeTimer(deps, self.relays["scorer"])
            self._tasks.append(asyncio.create_task(self.timer.run()))
            self.processors["scorer"] = StreamProcessor(
                self.settings, group_id="scoring.scorer",
                topics={"contact-events": "contact-events-dlq", "crm-events": "crm-events-dlq",
                        "contact-commands": "contact-commands-dlq",
                        "email-events": "email-events-dlq"},
                handler=Scorer(deps, self.relays["scorer"], self.timer),
                publisher=self.publisher, on_fatal=self.on_fatal, policy=policy,
                metrics=self.metrics.consumers)
        for processor in self.processors.values():
            await processor.start()

    async def stop(self) -> None:
        if self.rescorer is not None:
            await self.rescorer.stop()
        for processor in self.processors.values():
            with contextlib.suppress(Exception):
                await processor.stop()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.publisher.stop()
        if self.deps is not None:
            await self.deps.pool.close()

    async def database_ready(self) -> bool:
        return await reachable(self.deps.pool if self.deps is not None else None)

    async def processors_ready(self) -> bool:
        return all(p.failed is None for p in self.processors.values())


class StageChange(BaseModel):
    stage: str = Field(description="lead, mql, sal, sql, customer, recycled or disqualified")
    reason: str | None = Field(None, description="Required for recycled and disqualified.")




def create_app(settings: ScoringSettings, *, clock: Callable[[], datetime] = utcnow,
               on_fatal: Callable[[BaseException], None] = _terminate) -> FastAPI:
    scoring = Scoring(settings, clock, on_fatal)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await scoring.start()
        try:
            yield
        finally:
            await scoring.stop()

    app = FastAPI(title="Leadwerk scoring", version="1", lifespan=lifespan,
                  description="Contacts, timelines, scores and lifecycle stages. Every "
                              "/api route needs the admin token as a Bearer token.")
    app.state.scoring = scoring
    app.add_middleware(HttpMetricsMiddleware, metrics=scoring.metrics.http)
    app.include_router(health_router({"kafka": scoring.publisher.check,
                                      "database": scoring.database_ready,
                                      "processors": scoring.processors_ready}))
    app.include_router(metrics_router(scoring.registry))
    app.include_router(_api_router(scoring, settings))
    return app


def _api_router(scoring: Scoring, settings: ScoringSettings) -> APIRouter:  # noqa: PLR0915
    admin = AdminGuard(settings.admin_token.get_secret_value())
    router = APIRouter(prefix="/api", dependencies=[Depends(admin)], tags=["contacts"])

    def deps() -> Deps:
        if scoring.deps is None:
            raise HTTPException(503, "starting")
        return scoring.deps

    async def document(workspace: str, contact_id: str) -> dict[str, Any]:
        async with deps().pool.acquire() as connection:
            try:
                return await contacts.contact_document(deps(), connection, workspace,
                                                       _uuid(contact_id))
            except contacts.NotFoundError as error:
                raise HTTPException(404, "no such contact") from error

    @router.get("/contacts", summary="Find a contact by an identifier")
    async def find_contacts(request: Request,
                            workspace: Workspace = settings.default_workspace,
                            ) -> dict[str, Any]:
        """Query by ``email``, ``user_id``, ``anonymous_id`` or any declared identifier,
        e.g. ``/api/contacts?email=anna@example.de``."""
        filters = {k: v for k, v in request.query_params.items() if k != "workspace"}
        if len(filters) != 1:
            raise HTTPException(422, "give exactly one identifier, e.g. ?email=…")
        (name, raw), = filters.items()
        kind = {"email": EMAIL, "user_id": USER, "anonymous_id": "anonymous"}.get(name, name)
        value = normalise_email(raw) if kind == EMAIL else clean_id(raw)
        if value is None:
            raise HTTPException(422, f"{name} is not a usable identifier")
        async with deps().pool.acquire() as connection:
            found = await contacts.find(connection, workspace, Identifier(kind, value))
        items = [await document(workspace, found)] if found else []
        return {"items": items}

    @router.get("/contacts/{contact_id}", summary="A contact with score, stage, attribution")
    async def get_contact(contact_id: str,
                          workspace: Workspace = settings.default_workspace) -> dict[str, Any]:
        return await document(workspace, contact_id)

    @router.get("/contacts/{contact_id}/timeline", summary="The contact's events, newest first")
    async def get_timeline(contact_id: str, workspace: Workspace = settings.default_workspace,
                           limit: Annotated[int, Query(ge=1, le=500)] = 50,
                           offset: Annotated[int, Query(ge=0)] = 0) -> dict[str, Any]:
        current = (await document(workspace, contact_id))["id"]
        async with deps().pool.acquire() as connection:
            items = await contacts.timeline(connection, workspace, current, limit=limit,
                                            offset=offset)
        return {"contact_id": current, "items": items, "limit": limit, "offset": offset,
                "next_offset": offset + limit if len(items) == limit else None}

    @router.get("/contacts/{contact_id}/score-history",
                summary="Why the score is what it is (rules, events, stage history)")
    async def get_score_history(contact_id: str,
                                workspace: Workspace = settings.default_workspace,
                                ) -> dict[str, Any]:
        current = (await document(workspace, contact_id))["id"]
        async with deps().pool.acquire() as connection:
            return await contacts.score_history(deps(), connection, workspace, current)

    @router.get("/contacts/{contact_id}/export", summary="GDPR export: everything held")
    async def export(contact_id: str,
                     workspace: Workspace = settings.default_workspace) -> dict[str, Any]:
        async with deps().pool.acquire() as connection:
            try:
                return await contacts.export(deps(), connection, workspace, _uuid(contact_id))
            except contacts.NotFoundError as error:
                raise HTTPException(404, "no such contact") from error

    @router.delete("/contacts/{contact_id}", summary="GDPR erasure", status_code=200)
    async def erase(contact_id: str,
                    workspace: Workspace = settings.default_workspace) -> dict[str, Any]:
        async with deps().pool.acquire() as connection:
            try:
                erased = await contacts.erase(deps(), connection, workspace, _uuid(contact_id))
            except contacts.NotFoundError as error:
                raise HTTPException(404, "no such contact") from error
        await scoring.relays["api"].flush()
        return {"erased": erased}

    @router.post("/contacts/{survivor_id}/merge/{merged_id}",
                 summary="Merge contact b into contact a (recorded, published)")
    async def merge(survivor_id: str, merged_id: str,
                    workspace: Workspace = settings.default_workspace) -> dict[str, Any]:
        async with deps().pool.acquire() as connection:
            try:
                await contacts.merge(deps(), connection, workspace,
                                     survivor=_uuid(survivor_id), merged=_uuid(merged_id),
                                     actor="api")
            except contacts.NotFoundError as error:
                raise HTTPException(404, f"no such contact: {error}") from error
            except ValueError as error:
                raise HTTPException(409, str(error)) from error
        await scoring.relays["api"].flush()
        return await document(workspace, survivor_id)

    @router.post("/contacts/{contact_id}/stage", summary="Set the lifecycle stage")
    async def set_stage(contact_id: str, change: StageChange,
                        workspace: Workspace = settings.default_workspace) -> dict[str, Any]:
        async with deps().pool.acquire() as connection:
            try:
                await contacts.change_stage(deps(), connection, workspace, _uuid(contact_id),
                                            stage=change.stage, reason=change.reason)
            except contacts.NotFoundError as error:
                raise HTTPException(404, "no such contact") from error
            except TransitionError as error:
                raise HTTPException(422, str(error)) from error
        await scoring.relays["api"].flush()
        return await document(workspace, contact_id)

    @router.get("/scoring-model", tags=["scoring model"], summary="The model in force")
    async def get_model(workspace: Workspace = settings.default_workspace) -> dict[str, Any]:
        async with deps().pool.acquire() as connection:
            model = await scoring.models.current(connection, workspace)
            versions = await scoring.models.versions(connection, workspace)
        return {"model": model.model_dump(by_alias=True, exclude_none=True),
                "versions": [{**v, "created_at": v["created_at"].isoformat()}
                             for v in versions]}

    @router.put("/scoring-model", tags=["scoring model"],
                summary="Replace the model (JSON or YAML body); stored as a new version")
    async def put_model(request: Request,
                        workspace: Workspace = settings.default_workspace) -> JSONResponse:
        body = await request.body()
        try:
            document_ = yaml.safe_load(body)
            model = ScoringModel.model_validate({**(document_ or {}), "version": 0})
        except yaml.YAMLError as error:
            raise HTTPException(422, f"not JSON or YAML: {error}") from error
        except (ValidationError, TypeError) as error:
            problems = ([{"loc": list(e["loc"]), "msg": e["msg"]} for e in error.errors()]
                        if isinstance(error, ValidationError) else [{"msg": str(error)}])
            return JSONResponse({"detail": problems}, status_code=422)
        async with deps().pool.acquire() as connection:
            stored = await scoring.models.replace(connection, workspace, model, actor="api")
        return JSONResponse({"model": stored.model_dump(mode="json", by_alias=True,
                                                        exclude_none=True)}, status_code=201)

    @router.post("/scoring-model/rescore", tags=["scoring model"], status_code=202,
                 summary="Re-score every contact from its timeline under the model in force")
    async def start_rescore(workspace: Workspace = settings.default_workspace,
                            ) -> dict[str, Any]:
        assert scoring.rescorer is not None  # noqa: S101 - set in the lifespan
        return _progress(scoring.rescorer.start(workspace))

    @router.get("/scoring-model/rescore", tags=["scoring model"],
                summary="Progress of the running (or last) re-score")
    async def rescore_progress() -> dict[str, Any]:
        assert scoring.rescorer is not None  # noqa: S101 - set in the lifespan
        return _progress(scoring.rescorer.progress)

    return router


def _progress(progress: RescoreProgress) -> dict[str, Any]:
    return {"state": progress.state, "total": progress.total, "done": progress.done,
            "changed": progress.changed, "model_version": progress.model_version,
            "error": progress.error}


def _uuid(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError as error:
        raise HTTPException(404, "no such contact") from error
