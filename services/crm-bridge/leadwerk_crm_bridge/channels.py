"""Connectors behind one interface: a :class:`Channel` delivers a :class:`Batch` of
deliveries for one connector in as few requests as the CRM allows and says what happened.

Every request goes through :class:`Http`: the host is resolved once, every address is checked
against SSRF rules (unless the workspace allows private ones), and the request goes to that
IP with the original ``Host`` header and TLS server name; no redirects are followed; each
connector's rate limit is waited for.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx
import orjson

from leadwerk_crm_bridge.config import Connector
from leadwerk_crm_bridge.domain import hubspot, salesforce
from leadwerk_crm_bridge.domain.outbound import forbidden, sign
from leadwerk_platform.envelope import format_timestamp
from leadwerk_platform.ratelimit import RateLimit

USER_AGENT = "Leadwerk-crm-bridge/1"


@dataclass(frozen=True)
class Answer:
    status: int | None
    error: str | None
    retry_after: str | None = None
    #: Not worth retrying (refused by our own rules): dead at once, replayable after a fix.
    final: bool = False


@dataclass(frozen=True)
class Item:
    delivery_id: str
    contact_id: str
    kind: str  # handoff | lifecycle | score | activity | profile | erasure | webhook
    url: str
    body: bytes  # the canonical event: {"type", "timestamp", "data"}

    @property
    def event(self) -> dict[str, Any]:
        event: dict[str, Any] = orjson.loads(self.body)
        return event


@dataclass(frozen=True)
class Batch:
    batch_id: str
    workspace: str
    connector: Connector | None  # None: a journey's webhook step (its own URL)
    items: list[Item]
    crm_ids: dict[str, str] = field(default_factory=dict)  # contact id → CRM record id


@dataclass(frozen=True)
class Outcome:
    answer: Answer
    failed: dict[str, str] = field(default_factory=dict)  # delivery id → why, for good
    crm_ids: dict[str, str] = field(default_factory=dict)  # learned contact → CRM id


class Channel(Protocol):
    async def deliver(self, batch: Batch) -> Outcome: ...


class Http:
    """Outbound HTTP with the SSRF check on the address connected to."""

    def __init__(self, client: httpx.AsyncClient, allow_private: frozenset[str]) -> None:
        self._client = client
        self._allow_private = allow_private
        self._limits: dict[str, RateLimit] = {}

    def limit(self, key: str, connector: Connector | None) -> RateLimit | None:
        rate = connector.limit if connector is not None else None
        if rate is None:
            return None
        if key not in self._limits:
            self._limits[key] = RateLimit(0.0, rate.requests, rate.per_seconds)
        return self._limits[key]

    async def call(self, workspace: str, method: str, url: str, *,
                   headers: Mapping[str, str], content: bytes,
                   connector: Connector | None = None) -> httpx.Response | Answer:
        try:
            parts = urlsplit(url)
            host = parts.hostname or ""
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as error:
            return Answer(None, f"invalid URL: {error}", final=True)
        if "Authorization" in headers and parts.scheme != "https" \
                and workspace not in self._allow_private:
            return Answer(None, "credentials go over https only", final=True)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM)
        except OSError as error:
            return Answer(None, f"cannot resolve {host}: {error}")
        address = str(infos[0][4][0])
        if workspace not in self._allow_private:
            refusals = [r for r in (forbidden(str(i[4][0])) for i in infos) if r]
            if refusals:
                return Answer(None, f"refused (SSRF protection): {refusals[0]}", final=True)
        netloc = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        target = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        limit = self.limit(f"{workspace}:{connector.id}" if connector else host, connector)
        if limit is not None:
            await limit.acquire()
        try:
            return await self._client.request(
                method, target, content=content,
                headers={"Host": parts.netloc.rpartition("@")[2], "User-Agent": USER_AGENT,
                         **headers},
                extensions={"sni_hostname": host} if parts.scheme == "https" else {})
        except httpx.HTTPError as error:
            return Answer(None, f"{type(error).__name__}: {error}" if str(error)
                          else type(error).__name__)


def answer_of(response: httpx.Response | Answer) -> Answer:
    if isinstance(response, Answer):
        return response
    return Answer(response.status_code, None if response.is_success
                  else _error_text(response), response.headers.get("retry-after"))


def _error_text(response: httpx.Response) -> str | None:
    """A short reason from an error answer's body (never more than 300 characters)."""
    text = response.text.strip()
    return f"HTTP {response.status_code}: {text[:300]}" if text else None


