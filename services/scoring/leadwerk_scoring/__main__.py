"""``python -m leadwerk_scoring``: the command the container (and ``make run``) runs.

``LEADWERK_SCORING_PROCESSORS`` chooses which stream processors run beside the API.
``python -m leadwerk_scoring rescore [--workspace W]`` re-scores every contact of a workspace
from its timeline under the model in force, printing progress.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from leadwerk_platform.logging import configure_logging
from leadwerk_platform.serve import serve
from leadwerk_scoring.api import Scoring, create_app, utcnow
from leadwerk_scoring.settings import ScoringSettings


async def rescore(settings: ScoringSettings, workspace: str) -> int:
    scoring = Scoring(settings.model_copy(update={"processors": ""}), clock=utcnow,
                      on_fatal=lambda error: None)
    await scoring.start()
    try:
        assert scoring.rescorer is not None  # noqa: S101 - start() sets it
        task = asyncio.create_task(scoring.rescorer.run(workspace))
        while not task.done():
            await asyncio.sleep(1.0)
            progress = scoring.rescorer.progress
            sys.stdout.write(f"re-scored {progress.done}/{progress.total} contacts "
                             f"({progress.changed} changed)\n")
            sys.stdout.flush()
        progress = scoring.rescorer.progress
        sys.stdout.write(f"{progress.state}: {progress.done}/{progress.total} contacts, "
                         f"{progress.changed} changed, model version {progress.model_version}"
                         f"{'; ' + progress.error if progress.error else ''}\n")
        return 0 if progress.state == "done" else 1
    finally:
        await scoring.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m leadwerk_scoring", description=__doc__)
    commands = parser.add_subparsers(dest="command")
    rescore_command = commands.add_parser("rescore", help="re-score every contact")
    rescore_command.add_argument("--workspace", default=None)
    args = parser.parse_args()
    settings = ScoringSettings()
    if args.command == "rescore":
        configure_logging("scoring", settings.log_level, settings.log_format)
        sys.exit(asyncio.run(rescore(settings, args.workspace or settings.default_workspace)))
    settings.enabled_processors()  # fail fast on a typo
    serve(create_app(settings), settings, service="scoring", port=settings.port)


if __name__ == "__main__":
    main()
