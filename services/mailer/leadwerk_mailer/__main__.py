"""``python -m leadwerk_mailer``: the command the container (and ``make run``) runs."""

from __future__ import annotations

from leadwerk_mailer.api import create_app
from leadwerk_mailer.settings import MailerSettings
from leadwerk_platform.serve import serve


def main() -> None:
    settings = MailerSettings()
    serve(create_app(settings), settings, service="mailer", port=settings.port)


if __name__ == "__main__":
    main()
