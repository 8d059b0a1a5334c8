"""What the mailer consumes: email commands (group ``mailer.sender``) and, for the consent log
and the suppression list, contact events (group ``mailer.consent``)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from leadwerk_mailer.delivery import Delivery, Deps, address_digest, release_held, suppress
from leadwerk_platform.envelope import Envelope, InvalidMessageError
from leadwerk_platform.kafka.consumer import ConsumedMessage
from leadwerk_platform.tokens import EmailToken, TokenKind

COMMAND_TOPICS = {"email-commands": "email-commands-dlq"}
CONTACT_TOPICS = {"contact-events": "contact-events-dlq"}
#: The transactional template a double opt-in confirmation request uses.
CONFIRMATION_TEMPLATE = "optin-confirmation"
_NAMESPACE = uuid.UUID("0f3e9a7c-2b1d-5c4e-8f6a-9b8c7d6e5f4a")


class CommandHandler:
    def __init__(self, deps: Deps, delivery: Delivery) -> None:
        self._deps = deps
        self._delivery = delivery

    async def __call__(self, message: ConsumedMessage) -> None:
        await self.batch([message])

    async def batch(self, messages: Sequence[ConsumedMessage]) -> None:
        """A fetched batch: the commands recorded in one transaction, then delivered in one
        run over the SMTP connections. If anything fails the runtime comes again one by one,
        and the recorded states keep every command from going out twice."""
        commands = []
        for message in messages:
            command = message.envelope
            if command.type != "email.send_requested.v1":
                continue
            _check(command.data)
            self._deps.metrics.commands.labels(str(command.data["class"])).inc()
            commands.append(command)
        await self._delivery.deliver_many(await self._delivery.accept_many(commands))


def _check(data: dict[str, Any]) -> None:
    """What a command needs (email.send_requested.v1) before it can be recorded."""
    try:
        uuid.UUID(str(data.get("contact_id")))
    except ValueError as error:
        raise InvalidMessageError("an email command names a contact by its id") from error
    if not isinstance(data.get("template"), str) or not data["template"]:
        raise InvalidMessageError("an email command names a template")
    if data.get("class") not in {"marketing", "transactional", "internal"}:
        raise InvalidMessageError("an email command's class is marketing, transactional or "
                                  "internal")


class ConsentHandler:
    """The consent log from what contacts do: consents given on forms (pending until
    confirmed where double opt-in applies, with the confirmation email sent), confirmations,
    unsubscribes; erasure and merges."""

    def __init__(self, deps: Deps, delivery: Delivery) -> None:
        self._deps = deps
        self._delivery = delivery

    async def __call__(self, message: ConsumedMessage) -> None:
        event = message.envelope
        data = event.data
        match event.type, data.get("kind"):
            case "contact.activity.v1", "form_submitted":
                await self._form(event)
            case "contact.activity.v1", "optin_confirmed":
                await self._log(event, str(data.get("contact_id")), [(
                    str((data.get("properties") or {}).get("purpose") or "marketing"),
                    "confirmed", _text_version(data))])
            case "contact.activity.v1", "unsubscribed":
                await self._unsubscribed(event)
            case "contact.merged.v1", _:
                async with self._deps.pool.acquire() as connection, connection.transaction():
                    for table in ("consent_log", "messages"):
                        await connection.execute(
                            f"UPDATE {table} SET contact_id = $3 "  # noqa: S608 - fixed names
                            "WHERE workspace = $1 AND contact_id = $2", event.workspace,
                            data["merged_id"], data["survivor_id"])
            case "contact.erased.v1", _:
                await self._erased(event)

    async def _form(self, event: Envelope) -> None:
        data = event.data
        properties = data.get("properties") or {}
        consents = [c for c in properties.get("consents") or []
                    if isinstance(c, dict) and c.get("given") is True]
        if not consents:
            return
        contact_id = str(data["contact_id"])
        workspace = self._deps.workspaces.get(event.workspace)
        workspace_doi = workspace.double_opt_in if workspace is not None else True
        entries = [(str(c.get("purpose") or "marketing"),
                    "pending" if c.get("double_opt_in", True) or workspace_doi else "granted",
                    c.get("text_version")) for c in consents]
        fresh = await self._log(event, contact_id, entries,
                                source=f"form:{properties.get('form_id')}")
        address = properties.get("email")
        pending = [e for e in entries if e[1] == "pending"]
        if fresh and pending and isinstance(address, str):
            purpose, _, version = pending[0]
            await self._confirmation(event, contact_id, address, purpose, version)

    async def _confirmation(self, event: Envelope, contact_id: str, address: str,
                            purpose: str, version: str | None) -> None:
        """The double opt-in request: a transactional mail with the signed confirm link."""
        command_id = str(uuid.uuid5(_NAMESPACE, f"{event.id}\x1fconfirm"))
        token = self._deps.signer.sign(EmailToken(
            TokenKind.CONFIRM, event.workspace, contact_id, message_id=command_id,
            purpose=purpose, consent_text_version=version))
        base = self._deps.settings.ingest_public_url.rstrip("/")
        properties = event.data.get("properties") or {}
        traits = {k.removeprefix("traits."): v for k, v in properties.items()
                  if k.startswith("traits.")}
        command = Envelope(
            id=command_id, type="email.send_requested.v1", workspace=event.workspace,
            occurred_at=event.occurred_at, received_at=event.received_at, producer="mailer",
            correlation_id=event.id,
            data={"contact_id": contact_id, "template": CONFIRMATION_TEMPLATE,
                  "class": "transactional", "to": address, "sender": {"kind": "default"},
                  "personalization": {**traits, "confirm_url": f"{base}/t/confirm/{token}"},
                  "origin": {"consent": purpose, "form_id": properties.get("form_id")}})
        await self._delivery.deliver_many(await self._delivery.accept_many([command]))

    async def _unsubscribed(self, event: Envelope) -> None:
        data = event.data
        properties = data.get("properties") or {}
        contact_id = str(data["contact_id"])
        await self._log(event, contact_id, [(str(properties.get("purpose") or "marketing"),
                                             "withdrawn", None)],
                        source=f"unsubscribe:{properties.get('method') or 'link'}")
        async with self._deps.pool.acquire() as connection, connection.transaction():
            address = await connection.fetchval(
                "SELECT to_address FROM messages WHERE command_id::text = $1",
                str(properties.get("email_message_id") or ""))
            if address is None:  # the link of another message: the contact's latest address
                address = await connection.fetchval(
                    "SELECT to_address FROM messages WHERE workspace = $1 AND contact_id = $2 "
                    "AND class = 'marketing' ORDER BY created_at DESC LIMIT 1",
                    event.workspace, contact_id)
            if address:
                await suppress(connection, event.workspace, address, "unsubscribed",
                               f"event {event.id}")

    async def _erased(self, event: Envelope) -> None:
        """Forget the person: the message log goes, the addresses stay suppressed only as
        digests; the consent log keeps its entries with the address-free facts (proof that
        consent existed is the controller's legitimate interest) under the contact id."""
        ids = [str(event.data["contact_id"]),
               *[str(i) for i in event.data.get("merged_ids") or []]]
        async with self._deps.pool.acquire() as connection, connection.transaction():
            addresses = await connection.fetch(
                "DELETE FROM messages WHERE workspace = $1 AND contact_id = ANY($2::uuid[]) "
                "RETURNING to_address", event.workspace, ids)
            for address in {r["to_address"] for r in addresses if r["to_address"]}:
                await connection.execute(
                    "DELETE FROM suppressions WHERE workspace = $1 AND address = $2",
                    event.workspace, address.lower())
                await suppress(connection, event.workspace, address_digest(address), "erased")
            await connection.execute(
                "UPDATE consent_log SET ip = NULL WHERE workspace = $1 "
                "AND contact_id = ANY($2::uuid[])", event.workspace, ids)

    async def _log(self, event: Envelope, contact_id: str,
                   entries: list[tuple[str, str, Any]], source: str | None = None) -> bool:
        """Append to the consent log once per event (``False`` when already logged), then
        check the contact's held mail again."""
        properties = event.data.get("properties") or {}
        async with self._deps.pool.acquire() as connection, connection.transaction():
            fresh = await connection.fetchval(
                "INSERT INTO consent_events (event_id) VALUES ($1) ON CONFLICT DO NOTHING "
                "RETURNING true", event.id)
            if fresh:
                await connection.executemany(
                    "INSERT INTO consent_log (workspace, contact_id, purpose, action, source, "
                    "text_version, ip, at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    [(event.workspace, contact_id, purpose, action,
                      source or f"email:{properties.get('email_message_id')}",
                      None if version is None else str(version),
                      properties.get("client.ip") or properties.get("ip"),
                      event.occurred_at) for purpose, action, version in entries])
        # Mail held for a consent is checked again (also when this event was logged before
        # a crash that came before its release).
        async with self._deps.pool.acquire() as connection:
            released = await release_held(connection, event.workspace, contact_id)
        await self._delivery.deliver_many(released)
        return bool(fresh)


def _text_version(data: dict[str, Any]) -> str | None:
    version = (data.get("properties") or {}).get("consent_text_version")
    return None if version is None else str(version)
