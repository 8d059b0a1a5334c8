"""``python -m leadwerk_workflow``: the command the container (and ``make run``) runs."""

from __future__ import annotations

from leadwerk_platform.serve import serve
from leadwerk_workflow.api import create_app
from leadwerk_workflow.settings import WorkflowSettings


def main() -> None:
    settings = WorkflowSettings()
    serve(create_app(settings), settings, service="workflow", port=settings.port)


if __name__ == "__main__":
    main()
