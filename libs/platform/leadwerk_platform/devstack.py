"""``make run``: the whole platform on one machine.

Starts embedded Postgres and the embedded Kafka-protocol broker unless ``DATABASE_URL`` /
``KAFKA_BOOTSTRAP_SERVERS`` are set, creates topics, applies migrations, then runs every
installed service as its own process (``python -m <service>``, the command its container
runs), prefixing and interleaving their logs, until Ctrl-C or SIGTERM stops everything.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import IO

from leadwerk_platform.bootstrap import prepare
from leadwerk_platform.embedded import EmbeddedBroker, EmbeddedPostgres
from leadwerk_platform.logging import configure_logging
from leadwerk_platform.mailbox import MailCatcher
from leadwerk_platform.services import ServiceSpec, installed_services
from leadwerk_platform.settings import LogFormat, PlatformSettings, repository_root

_SHUTDOWN_GRACE = 20.0


def _say(message: str) -> None:
    sys.stdout.write(f"leadwerk | {message}\n")
    sys.stdout.flush()


def _pump(name: str, stream: IO[bytes], width: int) -> None:
    for line in iter(stream.readline, b""):
        sys.stdout.write(f"{name:<{width}} | {line.decode(errors='replace')}")
        sys.stdout.flush()


class Stack:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.env = dict(os.environ)
        self.env.setdefault("LEADWERK_ENV", "development")
        self.env.setdefault("LEADWERK_LOG_FORMAT", LogFormat.CONSOLE.value)
        self.postgres: EmbeddedPostgres | None = None
        self.broker: EmbeddedBroker | None = None
        self.mail: MailCatcher | None = None
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.stopping = threading.Event()

    def start_infrastructure(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if not self.env.get("DATABASE_URL"):
            self.postgres = EmbeddedPostgres(self.state_dir / "postgres")
            self.env["DATABASE_URL"] = self.postgres.start()
            _say(f"embedded Postgres ready (data in {self.state_dir / 'postgres'})")
        if not self.env.get("KAFKA_BOOTSTRAP_SERVERS"):
            port = int(self.env.get("LEADWERK_EMBEDDED_KAFKA_PORT", "9092"))
            log = (self.state_dir / "tansu.log").open("ab")
            self.broker = EmbeddedBroker(port, log=log)
            self.env["KAFKA_BOOTSTRAP_SERVERS"] = self.broker.start()
            # No idempotent producer or transactions on the embedded broker; short group
            # sessions because it delays joins by about the session timeout.
            self.env.setdefault("LEADWERK_KAFKA_IDEMPOTENCE", "false")
            self.env.setdefault("LEADWERK_KAFKA_SESSION_TIMEOUT_MS", "3000")
            _say(f"embedded Kafka-protocol broker (tansu, memory only) on "
                 f"{self.env['KAFKA_BOOTSTRAP_SERVERS']}")

    def start_mail_catcher(self) -> None:
        """The mailer's SMTP relay on a development machine: keeps mail as .eml files."""
        if self.env.get("LEADWERK_SMTP_URL"):
            return
        port = int(self.env.get("LEADWERK_MAIL_CATCHER_PORT", "8025"))
        self.mail = MailCatcher(self.state_dir / "mail", port)
        self.env["LEADWERK_SMTP_URL"] = self.mail.start()
        _say(f"mail catcher on {self.env['LEADWERK_SMTP_URL']} (messages in "
             f"{self.state_dir / 'mail'}; list them: python -m leadwerk_platform.mailbox)")

    def prepare(self) -> None:
        os.environ.update(self.env)
        settings = PlatformSettings()
        configure_logging("bootstrap", settings.log_level, settings.log_format)
        prepare(settings, replication_factor=1 if self.broker is not None else None)

    def start_services(self, services: list[ServiceSpec]) -> None:
        width = max(len(s.name) for s in services)
        ports = {s.name: self.env.get(s.port_variable, str(s.default_port)) for s in services}
        # Where the services find each other when a port variable moved one of them.
        if "ingest" in ports:
            self.env.setdefault("LEADWERK_INGEST_PUBLIC_URL",
                                f"http://127.0.0.1:{ports['ingest']}")
        if "mailer" in ports:
            self.env.setdefault("LEADWERK_MAILER_URL", f"http://127.0.0.1:{ports['mailer']}")
        for service in services:
            env = {**self.env, service.port_variable: ports[service.name]}
            process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                [sys.executable, "-m", service.module], env=env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
            assert process.stdout is not None  # noqa: S101 - PIPE was requested
            threading.Thread(target=_pump, args=(service.name, process.stdout, width),
                             daemon=True).start()
            self.processes[service.name] = process
            _say(f"{service.name:<{width}} listening on "
                 f"http://127.0.0.1:{env[service.port_variable]}  "
                 f"(python -m {service.module})")

    def wait(self) -> int:
        while not self.stopping.is_set():
            for name, process in self.processes.items():
                if process.poll() is not None:
                    _say(f"{name} exited with {process.returncode}; stopping the stack")
                    return 1
            time.sleep(0.2)
        return 0

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + _SHUTDOWN_GRACE
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.1, deadline - time.monotonic()))
            if process.poll() is None:
                process.kill()
                process.wait()
        if self.mail is not None:
            self.mail.stop()
        if self.broker is not None:
            self.broker.stop()
        if self.postgres is not None:
            self.postgres.stop()
        _say("stopped")


def main() -> None:
    stack = Stack(Path(os.environ.get("LEADWERK_STATE_DIR", repository_root() / ".state")))

    def on_signal(_: int, __: FrameType | None) -> None:
        stack.stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        stack.start_infrastructure()
        stack.prepare()
        services = installed_services()
        if any(s.name == "mailer" for s in services):
            stack.start_mail_catcher()
        stack.start_services(services)
        _say("up; Ctrl-C stops everything")
        code = stack.wait()
    finally:
        stack.stop()
    sys.exit(code)


if __name__ == "__main__":
    main()
