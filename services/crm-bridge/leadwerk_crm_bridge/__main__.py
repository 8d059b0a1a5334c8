"""``python -m leadwerk_crm_bridge``: the command the container (and ``make run``) runs."""

from __future__ import annotations

from leadwerk_crm_bridge.api import create_app
from leadwerk_crm_bridge.settings import BridgeSettings
from leadwerk_platform.serve import serve


def main() -> None:
    settings = BridgeSettings()
    serve(create_app(settings), settings, service="crm-bridge", port=settings.port)


if __name__ == "__main__":
    main()
