"""What the scoring processors and the API share in one process."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from leadwerk_platform.kafka.producer import Publisher
from leadwerk_scoring.adapters.models import ModelStore
from leadwerk_scoring.metrics import ScoringMetrics
from leadwerk_scoring.settings import ScoringSettings


@dataclass
class Deps:
    settings: ScoringSettings
    pool: Any  # asyncpg.Pool
    publisher: Publisher
    metrics: ScoringMetrics
    models: ModelStore
    declared: dict[str, tuple[str, ...]]
    clock: Callable[[], datetime]
