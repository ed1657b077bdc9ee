"""The pooled upstream client: reuse, stale connections, cancellation never leaking a slot."""

from __future__ import annotations

import anyio
import anyio.abc
import pytest

from at_gateway.config import UpstreamConfig
from at_gateway.upstream import ConnectError, ProtocolError, UpstreamClient
from tests.mock_upstream import MockUpstream, Reply, chat_completion, stream_of

pytestmark = pytest.mark.anyio

H = [(b"content-type", b"application/json")]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_keep_alive_reuses_one_connection(upstream: MockUpstream) -> None:
    client = UpstreamClient()
    for _ in range(5):
        status, _, body = await client.request(b"POST", upstream.url + "/chat/completions", H, b'{"model":"m"}')
        assert status == 200 and b"chatcmpl" in body
    assert upstream.connections == 1
    assert client.stats() == {"active": 0, "idle": 1}
    await client.aclose()


async def test_unread_body_closes_instead_of_pooling(upstream: MockUpstream) -> None:
    client = UpstreamClient()
    async with client.stream(b"POST", upstream.url + "/x", H, b'{"model":"m"}') as resp:
        assert resp.status == 200  # body never read
    assert client.stats() == {"active": 0, "idle": 0}
    await client.aclose()


async def test_connection_close_response_is_not_pooled(upstream: MockUpstream) -> None:
    upstream.default = Reply(body=chat_completion(), close=True)
    client = UpstreamClient()
    for _ in range(3):
        status, _, _ = await client.request(b"POST", upstream.url + "/x", H, b"{}")
        assert status == 200
    assert upstream.connections == 3
    assert client.stats() == {"active": 0, "idle": 0}


async def test_connection_closed_while_idle_is_not_a_failure() -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    accepted = 0
    answered = anyio.Event()

    async def handle(stream: anyio.abc.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive()
            body = b'{"ok":true}'
            await stream.send(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            answered.set()
        # closed right after answering, while the client keeps it as idle

    client = UpstreamClient()
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        for _ in range(3):
            answered = anyio.Event()
            status, _, body = await client.request(b"GET", f"http://127.0.0.1:{port}/", [])
            assert status == 200 and body == b'{"ok":true}'
            await answered.wait()
        tg.cancel_scope.cancel()
    assert accepted == 3
    await client.aclose()


async def test_refused_connection_is_connect_error() -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()
    client = UpstreamClient(UpstreamConfig(connect_timeout=2))
    with pytest.raises(ConnectError):
        await client.request(b"GET", f"http://127.0.0.1:{port}/", [])
    assert client.stats() == {"active": 0, "idle": 0}


async def test_truncated_body_is_protocol_error(upstream: MockUpstream) -> None:
    upstream.default = Reply(body=chat_completion(), truncate=True)
    client = UpstreamClient()
    with pytest.raises(ProtocolError):
        await client.request(b"POST", upstream.url + "/x", H, b"{}")
    assert client.stats() == {"active": 0, "idle": 0}


async def test_thousand_cancelled_streams_leak_nothing(upstream: MockUpstream) -> None:
    """Cancel a thousand streams at different points; the pool ends empty and still works."""
    upstream.replies["slow"] = Reply(sse=stream_of(*["w"] * 50), sse_delay=0.02)
    upstream.replies["hang"] = Reply(sse=stream_of("x"), delay=30)
    client = UpstreamClient(UpstreamConfig(max_connections_per_origin=64))
    url = upstream.url + "/chat/completions"
    started = 0

    async def one(i: int) -> None:
        nonlocal started
        model = b"hang" if i % 4 == 0 else b"slow"
        with anyio.CancelScope() as scope:
            async with client.stream(b"POST", url, H, b'{"model":"%s"}' % model) as resp:
                async for _ in resp.aiter_raw():
                    started += 1
                    scope.cancel()  # mid-body
        if i % 4 == 0:
            return

    async def cancel_waiting(i: int) -> None:
        # cancelled while waiting for the response head (or for a pool slot)
        with anyio.move_on_after(0.01):
            async with client.stream(b"POST", url, H, b'{"model":"hang"}') as resp:
                await resp.read()

    for batch in range(10):
        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(one if i % 2 else cancel_waiting, batch * 100 + i)
    assert started > 0
    assert client.stats()["active"] == 0
    assert client.stats()["idle"] == 0  # every cancelled connection was closed, none pooled
    status, _, _ = await client.request(b"POST", url, H, b'{"model":"ok"}')
    assert status == 200
    assert client.stats() == {"active": 0, "idle": 1}
    await client.aclose()
