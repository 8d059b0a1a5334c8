"""leadwerk_platform.deploy: KafkaTopic manifests and consumer ceilings from the registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from leadwerk_platform.deploy import (
    KAFKA_TOPICS_FILE,
    consumer_partitions,
    kafka_topic,
    kafka_topics_yaml,
    main,
)
from leadwerk_platform.registry import ContractRegistry
from leadwerk_platform.settings import repository_root


def _topic(folder: Path, name: str, partitions: int, consumers: list[str],
           retention: str = "7d") -> None:
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({
        "name": name, "description": "d", "owner": "o", "producers": ["p"],
        "consumers": consumers, "key": "k", "partitions": partitions,
        "replication_factor": 3, "retention": retention, "dead_letter_topic": None,
        "message_types": [], "config": {"min.insync.replicas": "2",
                                        "cleanup.policy": "delete"}}))


@pytest.fixture
def registry(tmp_path: Path) -> ContractRegistry:
    topics = tmp_path / "topics"
    topics.mkdir()
    _topic(topics, "narrow", 3, ["alpha.reader", "beta"])
    _topic(topics, "wide", 6, ["alpha"])
    _topic(topics, "wide-dlq", 1, [], retention="-1")
    return ContractRegistry.load(tmp_path)


def test_kafka_topic_carries_partitions_replicas_and_configs(
        registry: ContractRegistry) -> None:
    resource = kafka_topic(registry.topics["wide"])
    assert resource["apiVersion"] == "kafka.strimzi.io/v1"
    assert resource["metadata"] == {"name": "wide", "labels": {"strimzi.io/cluster": "leadwerk"}}
    assert resource["spec"] == {"partitions": 6, "replicas": 3, "config": {
        "cleanup.policy": "delete", "min.insync.replicas": 2, "retention.ms": 604_800_000}}
    assert kafka_topic(registry.topics["wide-dlq"])["spec"]["config"]["retention.ms"] == -1


def test_every_topic_becomes_one_document_in_name_order(registry: ContractRegistry) -> None:
    documents = list(yaml.safe_load_all(kafka_topics_yaml(registry)))
    assert [doc["metadata"]["name"] for doc in documents] == ["narrow", "wide", "wide-dlq"]


def test_a_service_scales_to_its_widest_input_topic(registry: ContractRegistry) -> None:
    # alpha reads narrow (as alpha.reader) and wide; beta only narrow; nobody reads the DLQ.
    assert consumer_partitions(registry) == {"alpha": 6, "beta": 3}


def test_check_fails_on_a_stale_file_until_it_is_written(tmp_path: Path,
                                                         registry: ContractRegistry) -> None:
    output = tmp_path / "kafkatopics.yaml"
    arguments = ["--schemas", str(registry.root), "--output", str(output)]
    assert main([*arguments, "--check"]) == 1
    assert main(arguments) == 0
    assert main([*arguments, "--check"]) == 0
    _topic(registry.root / "topics", "another", 2, [])
    assert main([*arguments, "--check"]) == 1


def test_committed_kafka_topics_are_current() -> None:
    assert main(["--check"]) == 0, f"run python -m leadwerk_platform.deploy ({KAFKA_TOPICS_FILE})"
    committed = list(yaml.safe_load_all((repository_root() / KAFKA_TOPICS_FILE).read_text()))
    names = {doc["metadata"]["name"] for doc in committed}
    assert names == set(ContractRegistry.load(repository_root() / "schemas").topics)
