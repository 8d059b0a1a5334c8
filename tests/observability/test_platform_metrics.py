"""leadwerk_platform.metrics without a broker: lag series follow the assignment, counters an
alert takes increase() of start at 0, the HTTP middleware labels by route template."""

from __future__ import annotations

import subprocess

import httpx
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, generate_latest

from leadwerk_platform.metrics import ConsumerMetrics, HttpMetrics, HttpMetricsMiddleware

from .exposition import parse_exposition


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[str, ...], float]:
    exposition = parse_exposition(generate_latest(registry).decode())
    return {tuple(sorted(s.labels.values())): s.value for s in exposition.samples
            if s.name == name}


def test_a_partition_that_moved_away_is_no_longer_reported() -> None:
    registry = CollectorRegistry()
    group = ConsumerMetrics(registry).group("g")
    group.set_lag({("t", 0): 5, ("t", 1): 7})
    group.set_lag({("t", 1): 2, ("u", 0): 0})
    assert samples(registry, "leadwerk_consumer_lag_records") == {
        ("1", "g", "t"): 2, ("0", "g", "u"): 0}
    group.set_lag({})
    assert samples(registry, "leadwerk_consumer_lag_records") == {}


def test_two_groups_share_the_families_and_keep_their_own_series() -> None:
    registry = CollectorRegistry()
    metrics = ConsumerMetrics(registry)
    first, second = metrics.group("a"), metrics.group("b")
    first.declare(["t"])
    second.declare(["t"])
    first.processed("t", 3)
    second.dead_lettered("t")
    first.set_lag({("t", 0): 4})
    second.set_lag({("t", 0): 1})
    second.set_lag({})  # b lost its partition; a's series stays
    assert samples(registry, "leadwerk_consumer_records_processed_total") == {
        ("a", "t"): 3, ("b", "t"): 0}
    assert samples(registry, "leadwerk_consumer_records_dead_lettered_total") == {
        ("a", "t"): 0, ("b", "t"): 1}
    assert samples(registry, "leadwerk_consumer_lag_records") == {("0", "a", "t"): 4}


async def test_requests_are_counted_by_route_template_and_exact_status() -> None:
    registry = CollectorRegistry()
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    app.add_middleware(HttpMetricsMiddleware, metrics=HttpMetrics(registry, "leadwerk_test"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for path in ("/items/1", "/items/2", "/items/x", "/nowhere/1", "/nowhere/2"):
            await client.get(path)
    assert samples(registry, "leadwerk_test_http_requests_total") == {
        ("/items/{item_id}", "200", "GET"): 2, ("/items/{item_id}", "422", "GET"): 1,
        ("404", "GET", "unmatched"): 2}


def test_promtool_complains_about_a_badly_named_metric(promtool: str) -> None:
    """The naming check has teeth: what test_metrics.py requires to be silent is not always."""
    text = ("# HELP leadwerk_test_requests Requests.\n# TYPE leadwerk_test_requests counter\n"
            "leadwerk_test_requests 1\n"
            "# HELP leadwerk_test_latency_ms Latency.\n# TYPE leadwerk_test_latency_ms gauge\n"
            "leadwerk_test_latency_ms 3\n")
    result = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                            capture_output=True, timeout=60, check=False)
    complaints = (result.stdout + result.stderr).decode()
    assert 'counter metrics should have "_total" suffix' in complaints
    assert "_ms" in complaints
