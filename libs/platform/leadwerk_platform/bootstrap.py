"""``python -m leadwerk_platform.bootstrap``: create topics and apply every service's migrations.

The one-off set-up step: the Kubernetes Job runs it before the services roll out, and the local
stack runs it on every start. Both parts are idempotent.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from leadwerk_platform.kafka.topics import provision_topics
from leadwerk_platform.logging import configure_logging
from leadwerk_platform.migrations import upgrade
from leadwerk_platform.registry import ContractRegistry
from leadwerk_platform.services import installed_services
from leadwerk_platform.settings import PlatformSettings

logger = logging.getLogger(__name__)


def prepare(settings: PlatformSettings, replication_factor: int | None = None, *,
            grow_partitions: bool = False) -> None:
    registry = ContractRegistry.load(settings.schemas_dir)
    problems = registry.check()
    if problems:
        raise SystemExit("schema registry incomplete:\n  " + "\n  ".join(problems))
    report = asyncio.run(provision_topics(settings, registry, replication_factor,
                                          grow_partitions=grow_partitions))
    logger.info("topics ready", extra={"topics_created": len(report.created),
                                       "topics_existing": len(report.existing)})
    for service in installed_services():
        if service.migrations is None:
            continue
        if settings.database_url is None:
            raise SystemExit(f"DATABASE_URL is required to migrate {service.name}")
        upgrade(settings.database_url.get_secret_value(), service.schema, service.migrations)
        logger.info("migrations applied", extra={"schema": service.schema})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--replication-factor", type=int, default=None,
                        help="override the registry's replication factor (1 for one broker)")
    parser.add_argument("--grow-partitions", action="store_true",
                        help="add partitions where the registry asks for more (re-maps keys)")
    args = parser.parse_args()
    settings = PlatformSettings()
    configure_logging("bootstrap", settings.log_level, settings.log_format)
    prepare(settings, args.replication_factor, grow_partitions=args.grow_partitions)


if __name__ == "__main__":
    main()
