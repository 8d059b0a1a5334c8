"""``python -m leadwerk_ingest``: the command the container (and ``make run``) runs."""

from __future__ import annotations

from leadwerk_ingest.api import create_app
from leadwerk_ingest.settings import IngestSettings
from leadwerk_platform.serve import serve


def main() -> None:
    settings = IngestSettings()
    serve(create_app(settings), settings, service="ingest", port=settings.port,
          forwarded_allow_ips=settings.forwarded_allow_ips)


if __name__ == "__main__":
    main()
