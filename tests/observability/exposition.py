"""Reading a ``/metrics`` page (Prometheus text format) with prometheus_client's own parser."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

#: The series a family of each type exposes besides samples named like the family.
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
             "summary": ("_sum", "_count"), "gaugehistogram": ("_bucket", "_gsum", "_gcount")}


@dataclass(frozen=True)
class Exposition:
    families: list[Metric]

    @property
    def samples(self) -> Iterator[Sample]:
        for family in self.families:
            yield from family.samples

    def series_names(self) -> set[str]:
        """Every name a query may use: declared families (even those without samples yet,
        whose label children do not exist yet) with their type's suffixes, and every sample."""
        names = {sample.name for sample in self.samples}
        for family in self.families:
            suffixes = _SUFFIXES.get(family.type, ())
            names.update(family.name + suffix for suffix in suffixes)
            if not suffixes:
                names.add(family.name)
        return names

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels``."""
        return sum(s.value for s in self.samples if s.name == name
                   and all(s.labels.get(k) == v for k, v in labels.items()))


def parse_exposition(text: str) -> Exposition:
    return Exposition(list(text_string_to_metric_families(text)))
