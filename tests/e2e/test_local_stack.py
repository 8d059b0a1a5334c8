"""`make run`'s stack as separate processes: the README's curl example and the official Segment
SDK get events onto the tracking topic, and Ctrl-C stops everything cleanly."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
import time

import httpx
import pytest
from segment.analytics.client import Client as SegmentClient

from leadwerk_platform.settings import DEVELOPMENT_ADMIN_TOKEN
from leadwerk_platform.testing.helpers import read_topic, values
from leadwerk_platform.testing.stack import LocalStack

pytestmark = pytest.mark.integration


async def test_readme_curl_and_segment_sdk_reach_the_topic_then_ctrl_c_stops_all(
        local_stack: LocalStack) -> None:
    process, kafka_port, log = local_stack.process, local_stack.kafka_port, local_stack.log
    ingest_port, scoring_port = local_stack.ports["ingest"], local_stack.ports["scoring"]
    url, scoring = local_stack.url("ingest"), local_stack.url("scoring")
    await asyncio.to_thread(local_stack.wait_ready, "ingest", "scoring")
    curl = shutil.which("curl")
    body = '{"userId": "u-1", "event": "Demo Video Watched", "properties": {"video": "demo"}}'
    if curl:  # the README's example, verbatim apart from the port
        curl_process = await asyncio.create_subprocess_exec(
            curl, "-s", "-u", "dev-write-key:", "-H", "Content-Type: application/json",
            "-d", body, f"{url}/v1/track", stdout=asyncio.subprocess.PIPE)
        output, _ = await asyncio.wait_for(curl_process.communicate(), 10)
        assert output == b'{"success":true}'
    else:
        async with httpx.AsyncClient() as client:
            response = await client.post(f"{url}/v1/track", auth=("dev-write-key", ""),
                                         content=body)
        assert response.status_code == 200

    def segment() -> None:
        client = SegmentClient("dev-write-key", host=url)
        client.track("u-2", "Document Downloaded", {"document": "pricing.pdf"})
        client.flush()

    await asyncio.to_thread(segment)
    events = values(await read_topic(f"127.0.0.1:{kafka_port}", "tracking-events", 2))
    assert sorted(e["data"]["event"] for e in events) == ["Demo Video Watched",
                                                          "Document Downloaded"]
    # The scoring service (its own process) turned both into contacts with scores.
    async with httpx.AsyncClient(base_url=scoring, headers={
            "Authorization": f"Bearer {DEVELOPMENT_ADMIN_TOKEN}"}) as client:
        deadline = time.monotonic() + 30
        while True:
            found = (await client.get("/api/contacts", params={"user_id": "u-2"})).json()
            if found["items"] and found["items"][0]["score"] == 15:
                break
            assert time.monotonic() < deadline, found
            await asyncio.sleep(0.2)
    # The mailer (its own process) sends a test through the local mail catcher, and the
    # mailbox command lists it.
    mailer = local_stack.url("mailer")
    await asyncio.to_thread(local_stack.wait_ready, "mailer")
    async with httpx.AsyncClient(base_url=mailer, headers={
            "Authorization": f"Bearer {DEVELOPMENT_ADMIN_TOKEN}"}) as client:
        sent = await client.post("/api/templates/welcome/test",
                                 json={"to": "newcomer@example.de"}, timeout=20)
        assert sent.json()["outcome"] == "sent", sent.text
    listed = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "leadwerk_platform.mailbox", stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "LEADWERK_STATE_DIR": str(local_stack.state)})
    mailbox, _ = await asyncio.wait_for(listed.communicate(), 30)
    assert "newcomer@example.de  [Test] Willkommen, Anna!" in mailbox.decode()
    text = log.read_text()
    assert re.search(rf"ingest +listening on http://127\.0\.0\.1:{ingest_port}", text)
    assert re.search(rf"scoring +listening on http://127\.0\.0\.1:{scoring_port}", text)
    assert re.search(r"^ingest +\| ", text, re.MULTILINE)  # service logs are prefixed
    assert re.search(r"^scoring +\| ", text, re.MULTILINE)
    assert re.search(r"^workflow +\| ", text, re.MULTILINE)

    process.send_signal(signal.SIGINT)
    assert await asyncio.to_thread(process.wait, 30) == 0
    assert "leadwerk | stopped" in log.read_text()
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"{url}/healthz", timeout=1)
