"""A consumer process for the SIGTERM test: handles slowly, prints what it handled."""

from __future__ import annotations

import asyncio
import sys

from leadwerk_platform.kafka.consumer import ConsumedMessage, ConsumerRuntime, run_until_signalled
from leadwerk_platform.kafka.producer import Publisher
from leadwerk_platform.settings import PlatformSettings


async def main() -> None:
    settings = PlatformSettings()
    publisher = Publisher(settings, "sigterm-test")
    await publisher.start(wait=5)

    async def handler(message: ConsumedMessage) -> None:
        await asyncio.sleep(0.2)
        sys.stdout.write(f"handled {message.envelope.data['n']}\n")
        sys.stdout.flush()

    runtime = ConsumerRuntime(settings, group_id="test.sigterm",
                              topics={"tracking-events": "tracking-events-dlq"},
                              handler=handler, dead_letter_publisher=publisher)
    await run_until_signalled(runtime)
    await publisher.stop()
    sys.stdout.write("stopped cleanly\n")


if __name__ == "__main__":
    asyncio.run(main())
