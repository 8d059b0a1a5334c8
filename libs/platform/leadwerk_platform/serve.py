"""Run a service's HTTP app the same way everywhere (container, ``make run``, tests)."""

from __future__ import annotations

import gc

import uvicorn
from starlette.types import ASGIApp

from leadwerk_platform.logging import configure_logging
from leadwerk_platform.settings import PlatformSettings


def serve(app: ASGIApp, settings: PlatformSettings, *, service: str, port: int,
          forwarded_allow_ips: str = "127.0.0.1") -> None:
    """Blocking: uvicorn with uvloop/httptools; SIGTERM drains in-flight requests, then the
    lifespan closes producers and pools."""
    configure_logging(service, settings.log_level, settings.log_format)
    tune_garbage_collector()
    uvicorn.run(app, host=settings.host, port=port, log_config=None, access_log=False,
                proxy_headers=True, forwarded_allow_ips=forwarded_allow_ips,
                timeout_graceful_shutdown=20, server_header=False)


def tune_garbage_collector() -> None:
    """Move everything built at start-up out of the collector's sight and collect young objects
    less often: full collections of a large heap paused request handling for 28 to 57 ms in the
    ingest benchmark (docs/benchmarks-ingest.md). Reference cycles are still collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
