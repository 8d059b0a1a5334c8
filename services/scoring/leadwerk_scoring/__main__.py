"""``python -m leadwerk_scoring``: the command the container (and ``make run``) runs.

``LEADWERK_SCORING_PROCESSORS`` chooses which stream processors run beside the API.
"""

from __future__ import annotations

from leadwerk_platform.serve import serve
from leadwerk_scoring.api import create_app
from leadwerk_scoring.settings import ScoringSettings


def main() -> None:
    settings = ScoringSettings()
    settings.enabled_processors()  # fail fast on a typo
    serve(create_app(settings), settings, service="scoring", port=settings.port)


if __name__ == "__main__":
    main()
