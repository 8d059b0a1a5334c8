"""The e2e tests' stack: ``make run``'s processes on free ports (see
:mod:`leadwerk_platform.testing.stack`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from leadwerk_platform.testing.stack import LocalStack
from leadwerk_platform.testing.stack import local_stack as start


@pytest.fixture
def stack_env() -> dict[str, str]:
    """Extra environment for the stack; a test module overrides this fixture to add some."""
    return {}


@pytest.fixture
def local_stack(tmp_path: Path, stack_env: dict[str, str]) -> Iterator[LocalStack]:
    with start(tmp_path, stack_env) as stack:
        yield stack
