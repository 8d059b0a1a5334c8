"""The seed documents' main story end to end: every service its own process (as ``make run``
starts them), walked through the public interfaces only (the story ``make demo`` narrates)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from demo.story import Platform, StoryError, story
from leadwerk_crm_bridge.deliveries import webhook_secrets
from leadwerk_crm_bridge.settings import BridgeSettings
from leadwerk_platform.embedded import free_port
from leadwerk_platform.settings import DEVELOPMENT_ADMIN_TOKEN, repository_root
from leadwerk_platform.testing.stack import LocalStack

pytestmark = pytest.mark.integration

@pytest.fixture
def receiver_port() -> int:
    """Chosen before the stack takes its own free ports."""
    return free_port()


@pytest.fixture
def stack_env(tmp_path: Path, receiver_port: int) -> dict[str, str]:
    """The shipped configuration, with the sales webhook pointed at this test's receiver."""
    config = tmp_path / "config"
    shutil.copytree(repository_root() / "config", config)
    connectors = config / "connectors.yaml"
    text = connectors.read_text()
    assert "http://127.0.0.1:9099/leadwerk" in text
    connectors.write_text(text.replace("127.0.0.1:9099", f"127.0.0.1:{receiver_port}"))
    return {"LEADWERK_CONFIG_DIR": str(config)}


@pytest.mark.timeout(300)
async def test_from_blog_reader_to_customer(local_stack: LocalStack, receiver_port: int,
                                            ) -> None:
    await asyncio.to_thread(local_stack.wait_ready)
    settings = BridgeSettings(_env_file=None)
    platform = Platform(
        ingest=local_stack.url("ingest"), scoring=local_stack.url("scoring"),
        workflow=local_stack.url("workflow"), mailer=local_stack.url("mailer"),
        bridge=local_stack.url("crm-bridge"), mail_folder=local_stack.state / "mail",
        admin_token=DEVELOPMENT_ADMIN_TOKEN, write_key="dev-write-key",
        outbound_secret=webhook_secrets(settings, "outbound")[0],
        inbound_secret=webhook_secrets(settings, "inbound")[0],
        receiver_port=receiver_port, timeout=90)
    narration: list[str] = []
    async with story(platform, narration.append) as walk:
        try:
            customer = await walk.walk()
        except StoryError as error:
            pytest.fail(f"{error}\n--- the story so far ---\n" + "\n".join(narration)
                        + f"\n--- the stack's log, last lines ---\n{local_stack.tail()}")
        # No marketing mail before the confirmation: the opt-in mail came first, alone.
        mails = walk.mails(walk.address)
        assert [str(m["Subject"]) for m in mails][:2] == [
            "Bitte bestätigen Sie Ihre Anmeldung", "Willkommen, Anna!"]
        assert mails[0]["List-Unsubscribe"] is None  # transactional
        assert "One-Click" in str(mails[1]["List-Unsubscribe-Post"])
        # The hand-off reached the receiver signed; nothing arrived unsigned.
        assert walk.receiver.rejected == 0
        [handoff] = [p for p in walk.receiver.received if "handoff" in str(p["type"])]
        sent = handoff["data"]
        assert sent["contact"]["stage"] in {"mql", "sal", "customer"}
        assert sent["owner"] == walk.owner
        assert "pricing-sheet.pdf" in sent["summary"]
        assert sent["contact"]["attribution"]["first_touch"]["name"] == "herbst-2026"
        # Score and rating rose to an MQL; the rep who signed the welcome mail owns her.
        assert walk.mql["score"] > walk.before["score"]
        assert walk.mql["rating"] != walk.before["rating"]
        assert walk.welcome_sender == walk.mql["owner"] == walk.owner
        # The contact is a customer, and the whole history is one timeline.
        assert customer["stage"] == "customer"
        assert customer["owner"] == walk.owner
        kinds = {str(e["type"]) for e in await walk.timeline()}
        assert {"page", "form_submitted", "email_clicked", "track"} <= kinds, kinds
    assert len(narration) >= 12