class WebhookChannel:
    """Standard Webhooks: one signed POST per delivery; activities for a connector go as one
    ``contact.activities`` event per batch (each item keeps its own id). The ``webhook-id``
    is the batch id: a single delivery's own id, stable across retries and replays."""

    def __init__(self, http: Http, secrets: Callable[[], list[str]],
                 clock: Callable[[], datetime]) -> None:
        self._http = http
        self._secrets = secrets
        self._clock = clock

    async def deliver(self, batch: Batch) -> Outcome:
        secrets = self._secrets()
        if not secrets:
            return Outcome(Answer(None, "no webhook secret configured "
                                        "(LEADWERK_WEBHOOK_SECRETS)", final=True))
        if len(batch.items) == 1:
            body, url = batch.items[0].body, batch.items[0].url
        else:
            url = batch.items[0].url
            body = orjson.dumps({
                "type": "contact.activities", "timestamp": format_timestamp(self._clock()),
                "data": {"items": [{"id": i.delivery_id, **i.event} for i in batch.items]}})
        headers = {"Content-Type": "application/json",
                   **sign(secrets, batch.batch_id, self._clock(), body)}
        response = await self._http.call(batch.workspace, "POST", url, headers=headers,
                                         content=body, connector=batch.connector)
        return Outcome(answer_of(response))


class HubSpotChannel:
    """HubSpot CRM v3 with a private-app token: contacts batch-upserted by email (score,
    grade, rating, lifecycle stage, lead status, owner, mapped traits), the hand-off and
    selected activities as notes on the contact's timeline, erasure as a GDPR delete."""

    def __init__(self, http: Http, token: Callable[[Connector], str | None]) -> None:
        self._http = http
        self._token = token

    async def deliver(self, batch: Batch) -> Outcome:
        connector = batch.connector
        assert connector is not None  # noqa: S101 - HubSpot batches always have one
        token = self._token(connector)
        if not token:
            return Outcome(Answer(None, f"no HubSpot token: set the environment variable "
                                        f"named in secrets.token of {connector.id}",
                                  final=True))
        call = _Calls(self._http, batch, token)
        if batch.items[0].kind == "erasure":
            return await call.erase(batch.items[0])
        failed: dict[str, str] = {}
        ids = dict(batch.crm_ids)
        # Contacts first: every contact change, and any contact a note needs an id for.
        needs = [i for i in batch.items if i.kind != "activity" or i.contact_id not in ids]
        inputs: dict[str, dict[str, Any]] = {}
        for item in needs:
            data = item.event["data"]
            upsert = hubspot.upsert_input(connector, data.get("contact") or {},
                                          item.delivery_id)
            if upsert is None:
                failed[item.delivery_id] = "the contact has no email (HubSpot matches on it)"
            else:
                inputs.setdefault(upsert["id"].lower(), upsert)
        learned: dict[str, str] = {}
        if inputs:
            response = await call.post("/crm/v3/objects/contacts/batch/upsert",
                                       {"inputs": list(inputs.values())})
            if isinstance(response, Answer):
                return Outcome(response, failed)
            found = hubspot.ids_by_email(response)
            problem = hubspot.errors(response) or "HubSpot did not upsert the contact"
            for item in needs:
                email = str(((item.event["data"].get("contact") or {}).get("traits") or {})
                            .get("email") or "").lower()
                if email in found:
                    learned[item.contact_id] = ids[item.contact_id] = found[email]
                elif item.delivery_id not in failed:
                    failed[item.delivery_id] = problem
        notes = [(item.delivery_id, self._note(item, ids[item.contact_id]))
                 for item in batch.items if item.kind in {"handoff", "activity"}
                 and item.delivery_id not in failed and item.contact_id in ids]
        refused = await self._create_notes(call, notes, failed) if notes else None
        return Outcome(refused or Answer(200, None), failed, learned)

    @staticmethod
    async def _create_notes(call: _Calls, notes: list[tuple[str, dict[str, Any]]],
                            failed: dict[str, str]) -> Answer | None:
        """The notes in one request; a 207 fails the notes it names (by trace id), or every
        note when it names none."""
        response = await call.post("/crm/v3/objects/notes/batch/create",
                                   {"inputs": [n for _, n in notes]})
        if isinstance(response, Answer):
            return response
        if response.get("errors"):
            named = str(response["errors"])
            refused = [d for d, _ in notes if d in named] or [d for d, _ in notes]
            failed.update(dict.fromkeys(refused, "HubSpot refused the note: "
                                        + hubspot.errors(response)))
        return None

    @staticmethod
    def _note(item: Item, hubspot_id: str) -> dict[str, Any]:
        event = item.event
        data = event["data"]
        if item.kind == "handoff":
            return hubspot.note_input(hubspot_id, event["timestamp"],
                                      hubspot.handoff_note(data), item.delivery_id)
        return hubspot.note_input(hubspot_id, str(data.get("occurred_at") or
                                                  event["timestamp"]),
                                  str(data.get("label") or data.get("event")), item.delivery_id)


