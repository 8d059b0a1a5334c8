"""Routes behind the links in our emails: open pixel, click redirect, unsubscribe, opt-in.

Every token is verified (HMAC, :mod:`leadwerk_platform.tokens`); a forged or altered token
never produces an event and never redirects.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from leadwerk_ingest.domain.enrich import campaign_fields
from leadwerk_ingest.handlers import RequestFacts, client_facts, token_event
from leadwerk_ingest.pages import confirm_form, not_found, page, paragraph
from leadwerk_ingest.service import ApiError, RequestHead, read_body
from leadwerk_platform.envelope import derive_event_id, format_timestamp
from leadwerk_platform.tokens import EmailToken, InvalidTokenError, TokenKind

if TYPE_CHECKING:
    from fastapi import FastAPI

    from leadwerk_ingest.service import Ingest

PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
_NO_CACHE = {"Cache-Control": "no-store, no-cache, must-revalidate, private",
             "Pragma": "no-cache", "Expires": "0"}


def _once_id(workspace: str, kind: str, token: str) -> str:
    """Unsubscribing or confirming twice through the same link is one event."""
    return derive_event_id(workspace, f"{kind}:{hashlib.sha256(token.encode()).hexdigest()}")


def register(app: FastAPI, ingest: Ingest) -> None:  # noqa: PLR0915 - one closure per route
    def verify(kind: TokenKind, token: str) -> EmailToken | None:
        try:
            verified = ingest.signer.verify(kind, token)
        except InvalidTokenError:
            ingest.metrics.rejected.labels("invalid_token").inc()
            return None
        if verified.workspace not in ingest.config.workspaces:
            ingest.metrics.rejected.labels("invalid_token").inc()
            return None
        return verified

    def facts_of(request: Request) -> RequestFacts:
        return ingest.facts(RequestHead.from_scope(request.scope))

    def client(facts: RequestFacts, token: EmailToken) -> dict[str, Any]:
        workspace = ingest.config.workspaces[token.workspace]
        return client_facts(facts, {}, anonymize=workspace.anonymize_ip,
                            bot=ingest.bots.is_bot(facts.user_agent))

    async def open_pixel(request: Request) -> Response:
        token = verify(TokenKind.OPEN, request.path_params["token"])
        if token is not None:
            facts = facts_of(request)
            event = token_event("email_opened", token.workspace, token.contact_id, facts,
                                {"email_message_id": token.message_id,
                                 "client": client(facts, token)})
            try:
                await ingest.produce([event])
            except ApiError as error:
                return error.response()
        return Response(PIXEL, 200, _NO_CACHE, "image/gif")

    async def click(request: Request) -> Response:
        token = verify(TokenKind.CLICK, request.path_params["token"])
        if token is None or token.url is None:
            return not_found()
        facts = facts_of(request)
        event = token_event("email_clicked", token.workspace, token.contact_id,
                            facts, {
                                "email_message_id": token.message_id, "url": token.url,
                                "link_id": token.link_id, "client": client(facts, token),
                                "campaign": campaign_fields({}, None, page_url=token.url)})
        # A person is waiting for the page: redirect even when the broker is down. The lost
        # click is counted in leadwerk_ingest_events_rejected_total{reason="broker_unavailable"}.
        with contextlib.suppress(ApiError):
            await ingest.produce([event])
        return RedirectResponse(token.url, 302, headers=_NO_CACHE)

    async def unsubscribe(request: Request) -> Response:
        raw = request.path_params["token"]
        token = verify(TokenKind.UNSUBSCRIBE, raw)
        if token is None:
            return not_found()
        if request.method == "GET":
            return page("Abmelden / Unsubscribe", confirm_form(
                str(request.url.path), "Möchten Sie sich von diesen E-Mails abmelden? "
                "Do you want to unsubscribe from these emails?", "Abmelden / Unsubscribe"))
        try:
            body = (await read_body(request.receive, RequestHead.from_scope(request.scope),
                                    4096)).decode()
        except (ApiError, UnicodeDecodeError):
            body = ""
        one_click = ("List-Unsubscribe", "One-Click") in parse_qsl(body)
        method = "one-click" if one_click else "page"
        facts = facts_of(request)
        event = token_event("unsubscribed", token.workspace, token.contact_id,
                            facts, {
                                "email_message_id": token.message_id,
                                "purpose": token.purpose or "marketing", "method": method,
                                "client": client(facts, token)},
                            event_id=_once_id(token.workspace, "unsubscribe", raw))
        try:
            await ingest.produce([event])
        except ApiError as error:
            return page("Bitte später erneut versuchen / Please try again",
                        paragraph("Ihre Abmeldung konnte gerade nicht gespeichert werden. "
                                  "Your request could not be saved right now."),
                        503) if method == "page" else error.response()
        return page("Abgemeldet / Unsubscribed",
                    paragraph("Sie erhalten diese E-Mails nicht mehr. "
                              "You will no longer receive these emails."))

    async def confirm(request: Request) -> Response:
        raw = request.path_params["token"]
        token = verify(TokenKind.CONFIRM, raw)
        if token is None:
            return not_found()
        if request.method == "GET":
            return page("Anmeldung bestätigen / Confirm subscription", confirm_form(
                str(request.url.path), "Bitte bestätigen Sie Ihre Anmeldung. "
                "Please confirm your subscription.", "Bestätigen / Confirm"))
        facts = facts_of(request)
        event = token_event("optin_confirmed", token.workspace, token.contact_id,
                            facts, {
                                "email_message_id": token.message_id,
                                "purpose": token.purpose or "marketing",
                                "consent_text_version": token.consent_text_version,
                                "requested_at": format_timestamp(token.issued_at)
                                if token.issued_at else None,
                                "client": client(facts, token)},
                            event_id=_once_id(token.workspace, "confirm", raw))
        try:
            await ingest.produce([event])
        except ApiError:
            return page("Bitte später erneut versuchen / Please try again",
                        paragraph("Ihre Bestätigung konnte gerade nicht gespeichert werden. "
                                  "Your confirmation could not be saved right now."), 503)
        website = ingest.config.workspaces[token.workspace].website_url
        if website:
            return RedirectResponse(website, 303)
        return page("Bestätigt / Confirmed", paragraph("Vielen Dank! Thank you!"))

    app.router.add_route("/t/o/{token}", open_pixel, methods=["GET"])
    app.router.add_route("/t/c/{token}", click, methods=["GET"])
    app.router.add_route("/t/u/{token}", unsubscribe, methods=["GET", "POST"])
    app.router.add_route("/t/confirm/{token}", confirm, methods=["GET", "POST"])
