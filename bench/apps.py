"""Baseline ASGI apps for the ingest benchmark, served exactly like ingest is.

``python -m bench.apps <kind> <port>`` with kind

* ``ok``      - answers 200 ``{"success":true}`` (what uvicorn + HTTP cost),
* ``produce`` - produces the request body as-is (no key) to the tracking topic and awaits the
  broker's ack (HTTP + one Kafka produce with ingest's producer options),
* ``batch``   - parses ``{"batch": [...]}`` with orjson and produces every event separately
  (re-serialised with orjson, key = anonymousId), awaits every ack.

Settings (broker, topic prefix, idempotence, host) come from the same environment variables
as ingest (:class:`PlatformSettings`); the producer options are ingest's
(:func:`producer_options`). uvicorn runs with the options of ``leadwerk_platform.serve``.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import orjson
import uvicorn
from aiokafka import AIOKafkaProducer

from leadwerk_platform.kafka.config import producer_options
from leadwerk_platform.settings import PlatformSettings

_OK = b'{"success":true}'
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(_OK))]
_START = {"type": "http.response.start", "status": 200, "headers": _HEADERS}
_BODY = {"type": "http.response.body", "body": _OK}
KINDS = ("ok", "produce", "batch")


async def _body(receive: Any) -> bytes:
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        return body
    chunks = [body]
    while message.get("more_body"):
        message = await receive()
        chunks.append(message.get("body", b""))
    return b"".join(chunks)


class Baseline:
    def __init__(self, kind: str, settings: PlatformSettings) -> None:
        self.kind = kind
        self.settings = settings
        self.topic = settings.topic("tracking-events")
        self.producer: AIOKafkaProducer | None = None

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self.kind != "ok":
                    self.producer = AIOKafkaProducer(
                        **producer_options(self.settings, f"leadwerk-bench-{self.kind}"))
                    await self.producer.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.producer is not None:
                    await self.producer.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = await _body(receive)
        producer = self.producer
        if self.kind == "produce" and producer is not None:
            await (await producer.send(self.topic, body))
        elif self.kind == "batch" and producer is not None:
            events = orjson.loads(body)["batch"]
            futures = [await producer.send(self.topic, orjson.dumps(event),
                                           key=str(event.get("anonymousId")).encode())
                       for event in events]
            await asyncio.gather(*futures)
        await send(_START)
        await send(_BODY)


def main() -> None:
    kind, port = sys.argv[1], int(sys.argv[2])
    if kind not in KINDS:
        raise SystemExit(f"kind must be one of {KINDS}")
    settings = PlatformSettings()
    # The options of leadwerk_platform.serve.serve (what `python -m leadwerk_ingest` uses), with
    # the event loop and HTTP parser spelled out (serve's "auto" resolves to these two).
    uvicorn.run(Baseline(kind, settings), host=settings.host, port=port, loop="uvloop",
                http="httptools", log_config=None, access_log=False, proxy_headers=True,
                forwarded_allow_ips="127.0.0.1", timeout_graceful_shutdown=20,
                server_header=False, lifespan="on")


if __name__ == "__main__":
    main()