class _Calls:
    """The HubSpot requests of one batch."""

    def __init__(self, http: Http, batch: Batch, token: str) -> None:
        assert batch.connector is not None  # noqa: S101
        self._http, self._batch, self._connector = http, batch, batch.connector
        self._headers = {"Authorization": f"Bearer {token}",
                         "Content-Type": "application/json"}

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any] | Answer:
        """The JSON answer of a successful call, else the :class:`Answer` to judge."""
        response = await self._http.call(
            self._batch.workspace, "POST", self._connector.url.rstrip("/") + path,
            headers=self._headers, content=orjson.dumps(body), connector=self._connector)
        if isinstance(response, Answer) or not response.is_success:
            return answer_of(response)
        try:
            result = response.json() if response.content else {}
        except ValueError:
            return Answer(response.status_code, "HubSpot answered with invalid JSON")
        return result if isinstance(result, dict) else {}

    async def erase(self, item: Item) -> Outcome:
        data = item.event["data"]
        crm_id = self._batch.crm_ids.get(item.contact_id)
        email = data.get("email")
        if crm_id is None and not email:
            return Outcome(Answer(204, None))  # HubSpot never heard of this contact
        body = {"objectId": crm_id} if crm_id else {"objectId": email, "idProperty": "email"}
        response = await self.post("/crm/v3/objects/contacts/gdpr-delete", body)
        if isinstance(response, Answer) and response.status == 404:
            return Outcome(Answer(204, None))  # already gone
        return Outcome(response if isinstance(response, Answer) else Answer(204, None))


