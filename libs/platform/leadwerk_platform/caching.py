"""Caches keyed by what clients send."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import TypeVar

K = TypeVar("K", str, bytes)
V = TypeVar("V")


def short_key_cache(maxsize: int, max_key_length: int) -> Callable[[Callable[[K], V]],
                                                                    Callable[[K], V]]:
    """An LRU cache that keeps only keys up to ``max_key_length`` (``len()``); longer keys are
    computed uncached. The entry count alone does not bound memory when clients choose the
    keys: 8,192 cached 30 KB strings are 250 MB."""

    def decorate(function: Callable[[K], V]) -> Callable[[K], V]:
        cached = lru_cache(maxsize=maxsize)(function)

        def lookup(key: K) -> V:
            return cached(key) if len(key) <= max_key_length else function(key)

        return lookup

    return decorate
