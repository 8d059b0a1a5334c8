"""The workflow service: journeys API (port 8082) with the engine consumer and the timer
worker in the same process."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from leadwerk_platform.admin import AdminGuard, Workspace, document_body
from leadwerk_platform.conditions import parse_period
from leadwerk_platform.database import create_pool, reachable
from leadwerk_platform.health import health_router
from leadwerk_platform.kafka.consumer import ConsumerRuntime
from leadwerk_platform.kafka.producer import OutgoingMessage, Publisher
from leadwerk_platform.metrics import HttpMetricsMiddleware, metrics_router, new_registry
from leadwerk_platform.outbox import OutboxRelay, add_to_outbox
from leadwerk_workflow.consumers import TOPICS, ContactEventHandler
from leadwerk_workflow.domain.journey import parse
from leadwerk_workflow.engine import (
    OUTBOX_STREAM,
    Deps,
    Engine,
    JourneyStore,
    loads,
    shipped_journeys,
    shipped_teams,
)
from leadwerk_workflow.metrics import WorkflowMetrics
from leadwerk_workflow.migration import MigrationRule, migrate
from leadwerk_workflow.settings import WorkflowSettings
from leadwerk_workflow.timers import TimerWorker
from leadwerk_workflow.triggers import Triggers

SCHEMA = "workflow"


def utcnow() -> datetime:
    return datetime.now(UTC)


class Workflow:
    """The process: pool, publisher, outbox relay, engine consumer, timer worker."""

    def __init__(self, settings: WorkflowSettings, clock: Callable[[], datetime]) -> None:
        self.settings = settings
        self.clock = clock
        self.registry = new_registry()
        self.metrics = WorkflowMetrics(self.registry)
        self.publisher = Publisher(settings, "workflow")
        self.journeys = JourneyStore()
        self.deps: Deps | None = None
        self.engine: Engine | None = None
        self.triggers: Triggers | None = None
        self.timers: TimerWorker | None = None
        self.relay: OutboxRelay | None = None
        self.consumer: ConsumerRuntime | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._consumer_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        pool = await create_pool(self.settings, SCHEMA, self.settings.database_pool_size)
        await self.publisher.start(wait=5.0)
        teams = await asyncio.to_thread(shipped_teams, self.settings.config_dir)
        self.deps = deps = Deps(self.settings, pool, self.publisher, self.metrics, self.clock,
                                teams)
        self.engine = Engine(deps, self.journeys)
        self.triggers = Triggers(self.engine)
        self.relay = OutboxRelay(pool, self.publisher, schema=SCHEMA, stream=OUTBOX_STREAM)
        shipped = await asyncio.to_thread(shipped_journeys, self.settings.config_dir / "journeys")
        workspace = self.settings.default_workspace
        async with pool.acquire() as connection:
            for journey_id in await self.journeys.seed(connection, workspace, shipped,
                                                       teams=set(teams.teams)):
                await self.arm(connection, workspace, journey_id)
        self.timers = TimerWorker(deps, self.engine, self.relay, self.triggers)
        handler = ContactEventHandler(deps, self.engine, self.relay, self.triggers,
                                      self.timers)
        self.consumer = ConsumerRuntime(
            self.settings, group_id=f"{self.settings.kafka_topic_prefix}workflow.engine",
            topics=TOPICS, handler=handler, batch_handler=handler.batch,
            dead_letter_publisher=self.publisher, metrics=self.metrics.consumers)
        self._consumer_task = asyncio.create_task(self.consumer.run())
        self._tasks = [asyncio.create_task(self.relay.sweep()),
                       asyncio.create_task(self.timers.run())]

    async def stop(self) -> None:
        if self.consumer is not None and self._consumer_task is not None:
            self.consumer.stop()  # finishes the message in hand, commits, leaves the group
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._consumer_task, 10)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.publisher.stop()
        if self.deps is not None:
            await self.deps.pool.close()

    async def arm(self, connection: asyncpg.Connection, workspace: str,
                  journey_id: str) -> int:
        """A journey just became active: arm its date, silence or segment trigger for the
        contacts already known. Returns how many timers were set."""
        assert self.triggers is not None  # noqa: S101 - set in start
        version = await connection.fetchval(
            "SELECT active_version FROM journey_status WHERE workspace = $1 AND journey_id = $2 "
            "AND status = 'active'", workspace, journey_id)
        if version is None:
            return 0
        journey = await self.journeys.version(connection, workspace, journey_id, version)
        if not journey.trigger.armed_at_activation:
            return 0
        armed = await self.triggers.arm_all(connection, workspace, journey)
        if self.timers is not None:
            self.timers.wake()
        return armed

    async def database_ready(self) -> bool:
        return await reachable(self.deps.pool if self.deps is not None else None)

    async def consumer_ready(self) -> bool:
        tasks = [*self._tasks, *([self._consumer_task] if self._consumer_task else [])]
        return bool(tasks) and all(not t.done() for t in tasks)




class Enrollment(BaseModel):
    contact_id: str


def create_app(settings: WorkflowSettings, *,
               clock: Callable[[], datetime] = utcnow) -> FastAPI:
    workflow = Workflow(settings, clock)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await workflow.start()
        try:
            yield
        finally:
            await workflow.stop()

    app = FastAPI(title="Leadwerk workflow", version="1", lifespan=lifespan,
                  description="Journeys, enrollments and their history. Every /api route "
                              "needs the admin token as a Bearer token.")
    app.state.workflow = workflow
    app.add_middleware(HttpMetricsMiddleware, metrics=workflow.metrics.http)
    app.include_router(health_router({"kafka": workflow.publisher.check,
                                      "database": workflow.database_ready,
                                      "engine": workflow.consumer_ready}))
    app.include_router(metrics_router(workflow.registry))
    app.include_router(_router(workflow, settings))
    return app


def _router(workflow: Workflow, settings: WorkflowSettings) -> APIRouter:  # noqa: PLR0915
    router = APIRouter(prefix="/api", tags=["journeys"],
                       dependencies=[Depends(AdminGuard(settings.admin_token.get_secret_value()))])
    default = settings.default_workspace

    def deps() -> Deps:
        if workflow.deps is None:
            raise HTTPException(503, "starting")
        return workflow.deps

    @router.get("/journeys", summary="Journeys with status and versions")
    async def list_journeys(workspace: Workspace = default) -> dict[str, Any]:
        async with deps().pool.acquire() as connection:
            rows = await connection.fetch(
                "SELECT s.journey_id, s.status, s.active_version, max(j.version) AS latest "
                "FROM journey_status s JOIN journeys j USING (workspace, journey_id) "
                "WHERE s.workspace = $1 GROUP BY s.journey_id, s.status, s.active_version "
                "ORDER BY s.journey_id", workspace)
        return {"items": [dict(r) for r in rows]}

    @router.get("/journeys/{journey_id}", summary="The latest version and the status")
    async def get_journey(journey_id: str, workspace: Workspace = default) -> dict[str, Any]:
        async with deps().pool.acquire() as connection:
            status = await connection.fetchrow(
                "SELECT status, active_version FROM journey_status WHERE workspace = $1 "
                "AND journey_id = $2", workspace, journey_id)
            if status is None:
                raise HTTPException(404, "no such journey")
            rows = await connection.fetch(
                "SELECT version, document, actor, created_at FROM journeys WHERE workspace = $1 "
                "AND journey_id = $2 ORDER BY version DESC", workspace, journey_id)
        return {"journey": loads(rows[0]["document"]), "status": status["status"],
                "active_version": status["active_version"],
                "versions": [{"version": r["version"], "actor": r["actor"],
                              "created_at": r["created_at"].isoformat()} for r in rows]}

    def teams() -> set[str]:
        return set(deps().teams.teams)

    async def templates(workspace: str) -> tuple[set[str] | None, list[str]]:
        """The mailer's template names, or ``None`` and a warning when it cannot be asked."""
        url = f"{settings.mailer_url.rstrip('/')}/api/templates"
        try:
            async with httpx.AsyncClient(timeout=3) as client:
                answer = await client.get(url, params={"workspace": workspace}, headers={
                    "Authorization": f"Bearer {settings.admin_token.get_secret_value()}"})
            answer.raise_for_status()
            return {str(t["template_id"]) for t in answer.json()["items"]
                    if t.get("kind") != "layout"}, []
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as error:
            return None, [f"templates not checked: the mailer at {settings.mailer_url} did "
                          f"not answer ({type(error).__name__})"]

    @router.post("/journeys/validate", summary="Check a journey without storing it")
    async def validate(request: Request, workspace: Workspace = default) -> dict[str, Any]:
        known, warnings = await templates(workspace)
        _, problems = parse(await document_body(request, "a journey"), known, teams())
        return {"valid": not problems, "problems": [p.to_dict() for p in problems],
                "warnings": warnings}

    @router.put("/journeys/{journey_id}", summary="Create or edit (a new version)")
    async def put_journey(journey_id: str, request: Request,
                          workspace: Workspace = default) -> JSONResponse:
        document = {**await document_body(request, "a journey"), "id": journey_id}
        document.pop("status", None)
        known, warnings = await templates(workspace)
        journey, problems = parse(document, known, teams())
        if journey is None:
            return JSONResponse({"detail": "invalid journey",
                                 "problems": [p.to_dict() for p in problems]}, status_code=422)
        async with deps().pool.acquire() as connection:
            stored = await workflow.journeys.save(connection, workspace, journey, actor="api")
            await workflow.arm(connection, workspace, stored.id)
        return JSONResponse({"journey_id": stored.id, "version": stored.version,
                             "warnings": warnings}, status_code=201)

    async def set_status(journey_id: str, workspace: str, status: str) -> dict[str, Any]:
        async with deps().pool.acquire() as connection:
            if not await workflow.journeys.set_status(connection, workspace, journey_id,
                                                      status):
                raise HTTPException(404, "no such journey")
            await workflow.arm(connection, workspace, journey_id)
        return await get_journey(journey_id, workspace)

    @router.post("/journeys/{journey_id}/activate", summary="New entries use the latest version")
    async def activate(journey_id: str, workspace: Workspace = default) -> dict[str, Any]:
        return await set_status(journey_id, workspace, "active")

    @router.post("/journeys/{journey_id}/pause", summary="No new entries; those inside go on")
    async def pause(journey_id: str, workspace: Workspace = default) -> dict[str, Any]:
        return await set_status(journey_id, workspace, "paused")

    @router.post("/journeys/{journey_id}/enroll", summary="Manual enrollment", status_code=201)
    async def enroll(journey_id: str, enrollment: Enrollment,
                     workspace: Workspace = default) -> dict[str, Any]:
        assert workflow.engine is not None  # noqa: S101 - set in the lifespan
        assert workflow.relay is not None  # noqa: S101
        outgoing: list[OutgoingMessage] = []
        async with deps().pool.acquire() as connection, connection.transaction():
            version = await connection.fetchval(
                "SELECT coalesce(active_version, (SELECT max(version) FROM journeys WHERE "
                "workspace = $1 AND journey_id = $2)) FROM journey_status WHERE workspace = $1 "
                "AND journey_id = $2", workspace, journey_id)
            if version is None:
                raise HTTPException(404, "no such journey")
            journey = await workflow.journeys.version(connection, workspace, journey_id, version)
            enrollment_id = await workflow.engine.enroll(
                connection, workspace, journey, enrollment.contact_id, reason="manual (API)",
                outgoing=outgoing)
            if enrollment_id is None:
                raise HTTPException(409, "the journey's re-entry rule does not allow it now")
            await add_to_outbox(connection, OUTBOX_STREAM, outgoing)
        workflow.relay.request()
        if workflow.timers is not None:
            workflow.timers.wake()
        return {"enrollment_id": enrollment_id}

    @router.post("/journeys/{journey_id}/migrate",
                 summary="Move the contacts inside an old version to the active one")
    async def migrate_enrollments(journey_id: str, rule: MigrationRule,
                                  workspace: Workspace = default) -> JSONResponse:
        async with deps().pool.acquire() as connection:
            result = await migrate(connection, workflow.journeys, workspace, journey_id, rule,
                                   now=workflow.clock())
        if workflow.timers is not None:
            workflow.timers.wake()
        return JSONResponse(result.body, status_code=result.status)

    @router.get("/teams/{team}/assignments",
                summary="Leads and average rating per member over a period (fair routing)")
    async def team_assignments(team: str, period: str = "30d",
                               workspace: Workspace = default) -> dict[str, Any]:
        members = deps().teams.members(team)
        if not members:
            raise HTTPException(404, "no such team (config/teams.yaml)")
        try:
            since = workflow.clock() - parse_period(period)
        except ValueError as error:
            raise HTTPException(422, str(error)) from error
        async with deps().pool.acquire() as connection:
            rows = await connection.fetch(
                "SELECT owner, count(*) AS n, avg(value) AS average FROM assignments "
                "WHERE workspace = $1 AND pool = $2 AND at > $3 GROUP BY owner",
                workspace, f"team:{team}", since)
        found = {r["owner"]: r for r in rows}
        return {"team": team, "period": period, "members": [
            {"owner": m, "leads": found[m]["n"] if m in found else 0,
             "average_rating": round(found[m]["average"], 3) if m in found else None}
            for m in members]}

    @router.get("/journeys/{journey_id}/stats", summary="Entered, active per step, outcomes")
    async def stats(journey_id: str, workspace: Workspace = default) -> dict[str, Any]:
        async with deps().pool.acquire() as connection:
            states = await connection.fetch(
                "SELECT state, coalesce(end_reason, '') AS reason, count(*) AS n FROM enrollments "
                "WHERE workspace = $1 AND journey_id = $2 GROUP BY state, end_reason",
                workspace, journey_id)
            steps = await connection.fetch(
                "SELECT step, count(*) AS n FROM enrollments WHERE workspace = $1 AND "
                "journey_id = $2 AND state = 'active' GROUP BY step", workspace, journey_id)
            splits = await connection.fetch(
                "SELECT b.key AS step, b.value AS branch, count(*) AS n FROM enrollments, "
                "jsonb_each_text(branches) AS b WHERE workspace = $1 AND journey_id = $2 "
                "GROUP BY b.key, b.value", workspace, journey_id)
        return {
            "entered": sum(r["n"] for r in states),
            "active": sum(r["n"] for r in states if r["state"] == "active"),
            "completed": sum(r["n"] for r in states if r["state"] == "completed"),
            "exited": {r["reason"]: r["n"] for r in states if r["state"] == "exited"},
            "active_per_step": {r["step"]: r["n"] for r in steps},
            "splits": {f"{r['step']}.{r['branch']}": r["n"] for r in splits},
        }

    @router.get("/contacts/{contact_id}/journeys",
                summary="Every journey, step and decision for a contact, with reasons")
    async def contact_history(contact_id: str,
                              workspace: Workspace = default) -> dict[str, Any]:
        async with deps().pool.acquire() as connection:
            try:
                enrollments = await connection.fetch(
                    "SELECT enrollment_id::text AS enrollment_id, journey_id, version, state, "
                    "step, due_at, entered_at, ended_at, end_reason, branches FROM enrollments "
                    "WHERE workspace = $1 AND contact_id = $2 ORDER BY entered_at",
                    workspace, contact_id)
                history = await connection.fetch(
                    "SELECT enrollment_id::text AS enrollment_id, step_id, action, reason, at "
                    "FROM journey_history WHERE workspace = $1 AND contact_id = $2 ORDER BY id",
                    workspace, contact_id)
            except asyncpg.DataError as error:
                raise HTTPException(404, "no such contact") from error
        by_enrollment: dict[str, list[dict[str, Any]]] = {}
        for h in history:
            by_enrollment.setdefault(h["enrollment_id"], []).append(
                {"step": h["step_id"], "action": h["action"], "reason": h["reason"],
                 "at": h["at"].isoformat()})
        return {"contact_id": contact_id, "items": [
            {**{k: v for k, v in dict(e).items() if k not in {"due_at", "entered_at",
                                                               "ended_at", "branches"}},
             "due_at": e["due_at"].isoformat() if e["due_at"] else None,
             "entered_at": e["entered_at"].isoformat(),
             "ended_at": e["ended_at"].isoformat() if e["ended_at"] else None,
             "branches": loads(e["branches"]),
             "history": by_enrollment.get(e["enrollment_id"], [])} for e in enrollments]}

    return router
