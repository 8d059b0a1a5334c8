"""Whatever a client sends, ingest answers 2xx or 4xx (never 5xx) while the broker is up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import RunningIngest

pytestmark = pytest.mark.integration

scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(
    allow_nan=False, allow_infinity=False) | st.text(max_size=30)
json_values = st.recursive(scalars, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=12), children, max_size=4),
                           max_leaves=20)
segment_keys = st.sampled_from(["type", "userId", "anonymousId", "event", "properties",
                                "traits", "context", "timestamp", "originalTimestamp", "sentAt",
                                "messageId", "groupId", "previousId", "name", "writeKey"])
def deeply_nested(levels: int) -> bytes:
    """A valid call whose properties nest deeper than orjson writes (built as text: hypothesis
    cannot hold such objects)."""
    properties = '{"x":' * levels + "{}" + "}" * levels
    return f'{{"anonymousId":"a","event":"e","properties":{properties}}}'.encode()


edge_values = st.sampled_from([
    "track", "page", "identify", "a-user", "2026-11-21T10:00:00Z", "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "2026-13-45T99:00:00Z", "\x00",
])
calls = st.dictionaries(segment_keys, json_values | edge_values, max_size=8)
bodies = (calls | st.fixed_dictionaries({"batch": st.lists(calls, max_size=5)})
          | json_values).map(orjson.dumps) | st.binary(max_size=200) \
    | st.integers(250, 400).map(deeply_nested)
authorizations = st.sampled_from([b"Basic ZGV2LXdyaXRlLWtleTo=", b"Basic \xe9\xe9", b"Basic !!",
                                  b"Bearer x", b""])
encodings = st.sampled_from([b"", b"gzip", b"deflate", b"br", b"identity"])


@pytest.fixture
async def client(ingest: RunningIngest) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=ingest.url) as c:
        yield c


@pytest.mark.parametrize("path", ["/v1/track", "/v1/identify", "/v1/batch", "/f/ebook-download"])
async def test_fuzzed_bodies_never_get_a_5xx(client: httpx.AsyncClient, path: str) -> None:
    loop = asyncio.get_running_loop()
    statuses: list[int] = []

    @settings(max_examples=120, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(body=bodies, content_type=st.sampled_from(["application/json", "text/plain",
                                                      "application/x-www-form-urlencoded"]),
           authorization=authorizations, encoding=encodings)
    def check(body: bytes, content_type: str, authorization: bytes, encoding: bytes) -> None:
        headers: dict[str, Any] = {"Content-Type": content_type,
                                   "Authorization": authorization}
        if encoding:
            headers["Content-Encoding"] = encoding
        future = asyncio.run_coroutine_threadsafe(
            client.post(path, content=body, headers=headers), loop)
        response: Any = future.result(30)
        statuses.append(response.status_code)
        assert response.status_code < 500, (body, response.text)

    await asyncio.to_thread(check)  # hypothesis drives from a thread; requests run on this loop
    assert statuses
