"""The contract registry in ``schemas/``: topics (YAML) and messages (JSON Schema + examples).

``schemas/topics/<name>.yaml`` describes a topic; ``schemas/messages/<type>.schema.json`` a
message type; ``schemas/examples/<type>/*.json`` holds examples that must validate.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import ValidationError
from referencing import Registry as SchemaRegistry
from referencing import Resource

_DURATION = re.compile(r"^(?P<amount>\d+)(?P<unit>ms|s|m|h|d)$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
TOPIC_FIELDS = ("name", "description", "owner", "producers", "consumers", "key", "partitions",
                "replication_factor", "retention", "dead_letter_topic", "message_types")


class RegistryError(ValueError):
    """The registry itself is incomplete or inconsistent."""


def duration_ms(text: str) -> int:
    """``7d`` → 604800000; ``-1`` (keep forever) stays ``-1``."""
    if str(text) == "-1":
        return -1
    match = _DURATION.match(str(text))
    if match is None:
        raise RegistryError(f"retention {text!r} is not a duration like 7d, 12h or 30m")
    return int(match["amount"]) * _UNIT_MS[match["unit"]]


@dataclass(frozen=True)
class Topic:
    name: str
    description: str
    owner: str
    producers: list[str]
    consumers: list[str]
    key: str
    partitions: int
    replication_factor: int
    retention: str
    dead_letter_topic: str | None
    message_types: list[str]
    config: dict[str, str] = field(default_factory=dict)
    dead_letter_of: str | None = None

    def broker_config(self) -> dict[str, str]:
        """Topic configs to create the topic with (retention included)."""
        return {"retention.ms": str(duration_ms(self.retention)),
                **{k: str(v) for k, v in self.config.items()}}


@dataclass(frozen=True)
class ContractRegistry:
    root: Path
    topics: dict[str, Topic]
    schemas: dict[str, dict[str, Any]]  # by message type (plus "envelope", building blocks)
    _schema_registry: SchemaRegistry

    @classmethod
    def load(cls, root: Path) -> ContractRegistry:
        topics: dict[str, Topic] = {}
        for path in sorted((root / "topics").glob("*.yaml")):
            raw = yaml.safe_load(path.read_text())
            if not isinstance(raw, dict):
                raise RegistryError(f"{path.name}: not a mapping")
            missing = [name for name in TOPIC_FIELDS if name not in raw]
            if missing:
                raise RegistryError(f"{path.name}: missing {', '.join(missing)}")
            topic = Topic(**raw)
            if topic.name != path.stem:
                raise RegistryError(f"{path.name}: name {topic.name!r} differs from the file name")
            topics[topic.name] = topic
        schemas: dict[str, dict[str, Any]] = {}
        resources: list[tuple[str, Resource[Any]]] = []
        for path in sorted((root / "messages").glob("*.schema.json")):
            schema = json.loads(path.read_text())
            Draft202012Validator.check_schema(schema)
            schemas[path.name.removesuffix(".schema.json")] = schema
            resources.append((schema["$id"], Resource.from_contents(schema)))
        return cls(root, topics, schemas, SchemaRegistry().with_resources(resources))

    def validator(self, message_type: str) -> Draft202012Validator:
        try:
            schema = self.schemas[message_type]
        except KeyError:
            raise RegistryError(f"no schema for message type {message_type!r}") from None
        return Draft202012Validator(schema, registry=self._schema_registry,
                                    format_checker=FormatChecker())

    def validate(self, message: dict[str, Any]) -> list[str]:
        """Every problem with ``message`` against the schema its ``type`` names."""
        validator = self.validator(str(message.get("type")))
        return [_describe(error) for error in validator.iter_errors(message)]

    def examples(self, message_type: str) -> list[Path]:
        return sorted((self.root / "examples" / message_type).glob("*.json"))

    def check(self) -> list[str]:
        """Completeness problems: every topic names existing DLQs, schemas and examples."""
        problems: list[str] = []
        for topic in self.topics.values():
            if topic.partitions < 1 or topic.replication_factor < 1:
                problems.append(f"{topic.name}: partitions and replication_factor must be >= 1")
            try:
                duration_ms(topic.retention)
            except RegistryError as error:
                problems.append(f"{topic.name}: {error}")
            if topic.dead_letter_of is None:
                if topic.dead_letter_topic not in self.topics:
                    problems.append(f"{topic.name}: dead_letter_topic "
                                    f"{topic.dead_letter_topic!r} is not a registry topic")
                if not topic.message_types:
                    problems.append(f"{topic.name}: lists no message types")
            elif topic.dead_letter_of not in self.topics:
                problems.append(f"{topic.name}: dead_letter_of {topic.dead_letter_of!r} unknown")
            for message_type in topic.message_types:
                if message_type not in self.schemas:
                    problems.append(f"{topic.name}: no schema for {message_type}")
                elif not self.examples(message_type):
                    problems.append(f"{topic.name}: no example for {message_type}")
        return problems


def _describe(error: ValidationError) -> str:
    location = "/".join(str(part) for part in error.absolute_path) or "(root)"
    if error.validator in ("anyOf", "oneOf"):
        reasons = sorted({sub.message for sub in error.context or []})
        return f"{location}: matches none of the allowed shapes ({'; '.join(reasons)[:300]})"
    return f"{location}: {error.message[:300]}"
