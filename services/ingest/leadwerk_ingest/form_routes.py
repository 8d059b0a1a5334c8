"""``POST /f/<form-id>``: HTML forms (urlencoded or JSON) become form-submitted events."""

from __future__ import annotations

import re
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import orjson
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from leadwerk_ingest.adapters.config import Form
from leadwerk_ingest.domain.enrich import campaign_fields
from leadwerk_ingest.handlers import Outgoing, client_facts, identity_key, request_event
from leadwerk_ingest.pages import not_found as not_found_page
from leadwerk_ingest.pages import page, paragraph
from leadwerk_ingest.service import (
    JSON_TYPE,
    ApiError,
    RequestHead,
    parse_json,
    preflight_response,
    read_body,
)
from leadwerk_platform.envelope import derive_event_id

if TYPE_CHECKING:
    from fastapi import FastAPI

    from leadwerk_ingest.service import Ingest

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_TRUE = {"on", "true", "1", "yes", "checked"}
ANONYMOUS_COOKIE = "lw_aid"
_MAX_FIELD = 2000


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).strip()[:_MAX_FIELD]


def _id(value: Any) -> str | None:
    """An identifier from the form: the tracking API's limit of 256 characters applies."""
    text = _text(value)
    return text[:256] if text else None


def form_event(ingest: Ingest, form: Form, fields: dict[str, Any],
               request: Request) -> Outgoing | None:
    """Validate and map a submission; None for a bot caught by the honeypot."""
    if form.honeypot and _text(fields.get(form.honeypot)):
        ingest.metrics.rejected.labels("honeypot").inc()
        return None
    problems = [{"field": name, "message": "required"} for name in form.required
                if not _text(fields.get(name))]
    email_field = form.email_source
    email = _text(fields.get(email_field)) if email_field else None
    if email:
        email = email.lower()
        if not _EMAIL.match(email):
            problems.append({"field": email_field or "email", "message": "not an email address"})
    if problems:
        ingest.metrics.rejected.labels("invalid").inc()
        raise ApiError(400, "invalid_form", "form submission rejected", problems)
    traits = {trait: _text(fields[name]) for name, trait in form.fields.items()
              if _text(fields.get(name))}
    if email:
        traits["email"] = email
    consents = [{"purpose": c.purpose, "given": (_text(fields.get(c.field)) or "").lower() in _TRUE,
                 "text_version": c.text_version, "double_opt_in": c.double_opt_in}
                for c in form.consents]
    anonymous_id = (_id(fields.get("anonymous_id")) or _id(request.cookies.get(ANONYMOUS_COOKIE))
                    or str(uuid.uuid4()))
    user_id = _id(fields.get("user_id"))
    message_id = _id(fields.get("message_id")) or str(uuid.uuid4())
    workspace = ingest.config.workspaces[form.workspace]
    facts = ingest.facts(RequestHead.from_scope(request.scope))
    page_url = _text(fields.get("page_url")) or request.headers.get("referer")
    context = {"page": {"url": page_url}} if page_url else {}
    data = {
        "message_id": message_id, "form_id": form.id, "anonymous_id": anonymous_id,
        "user_id": user_id, "email": email, "traits": traits, "consents": consents,
        "context": context,
        "client": client_facts(facts, {}, anonymize=workspace.anonymize_ip,
                               bot=ingest.bots.is_bot(facts.user_agent)),
        "campaign": campaign_fields(context, None, page_url=page_url),
    }
    return request_event("form_submitted", workspace.id,
                         identity_key(workspace.id, user_id, anonymous_id), facts, data,
                         event_id=derive_event_id(workspace.id, message_id))


def register(app: FastAPI, ingest: Ingest) -> None:
    async def submit(request: Request) -> Response:
        form = ingest.config.forms.get(request.path_params["form_id"])
        head = RequestHead.from_scope(request.scope)
        wants_json = "json" in head.content_type
        if form is None:
            error = ApiError(404, "unknown_form", "no such form")
            return error.response() if wants_json else not_found_page()
        workspace = ingest.config.workspaces[form.workspace]
        cors = ingest.cors(head, workspace)
        try:
            # Forms need no key, so each form gets its own bucket at the workspace's rate.
            ingest.rate_limit(f"form:{form.id}", workspace, 1)
            body = await read_body(request.receive, head, ingest.settings.max_event_bytes)
            fields = _parse_fields(body, wants_json)
            event = form_event(ingest, form, fields, request)
            if event is not None:
                await ingest.produce([event])
        except ApiError as error:
            if wants_json:
                return error.response(cors)
            items = "".join(f"<li>{paragraph(d['field'] + ': ' + d['message'])}</li>"
                            for d in error.details or [])
            return page("Formular nicht gesendet / Form not sent",
                        paragraph(error.message) + (f"<ul>{items}</ul>" if items else ""),
                        error.status)
        if wants_json:
            return Response(orjson.dumps({"success": True, "redirect": form.thank_you_url}),
                            200, cors, JSON_TYPE)
        if form.thank_you_url:
            return RedirectResponse(form.thank_you_url, 303)
        return page("Danke! / Thank you!", paragraph("Ihre Angaben sind angekommen."))

    async def preflight(request: Request) -> Response:
        form = ingest.config.forms.get(request.path_params["form_id"])
        head = RequestHead.from_scope(request.scope)
        cors = ingest.cors(head, ingest.config.workspaces[form.workspace]) if form else {}
        return preflight_response(cors, "Content-Type")

    app.router.add_route("/f/{form_id}", submit, methods=["POST"])
    app.router.add_route("/f/{form_id}", preflight, methods=["OPTIONS"])


def _parse_fields(body: bytes, wants_json: bool) -> dict[str, Any]:
    if wants_json:
        return parse_json(body)
    try:
        return dict(parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=200))
    except (UnicodeDecodeError, ValueError) as error:
        raise ApiError(400, "invalid_form", f"body is not a urlencoded form: {error}") from error
