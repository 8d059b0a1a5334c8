"""``make run``'s stack (``python -m leadwerk_platform.devstack``) as separate processes on free
ports with its own state folder, for tests that talk to it through the public interfaces."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from leadwerk_platform.embedded import free_port
from leadwerk_platform.services import SERVICES


@dataclass
class LocalStack:
    process: subprocess.Popen[bytes]
    log: Path
    state: Path
    kafka_port: int
    ports: dict[str, int]

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    def tail(self, lines: int = 150) -> str:
        """The end of the stack's log, for a failing test's report."""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, *services: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        for service in services or tuple(self.ports):
            while True:
                if self.process.poll() is not None:
                    raise AssertionError("the stack exited:\n" + self.log.read_text())
                try:
                    if httpx.get(f"{self.url(service)}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"{service} not ready:\n" + self.log.read_text())
                time.sleep(0.2)


@contextmanager
def local_stack(folder: Path, extra_env: dict[str, str] | None = None) -> Iterator[LocalStack]:
    """Start the stack with its state (and log, ``stack.log``) in ``folder``; stop it after."""
    kafka_port = free_port()
    ports = {service.name: free_port() for service in SERVICES}
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LEADWERK_", "KAFKA_", "DATABASE_"))}
    env.update({"LEADWERK_STATE_DIR": str(folder / "state"),
                "LEADWERK_EMBEDDED_KAFKA_PORT": str(kafka_port),
                "LEADWERK_MAIL_CATCHER_PORT": str(free_port()),
                **{s.port_variable: str(ports[s.name]) for s in SERVICES}, **(extra_env or {})})
    log = folder / "stack.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "leadwerk_platform.devstack"], env=env, stdout=out,
            stderr=subprocess.STDOUT)
    try:
        yield LocalStack(process, log, folder / "state", kafka_port, ports)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
