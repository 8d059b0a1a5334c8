"""The local mail catcher: an SMTP server (aiosmtpd) that keeps every message as an ``.eml``
file, so a newcomer sees what the platform sent. ``make run`` starts it for the mailer unless
``LEADWERK_SMTP_URL`` points elsewhere; ``python -m leadwerk_platform.mailbox`` lists the mail.
Development only: it accepts anything from anyone on the loopback interface."""

from __future__ import annotations

import email
import email.policy
import os
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

from leadwerk_platform.settings import repository_root


class _Keep:
    def __init__(self, folder: Path) -> None:
        self._folder = folder

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's hook name
        del server, session
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%f")  # sorts in arrival order
        path = self._folder / f"{stamp}-{uuid.uuid4().hex[:8]}.eml"
        path.write_bytes(envelope.original_content or envelope.content)
        return "250 2.0.0 Ok: kept as " + path.name


class MailCatcher:
    def __init__(self, folder: Path, port: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self._controller = Controller(_Keep(folder), hostname="127.0.0.1", port=port)

    def start(self) -> str:
        self._controller.start()
        return f"smtp://127.0.0.1:{self._controller.port}"

    def stop(self) -> None:
        self._controller.stop()


def listing(folder: Path) -> list[str]:
    lines = []
    for path in sorted(folder.glob("*.eml")):
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        lines.append(f"{path.name}  {message['Date']}  {message['From']} → {message['To']}  "
                     f"{message['Subject']}")
    return lines


def main() -> None:
    state = Path(os.environ.get("LEADWERK_STATE_DIR", repository_root() / ".state"))
    folder = state / "mail"
    lines = listing(folder) if folder.exists() else []
    sys.stdout.write("\n".join(lines) + ("\n" if lines else f"no mail in {folder}\n"))


if __name__ == "__main__":
    main()
