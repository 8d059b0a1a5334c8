"""``python -m leadwerk_crm_bridge``: the command the container (and ``make run``) runs.

``python -m leadwerk_crm_bridge replay --workspace dev [--connector ID | --delivery ID]``
sends dead-lettered deliveries again (a running bridge picks them up).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime

from leadwerk_crm_bridge.api import SCHEMA, create_app
from leadwerk_crm_bridge.deliveries import replay_dead
from leadwerk_crm_bridge.settings import BridgeSettings
from leadwerk_platform.database import create_pool
from leadwerk_platform.serve import serve


async def replay(settings: BridgeSettings, args: argparse.Namespace) -> int:
    pool = await create_pool(settings, SCHEMA, 1)
    try:
        async with pool.acquire() as connection:
            replayed = await replay_dead(connection, args.workspace, datetime.now(UTC),
                                         delivery_id=args.delivery, connector=args.connector)
    finally:
        await pool.close()
    print(f"{len(replayed)} dead-lettered deliveries wait again")  # noqa: T201
    return 0


def main(argv: list[str] | None = None) -> int:
    settings = BridgeSettings()
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["replay"]:
        parser = argparse.ArgumentParser(prog="python -m leadwerk_crm_bridge replay",
                                         description="Send dead-lettered deliveries again.")
        parser.add_argument("--workspace", default=settings.default_workspace)
        which = parser.add_mutually_exclusive_group()
        which.add_argument("--connector", help="only this connector's dead letters")
        which.add_argument("--delivery", help="only this delivery")
        return asyncio.run(replay(settings, parser.parse_args(arguments[1:])))
    serve(create_app(settings), settings, service="crm-bridge", port=settings.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
