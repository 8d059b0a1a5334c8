"""``make demo``: the main story against a running ``make run``, narrated step by step.

Reads the same environment as ``make run`` (service port variables, ``LEADWERK_STATE_DIR``,
``LEADWERK_ADMIN_TOKEN``, ``LEADWERK_SECRET_KEY``, ``LEADWERK_WEBHOOK_SECRETS``), starts the
CRM's webhook receiver on ``LEADWERK_DEMO_RECEIVER_PORT`` (9099, where config/connectors.yaml's
``sales-webhook`` points) and walks the story.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from demo.story import Platform, Story, StoryError, story
from leadwerk_crm_bridge.deliveries import webhook_secrets
from leadwerk_crm_bridge.settings import BridgeSettings
from leadwerk_platform.mailbox import listing
from leadwerk_platform.services import SERVICES
from leadwerk_platform.settings import repository_root

_BOLD, _DIM, _RESET = "\033[1m", "\033[2m", "\033[0m"


def platform_from_environment() -> Platform:
    def url(name: str) -> str:
        spec = next(s for s in SERVICES if s.name == name)
        return f"http://127.0.0.1:{os.environ.get(spec.port_variable, spec.default_port)}"

    settings = BridgeSettings()
    state = Path(os.environ.get("LEADWERK_STATE_DIR", repository_root() / ".state"))
    return Platform(
        ingest=url("ingest"), scoring=url("scoring"), workflow=url("workflow"),
        mailer=url("mailer"), bridge=url("crm-bridge"), mail_folder=state / "mail",
        admin_token=settings.admin_token.get_secret_value(),
        write_key=os.environ.get("LEADWERK_DEMO_WRITE_KEY", "dev-write-key"),
        outbound_secret=webhook_secrets(settings, "outbound")[0],
        inbound_secret=webhook_secrets(settings, "inbound")[0],
        receiver_port=int(os.environ.get("LEADWERK_DEMO_RECEIVER_PORT", "9099")))


async def platform_is_up(platform: Platform) -> list[str]:
    """The services that do not answer ``/readyz``."""
    down = []
    async with httpx.AsyncClient(timeout=3) as client:
        for name, url in (("ingest", platform.ingest), ("scoring", platform.scoring),
                          ("workflow", platform.workflow), ("mailer", platform.mailer),
                          ("crm-bridge", platform.bridge)):
            try:
                ready = (await client.get(f"{url}/readyz")).status_code == 200
            except httpx.HTTPError:
                ready = False
            if not ready:
                down.append(f"{name} ({url})")
    return down


def _step(number: int, text: str) -> None:
    sys.stdout.write(f"{_BOLD}{number:>2}.{_RESET} {text}\n")
    sys.stdout.flush()


async def _where_to_look(walk: Story, customer: dict[str, Any]) -> None:
    platform = walk.platform
    kinds = Counter(str(e["type"]) for e in await walk.timeline())
    history = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
    out = sys.stdout
    out.write(f"\n{_BOLD}The contact now{_RESET}: stage {customer['stage']}, score "
              f"{customer['score']:g}, rating {customer['rating']}, owner {customer['owner']}\n"
              f"  one timeline: {history}\n")
    out.write(f"\n{_BOLD}Mail the platform sent{_RESET} (SMTP sink, {platform.mail_folder}):\n")
    for line in listing(platform.mail_folder)[-8:]:
        out.write(f"  {_DIM}{line}{_RESET}\n")
    token = "$LEADWERK_ADMIN_TOKEN" if "LEADWERK_ADMIN_TOKEN" in os.environ \
        else platform.admin_token
    out.write(
        f"\n{_BOLD}Where to look{_RESET}\n"
        f"  captured mail:  python -m leadwerk_platform.mailbox  (or open the .eml files)\n"
        f"  the contact:    curl -H 'Authorization: Bearer {token}' "
        f"{platform.scoring}/api/contacts/{walk.contact_id}\n"
        f"  its timeline:   {platform.scoring}/api/contacts/{walk.contact_id}/timeline\n"
        f"  why the score:  {platform.scoring}/api/contacts/{walk.contact_id}/score-history\n"
        f"  its journeys:   {platform.workflow}/api/contacts/{walk.contact_id}/journeys\n"
        f"  its mail log:   {platform.mailer}/api/contacts/{walk.contact_id}/messages\n"
        f"  CRM deliveries: {platform.bridge}/api/contacts/{walk.contact_id}/deliveries\n"
        f"  metrics:        {platform.ingest}/metrics (and each service's /metrics)\n"
        f"  API docs:       {platform.scoring}/docs (each service has /docs)\n")


async def main() -> int:
    platform = platform_from_environment()
    down = await platform_is_up(platform)
    deadline = asyncio.get_running_loop().time() + 90
    if down:  # just started? Consumer groups take a while to join.
        sys.stdout.write(f"{_DIM}waiting for {', '.join(down)} to be ready …{_RESET}\n")
    while down and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(2)
        down = await platform_is_up(platform)
    if down:
        sys.stderr.write("not running: " + ", ".join(down) +
                         "\nstart the platform first (`make run` in another terminal), then "
                         "`make demo` again\n")
        return 2
    steps = iter(range(1, 100))

    def say(text: str) -> None:
        _step(next(steps), text)

    sys.stdout.write(f"{_BOLD}Leadwerk: from blog reader to customer{_RESET} "
                     f"{_DIM}(the sales webhook receiver listens on "
                     f"127.0.0.1:{platform.receiver_port}){_RESET}\n\n")
    try:
        async with story(platform, say) as walk:
            customer = await walk.walk()
            await _where_to_look(walk, customer)
    except StoryError as error:
        sys.stderr.write(f"\nthe story stopped: {error}\n")
        return 1
    except OSError as error:
        sys.stderr.write(f"\ncould not start the webhook receiver on port "
                         f"{platform.receiver_port}: {error}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
