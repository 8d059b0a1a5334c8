"""The contract registry is complete, and every example validates against its schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leadwerk_platform.envelope import decode
from leadwerk_platform.registry import ContractRegistry, RegistryError, duration_ms


def test_every_topic_is_complete(contract_registry: ContractRegistry) -> None:
    assert contract_registry.topics, "the registry lists no topics"
    assert contract_registry.check() == []


def test_every_message_type_has_valid_examples(contract_registry: ContractRegistry) -> None:
    listed = {t for topic in contract_registry.topics.values() for t in topic.message_types}
    for message_type in sorted(listed):
        examples = contract_registry.examples(message_type)
        assert examples, f"{message_type} has no example"
        for path in examples:
            message = json.loads(path.read_text())
            assert message["type"] == message_type, path
            assert contract_registry.validate(message) == [], path
            decode(path.read_bytes())  # the shared codec reads it too


def test_schemas_reject_what_they_should(contract_registry: ContractRegistry) -> None:
    [path] = contract_registry.examples("tracking.track.v1")
    message = json.loads(path.read_text())
    del message["data"]["event"]
    message["occurred_at"] = "yesterday"
    message["data"]["anonymous_id"] = None
    problems = contract_registry.validate(message)
    assert any("event" in p for p in problems)
    assert any("occurred_at" in p for p in problems)
    assert any(p.startswith("data:") and "none of the allowed shapes" in p for p in problems)


def test_every_schema_file_belongs_to_a_topic_or_is_a_building_block(
        contract_registry: ContractRegistry) -> None:
    listed = {t for topic in contract_registry.topics.values() for t in topic.message_types}
    building_blocks = {"envelope", "tracking.common"}
    assert set(contract_registry.schemas) == listed | building_blocks


@pytest.mark.parametrize(("text", "ms"), [("7d", 604_800_000), ("12h", 43_200_000), ("-1", -1)])
def test_retention_durations(text: str, ms: int) -> None:
    assert duration_ms(text) == ms


def test_incomplete_topic_is_refused(tmp_path: Path) -> None:
    root = tmp_path
    (root / "topics").mkdir()
    (root / "messages").mkdir()
    (root / "topics" / "x.yaml").write_text("name: x\nowner: ingest\n")
    with pytest.raises(RegistryError, match="missing"):
        ContractRegistry.load(root)
