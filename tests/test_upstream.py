"""The pooled upstream client: reuse, stale connections, cancellation never leaking a slot."""

from __future__ import annotations

import anyio
import anyio.abc
import pytest

from at_gateway.config import UpstreamConfig
from at_gateway.http.errors import ConnectError, ProtocolError
from at_gateway.http.pool import UpstreamClient
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


async def test_pool_size_caps_connections_per_origin(upstream: MockUpstream) -> None:
    upstream.replies["slow"] = Reply(body=chat_completion(), delay=0.05)
    client = UpstreamClient(UpstreamConfig(max_connections_per_origin=2))
    statuses: list[int] = []

    async def one() -> None:
        statuses.append((await client.request(b"POST", upstream.url + "/x", H, b'{"model":"slow"}'))[0])

    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(one)
    assert statuses == [200] * 6
    assert upstream.connections == 2  # the other four waited for a slot, then reused a connection
    assert client.stats() == {"active": 0, "idle": 2}
    await client.aclose()


async def test_idle_connection_expires(upstream: MockUpstream) -> None:
    client = UpstreamClient(UpstreamConfig(idle_timeout=0.05))
    await client.request(b"POST", upstream.url + "/x", H, b"{}")
    await anyio.sleep(0.1)  # not synchronisation: the idle time that makes the connection expire
    await client.request(b"POST", upstream.url + "/x", H, b"{}")
    assert upstream.connections == 2  # the expired one was closed, not reused
    assert client.stats() == {"active": 0, "idle": 1}
    await client.aclose()


async def test_idle_expiry_holds_while_newer_connections_are_reused(upstream: MockUpstream) -> None:
    """Reuse takes the newest idle connection; an older one left behind is still closed once expired."""
    upstream.replies["slow"] = Reply(body=chat_completion(), delay=0.05)
    client = UpstreamClient(UpstreamConfig(idle_timeout=0.2))
    async with anyio.create_task_group() as tg:  # two at once: two pooled connections
        for _ in range(2):
            tg.start_soon(client.request, b"POST", upstream.url + "/x", H, b'{"model":"slow"}')
    assert client.stats() == {"active": 0, "idle": 2}
    end = anyio.current_time() + 0.5
    while anyio.current_time() < end:  # one at a time: the newest is reused, the other one expires
        await client.request(b"POST", upstream.url + "/x", H, b"{}")
        await anyio.sleep(0.02)
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


async def test_keep_alive_with_descriptors_above_1024(upstream: MockUpstream) -> None:
    """A busy gateway holds many sockets; a pooled connection with a high descriptor is reused too
    (select() cannot check descriptors >= 1024, which made every idle connection look dropped)."""
    import os
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        if hard != resource.RLIM_INFINITY and hard < 1200:
            pytest.skip("RLIMIT_NOFILE too low to open 1100 descriptors")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    fillers = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    client = UpstreamClient()
    try:
        for _ in range(3):
            status, _, _ = await client.request(b"POST", upstream.url + "/chat/completions", H, b'{"model":"m"}')
            assert status == 200
        assert upstream.connections == 1
    finally:
        await client.aclose()
        for fd in fillers:
            os.close(fd)
        if soft < 1200:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def _read_head(stream: anyio.abc.SocketStream) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive()


async def test_reused_connection_dropped_before_answering_is_retried_on_a_fresh_one() -> None:
    """Each connection answers one request, then reads the next and closes unanswered (a server's idle
    timeout racing our request). With three such connections pooled, the next request still succeeds:
    retried once, on a new connection, not on another idle one that may be stale as well."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    url = f"http://127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}/"
    accepted = 0
    three = anyio.Event()

    async def handle(stream: anyio.abc.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        if accepted == 3:
            three.set()
        async with stream:
            await _read_head(stream)
            await three.wait()  # three connections open at once, then all go idle
            await stream.send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await _read_head(stream)

    client = UpstreamClient()
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        async with anyio.create_task_group() as burst:
            for _ in range(3):
                burst.start_soon(client.request, b"POST", url, H, b"{}")
        assert client.stats() == {"active": 0, "idle": 3}
        status, _, body = await client.request(b"POST", url, H, b"{}")
        assert (status, body) == (200, b"ok")
        assert accepted == 4
        tg.cancel_scope.cancel()
    await client.aclose()


@pytest.mark.parametrize("case", ["fresh connection closed unanswered", "reused connection closed mid-head"])
async def test_unsafe_failures_are_not_retried(case: str) -> None:
    """Only a reused connection that dies before any response byte is retried: a new connection closed
    unanswered, or an answer cut off, is a failure of this request (a failed step), sent once."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    url = f"http://127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}/"
    accepted = 0

    async def handle(stream: anyio.abc.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        async with stream:
            await _read_head(stream)
            if case.startswith("reused"):
                await stream.send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await _read_head(stream)
                await stream.send(b"HTTP/1.1 200 OK\r\n")

    client = UpstreamClient()
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        if case.startswith("reused"):
            assert (await client.request(b"POST", url, H, b"{}"))[0] == 200
        with pytest.raises(ProtocolError):
            await client.request(b"POST", url, H, b"{}")
        assert accepted == 1
        assert client.stats() == {"active": 0, "idle": 0}
        tg.cancel_scope.cancel()
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

    async def one() -> None:
        nonlocal started
        with anyio.CancelScope() as scope:
            async with client.stream(b"POST", url, H, b'{"model":"slow"}') as resp:
                async for _ in resp.aiter_raw():
                    started += 1
                    scope.cancel()  # mid-body

    async def cancel_waiting() -> None:
        # cancelled while waiting for the response head (or for a pool slot)
        with anyio.move_on_after(0.01):
            async with client.stream(b"POST", url, H, b'{"model":"hang"}') as resp:
                await resp.read()

    for _ in range(10):
        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(one if i % 2 else cancel_waiting)
    assert started > 0
    assert client.stats()["active"] == 0
    assert client.stats()["idle"] == 0  # every cancelled connection was closed, none pooled
    status, _, _ = await client.request(b"POST", url, H, b'{"model":"ok"}')
    assert status == 200
    assert client.stats() == {"active": 0, "idle": 1}
    await client.aclose()


async def test_whole_answers_are_bounded(upstream: MockUpstream) -> None:
    upstream.default = Reply(body=chat_completion("x" * 5000))
    client = UpstreamClient(UpstreamConfig(max_response_size=4096))
    with pytest.raises(ProtocolError, match="max_response_size"):
        await client.request(b"POST", upstream.url + "/x", H, b"{}")
    assert client.stats() == {"active": 0, "idle": 0}  # the half-read connection was closed, not pooled
    await client.aclose()
