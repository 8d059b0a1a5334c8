"""What the Kubernetes manifests take from the contract registry (``schemas/topics/``).

* one Strimzi ``KafkaTopic`` per registry topic, dead-letter topics included, written to
  ``deploy/k8s/base/kafkatopics.yaml`` by ``python -m leadwerk_platform.deploy`` (``--check``
  only compares and exits 1 when the committed file is stale);
* how far each service's consumers can scale: a pod beyond the partition count of the
  largest topic it reads gets no partition in any of its consumer groups.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from leadwerk_platform.registry import ContractRegistry, Topic
from leadwerk_platform.settings import repository_root

#: The Strimzi ``Kafka`` resource the topics belong to (its Topic Operator manages them).
STRIMZI_CLUSTER = "leadwerk"
KAFKA_TOPICS_FILE = Path("deploy/k8s/base/kafkatopics.yaml")
_HEADER = ("# Generated from schemas/topics/ by `python -m leadwerk_platform.deploy`; "
           "do not edit.\n# tests/deploy checks that every registry topic has its KafkaTopic "
           "here.\n")


def kafka_topic(topic: Topic, cluster: str = STRIMZI_CLUSTER) -> dict[str, Any]:
    """The Strimzi ``KafkaTopic`` for one registry topic (same configs bootstrap creates)."""
    return {
        "apiVersion": "kafka.strimzi.io/v1",
        "kind": "KafkaTopic",
        "metadata": {"name": topic.name, "labels": {"strimzi.io/cluster": cluster}},
        "spec": {
            "partitions": topic.partitions,
            "replicas": topic.replication_factor,
            "config": {key: _config_value(value)
                       for key, value in sorted(topic.broker_config().items())},
        },
    }


def kafka_topics_yaml(registry: ContractRegistry, cluster: str = STRIMZI_CLUSTER) -> str:
    documents = [kafka_topic(topic, cluster) for _, topic in sorted(registry.topics.items())]
    return _HEADER + yaml.safe_dump_all(documents, sort_keys=False, explicit_start=True)


def consumer_partitions(registry: ContractRegistry) -> dict[str, int]:
    """Per consuming service (``scoring.scorer`` counts for ``scoring``): the most partitions
    of any topic it reads, i.e. the most pods that all get work."""
    ceilings: dict[str, int] = {}
    for topic in registry.topics.values():
        for consumer in topic.consumers:
            service = consumer.split(".", 1)[0]
            ceilings[service] = max(ceilings.get(service, 0), topic.partitions)
    return ceilings


def _config_value(value: str) -> int | str:
    """Numbers as YAML numbers (as Strimzi's examples write them), everything else as text."""
    return int(value) if value.lstrip("-").isdigit() else value


def main(argv: list[str] | None = None) -> int:
    root = repository_root()
    parser = argparse.ArgumentParser(prog="python -m leadwerk_platform.deploy",
                                     description="Write the KafkaTopic manifests.")
    parser.add_argument("--schemas", type=Path, default=root / "schemas",
                        help="the contract registry (default: the checkout's schemas/)")
    parser.add_argument("--output", type=Path, default=root / KAFKA_TOPICS_FILE)
    parser.add_argument("--check", action="store_true",
                        help="only compare; exit 1 when the file differs from the registry")
    args = parser.parse_args(argv)
    wanted = kafka_topics_yaml(ContractRegistry.load(args.schemas))
    current = args.output.read_text() if args.output.exists() else None
    if args.check:
        if current != wanted:
            sys.stderr.write(f"{args.output} is stale: run python -m leadwerk_platform.deploy\n")
            return 1
        return 0
    if current != wanted:
        args.output.write_text(wanted)
        sys.stdout.write(f"wrote {args.output}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
