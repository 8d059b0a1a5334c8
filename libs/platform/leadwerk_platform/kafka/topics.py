"""Create the registry's topics on a broker (idempotent), from ``schemas/topics``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic

from leadwerk_platform.kafka.config import connection_options
from leadwerk_platform.registry import ContractRegistry, Topic
from leadwerk_platform.settings import PlatformSettings

logger = logging.getLogger(__name__)
_TOPIC_ALREADY_EXISTS = 36


@dataclass(frozen=True)
class ProvisionReport:
    created: list[str]
    existing: list[str]
    grown: list[str]
    too_few_partitions: list[str]


async def provision_topics(settings: PlatformSettings, registry: ContractRegistry,
                           replication_factor: int | None = None, *,
                           grow_partitions: bool = False) -> ProvisionReport:
    """Create missing topics; report (or, when asked, grow) partition counts below the
    registry's.

    Growing a topic re-maps keys to partitions, so events of one key can be read out of order
    around the change: it happens only with ``grow_partitions`` (an operator's decision).
    ``replication_factor`` overrides the registry's (1 for a single embedded broker); topic
    configs that need several replicas (``min.insync.replicas``) are dropped with it.
    """
    admin = AIOKafkaAdminClient(**connection_options(settings),
                                client_id="leadwerk-provisioner")
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = {settings.topic(t.name): t for t in registry.topics.values()}
        new = [_new_topic(name, topic, replication_factor)
               for name, topic in wanted.items() if name not in existing]
        created: list[str] = []
        if new:
            response = await admin.create_topics(new)
            for name, code, message in (e[:3] for e in response.topic_errors):
                if code not in (0, _TOPIC_ALREADY_EXISTS):
                    raise RuntimeError(f"creating topic {name} failed ({code}): {message}")
                if code == 0:
                    created.append(name)
        grown: list[str] = []
        too_few: list[str] = []
        present = [name for name in wanted if name in existing]
        if present:
            for description in await admin.describe_topics(present):
                name = description["topic"]
                if len(description["partitions"]) >= wanted[name].partitions:
                    continue
                if grow_partitions:
                    await admin.create_partitions({name: NewPartitions(wanted[name].partitions)})
                    grown.append(name)
                else:
                    too_few.append(name)
                    logger.warning("topic has fewer partitions than the registry; growing it "
                                   "re-maps keys, run bootstrap with --grow-partitions to do so",
                                   extra={"topic": name})
        report = ProvisionReport(created, sorted(present), grown, too_few)
        logger.info("topics provisioned", extra={"topics_created": created, "topics_grown": grown})
        return report
    finally:
        await admin.close()


def _new_topic(name: str, topic: Topic, replication_factor: int | None) -> NewTopic:
    config = topic.broker_config()
    factor = replication_factor or topic.replication_factor
    if factor < 2:
        config.pop("min.insync.replicas", None)
    return NewTopic(name, topic.partitions, factor, topic_configs=config)