class SalesforceChannel:
    """Salesforce REST with the OAuth 2.0 client-credentials flow (the token is cached per
    connector and fetched again once on a 401): Leads (or the configured object) upserted by
    the external id field through sObject Collections, the hand-off and selected activities
    as completed Tasks on the record, erasure as a delete by external id."""

    def __init__(self, http: Http,
                 secret: Callable[[Connector, Literal["client_id", "client_secret"]],
                                  str | None]) -> None:
        self._http = http
        self._secret = secret
        self._tokens: dict[str, tuple[str, str]] = {}  # connector → (token, instance URL)

    async def deliver(self, batch: Batch) -> Outcome:
        connector = batch.connector
        assert connector is not None  # noqa: S101 - Salesforce batches always have one
        if batch.items[0].kind == "erasure":
            item = batch.items[0]
            response = await self._api(batch, "DELETE", f"/sobjects/{connector.sobject}/"
                                       f"{connector.external_id_field}/{item.contact_id}")
            answer = answer_of(response)
            return Outcome(Answer(204, None) if answer.status == 404 else answer)
        failed: dict[str, str] = {}
        ids = dict(batch.crm_ids)
        needs = [i for i in batch.items if i.kind != "activity" or i.contact_id not in ids]
        records: dict[str, dict[str, Any]] = {}
        for item in needs:
            records.setdefault(item.contact_id, salesforce.lead_record(
                connector, item.event["data"].get("contact") or {}, item.contact_id))
        learned: dict[str, str] = {}
        if records:
            response = await self._api(
                batch, "PATCH", f"/composite/sobjects/{connector.sobject}/"
                f"{connector.external_id_field}",
                {"allOrNone": False, "records": list(records.values())})
            if isinstance(response, Answer) or not response.is_success:
                return Outcome(answer_of(response))
            outcome = dict(zip(records, salesforce.results(_json(response), len(records)),
                               strict=True))
            for item in needs:
                record_id, error = outcome[item.contact_id]
                if record_id is not None:
                    learned[item.contact_id] = ids[item.contact_id] = record_id
                else:
                    failed[item.delivery_id] = str(error)
        tasks = [(item, self._task(item, ids[item.contact_id])) for item in batch.items
                 if item.kind in {"handoff", "activity"} and item.delivery_id not in failed
                 and item.contact_id in ids]
        if tasks:
            response = await self._api(batch, "POST", "/composite/sobjects", {
                "allOrNone": False, "records": [t for _, t in tasks]})
            if isinstance(response, Answer) or not response.is_success:
                return Outcome(answer_of(response), failed, learned)
            for (item, _), (_, error) in zip(
                    tasks, salesforce.results(_json(response), len(tasks)), strict=True):
                if error is not None:
                    failed[item.delivery_id] = error
        return Outcome(Answer(200, None), failed, learned)

    @staticmethod
    def _task(item: Item, who_id: str) -> dict[str, Any]:
        event = item.event
        data = event["data"]
        when = str(data.get("occurred_at") or event["timestamp"])[:10]
        if item.kind == "handoff":
            return salesforce.task_record(who_id, subject="Leadwerk hand-off: "
                                          f"{data.get('reason') or 'sales-ready'}",
                                          description=salesforce.handoff_description(data),
                                          date=when)
        return salesforce.task_record(who_id, subject=str(data.get("label") or "activity"),
                                      description=None, date=when)

    async def _token(self, batch: Batch, *, fresh: bool) -> tuple[str, str] | Answer:
        connector = batch.connector
        assert connector is not None  # noqa: S101
        key = f"{batch.workspace}:{connector.id}"
        if key in self._tokens and not fresh:
            return self._tokens[key]
        client_id = self._secret(connector, "client_id")
        client_secret = self._secret(connector, "client_secret")
        if not client_id or not client_secret:
            return Answer(None, "no Salesforce client credentials: set the environment "
                                f"variables named in secrets of {connector.id}", final=True)
        response = await self._http.call(
            batch.workspace, "POST", connector.url.rstrip("/") + "/services/oauth2/token",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            content=urlencode({"grant_type": "client_credentials", "client_id": client_id,
                               "client_secret": client_secret}).encode(),
            connector=connector)
        if isinstance(response, Answer) or not response.is_success:
            return answer_of(response)
        document = _json(response)
        if not isinstance(document, dict) or not document.get("access_token"):
            return Answer(response.status_code, "the token answer has no access_token")
        instance = str(document.get("instance_url") or connector.url)
        if not _salesforce_host(instance, connector.url):
            return Answer(response.status_code, f"refused instance_url {instance}: an https "
                          "URL under salesforce.com or force.com (or the login host) is "
                          "expected", final=True)
        self._tokens[key] = (str(document["access_token"]), instance)
        return self._tokens[key]

    async def _api(self, batch: Batch, method: str, path: str,
                   body: dict[str, Any] | None = None) -> httpx.Response | Answer:
        connector = batch.connector
        assert connector is not None  # noqa: S101
        response: httpx.Response | Answer = Answer(None, "not sent")
        for fresh in (False, True):
            auth = await self._token(batch, fresh=fresh)
            if isinstance(auth, Answer):
                return auth
            token, instance = auth
            response = await self._http.call(
                batch.workspace, method,
                f"{instance.rstrip('/')}/services/data/{connector.api_version}{path}",
                headers={"Authorization": f"Bearer {token}",
                         "Content-Type": "application/json"},
                content=orjson.dumps(body) if body is not None else b"", connector=connector)
            if not (isinstance(response, httpx.Response) and response.status_code == 401):
                break  # an expired token gets one fresh one
        return response


def _salesforce_host(instance: str, login: str) -> bool:
    """Where the token may go: Salesforce's own hosts over https, or the login host itself
    (a sandbox or a local stand-in the workspace allowed)."""
    parts = urlsplit(instance)
    host = (parts.hostname or "").lower()
    if parts.netloc == urlsplit(login).netloc:
        return True
    return parts.scheme == "https" and (host.endswith((".salesforce.com", ".force.com"))
                                        or host in {"salesforce.com", "force.com"})


def _json(response: httpx.Response) -> Any:
    try:
        return response.json() if response.content else None
    except ValueError:
        return None
